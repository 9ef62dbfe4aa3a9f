"""The salesforce/BLIP repository's configs (`configs/*.yaml`: pretrain, retrieval_coco, retrieval_flickr,
caption_coco, nocaps, vqa, nlvr, retrieval_msrvtt) read as ours, so a lab that has run BLIP passes its files as
they are: `blip finetune retrieval BLIP/configs/retrieval_coco.yaml --dataset coco`, `blip eval retrieval
BLIP/configs/retrieval_coco.yaml --dataset coco` (BLIP's `--evaluate`), `blip train BLIP/configs/pretrain.yaml`.

A BLIP file is flat (`init_lr`, `batch_size_train`, `max_epoch`, `vit`, paths to images and annotations); ours is
typed and sectioned. The translation starts from our preset of the same recipe (its scaling, loader and
checkpoint settings, which BLIP's files leave to `torchrun`) and puts BLIP's values over it. Every key is
accounted for in the notes: read as which of ours, or not used and why (image and annotation paths: the data come
from a dataset version; `vit`: the architecture comes from the initial weights). BLIP's `pretrained:` is returned
as the checkpoint to start from (finetuning's `--init`, evaluation's `--model`) when the command names none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import CONFIG_DIR, ConfigError

# Keys only BLIP's files have (ours are sectioned: data, optim, loop, scaling, ...).
BLIP_ONLY_KEYS = frozenset({"init_lr", "max_epoch", "batch_size_train", "batch_size_test", "vit", "vit_grad_ckpt",
                            "vit_ckpt_layer", "image_root", "ann_root", "pretrained", "train_file", "laion_path"})  # fmt: skip
DATA_PATH_KEYS = ("image_root", "ann_root", "coco_gt_root", "vqa_root", "vg_root", "video_root", "train_files",
                  "train_file", "laion_path", "dataset")  # fmt: skip
NOT_FROM_THE_DATA = "the data come from the dataset version, --dataset"


@dataclass
class Translated:
    config: dict[str, Any]  # ours, ready for load_config
    pretrained: str | None  # BLIP's `pretrained:`: the checkpoint the recipe starts from (or evaluates)
    notes: list[str] = field(default_factory=list)  # what each BLIP key became, or why it is not used

    def report(self, path: str | Path) -> str:
        return "\n".join([f"{path}: a salesforce/BLIP config, read as ours:"] + [f"  {note}" for note in self.notes])


def is_blip_repo_config(raw: Any) -> bool:
    return isinstance(raw, dict) and any(key in BLIP_ONLY_KEYS for key in raw)


def read_if_blip(path: str | Path | dict[str, Any], group: str, task: str | None) -> Translated | None:
    """The translation of the BLIP file at `path` for a `group` command ('train', 'finetune', 'evaluate') of
    `task`; None when `path` is one of ours (or a dict), which load_config reads as it is."""
    if isinstance(path, dict) or not Path(path).is_file():
        return None
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return None  # load_config says what is wrong with it
    if not is_blip_repo_config(raw):
        return None
    translate = {"train": _pretrain, "finetune": _finetune, "evaluate": _evaluate}[group]
    return translate(dict(raw), task, str(path))


class _Reader:
    """BLIP's keys taken one by one into ours, each noted; what is left at the end is noted as not used."""

    def __init__(self, raw: dict[str, Any], base: dict[str, Any], origin: str) -> None:
        self.raw, self.config, self.origin, self.notes = raw, base, origin, []

    def take(self, blip_key: str, ours: str, convert: Any = None) -> None:
        if blip_key not in self.raw:
            return
        value = self.raw.pop(blip_key)
        value = convert(value) if convert else value
        section, _, name = ours.rpartition(".")
        target = self.config
        for part in section.split(".") if section else ():
            target = target.setdefault(part, {})
        target[name] = value
        self.notes.append(f"{blip_key}: {value!r} -> {ours}")

    def unused(self, keys: tuple[str, ...] | list[str], why: str) -> None:
        present = [key for key in keys if key in self.raw]
        for key in present:
            self.raw.pop(key)
        if present:
            self.notes.append(f"{', '.join(present)}: not used ({why})")

    def grad_checkpointing(self, section: str) -> None:
        if "vit_grad_ckpt" not in self.raw:
            return
        enabled, layers = bool(self.raw.pop("vit_grad_ckpt")), self.raw.pop("vit_ckpt_layer", None)
        self.config.setdefault(section, {})["grad_checkpointing"] = enabled
        detail = f" (every ViT block; BLIP's vit_ckpt_layer {layers} checkpoints the last {layers})" if enabled else ""
        self.notes.append(f"vit_grad_ckpt: {enabled!r} -> {section}.grad_checkpointing{detail}")

    def finish(self, pretrained: str | None) -> Translated:
        if self.raw:
            unknown = ", ".join(sorted(map(str, self.raw)))
            raise ConfigError(f"{self.origin}: a salesforce/BLIP config with keys this project does not know: {unknown} "
                              "(BLIP's configs/*.yaml are read; write the config in our form: configs/)")  # fmt: skip
        return Translated(self.config, pretrained, self.notes)


def _preset(group: str, name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text())


def _pretrained(reader: _Reader, what: str) -> str | None:
    pretrained = reader.raw.pop("pretrained", None) or None
    if pretrained:
        reader.notes.append(f"pretrained: {pretrained} -> {what} (when the command names none)")
    return pretrained


def _vit(reader: _Reader) -> None:
    reader.unused(["vit"], "the architecture, ViT-B or ViT-L, is the initial weights'")


