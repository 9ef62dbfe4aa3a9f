"""A training rank reading remote shards with several DataLoader workers: through the node's shard cache
(`pipelines/tasks/shard_cache.py`: one download a shard, every worker reads the local copy) vs each worker
opening the shards itself (fsspec, read-ahead blocks), on the same shards and the same micro-batches.

The shards (`--shards` x `--per-shard` samples of `--sample-kib` KiB of incompressible bytes: nothing is decoded,
this times the input alone) are served by an HTTP server on 127.0.0.1 that answers range requests as an object
store does, adds `--latency-ms` to every request, and sends at most `--link-mib-s` MiB/s over all connections
together (the rank's share of its node's link to the store). Each side runs one epoch of the rank through
`train_data.epoch_loader` with `--workers` worker processes, the cache side into an empty cache directory. The
figures: bytes the server sent (the store's egress), requests, and the epoch's wall time. Both sides must make the
same micro-batches (a digest of their keys). Prints one JSON object.
`python benchmarks/bench_shard_cache.py` (~30 s on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--per-shard", type=int, default=400, help="samples per shard")
    parser.add_argument("--sample-kib", type=int, default=60, help="bytes of each sample's .jpg, in KiB")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="samples")
    parser.add_argument("--batch-size", type=int, default=75, help="micro-batch (the presets: 75)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the rank (the presets: 10)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every request")
    parser.add_argument("--link-mib-s", type=float, default=300.0, help="the store's bandwidth to the rank, MiB/s")
    return parser.parse_args(argv)


def run_epoch(plan: Any, workers: int, cache: Any) -> dict[str, Any]:
    from bench_rank_stream import KeyTask  # benchmarks/ is the script's directory

    from pipelines.tasks.train_data import epoch_loader

    digest, samples, began = hashlib.sha256(), 0, time.perf_counter()
    for micro in epoch_loader(plan, KeyTask(), 0, epoch=0, skip=0, num_workers=workers, cache=cache):
        digest.update("\n".join(micro.batch).encode())
        samples += micro.num_samples
    return {"epoch_s": time.perf_counter() - began, "samples": samples, "keys_sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench_rank_stream import write_shards

    from pipelines.tasks.shard_cache import ShardCache
    from pipelines.tasks.train_data import DataPlan, ShardRef
    from tests.http_files import serve_files

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-shard-cache-") as tmp:
        directory = Path(tmp)
        paths = [Path(url) for url in write_shards(directory / "store", args)]
        data_bytes = sum(path.stat().st_size for path in paths)
        results = {}
        with serve_files(directory / "store", args.latency_ms / 1000, args.link_mib_s * 2**20) as served:
            shards = tuple(ShardRef(f"{served.url}/{path.relative_to(directory / 'store')}", args.per_shard,
                                    path.stat().st_size) for path in paths)  # fmt: skip
            plan = DataPlan(shards=shards, world_size=1, batch_size=args.batch_size, seed=1,
                            shuffle_buffer=args.shuffle_buffer)  # fmt: skip
            for side in ("each_worker", "node_cache"):
                served.clear()
                cache = ShardCache(str(directory / "cache"), 1 << 40) if side == "node_cache" else None
                results[side] = run_epoch(plan, args.workers, cache)
                results[side]["sent"], results[side]["requests"] = served.totals()
    old, new = results["each_worker"], results["node_cache"]
    report = {
        "benchmark": "shard_cache", "host_cpus": os.cpu_count(), "samples": args.shards * args.per_shard,
        "data_mib": round(data_bytes / 2**20, 1), "workers": args.workers, "shuffle_buffer": args.shuffle_buffer,
        "latency_ms": args.latency_ms, "link_mib_s": args.link_mib_s,
        "same_micro_batches": old["keys_sha256"] == new["keys_sha256"] and old["samples"] == new["samples"],
        **{side: {"epoch_s": round(r["epoch_s"], 2), "store_sent_mib": round(r["sent"] / 2**20, 1),
                  "requests": r["requests"]} for side, r in results.items()},  # fmt: skip
        "store_bytes_ratio": round(old["sent"] / max(new["sent"], 1), 2),
        "epoch_time_ratio": round(old["epoch_s"] / new["epoch_s"], 2),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
