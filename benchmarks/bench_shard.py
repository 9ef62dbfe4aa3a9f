"""The shard stage (raw download shards -> training shards): both passes in worker processes vs one process.

`run_shard` on the same raw version twice, side by side: pass 1 (decode check of every image, caption
normalisation, sha256) and pass 2 (each output shard read back by offset and written) spread over one process
per core (at most one per `SCAN_BYTES_PER_PROCESS` / `WRITE_BYTES_PER_PROCESS` of data; the stage's defaults),
and the same stage in one process (the loop before). Both publish the same files (checked by sha256).
A third run (worker processes) bounds the raw version's carried CLIP-like score (`source_bounds`, keeping
`--kept-fraction` of the samples): those out of bounds are dropped before their image is decoded.

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
    parser.add_argument("--kept-fraction", type=float, default=0.3, help="share the source_bounds run keeps")
    return parser.parse_args(argv)


def publish_raw(registry: Any, root: Path, args: argparse.Namespace) -> Any:
    """A raw version: tars of {key}.jpg/.txt/.json as the download stage publishes them, and its index with a
    carried `similarity` (a tenth of the samples at each of 0.0, 0.1, ... 0.9)."""
    from datasets_manifests.index import write_index
    from datasets_manifests.manifest import Producer
    from pipelines.tasks.webdata import write_tar

    jpegs = noise_jpegs(args.side, args.side * 3 // 4, count=8, quality=60)
    files, index = [], []
    for shard in range(args.shards):
        path = f"raw/{shard:05d}.tar"
        members = []
        for position in range(args.per_shard):
            row = shard * args.per_shard + position
            key = f"{shard:05d}{position:04d}"
            # Distinct bytes per sample (the image dedup must keep them): the JPEG comment differs.
            jpg = jpegs[row % len(jpegs)][:2] + b"\xff\xfe\x00\x0a" + row.to_bytes(8, "big") + jpegs[row % len(jpegs)][2:]
            meta = {"source_key": f"s{row:08d}", "url": f"http://127.0.0.1/{row}.jpg", "similarity": row % 10 / 10}
            index.append({"key": meta["source_key"], "url": meta["url"], "image_sha256": None, "width": None,
                          "height": None, "caption": None, "raw_caption": None, "caption_source": "web", "split": None,
                          "shard": path, "jpg_offset": None, "jpg_bytes": None, "status": "ok", "drop_reason": None,
                          "similarity": meta["similarity"]})  # fmt: skip
            members += [(f"{key}.jpg", jpg), (f"{key}.txt", f"A photo of thing {row}".encode()),
                        (f"{key}.json", json.dumps(meta).encode())]  # fmt: skip
        write_tar(root / path, members)
        files.append({"path": path, "role": "shard", "num_samples": args.per_shard})
    write_index(index, root / "index.parquet")
    return registry.publish(kind="dataset", name="raw-bench", staging_dir=root, producer=Producer(stage="bench"),
                            files=[*files, {"path": "index.parquet", "role": "index"}],
                            metadata={"source_columns": ["similarity"]})  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from datasets_manifests.registry import Registry
    from pipelines.tasks import shard
    from pipelines.tasks.shard import ShardConfig, SourceBounds, run_shard

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
        bounded_cfg = ShardConfig(samples_per_shard=1000,
                                  source_bounds={"similarity": SourceBounds(min=round(1 - args.kept_fraction, 6))})
        began = time.perf_counter()
        bounded = run_shard(bounded_cfg, raw, name="train-bounded", registry=registry)
        timings["source_bounds"] = time.perf_counter() - began
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
        # The samples out of bounds are hashed, not decoded: the stage's input rate against the unbounded run's.
        "source_bounds": {"kept": bounded.num_samples, "dropped": bounded.drop_reasons,
                          "wall_s": round(timings["source_bounds"], 3),
                          "input_images_per_s": round(images / timings["source_bounds"], 1),
                          "ratio_vs_unbounded": round(timings["worker_processes"] / timings["source_bounds"], 2)},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
