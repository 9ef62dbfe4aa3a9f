"""Conversion between our BLIP models and Hugging Face transformers' `Salesforce/blip-*` layout.

Follows transformers `models/blip/convert_blip_original_pytorch_to_hf.py` (spec §5.3): the vision keys are
renamed (`visual_encoder.blocks.i.attn.proj` <-> `vision_model.encoder.layers.i.self_attn.projection`, ...), text
keys, `vision_proj`, `text_proj` and `itm_head` are unchanged, and momentum copies / queues have no HF home.

Where transformers deviates from the original BLIP we follow the original when loading HF weights (spec §5.3):
- vision LayerNorm eps: hub configs carry transformers' default 1e-5, the weights were trained with 1e-6;
- LM label smoothing: transformers defaults to 0.0, BLIP trained with 0.1;
- ITM / VQA question encoding: transformers feeds `[CLS]` as the first token, BLIP trained with `[ENC]` (our
  models replace position 0 themselves, so nothing to convert; the parity tests show the difference).

Classes: `BlipForConditionalGeneration` <-> caption, `BlipForImageTextRetrieval` <-> itm (and retrieval without its
momentum state), `BlipForQuestionAnswering` <-> vqa.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip_models.checkpoints import CheckpointError, LoadReport

if TYPE_CHECKING:
    import torch
    from torch import nn

# Hub names of the released conversions (loaded with huggingface_hub when the hub is reachable).
HUB_MODELS: dict[str, str] = {
    "Salesforce/blip-image-captioning-base": "caption",
    "Salesforce/blip-image-captioning-large": "caption",
    "Salesforce/blip-vqa-base": "vqa",
    "Salesforce/blip-vqa-capfilt-large": "vqa",
    "Salesforce/blip-itm-base-coco": "itm",
    "Salesforce/blip-itm-large-coco": "itm",
    "Salesforce/blip-itm-base-flickr": "itm",
    "Salesforce/blip-itm-large-flickr": "itm",
}

HF_CLASS_BY_KIND: dict[str, str] = {
    "caption": "BlipForConditionalGeneration",
    "itm": "BlipForImageTextRetrieval",
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
}
KIND_BY_HF_CLASS: dict[str, str] = {
    "BlipForConditionalGeneration": "caption",
    "BlipForImageTextRetrieval": "itm",
    "BlipForQuestionAnswering": "vqa",
}

ORIGINAL_VISION_EPS = 1e-6
ORIGINAL_LABEL_SMOOTHING = 0.1

# (ours, hf) regex pairs for the vision tower, applied in order; the text side is identical in both layouts.
_VISION_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
)
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
)
_TEXT_PREFIXES = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, replacement in rules:
        new_key, count = re.subn(pattern, replacement, key)
        if count:
            return new_key
    return key if key.startswith(_TEXT_PREFIXES) else None


def ours_to_hf_key(key: str) -> str | None:
    """Our (official) key -> transformers key; None for keys transformers has no place for (momentum, queues, temp)."""
    if key.startswith(("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")):
        return None
    return _rename(key, _VISION_RENAMES)


def hf_to_ours_key(key: str) -> str | None:
    """transformers key -> our (official) key; None for keys we do not use."""
    return _rename(key, _HF_RENAMES)


def state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state_dict.items():
        new_key = ours_to_hf_key(key)
        if new_key is not None and not key.endswith("embeddings.position_ids"):
            converted[new_key] = value
    return converted


def state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(converted state dict, HF keys that have no counterpart in our layout)."""
    converted, unused = {}, []
    for key, value in state_dict.items():
        new_key = hf_to_ours_key(key)
        if new_key is None:
            unused.append(key)
        else:
            converted[new_key] = value
    return converted, unused


# -------------------------------------------------------------------------------------------------- configs


