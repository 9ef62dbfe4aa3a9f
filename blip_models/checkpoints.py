"""Checkpoint I/O for our BLIP models: the official salesforce/BLIP `.pth` files and our own safetensors format.

Follows salesforce/BLIP `models/blip.py:load_checkpoint` (spec §5.1-§5.2) with two deliberate changes:
- the architecture is read from the state dict (ViT depth/width/patch/image size, text depth/width/vocab,
  cross-attention width) instead of being passed in, so a `large` file cannot be loaded into a `base` model;
- a shape mismatch is an error naming the key and both shapes. The reference silently deletes such keys and
  leaves them randomly initialised (spec §9.9). The only documented rule that adapts a shape is the bicubic
  interpolation of `pos_embed` when the target image size differs (spec §5.2).

Everything that is not loaded one-to-one is listed in a `LoadReport`: missing keys, unexpected keys, momentum
copies and queues that the target model does not have, and adaptations (pos_embed interpolation, NLVR branch
duplication, tied-weight aliases).

`save_pretrained` / `from_pretrained` are our publishable unit: `model.safetensors` + `config.json`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip_models import MODEL_CLASSES, model_class

if TYPE_CHECKING:
    import torch
    from torch import nn

OFFICIAL_URL_PREFIX = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"

# name -> (file, kind, vit) for every released checkpoint (spec §5.1).
OFFICIAL_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "model_base_14M": ("model_base_14M.pth", "pretrain", "base"),
    "model_base": ("model_base.pth", "pretrain", "base"),
    "model_base_capfilt_large": ("model_base_capfilt_large.pth", "pretrain", "base"),
    "model_large": ("model_large.pth", "pretrain", "large"),
    "model_base_retrieval_coco": ("model_base_retrieval_coco.pth", "retrieval", "base"),
    "model_large_retrieval_coco": ("model_large_retrieval_coco.pth", "retrieval", "large"),
    "model_base_retrieval_flickr": ("model_base_retrieval_flickr.pth", "retrieval", "base"),
    "model_large_retrieval_flickr": ("model_large_retrieval_flickr.pth", "retrieval", "large"),
    "model_base_caption_capfilt_large": ("model_base_caption_capfilt_large.pth", "caption", "base"),
    "model_large_caption": ("model_large_caption.pth", "caption", "large"),
    "model_vqa": ("model_vqa.pth", "vqa", "base"),
    "model_base_vqa_capfilt_large": ("model_base_vqa_capfilt_large.pth", "vqa", "base"),
    "model_base_nlvr": ("model_base_nlvr.pth", "nlvr", "base"),
}

# LAVIS's model zoo (`load_model("blip_caption", "base_coco")`; lavis/configs/models/blip_*.yaml): "arch/model_type"
# -> (URL of the weights it loads, our kind). Four are LAVIS's own finetunes, the rest BLIP's released files. Left
# out: blip_classification/base (a SNLI-VE head with no released weights) and blip_pretrain/large (no weights).
LAVIS_URL_PREFIX = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP/"
LAVIS_MODELS: dict[str, tuple[str, str]] = {
    "blip_caption/base_coco": (LAVIS_URL_PREFIX + "blip_coco_caption_base.pth", "caption"),
    "blip_caption/large_coco": (OFFICIAL_URL_PREFIX + "model_large_caption.pth", "caption"),
    "blip_feature_extractor/base": (OFFICIAL_URL_PREFIX + "model_base_capfilt_large.pth", "features"),
    "blip_image_text_matching/base": (OFFICIAL_URL_PREFIX + "model_base_retrieval_coco.pth", "itm"),
    "blip_image_text_matching/large": (OFFICIAL_URL_PREFIX + "model_large_retrieval_coco.pth", "itm"),
    "blip_nlvr/nlvr": (OFFICIAL_URL_PREFIX + "model_base_nlvr.pth", "nlvr"),
    "blip_pretrain/base": (OFFICIAL_URL_PREFIX + "model_base_capfilt_large.pth", "pretrain"),
    "blip_retrieval/coco": (LAVIS_URL_PREFIX + "blip_coco_retrieval.pth", "retrieval"),
    "blip_retrieval/flickr": (LAVIS_URL_PREFIX + "blip_flickr_retrieval.pth", "retrieval"),
    "blip_vqa/vqav2": (OFFICIAL_URL_PREFIX + "model_base_vqa_capfilt_large.pth", "vqa"),
    "blip_vqa/okvqa": (LAVIS_URL_PREFIX + "blip_okvqa.pth", "vqa"),
    "blip_vqa/aokvqa": (LAVIS_URL_PREFIX + "blip_aokvqa.pth", "vqa"),
}

# Kinds of task model and their classes: the one table in blip_models/__init__.py.

FORMAT_NAME = "blip-bootstrap"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Keys that exist only for training (momentum encoders, feature queues); loaded when the target has them.
_MOMENTUM_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
# `temp` (the learnable ITC temperature) only matters for training: ITM/feature models have none.
_QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "ptr_queue", "idx_queue", "temp")
# Non-learned buffers that some layouts store and others do not (transformers 4.15 persisted position_ids).
_OPTIONAL_BUFFER_SUFFIXES = ("embeddings.position_ids",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested model (wrong kind, wrong shapes, unreadable file)."""


