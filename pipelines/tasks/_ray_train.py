"""Ray Train adapter: the only module that imports `ray.train`. Runs `TrainLoop` on a TorchTrainer.

Ray Train's five touch points (Ray 2.60, Train V2; shared/docs/orchestration.md §4.5): `TorchTrainer` with a
`ScalingConfig` from the stage config; `prepare_model` (DDP: gloo on CPU, NCCL on GPU); `get_checkpoint` to
restore; `report(metrics, checkpoint=Checkpoint.from_directory(...))` from rank 0 (every rank reports);
`RunConfig(name, storage_path, FailureConfig(max_failures))`. V2 has no `resume_from_checkpoint` (it raises):
reusing the same run name and storage path is what resumes, after a crash as after an explicit `--resume`.

The same code runs on 2 CPU workers here, N GPUs on one node, or many nodes with a shared `storage_path`
(local path or s3://). Each checkpoint directory holds the whole loop state (`train_state.pt`), the metric
history, TensorBoard event files and, at the last step, the model (`model/`, save_pretrained) and `metrics.json`.
"""

from __future__ import annotations

import contextvars
import errno
import importlib
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from pipelines.runtime import process_temp_dir

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.json"
ATTEMPTS_DIR = "blip_attempts"
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


class UserError(Exception):
    """A run that cannot be started as asked (the CLI prints it as one line)."""


class TrainingDataError(UserError):
    """A run stopped because its data could not be read (`ShardsUnreadable`, `NothingTrainedError`)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a signal) stopped a run: Ray Train aborted it; its checkpoints stay, so it can go on."""

    def __init__(self, run_name: str, checkpoint_step: int | None) -> None:
        self.run_name, self.checkpoint_step = run_name, checkpoint_step
        where = f"its last checkpoint is step {checkpoint_step}" if checkpoint_step is not None else (
            "before its first checkpoint: it starts again from step 0")
        super().__init__(f"training run {run_name!r} stopped; {where}")


class TrainingDiskFull(OSError):
    """A run stopped on a full disk (a checkpoint's or a worker's write): its checkpoints before stay."""

    def __init__(self, run_name: str, checkpoint_step: int | None, filename: str | None) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        self.run_name, self.checkpoint_step = run_name, checkpoint_step
        where = f"its last checkpoint is step {checkpoint_step}" if checkpoint_step is not None else (
            "before its first checkpoint: it starts again from step 0")
        self.stopped = f"training run {run_name!r} stopped; {where}"


# ---------------------------------------------------------------------------------------------- driver side


class Outcome:
    """A finished run: its final checkpoint and what it recorded."""

    def __init__(self, checkpoint: Any, metrics: dict[str, Any]) -> None:
        self.checkpoint, self.metrics = checkpoint, metrics

    def collect(self, staging: Path) -> dict[str, Any]:
        """Copy the publishable files of the final checkpoint into `staging`; return its metrics.json."""
        staging.mkdir(parents=True, exist_ok=True)
        with self.checkpoint.as_directory() as directory:
            source = Path(directory)
            if not (source / "model").is_dir() or not (source / METRICS_FILE).is_file():
                raise RuntimeError(f"the last checkpoint {source} has no model: the run did not reach its final step")
            for name in ("model", "tensorboard"):
                if (source / name).is_dir():
                    shutil.copytree(source / name, staging / name)
            for name in (METRICS_FILE, HISTORY_FILE):
                shutil.copy2(source / name, staging / name)
        return json.loads((staging / METRICS_FILE).read_text())


