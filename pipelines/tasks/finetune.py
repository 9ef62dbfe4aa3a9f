"""The finetuning stage: a pretrained model version + a downstream dataset version -> a task model version.

Follows BLIP's `train_retrieval.py`, `train_caption.py`, `train_vqa.py`, `train_nlvr.py` (Li et al. 2022,
salesforce/BLIP; shared/docs/blip_spec.md §4): AdamW wd 0.05, per-epoch cosine learning rate from `init_lr` to 0
without warm-up, RandomResizedCrop(0.5-1) + flip + RandAugment(2, 5), captions through `pre_caption(30)`.
The loop is `train_loop.TrainLoop` on Ray Train (`_ray_train`), exactly as pretraining runs; the four
`TrainTask`s (retrieval, caption, VQA, NLVR2) are in `finetune_tasks.py`.

The task model is built from the init model's architecture (the image size becomes the task's: 384, VQA 480,
for ViT-B/L inits; a small test model keeps its own) and the init weights are loaded by key name with a report
of what was loaded, missing, unexpected and freshly initialised (e.g. NLVR2's head). The published version holds
`model.safetensors` + `config.json` (save_pretrained) at its top level, the metric history and TensorBoard logs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pipelines.config import check_range, config_hash, to_dict
from pipelines.tasks.finetune_tasks import (TASK_CLASSES, CaptionTask, NLVRTask, RetrievalTask, VQATask,  # noqa: F401
                                            load_weights)
from pipelines.tasks.pretrain import ScalingConfig
from pipelines.tasks.train_loop import LoopConfig, OptimConfig

TaskName = Literal["retrieval", "caption", "vqa", "nlvr"]
TASKS: tuple[str, ...] = ("retrieval", "caption", "vqa", "nlvr")
# BLIP configs (retrieval_coco, caption_coco, vqa, nlvr .yaml): init_lr, epochs, batch per GPU, image size.
TASK_LR = {"retrieval": 1e-5, "caption": 1e-5, "vqa": 2e-5, "nlvr": 3e-5}
TASK_EPOCHS = {"retrieval": 6, "caption": 5, "vqa": 10, "nlvr": 15}
TASK_BATCH = {"retrieval": 32, "caption": 32, "vqa": 16, "nlvr": 16}
TASK_IMAGE_SIZE = {"retrieval": 384, "caption": 384, "vqa": 480, "nlvr": 384}


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class FinetuneOptim:
    """AdamW + BLIP's finetuning schedule (cosine per epoch, no warm-up); `lr: null` = the task's init_lr."""

    lr: float | None = None  # retrieval/caption 1e-5, VQA 2e-5, NLVR2 3e-5 (ViT-L configs use lower values)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_steps: int = 0  # BLIP finetunes without warm-up
    grad_accum: int = 1
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None:
            check_range("optim", "lr", self.lr, 0.0)
        check_range("optim", "min_lr", self.min_lr, 0.0)
        check_range("optim", "weight_decay", self.weight_decay, 0.0)
        check_range("optim", "warmup_steps", self.warmup_steps, 0)
        check_range("optim", "grad_accum", self.grad_accum, 1)

    def resolve(self, task: str) -> OptimConfig:
        lr = TASK_LR[task] if self.lr is None else self.lr
        return OptimConfig(lr=lr, warmup_lr=min(lr, 1e-6), warmup_steps=self.warmup_steps, min_lr=self.min_lr,
                           schedule="cosine", weight_decay=self.weight_decay, grad_accum=self.grad_accum,
                           max_grad_norm=self.max_grad_norm)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FinetuneLoop:
    """Length, logging, checkpoints; `epochs: null` = the task's BLIP value (6 / 5 / 10 / 15)."""

    epochs: int | None = None
    max_steps: int | None = None  # stop after this many optimiser steps (None = all epochs)
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile every transformer block (GPU runs)

    def __post_init__(self) -> None:
        if self.epochs is not None:
            check_range("loop", "epochs", self.epochs, 1)
        if self.max_steps is not None:
            check_range("loop", "max_steps", self.max_steps, 1)
        check_range("loop", "checkpoint_every", self.checkpoint_every, 1)
        check_range("loop", "log_every", self.log_every, 1)

    def resolve(self, task: str) -> LoopConfig:
        return LoopConfig(epochs=self.epochs or TASK_EPOCHS[task], max_steps=self.max_steps,
                          checkpoint_every=self.checkpoint_every, log_every=self.log_every, seed=self.seed,
                          precision=self.precision, grad_checkpointing=self.grad_checkpointing,
                          compile=self.compile)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class FinetuneData:
    """Training input (per worker); `batch_size: null` = the task's BLIP value (32 / 32 / 16 / 16)."""

    batch_size: int | None = None
    loader_workers: int = 2  # DataLoader processes per training worker
    shuffle_buffer: int = 1000
    max_words: int = 30  # pre_caption truncation (NLVR2 sentences: 40, fixed)
    min_scale: float = 0.5  # RandomResizedCrop lower scale for finetuning
    negative_all_rank: bool = False  # retrieval: ITM hard negatives from every worker's batch (BLIP COCO: true)
    augment: bool = True
    shard_cache_dir: str | None = None  # node-local copies of remote shards, as pretraining's data.shard_cache_dir
    shard_cache_gb: float = 100.0

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            check_range("data", "batch_size", self.batch_size, 1)
        check_range("data", "loader_workers", self.loader_workers, 0)
        check_range("data", "shuffle_buffer", self.shuffle_buffer, 0)
        check_range("data", "max_words", self.max_words, 1)
        check_range("data", "min_scale", self.min_scale, 0.01, 1.0)
        check_range("data", "shard_cache_gb", self.shard_cache_gb, 0.001)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """One finetuning run (configs/finetune/*.yaml)."""

    task: TaskName  # retrieval | caption | vqa | nlvr
    image_size: int | None = None  # None: 384 (VQA 480) for ViT-B/L inits, the init's own size for smaller ones
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    loop: FinetuneLoop = field(default_factory=FinetuneLoop)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"'task' = {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.image_size is not None:
            check_range("finetune", "image_size", self.image_size, 16)

    @property
    def batch_size(self) -> int:
        return self.data.batch_size or TASK_BATCH[self.task]