def hf_config_from_ours(config: Any, *, vision_eps: float | None = None, label_smoothing: float | None = None) -> Any:
    """A transformers `BlipConfig` with our architecture.

    By default the deviating settings are set to the original's values (eps 1e-6, label smoothing from our
    config) so the two compute the same thing; pass `vision_eps=1e-5` / `label_smoothing=0.0` for transformers'
    own defaults.
    """
    from transformers import BlipConfig as HFBlipConfig

    vision, text = config.vision, config.text
    smoothing = text.label_smoothing if label_smoothing is None else label_smoothing
    vision_config = {"hidden_size": vision.width, "intermediate_size": int(vision.width * vision.mlp_ratio),
                     "num_hidden_layers": vision.depth, "num_attention_heads": vision.heads,
                     "image_size": vision.image_size, "patch_size": vision.patch_size,
                     "layer_norm_eps": vision.layer_norm_eps if vision_eps is None else vision_eps}  # fmt: skip
    text_config = {"vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
                   "encoder_hidden_size": vision.width, "intermediate_size": text.intermediate_size,
                   "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
                   "max_position_embeddings": text.max_position_embeddings, "layer_norm_eps": text.layer_norm_eps,
                   "hidden_dropout_prob": text.hidden_dropout, "attention_probs_dropout_prob": text.attention_dropout,
                   "label_smoothing": smoothing, "pad_token_id": text.pad_token_id,
                   "bos_token_id": text.bos_token_id, "sep_token_id": text.sep_token_id}  # fmt: skip
    return HFBlipConfig(text_config=text_config, vision_config=vision_config,
                        image_text_hidden_size=config.embed_dim, label_smoothing=smoothing)  # fmt: skip


def config_from_hf(hf_config: Any, *, keep_hf_eps: bool = False) -> tuple[Any, list[str]]:
    """Our BlipConfig from a transformers BlipConfig, plus notes on the deviations corrected (for the report)."""
    from blip_models.configuration_blip import BlipConfig, TextConfig, VisionConfig

    vision, text = hf_config.vision_config, hf_config.text_config
    notes = []
    eps = vision.layer_norm_eps
    if not keep_hf_eps and eps != ORIGINAL_VISION_EPS:
        notes.append(f"vision layer_norm_eps {eps} (transformers default) -> {ORIGINAL_VISION_EPS} (original BLIP)")
        eps = ORIGINAL_VISION_EPS
    if text.label_smoothing != ORIGINAL_LABEL_SMOOTHING:
        notes.append(f"LM label_smoothing {text.label_smoothing} (transformers) -> {ORIGINAL_LABEL_SMOOTHING} (original BLIP)")
    if vision.intermediate_size % vision.hidden_size:
        raise CheckpointError(f"vision intermediate_size {vision.intermediate_size} is not a multiple of hidden_size")
    image_size = vision.image_size if isinstance(vision.image_size, int) else int(vision.image_size[0])
    patch_size = vision.patch_size if isinstance(vision.patch_size, int) else int(vision.patch_size[0])
    ours = BlipConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vision.hidden_size,
                            depth=vision.num_hidden_layers, heads=vision.num_attention_heads,
                            mlp_ratio=vision.intermediate_size / vision.hidden_size, layer_norm_eps=eps),
        text=TextConfig(vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                        intermediate_size=text.intermediate_size, max_position_embeddings=text.max_position_embeddings,
                        layer_norm_eps=text.layer_norm_eps, encoder_width=vision.hidden_size,
                        label_smoothing=ORIGINAL_LABEL_SMOOTHING, pad_token_id=text.pad_token_id or 0,
                        bos_token_id=30522 if text.bos_token_id is None else text.bos_token_id,
                        sep_token_id=102 if text.sep_token_id is None else text.sep_token_id),
        embed_dim=hf_config.image_text_hidden_size,
    )  # fmt: skip
    return ours, notes


# ----------------------------------------------------------------------------------------------- conversion


def to_hf(model: nn.Module, *, vision_eps: float | None = None, label_smoothing: float | None = None) -> nn.Module:
    """The transformers model computing what `model` computes (caption, itm, retrieval or vqa), same weights."""
    import transformers

    from blip_models.checkpoints import model_kind

    kind = model_kind(model)
    if kind not in HF_CLASS_BY_KIND:
        raise CheckpointError(f"transformers has no BLIP class for a '{kind}' model (only {sorted(HF_CLASS_BY_KIND)})")
    hf_config = hf_config_from_ours(model.config, vision_eps=vision_eps, label_smoothing=label_smoothing)
    hf_model = getattr(transformers, HF_CLASS_BY_KIND[kind])(hf_config)
    state = state_dict_to_hf(model.state_dict())
    target = hf_model.state_dict()
    state = {k: v for k, v in state.items() if k in target}
    result = hf_model.load_state_dict(state, strict=False)
    # Tied aliases (decoder weight/bias <- embeddings/bias) are filled by transformers' tying, not by the dict.
    missing = [k for k in result.missing_keys if not k.endswith(("predictions.decoder.weight", "predictions.decoder.bias"))]
    if missing:
        raise CheckpointError(f"to_hf: transformers {HF_CLASS_BY_KIND[kind]} keys left unset: {missing[:5]}")
    return hf_model.eval()