def plan_run(storage_path: str, run_name: str, resume: bool, start_if_missing: bool = False) -> tuple[str, str]:
    """(storage path as Ray Train gets it, the run's directory as a path or URL); checks the run's existence.

    `resume=False`: the run must be new. `resume=True`: it must exist, since an explicit `--resume` of a run that
    is not there is a mistake (a wrong name, another storage path), not a wish to start over; `start_if_missing`
    is finetuning's resume-if-present (a crashed run of the same key continues, else a new one starts).
    Plain paths are made absolute; URLs (file://, s3://, memory://) keep their protocol.
    """
    storage_path, fs, root = _storage(storage_path)
    run_dir = f"{root}/{run_name}"
    exists = fs.exists(run_dir)
    if exists and not resume:
        raise UserError(f"a training run named {run_name!r} already exists in {storage_path}: pass --resume to "
                        "continue it, or --name NAME for a new run")  # fmt: skip
    if not exists and resume and not start_if_missing:
        raise UserError(f"there is no training run named {run_name!r} in {storage_path} to resume: leave out "
                        "--resume to start it fresh, or pass the --name and config of the run to continue")  # fmt: skip
    return storage_path, fs.unstrip_protocol(run_dir) if "://" in storage_path else run_dir


def run_name_for(stage: str, key: str, run_key: str, storage_path: str) -> str:
    """The Ray Train run of a stage run: named by `run_key`, the cache key without the settings that change how a
    run goes, not what it trains (`pretrain.RUN_MECHANICS_KEYS`), so that a rerun with more retries (a run that
    used up `max_failures`) goes on from the same checkpoints instead of step 0; named by the cache key `key` where
    a run of that name is there (started before names left those settings out)."""
    names = [f"{stage}-{run_key[:12]}", f"{stage}-{key[:12]}"]
    if names[0] == names[1]:
        return names[0]
    _, fs, root = _storage(storage_path)
    return next((name for name in names if fs.exists(f"{root}/{name}")), names[0])


def _storage(storage_path: str) -> tuple[str, Any, str]:
    """(the storage path as Ray Train gets it, its filesystem, its root without a trailing slash): plain paths made
    absolute; URLs (file://, s3://, memory://) keep their protocol."""
    from datasets_manifests.filesystems import url_to_fs

    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    fs, root = url_to_fs(storage_path)  # an s3:// path without s3fs: one line with the install hint
    return storage_path, fs, root.rstrip("/")


def init_sources(worker_config: dict[str, Any]) -> list[str]:
    """The initial weights every worker loads: finetuning's init model, pretraining's checkpoint or ViT weights."""
    init = worker_config.get("task", {}).get("kwargs", {}).get("init")
    sources = [init] if isinstance(init, str) else list((init or {}).values())
    return [str(source) for source in sources if source]


