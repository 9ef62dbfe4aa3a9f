"""CapFilt's shard writing: Ray writer tasks (`_ray_capfilt.ShardWriters`) vs the driver's thread pool.

Each finished input shard is written once: the input tar streamed again into the output tar with the
per-sample json/txt, its index and texts parts, its marker. Before this design the driver did that itself
in a thread pool (`capfilt.finish_shard` in `compute.writer_threads` threads): the baseline here, run side by
side on the same shards and the same (generated) model results. Both write the same bytes (checked). The writer tasks are timed on a second round, their worker processes started (as
through a long run); the first round's wall time is reported beside it.

What matters at 129M images is less the local wall time than where the bytes go: `driver_cpu_s` is the CPU
time the driver process spent (all its threads), which on a cluster is the one process every shard passed
through; with writer tasks it only submits. `publish_rehash_s` is the time a publish that re-reads every
output shard to hash it would add on the driver (the writers now hash while writing).

Inputs: `--shards` tars of `--per-shard` samples with ~`--jpeg-kib` KiB JPEGs (web-like size; the images are a
few distinct noise JPEGs repeated: writing does not look at pixels). Prints one JSON object.
`python benchmarks/bench_capfilt_writer.py` (~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--jpeg-kib", type=int, default=60, help="approximate size of each stored JPEG")
    parser.add_argument("--threads", type=int, default=2, help="baseline: driver writer threads (the old default)")
    parser.add_argument("--writer-cpus", type=float, default=1.0,
                        help="ours: CPUs per writer task (1.0: as many writers as cores, like the baseline's threads)")
    return parser.parse_args(argv)


def noise_jpegs(width: int, height: int, count: int = 4, quality: int = 75) -> list[bytes]:
    """A few noise JPEGs of `width` x `height` px (noise compresses badly: ~0.75 bytes per pixel at quality 75)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


def side_for_kib(kib: int) -> int:
    """The side of a square quality-75 noise JPEG of about `kib` KiB."""
    return max(16, int((kib * 1024 / 0.75) ** 0.5))


def build_shards(root: Path, args: argparse.Namespace) -> tuple[list[Any], dict[int, list[dict[str, Any]]]]:
    """Input shards in the shard stage's format, their ShardPlans, and one CapFilt result per sample."""
    from pipelines.tasks.capfilt import ShardPlan
    from pipelines.tasks.webdata import write_tar

    side = side_for_kib(args.jpeg_kib)
    jpegs = noise_jpegs(side, side)
    plans, results = [], {}
    for shard in range(args.shards):
        path = f"shards/train-{shard:06d}.tar"
        rows, members = [], []
        for position in range(args.per_shard):
            key = f"{shard * args.per_shard + position:09d}"
            jpg = jpegs[position % len(jpegs)]
            meta = {"key": key, "url": f"http://127.0.0.1/{key}.jpg", "raw_caption": "a red circle",
                    "image_sha256": hashlib.sha256(jpg).hexdigest(), "width": 1, "height": 1}  # fmt: skip
            members += [(f"{key}.jpg", jpg), (f"{key}.txt", b"a red circle"), (f"{key}.json", json.dumps(meta).encode())]
            score = (position % 10) / 10  # some texts kept, some dropped: both branches of build_sample
            rows.append({"key": key, "web_text": "a red circle", "error": None, "synthetic": ["a red square"],
                         "scores": [score, 1 - score], "seeds": [position]})  # fmt: skip
        write_tar(root / path, members)
        plans.append(ShardPlan(shard, path, str(root / path), "train", args.per_shard))
        results[shard] = rows
    return plans, results


def timed(write: Any) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    write()
    return {"wall_s": time.perf_counter() - wall, "driver_cpu_s": time.process_time() - cpu}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from concurrent.futures import ThreadPoolExecutor

    from datasets_manifests.filesystems import sha256_file
    from pipelines.runtime import ensure_ray
    from pipelines.tasks import _ray_capfilt
    from pipelines.tasks.capfilt import CapFiltConfig, ComputeConfig, finish_shard

    ray = ensure_ray(num_cpus=os.cpu_count())
    config = CapFiltConfig(compute=ComputeConfig(writer_cpus=args.writer_cpus))
    refs = {"captioner": "captioner@v1", "filter": "filter@v1"}
    root = Path(tempfile.mkdtemp(prefix="bench-capfilt-writer-"))
    try:
        plans, results = build_shards(root / "input", args)
        ray.get(ray.remote(lambda: None).options(num_cpus=args.writer_cpus).remote())  # a worker up before timing

        def threads() -> None:
            with ThreadPoolExecutor(args.threads) as pool:
                for future in [pool.submit(finish_shard, str(root / "threads"), plan, results[plan.index], config, refs)
                               for plan in plans]:  # fmt: skip
                    future.result()

        def tasks() -> None:
            writers = _ray_capfilt.ShardWriters(config, str(root / "tasks"), refs)
            for plan in plans:
                writers.submit(plan, results[plan.index])
            writers.finish()

        # Round 1 with cold worker processes (each writer task's first import), round 2 warm, as in a long run.
        cold = timed(tasks)
        shutil.rmtree(root / "tasks")
        baseline, ours = timed(threads), timed(tasks)
        outputs = [plan.path for plan in plans]
        same = all((root / "threads" / p).read_bytes() == (root / "tasks" / p).read_bytes() for p in outputs)
        began = time.perf_counter()
        output_bytes = sum(sha256_file(root / "tasks" / p)[1] for p in outputs)
        rehash = time.perf_counter() - began
    finally:
        shutil.rmtree(root, ignore_errors=True)
    images = args.shards * args.per_shard
    report = {
        "benchmark": "capfilt_shard_writer", "host_cpus": os.cpu_count(), "shards": args.shards, "images": images,
        "output_mib": round(output_bytes / 2**20, 1), "same_bytes": same,
        "driver_thread_pool": {"threads": args.threads, **{k: round(v, 3) for k, v in baseline.items()},
                               "images_per_s": round(images / baseline["wall_s"], 1)},
        "ray_writer_tasks": {"writer_cpus": args.writer_cpus, **{k: round(v, 3) for k, v in ours.items()},
                             "images_per_s": round(images / ours["wall_s"], 1),
                             "first_round_wall_s": round(cold["wall_s"], 3)},
        "wall_ratio": round(baseline["wall_s"] / ours["wall_s"], 2),
        "driver_cpu_ratio": round(baseline["driver_cpu_s"] / max(ours["driver_cpu_s"], 1e-9), 1),
        "publish_rehash_s": round(rehash, 3),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