def save_hf(model: nn.Module, tokenizer: Any, directory: str | Path) -> Path:
    """Write `model` as a transformers directory (`to_hf`: BlipForConditionalGeneration, BlipForImageTextRetrieval
    or BlipForQuestionAnswering) with a `BlipProcessor` beside it: BLIP's eval transform as a BlipImageProcessor
    (the model's image size, bicubic, CLIP mean / std) and the tokenizer with [DEC] and [ENC]; so that
    `<class>.from_pretrained(directory)` and `BlipProcessor.from_pretrained(directory)` load it as the hub's."""
    from PIL import Image
    from transformers import BlipImageProcessor, BlipProcessor

    from blip_models.processing import CLIP_MEAN, CLIP_STD

    directory = Path(directory)
    to_hf(model).save_pretrained(directory)
    size = int(model.config.vision.image_size)
    images = BlipImageProcessor(size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC,
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # fmt: skip
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def is_hf_dir(path: str | Path) -> bool:
    """A directory written by transformers' `save_pretrained` for one of the BLIP classes."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("model_type") == "blip" or any(a in KIND_BY_HF_CLASS for a in data.get("architectures") or [])


def hf_kind(directory: Path) -> str | None:
    """Our model kind for a transformers directory's `architectures` (None when it names no BLIP task class)."""
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return next((KIND_BY_HF_CLASS[a] for a in raw.get("architectures") or [] if a in KIND_BY_HF_CLASS), None)


def is_hub_name(text: str) -> bool:
    """A transformers hub name of a BLIP model: the released ones (`HUB_MODELS`) or any `Salesforce/blip*`."""
    return text in HUB_MODELS or (text.count("/") == 1 and text.startswith("Salesforce/blip"))


def hf_directory(path_or_name: str | Path) -> Path:
    """A transformers directory as given, or a hub name's snapshot (downloaded by huggingface_hub, cached)."""
    path = Path(path_or_name)
    if path.is_dir():
        return path
    name = str(path_or_name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
        except Exception as error:  # noqa: BLE001 - offline / unknown repo: one clear line
            raise CheckpointError(f"cannot fetch {name!r} from the Hugging Face hub: {type(error).__name__}: {error}") from error
    raise FileNotFoundError(f"not a directory or hub name: {path_or_name}")


def read_hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    import torch

    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    if any(directory.glob("model-*.safetensors")):  # sharded
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for shard in sorted(directory.glob("model-*.safetensors")):
            state.update(load_file(str(shard)))
        return state
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_hf(path_or_name: str | Path, kind: str | None = None, *, keep_hf_eps: bool = False) -> tuple[nn.Module, LoadReport]:
    """Load a transformers BLIP directory (or hub name) into our model of `kind` (default: from `architectures`).

    The architecture comes from config.json; the vision LayerNorm eps and LM label smoothing are set to the
    original BLIP values (see the module docstring) unless `keep_hf_eps`.
    """
    from transformers import BlipConfig as HFBlipConfig

    from blip_models.checkpoints import accept_fresh, build_model, load_into

    directory = hf_directory(path_or_name)
    if not is_hf_dir(directory):
        raise CheckpointError(f"{directory}: not a transformers BLIP directory (config.json model_type != 'blip')")
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    file_kind = hf_kind(directory)
    kind = kind or file_kind or HUB_MODELS.get(str(path_or_name))
    if kind is None:
        raise CheckpointError(f"{directory}: cannot tell the model kind (architectures={raw.get('architectures')}); pass kind=")
    config, notes = config_from_hf(HFBlipConfig.from_pretrained(str(directory)), keep_hf_eps=keep_hf_eps)
    state, unused = state_dict_from_hf(read_hf_state_dict(directory))
    model = build_model(kind, config)
    report = accept_fresh(model, load_into(model, state, source=str(path_or_name), kind=kind), file_kind)
    report.unexpected += unused
    report.adapted += notes
    # transformers' safetensors omit the tied LM-head weight; our constructor ties it to the word embeddings.
    report.missing = [k for k in report.missing if not k.endswith("cls.predictions.decoder.weight")]
    if report.missing:
        raise CheckpointError(f"{directory}: a '{file_kind}' checkpoint lacks {len(report.missing)} tensor(s) that the '{kind}' "
                              f"model needs, e.g. {', '.join(report.missing[:3])}")  # fmt: skip
    return model.eval(), report