def official_urls() -> dict[str, str]:
    """name -> download URL of every released BLIP checkpoint (spec §5.1)."""
    return {name: OFFICIAL_URL_PREFIX + file for name, (file, _, _) in OFFICIAL_CHECKPOINTS.items()}


def named_checkpoints() -> dict[str, tuple[str, str]]:
    """name -> (URL, kind) of every checkpoint known by name: BLIP's released files by their names
    (`model_base_capfilt_large`), then LAVIS's model zoo by `arch/model_type` (`blip_caption/base_coco`)."""
    blip = {name: (OFFICIAL_URL_PREFIX + file, kind) for name, (file, kind, _) in OFFICIAL_CHECKPOINTS.items()}
    return {**blip, **LAVIS_MODELS}


def checkpoint_url(name: str | Path) -> str | None:
    """The URL a checkpoint name stands for (BLIP's or LAVIS's, `named_checkpoints`), None for anything else."""
    known = named_checkpoints().get(str(name).removesuffix(".pth"))
    return known[0] if known else None


def checkpoint_not_found(source: str | Path) -> str:
    """The message for a checkpoint that is neither a file, a directory, a URL nor a name, with the names it
    resembles."""
    import difflib

    close = difflib.get_close_matches(str(source), list(named_checkpoints()), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"checkpoint not found: {source}{hint}; `blip infer models` lists the checkpoint names"


def checkpoint_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where downloaded checkpoints are kept: `cache_dir`, else $BLIP_CHECKPOINT_CACHE, else torch hub's dir."""
    import os

    if cache_dir or os.environ.get("BLIP_CHECKPOINT_CACHE"):
        return Path(cache_dir or os.environ["BLIP_CHECKPOINT_CACHE"])
    import torch

    return Path(torch.hub.get_dir()) / "blip_checkpoints"


def cached_path(url: str, cache_dir: str | Path | None = None) -> Path:
    """The file a download of `url` is kept as (present or not)."""
    return checkpoint_cache_dir(cache_dir) / url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class LoadReport:
    """What happened when a state dict was loaded into a model. `ok` is False when something required is missing."""

    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for
    ignored_training_state: list[str] = field(default_factory=list)  # momentum/queue keys the model lacks
    adapted: list[str] = field(default_factory=list)  # documented rules applied: "key: what was done"
    initialized: list[str] = field(default_factory=list)  # absent from the source, fresh as the reference leaves them
    source_kind: str | None = None  # the kind the checkpoint itself is (inferred from its keys or its config)

    @property
    def ok(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        origin = f" ('{self.source_kind}' checkpoint)" if self.source_kind else ""
        lines = [f"{self.source}{origin} -> {self.kind}: {len(self.loaded)} tensors loaded"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("ignored momentum/queue", self.ignored_training_state), ("adapted", self.adapted),
                            ("freshly initialised", self.initialized)):  # fmt: skip
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {label} ({len(keys)}): {shown}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "source_kind": self.source_kind, "kind": self.kind, "loaded": len(self.loaded),
                "missing": self.missing, "unexpected": self.unexpected, "ignored_training_state": self.ignored_training_state,
                "adapted": self.adapted, "initialized": self.initialized}  # fmt: skip


# ------------------------------------------------------------------------------------------ reading the layout


def infer_kind(keys: Any) -> str:
    """Which task model an official state dict belongs to, from its key families (spec §5.2)."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has("visual_encoder."):
        raise CheckpointError("not a BLIP checkpoint: no 'visual_encoder.*' keys")
    if has("cls_head.") or any(".crossattention.self0." in k for k in keys):
        return "nlvr"
    momentum = has("visual_encoder_m.") or has("text_encoder_m.")
    if momentum and has("text_decoder."):
        return "pretrain"
    if momentum:
        return "retrieval"
    if has("text_encoder.") and has("text_decoder."):
        return "vqa"
    if has("text_decoder."):
        return "caption"
    if has("text_encoder.") and has("itm_head."):
        return "itm"
    if has("text_encoder."):
        return "features"
    raise CheckpointError("cannot tell the model kind: only vision keys in the checkpoint")


def _count_indexed(keys: Any, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in keys if (match := pattern.match(key))}
    if indices and indices != set(range(len(indices))):
        raise CheckpointError(f"layers under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _heads(width: int, heads: int | None, where: str) -> int:
    if heads is not None:
        if heads <= 0 or width % heads:
            raise CheckpointError(f"{where}: {heads} heads do not divide the width {width}")
        return heads
    if width % 64:
        raise CheckpointError(f"{where}: width {width} is not a multiple of 64, so the number of attention heads "
                              "cannot be read from the weights; pass it explicitly (vision_heads= / text_heads=)")  # fmt: skip
    return width // 64


def infer_architecture(state_dict: Mapping[str, Any], vision_heads: int | None = None,
                       text_heads: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Read the architecture from tensor shapes: {"vision": {...}, "text": {...}, "embed_dim", "queue_size"}.

    Head counts are not stored in a state dict: they default to width / 64 (every released BLIP model uses
    64-dim heads, for the ViT and the BERT stack alike) and can be given for other models.
    """
    shape = lambda key: tuple(state_dict[key].shape)  # noqa: E731
    try:
        width = shape("visual_encoder.cls_token")[-1]
        patch_size = shape("visual_encoder.patch_embed.proj.weight")[-1]
        num_positions = shape("visual_encoder.pos_embed")[1]
        mlp_hidden = shape("visual_encoder.blocks.0.mlp.fc1.weight")[0]
    except KeyError as error:
        raise CheckpointError(f"not a BLIP vision encoder: key {error.args[0]!r} is missing") from error
    grid = math.isqrt(num_positions - 1)
    if grid * grid != num_positions - 1:
        raise CheckpointError(f"visual_encoder.pos_embed has {num_positions - 1} patch positions, not a square grid")
    vision = {"image_size": grid * patch_size, "patch_size": patch_size, "width": width,
              "depth": _count_indexed(state_dict, "visual_encoder.blocks."), "heads": _heads(width, vision_heads, "ViT"),
              "mlp_ratio": mlp_hidden / width}  # fmt: skip

    text: dict[str, Any] = {}
    for prefix in ("text_encoder.", "text_decoder.bert."):
        word = prefix + "embeddings.word_embeddings.weight"
        if word not in state_dict:
            continue
        vocab_size, hidden = shape(word)
        text = {"vocab_size": vocab_size, "hidden_size": hidden, "num_attention_heads": _heads(hidden, text_heads, "text transformer"),
                "num_hidden_layers": _count_indexed(state_dict, prefix + "encoder.layer."),
                "intermediate_size": shape(prefix + "encoder.layer.0.intermediate.dense.weight")[0],
                "max_position_embeddings": shape(prefix + "embeddings.position_embeddings.weight")[0]}  # fmt: skip
        break
    embed_dim = shape("vision_proj.weight")[0] if "vision_proj.weight" in state_dict else None
    queue_size = shape("image_queue")[1] if "image_queue" in state_dict else None
    return {"vision": vision, "text": text, "embed_dim": embed_dim, "queue_size": queue_size}


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ViT position embedding (1, 1 + g*g, D) to (1, 1 + num_patches, D): CLS kept, grid bicubic (spec §5.2)."""
    from blip_models.vit import interpolate_pos_embed as resize

    try:
        return resize(pos_embed, num_patches)
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def expand_nlvr_branches(state_dict: dict[str, Any], target_keys: Any) -> list[str]:
    """Pretrained → NLVR2: copy `crossattention.self.*` to `self0`/`self1`, `output.dense` to `dense0`/`dense1`.

    Mirrors `blip_nlvr.load_checkpoint` (spec §4.4); only fills keys the target has and the state dict lacks.
    Returns a line per rule applied, for the LoadReport.
    """
    target_keys = set(target_keys)
    applied = 0
    for key in list(state_dict):
        if ".crossattention.self." in key:
            for branch in ("self0", "self1"):
                new_key = key.replace(".crossattention.self.", f".crossattention.{branch}.")
                if new_key in target_keys and new_key not in state_dict:
                    state_dict[new_key] = state_dict[key]
                    applied += 1
        elif ".crossattention.output.dense." in key:
            for branch in ("dense0", "dense1"):
                new_key = key.replace(".crossattention.output.dense.", f".crossattention.output.{branch}.")
                if new_key in target_keys and new_key not in state_dict:
                    state_dict[new_key] = state_dict[key]
                    applied += 1
    return [f"crossattention self/dense duplicated into NLVR branches self0/self1, dense0/dense1 ({applied} tensors)"] if applied else []


# ------------------------------------------------------------------------------------------------ loading


def _is_training_state(key: str) -> bool:
    return key.startswith(_MOMENTUM_PREFIXES) or key in _QUEUE_KEYS


def load_into(model: nn.Module, state_dict: Mapping[str, Any], *, source: str, kind: str) -> LoadReport:
    """Copy `state_dict` into `model` with shape checks; never silently drops a mismatched tensor.

    Rules (the documented ones, reported under `adapted`): `*pos_embed` is interpolated to the model's grid;
    pretrained cross-attention is duplicated into NLVR branches; `cls.predictions.decoder.bias` may stand in for
    `cls.predictions.bias` (one tensor, two names in transformers' BERT LM head). Raises CheckpointError on a
    shape mismatch, naming the key and both shapes.
    """
    import torch

    state_dict = dict(state_dict)
    target = model.state_dict()
    report = LoadReport(source=source, kind=kind)
    report.adapted += expand_nlvr_branches(state_dict, target)
    # transformers' BERT LM head registers one bias Parameter under two names (`bias`, `decoder.bias`); files
    # may carry either or both, models define one of them.
    for alias_from, alias_to in ((".cls.predictions.decoder.bias", ".cls.predictions.bias"),
                                 (".cls.predictions.bias", ".cls.predictions.decoder.bias")):  # fmt: skip
        for key in [k for k in state_dict if k.endswith(alias_from) and k not in target]:
            other = key[: -len(alias_from)] + alias_to
            if other in target:
                state_dict.setdefault(other, state_dict[key])
                del state_dict[key]
    for key in [k for k in state_dict if k.endswith("pos_embed") and k in target]:
        have, want = tuple(state_dict[key].shape), tuple(target[key].shape)
        if have != want and len(have) == 3 and have[-1] == want[-1]:
            state_dict[key] = interpolate_pos_embed(state_dict[key], want[1] - 1)
            report.adapted.append(f"{key}: interpolated {list(have)} -> {list(want)} (bicubic, CLS kept)")

    mismatched = [f"{key}: checkpoint {list(state_dict[key].shape)} vs model {list(target[key].shape)}"
                  for key in state_dict if key in target and tuple(state_dict[key].shape) != tuple(target[key].shape)]  # fmt: skip
    if mismatched:
        raise CheckpointError(f"{source}: shape mismatch for {len(mismatched)} tensor(s) loading into '{kind}': "
                              + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else ""))  # fmt: skip

    to_load = {}
    for key, value in state_dict.items():
        if key in target:
            to_load[key] = value
        elif key.endswith(_OPTIONAL_BUFFER_SUFFIXES):
            continue  # a constant buffer (momentum copies have one too): nothing is lost, nothing to report
        elif _is_training_state(key):
            report.ignored_training_state.append(key)
        else:
            report.unexpected.append(key)
    with torch.no_grad():
        result = model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = [k for k in result.missing_keys if not k.endswith(_OPTIONAL_BUFFER_SUFFIXES)]
    return report


# Heads a task model adds on top of a checkpoint of another kind; the reference initialises them fresh.
_NEW_HEADS: dict[str, tuple[str, ...]] = {"nlvr": ("cls_head.", ".crossattention.output.merge_layer.")}


def accept_fresh(model: nn.Module, report: LoadReport, source_kind: str | None) -> LoadReport:
    """Move the missing keys that the reference also leaves fresh from `missing` to `initialized`.

    Those are training state (momentum copies are reset to the online weights with `copy_params`, queues keep
    their random init, as in a fresh model) and the heads a task adds when finetuning from another kind
    (NLVR2's `cls_head` and `merge_layer`). Everything else stays missing, which callers treat as an error.
    """
    report.source_kind = source_kind
    new_heads = _NEW_HEADS.get(report.kind, ()) if source_kind != report.kind else ()
    fresh = [k for k in report.missing if _is_training_state(k) or any(h in "." + k for h in new_heads)]
    if not fresh:
        return report
    report.missing = [k for k in report.missing if k not in set(fresh)]
    report.initialized += fresh
    if any(k.startswith(_MOMENTUM_PREFIXES) for k in fresh) and hasattr(model, "copy_params"):
        model.copy_params()
        report.adapted.append("momentum encoders copied from the online encoders (absent from the source)")
    return report


def read_official(path_or_url: str | Path, map_location: str = "cpu", cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The `'model'` state dict of an official `.pth`: a local path, an http(s) URL or a checkpoint name
    (`named_checkpoints`: BLIP's or LAVIS's), the last two downloaded once to a cache. A local file wins over a
    name."""
    import torch

    path = local_checkpoint(path_or_url, cache_dir)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - a corrupt or non-torch file becomes one clear error
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        return dict(checkpoint["model"])
    if isinstance(checkpoint, Mapping) and any(str(k).startswith("visual_encoder.") for k in checkpoint):
        return dict(checkpoint)  # a bare state dict, as some re-saved copies are
    raise CheckpointError(f"{path}: no 'model' state dict inside (top-level keys: {list(checkpoint)[:6]})")


def local_checkpoint(path_or_url: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The local file of a checkpoint given as a path, an http(s) URL or a name (`named_checkpoints`; a local file
    wins over a name): a URL is downloaded once into the checkpoint cache."""
    if not Path(path_or_url).exists():
        path_or_url = checkpoint_url(path_or_url) or path_or_url
    text = str(path_or_url)
    path = _download(text, cache_dir) if text.startswith(("http://", "https://")) else Path(path_or_url)
    if not path.is_file():
        raise FileNotFoundError(checkpoint_not_found(path))
    return path


def _download(url: str, cache_dir: str | Path | None) -> Path:
    import torch

    path = cached_path(url, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        partial = path.with_suffix(path.suffix + ".partial")
        torch.hub.download_url_to_file(url, str(partial), progress=True)
        partial.replace(path)  # only a complete download gets the real name
    return path


def config_from_architecture(arch: dict[str, Any], kind: str, image_size: int | None = None) -> Any:
    """A BlipConfig for `kind` built from `infer_architecture` output (image size overridable).

    Drop-path follows the reference constructors: 0.1 for VQA and NLVR2, and always 0.1 for ViT-L (spec §1.2).
    """
    import dataclasses

    from blip_models.configuration_blip import BlipConfig, TextConfig, VisionConfig

    vision = dict(arch["vision"])
    if image_size is not None:
        if image_size <= 0 or image_size % vision["patch_size"]:
            raise CheckpointError(f"image_size {image_size} is not a positive multiple of the patch size {vision['patch_size']}")
        vision["image_size"] = image_size
    vision["drop_path_rate"] = 0.1 if kind in ("vqa", "nlvr") or vision["width"] >= 1024 else 0.0
    text = dict(arch["text"])
    if not text:
        raise CheckpointError("checkpoint has no text transformer (text_encoder.* or text_decoder.bert.*)")
    # Cross-attention keys/values take ViT tokens; (VQA's decoder reads question states; the model handles that).
    text["encoder_width"] = vision["width"]
    pick = lambda cls, values: {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}}  # noqa: E731
    extra = {key: arch[key] for key in ("embed_dim", "queue_size") if arch.get(key) is not None}
    return BlipConfig(vision=VisionConfig(**pick(VisionConfig, vision)), text=TextConfig(**pick(TextConfig, text)), **extra)


def build_model(kind: str, config: Any) -> nn.Module:
    """Instantiate the task model class for `kind` with `config`."""
    if kind not in MODEL_CLASSES:
        raise CheckpointError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_CLASSES)}")
    return model_class(kind)(config)


def model_kind(model: nn.Module) -> str:
    """The kind name of a task model instance (inverse of MODEL_CLASSES)."""
    for kind, (module_name, class_name) in MODEL_CLASSES.items():
        if type(model).__name__ == class_name and type(model).__module__ == module_name:
            return kind
    raise CheckpointError(f"{type(model).__name__} is not one of the BLIP task models {sorted(MODEL_CLASSES)}")


def load_official(path_or_url: str | Path, kind: str | None = None, image_size: int | None = None,
                  map_location: str = "cpu", cache_dir: str | Path | None = None, *,
                  vision_heads: int | None = None, text_heads: int | None = None) -> tuple[nn.Module, LoadReport]:  # fmt: skip
    """Load an official salesforce/BLIP `.pth` into our task model; the architecture comes from the weights.

    `kind` defaults to the file's own kind (from its key families); a pretrained file can be loaded into any kind
    (caption, vqa, nlvr, ...), as the reference finetuning scripts do. `image_size` overrides the size the file
    was trained at (pos_embed is then interpolated). Head counts default to width / 64 (all released models);
    `vision_heads` / `text_heads` set them for other models. Raises CheckpointError when a tensor the model needs is
    missing (e.g. a caption file loaded for ITM) or has the wrong shape.
    """
    state_dict = read_official(path_or_url, map_location=map_location, cache_dir=cache_dir)
    file_kind = infer_kind(state_dict)
    kind = kind or file_kind
    config = config_from_architecture(infer_architecture(state_dict, vision_heads, text_heads), kind, image_size)
    model = build_model(kind, config)
    report = accept_fresh(model, load_into(model, state_dict, source=str(path_or_url), kind=kind), file_kind)
    if report.missing:
        raise CheckpointError(f"{path_or_url}: a '{file_kind}' checkpoint lacks {len(report.missing)} tensor(s) that the "
                              f"'{kind}' model needs, e.g. {', '.join(report.missing[:3])}")  # fmt: skip
    return model.eval(), report


# --------------------------------------------------------------------------------------------- our own format


def _tied_aliases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """alias -> canonical key for tensors that share storage (tied weights); the first key by name is canonical."""
    canonical_by_storage: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if tensor.numel() == 0:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if ident in canonical_by_storage:
            aliases[key] = canonical_by_storage[ident]
        else:
            canonical_by_storage[ident] = key
    return aliases


def config_to_dict(config: Any) -> dict[str, Any]:
    from blip_models.configuration_blip import to_dict

    return to_dict(config)


def config_from_dict(values: Mapping[str, Any]) -> Any:
    """Inverse of `config_to_dict`; unknown keys are an error (typed configs fail on typos)."""
    from blip_models.configuration_blip import from_dict

    try:
        return from_dict(dict(values))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"config.json: {error}") from error


def save_pretrained(model: nn.Module, directory: str | Path, tokenizer: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """Write `model.safetensors` + `config.json` into `directory` (created); returns the directory.

    Tied tensors (pretraining shares encoder/decoder layers, the LM head shares the word embeddings) are written
    once under their canonical name; `config.json["tied"]` maps each alias to it and `from_pretrained` re-ties.
    `tokenizer`: how to rebuild the tokenizer (None = the offline BERT-uncased vocab + [DEC]/[ENC]).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = model.state_dict()
    aliases = _tied_aliases(state_dict)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items() if k not in aliases}
    config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": model_kind(model),
              "config": config_to_dict(model.config), "tied": aliases,
              "tokenizer": {"source": tokenizer, "dec_token_id": 30522, "enc_token_id": 30523},
              **dict(extra or {})}  # fmt: skip
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT_NAME, "kind": config["kind"]})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def save_official(model: nn.Module, path: str | Path) -> Path:
    """Write `model` as salesforce/BLIP releases its checkpoints: `torch.save({"model": state_dict})` under BLIP's
    key names (ours are BLIP's), which BLIP's `load_checkpoint`, LAVIS's `load_from_pretrained` and
    `load_official` read; a pretraining model keeps its momentum encoders and queues, as `model_base.pth` does."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {key: value.detach().cpu() for key, value in model.state_dict().items()}}, path)
    return path


def is_pretrained_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_NAME
    if not (config.is_file() and (Path(path) / WEIGHTS_NAME).is_file()):
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (OSError, ValueError):
        return False


def read_pretrained_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not a save_pretrained directory)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} model (format={data.get('format')!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {data['format_version']} is newer than this code ({FORMAT_VERSION})")
    return data


def from_pretrained(directory: str | Path, map_location: str = "cpu") -> nn.Module:
    """Rebuild a model written by `save_pretrained` (strict: every tensor must be present with its shape)."""
    from safetensors.torch import load_file

    data = read_pretrained_config(directory)
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME), device=map_location)
    for alias, canonical in data.get("tied", {}).items():
        tensors.setdefault(alias, tensors[canonical])
    model = _build_for_weights(data["kind"], config_from_dict(data["config"]), tensors, map_location)
    report = load_into(model, tensors, source=str(directory), kind=data["kind"])
    if report.missing or report.unexpected:
        raise CheckpointError(f"{directory}: weights do not match a '{data['kind']}' model: "
                              f"missing {report.missing[:3]}, unexpected {report.unexpected[:3]}")  # fmt: skip
    _check_ties(model, data.get("tied", {}), directory)
    return model.eval()


def _build_for_weights(kind: str, config: Any, tensors: Mapping[str, torch.Tensor], device: str) -> nn.Module:
    """The model, built without its random initialisation when `tensors` overwrite every one of its tensors.

    Random init is most of the time it takes to load a model (BLIP-base captioner: ~5 s of a CPU core; every
    CapFilt actor, evaluation worker and `blip infer` pays it); the file replaces all of it. So the model is built
    on the meta device (shapes only), given uninitialised memory, and its tied parameters are tied again (moving
    off the meta device makes each module's parameter its own tensor). If the file lacks any tensor, the model is
    built normally, so that nothing is ever left uninitialised.
    """
    import torch

    with torch.device("meta"):
        empty = build_model(kind, config)
    if not set(empty.state_dict()) <= set(tensors):
        return build_model(kind, config)
    shared = _shared_parameters(empty)
    empty = empty.to_empty(device=device)
    for alias, canonical in shared.items():
        owner_name, _, attribute = alias.rpartition(".")
        setattr(empty.get_submodule(owner_name), attribute, empty.get_parameter(canonical))
    return empty


def _shared_parameters(model: nn.Module) -> dict[str, str]:
    """alias -> canonical name for every parameter object reachable under two names (weight tying)."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first_name:
            aliases[name] = first_name[id(parameter)]
        else:
            first_name[id(parameter)] = name
    return aliases


def _check_ties(model: nn.Module, tied: Mapping[str, str], directory: str | Path) -> None:
    """Tied weights must still be one tensor after loading (the model's constructor ties them)."""
    state = model.state_dict()
    for alias, canonical in tied.items():
        if alias in state and canonical in state and state[alias].data_ptr() != state[canonical].data_ptr():
            raise CheckpointError(f"{directory}: {alias} was saved tied to {canonical} but the rebuilt model does "
                                  "not tie them")  # fmt: skip
