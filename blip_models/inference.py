"""Load any BLIP checkpoint as the task model a job needs, and run batched inference with it.

Checkpoint sources, detected from the path: our `save_pretrained` directory, a transformers `Salesforce/blip-*`
directory (or hub name), an official salesforce/BLIP `.pth` (path, URL, or a name: BLIP's `model_base_capfilt_large`,
LAVIS's `blip_caption/base_coco`; `load_model_and_preprocess` is LAVIS's call). The requested kind decides the model
class; a checkpoint of another kind is accepted when it holds every tensor that kind needs (a pretrain or
retrieval file serves ITM, a pretrain file serves captioning), otherwise the error names both kinds.

Task helpers follow the reference inference settings: captions with beam 3, max 20, min 5, prompt 'a picture of '
(spec §4.2); ITM match probability = softmax of the `[ENC]`-first ITM logits plus the ITC cosine (spec §9.2-9.3);
VQA answers generated with beam 3, max 10, min 1 (spec §4.3); zero-shot classification ranks label prompts
('a picture of {label}') by ITC cosine, optionally re-ranking a shortlist by ITM; `search` is the reverse, images of
a gallery ranked for a text query; `gradcam` is LAVIS's ITM GradCAM (which image patches each word of a matched text
rests on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip_models.checkpoints import (
    CheckpointError,
    LoadReport,
    accept_fresh,
    build_model,
    checkpoint_not_found,
    checkpoint_url,
    config_from_dict,
    from_pretrained,
    is_pretrained_dir,
    load_into,
    load_official,
    model_kind,
    named_checkpoints,
    read_pretrained_config,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from blip_models.lavis_compat import LavisModel


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str
    source_format: str  # "pretrained" | "huggingface" | "official"
    report: LoadReport | None
    tokenizer_source: str | None  # what load_tokenizer should read (None = the offline BERT vocab)


def detect_format(path: str | Path) -> str:
    """'pretrained' (our directory), 'huggingface' (transformers directory or hub name) or 'official' (.pth path,
    URL or checkpoint name: BLIP's `model_base`, LAVIS's `blip_caption/base_coco`)."""
    from blip_models.hf_convert import is_hf_dir, is_hub_name

    text = str(path)
    if text.startswith(("http://", "https://")):
        return "official"
    local = Path(path)
    if local.is_dir():
        if is_pretrained_dir(local):
            return "pretrained"
        if is_hf_dir(local):
            return "huggingface"
        raise CheckpointError(f"{path}: a directory, but neither a save_pretrained model (config.json + "
                              "model.safetensors) nor a transformers BLIP directory")  # fmt: skip
    if local.is_file() or checkpoint_url(text):
        return "official"
    if is_hub_name(text):
        return "huggingface"
    raise FileNotFoundError(checkpoint_not_found(path))


def load_for(path: str | Path, kind: str | None, image_size: int | None = None,
             map_location: str = "cpu") -> LoadedModel:  # fmt: skip
    """The `kind` model with the weights at `path` (any supported format); CheckpointError when they do not fit.
    `kind` None: the checkpoint's own kind (a LAVIS name's: `blip_feature_extractor/base` is a features model)."""
    source_format = detect_format(path)
    if kind is None and (named := named_checkpoints().get(str(path))):
        kind = named[1]
    if source_format == "official":
        model, report = load_official(path, kind=kind, image_size=image_size, map_location=map_location)
        return LoadedModel(model, kind or model_kind(model), source_format, report, None)
    if source_format == "huggingface":
        from blip_models.hf_convert import load_hf

        model, report = load_hf(path, kind=kind)
        local = Path(path)
        tokenizer = str(local) if local.is_dir() and (local / "vocab.txt").is_file() else None
        return LoadedModel(model, kind or model_kind(model), source_format, report, tokenizer)
    data = read_pretrained_config(path)
    tokenizer = (data.get("tokenizer") or {}).get("source")
    kind = kind or data["kind"]
    if data["kind"] == kind and image_size is None:
        return LoadedModel(from_pretrained(path, map_location), kind, source_format, None, tokenizer)
    model, report = _convert_pretrained(path, data, kind, image_size, map_location)
    return LoadedModel(model, kind, source_format, report, tokenizer)


def load_model_and_preprocess(name: str, model_type: str, is_eval: bool = False,
                              device: str = "cpu") -> tuple[LavisModel, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """LAVIS's call (`lavis.models.load_model_and_preprocess`) for its BLIP models: `name` and `model_type` from
    its model zoo (`blip_caption`, `base_coco`; `checkpoints.LAVIS_MODELS`), the weights it loads downloaded once
    into the checkpoint cache. Returns the model (in eval mode when `is_eval`, as LAVIS), and LAVIS's "train" and
    "eval" image and text processors: BLIP's transforms at the model's image size; captions cleaned by
    `pre_caption` (the captioner's training texts prefixed with its prompt), VQA questions by `pre_question`.
    The model takes LAVIS's calls (`generate`, `extract_features`, `model(samples, match_head=...)`,
    `predict_answers`: `lavis_compat.LavisModel`); ours is its `.model`."""
    from blip_models.checkpoints import LAVIS_MODELS
    from blip_models.lavis_compat import LavisModel
    from blip_models.processing import eval_transform, pre_caption, pre_question, train_transform
    from blip_models.tokenizer import load_tokenizer

    zoo_name = f"{name}/{model_type}"
    if zoo_name not in LAVIS_MODELS:
        known = sorted({key.split("/")[0] for key in LAVIS_MODELS})
        types = sorted(key.split("/")[1] for key in LAVIS_MODELS if key.startswith(f"{name}/"))
        detail = f"its model types: {', '.join(types)}" if types else f"the BLIP models: {', '.join(known)}"
        raise CheckpointError(f"LAVIS has no BLIP model {name!r} of type {model_type!r} ({detail})")
    loaded = load_for(zoo_name, LAVIS_MODELS[zoo_name][1], map_location=device)
    model = LavisModel(loaded.model, loaded.kind, load_tokenizer(loaded.tokenizer_source)).to(device)
    model.train(not is_eval)
    image_size = int(model.config.vision.image_size)
    vis_processors = {"train": train_transform(image_size), "eval": eval_transform(image_size)}
    if loaded.kind == "vqa":
        txt_processors = {"train": pre_question, "eval": pre_question}
    else:
        prompt = "a picture of " if loaded.kind == "caption" else ""
        txt_processors = {"train": lambda text: prompt + pre_caption(text), "eval": pre_caption}
    return model, vis_processors, txt_processors


def load_model(name: str, model_type: str, is_eval: bool = False, device: str = "cpu") -> LavisModel:
    """LAVIS's `lavis.models.load_model`: `load_model_and_preprocess` without the processors."""
    return load_model_and_preprocess(name, model_type, is_eval=is_eval, device=device)[0]