def task_model_config(init_config: dict[str, Any], cfg: FinetuneConfig) -> dict[str, Any]:
    """The task model's BlipConfig (as a dict): the init's architecture at the task's image size."""
    from blip_models.checkpoints import config_from_dict, config_to_dict

    config = config_from_dict(init_config)
    size = cfg.image_size or (TASK_IMAGE_SIZE[cfg.task] if config.vision.width >= 768 else config.vision.image_size)
    if size % config.vision.patch_size:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {config.vision.patch_size}")
    # Gradient checkpointing from this run's switch alone, never inherited from the init model's config.
    grad_ckpt_layers = config.vision.depth if cfg.loop.grad_checkpointing else 0
    return config_to_dict(config.replace(vision={"image_size": size, "grad_ckpt_layers": grad_ckpt_layers}))


# ---------------------------------------------------------------------------------------------- the stage


def resolve_model_source(registry: Any, ref: Any) -> tuple[Any, str]:
    """(model manifest or None, local directory / .pth path / URL) for a model reference."""
    from datasets_manifests.manifest import Manifest
    from pipelines.tasks.pretrain import model_config_path, model_reference

    if isinstance(ref, Manifest):
        manifest, found = ref, model_config_path(ref)
    else:
        manifest, found = model_reference(registry, str(ref), "model")
    if manifest is None:
        return None, found
    return manifest, str(materialize_model_dir(registry, manifest, found))


def worker_source(registry: Any, manifest: Any, local_source: str) -> str:
    """Where the training workers load the init model from: a remote registry's version by its directory's URL
    (each worker copies it to its node: `shard_cache.local_model_source`), since the driver's copy is on the
    driver's disk only; anything else as it is."""
    from pipelines.tasks.pretrain import model_config_path

    if manifest is None or registry.is_local:
        return local_source
    return registry.url_of(manifest, model_config_path(manifest)).rsplit("/", 1)[0]


