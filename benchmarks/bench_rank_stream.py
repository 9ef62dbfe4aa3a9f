"""A training rank's input with several DataLoader workers: each worker reading only its own micro-batches'
samples (`train_data.RankStream.worker_batches`, positions shuffled before any read) vs every worker reading the
rank's whole stream through the shuffle buffer and keeping its own micro-batches (the reader before), each side
in a fresh process, on the same shards.

The shards hold `--per-shard` samples of `--sample-kib` KiB of incompressible bytes (a web JPEG's size; nothing is
decoded: this times the reading alone, which every worker adds to its decoding). Each side runs the epoch's
`--workers` workers one after the other (their total work; a worker's peak memory is the side's peak), then a
resume at three quarters of the epoch: its time and bytes to the first micro-batch. Bytes read are the read
calls' bytes (`/proc/self/io` rchar): on a local disk or network filesystem the I/O each worker asks for; on
object storage fsspec reads ahead in blocks of several MiB, so skipped samples are still fetched there — a
resume's unopened shards are not. Both sides must make the same micro-batches (a digest of their keys).
Prints one JSON object. `python benchmarks/bench_rank_stream.py` (~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peak_memory import benchmark_main, measure_side, run_sides  # noqa: E402  (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=500, help="samples per shard")
    parser.add_argument("--sample-kib", type=int, default=60, help="bytes of each sample's .jpg, in KiB")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="samples (the presets: one shard's worth)")
    parser.add_argument("--batch-size", type=int, default=75, help="micro-batch (the presets: 75)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the rank")
    parser.add_argument("--side", choices=["whole_stream", "own_samples"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_shards(root: Path, args: argparse.Namespace) -> list[str]:
    from pipelines.tasks.webdata import TarShardWriter

    rng = random.Random(0)
    with TarShardWriter(root, "train", args.per_shard) as writer:
        for number in range(args.shards * args.per_shard):
            key = f"{number:09d}"
            writer.write(key, {"jpg": rng.randbytes(args.sample_kib * 1024), "txt": b"a picture of a dog",
                               "json": json.dumps({"key": key}).encode()})
    return [str(root / path) for path, _ in writer.shards]


class KeyTask:
    """A task that decodes nothing: the micro-batch is its samples' keys (and their bytes are dropped)."""

    def decode(self, raw: dict[str, Any], rng_seed: int) -> dict[str, Any]:
        return {"key": raw["__key__"]}

    def collate(self, samples: list[dict[str, Any]]) -> list[str]:
        return [sample["key"] for sample in samples]


def whole_stream_batches(stream: Any, worker: int, workers: int) -> Iterator[Any]:
    """The reader before: the rank's whole stream, every sample read, through a buffer of the samples themselves;
    the worker keeps micro-batches skip + worker, skip + worker + workers, ..."""
    from pipelines.tasks.train_data import decode_batch, read_positions, sample_seed, shuffled

    plan, size = stream.plan, stream.plan.batch_size
    rng = random.Random(f"buffer/{plan.seed}/{stream.epoch}/{stream.rank}")
    raws = (raw for _, raw in read_positions(plan.segments(stream.epoch, stream.rank), range(plan.samples_per_rank)))
    batch, spare = [], []
    for index, raw in enumerate(shuffled(raws, plan.shuffle_buffer, rng)):
        number = index // size
        if number >= stream.skip and (number - stream.skip) % workers == worker:
            batch.append(raw)
        if index % size == size - 1 and batch:
            seeds = [sample_seed(plan.seed, stream.epoch, stream.rank, number * size + i) for i in range(size)]
            yield decode_batch(stream.task, batch, seeds, spare)
            batch = []


def bytes_read() -> int:
    with open("/proc/self/io") as io_counts:
        return int(next(line for line in io_counts if line.startswith("rchar:")).split()[1])


