"""The generic training loop: one step and one loop for pretraining and every finetune, free of Ray.

Follows BLIP's `pretrain.py` / `train_*.py` (Li et al. 2022, salesforce/BLIP): AdamW (weight decay 0.05, all
parameters), a per-step linear warm-up from `warmup_lr` then a per-epoch step decay `lr * rate**epoch` floored
at `min_lr` (pretraining), or BLIP's per-epoch cosine schedule (finetuning). Added to BLIP: gradient
accumulation, bf16 autocast on GPU, an exact save/restore of the whole loop state (model, optimiser, step,
data position, every rank's RNG) so that an interrupted run finishes bit-for-bit like an uninterrupted one.

What a task supplies is the small `TrainTask` protocol; distribution (DDP, Ray) is applied from outside: the
model handed in may be a DDP wrapper, and `torch.distributed` is only used for gathering RNG states and
averaging logged metrics when a process group exists.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol

import numpy as np
import torch
from torch import nn

from pipelines.config import check_range

Batch = dict[str, Any]


# ---------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (BLIP `configs/pretrain.yaml` defaults)."""

    lr: float = 3e-4  # peak learning rate (BLIP init_lr)
    warmup_lr: float = 1e-6  # learning rate at step 0 of the warm-up
    warmup_steps: int = 3000  # linear warm-up length in optimiser steps (0 = none)
    min_lr: float = 1e-6  # floor of the decay
    schedule: Literal["step", "cosine"] = "step"  # step: lr*decay_rate**epoch (pretrain); cosine over epochs (finetune)
    lr_decay_rate: float = 0.9  # per-epoch factor of the step schedule (BLIP code: 0.9; paper: 0.85)
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    grad_accum: int = 1  # micro-batches per optimiser step
    max_grad_norm: float | None = None  # clip the global gradient norm (BLIP: none)

    def __post_init__(self) -> None:
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay"):
            check_range("optim", name, getattr(self, name), 0.0)
        check_range("optim", "warmup_steps", self.warmup_steps, 0)
        check_range("optim", "lr_decay_rate", self.lr_decay_rate, 0.0, 1.0)
        check_range("optim", "grad_accum", self.grad_accum, 1)
        if self.max_grad_norm is not None:
            check_range("optim", "max_grad_norm", self.max_grad_norm, 0.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopConfig:
    """How long to train, how often to log and checkpoint, numerics."""

    epochs: int = 20  # BLIP pretrains 20 epochs
    max_steps: int | None = None  # stop after this many optimiser steps in total (None = all epochs)
    checkpoint_every: int = 1000  # optimiser steps between checkpoints (the last step always checkpoints)
    log_every: int = 50  # optimiser steps between metric logs
    seed: int = 42  # BLIP seeds 42 + rank
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: bool = False  # recompute activations in backward (memory for time)
    compile: bool = False  # torch.compile every transformer block (regional; GPU runs: BLIP-base +19 % samples/s)

    def __post_init__(self) -> None:
        check_range("loop", "epochs", self.epochs, 1)
        if self.max_steps is not None:
            check_range("loop", "max_steps", self.max_steps, 1)
        check_range("loop", "checkpoint_every", self.checkpoint_every, 1)
        check_range("loop", "log_every", self.log_every, 1)


# ---------------------------------------------------------------------------------------------- task protocol


@dataclass(frozen=True, slots=True)
class StepInfo:
    """Where the loop is, for schedules inside a loss (BLIP's alpha ramp)."""

    step: int  # optimiser steps done before this one
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    total_steps: int


class TrainTask(Protocol):
    """What the loop needs from a task (pretraining, retrieval, captioning, VQA, NLVR2)."""

    def build_model(self) -> nn.Module:
        """A fresh model for this task (weights are loaded by the caller)."""

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        """One raw webdataset sample (extension -> bytes) to a training sample; raise ValueError if corrupt.

        `rng_seed` seeds the augmentation of this sample, so that a resumed run augments identically.
        """

    def collate(self, samples: list[dict[str, Any]]) -> Batch:
        """Samples to a batch dict (tensors and lists)."""

    def loss(self, model: nn.Module, batch: Batch, info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward one micro-batch: (scalar loss to minimise, per-objective metrics as floats or detached 0-d
        tensors; the loop brings tensors to the host once per step, not once per metric)."""


@dataclass(slots=True)
class MicroBatch:
    """A collated micro-batch with its bookkeeping from the data pipeline."""

    batch: Batch | None  # None when every sample of this micro-batch was dropped
    num_samples: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    filler: Batch | None = None  # with batch None: placeholder samples the model runs on, their loss times 0

    def pin_memory(self) -> MicroBatch:
        """A copy whose tensors are in page-locked memory, so that `.to(device, non_blocking=True)` overlaps.

        torch's DataLoader (`pin_memory=True`) calls this on every object it yields that has the method; an
        object without it would pass through unpinned and every host-to-device copy would be synchronous.
        """
        if self.batch is None:
            return self
        pinned = {key: value.pin_memory() if isinstance(value, torch.Tensor) else value
                  for key, value in self.batch.items()}  # fmt: skip
        return MicroBatch(batch=pinned, num_samples=self.num_samples, dropped=self.dropped)


# ---------------------------------------------------------------------------------------------- schedule


def learning_rate(cfg: OptimConfig, step: int, epoch: int, epochs: int) -> float:
    """BLIP's schedule at optimiser step `step` (0-based) in epoch `epoch`."""
    if step < cfg.warmup_steps:  # BLIP warmup_lr_schedule: linear, per step
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    if cfg.schedule == "cosine":  # BLIP cosine_lr_schedule, per epoch
        return (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + cfg.min_lr
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay_rate**epoch)  # BLIP step_lr_schedule


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # BLIP: AdamW over all trainable parameters, no bias/LayerNorm exclusion.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.warmup_lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))


# ---------------------------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under its own seed and give the surrounding RNG streams back untouched.

    Augmentation uses the global python/torch RNGs (torchvision, RandAugment); seeding per sample makes it
    independent of DataLoader workers and of restarts, and the model's RNG stream is left alone.
    """
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    seed_everything(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


# ---------------------------------------------------------------------------------------------- distributed helpers


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_info() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (collective when a process group exists)."""
    dist = _dist()
    if not dist:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float], summed: tuple[str, ...] = ("samples_per_s",)) -> dict[str, float]:
    """Average metrics over ranks (keys in `summed` are added up). Collective; ranks may differ in keys
    (a rank whose micro-batches were all dropped has no losses), hence objects rather than all_reduce."""
    everyone = gather_objects(values)
    out: dict[str, float] = {}
    for key in sorted({k for item in everyone for k in item}):
        present = [float(item[key]) for item in everyone if key in item]
        out[key] = sum(present) if key in summed else sum(present) / len(present)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# ---------------------------------------------------------------------------------------------- the loop


