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
- Within a rank, a seeded shuffle buffer mixes samples (webdataset's `shuffle(size)`); micro-batch j is
  outputs [j*B, (j+1)*B). The buffer's draws depend only on how many items it holds, so the whole epoch's
  order is computed from positions before any sample is read (`output_positions`).
- DataLoader worker w of W' makes micro-batches j = k0 + w, k0 + w + W', ... and reads only their samples:
  shards holding none of them are not opened, the other samples of an opened shard are walked over unread
  (every worker used to read, and hold in its buffer, the rank's whole stream: W' times the I/O).
- Resume: skipping the first k micro-batches starts the same order at micro-batch k; the shards before the
  first sample still to train on are not opened, so the restarted rank continues with exactly the samples it
  had not yet trained on without reading the epoch's beginning again.
- Augmentation of output k is seeded with (seed, epoch, rank, k): identical across restarts and across any
  number of DataLoader worker processes.
- `resampled=True` (huge sets): each rank draws shards with replacement for n positions per epoch; samples
  may repeat within an epoch (webdataset's `resampled=True` semantics), but restarts still resume exactly.
- Remote shards (s3://, gs://, http://) can be read through the node's `ShardCache` (`data.shard_cache_dir`):
  opening a shard there fetches read-ahead blocks, skipped samples included, so without it each worker would
  download every shard it opens.

A sample that cannot be read or decoded is dropped and counted by reason, never fatal; positions stay fixed,
so a short micro-batch is the only effect. Only `UNREADABLE_IN_A_ROW` shards in a row of which nothing could be
read stop the run (`ShardsUnreadable`, naming the last shard and its error): that is the storage failing, and
training on would make every remaining step on nothing (the loop also stops on an epoch in which a rank could
use no sample: `train_loop.NothingTrainedError`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import random
import tarfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Container, Iterator

import numpy as np
import torch.utils.data

from pipelines.tasks.shard_cache import ShardCache
from pipelines.tasks.train_loop import MicroBatch, TrainTask
from pipelines.tasks.webdata import group_tar

log = logging.getLogger(__name__)


class DropSample(ValueError):
    """Raised by a task's `decode` to drop a sample with a named reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ShardRef:
    url: str  # local path or fsspec URL of a webdataset tar
    num_samples: int  # from the manifest
    bytes: int | None = None  # from the manifest: a shard cache refuses a download of another size


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


def iter_tar_samples(url: str, start: int = 0, stop: int | None = None, wanted: Container[int] | None = None,
                     opener: Callable[[str], IO[bytes]] | None = None) -> Iterator[dict[str, Any]]:
    """Samples number `start` .. `stop`-1 of a webdataset tar (only those in `wanted`, when given), streamed; the
    others are not read out. `opener` opens the URL (a `ShardCache`'s; default fsspec).

    Each sample is {"__key__": key, ext: bytes, ...}. Raises OSError/tarfile.ReadError on a broken tar.
    """
    import fsspec

    with (opener(url) if opener else fsspec.open(url, "rb").open()) as handle:
        for sample in group_tar(handle, start, stop, wanted):
            yield {"__key__": sample.key, **sample.members}


class ShardsUnreadable(OSError):
    """So many shards in a row could not be read that their storage, not a shard, is at fault."""


# A shard that cannot be read is skipped and its samples counted; this many in a row (none of their samples read)
# stop the run instead: an unreachable store, expired credentials, a deleted version or a full cache disk would
# otherwise "train" every remaining step on nothing and publish the result.
UNREADABLE_IN_A_ROW = 8


def read_positions(pieces: list[tuple[ShardRef, int, int]], needed: Any,
                   cache: ShardCache | None = None) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(position, raw sample or the reason it is missing) for each of the `needed` positions (ascending) of the
    sequence the pieces make, piece by piece; every needed position comes out once (positions never shift).

    A piece holding no needed position is never opened; in an opened shard, reading starts at the first
    needed sample and stops after the last, and the samples between that are not needed are walked over with
    their data unread. With a `cache`, remote shards are read from the node's copy (downloaded once a node).
    Raises `ShardsUnreadable` after `UNREADABLE_IN_A_ROW` shards in a row gave nothing but an error."""
    first, failed_in_a_row = 0, 0
    for shard, start, stop in pieces:
        low, high = np.searchsorted(needed, [first, first + stop - start])
        if low < high:
            ordinals = (np.asarray(needed[low:high]) - first + start).tolist()
            produced, reason = 0, "missing_from_shard"
            opener = functools.partial(cache.open, size=shard.bytes) if cache else None
            try:  # the wanted samples come in order, and a short or broken tar loses the last ones
                for raw in iter_tar_samples(shard.url, ordinals[0], ordinals[-1] + 1, set(ordinals), opener):
                    yield first + ordinals[produced] - start, raw
                    produced += 1
            except (OSError, tarfile.TarError, EOFError) as error:
                reason = "unreadable_shard"
                failed_in_a_row = failed_in_a_row + 1 if not produced else 0
                if failed_in_a_row >= UNREADABLE_IN_A_ROW:
                    raise ShardsUnreadable(
                        f"{failed_in_a_row} shards in a row could not be read, the last {shard.url}: "
                        f"{type(error).__name__}: {error} — is their storage reachable? (one unreadable shard is "
                        "skipped and its samples counted; this many in a row stop the run)") from error
            else:
                failed_in_a_row = 0
            for ordinal in ordinals[produced:]:
                yield first + ordinal - start, reason
        first += stop - start


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle buffer (webdataset `shuffle(size)`): once `size` items are held, each new item swaps
    with a random one, which is output; at the end the rest is shuffled and output. size <= 1 keeps the order."""
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


def output_positions(count: int, size: int, rng: random.Random) -> Any:
    """The stream position each output of `shuffled` takes, in output order (numpy int64, 8 bytes a position).

    The buffer's draws depend only on how many items it holds, never on the items, so the order of an epoch's
    samples is known from their count before any is read (4M positions, a 129M rank's epoch: ~1.4 s)."""
    return np.fromiter(shuffled(iter(range(count)), size, rng), dtype=np.int64, count=count)


def sample_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------- micro-batches


def decode_batch(task: TrainTask, raws: list[Any], seeds: list[int]) -> MicroBatch:
    """Decode and collate one micro-batch; dropped samples are counted by reason.

    A task with `fixed_batch_size = True` (its model all-gathers across ranks) gets short micro-batches filled
    back to full size with repeats of the valid samples, counted as "refilled". A micro-batch left with no usable
    sample carries placeholder samples instead (`filler_batch`): the loop runs the model on them with a loss that
    counts zero, so that this rank takes part in the step's collectives like the others. The filler depends on
    nothing in the stream, so a resumed run makes the same batches as one that was not stopped.
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
    if getattr(task, "fixed_batch_size", False) and 0 < trained < len(raws):
        samples = samples + [samples[i % trained] for i in range(len(raws) - trained)]
        dropped["refilled"] = dropped.get("refilled", 0) + len(raws) - trained
    batch = None
    if len(samples) < max(1, getattr(task, "min_batch_size", 1)):
        if samples:
            dropped["batch_too_small"] = dropped.get("batch_too_small", 0) + trained
    else:
        try:
            batch = task.collate(samples)
        except ValueError:
            if trained == len(raws):
                raise  # a whole micro-batch that cannot be collated: the config's problem (the error says which)
            # What the drops left cannot form a batch (retrieval: a refilled batch showing one image has no ITM
            # negative): dropped too, and counted.
            dropped["batch_unusable"] = dropped.get("batch_unusable", 0) + trained
    if batch is None:
        return MicroBatch(batch=None, num_samples=0, dropped=dropped, filler=filler_batch(task, len(raws)))
    return MicroBatch(batch=batch, num_samples=trained, dropped=dropped)


FILLER_TEXT = "a picture"
# task -> {batch size: its collated filler}, built once per process (weak: not kept beyond the task's life)
_FILLERS: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


def filler_raw(index: int) -> dict[str, Any]:
    """A placeholder sample every task decodes (black image, a short text; its own image id, so an ITM negative
    exists): what a rank's model runs on when a micro-batch lost every sample."""
    return {"__key__": f"filler-{index}", "jpg": _black_jpeg(), "left.jpg": _black_jpeg(), "right.jpg": _black_jpeg(),
            "json": json.dumps({"caption": FILLER_TEXT, "idx": -1 - index, "image_id": f"filler-{index}",
                                "question": "what is it", "answers": ["nothing"], "weights": [1.0],
                                "sentence": FILLER_TEXT, "label": 0}).encode()}  # fmt: skip


def filler_batch(task: TrainTask, size: int) -> Any:
    """`size` placeholder samples collated (one when the task takes any batch size), built once per process;
    None when the task cannot decode them (a test's task: its loop is never distributed)."""
    size = size if getattr(task, "fixed_batch_size", False) else max(1, getattr(task, "min_batch_size", 1))
    built = _FILLERS.setdefault(task, {})
    if size not in built:
        try:
            built[size] = task.collate([task.decode(filler_raw(i), i) for i in range(size)])
        except Exception:  # noqa: BLE001 - no filler: the loop's zero step (correct in one process)
            built[size] = None
    return built[size]


@functools.cache
def _black_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="JPEG")
    return out.getvalue()


class RankStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches for one epoch, from micro-batch `skip` on (remote shards through `cache`)."""

    def __init__(self, plan: DataPlan, task: TrainTask, rank: int, epoch: int, skip: int = 0,
                 cache: ShardCache | None = None) -> None:  # fmt: skip
        self.plan, self.task, self.rank, self.epoch, self.skip, self.cache = plan, task, rank, epoch, skip, cache

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.plan.grad_accum - self.skip

    def __iter__(self) -> Iterator[MicroBatch]:
        info = torch.utils.data.get_worker_info()
        yield from self.worker_batches(*((info.id, info.num_workers) if info else (0, 1)))

    def worker_batches(self, worker: int, workers: int) -> Iterator[MicroBatch]:
        """Micro-batches skip + worker, skip + worker + workers, ... of the epoch, reading only their samples."""
        plan, size = self.plan, self.plan.batch_size
        rng = random.Random(f"buffer/{plan.seed}/{self.epoch}/{self.rank}")
        order = output_positions(plan.samples_per_rank, plan.shuffle_buffer, rng).reshape(-1, size)
        mine = range(self.skip + worker, len(order), workers)
        if not mine:
            return
        chosen = order[mine.start:mine.stop:mine.step].copy()  # this worker's micro-batches: their positions
        del order
        reader = read_positions(plan.segments(self.epoch, self.rank), np.sort(chosen, axis=None), self.cache)
        pending: dict[int, dict[str, Any] | str] = {}  # read, not yet batched: about shuffle_buffer / workers
        for batch_index, positions in zip(mine, chosen):
            raws = []
            for position in positions.tolist():
                while position not in pending:
                    got, raw = next(reader)
                    pending[got] = raw
                raws.append(pending.pop(position))
            seeds = [sample_seed(plan.seed, self.epoch, self.rank, batch_index * size + i) for i in range(size)]
            yield decode_batch(self.task, raws, seeds)


def _identity(item: Any) -> Any:
    return item


def epoch_loader(plan: DataPlan, task: TrainTask, rank: int, epoch: int, skip: int, num_workers: int = 0,
                 pin_memory: bool = False, cache: ShardCache | None = None) -> Any:
    """A DataLoader over `RankStream`: `num_workers` processes decode and augment in parallel, in order."""
    # A private generator: creating a DataLoader iterator otherwise draws its base seed from the global torch
    # RNG, so a resumed run (one extra iterator) would sample different ITM negatives than an uninterrupted one.
    generator = torch.Generator().manual_seed(sample_seed(plan.seed, epoch, rank, -1))
    return torch.utils.data.DataLoader(
        RankStream(plan, task, rank, epoch, skip, cache), batch_size=None, num_workers=num_workers,
        collate_fn=_identity, pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
        persistent_workers=False, generator=generator,
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
    damaged = list(registry.absent(manifest, entries).values())  # one listing of the version, before any worker starts
    if damaged:
        from datasets_manifests.registry import RegistryError, first_few

        listed = first_few(damaged)
        if len(damaged) == len(entries):
            raise RegistryError(f"{manifest.ref}: none of its {len(entries)} '{split}' shards is intact in "
                                f"{registry.url} ({listed}); `blip data verify {manifest.ref}` checks every file")
        log.warning("%s: %d of its %d '%s' shards are missing or cut short (%s): their samples will be dropped and "
                    "counted (unreadable_shard, missing_from_shard); `blip data verify %s` checks every file",
                    manifest.ref, len(damaged), len(entries), split, listed, manifest.ref)
    return tuple(ShardRef(registry.url_of(manifest, e.path), int(e.num_samples), e.bytes) for e in entries)


def write_scene_shards(root: str | Path, num_shards: int, per_shard: int, image_size: int = 32, seed: int = 0,
                       corrupt: tuple[int, ...] = (), split: str = "train") -> list[tuple[str, int]]:
    """Synthetic training shards in the shard stage's format (tests, benchmarks, demo): rendered shape scenes
    with their true captions (demo_corpus), `corrupt` sample numbers get undecodable JPEG bytes.

    Returns [(relative shard path, samples)].
    """
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