def child(args: argparse.Namespace) -> None:
    from pipelines.tasks.train_data import DataPlan, RankStream, ShardRef

    directory = Path(args.dir)
    urls = json.loads((directory / "shards.json").read_text())
    plan = DataPlan(shards=tuple(ShardRef(url, args.per_shard) for url in urls), world_size=1,
                    batch_size=args.batch_size, seed=1, shuffle_buffer=args.shuffle_buffer)

    def batches(skip: int, worker: int) -> Iterator[Any]:
        stream = RankStream(plan, KeyTask(), 0, 0, skip)
        if args.side == "own_samples":
            return stream.worker_batches(worker, args.workers)
        return whole_stream_batches(stream, worker, args.workers)

    def work() -> dict[str, Any]:
        digest, samples = hashlib.sha256(), 0
        read_before, began = bytes_read(), time.perf_counter()
        per_worker = []
        for worker in range(args.workers):
            started = time.perf_counter()
            for micro in batches(0, worker):
                digest.update("\n".join(micro.batch).encode())
                samples += micro.num_samples
            per_worker.append(time.perf_counter() - started)
        epoch_s, epoch_bytes = time.perf_counter() - began, bytes_read() - read_before
        skip = plan.steps_per_epoch * 3 // 4
        read_before, began = bytes_read(), time.perf_counter()
        first = next(iter(batches(skip, 0)))
        return {"epoch_s": epoch_s, "epoch_bytes": epoch_bytes, "worker_s": per_worker, "samples": samples,
                "keys_sha256": digest.hexdigest(), "resume_first_batch_s": time.perf_counter() - began,
                "resume_bytes": bytes_read() - read_before, "resume_skip": skip,
                "resume_first_keys": hashlib.sha256("\n".join(first.batch).encode()).hexdigest()}

    measure_side(directory, args.side, work)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sides in fresh processes and print the comparison."""
    options = ["--shards", str(args.shards), "--per-shard", str(args.per_shard), "--sample-kib", str(args.sample_kib),
               "--shuffle-buffer", str(args.shuffle_buffer), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-rank-stream-") as tmp:
        directory = Path(tmp)
        urls = write_shards(directory, args)
        (directory / "shards.json").write_text(json.dumps(urls))
        data_mib = sum(os.path.getsize(url) for url in urls) / 2**20
        results = run_sides(__file__, ("whole_stream", "own_samples"), directory, *options)
    old, new = results["whole_stream"], results["own_samples"]
    sides = {side: {"epoch_s": round(r["epoch_s"], 2), "epoch_read_mib": round(r["epoch_bytes"] / 2**20, 1),
                    "slowest_worker_s": round(max(r["worker_s"]), 2), "peak_mib_per_worker": round(r["peak_mib"], 1),
                    "resume_first_batch_s": round(r["resume_first_batch_s"], 3),
                    "resume_read_mib": round(r["resume_bytes"] / 2**20, 1)} for side, r in results.items()}  # fmt: skip
    report = {
        "benchmark": "rank_stream", "host_cpus": os.cpu_count(), "samples": args.shards * args.per_shard,
        "data_mib": round(data_mib, 1), "workers": args.workers, "shuffle_buffer": args.shuffle_buffer,
        "batch_size": args.batch_size, "resume_at_micro_batch": new["resume_skip"],
        "same_micro_batches": old["keys_sha256"] == new["keys_sha256"] and old["samples"] == new["samples"]
        and old["resume_first_keys"] == new["resume_first_keys"],
        **sides,
        "epoch_read_ratio": round(old["epoch_bytes"] / max(new["epoch_bytes"], 1), 2),
        "epoch_time_ratio": round(old["epoch_s"] / new["epoch_s"], 2),
        "memory_ratio": round(old["peak_mib"] / max(new["peak_mib"], 1e-9), 1),
        "resume_time_ratio": round(old["resume_first_batch_s"] / new["resume_first_batch_s"], 1),
        "resume_read_ratio": round(old["resume_bytes"] / max(new["resume_bytes"], 1), 1),
    }
    print(json.dumps(report, indent=2))
    return report


main = benchmark_main(parse_args, child, report)

if __name__ == "__main__":
    main()
