"""The shard stage (raw download shards -> training shards): both passes in worker processes vs one process.

`run_shard` on the same raw version twice, side by side: pass 1 (decode check of every image, caption
normalisation, sha256) and pass 2 (each output shard read back by offset and written) spread over one process
per core (at most one per `SCAN_BYTES_PER_PROCESS` / `WRITE_BYTES_PER_PROCESS` of data; the stage's defaults),
and the same stage in one process (the loop before). Both publish the same files (checked by sha256).

Inputs: `--shards` raw shards in the download stage's format of `--per-shard` noise JPEGs of `--side` px
(web images as img2dataset stores them: 384 px on the long side). Prints one JSON object.
`python benchmarks/bench_shard.py` (~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
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

from bench_capfilt_writer import noise_jpegs  # noqa: E402  (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--side", type=int, default=384)
    return parser.parse_args(argv)


def publish_raw(registry: Any, root: Path, args: argparse.Namespace) -> Any:
    """A raw version: tars of {key}.jpg/.txt/.json as the download stage publishes them."""
    from datasets_manifests.manifest import Producer
    from pipelines.tasks.webdata import write_tar

    jpegs = noise_jpegs(args.side, args.side * 3 // 4, count=8, quality=60)
    files = []
    for shard in range(args.shards):
        path = f"raw/{shard:05d}.tar"
        members = []
        for position in range(args.per_shard):
            row = shard * args.per_shard + position
            key = f"{shard:05d}{position:04d}"
            # Distinct bytes per sample (the image dedup must keep them): the JPEG comment differs.
            jpg = jpegs[row % len(jpegs)][:2] + b"\xff\xfe\x00\x0a" + row.to_bytes(8, "big") + jpegs[row % len(jpegs)][2:]
            meta = {"source_key": f"s{row:08d}", "url": f"http://127.0.0.1/{row}.jpg"}
            members += [(f"{key}.jpg", jpg), (f"{key}.txt", f"A photo of thing {row}".encode()),
                        (f"{key}.json", json.dumps(meta).encode())]  # fmt: skip
        write_tar(root / path, members)
        files.append({"path": path, "role": "shard", "num_samples": args.per_shard})
    return registry.publish(kind="dataset", name="raw-bench", staging_dir=root, files=files,
                            producer=Producer(stage="bench"))  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from datasets_manifests.registry import Registry
    from pipelines.tasks import shard
    from pipelines.tasks.shard import ShardConfig, run_shard

    root = Path(tempfile.mkdtemp(prefix="bench-shard-"))
    try:
        registry = Registry(root / "registry")
        raw = publish_raw(registry, root / "staging", args)
        raw_bytes = sum(entry.bytes for entry in raw.shards())
        cfg = ShardConfig(samples_per_shard=1000)
        timings, outputs = {}, {}
        defaults = (shard.SCAN_BYTES_PER_PROCESS, shard.WRITE_BYTES_PER_PROCESS)
        for label, per_process in (("one_process", (1 << 62, 1 << 62)), ("worker_processes", defaults)):
            shard.SCAN_BYTES_PER_PROCESS, shard.WRITE_BYTES_PER_PROCESS = per_process
            began = time.perf_counter()
            manifest = run_shard(cfg, raw, name=f"train-{label.replace('_', '-')}", registry=registry)
            timings[label] = time.perf_counter() - began
            outputs[label] = [(entry.path, entry.sha256) for entry in manifest.files if entry.role == "shard"]
        shard.SCAN_BYTES_PER_PROCESS, shard.WRITE_BYTES_PER_PROCESS = defaults
    finally:
        shutil.rmtree(root, ignore_errors=True)
    images = args.shards * args.per_shard
    from pipelines.runtime import process_count

    report = {
        "benchmark": "shard_stage", "host_cpus": os.cpu_count(), "raw_shards": args.shards, "images": images,
        "raw_mib": round(raw_bytes / 2**20, 1), "image_px": [args.side, args.side * 3 // 4],
        "same_shards": outputs["one_process"] == outputs["worker_processes"],
        "one_process": {"wall_s": round(timings["one_process"], 3),
                        "images_per_s": round(images / timings["one_process"], 1)},
        "worker_processes": {"scan_workers": process_count(raw_bytes, defaults[0], args.shards),
                             "wall_s": round(timings["worker_processes"], 3),
                             "images_per_s": round(images / timings["worker_processes"], 1)},
        "ratio": round(timings["one_process"] / timings["worker_processes"], 2),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