def materialize_model_dir(registry: Any, manifest: Any, config_path: str) -> Path:
    """The local directory holding config.json + model.safetensors of a model version (downloaded if remote)."""
    if registry.is_local:
        return registry.local_path(manifest, config_path).parent
    target = registry.work_dir(f"model-{manifest.id[:24]}")
    weights = str(Path(config_path).with_name("model.safetensors"))
    for relative in (config_path, weights):
        registry.fetch(manifest, relative, target / Path(relative).name)
    return target


def init_config_of(source: str) -> dict[str, Any]:
    """The architecture (BlipConfig dict) of an init model: its config.json, or inferred from an official .pth."""
    from blip_models.checkpoints import (config_from_architecture, config_to_dict, infer_architecture, infer_kind,
                                         is_pretrained_dir, read_official, read_pretrained_config)

    if is_pretrained_dir(source):
        return read_pretrained_config(source)["config"]
    state = read_official(source)
    return config_to_dict(config_from_architecture(infer_architecture(state), infer_kind(state)))


def check_dataset(task: str, dataset: Any) -> None:
    """The dataset version must be in the format the task trains on."""
    fmt = dataset.metadata.get("format")
    wanted = {"retrieval": "karpathy", "caption": "karpathy", "vqa": "vqa", "nlvr": "nlvr"}[task]
    if fmt != wanted:
        raise ValueError(f"{dataset.ref} is a {fmt or 'non-downstream'} dataset; '{task}' finetuning needs a "
                         f"{wanted} set (pipelines.tasks.downstream)")  # fmt: skip


