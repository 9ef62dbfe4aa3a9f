"""The salesforce/BLIP repository's configs (`configs/*.yaml`: pretrain, retrieval_coco, retrieval_flickr,
caption_coco, nocaps, vqa, nlvr, retrieval_msrvtt) and LAVIS's BLIP project configs (`lavis/projects/blip/train/*`,
`eval/*`: model / datasets / run) read as ours, so a lab that has run BLIP or LAVIS passes its files as they are:
`blip finetune retrieval BLIP/configs/retrieval_coco.yaml --dataset coco`, `blip eval retrieval
BLIP/configs/retrieval_coco.yaml --dataset coco` (BLIP's `--evaluate`), `blip train BLIP/configs/pretrain.yaml`,
`blip finetune vqa LAVIS/lavis/projects/blip/train/vqav2_ft.yaml --dataset vqa`.

A BLIP file is flat (`init_lr`, `batch_size_train`, `max_epoch`, `vit`, paths to images and annotations), a LAVIS
one has the same run settings under `run:`, the model as LAVIS's `arch` / `model_type` and its dataset builders;
ours is typed and sectioned. The translation starts from our preset of the same recipe (its scaling, loader and
checkpoint settings, which BLIP's files leave to `torchrun`) and puts BLIP's values over it. Every key is
accounted for in the notes: read as which of ours, or not used and why (image and annotation paths: the data come
from a dataset version; `vit`: the architecture comes from the initial weights). BLIP's `pretrained:` (LAVIS: the
checkpoint its `model:` loads) is returned as the checkpoint to start from (finetuning's `--init`, evaluation's
`--model`) when the command names none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import CONFIG_DIR, ConfigError

# Keys only BLIP's files have (ours are sectioned: data, optim, loop, scaling, ...).
BLIP_ONLY_KEYS = frozenset({"init_lr", "max_epoch", "batch_size_train", "batch_size_test", "vit", "vit_grad_ckpt",
                            "vit_ckpt_layer", "image_root", "ann_root", "pretrained", "train_file",
                            "laion_path"})  # fmt: skip
DATA_PATH_KEYS = ("image_root", "ann_root", "coco_gt_root", "vqa_root", "vg_root", "video_root", "train_files",
                  "train_file", "laion_path", "dataset")  # fmt: skip
NOT_FROM_THE_DATA = "the data come from the dataset version, --dataset"


@dataclass
class Translated:
    config: dict[str, Any]  # ours, ready for load_config
    pretrained: str | None  # BLIP's `pretrained:`: the checkpoint the recipe starts from (or evaluates)
    notes: list[str] = field(default_factory=list)  # what each BLIP key became, or why it is not used
    source: str = "salesforce/BLIP"  # or "LAVIS"

    def report(self, path: str | Path) -> str:
        return "\n".join([f"{path}: a {self.source} config, read as ours:"] + [f"  {note}" for note in self.notes])


def is_blip_repo_config(raw: Any) -> bool:
    return isinstance(raw, dict) and any(key in BLIP_ONLY_KEYS for key in raw)


def is_lavis_project_config(raw: Any) -> bool:
    model = raw.get("model") if isinstance(raw, dict) else None
    return (isinstance(model, dict) and str(model.get("arch", "")).startswith("blip_")
            and isinstance(raw.get("run"), dict))


def load_recipe_config(cls: type, source: str | Path | dict[str, Any], group: str, task: str | None,
                       overrides: list[str] | tuple[str, ...] = ()) -> tuple[Any, str | None]:  # fmt: skip
    """A command's config from `source`, ours or BLIP's / LAVIS's (translated, the translation said on stderr),
    and the checkpoint such a file names (None for ours)."""
    import sys

    from pipelines.config import load_config

    translated = read_if_blip(source, group, task)
    if translated is None:
        return load_config(cls, source, overrides), None
    print(translated.report(source), file=sys.stderr)
    return load_config(cls, translated.config, overrides, origin=str(source)), translated.pretrained


def read_if_blip(path: str | Path | dict[str, Any], group: str, task: str | None) -> Translated | None:
    """The translation of the BLIP file at `path` for a `group` command ('train', 'finetune', 'evaluate') of
    `task`; None when `path` is one of ours (or a dict), which load_config reads as it is."""
    if isinstance(path, dict) or not Path(path).is_file():
        return None
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return None  # load_config says what is wrong with it
    if is_lavis_project_config(raw):
        return _lavis(dict(raw), group, task, str(path))
    if not is_blip_repo_config(raw):
        return None
    pretraining = "train_file" in raw or "lr_decay_rate" in raw
    if pretraining != (group == "train"):
        command = "blip train FILE" if pretraining else "blip finetune TASK FILE / blip eval TASK FILE"
        raise ConfigError(f"{path}: a salesforce/BLIP {'pretraining' if pretraining else 'finetuning'} config: "
                          f"`{command}` reads it")  # fmt: skip
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
        try:
            value = convert(value) if convert else value
        except (TypeError, ValueError):
            raise ConfigError(f"{self.origin}: {blip_key}: {value!r} is not a number") from None
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

    def finish(self, pretrained: str | None, source: str = "salesforce/BLIP") -> Translated:
        if self.raw:
            unknown = ", ".join(sorted(map(str, self.raw)))
            raise ConfigError(f"{self.origin}: a {source} config with keys this project does not know: {unknown} "
                              "(write those settings in our form: configs/)")  # fmt: skip
        return Translated(self.config, pretrained, self.notes, source)


def _preset(group: str, name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / group / f"{name}.yaml").read_text())


def _pretrained(reader: _Reader, what: str) -> str | None:
    pretrained = reader.raw.pop("pretrained", None) or None
    if pretrained:
        reader.notes.append(f"pretrained: {pretrained} -> {what} (when the command names none)")
    return pretrained


def _vit(reader: _Reader) -> None:
    reader.unused(["vit"], "the architecture, ViT-B or ViT-L, is the initial weights'")


# The training settings BLIP's files and LAVIS's `run:` sections name alike: ours, and the conversion a value needs
# (YAML reads BLIP's `1e-5` as a string); whole numbers are left to the config's own type check.
TRAINING_KEYS: dict[str, tuple[str, Any]] = {
    "init_lr": ("optim.lr", float), "min_lr": ("optim.min_lr", float), "warmup_lr": ("optim.warmup_lr", float),
    "weight_decay": ("optim.weight_decay", float), "lr_decay_rate": ("optim.lr_decay_rate", float),
    "warmup_steps": ("optim.warmup_steps", None), "max_epoch": ("loop.epochs", None),
}  # fmt: skip


# Our preset for each finetuning recipe (retrieval: COCO's unless the file names Flickr30k).
FINETUNE_PRESETS = {"retrieval": "retrieval_coco", "caption": "caption_coco", "vqa": "vqa", "nlvr": "nlvr"}


def _recipe_preset(group: str, task: str | None, *, flickr: bool = False, nocaps: bool = False) -> str | None:
    """Our preset of a recipe: pretraining's, the task's (Flickr30k's retrieval, NoCaps' captioning when the file
    names those data); None for an evaluation with no preset (VQA, NLVR2, video: the task's defaults)."""
    if group == "train":
        return "pretrain_base"
    if task == "retrieval":
        return "retrieval_flickr" if flickr else "retrieval_coco"
    if group == "finetune":
        return FINETUNE_PRESETS[task or "retrieval"]
    if task == "caption":
        return "caption_nocaps" if nocaps else "caption_coco"
    return None


def _reader(raw: dict[str, Any], group: str, task: str | None, preset: str | None, origin: str) -> _Reader:
    """A reader over `raw` starting from our preset (a finetuning or evaluation one set to `task`), said in a note."""
    base = _preset(group, preset) if preset else {}
    if group != "train":
        base["task"] = task
    reader = _Reader(raw, base, origin)
    if preset:
        reader.notes.append(f"(starting from our preset configs/{group}/{preset}.yaml)")
    return reader


def _pretrain(raw: dict[str, Any], task: str | None, origin: str) -> Translated:
    if raw.get("vit", "base") not in ("base", "large"):
        raise ConfigError(f"{origin}: vit: {raw['vit']!r} is not a BLIP ViT (base or large)")
    reader = _reader(raw, "train", None, _recipe_preset("train", None), origin)
    reader.take("vit", "model")
    reader.take("image_size", "model_overrides.vision.image_size")
    reader.take("queue_size", "model_overrides.queue_size")
    reader.take("alpha", "model_overrides.alpha")
    reader.take("batch_size", "data.batch_size")
    for blip_key, (ours, convert) in TRAINING_KEYS.items():
        reader.take(blip_key, ours, convert)
    reader.grad_checkpointing("loop")
    reader.unused(DATA_PATH_KEYS, NOT_FROM_THE_DATA + "; several --dataset train together, as BLIP's train_file "
                  "list with laion_path")  # fmt: skip
    return reader.finish(_pretrained(reader, "--init"))


def _finetune(raw: dict[str, Any], task: str | None, origin: str) -> Translated:
    task = task or "retrieval"
    preset = _recipe_preset("finetune", task, flickr=raw.get("dataset") == "flickr")
    reader = _reader(raw, "finetune", task, preset, origin)
    reader.take("image_size", "image_size")
    reader.take("batch_size_train" if "batch_size_train" in raw else "batch_size", "data.batch_size")
    reader.take("negative_all_rank", "data.negative_all_rank")
    for blip_key in ("init_lr", "min_lr", "weight_decay", "max_epoch"):  # a finetuning file's (no warm-up, no decay)
        reader.take(blip_key, *TRAINING_KEYS[blip_key])
    reader.grad_checkpointing("loop")
    _vit(reader)
    reader.unused(["queue_size", "alpha"],
                  "the model's own, from the initial weights' config; BLIP's are 57600 and 0.4")
    reader.unused(["batch_size_test", "k_test", "max_length", "min_length", "num_beams", "prompt", "inference",
                   "num_frm_test"], "evaluation settings: `blip eval` reads them from this file")  # fmt: skip
    reader.unused(DATA_PATH_KEYS, NOT_FROM_THE_DATA)
    return reader.finish(_pretrained(reader, "--init"))


def _evaluate(raw: dict[str, Any], task: str | None, origin: str) -> Translated:
    task = task or "retrieval"
    preset = _recipe_preset("evaluate", task, flickr=raw.get("dataset") == "flickr",
                            nocaps="nocaps" in str(raw.get("image_root", "")))  # fmt: skip
    reader = _reader(raw, "evaluate", task, preset, origin)
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



# ------------------------------------------------------------------------------------------------ LAVIS

LAVIS_TASKS = {"retrieval": "retrieval", "captioning": "caption", "vqa": "vqa", "aok_vqa": "vqa",
               "multimodal_classification": "nlvr", "image_text_pretrain": "pretrain"}  # fmt: skip
_BLIP = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
# What LAVIS's model configs (lavis/configs/models/blip_*.yaml) load with `load_finetuned: False`: the starting
# point of its finetuning recipes. With `load_finetuned: True` (their default) a model loads its finetuned
# weights, our checkpoint name `arch/model_type`.
LAVIS_PRETRAINED = {
    "blip_caption/base_coco": _BLIP + "model_base_capfilt_large.pth",
    "blip_caption/large_coco": _BLIP + "model_large.pth",
    "blip_nlvr/nlvr": _BLIP + "model_base_capfilt_large.pth",
    "blip_retrieval/coco": _BLIP + "model_base_capfilt_large.pth",
    "blip_retrieval/flickr": _BLIP + "model_base_capfilt_large.pth",
    "blip_vqa/vqav2": _BLIP + "model_base_capfilt_large.pth",
    "blip_vqa/okvqa": _BLIP + "model_base_vqa_capfilt_large.pth",
    "blip_vqa/aokvqa": _BLIP + "model_base_vqa_capfilt_large.pth",
}
LAVIS_NOT_USED = {
    ("run.device", "run.world_size", "run.dist_url", "run.distributed", "run.use_dist_eval_sampler"):
        "where it runs is the config's scaling section: Ray Train workers, GPUs",
    ("run.output_dir", "run.resume_ckpt_path", "run.evaluate", "run.report_metric"):
        "outputs are versions of the registry; a stopped run resumes with --resume; which command runs says "
        "train or evaluate",
    ("run.train_splits", "run.valid_splits"): "the dataset version's train split is trained on",
    ("model.load_finetuned", "model.load_pretrained", "model.arch", "model.model_type"):
        "they name the starting checkpoint, below",
}  # fmt: skip


def _lavis(raw: dict[str, Any], group: str, task: str | None, origin: str) -> Translated:
    model, datasets, run = raw.pop("model"), raw.pop("datasets", {}) or {}, raw.pop("run")
    lavis_task = run.get("task")
    ours = LAVIS_TASKS.get(str(lavis_task))
    wanted = "pretrain" if group == "train" else task
    if ours != wanted:
        raise ConfigError(f"{origin}: a LAVIS '{lavis_task}' config (model {model.get('arch')}), not one for "
                          f"{'pretraining' if wanted == 'pretrain' else repr(wanted)}")  # fmt: skip
    flat = {**{f"model.{key}": value for key, value in model.items()},
            **{f"run.{key}": value for key, value in run.items() if key != "task"},
            **{str(key): value for key, value in raw.items()}}  # fmt: skip
    builders = " ".join(datasets)
    preset = _recipe_preset(group, task, flickr="flickr" in builders, nocaps="nocaps" in builders)
    reader = _reader(flat, group, task, preset, origin)
    image_size = _lavis_image_size(model, datasets, "eval" if group == "evaluate" else "train")
    reader.notes.append(f"datasets: {', '.join(datasets) or '-'}: not used ({NOT_FROM_THE_DATA}; image size "
                        f"{image_size} read from their processors)")  # fmt: skip
    flat.pop("model.image_size", None)
    if group == "train":
        _lavis_pretrain(reader, image_size)
    elif group == "finetune":
        _lavis_finetune(reader, task, image_size)
    else:
        _lavis_evaluate(reader, task)
    for keys, why in LAVIS_NOT_USED.items():
        reader.unused(list(keys), why)
    if group == "evaluate":
        reader.unused(["run.seed"], "the evaluation draws nothing at random")
    else:
        reader.take("run.seed", "loop.seed")
    return reader.finish(None if group == "train" else _lavis_checkpoint(reader, model), "LAVIS")


def _lavis_image_size(model: dict[str, Any], datasets: dict[str, Any], split: str) -> int | None:
    for builder in datasets.values():
        processor = ((builder or {}).get("vis_processor") or {}).get(split) or {}
        if "image_size" in processor:
            return int(processor["image_size"])
    return model.get("image_size")


def _lavis_checkpoint(reader: _Reader, model: dict[str, Any]) -> str | None:
    name = f"{model.get('arch')}/{model.get('model_type')}"
    finetuned = model.get("load_finetuned", True)
    checkpoint = model.get("finetuned" if finetuned else "pretrained") or (
        name if finetuned else LAVIS_PRETRAINED.get(name))
    reader.raw.pop("model.finetuned", None), reader.raw.pop("model.pretrained", None)
    if checkpoint:
        which = "finetuned" if finetuned else "pretrained (load_finetuned: False)"
        reader.notes.append(f"model: {name}, its {which} weights: {checkpoint} -> --init / --model (when the command "
                            "names none)")  # fmt: skip
    return checkpoint


def _lavis_optim(reader: _Reader, pretrain: bool) -> None:
    schedule = reader.raw.pop("run.lr_sched", None)
    if schedule is not None:
        if schedule not in ("linear_warmup_cosine_lr", "linear_warmup_step_lr", "constant_lr"):
            raise ConfigError(f"{reader.origin}: run.lr_sched {schedule!r}: not one of LAVIS's schedules")
        if pretrain:
            reader.config["optim"]["schedule"] = "cosine" if schedule == "linear_warmup_cosine_lr" else "step"
        reader.notes.append(f"run.lr_sched: {schedule!r} -> " + ("optim.schedule" if pretrain else
                            "our finetuning schedule (cosine per epoch, the same)"))  # fmt: skip
    for key, (ours, convert) in TRAINING_KEYS.items():
        reader.take(f"run.{key}", ours, convert)
    reader.take("run.batch_size_train", "data.batch_size")
    reader.take("run.num_workers", "data.loader_workers")
    if "run.amp" in reader.raw:
        amp = bool(reader.raw.pop("run.amp"))
        reader.config.setdefault("loop", {})["precision"] = "bf16" if amp else "fp32"
        reader.notes.append(f"run.amp: {amp!r} -> loop.precision: {'bf16' if amp else 'fp32'}"
                            + (" (LAVIS's amp autocasts to fp16)" if amp else " (--set loop.precision=bf16: "
                               "autocast on GPU)"))  # fmt: skip


def _lavis_pretrain(reader: _Reader, image_size: int | None) -> None:
    model_type = reader.raw.get("model.model_type", "base")
    if model_type not in ("base", "large"):
        raise ConfigError(f"{reader.origin}: model.model_type {model_type!r} is not a BLIP ViT (base or large)")
    reader.config["model"] = model_type
    if image_size:
        reader.config.setdefault("model_overrides", {}).setdefault("vision", {})["image_size"] = image_size
    reader.take("model.queue_size", "model_overrides.queue_size")
    reader.take("model.alpha", "model_overrides.alpha")
    for key in ("model.arch", "model.model_type", "model.load_pretrained"):
        reader.raw.pop(key, None)
    reader.notes.append(f"model: blip_pretrain/{model_type} -> model: {model_type}, vision image size {image_size} "
                        "(initial weights: --init, else from scratch or init.vit_weights)")
    _lavis_optim(reader, pretrain=True)
    reader.unused(["run.batch_size_eval", "run.test_splits"], "pretraining evaluates nothing")


def _lavis_finetune(reader: _Reader, task: str, image_size: int | None) -> None:
    if image_size:
        reader.config["image_size"] = image_size
        reader.notes.append(f"image size {image_size} -> image_size")
    reader.take("model.negative_all_rank", "data.negative_all_rank")
    reader.unused(["model.queue_size", "model.alpha"], "the model's own, from the initial weights' config")
    _lavis_optim(reader, pretrain=False)
    reader.unused(["run.batch_size_eval", "run.k_test", "run.max_len", "run.min_len", "run.num_beams",
                   "run.num_ans_candidates", "run.inference_method", "run.test_splits"],
                  "evaluation settings: `blip eval` reads them from this file")  # fmt: skip


def _lavis_evaluate(reader: _Reader, task: str) -> None:
    batch = {"vqa": "vqa_batch_size", "caption": "caption_batch_size"}.get(task, "image_batch_size")
    reader.take("run.batch_size_eval", batch)
    reader.take("run.k_test", "k_test")
    reader.take("run.num_beams", "num_beams")
    if task == "vqa":
        reader.take("run.num_ans_candidates", "vqa_k_test")
        reader.take("run.inference_method", "vqa_inference")
        reader.unused(["run.max_len", "run.min_len"], "generated answers are 1 to 10 tokens here, as LAVIS's VQA "
                      "configs have them")  # fmt: skip
    else:
        reader.take("run.max_len", "max_length")
        reader.take("run.min_len", "min_length")
    splits = reader.raw.pop("run.test_splits", None)
    if splits:
        split = "test" if "test" in splits else str(splits[0])
        reader.config["split"] = split
        reader.notes.append(f"run.test_splits: {splits} -> split: {split}" + (" (one split an evaluation: "
                            "`--set split=val` for the other)" if len(splits) > 1 else ""))  # fmt: skip
    reader.unused(["model.queue_size", "model.alpha", "model.negative_all_rank", "run.batch_size_train",
                   "run.init_lr", "run.min_lr", "run.weight_decay", "run.max_epoch", "run.lr_sched", "run.amp",
                   "run.num_workers", "run.warmup_lr", "run.warmup_steps"],
                  "training settings: `blip finetune` reads them from this file")  # fmt: skip
