"""The pretraining stage: a dataset version (+ optional initial weights) -> a BLIP model version.

Follows BLIP's `pretrain.py` (Li et al. 2022, salesforce/BLIP; shared/docs/blip_spec.md §2): ITC + ITM + LM
with equal weights, alpha ramped linearly to 0.4 over the first two epochs, AdamW wd 0.05 with warm-up then
per-epoch step decay, RandomResizedCrop(0.2-1) + flip + RandAugment(2, 5) + CLIP normalisation, captions
through `pre_caption(max_words=30)`. The loop itself is `train_loop.TrainLoop`; Ray Train distribution lives in
`_ray_train.py`. `PretrainTask` is the pretraining instance of the `TrainTask` protocol.

Initialisation: from scratch; ImageNet ViT weights (a local state-dict file with timm names, loaded into
`visual_encoder` non-strictly with a report); or any model version, `save_pretrained` directory or official
`.pth` (path or URL). The stage is idempotent: a model version with the same cache key is returned as is.
"""

from __future__ import annotations

import io
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines.config import check_range, config_hash, to_dict
from pipelines.tasks.train_loop import LoopConfig, OptimConfig, StepInfo

STAGE = "pretrain"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """Training input from the dataset version's shards (per-worker numbers)."""

    split: str = "train"
    batch_size: int = 75  # micro-batch per worker (BLIP: 75 per GPU)
    loader_workers: int = 4  # DataLoader processes per training worker (decode + augment)
    shuffle_buffer: int = 1000  # samples held for within-worker shuffling (0 = shard order only)
    resampled: bool = False  # draw shards with replacement (huge sets; samples may repeat within an epoch)
    max_words: int = 30  # pre_caption truncation (BLIP pretraining: 30)
    min_scale: float = 0.2  # RandomResizedCrop lower scale (pretraining 0.2, finetuning 0.5)
    augment: bool = True  # false: the deterministic eval transform (tests, ablations)
    # A directory on each node's local disk caching remote shards (s3://, gs://, http:// registries): each shard is
    # downloaded once a node instead of once a loader worker. null: no cache (local and mounted shards need none).
    shard_cache_dir: str | None = None
    shard_cache_gb: float = 100.0  # the least recently read shards are removed beyond this size

    def __post_init__(self) -> None:
        check_range("data", "batch_size", self.batch_size, 1)
        check_range("data", "loader_workers", self.loader_workers, 0)
        check_range("data", "shuffle_buffer", self.shuffle_buffer, 0)
        check_range("data", "max_words", self.max_words, 1)
        check_range("data", "min_scale", self.min_scale, 0.01, 1.0)
        check_range("data", "shard_cache_gb", self.shard_cache_gb, 0.001)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalingConfig:
    """Ray Train scaling and fault tolerance."""

    num_workers: int = 2  # training processes (one per GPU with use_gpu)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used only with use_gpu
    storage_path: str | None = None  # Ray Train run storage, local dir or s3://...; None = the registry work dir
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    checkpoints_to_keep: int = 2
    find_unused_parameters: bool = False  # DDP option for models with conditional branches

    def __post_init__(self) -> None:
        check_range("scaling", "num_workers", self.num_workers, 1)
        check_range("scaling", "cpus_per_worker", self.cpus_per_worker, 0.0)
        check_range("scaling", "gpus_per_worker", self.gpus_per_worker, 0.0)
        check_range("scaling", "max_failures", self.max_failures, -1)
        check_range("scaling", "checkpoints_to_keep", self.checkpoints_to_keep, 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class InitConfig:
    """Where the initial weights come from (both null = from scratch)."""

    checkpoint: str | None = None  # model version ref, save_pretrained dir, or official .pth path/URL
    vit_weights: str | None = None  # ImageNet ViT state dict (timm key names) for the visual encoder

    def __post_init__(self) -> None:
        if self.checkpoint and self.vit_weights:
            raise ValueError("'init.checkpoint' and 'init.vit_weights' are exclusive: a checkpoint has its own ViT")


@dataclass(frozen=True, kw_only=True, slots=True)
class PretrainConfig:
    """One pretraining run (configs/train/pretrain_*.yaml)."""

    output_name: str = "blip-pretrain"  # model name in the registry
    model: str = "base"  # BlipConfig preset: tiny | small | base | large
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {vision: {image_size: 384}}
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def blip_config(self) -> Any:
        from blip_models.configuration_blip import preset

        config = preset(self.model).replace(**self.model_overrides) if self.model_overrides else preset(self.model)
        if self.loop.grad_checkpointing:  # BLIP's vit_grad_ckpt: checkpoint every ViT block
            config = config.replace(vision={"grad_ckpt_layers": config.vision.depth})
        return config


# ---------------------------------------------------------------------------------------------- the task


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MOMENTUM_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")


class PretrainTask:
    """BLIP pretraining as a `TrainTask`: image + caption -> ITC, ITM, LM losses."""

    # Every rank must feed the same batch shape (momentum features are all-gathered into the queues), so a
    # micro-batch that lost samples is filled up with repeats of its valid ones (counted as "refilled").
    fixed_batch_size = True

    def __init__(self, model_config: dict[str, Any], data: dict[str, Any], init: dict[str, Any]) -> None:
        self.model_config, self.data, self.init = model_config, DataConfig(**data), InitConfig(**init)
        self.image_size = int(model_config["vision"]["image_size"])
        self.init_report: dict[str, Any] = {"from": "scratch"}
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get a copy without the tokenizer
        return {**self.__dict__, "_tokenizer": None}

    def build_model(self) -> Any:
        from blip_models.checkpoints import config_from_dict
        from blip_models.modeling_pretrain import BlipPretrain

        from pipelines.tasks.shard_cache import ShardCache, local_model_source

        model = BlipPretrain(config_from_dict(self.model_config))
        source = self.init.checkpoint or self.init.vit_weights
        if source:  # a model version of a remote registry (or weights in a bucket): copied to this node first
            with local_model_source(source, ShardCache.from_setting(shard_cache_setting(self.data))) as path:
                load = load_checkpoint_into if self.init.checkpoint else load_vit_weights
                self.init_report = {**load(model, path), "source": source}
        return model

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        from PIL import Image

        from blip_models.processing import eval_transform, pre_caption, train_transform
        from pipelines.tasks.train_data import DropSample
        from pipelines.tasks.train_loop import seeded

        image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_bytes is None:
            raise DropSample("no_image")
        document = sample_document(raw)
        text = kept_text(raw, rng_seed, document)
        if text is None:
            raise DropSample("no_caption")
        caption = pre_caption(text, self.data.max_words)
        if not caption:
            raise DropSample("empty_caption")
        try:
            image = Image.open(io.BytesIO(image_bytes))
            image = image.convert("RGB")
        except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files
            raise DropSample("undecodable_image", str(error)) from error
        if self.data.augment:
            with seeded(rng_seed):  # crop/flip use torch's global RNG, RandAugment its own seeded one
                pixels = train_transform(self.image_size, self.data.min_scale, augment_seed=rng_seed)(image)
        else:
            pixels = eval_transform(self.image_size)(image)
        return {"image": pixels, "caption": caption, "image_id": image_identity(raw, document)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from blip_models.tokenizer import load_tokenizer, tokenize

        if self._tokenizer is None:  # built once per process (DataLoader workers included)
            self._tokenizer = load_tokenizer()
        # BLIP pretraining pads every caption to 30 tokens.
        input_ids, attention_mask = tokenize(self._tokenizer, [s["caption"] for s in samples], 30, "max_length")
        return {"image": torch.stack([s["image"] for s in samples]), "input_ids": input_ids,
                "attention_mask": attention_mask, "image_ids": torch.tensor([s["image_id"] for s in samples])}

    def loss(self, model: Any, batch: dict[str, Any], info: StepInfo) -> tuple[Any, dict[str, Any]]:
        # BLIP: alpha = 0.4 * min(1, (epoch * iters + i) / (2 * iters)), i.e. a linear ramp over two epochs.
        alpha = self.model_config["alpha"] * min(1.0, info.step / (2 * info.steps_per_epoch))
        output = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=alpha,
                       image_ids=batch["image_ids"])  # a caption's hard negative is never a pair of its own image
        # Detached device scalars: the loop brings them to the host once per step.
        metrics: dict[str, Any] = {f"loss_{name}": getattr(output, f"loss_{name}").detach()
                                   for name in ("itc", "itm", "lm")}
        metrics["loss"] = output.loss.detach()
        metrics["alpha"] = alpha
        return output.loss, metrics


# ---------------------------------------------------------------------------------------------- initialisation


def sample_document(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's `.json` as a dict ({} when absent, unreadable or not an object)."""
    import json

    try:
        document = json.loads(raw["json"]) if "json" in raw else {}
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def kept_text(raw: dict[str, Any], rng_seed: int, document: dict[str, Any] | None = None) -> str | None:
    """The caption this sample trains with: one of its kept texts (CapFilt's `captions`), else its `.txt`.

    A CapFilt version stores each image once with every text the filter kept (web and synthetic, BLIP's union of
    filtered pairs); each time the image comes up, one of them is drawn with the sample's seed (reproducible,
    identical after a restart), so over the epochs every kept pair is trained on without storing the image twice.
    Plain web shards (and unreadable JSON) fall back to `.txt`; a downstream set's train pairs (`.json` only, one
    `caption` each, as BLIP's coco_karpathy_train.json) train on that caption.
    """
    import random

    document = sample_document(raw) if document is None else document
    kept = document.get("captions")
    if isinstance(kept, list) and kept and all(isinstance(text, str) for text in kept):
        return kept[random.Random(rng_seed).randrange(len(kept))]
    if "txt" not in raw and isinstance(document.get("caption"), str):
        return document["caption"]  # a downstream set's train pair (COCO Karpathy: one caption per sample)
    return raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else None


def image_identity(raw: dict[str, Any], document: dict[str, Any] | None = None) -> int:
    """Which image a sample shows, as an int64: a downstream pair's `image_id` (COCO: 5 pairs per image), else
    the sample's key (a web or bootstrapped sample is one image)."""
    import hashlib

    name = str(raw.get("__key__", ""))
    if "txt" not in raw:
        document = sample_document(raw) if document is None else document
        if isinstance(document.get("image_id"), (str, int)):
            name = f"image:{document['image_id']}"
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def load_checkpoint_into(model: Any, source: str) -> dict[str, Any]:
    """Weights from a save_pretrained dir (a model version's directory) or an official .pth, with a report."""
    from blip_models.checkpoints import from_pretrained, is_pretrained_dir, load_into, read_official

    if is_pretrained_dir(source):
        state, kind = from_pretrained(source).state_dict(), "version"
    else:
        state, kind = read_official(source), "official"
    report = load_into(model, state, source=str(source), kind="pretrain")
    result = {"from": kind, "source": str(source), **report.to_dict()}
    if any(key.startswith(MOMENTUM_PREFIXES) for key in report.missing):  # e.g. a captioning model as the start
        model.copy_params()
        result["adapted"] = [*result["adapted"], "momentum encoders copied from the loaded online weights"]
    return result


def load_vit_weights(model: Any, path: str) -> dict[str, Any]:
    """An ImageNet ViT state dict with timm names into `visual_encoder`, non-strict (the head is unexpected)."""
    import torch

    from blip_models.checkpoints import load_into

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):  # timm/DeiT training checkpoints wrap the weights
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    report = load_into(model.visual_encoder, state, source=str(path), kind="vit")
    if not report.loaded:
        raise ValueError(f"{path}: no tensor matches the ViT's timm key names (found e.g. {sorted(state)[:3]})")
    model.copy_params()  # BLIP: the momentum ViT starts as a copy of the initialised one
    return {"from": "imagenet_vit", "source": str(path), **report.to_dict()}


# ---------------------------------------------------------------------------------------------- the stage


def run_pretrain(
    cfg: PretrainConfig,
    dataset: Any,
    *,
    extra_datasets: Sequence[Any] = (),
    registry: Any = None,
    init: str | None = None,
    resume: bool = False,
    resume_if_present: bool = False,
    run_name: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    pid_dir: str | Path | None = None,
) -> Any:
    """Pretrain on a dataset version and publish the model version; returns its Manifest.

    `extra_datasets`: more dataset versions whose train shards join the same epochs, e.g. the human-annotated
    COCO (+ VG) pairs BLIP adds to the web data in both of its pretrainings (spec §3); each is a parent.
    `init` (a model ref, directory or .pth) overrides `cfg.init.checkpoint`. `resume=True` continues the Ray
    Train run of the same name from its last checkpoint; without it an existing run directory is an error.
    `resume_if_present=True` (the flow's choice) continues a run of the same name when one exists and starts it
    otherwise: the default name carries the cache key, so a found run was started from the same config and data.
    `pid_dir`: each training worker writes `rank{r}.pid` there (operations and the fault test).
    """
    from dataclasses import replace

    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry, now_utc
    from pipelines.tasks import _ray_train
    from pipelines.tasks.train_data import DataPlan, shards_of

    registry = registry if registry is not None else Registry()
    datasets = [registry.resolve(ref, kind="dataset") for ref in (dataset, *extra_datasets)]
    if len({d.id for d in datasets}) != len(datasets):
        raise ValueError(f"pretrain: a dataset version is given twice ({', '.join(d.ref for d in datasets)})")
    if init is not None:
        cfg = replace(cfg, init=InitConfig(checkpoint=init))
    parents, init_source, init_origin, key, inputs = lineage(registry, cfg, datasets)
    cached = registry.find_cached("model", cfg.output_name, key)
    if cached is not None:
        registry.remove_work(key)  # what a run stopped between its publish and its clean-up left
        return cached

    blip_config = cfg.blip_config()
    shards_by_dataset = {d.ref: shards_of(registry, d, cfg.data.split) for d in datasets}
    shards = tuple(shard for group in shards_by_dataset.values() for shard in group)
    plan = DataPlan(shards=shards, world_size=cfg.scaling.num_workers, batch_size=cfg.data.batch_size,
                    grad_accum=cfg.optim.grad_accum, seed=cfg.loop.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                    resampled=cfg.data.resampled)  # fmt: skip
    _check_plan(plan, blip_config)
    warn_uncached_remote(cfg.data, shards)
    # Runs live under one directory keyed by run name, so `--resume --name X` finds X after a config change.
    storage = cfg.scaling.storage_path or str(registry.work_dir("train-runs"))
    name = run_name or _ray_train.run_name_for(STAGE, key, run_key(cfg, STAGE, inputs), storage)
    # shared: with a remote registry its store holds the note, so the same run from another machine (a second
    # Prefect worker) is refused instead of training into the same Ray Train run directory.
    work = registry.note_work(key, stage=STAGE, name=cfg.output_name, parents=parents, shared=True,
                              ray_run={"name": name, "storage_path": storage})  # fmt: skip
    config = worker_config(cfg, shards, init_source, pid_dir)
    started = now_utc()
    outcome = _ray_train.launch(config, scaling=cfg.scaling, run_name=name, storage_path=storage,
                                resume=resume or resume_if_present, start_if_missing=resume_if_present,
                                on_progress=on_progress)  # fmt: skip
    staging = work / "publish"
    if staging.exists():
        shutil.rmtree(staging)
    stats = outcome.collect(staging)  # model/, tensorboard/, metrics.json into staging
    files = [{"path": str(p.relative_to(staging)), "role": _role(p)} for p in sorted(staging.rglob("*")) if p.is_file()]
    producer = Producer(stage=STAGE, config=to_dict(cfg), config_hash=config_hash(cfg), cache_key=key,
                        started_at=started)  # fmt: skip
    metadata = {
        "architecture": cfg.model, "kind": "pretrain", "final_step": stats["final_step"],
        "planned_steps": stats["planned_steps"], "restarts": stats["restarts"],
        "restored_from_checkpoint": stats["restores"], "init": {**stats["init"], "sha256": _init_digest(init_source), **init_origin},
        "ray_run": {"name": name, "storage_path": storage},
        "datasets": {ref: sum(shard.num_samples for shard in group) for ref, group in shards_by_dataset.items()},
        "world_size": plan.world_size, "global_batch": plan.global_batch, "steps_per_epoch": plan.steps_per_epoch,
    }  # fmt: skip
    dropped = {reason: count for reason, count in stats["dropped"].items() if reason != "refilled"}
    manifest = registry.publish(
        kind="model", name=cfg.output_name, staging_dir=staging, files=files, producer=producer,
        parents=parents, metadata=metadata, stats=stats["summary"], drop_reasons=dropped,
        counts={"samples_trained": stats["samples_seen"], "dropped": sum(dropped.values()),
                "refilled": stats["dropped"].get("refilled", 0), "dataset_samples": plan.num_samples,
                "left_out_per_epoch": plan.dropped_per_epoch},
    )  # fmt: skip
    registry.remove_work(key)  # a remote registry's: the uploaded copy here, the note in its store
    return manifest


def worker_config(cfg: PretrainConfig, shards: Any, init_source: str | None = None,
                  pid_dir: str | Path | None = None) -> dict[str, Any]:
    """The plain-data config every training worker receives (also what `_ray_train.run_local` takes)."""
    from blip_models.checkpoints import config_to_dict

    return {
        "task": {"factory": "pipelines.tasks.pretrain:PretrainTask",
                 "kwargs": {"model_config": config_to_dict(cfg.blip_config()), "data": to_dict(cfg.data),
                            "init": {"checkpoint": init_source if cfg.init.checkpoint else None,
                                     "vit_weights": cfg.init.vit_weights}}},
        "shards": [(s.url, s.num_samples, s.bytes) for s in shards],
        "data": {"batch_size": cfg.data.batch_size, "shuffle_buffer": cfg.data.shuffle_buffer,
                 "resampled": cfg.data.resampled, "loader_workers": cfg.data.loader_workers,
                 "shard_cache": shard_cache_setting(cfg.data)},
        "optim": to_dict(cfg.optim),
        "loop": to_dict(cfg.loop),
        "pid_dir": str(pid_dir) if pid_dir else None,
        "find_unused_parameters": cfg.scaling.find_unused_parameters,
    }  # fmt: skip


def lineage(registry: Any, cfg: PretrainConfig,
            datasets: Sequence[Any]) -> tuple[list[Any], str | None, dict[str, str], str, list[str]]:  # fmt: skip
    """(parents, local path or URL of the initial weights, what the metadata records of a converted transformers
    checkpoint, cache key, the ids the key is made of) of a pretraining run.

    An init that is a model version becomes a parent after the dataset versions, so the key (and with it the
    published version) changes whenever the initial weights do; a file or directory enters the key by the
    sha256 of its weights (`init_identity`: new weights written over the same path are new work), and is
    recorded by its path in the config and by that sha256 in the metadata.
    """
    from datasets_manifests.manifest import cache_key

    parents, init_source, init_origin, outside = list(datasets), None, {}, []
    if cfg.init.checkpoint:
        init_manifest, init_source, init_origin = _resolve_init(registry, cfg.init.checkpoint)
        if init_manifest is not None:
            parents.append(init_manifest)
        else:
            outside = init_identity(init_source)
    elif cfg.init.vit_weights:
        init_source = cfg.init.vit_weights
        outside = init_identity(init_source)
    inputs = [p.id for p in parents] + outside
    return parents, init_source, init_origin, cache_key(STAGE, inputs, config_hash(cfg, RUN_ONLY_KEYS)), inputs


def run_key(cfg: Any, stage: str, inputs: list[str]) -> str:
    """The key that names a stage's Ray Train run: `inputs` (the cache key's) and the config without
    RUN_MECHANICS_KEYS."""
    from datasets_manifests.manifest import cache_key

    return cache_key(stage, inputs, config_hash(cfg, RUN_MECHANICS_KEYS))


# Where a run keeps temporary copies does not change what it trains; these keys came after cache keys were in use,
# so they are left out of them (runs keep their keys). The other fields stay in, as they always were.
RUN_ONLY_KEYS = ("data.shard_cache_dir", "data.shard_cache_gb")
# Nor do these, which say how a run goes; the published version's cache key keeps them (as it always did), the
# name of the Ray Train run a rerun goes on from leaves them out (`_ray_train.run_name_for`).
RUN_MECHANICS_KEYS = (*RUN_ONLY_KEYS, "scaling.max_failures", "scaling.cpus_per_worker", "scaling.checkpoints_to_keep",
                      "data.loader_workers", "loop.log_every", "loop.checkpoint_every")  # fmt: skip


def shard_cache_setting(data: Any) -> list[Any] | None:
    """[directory, bytes] of a data config's shard cache for the workers (None: none)."""
    return [data.shard_cache_dir, int(data.shard_cache_gb * 2**30)] if data.shard_cache_dir else None


def warn_uncached_remote(data: Any, shards: Sequence[Any]) -> None:
    """Say so when several loader workers will each download every remote shard they open."""
    from pipelines.tasks.shard_cache import is_local

    remote = next((s.url for s in shards if not is_local(s.url)), None)
    if remote and data.loader_workers > 1 and not data.shard_cache_dir:
        log.warning("the shards are remote (%s/...) and data.shard_cache_dir is not set: each of the %d loader "
                    "workers of a rank downloads every shard it opens; set data.shard_cache_dir to a directory on "
                    "each node's local disk", remote.rsplit("/", 1)[0], data.loader_workers)


def init_identity(source: str) -> list[str]:
    """What stands for initial weights from outside the registry in a cache key: the sha256 of a local file
    (of model.safetensors in a directory), so a retrained file at the same path is not mistaken for the old one;
    a URL (or a directory without model.safetensors) by itself."""
    digest = _init_digest(source)
    return [f"sha256:{digest}"] if digest else [source]


def _resolve_init(registry: Any, source: str) -> tuple[Any, str, dict[str, str]]:
    """(model manifest or None, local path/URL of the weights, what the metadata records of a converted
    transformers checkpoint: `training_init_source`) for an init reference."""
    from pipelines.tasks.publish_model import training_init_source

    manifest, found = model_reference(registry, source, "init")
    if manifest is None:
        return None, *training_init_source(found)
    # A remote registry's version by its directory's URL: each training worker copies it to its own node.
    return manifest, registry.url_of(manifest, found).rsplit("/", 1)[0], {}


def model_reference(registry: Any, source: str, what: str) -> tuple[Any, str]:
    """(model version, its config.json's path in the version) for a version of the registry; (None, path or URL)
    for a file, a directory, an http(s) URL or a checkpoint name (BLIP's or LAVIS's: `blip infer models`);
    (None, the name) for a transformers hub name (`Salesforce/blip-itm-base-coco`). Anything else is a
    FileNotFoundError naming `what` it was for."""
    from blip_models.checkpoints import checkpoint_url
    from blip_models.hf_convert import is_hub_name
    from datasets_manifests.registry import NotFoundError, RegistryError

    if Path(source).exists() or source.startswith(("http://", "https://")):
        return None, source
    try:
        manifest = registry.resolve(source, kind="model")
    except RegistryError as error:  # not found, or not a version's name at all
        if url := checkpoint_url(source):
            return None, url
        if is_hub_name(source):
            return None, source
        if not isinstance(error, NotFoundError):
            raise
        raise FileNotFoundError(f"{what} {source!r} is neither a file, a directory, a model version nor a checkpoint "
                                f"name ({error})") from None  # fmt: skip
    return manifest, model_config_path(manifest)


def model_config_path(manifest: Any) -> str:
    """The save_pretrained config.json of a model version (the top-level one if several)."""
    configs = sorted((e.path for e in manifest.files if Path(e.path).name == "config.json"), key=len)
    if not configs:
        raise FileNotFoundError(f"model version {manifest.ref} has no config.json (not a save_pretrained model)")
    return configs[0]


def _init_digest(source: str | None) -> str | None:
    """sha256 of the initial weights file (of model.safetensors for a directory): lineage outside the registry."""
    if not source or not Path(source).exists():
        return None
    path = Path(source) / "model.safetensors" if Path(source).is_dir() else Path(source)
    if not path.is_file():
        return None
    from pipelines.tasks.publish_model import file_sha256

    return file_sha256(path)


def _check_plan(plan: Any, blip_config: Any) -> None:
    from pipelines.config import ConfigError

    if plan.steps_per_epoch < 1:
        raise ConfigError(
            f"the dataset has {plan.num_samples} samples, fewer than one global batch of {plan.global_batch} "
            f"(num_workers x batch_size x grad_accum)"
        )
    per_step = plan.world_size * plan.batch_size
    if per_step > blip_config.queue_size:  # every micro-batch enqueues all ranks' momentum features
        raise ConfigError(f"model queue_size {blip_config.queue_size} is smaller than the features enqueued per "
                          f"micro-batch (num_workers x batch_size = {per_step})")  # fmt: skip


def _role(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "weights"
    if path.name == "config.json":
        return "config"
    if path.name in ("metrics.json", "history.jsonl"):
        return "metrics"
    return "other"