class NothingTrainedError(RuntimeError):
    """A rank went through (the rest of) an epoch without one usable sample: its data, not a sample, is broken.

    Raised before that epoch's end is logged or checkpointed; one unreadable shard among readable ones never
    causes it (`train_data.ShardsUnreadable` stops a long run of them sooner). One message argument, so that it
    crosses process boundaries (Ray pickles a worker's exception)."""


def nothing_trained(epoch: int, dropped: dict[str, int]) -> NothingTrainedError:
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(dropped.items()) if count) or "none"
    return NothingTrainedError(f"epoch {epoch}: this rank trained on no sample, every one was dropped ({reasons}); "
                               "is the dataset's storage reachable and are its shards intact (`blip data verify`)?")


@dataclass
class LoopState:
    """Everything besides model/optimiser tensors that a restart needs."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch consumed (per rank; the data position)
    samples_seen: int = 0  # this rank's samples trained on, all epochs
    trained_in_epoch: int = 0  # this rank's samples trained on in this epoch (-1: not known, an older checkpoint)
    restarts: int = 0  # how many times this run was restored from a checkpoint
    dropped: dict[str, int] = field(default_factory=dict)  # this rank's dropped samples by reason
    world_size: int = 1


BatchSource = Callable[[int, int], Iterable[MicroBatch]]  # (epoch, skip_micro_batches) -> micro-batches


class TrainLoop:
    """Optimiser steps over a task's micro-batches, with exact checkpoint state.

    `model` may be DDP-wrapped; `steps_per_epoch` optimiser steps make one epoch, and the batch source must
    yield exactly `steps_per_epoch * grad_accum` micro-batches per epoch on every rank (the data module plans
    that, dropping the last incomplete global batch).
    """

    def __init__(
        self,
        task: TrainTask,
        model: nn.Module,
        optim: OptimConfig,
        loop: LoopConfig,
        steps_per_epoch: int,
        device: torch.device | str = "cpu",
        data_order: dict[str, Any] | None = None,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(
                "an epoch has no complete optimiser step: the dataset is smaller than one global batch "
                "(workers x batch_size x grad_accum)"
            )
        self.task, self.model, self.optim_cfg, self.loop_cfg = task, model, optim, loop
        self.steps_per_epoch = steps_per_epoch
        # The settings that fix which samples a data position stands for (batch size, accumulation, seed, shuffle):
        # a checkpoint's position read under other ones would train samples twice in its epoch and skip others.
        self.data_order = data_order
        self.device = torch.device(device)
        self.optimizer = build_optimizer(model, optim)
        self.state = LoopState(world_size=world_info()[1])
        self.total_steps = min(loop.max_steps or 1 << 62, loop.epochs * steps_per_epoch)
        use_bf16 = loop.precision == "bf16" or (loop.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.lr = learning_rate(optim, 0, 0, loop.epochs)

    # ------------------------------------------------------------------ one step
    def step_info(self) -> StepInfo:
        return StepInfo(
            step=self.state.step, epoch=self.state.epoch,
            step_in_epoch=self.state.batches_in_epoch // self.optim_cfg.grad_accum,
            steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
        )

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """One optimiser step over `grad_accum` micro-batches; returns the averaged metrics."""
        self.model.train()
        self.lr = learning_rate(self.optim_cfg, self.state.step, self.state.epoch, self.loop_cfg.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        info = self.step_info()
        sums: dict[str, Any] = {}  # floats or device scalars until the one host transfer below
        losses = []
        with_samples = max(1, sum(micro.batch is not None for micro in micro_batches))  # what the metrics average
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, metrics = self._forward(micro, info)
                (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value / with_samples
            self.state.samples_seen += micro.num_samples
            if self.state.trained_in_epoch >= 0:
                self.state.trained_in_epoch += micro.num_samples
            for reason, count in micro.dropped.items():
                self.state.dropped[reason] = self.state.dropped.get(reason, 0) + count
        if self.optim_cfg.max_grad_norm is not None:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.max_grad_norm)
        # One device->host transfer per step (each float() of a GPU scalar waits for the queue to drain), and the
        # finiteness check before the update, so a NaN step never reaches the weights.
        sums, finite = to_host(sums, finite_on_every_rank(losses))
        if not finite:
            raise FloatingPointError(f"loss is not finite at step {info.step} (metrics {sums})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batches_in_epoch += len(micro_batches)
        return sums

    def _forward(self, micro: MicroBatch, info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        if micro.batch is None and micro.filler is None:  # a task without a filler: never distributed (tests)
            zero = sum((p.sum() for p in self.model.parameters() if p.requires_grad), torch.zeros((), device=self.device))
            return zero * 0.0, {}
        # Every sample dropped: the model runs on placeholder samples and their loss counts zero. A forward is
        # what arms DDP's gradient all-reduce for the backward, and the queues' all-gathers run in it: a rank that
        # skipped it paired its next collective with the others' previous one (wrong gradients, then a hang). A
        # pretraining model's queues take the placeholders' features as the others' (a few negatives).
        batch = _to_device(micro.batch if micro.batch is not None else micro.filler, self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss, metrics = self.task.loss(self.model, batch, info)
        return (loss, metrics) if micro.batch is not None else (loss * 0.0, {})

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        batches: BatchSource,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_checkpoint: Callable[[TrainLoop, bool], None] | None = None,
    ) -> dict[str, float]:
        """Train until `total_steps`, resuming from `self.state`; returns the last logged metrics.

        `on_log(step, metrics)` and `on_checkpoint(loop, final)` are called on every rank at the same steps
        (both may be collective).
        """
        accum = self.optim_cfg.grad_accum
        last: dict[str, float] = {}
        window = _Window()
        sample_gpu = self.device.type == "cuda"  # off for good after the first failed reading
        while self.state.step < self.total_steps:
            source = iter(batches(self.state.epoch, self.state.batches_in_epoch))
            dropped_before = dict(self.state.dropped)
            while self.state.step < self.total_steps and self.state.batches_in_epoch < self.steps_per_epoch * accum:
                waited = time.perf_counter()
                group = [next(source) for _ in range(accum)]
                started = time.perf_counter()
                metrics = self.train_step(group)
                busy = gpu_utilisation(self.device) if sample_gpu else None
                sample_gpu = busy is not None
                window.add(metrics, sum(m.num_samples for m in group), started - waited, time.perf_counter() - waited,
                           busy)  # fmt: skip
                final = self.state.step >= self.total_steps
                epoch_done = self.state.batches_in_epoch >= self.steps_per_epoch * accum
                if epoch_done and self.state.trained_in_epoch == 0:  # the whole epoch, a resumed one's part too
                    raise nothing_trained(self.state.epoch, {reason: count - dropped_before.get(reason, 0)
                                                             for reason, count in self.state.dropped.items()})
                if epoch_done:  # move the data position before a checkpoint so a restore starts the next epoch
                    self.state.epoch += 1
                    self.state.batches_in_epoch = self.state.trained_in_epoch = 0
                if on_log and (self.state.step % self.loop_cfg.log_every == 0 or final):
                    last = mean_across_ranks(window.summary(self.lr))
                    on_log(self.state.step, last)
                    window = _Window()
                if on_checkpoint and (self.state.step % self.loop_cfg.checkpoint_every == 0 or final):
                    on_checkpoint(self, final)
                if epoch_done:
                    break
        return last

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The whole loop state; collective (gathers every rank's RNG and dropped counts)."""
        per_rank = gather_objects({"rng": rng_state(), "dropped": dict(self.state.dropped),
                                   "samples_seen": self.state.samples_seen,
                                   "trained_in_epoch": self.state.trained_in_epoch})
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": self.optim_cfg.schedule, "lr": self.lr},  # the schedule is a function of step
            "loop": asdict(self.state),
            "per_rank": per_rank,
            "steps_per_epoch": self.steps_per_epoch,
            "data_order": self.data_order,
        }

    def load_state_dict(self, state: dict[str, Any], count_restart: bool = True) -> None:
        rank, world = world_info()
        saved = LoopState(**state["loop"])
        if saved.world_size != world:
            raise ValueError(
                f"checkpoint was written by {saved.world_size} workers, this run has {world}: resuming needs the "
                "same number of workers (the data position is per rank)"
            )
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"checkpoint has {state['steps_per_epoch']} steps per epoch, this run plans {self.steps_per_epoch}: "
                "the dataset or batch size changed"
            )
        saved_order = state.get("data_order")  # None: an older checkpoint, or a loop without a data plan
        if saved_order and self.data_order and saved_order != self.data_order:
            changed = ", ".join(f"{key} {saved_order.get(key)} -> {value}" for key, value in self.data_order.items()
                                if saved_order.get(key) != value)  # fmt: skip
            raise ValueError(f"the data order changed since the checkpoint ({changed}): its position in the epoch "
                             "would stand for other samples (some trained twice, others skipped); resume with the "
                             "settings it was written with, or start a new run (another --name)")  # fmt: skip
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        mine = state["per_rank"][rank]
        saved.dropped = dict(mine["dropped"])
        saved.samples_seen = mine["samples_seen"]
        saved.trained_in_epoch = mine.get("trained_in_epoch", -1)  # an older checkpoint: not known, not checked
        saved.restarts += int(count_restart)
        self.state = saved
        set_rng_state(mine["rng"])

    def save(self, path: str) -> None:
        """Write the loop state to `path` (a file); every rank must call, only rank 0 writes."""
        state = self.state_dict()
        if world_info()[0] == 0:
            torch.save(state, path)

    def load(self, path: str, count_restart: bool = True) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False), count_restart)