def launch(
    worker_config: dict[str, Any],
    *,
    scaling: Any,
    run_name: str,
    storage_path: str,
    resume: bool,
    start_if_missing: bool = False,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Outcome:
    """Run `train_worker` on a TorchTrainer and wait; raises if the run fails after its retries.

    Rank 0 writes `progress.json` into the run's directory under `storage_path`, which every node of a cluster
    shares (Ray Train needs that for checkpoints too), and `on_progress` is fed from it here on the driver.
    """
    storage_path, run_dir = plan_run(storage_path, run_name, resume, start_if_missing)  # before Ray starts

    from pipelines.runtime import (check_gpus_available, ctrl_c_of_a_library, disk_full, ensure_ray,
                                   unreachable_local_inputs)

    ray = ensure_ray()
    if scaling.use_gpu:
        check_gpus_available(ray, scaling.gpus_per_worker, "scaling.gpus_per_worker")
    # Before any worker starts: on a cluster, shards and initial weights of a local registry (or any local file)
    # exist on this machine only, and checkpoints written under a local storage path stay on the disk of the node
    # that wrote them.
    nodes = ray.nodes()
    inputs = [str(shard[0]) for shard in worker_config.get("shards", [])] + init_sources(worker_config)
    problem = unreachable_local_inputs(nodes, inputs)
    if problem:
        raise UserError(f"training run {run_name!r}: {problem}")
    if unreachable_local_inputs(nodes, [storage_path]):
        raise UserError(f"training run {run_name!r}: scaling.storage_path is a local path ({storage_path}) on a "
                        f"{sum(bool(node.get('Alive')) for node in nodes)}-node Ray cluster, where each node would keep "
                        "its workers' checkpoints on its own disk: set it to s3:// or gs://, or to a mount every node "
                        "shares (BLIP_SHARED_FILESYSTEM=1)")  # fmt: skip
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    progress_url = f"{run_dir}/{PROGRESS_FILE}"
    config = dict(worker_config, run_dir=run_dir, progress_url=progress_url)
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=scaling.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=scaling.max_failures)),
    )  # fmt: skip
    stop = threading.Event()
    watcher = watch_progress(progress_url, on_progress, stop) if on_progress else None
    try:
        # Ray Train's Ctrl-C handler aborts the run gracefully (workers stopped, checkpoints kept) and leaves the
        # driver's wait to end in SystemExit(1).
        with ctrl_c_of_a_library(lambda: TrainingInterrupted(run_name, last_checkpoint_step(run_dir))):
            result = trainer.fit()
    except TrainingFailedError as error:
        if (full := disk_full(error)) is not None:  # Ray Train retried it `max_failures` times: no use
            raise TrainingDiskFull(run_name, last_checkpoint_step(run_dir), full.filename) from error
        raise data_failure(run_name, error) or error
    finally:
        stop.set()
        if watcher:
            watcher.join(timeout=5)
    final = read_progress(progress_url) if on_progress else None
    if on_progress and final is not None:
        on_progress(final)
    if getattr(result, "error", None):
        raise RuntimeError(f"training run {run_name!r} failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    return Outcome(result.checkpoint, dict(result.metrics or {}))


def data_failure(run_name: str, error: Exception) -> TrainingDataError | None:
    """The one-line error for a run in which a worker stopped on its data; None for any other failure (a bug
    keeps Ray's error, with every worker's traceback). Other workers failing beside it (a peer waiting in a
    collective when the group was torn down, or anything else) are named in the same line by their last one."""
    from pipelines.tasks.train_data import ShardsUnreadable
    from pipelines.tasks.train_loop import NothingTrainedError

    failures = getattr(error, "worker_failures", None) or {}
    on_data = sorted(rank for rank, failure in failures.items()
                     if isinstance(failure, (ShardsUnreadable, NothingTrainedError)))  # fmt: skip
    if not on_data:
        return None
    rank = on_data[0]
    others = sorted(set(failures) - set(on_data))
    also = ""
    if others:
        first, name = _last_line(failures[others[0]]), type(failures[others[0]]).__name__
        first = first if first.startswith(name) else f"{name}: {first}"
        also = f" (rank {', '.join(map(str, others))} failed too: {first})"
    return TrainingDataError(f"training run {run_name!r} stopped on its data (rank {rank}): "
                             f"{_last_line(failures[rank]).split('ShardsUnreadable: ', 1)[-1]}{also}; once that is "
                             f"fixed, `--resume --name {run_name}` continues from the last checkpoint")  # fmt: skip


def _last_line(failure: BaseException) -> str:
    # Through a DataLoader worker the message carries that worker's traceback; its last line is the error.
    lines = str(failure).strip().splitlines()
    return lines[-1][:300] if lines else ""


def last_checkpoint_step(run_dir: str) -> int | None:
    """The step of a run's (a path or URL) newest checkpoint Ray Train registered, the one a resumed run goes on
    from (its checkpoint manager's snapshot); None when there is none. A newer `checkpoint_step<N>` folder may be
    one whose write failed half-way (a full disk): not a checkpoint."""
    from datasets_manifests.filesystems import url_to_fs

    fs, root = url_to_fs(run_dir)
    try:
        with fs.open(f"{root}/{CHECKPOINT_SNAPSHOT}", "r") as handle:
            latest = json.loads(handle.read()).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, ValueError):
        return None
    match = re.fullmatch(r"checkpoint_step(\d+)", str(latest.get("checkpoint_dir_name", "")))
    return int(match.group(1)) if match else None