def run_finetune(
    cfg: FinetuneConfig,
    *,
    init: Any,
    dataset: Any,
    name: str,
    registry: Any = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Finetune `init` (model ref/Manifest, save_pretrained dir or official .pth) on `dataset`; publish `name`."""
    from datasets_manifests.manifest import Producer, cache_key
    from datasets_manifests.registry import Registry, check_name, now_utc
    from pipelines.config import ConfigError
    from pipelines.tasks import _ray_train
    from pipelines.tasks.pretrain import (RUN_ONLY_KEYS, _role, init_identity, run_key, shard_cache_setting,
                                          warn_uncached_remote)
    from pipelines.tasks.publish_model import training_init_source
    from pipelines.tasks.train_data import DataPlan, shards_of

    check_name(name)
    registry = registry if registry is not None else Registry()
    dataset = registry.resolve(dataset, kind="dataset")
    check_dataset(cfg.task, dataset)
    init_manifest, init_source = resolve_model_source(registry, init)
    init_source, init_origin = (init_source, {}) if init_manifest else training_init_source(init_source)
    parents = [init_manifest, dataset] if init_manifest is not None else [dataset]
    stage = f"finetune-{cfg.task}"
    inputs = [p.id for p in parents] + ([] if init_manifest else init_identity(init_source))
    key = cache_key(stage, inputs, config_hash(cfg, RUN_ONLY_KEYS))
    cached = registry.find_cached("model", name, key)
    if cached is not None:
        registry.remove_work(key)  # what a run stopped between its publish and its clean-up left
        return cached

    model_config = task_model_config(init_config_of(init_source), cfg)
    shards = shards_of(registry, dataset, "train")
    optim, loop = cfg.optim.resolve(cfg.task), cfg.loop.resolve(cfg.task)
    plan = DataPlan(shards=shards, world_size=cfg.scaling.num_workers, batch_size=cfg.batch_size,
                    grad_accum=optim.grad_accum, seed=loop.seed, shuffle_buffer=cfg.data.shuffle_buffer)  # fmt: skip
    if plan.steps_per_epoch < 1:
        raise ConfigError(f"{dataset.ref} has {plan.num_samples} training samples, fewer than one global batch of "
                          f"{plan.global_batch} (scaling.num_workers x batch_size x grad_accum)")  # fmt: skip
    if cfg.task == "retrieval" and plan.world_size * plan.batch_size > model_config["queue_size"]:
        raise ConfigError(f"the model's queue_size {model_config['queue_size']} is smaller than the features enqueued "
                          f"per step ({plan.world_size} workers x batch {plan.batch_size})")  # fmt: skip
    warn_uncached_remote(cfg.data, shards)
    data = dict(to_dict(cfg.data), batch_size=cfg.batch_size)
    workers_init = worker_source(registry, init_manifest, init_source)
    worker_config = {
        "task": {"factory": f"pipelines.tasks.finetune_tasks:{TASK_CLASSES[cfg.task].__name__}",
                 "kwargs": {"model_config": model_config, "data": data, "init": workers_init}},
        "shards": [(s.url, s.num_samples, s.bytes) for s in shards],
        "data": {"batch_size": cfg.batch_size, "shuffle_buffer": cfg.data.shuffle_buffer, "resampled": False,
                 "loader_workers": cfg.data.loader_workers, "shard_cache": shard_cache_setting(cfg.data)},
        "optim": to_dict(optim), "loop": to_dict(loop), "pid_dir": None,
        "find_unused_parameters": cfg.scaling.find_unused_parameters,
    }  # fmt: skip
    storage = cfg.scaling.storage_path or str(registry.work_dir("train-runs"))
    run_name = _ray_train.run_name_for(stage, key, run_key(cfg, stage, inputs), storage)
    work = registry.note_work(key, stage=stage, name=name, parents=parents, shared=True,  # as pretrain's
                              ray_run={"name": run_name, "storage_path": storage})  # fmt: skip
    started = now_utc()
    # A run of this key interrupted by a crash continues from its last checkpoint; otherwise a new run starts.
    outcome = _ray_train.launch(worker_config, scaling=cfg.scaling, run_name=run_name, storage_path=storage,
                                resume=True, start_if_missing=True, on_progress=on_progress)
    staging = work / "publish"
    if staging.exists():
        shutil.rmtree(staging)
    stats = outcome.collect(staging)
    for item in (staging / "model").iterdir():  # model.safetensors + config.json at the version's top level
        item.rename(staging / item.name)
    (staging / "model").rmdir()
    files = [{"path": str(p.relative_to(staging)), "role": _role(p)} for p in sorted(staging.rglob("*")) if p.is_file()]
    producer = Producer(stage=stage, config=to_dict(cfg), config_hash=config_hash(cfg), cache_key=key,
                        started_at=started)  # fmt: skip
    metadata = {
        "kind": TASK_CLASSES[cfg.task].kind, "task": cfg.task, "image_size": model_config["vision"]["image_size"],
        "architecture": {"vision_width": model_config["vision"]["width"], "vision_depth": model_config["vision"]["depth"],
                         "text_layers": model_config["text"]["num_hidden_layers"]},
        "init": {**stats["init"], **init_origin}, "final_step": stats["final_step"], "planned_steps": stats["planned_steps"],
        "restarts": stats["restarts"], "world_size": plan.world_size, "global_batch": plan.global_batch,
        "steps_per_epoch": plan.steps_per_epoch, "lr": optim.lr, "epochs": loop.epochs,
        "ray_run": {"name": run_name, "storage_path": storage},
    }  # fmt: skip
    dropped = {reason: count for reason, count in stats["dropped"].items() if reason != "refilled"}
    manifest = registry.publish(
        kind="model", name=name, staging_dir=staging, files=files, producer=producer, parents=parents,
        metadata=metadata, stats=stats["summary"], drop_reasons=dropped,
        counts={"samples_trained": stats["samples_seen"], "dropped": sum(dropped.values()),
                "refilled": stats["dropped"].get("refilled", 0), "dataset_samples": plan.num_samples},
    )  # fmt: skip
    registry.remove_work(key)  # a remote registry's: the uploaded copy here, the note in its store
    return manifest