class _Window:
    """Metrics averaged over the steps between two logs, plus throughput, data-wait fraction and GPU busy."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.samples = 0
        self.wait = 0.0
        self.total = 0.0
        self.gpu_readings: list[float] = []

    def add(
        self, metrics: dict[str, float], samples: int, wait: float, total: float, gpu_busy: float | None = None
    ) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.samples += samples
        self.wait += wait
        self.total += total
        if gpu_busy is not None:
            self.gpu_readings.append(gpu_busy)

    def summary(self, lr: float) -> dict[str, float]:
        out = {key: value / max(self.steps, 1) for key, value in self.sums.items()}
        out["lr"] = lr
        out["samples_per_s"] = self.samples / self.total if self.total > 0 else 0.0
        out["data_wait_fraction"] = self.wait / self.total if self.total > 0 else 0.0
        if self.gpu_readings:  # absent (not 0) on CPU and where NVML cannot be read
            out["gpu_utilisation"] = sum(self.gpu_readings) / len(self.gpu_readings)
        return out


def gpu_utilisation(device: torch.device) -> float | None:
    """NVML's percent busy of `device` (time with a kernel running) over the driver's last sample period.

    The loop reads it once per optimiser step and averages the readings over the logging window: one reading at
    log time would describe only the last 1/6 s to 1 s (the period depends on the GPU), not the window. A
    step longer than that period is seen only through its tail, so data waits at a step's start may be
    under-counted (`data_wait_fraction` measures them directly). A reading is a few NVML calls, small beside a
    GPU step; readings stop for the run after the first failure.
    None on CPU, without nvidia-ml-py (pynvml), or where NVML refuses (e.g. a container without access).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        return float(torch.cuda.utilization(device))  # maps CUDA_VISIBLE_DEVICES (set by Ray) to NVML's index
    except Exception:  # noqa: BLE001 - pynvml missing, no driver access, ...: leave the metric out
        return None


def finite_on_every_rank(losses: list[torch.Tensor]) -> torch.Tensor:
    """1.0 when every loss of every rank is finite, else 0.0 (a device scalar). The gradients were averaged
    across ranks, so all ranks must stop together when any one of them saw a NaN."""
    finite = torch.isfinite(torch.stack(losses).float()).all().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite


def to_host(metrics: dict[str, Any], flag: torch.Tensor) -> tuple[dict[str, float], bool]:
    """`metrics` as floats and `flag` as a bool, with one transfer for every tensor among them."""
    names = [name for name, value in metrics.items() if isinstance(value, torch.Tensor)]
    stacked = torch.stack([flag.float().reshape(()),
                           *(metrics[n].detach().float().reshape(()).to(flag.device) for n in names)])
    flag_value, *values = stacked.tolist()
    on_device = dict(zip(names, values))
    return {name: float(on_device.get(name, value)) for name, value in metrics.items()}, bool(flag_value)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