def _pretrain(raw: dict[str, Any], task: str | None, origin: str) -> Translated:
    if raw.get("vit", "base") not in ("base", "large"):
        raise ConfigError(f"{origin}: vit: {raw['vit']!r} is not a BLIP ViT (base or large)")
    reader = _Reader(raw, _preset("train", "pretrain_base"), origin)
    reader.take("vit", "model")
    size = raw.get("image_size")
    if size is not None:
        raw.pop("image_size")
        reader.config.setdefault("model_overrides", {}).setdefault("vision", {})["image_size"] = size
        reader.notes.append(f"image_size: {size!r} -> model_overrides.vision.image_size")
    for key in ("queue_size", "alpha"):
        if key in raw:
            value = raw.pop(key)
            reader.config.setdefault("model_overrides", {})[key] = value
            reader.notes.append(f"{key}: {value!r} -> model_overrides.{key}")
    reader.take("batch_size", "data.batch_size")
    for blip_key, ours in (("init_lr", "optim.lr"), ("min_lr", "optim.min_lr"), ("warmup_lr", "optim.warmup_lr"),
                           ("warmup_steps", "optim.warmup_steps"), ("lr_decay_rate", "optim.lr_decay_rate"),
                           ("weight_decay", "optim.weight_decay"), ("max_epoch", "loop.epochs")):  # fmt: skip
        reader.take(blip_key, ours, float if ours.startswith("optim.") and "steps" not in ours else None)
    reader.grad_checkpointing("loop")
    reader.unused(DATA_PATH_KEYS, NOT_FROM_THE_DATA + "; several --dataset train together, as BLIP's train_file "
                  "list with laion_path")  # fmt: skip
    return reader.finish(_pretrained(reader, "--init"))


# Our preset for each BLIP finetuning recipe: the task's, the Flickr one when BLIP's `dataset` says so.
FINETUNE_PRESETS = {"retrieval": "retrieval_coco", "caption": "caption_coco", "vqa": "vqa", "nlvr": "nlvr"}


def _finetune(raw: dict[str, Any], task: str | None, origin: str) -> Translated:
    task = task or "retrieval"
    preset = "retrieval_flickr" if task == "retrieval" and raw.get("dataset") == "flickr" else FINETUNE_PRESETS[task]
    reader = _Reader(raw, {**_preset("finetune", preset), "task": task}, origin)
    reader.notes.append(f"(starting from our preset configs/finetune/{preset}.yaml: scaling, loader, checkpoints)")
    reader.take("image_size", "image_size")
    reader.take("batch_size_train" if "batch_size_train" in raw else "batch_size", "data.batch_size")
    reader.take("negative_all_rank", "data.negative_all_rank")
    reader.take("init_lr", "optim.lr", float)
    reader.take("min_lr", "optim.min_lr", float)
    reader.take("weight_decay", "optim.weight_decay", float)
    reader.take("max_epoch", "loop.epochs")
    reader.grad_checkpointing("loop")
    _vit(reader)
    reader.unused(["queue_size", "alpha"], "the model's own, from the initial weights' config; BLIP's are 57600 and 0.4")
    reader.unused(["batch_size_test", "k_test", "max_length", "min_length", "num_beams", "prompt", "inference",
                   "num_frm_test"], "evaluation settings: `blip eval` reads them from this file")  # fmt: skip
    reader.unused(DATA_PATH_KEYS, NOT_FROM_THE_DATA)
    return reader.finish(_pretrained(reader, "--init"))


def _evaluate(raw: dict[str, Any], task: str | None, origin: str) -> Translated:
    task = task or "retrieval"
    nocaps = "nocaps" in str(raw.get("image_root", ""))
    preset = {"retrieval": "retrieval_flickr" if raw.get("dataset") == "flickr" else "retrieval_coco",
              "caption": "caption_nocaps" if nocaps else "caption_coco"}.get(task)  # fmt: skip
    reader = _Reader(raw, {**(_preset("evaluate", preset) if preset else {}), "task": task}, origin)
    if preset:
        reader.notes.append(f"(starting from our preset configs/evaluate/{preset}.yaml)")
    if task == "vqa":
        reader.take("batch_size_test", "vqa_batch_size")
        reader.take("k_test", "vqa_k_test")
        reader.take("inference", "vqa_inference")
    elif task == "caption":
        reader.take("batch_size", "caption_batch_size")
        for key in ("num_beams", "max_length", "min_length"):
            reader.take(key, key)
        prompt = raw.pop("prompt", None)
        if prompt is not None:
            reader.notes.append(f"prompt: {prompt!r}: not used (the captioner's own prompt, 'a picture of ' for "
                                "BLIP's models)")  # fmt: skip
    else:
        reader.take("batch_size_test" if "batch_size_test" in raw else "batch_size", "image_batch_size")
        reader.take("k_test", "k_test")
        reader.take("num_frm_test", "num_frames")
    reader.unused(["image_size"], "the model's own image size")
    _vit(reader)
    reader.unused(["queue_size", "alpha", "negative_all_rank", "init_lr", "min_lr", "weight_decay", "max_epoch",
                   "vit_grad_ckpt", "vit_ckpt_layer", "batch_size_train", "batch_size"],
                  "training settings: `blip finetune` reads them from this file")  # fmt: skip
    reader.unused(DATA_PATH_KEYS, NOT_FROM_THE_DATA)
    return reader.finish(_pretrained(reader, "--model"))

