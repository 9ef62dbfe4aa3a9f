"""The download stage's indexing of img2dataset's finished shards: worker processes vs one process.

After img2dataset, `download.collect_shards` reads every stored image (offset, size, sha256 for the shard
stage's dedup) and every shard's parquet (status, error class, caption). That was one loop in the driver: at
129M images, terabytes read by one core. It now spreads the shards over processes (one per core, at most one
per GiB of tars); the baseline is the same function with `workers=1`, run side by side on the same shards.
Both must give the same index (checked).

Inputs: `--shards` img2dataset-format shards (NNNNN.tar/.parquet/_stats.json) of `--per-shard` ~`--jpeg-kib`
KiB JPEGs. Prints one JSON object. `python benchmarks/bench_download_index.py` (~1 min on 2 cores; 1.4 GB of
temporary shards).
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

from bench_capfilt_writer import noise_jpegs, side_for_kib  # noqa: E402  (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--jpeg-kib", type=int, default=60)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def build_shards(root: Path, args: argparse.Namespace) -> None:
    """Shards as img2dataset writes them; one sample in ten failed (no jpg, an error message)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.tasks.webdata import write_tar

    side = side_for_kib(args.jpeg_kib)
    jpegs = noise_jpegs(side, side)
    root.mkdir(parents=True)
    for shard in range(args.shards):
        name = f"{shard:05d}"
        records, members = [], []
        for position in range(args.per_shard):
            key, ok = f"{name}{position:04d}", position % 10 != 3
            if ok:
                members.append((f"{key}.jpg", jpegs[position % len(jpegs)]))
            records.append({"key": key, "url": f"http://127.0.0.1/{key}.jpg", "caption": f"A photo of thing {key}",
                            "source_key": f"s{key}", "status": "success" if ok else "failed_to_download",
                            "error_message": None if ok else "HTTP Error 404: Not Found", "width": 8, "height": 8})  # fmt: skip
        write_tar(root / f"{name}.tar", members)
        pq.write_table(pa.Table.from_pylist(records), root / f"{name}.parquet")
        (root / f"{name}_stats.json").write_text(json.dumps({"successes": args.per_shard}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from pipelines.tasks.download import collect_shards, read_rows

    root = Path(tempfile.mkdtemp(prefix="bench-download-index-"))
    try:
        build_shards(root / "raw", args)
        tar_bytes = sum(path.stat().st_size for path in (root / "raw").glob("*.tar"))
        timings, results = {}, {}
        for label, workers in (("one_process", 1), ("worker_processes", args.workers)):
            began = time.perf_counter()
            files = collect_shards(str(root / "raw"), "raw", root / f"{label}.arrow", workers=workers)
            timings[label] = time.perf_counter() - began
            results[label] = (files, read_rows([root / f"{label}.arrow"]).to_pylist())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    images = args.shards * args.per_shard
    report = {
        "benchmark": "download_index", "host_cpus": os.cpu_count(), "shards": args.shards, "images": images,
        "tar_mib": round(tar_bytes / 2**20, 1), "same_index": results["one_process"] == results["worker_processes"],
        "one_process": {"wall_s": round(timings["one_process"], 3),
                        "images_per_s": round(images / timings["one_process"], 1)},
        "worker_processes": {"workers": args.workers, "wall_s": round(timings["worker_processes"], 3),
                             "images_per_s": round(images / timings["worker_processes"], 1)},
        "ratio": round(timings["one_process"] / timings["worker_processes"], 2),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
