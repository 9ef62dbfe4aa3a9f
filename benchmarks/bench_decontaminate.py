"""Decontamination in the shard stage: what keeping evaluation images out costs, and its matching vs the obvious loop.

1. Pass 1 of the shard stage (`scan_raw_shard`: decode check, caption normalisation, sha256) over the same raw
   shard without and with `--eval-images` evaluation hashes (COCO's val + test are 10,000 images): the
   difference hash of each decoded web image and its nearest evaluation hash cost this much of the pass.
2. The matching alone, per web image: the nearest of the evaluation hashes (256 bits each) by numpy
   (`nearest_distance`: xor, `bitwise_count`, a row sum) vs a Python loop of `(a ^ b).bit_count()` over them as
   256-bit ints; the same distances.

Inputs: `--images` noise JPEGs of `--side` px (web images as img2dataset stores them) in one raw shard.
Prints one JSON object. `python benchmarks/bench_decontaminate.py` (~1 min on 2 cores).
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
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--eval-images", type=int, default=10_000)
    parser.add_argument("--matches", type=int, default=200, help="web images matched in part 2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import numpy as np

    from pipelines.tasks.shard import HASH_WORDS, ShardConfig, nearest_distance, scan_raw_shard
    from pipelines.tasks.webdata import write_tar

    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-decontaminate-"))
    try:
        jpegs = noise_jpegs(args.side, args.side * 3 // 4, count=8, quality=60)
        members = []
        for row in range(args.images):
            meta = {"source_key": f"s{row:08d}", "url": f"http://127.0.0.1/{row}.jpg"}
            members += [(f"{row:09d}.jpg", jpegs[row % len(jpegs)]), (f"{row:09d}.txt", f"thing {row}".encode()),
                        (f"{row:09d}.json", json.dumps(meta).encode())]  # fmt: skip
        write_tar(root / "00000.tar", members)
        eval_hashes = np.random.default_rng(0).integers(0, 2**63, (HASH_WORDS, args.eval_images), dtype=np.uint64)
        cfg = ShardConfig()
        timings = {}
        for label, hashes in (("without", None), ("with", eval_hashes), ("without_again", None)):
            began = time.perf_counter()
            table, _ = scan_raw_shard(cfg, str(root / "00000.tar"), "raw/00000.tar", None, hashes)
            timings[label] = time.perf_counter() - began
            assert table.num_rows == args.images
    finally:
        shutil.rmtree(root, ignore_errors=True)
    without = min(timings["without"], timings["without_again"])  # the first run also warms the caches

    web = np.random.default_rng(1).integers(0, 2**63, (args.matches, HASH_WORDS), dtype=np.uint64)
    began = time.perf_counter()
    by_numpy = [nearest_distance(value, eval_hashes) for value in web]
    numpy_s = time.perf_counter() - began
    plain = [int.from_bytes(row.astype(">u8").tobytes(), "big") for row in eval_hashes.T]  # one 256-bit int a hash
    began = time.perf_counter()
    by_loop = [min((int.from_bytes(value.astype(">u8").tobytes(), "big") ^ other).bit_count() for other in plain)
               for value in web]  # fmt: skip
    loop_s = time.perf_counter() - began

    report = {
        "benchmark": "decontaminate", "host_cpus": os.cpu_count(), "images": args.images,
        "image_px": [args.side, args.side * 3 // 4], "eval_images": args.eval_images,
        "scan_without": {"wall_s": round(without, 3), "images_per_s": round(args.images / without, 1)},
        "scan_with": {"wall_s": round(timings["with"], 3), "images_per_s": round(args.images / timings["with"], 1)},
        "scan_cost": round(timings["with"] / without - 1, 3),
        "matching": {"web_images": args.matches, "same_distances": by_numpy == by_loop,
                     "numpy_ms_per_image": round(1000 * numpy_s / args.matches, 3),
                     "loop_ms_per_image": round(1000 * loop_s / args.matches, 3),
                     "ratio": round(loop_s / numpy_s, 1)},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
