"""The download's source list as img2dataset's reader sees it: one Parquet file vs parts of whole shards.

img2dataset's driver reads each input file whole (`Reader._save_to_arrow`: `pq.read_table`) before cutting it
into per-shard feather files, so a normalised list of 129M rows in one file needed tens of GB in the download's
driver. The download stage now hands it a folder of parts of ~1M rows (`download.split_source_table`). Both
sides run img2dataset's own `Reader` over the same generated list (`--rows` BLIP-style rows) in a fresh process,
writing its shard files as the download does, and report wall time and peak anonymous memory (RssAnon, sampled)
above the process's start; the shard files must hold the same rows on both sides. Prints one JSON object.
`python benchmarks/bench_source_parts.py` (~1 min on 2 cores at 3M rows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peak_memory import benchmark_main, measure_side, run_sides  # noqa: E402  (benchmarks/ is the script's directory)

SAMPLES_PER_SHARD = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--side", choices=["one_file", "parts"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_list(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datasets_manifests.sources import SOURCE_SCHEMA

    rng = np.random.default_rng(0)
    words = np.array(["a", "red", "square", "photo", "of", "the", "blue", "circle", "on", "grass", "near", "city"])
    with pq.ParquetWriter(str(path), SOURCE_SCHEMA) as writer:
        for start in range(0, rows, 1 << 18):
            count = min(1 << 18, rows - start)
            numbers = np.arange(start, start + count)
            captions = [" ".join(rng.choice(words, size=12)) for _ in range(count)]
            writer.write_table(pa.table({
                "url": [f"https://images.example.com/photos/{n % 9973}/{n:012d}-large.jpg" for n in numbers],
                "caption": captions, "source_key": [f"{n:012d}" for n in numbers]}, schema=SOURCE_SCHEMA))


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # imported by img2dataset: no PyPI check
    from img2dataset.reader import Reader

    from pipelines.tasks.download import split_source_table

    directory = Path(args.dir)
    out = directory / args.side
    out.mkdir()

    def work() -> dict[str, Any]:
        url_list = directory / "source.parquet"
        if args.side == "parts":
            url_list = split_source_table(url_list, directory / "parts", SAMPLES_PER_SHARD)
        reader = Reader(str(url_list), "parquet", "url", "caption", None, None, ["source_key"], SAMPLES_PER_SHARD,
                        set(), str(out))  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # img2dataset prints its progress: this script prints JSON
            return {"shards": [shard_id for shard_id, _ in reader]}

    measure_side(directory, args.side, work)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sides in fresh processes and print the comparison."""
    import pyarrow as pa

    with tempfile.TemporaryDirectory(prefix="bench-source-parts-") as tmp:
        directory = Path(tmp)
        write_list(directory / "source.parquet", args.rows)
        results = run_sides(__file__, ("one_file", "parts"), directory, "--rows", str(args.rows))

        def shard(side: str, shard_id: int) -> pa.Table:
            return pa.ipc.open_file(pa.memory_map(str(directory / side / f"{shard_id}.feather"))).read_all()

        same = results["one_file"]["shards"] == results["parts"]["shards"] and all(
            shard("one_file", s).equals(shard("parts", s)) for s in results["parts"]["shards"])
    per_row = {side: round(results[side]["peak_mib"] * 2**20 / args.rows) for side in results}
    report = {
        "benchmark": "source_parts", "host_cpus": os.cpu_count(), "rows": args.rows,
        "shards": len(results["parts"]["shards"]), "same_shards": same,
        **{side: {"wall_s": round(results[side]["wall_s"], 2), "peak_mib": round(results[side]["peak_mib"], 1),
                  "bytes_per_row": per_row[side]} for side in ("parts", "one_file")},
        "memory_ratio": round(results["one_file"]["peak_mib"] / results["parts"]["peak_mib"], 1),
        "time_ratio": round(results["one_file"]["wall_s"] / results["parts"]["wall_s"], 2),
        # One file grows with the list; the parts side holds one part (~1M rows) whatever the list's length.
        "at_129m_gib": {"one_file": round(per_row["one_file"] * 129e6 / 2**30),
                        "parts": round(results["parts"]["peak_mib"] / 1024, 1)},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


main = benchmark_main(parse_args, child, report)

if __name__ == "__main__":
    main()
