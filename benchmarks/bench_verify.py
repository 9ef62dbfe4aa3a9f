"""`blip data verify`: files hashed by one thread per core vs one after the other.

A 129M-sample version is ~13k shards and several TB; `verify` recomputes the sha256 of every file. It did that
one file after the other; now a thread pool hashes several at once (hashlib and file reads release the GIL).
Publishes a version of `--files` random files of `--mib` MiB each to a temporary local registry, warms the page
cache, then times `ops.verify` with `workers=1` (the loop before) and with the default, `--repeats` times each in
alternating order (medians). Prints one JSON object. `python benchmarks/bench_verify.py` (~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets_manifests.manifest import Producer  # noqa: E402
from datasets_manifests.ops import verify  # noqa: E402
from datasets_manifests.registry import Registry  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--mib", type=int, default=64, help="size of each file")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        for number in range(args.files):
            (staging / f"shard-{number:05d}.tar").write_bytes(os.urandom(args.mib << 20))
        registry = Registry(str(Path(tmp) / "registry"))
        manifest = registry.publish(kind="dataset", name="bench", staging_dir=staging, producer=Producer(stage="bench"),
                                    files=[{"path": path.name, "role": "shard"} for path in sorted(staging.iterdir())])
        verify(registry, manifest)  # page cache warm for both sides
        times: dict[str, list[float]] = {"one_by_one": [], "threads": []}
        for _ in range(args.repeats):
            for side, workers in (("one_by_one", 1), ("threads", None)):
                began = time.perf_counter()
                problems = verify(registry, manifest, workers=workers)
                times[side].append(time.perf_counter() - began)
                if problems:
                    raise SystemExit(f"{side}: {problems}")
    total_mib = args.files * args.mib
    median = {side: statistics.median(values) for side, values in times.items()}
    report = {
        "benchmark": "verify", "host_cpus": os.cpu_count(), "files": args.files, "mib": total_mib,
        "threads": {"workers": os.cpu_count(), "s": round(median["threads"], 3),
                    "mib_per_s": round(total_mib / median["threads"], 1)},
        "one_by_one": {"s": round(median["one_by_one"], 3), "mib_per_s": round(total_mib / median["one_by_one"], 1)},
        "speedup": round(median["one_by_one"] / median["threads"], 2),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