def _convert_pretrained(path: str | Path, data: dict[str, Any], kind: str, image_size: int | None,
                        map_location: str) -> tuple[nn.Module, LoadReport]:  # fmt: skip
    from safetensors.torch import load_file

    config = config_from_dict(data["config"])
    if image_size is not None:
        config = config.replace(vision={"image_size": image_size})
    tensors = load_file(str(Path(path) / "model.safetensors"), device=map_location)
    for alias, canonical in data.get("tied", {}).items():
        tensors.setdefault(alias, tensors[canonical])
    model = build_model(kind, config)
    report = accept_fresh(model, load_into(model, tensors, source=str(path), kind=kind), data["kind"])
    if report.missing:
        raise CheckpointError(f"{path}: a '{data['kind']}' model lacks {len(report.missing)} tensor(s) that the '{kind}' model "
                              f"needs, e.g. {', '.join(report.missing[:3])}")  # fmt: skip
    return model.eval(), report


# ----------------------------------------------------------------------------------------------------- tasks


def image_size_of(model: nn.Module) -> int:
    return int(model.config.vision.image_size)


def load_images(paths: list[Path], image_size: int) -> torch.Tensor:
    """(B, 3, S, S) eval-transformed pixels; ValueError naming the file that cannot be read as an image."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from blip_models.processing import eval_transform

    transform = eval_transform(image_size)
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}") from error
    return torch.stack(tensors)


@dataclass(frozen=True)
class CaptionSettings:
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    prompt: str | None = None  # None = the model's prompt ('a picture of ')
    do_sample: bool = False
    top_p: float = 0.9
    top_k: int = 50  # with do_sample: the nucleus is taken among the 50 best tokens, as BLIP's sampling did
    repetition_penalty: float | None = None
    num_captions: int = 1  # per image (LAVIS's num_captions): the best beams, or independent samples


def caption(model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, settings: CaptionSettings,
            generator: torch.Generator | None = None) -> list[str]:  # fmt: skip
    """`num_captions` captions per image, grouped per image; sampling draws from `generator` (a seeded one repeats
    its captions; None: torch's global generator)."""
    return model.generate(pixel_values, tokenizer, prompt=settings.prompt, num_beams=settings.num_beams,
                          max_length=settings.max_length, min_length=settings.min_length,
                          do_sample=settings.do_sample, top_p=settings.top_p, top_k=settings.top_k,
                          repetition_penalty=settings.repetition_penalty,
                          num_return_sequences=settings.num_captions, generator=generator)  # fmt: skip


def itm(model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, texts: list[str]) -> list[dict[str, float]]:
    """Score image i against every text: ITM match probability, raw ITM logit and ITC cosine."""
    import torch
    import torch.nn.functional as F

    input_ids, attention_mask = _tokenized(tokenizer, texts, pixel_values.device)
    image_embeds = model.visual_encoder(pixel_values)  # (B, 1+N, Dv)
    batch, num_texts = pixel_values.shape[0], len(texts)
    image_rows = image_embeds.repeat_interleave(num_texts, dim=0)  # (B*T, 1+N, Dv)
    ids, mask = input_ids.repeat(batch, 1), attention_mask.repeat(batch, 1)  # (B*T, L)
    logits = model.itm_logits(image_rows, ids, mask).float()  # (B*T, 2)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)  # (B, E)
    text_out = model.text_encoder(input_ids, attention_mask, mode="text")
    text_feat = F.normalize(model.text_proj(text_out.last_hidden_state[:, 0, :]), dim=-1)  # (T, E)
    cosine = (image_feat @ text_feat.T).float().reshape(-1)  # (B*T,)
    probability = torch.softmax(logits, dim=-1)[:, 1]
    return [{"itm_probability": float(p), "itm_logit": float(logit[1]), "itc_cosine": float(c)}
            for p, logit, c in zip(probability, logits, cosine)]  # fmt: skip


@dataclass
class GradCAM:
    """Where the ITM head looked, for one (image, text) pair: maps over the image's patch grid (g, g)."""

    itm_probability: float
    tokens: list[str]  # the text's word pieces, without [CLS] / [SEP]
    average: torch.Tensor  # (g, g): the tokens' maps averaged
    per_token: torch.Tensor  # (len(tokens), g, g)


def gradcam(model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, texts: list[str],
            block: int | None = None) -> list[GradCAM]:  # fmt: skip
    """LAVIS's image-text matching GradCAM (`compute_gradcam`), image i with every text (image-major, as `itm`):
    per pair the map of each token between [CLS] and [SEP] and their average (`pair_gradcams`)."""
    input_ids, attention_mask = _tokenized(tokenizer, texts, pixel_values.device)
    batch, num_texts = pixel_values.shape[0], len(texts)
    ids, mask = input_ids.repeat(batch, 1), attention_mask.repeat(batch, 1)  # (B*T, L)
    cams, logits = pair_gradcams(model, pixel_values.repeat_interleave(num_texts, dim=0), ids, mask, block)
    probability = logits.softmax(dim=-1)[:, 1]
    results = []
    for row in range(batch * num_texts):
        count = int(mask[row].sum()) - 2  # the tokens between [CLS] and [SEP]
        per_token = cams[row, 1 : count + 1]
        tokens = tokenizer.convert_ids_to_tokens(ids[row, 1 : count + 1].tolist())
        results.append(GradCAM(float(probability[row]), list(tokens), per_token.sum(0) / max(count, 1), per_token))
    return results


def pair_gradcams(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """GradCAM of the aligned pairs (image i, text i): the cross-attention probabilities of text layer `block`
    (default: LAVIS's 6 of BLIP's 12, the last but one of a shallower encoder: in the last layer only [ENC] feeds
    the ITM head, so the words' maps there are zero) over the image patches, weighted by the positive part of their
    gradient with respect to the ITM match logit and averaged over the heads. Returns the maps of every text
    position (R, L, g, g), padding zeroed, on the CPU, and the ITM logits (R, 2). Runs with gradients (not under
    inference_mode); the model's own parameters get none."""
    import torch

    layers = model.text_encoder.encoder.layer
    block = max(0, min(6, len(layers) - 2)) if block is None else block
    if not 0 <= block < len(layers):
        raise ValueError(f"gradcam: block {block} is not a layer of the text encoder (0 to {len(layers) - 1})")
    attention = layers[block].crossattention.self
    # The pixels ask for a gradient so the attention has one to give even when the parameters are frozen.
    pixels = pixel_values.detach().clone().requires_grad_(True)
    attention.keep_attention = True
    try:
        with torch.enable_grad():
            logits = model.itm_logits(model.visual_encoder(pixels), input_ids, attention_mask).float()  # (R, 2)
            probs = attention.attention_probs  # (R, h, L, 1+N)
            (grads,) = torch.autograd.grad(logits[:, 1].sum(), probs)
    finally:
        attention.keep_attention, attention.attention_probs = False, None
    grid = int(model.config.vision.image_size) // int(model.config.vision.patch_size)
    # Image [CLS] left out: the maps are over the patches.
    cams = (probs[..., 1:].detach() * grads[..., 1:].clamp(min=0)).mean(dim=1).float()  # (R, L, N)
    cams = cams * attention_mask[:, :, None].to(cams.dtype)
    return cams.reshape(cams.shape[0], cams.shape[1], grid, grid).cpu(), logits.detach()


def gradcam_overlay(image: Any, cam: torch.Tensor, size: int) -> Any:
    """The image (PIL) resized to the model's `size`, the map upsampled over it in a jet colour scale (blue low,
    red high), half and half, as LAVIS's notebook shows it."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    heat = F.interpolate(cam[None, None].float(), size=(size, size), mode="bicubic", align_corners=False)[0, 0]
    heat = heat - heat.min()
    heat = (heat / heat.max() if float(heat.max()) > 0 else heat).clamp(0, 1).numpy()
    # jet: each channel a tent over [0, 1], peaking at 3/4 (red), 1/2 (green) and 1/4 (blue)
    jet = np.stack([np.clip(1.5 - np.abs(4 * heat - peak), 0, 1) for peak in (3, 2, 1)], axis=-1)
    blended = 0.5 * base + 0.5 * jet
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def gradcam_panels(image: Any, result: GradCAM, size: int, columns: int = 6) -> Any:
    """One picture for a pair: the averaged map, then one per token, each labelled (LAVIS's per-word grid)."""
    from PIL import Image, ImageDraw

    panels = [("average", result.average)] + list(zip(result.tokens, result.per_token))
    label_height = 14
    rows = -(-len(panels) // columns)
    width = min(columns, len(panels))
    sheet = Image.new("RGB", (width * size, rows * (size + label_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, cam) in enumerate(panels):
        left, top = (index % columns) * size, (index // columns) * (size + label_height)
        sheet.paste(gradcam_overlay(image, cam, size), (left, top + label_height))
        draw.text((left + 2, top + 1), label, fill="black")
    return sheet


def _tokenized(tokenizer: Any, texts: list[str], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM / ITC texts as the reference scores them: `pre_caption` (50 words), at most 35 tokens, padded to the
    longest, on `device`."""
    from blip_models.processing import pre_caption
    from blip_models.tokenizer import tokenize

    input_ids, attention_mask = tokenize(tokenizer, [pre_caption(text, 50) for text in texts], 35, padding="longest")
    return input_ids.to(device), attention_mask.to(device)


def vqa(model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, questions: list[str],
        answer_list: list[str] | None = None, num_beams: int = 3, max_length: int = 10, min_length: int = 1,
        k_test: int = 128) -> list[str]:  # fmt: skip
    """Answer question j for image i (B * Q answers, image-major): rank `answer_list` when given (the reference
    default, k_test candidates re-scored), else beam-search generation (spec §4.3)."""
    from blip_models.processing import pre_question

    batch, num_questions = pixel_values.shape[0], len(questions)
    pixels = pixel_values.repeat_interleave(num_questions, dim=0)  # (B*Q, 3, S, S)
    question_ids, question_mask = model.prepare_question(tokenizer, [pre_question(q) for q in questions] * batch)
    question_ids, question_mask = question_ids.to(pixels.device), question_mask.to(pixels.device)
    mode = "rank" if answer_list else "generate"
    return model.answer(pixels, question_ids, question_mask, tokenizer, mode=mode, answer_list=answer_list,
                        k_test=k_test, num_beams=num_beams, max_length=max_length, min_length=min_length)  # fmt: skip


def features(model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, text: str | None) -> dict[str, torch.Tensor]:
    """Per image: the normalised projected image feature (E,), and with `text` the normalised text feature and the
    multimodal `[ENC]` state (H,) of (image, text)."""
    from blip_models.processing import pre_caption

    batch = pixel_values.shape[0]
    if text is None:
        output = model(pixel_values=pixel_values, mode="image")
        return {"image_feature": output.image_embeds_proj}
    input_ids, attention_mask = model.prepare_text(tokenizer, [pre_caption(text, 50)] * batch)
    input_ids, attention_mask = input_ids.to(pixel_values.device), attention_mask.to(pixel_values.device)
    output = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, mode="multimodal")
    text_output = model(input_ids=input_ids[:1], attention_mask=attention_mask[:1], mode="text")
    return {"image_feature": output.image_embeds_proj,
            "text_feature": text_output.text_embeds_proj.expand(batch, -1),
            "multimodal_feature": output.multimodal_embeds[:, 0, :]}  # fmt: skip


def label_features(model: nn.Module, tokenizer: Any, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """(L, E) normalised projected `[CLS]` features of the label prompts: computed once for every image."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    features = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = _tokenized(tokenizer, prompts[start : start + batch_size], device)
        output = model.text_encoder(input_ids, attention_mask, mode="text")
        features.append(F.normalize(model.text_proj(output.last_hidden_state[:, 0, :]).float(), dim=-1))
    return torch.cat(features)


def classify(model: nn.Module, tokenizer: Any, pixel_values: torch.Tensor, prompts: list[str],
             prompt_features: torch.Tensor, temperature: float, top_k: int,
             rerank: int = 0) -> list[list[dict[str, float | int]]]:  # fmt: skip
    """Zero-shot classification (as LAVIS's BLIP feature-extractor recipe): per image, the `top_k` labels by ITC
    cosine with their prompt (`prompt_features` from `label_features`), each with its softmax probability over all
    labels at `temperature`. With `rerank` > 0 the `rerank` best by ITC are scored by the ITM head and come first,
    by ITM match probability (BLIP's retrieval recipe: an ITC shortlist re-ranked by ITM); needs an ITM model."""
    import torch
    import torch.nn.functional as F

    top_k, rerank = min(top_k, len(prompts)), min(rerank, len(prompts))
    image_embeds = model.visual_encoder(pixel_values)  # (B, 1+N, Dv)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)  # (B, E)
    cosine = image_feat @ prompt_features.T  # (B, L)
    probability = torch.softmax(cosine / temperature, dim=-1)
    shortlist = cosine.topk(max(top_k, rerank), dim=-1).indices  # (B, K) best first
    itm: dict[tuple[int, int], float] = {}
    if rerank:
        chosen = shortlist[:, :rerank]  # (B, R)
        input_ids, attention_mask = _tokenized(tokenizer, [prompts[label] for label in chosen.reshape(-1).tolist()],
                                               pixel_values.device)  # fmt: skip
        logits = model.itm_logits(image_embeds.repeat_interleave(rerank, dim=0), input_ids,
                                  attention_mask).float()  # (B*R, 2)  # fmt: skip
        match = torch.softmax(logits, dim=-1)[:, 1].reshape(chosen.shape)
        itm = {(row, label): float(match[row, column]) for row in range(chosen.shape[0])
               for column, label in enumerate(chosen[row].tolist())}  # fmt: skip
    results = []
    for row, labels in enumerate(shortlist.tolist()):
        if rerank:  # the re-ranked ones first, by ITM; the rest of the top-k after them, by ITC
            labels = sorted(labels[:rerank], key=lambda label: -itm[(row, label)]) + labels[rerank:]
        entries = []
        for label in labels[:top_k]:
            entry: dict[str, float | int] = {"label": label, "probability": float(probability[row, label]),
                                             "itc_cosine": float(cosine[row, label])}  # fmt: skip
            if (row, label) in itm:
                entry["itm_probability"] = itm[(row, label)]
            entries.append(entry)
        results.append(entries)
    return results


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, E) normalised projected image `[CLS]` features (ITC), float32."""
    import torch.nn.functional as F

    return F.normalize(model.vision_proj(model.visual_encoder(pixel_values)[:, 0, :]).float(), dim=-1)


def search(model: nn.Module, tokenizer: Any, queries: list[str], gallery: torch.Tensor, top_k: int,
           rerank: int = 0, load_pixels: Any = None) -> list[list[dict[str, float | int]]]:  # fmt: skip
    """Text-to-image search over a gallery of image features (`image_features`, (N, E)), as LAVIS's multimodal
    search: per query, the `top_k` images by ITC cosine; with `rerank` > 0 the `rerank` best are scored by the ITM
    head (their pixels from `load_pixels(indices)`) and come first, by match probability (BLIP's retrieval recipe).
    Entries: {"image": index into the gallery, "itc_cosine", ["itm_probability"]}, best first."""
    import torch

    top_k, rerank = min(top_k, len(gallery)), min(rerank, len(gallery))
    query_features = label_features(model, tokenizer, queries)  # (Q, E)
    cosine = query_features @ gallery.to(query_features.device).T  # (Q, N)
    shortlist = cosine.topk(max(top_k, rerank), dim=-1).indices.tolist()  # best first
    results = []
    for row, images in enumerate(shortlist):
        itm: dict[int, float] = {}
        if rerank:
            chosen = images[:rerank]
            image_embeds = model.visual_encoder(load_pixels(chosen))  # (R, 1+N, Dv)
            input_ids, attention_mask = _tokenized(tokenizer, [queries[row]] * len(chosen), image_embeds.device)
            logits = model.itm_logits(image_embeds, input_ids, attention_mask).float()  # (R, 2)
            itm = dict(zip(chosen, torch.softmax(logits, dim=-1)[:, 1].tolist()))
            images = sorted(chosen, key=lambda image: -itm[image]) + images[rerank:]
        entries: list[dict[str, float | int]] = []
        for image in images[:top_k]:
            entry: dict[str, float | int] = {"image": image, "itc_cosine": float(cosine[row, image])}
            if image in itm:
                entry["itm_probability"] = itm[image]
            entries.append(entry)
        results.append(entries)
    return results


def report_json(loaded: LoadedModel) -> str:
    return json.dumps(loaded.report.to_dict() if loaded.report else {"source_format": loaded.source_format})