def read_progress(url: str) -> dict[str, Any] | None:
    """Rank 0's last progress record, or None while there is none (or it is being rewritten)."""
    import fsspec

    try:
        with fsspec.open(url, "r") as handle:
            return json.loads(handle.read())
    except (OSError, ValueError):
        return None


def watch_progress(url: str, on_progress: Callable[[dict[str, Any]], None], stop: threading.Event) -> threading.Thread:
    """A started thread that calls `on_progress` with each new record at `url` until `stop` is set. It runs in a
    copy of this thread's context: a flow's task run is found there, so what `on_progress` logs reaches the run's
    log on the Prefect server (a plain thread's lines were printed only)."""
    watcher = threading.Thread(target=contextvars.copy_context().run, args=(_watch, url, on_progress, stop),
                               daemon=True)  # fmt: skip
    watcher.start()
    return watcher


def _watch(url: str, on_progress: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    seen = None
    while not stop.wait(1.0):
        progress = read_progress(url)
        if progress is not None and progress != seen:
            seen = progress
            on_progress(progress)


def write_text(url: str, text: str) -> None:
    """A small file on any fsspec path or URL, its folder created first (a no-op on object stores)."""
    import posixpath

    from datasets_manifests.filesystems import url_to_fs

    fs, path = url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, text.encode())


# ---------------------------------------------------------------------------------------------- worker side


def make_task(spec: dict[str, Any]) -> Any:
    """'module:Class' + kwargs -> a TrainTask instance (the finetune stages pass their own)."""
    module_name, _, attribute = spec["factory"].partition(":")
    return getattr(importlib.import_module(module_name), attribute)(**spec.get("kwargs", {}))


def setup(config: dict[str, Any], rank: int, world: int, device: Any, wrap: Callable[[Any], Any] | None = None) -> tuple[Any, Any, Any]:
    """(task, plan, loop) for one rank: seeded model, optional DDP `wrap`, data plan. Shared by Ray and local runs."""
    from pipelines.tasks.train_data import DataPlan, ShardRef
    from pipelines.tasks.train_loop import LoopConfig, OptimConfig, TrainLoop, seed_everything

    loop_cfg, optim_cfg = LoopConfig(**config["loop"]), OptimConfig(**config["optim"])
    seed_everything(loop_cfg.seed + rank)  # BLIP: seed + rank
    task = make_task(config["task"])
    model = task.build_model()
    if loop_cfg.compile:  # before DDP wraps it; parameter names and checkpoints stay those of the eager model
        from blip_models.compilation import compile_blocks

        compile_blocks(model)
    model = wrap(model) if wrap else model.to(device)
    data = config["data"]
    shards = tuple(ShardRef(url, int(n), *size) for url, n, *size in config["shards"])  # (url, samples[, bytes])
    plan = DataPlan(shards=shards, world_size=world,
                    batch_size=data["batch_size"], grad_accum=optim_cfg.grad_accum, seed=loop_cfg.seed,
                    shuffle_buffer=data["shuffle_buffer"], resampled=data["resampled"])  # fmt: skip
    order = {"batch_size": plan.batch_size, "grad_accum": plan.grad_accum, "seed": plan.seed,
             "shuffle_buffer": plan.shuffle_buffer, "resampled": plan.resampled}  # what a checkpoint's position means
    return task, plan, TrainLoop(task, model, optim_cfg, loop_cfg, plan.steps_per_epoch, device, data_order=order)


def shard_cache(data: dict[str, Any]) -> Any:
    """The node's shard cache a worker's loaders read remote shards through (None: read them directly)."""
    from pipelines.tasks.shard_cache import ShardCache

    return ShardCache.from_setting(data.get("shard_cache"))


