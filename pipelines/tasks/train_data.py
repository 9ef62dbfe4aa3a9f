"""Streaming training input from a dataset version's webdataset shards, split exactly across ranks.

Shards are tars of `{key}.jpg`, `{key}.txt`, `{key}.json` (the shard stage's format) on any fsspec URL; they
are read sequentially, never materialised. The epoch plan (open_clip / webdataset practice, made exact):

- Each epoch the shard order is shuffled with (seed, epoch); the shards' samples, concatenated in that
  order, form the epoch's global sequence of N positions (counts from the manifest).
- drop_last: only the first `steps_per_epoch * W * B * A` positions are used (W workers, micro-batch B,
  grad accumulation A), so every rank makes the same number of optimiser steps; at most W*B*A - 1 samples
  per epoch are left out, and which ones changes with the epoch's shard order.
- Rank r takes the contiguous slice [r*n, (r+1)*n) of that sequence (n positions per rank): ranks read
  disjoint parts of the data, so one epoch sees every kept sample exactly once, whether there are more
  shards than ranks or fewer (a shard can be split between ranks at sample level).
- Within a rank, a seeded shuffle buffer mixes samples; micro-batch j is outputs [j*B, (j+1)*B).
- Resume: skipping the first k micro-batches replays the raw stream (no image decoding) and drops its first
  k*B outputs, so the restarted rank continues with exactly the samples it had not yet trained on.
- Augmentation of output k is seeded with (seed, epoch, rank, k): identical across restarts and across any
  number of DataLoader worker processes (worker w makes micro-batches j = k0 + w, k0 + w + W', ...).
- `resampled=True` (huge sets): each rank draws shards with replacement for n positions per epoch; samples
  may repeat within an epoch (webdataset's `resampled=True` semantics), but restarts still resume exactly.

A sample that cannot be read or decoded is dropped and counted by reason, never fatal; positions stay fixed,
so a short micro-batch is the only effect.
"""

from __future__ import annotations

import hashlib
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch.utils.data

from pipelines.tasks.train_loop import MicroBatch, TrainTask
from pipelines.tasks.webdata import group_tar


class DropSample(ValueError):
    """Raised by a task's `decode` to drop a sample with a named reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ShardRef:
    url: str  # local path or fsspec URL of a webdataset tar
    num_samples: int  # from the manifest


@dataclass(frozen=True, slots=True)
class DataPlan:
    """How an epoch's samples are divided among ranks and micro-batches (see module docstring)."""

    shards: tuple[ShardRef, ...]
    world_size: int
    batch_size: int  # per-rank micro-batch
    grad_accum: int = 1
    seed: int = 42
    shuffle_buffer: int = 0  # samples held for within-rank shuffling (0 = shard order only)
    resampled: bool = False

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def samples_per_rank(self) -> int:
        return self.steps_per_epoch * self.batch_size * self.grad_accum

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_samples - self.steps_per_epoch * self.global_batch

    def segments(self, epoch: int, rank: int) -> list[tuple[ShardRef, int, int]]:
        """(shard, first sample, end sample) pieces this rank reads in `epoch`, in order."""
        need = self.samples_per_rank
        if self.resampled:
            rng = random.Random(f"resample/{self.seed}/{epoch}/{rank}")
            pieces = []
            while need > 0:
                shard = rng.choice(self.shards)
                take = min(need, shard.num_samples)
                if take:
                    pieces.append((shard, 0, take))
                need -= take
            return pieces
        order = list(self.shards)
        random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        begin, end = rank * need, (rank + 1) * need
        pieces, offset = [], 0
        for shard in order:
            low, high = max(begin, offset), min(end, offset + shard.num_samples)
            if low < high:
                pieces.append((shard, low - offset, high - offset))
            offset += shard.num_samples
        return pieces


# ---------------------------------------------------------------------------------------------- raw reading


