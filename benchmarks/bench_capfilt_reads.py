"""CapFilt's reads of remote input shards: through the node's shard cache (`compute.shard_cache_dir`) vs directly.

Each input shard is read twice in a CapFilt run: by its decode task (JPEG decode + resize for the models) and by
its writer task (the images streamed into the output tar). From a bucket, directly, that is every shard downloaded
twice; with the cache the decode task downloads it once into the node's cache and the writer task, placed on the
same node, reads the local copy (and removes it). A third side times the cache as it was first built: the decode
task downloaded the whole shard before decoding any of it (`node_cache_whole_first`); now it decodes while the shard
downloads (`ShardCache.open_streaming`; `streaming_wall_ratio`). Each side here runs the two real functions the
Ray tasks run (`_ray_capfilt.decode_shard`, then `capfilt.finish_shard` with generated model results) for every
shard, in `--procs` worker processes (a node's task slots), over the same shards served by an HTTP server on
127.0.0.1 that answers range requests as a store does, adds `--latency-ms` to every request and sends at most `--link-mib-s`
MiB/s over all connections. The figures: bytes the server sent (the store's egress), requests, wall time (each
side's fastest of `--runs`, the sides alternating, after every process has done its imports). All sides must write
the same output shards (sha256). Prints one JSON object.
`python benchmarks/bench_capfilt_reads.py` (~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=250, help="samples per shard")
    parser.add_argument("--jpeg-kib", type=int, default=60, help="approximate size of each stored JPEG")
    parser.add_argument("--image-size", type=int, default=384, help="the models' input size (BLIP-base captioning)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model batch (the 129M preset: 64)")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="task processes of the node")
    parser.add_argument("--runs", type=int, default=2, help="runs of each side, alternating; the fastest counts")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every request")
    parser.add_argument("--link-mib-s", type=float, default=100.0, help="the store's bandwidth to the node, MiB/s")
    return parser.parse_args(argv)


def decode_and_write(shard: Any, results: list[dict[str, Any]], work: str, cache: tuple[str, int] | None,
                     image_size: int, batch_size: int, whole_first: bool = False) -> dict[str, Any]:  # fmt: skip
    """What one shard costs a node: its decode task, then its writer task (the models' work left out).
    `whole_first`: the decode task downloads the shard whole into the cache before decoding (the design before
    `ShardCache.open_streaming`), instead of decoding while it downloads."""
    import numpy as np

    from pipelines.tasks import _ray_capfilt, capfilt
    from pipelines.tasks.shard_cache import ShardCache

    if whole_first and cache is not None:
        ShardCache.from_setting(cache, "compute").open(shard.url, shard.bytes).close()
    [item] = capfilt.decode_items([shard])
    batch = {name: np.array([value]) for name, value in item.items()}
    images = sum(len(json.loads(row["meta"][0])["keys"])
                 for row in _ray_capfilt.decode_shard(batch, image_size, batch_size, cache))  # fmt: skip
    compute = capfilt.ComputeConfig(shard_cache_dir=cache[0], shard_cache_gb=cache[1] / 2**30) if cache else None
    config = capfilt.CapFiltConfig(compute=compute or capfilt.ComputeConfig())
    marker = capfilt.finish_shard(work, shard, results, config, {"captioner": "captioner@v1", "filter": "filter@v1"})
    return {"images": images, "sha256": marker["sha256"]}


def warm_up(url: str) -> None:
    """What a task sets up once a process — imports, fsspec's HTTP client and its event loop, PIL's plugins,
    pyarrow — done before timing (the side that ran first paid ~0.7 s of it), holding the process a moment so that
    every process of the pool is started."""
    import fsspec
    from PIL import Image

    from datasets_manifests import index  # noqa: F401 - pyarrow, for the writer's index parts
    from pipelines.tasks import _ray_capfilt, capfilt  # noqa: F401

    with fsspec.open(url, "rb") as handle:
        handle.read(1)
    Image.init()
    time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import dataclasses

    from bench_capfilt_writer import build_shards  # benchmarks/ is the script's directory

    from tests.http_files import serve_files

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-capfilt-reads-") as tmp:
        directory = Path(tmp)
        plans, results = build_shards(directory / "store", args)
        (directory / "store/warm-up").write_bytes(b"x")
        data_bytes = sum((directory / "store" / plan.path).stat().st_size for plan in plans)
        report_sides = {}
        with serve_files(directory / "store", args.latency_ms / 1000, args.link_mib_s * 2**20) as served:
            remote = [dataclasses.replace(plan, url=f"{served.url}/{plan.path}",
                                          bytes=(directory / "store" / plan.path).stat().st_size) for plan in plans]
            with ProcessPoolExecutor(args.procs) as pool:
                list(pool.map(warm_up, [f"{served.url}/warm-up"] * args.procs))
                for run in range(args.runs):  # the sides alternate; each side's fastest run is reported
                    for side in ("direct", "node_cache_whole_first", "node_cache"):
                        served.clear()
                        cache = (str(directory / "cache"), 8 << 30) if side != "direct" else None
                        began = time.perf_counter()
                        count = len(plans)
                        outputs = list(pool.map(decode_and_write, remote, [results[p.index] for p in plans],
                                                [str(directory / f"{side}-{run}")] * count, [cache] * count,
                                                [args.image_size] * count, [args.batch_size] * count,
                                                [side == "node_cache_whole_first"] * count))  # fmt: skip
                        wall = time.perf_counter() - began
                        sent, requests = served.totals()
                        if side in report_sides and report_sides[side]["wall_s"] <= wall:
                            continue
                        report_sides[side] = {"wall_s": round(wall, 2),
                                              "images_per_s": round(sum(o["images"] for o in outputs) / wall, 1),
                                              "store_sent_mib": round(sent / 2**20, 1),
                                              "requests": requests,
                                              "sha256": [o["sha256"] for o in outputs]}  # fmt: skip
        left_in_cache = [p.name for p in (directory / "cache").iterdir() if p.name != "locks"]
    old, whole, new = (report_sides[side] for side in ("direct", "node_cache_whole_first", "node_cache"))
    report = {
        "benchmark": "capfilt_reads", "host_cpus": os.cpu_count(), "procs": args.procs,
        "images": args.shards * args.per_shard, "data_mib": round(data_bytes / 2**20, 1),
        "latency_ms": args.latency_ms, "link_mib_s": args.link_mib_s,
        "same_output_shards": old.pop("sha256") == new.pop("sha256") == whole.pop("sha256"),
        "cache_left_after_writes": len(left_in_cache),
        "direct": old, "node_cache_whole_first": whole, "node_cache": new,
        "store_bytes_ratio": round(old["store_sent_mib"] / max(new["store_sent_mib"], 0.1), 2),
        "wall_ratio": round(old["wall_s"] / new["wall_s"], 2),
        "streaming_wall_ratio": round(whole["wall_s"] / new["wall_s"], 2),  # decoding while the shard downloads
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