def run_local(config: dict[str, Any], on_log: Callable[[int, dict[str, float]], None] | None = None,
              device: str = "cpu") -> Any:
    """The same training in this process without Ray (one rank, on `device`): benchmarks and equivalence tests."""
    import torch

    from pipelines.tasks.train_data import epoch_loader

    task, plan, loop = setup(config, 0, 1, torch.device(device))
    workers, pin = config["data"]["loader_workers"], torch.device(device).type == "cuda"
    cache = shard_cache(config["data"])
    loop.run(lambda epoch, skip: epoch_loader(plan, task, 0, epoch, skip, workers, pin, cache), on_log=on_log)
    return loop


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function: build, restore, train, checkpoint. Runs on every rank."""
    import ray.train
    import ray.train.torch

    from pipelines.tasks.train_data import epoch_loader
    from pipelines.tasks.train_loop import TrainLoop

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.get("pid_dir"):
        Path(config["pid_dir"]).mkdir(parents=True, exist_ok=True)
        Path(config["pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))
    device = ray.train.torch.get_device()
    ddp_options = {"find_unused_parameters": bool(config.get("find_unused_parameters"))}
    task, plan, loop = setup(config, rank, world, device,
                             wrap=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs=ddp_options))
    data = config["data"]
    run = _RankZeroFiles(config, rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loop.load(str(Path(directory) / STATE_FILE))
            run.restore(Path(directory))
    run.start_attempt(loop.state.step)
    if rank == 0:  # stderr: a driver's stdout may be machine-read (benchmarks print one JSON object)
        print(f"[train] rank 0/{world}: step {loop.state.step}/{loop.total_steps}, {plan.steps_per_epoch} steps per "
              f"epoch, {plan.num_samples} samples ({plan.dropped_per_epoch} left out per epoch by drop_last)", file=sys.stderr)  # fmt: skip

    cache = shard_cache(data)

    def batches(epoch: int, skip: int) -> Any:
        return epoch_loader(plan, task, rank, epoch, skip, num_workers=data["loader_workers"],
                            pin_memory=device.type == "cuda", cache=cache)  # fmt: skip

    def on_log(step: int, metrics: dict[str, float]) -> None:
        run.log(step, metrics, loop.total_steps)

    def on_checkpoint(current: TrainLoop, final: bool) -> None:
        state = current.state_dict()  # collective: every rank's RNG
        metrics = {"step": current.state.step, **run.last}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        import torch

        directory = process_temp_dir(CHECKPOINT_PREFIX)
        try:
            torch.save(state, directory / STATE_FILE)
            run.save(directory)
            if final:
                _save_final(directory, current, task, state, run, plan)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=f"checkpoint_step{current.state.step:08d}")  # fmt: skip
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    loop.run(batches, on_log=on_log, on_checkpoint=on_checkpoint)
    run.close()


def save_model(task: Any, model: Any, directory: Path) -> None:
    """Write the trained model with the task's saver (default: save_pretrained), gradient checkpointing off.

    `grad_ckpt_layers` is a switch of the run that trained the model (memory for time), not part of its
    architecture: a published config that kept it would turn it on in every later run built from it.
    """
    save = getattr(task, "save_model", None)
    if save is None:
        from blip_models.checkpoints import save_pretrained as save
    config = getattr(model, "config", None)
    if not getattr(getattr(config, "vision", None), "grad_ckpt_layers", 0):
        save(model, directory)
        return
    model.config = config.replace(vision={"grad_ckpt_layers": 0})  # the config save_pretrained writes
    try:
        save(model, directory)
    finally:
        model.config = config


def _save_final(directory: Path, loop: Any, task: Any, state: dict[str, Any], run: _RankZeroFiles, plan: Any) -> None:
    from pipelines.tasks.train_loop import unwrap

    save_model(task, unwrap(loop.model), directory / "model")
    dropped: dict[str, int] = {}
    for item in state["per_rank"]:
        for reason, count in item["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + count
    first = run.history[0] if run.history else {}
    summary = {"last": run.last, "first": first, "wall_time_s": round(run.wall_time(), 2)}
    metrics = {
        "final_step": loop.state.step, "planned_steps": loop.total_steps, "epochs_done": loop.state.epoch,
        "restarts": run.attempts() - 1, "restores": loop.state.restarts,
        "samples_seen": sum(item["samples_seen"] for item in state["per_rank"]), "dropped": dropped,
        "init": getattr(task, "init_report", {"from": "scratch"}), "summary": summary,
        "world_size": plan.world_size, "steps_per_epoch": plan.steps_per_epoch,
    }  # fmt: skip
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))


# Rank 0's local folders, named with its pid so that a later run on the node removes those of a killed worker.
TB_PREFIX = "blip-tb-"
CHECKPOINT_PREFIX = "blip-ckpt-"


class _RankZeroFiles:
    """Rank 0's side files: TensorBoard events, metric history, progress, attempt markers."""

    def __init__(self, config: dict[str, Any], rank: int) -> None:
        self.rank, self.config = rank, config
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, float] = {}
        self.started = time.time()
        self.elapsed_before = 0.0
        # Events are written locally (TensorBoard appends to open files, which object stores cannot) and copied
        # into each checkpoint.
        self.tb_dir = process_temp_dir(TB_PREFIX) if rank == 0 else None
        self.writer = None
        self.progress_failed = False

    def restore(self, directory: Path) -> None:
        if self.rank != 0:
            return
        if (directory / HISTORY_FILE).is_file():
            lines = (directory / HISTORY_FILE).read_text().splitlines()
            self.history = [json.loads(line) for line in lines if line.strip()]
            self.last = {k: v for k, v in self.history[-1].items() if k != "step"} if self.history else {}
            self.elapsed_before = float(self.history[-1].get("_wall_s", 0.0)) if self.history else 0.0
        if (directory / "tensorboard").is_dir():
            shutil.copytree(directory / "tensorboard", self.tb_dir, dirs_exist_ok=True)

    def start_attempt(self, step: int) -> None:
        if self.rank != 0:
            return
        marker = f"{self.config['run_dir']}/{ATTEMPTS_DIR}/{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"
        write_text(marker, json.dumps({"start_step": step, "pid": os.getpid(), "time": time.time()}))

    def attempts(self) -> int:
        from datasets_manifests.filesystems import url_to_fs

        fs, root = url_to_fs(f"{self.config['run_dir']}/{ATTEMPTS_DIR}")
        return len(fs.ls(root, detail=False)) if fs.exists(root) else 1

    def wall_time(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def log(self, step: int, metrics: dict[str, float], total: int) -> None:
        if self.rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:
            self.writer = SummaryWriter(str(self.tb_dir))
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.last = dict(metrics)
        self.history.append({"step": step, **metrics, "_wall_s": round(self.wall_time(), 3)})
        if self.config.get("progress_url"):
            self.write_progress({"step": step, "total": total, **metrics})

    def write_progress(self, progress: dict[str, Any]) -> None:
        """Best effort: the driver's progress bar is not worth a training run, so a failure is reported once."""
        try:
            write_text(self.config["progress_url"], json.dumps(progress))
        except Exception as error:  # noqa: BLE001 - any storage error (OSError, a backend's own types)
            if not self.progress_failed:
                print(f"[train] cannot write progress to {self.config['progress_url']} ({error}); training goes on "
                      "without it", file=sys.stderr)  # fmt: skip
            self.progress_failed = True

    def save(self, directory: Path) -> None:
        if self.writer is not None:
            self.writer.flush()
        shutil.copytree(self.tb_dir, directory / "tensorboard", dirs_exist_ok=True)
        (directory / HISTORY_FILE).write_text("".join(json.dumps(item) + "\n" for item in self.history))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tb_dir is not None:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