def iter_tar_samples(url: str, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples number `start` .. `stop`-1 of a webdataset tar, streamed; earlier samples are not read out.

    Each sample is {"__key__": key, ext: bytes, ...}. Raises OSError/tarfile.ReadError on a broken tar.
    """
    import fsspec

    with fsspec.open(url, "rb") as handle:
        for sample in group_tar(handle, start, stop):
            yield {"__key__": sample.key, **sample.members}


def iter_positions(pieces: list[tuple[ShardRef, int, int]]) -> Iterator[dict[str, Any] | str]:
    """One item per planned position: a raw sample, or the reason it is missing (positions never shift)."""
    for shard, start, stop in pieces:
        produced = 0
        reason = "missing_from_shard"
        try:
            for sample in iter_tar_samples(shard.url, start, stop):
                produced += 1
                yield sample
        except (OSError, tarfile.TarError, EOFError):
            reason = "unreadable_shard"
        for _ in range(stop - start - produced):
            yield reason


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer (webdataset `shuffle(size)`); size <= 1 keeps the order."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def sample_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------- micro-batches


def decode_batch(task: TrainTask, raws: list[Any], seeds: list[int], spare: list[dict[str, Any]] | None = None) -> MicroBatch:
    """Decode and collate one micro-batch; dropped samples are counted by reason.

    A task with `fixed_batch_size = True` (its model all-gathers across ranks) gets short micro-batches filled
    back to full size with repeats of the valid samples, or of `spare` (the last good sample of this stream)
    when none is valid; those repeats are counted as "refilled".
    """
    samples, dropped = [], {}
    for raw, seed in zip(raws, seeds):
        if isinstance(raw, str):  # a missing position carries its reason
            dropped[raw] = dropped.get(raw, 0) + 1
            continue
        try:
            samples.append(task.decode(raw, seed))
        except DropSample as error:
            dropped[error.reason] = dropped.get(error.reason, 0) + 1
        except Exception:  # noqa: BLE001 - any undecodable sample is dropped and counted, never fatal
            dropped["corrupt_sample"] = dropped.get("corrupt_sample", 0) + 1
    trained = len(samples)
    if spare is not None and samples:
        spare[:] = samples[-1:]
    if getattr(task, "fixed_batch_size", False) and trained < len(raws):
        pool = samples or list(spare or [])
        if pool:
            samples = samples + [pool[i % len(pool)] for i in range(len(raws) - trained)]
            dropped["refilled"] = dropped.get("refilled", 0) + len(raws) - trained
    if len(samples) < max(1, getattr(task, "min_batch_size", 1)):
        if samples:
            dropped["batch_too_small"] = dropped.get("batch_too_small", 0) + trained
        return MicroBatch(batch=None, num_samples=0, dropped=dropped)
    return MicroBatch(batch=task.collate(samples), num_samples=trained, dropped=dropped)


class RankStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches for one epoch, from micro-batch `skip` on."""

    def __init__(self, plan: DataPlan, task: TrainTask, rank: int, epoch: int, skip: int = 0) -> None:
        self.plan, self.task, self.rank, self.epoch, self.skip = plan, task, rank, epoch, skip

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.plan.grad_accum - self.skip

    def __iter__(self) -> Iterator[MicroBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan, size = self.plan, self.plan.batch_size
        rng = random.Random(f"buffer/{plan.seed}/{self.epoch}/{self.rank}")
        stream = shuffled(iter_positions(plan.segments(self.epoch, self.rank)), plan.shuffle_buffer, rng)
        raws, batch_index, spare = [], 0, []
        for index, raw in enumerate(stream):
            if index >= plan.samples_per_rank:
                break
            batch_index = index // size
            mine = batch_index >= self.skip and (batch_index - self.skip) % workers == worker
            if mine:
                raws.append(raw)
            if index % size == size - 1 and raws:
                seeds = [sample_seed(plan.seed, self.epoch, self.rank, batch_index * size + i) for i in range(size)]
                yield decode_batch(self.task, raws, seeds, spare)
                raws = []


def _identity(item: Any) -> Any:
    return item


def epoch_loader(plan: DataPlan, task: TrainTask, rank: int, epoch: int, skip: int, num_workers: int = 0,
                 pin_memory: bool = False) -> Any:
    """A DataLoader over `RankStream`: `num_workers` processes decode and augment in parallel, in order."""
    # A private generator: creating a DataLoader iterator otherwise draws its base seed from the global torch
    # RNG, so a resumed run (one extra iterator) would sample different ITM negatives than an uninterrupted one.
    generator = torch.Generator().manual_seed(sample_seed(plan.seed, epoch, rank, -1))
    return torch.utils.data.DataLoader(
        RankStream(plan, task, rank, epoch, skip), batch_size=None, num_workers=num_workers, collate_fn=_identity,
        pin_memory=pin_memory, prefetch_factor=4 if num_workers else None, persistent_workers=False,
        generator=generator,
    )


def shards_of(registry: Any, manifest: Any, split: str = "train") -> tuple[ShardRef, ...]:
    """The shards of one split of a dataset version, with their sample counts."""
    entries = manifest.shards(split)
    if not entries:
        splits = sorted({e.split for e in manifest.shards()})
        raise ValueError(f"{manifest.ref} has no '{split}' shards (splits: {', '.join(map(str, splits)) or 'none'})")
    missing = [e.path for e in entries if not e.num_samples and e.num_samples != 0]
    if missing:
        raise ValueError(f"{manifest.ref}: shard {missing[0]} has no num_samples in the manifest")
    return tuple(ShardRef(registry.url_of(manifest, e.path), int(e.num_samples)) for e in entries)


def write_scene_shards(root: str | Path, num_shards: int, per_shard: int, image_size: int = 32, seed: int = 0,
                       corrupt: tuple[int, ...] = (), split: str = "train") -> list[tuple[str, int]]:
    """Synthetic training shards in the shard stage's format (tests, benchmarks, demo): rendered shape scenes
    with their true captions (demo_corpus), `corrupt` sample numbers get undecodable JPEG bytes.

    Returns [(relative shard path, samples)].
    """
    import io
    import json

    from pipelines.tasks.demo_corpus import random_scene, render, true_caption
    from pipelines.tasks.webdata import TarShardWriter

    rng = random.Random(seed)
    with TarShardWriter(root, split, per_shard) as writer:
        for number in range(num_shards * per_shard):
            scene = random_scene(rng)
            buffer = io.BytesIO()
            render(scene, image_size).save(buffer, format="JPEG", quality=90)
            image = b"\xff\xd8 not a jpeg" if number in corrupt else buffer.getvalue()
            caption = true_caption(scene)
            meta = {"key": f"{number:08d}", "caption": caption}
            writer.write(f"{number:08d}", {"jpg": image, "txt": caption.encode(), "json": json.dumps(meta).encode()})
    return writer.shards
