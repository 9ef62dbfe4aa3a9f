"""`blip data diff` (and the browser's diff pages) at dataset scale: memory-mapped copies compared a batch at a
time vs both indexes joined in memory.

A diff joins two versions' per-sample indexes by key (what a stage added, removed, re-captioned, dropped). It
read four columns of both indexes whole and kept every category in memory (the code before, rebuilt here as the
baseline with the same comparison of the aligned rows): ~220 bytes per sample of the two versions, so two
129M-row versions needed ~55 GB. Now `ops.diff_tables` copies the four columns to Arrow files it memory-maps,
hashes a's keys once, compares b with its rows of a a batch at a time and appends each category to its own
memory-mapped file.

Both sides run in fresh processes on the same two published versions (`bench_browser_index.build`: `--rows`
samples, a child version with 5 % removed, 5 % added, 10 % re-captioned, 2 % newly dropped). Reports wall time
and peak anonymous memory (RssAnon, sampled) above the process's start, and checks that both give the same
categories row for row. Prints one JSON object. `python benchmarks/bench_diff.py` (~2 min on 2 cores at 3M rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peak_memory import benchmark_main, measure_side, run_sides  # noqa: E402  (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000, help="samples in the parent version")
    parser.add_argument("--side", choices=["spilled", "in_memory"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def diff_in_memory(registry: Any, a: Any, b: Any) -> dict[str, Any]:
    """The diff before: both indexes' four columns read whole, joined and filtered in memory."""
    import pyarrow.compute as pc

    from datasets_manifests.index import read_index
    from datasets_manifests.ops import DIFF_COLUMNS, compare_rows

    table_a, table_b = read_index(registry, a, DIFF_COLUMNS), read_index(registry, b, DIFF_COLUMNS)
    position = pc.index_in(table_b["key"], value_set=table_a["key"])
    in_a = pc.is_valid(position)
    in_b = pc.is_in(table_a["key"], value_set=table_b["key"])
    common_a, common_b = table_a.take(pc.filter(position, in_a)), table_b.filter(in_a)
    return {"added": table_b.filter(pc.invert(in_a)).select(["key"]),
            "removed": table_a.filter(pc.invert(in_b)).select(["key"]), **compare_rows(common_a, common_b)}


def child(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from datasets_manifests.ops import diff_tables
    from datasets_manifests.registry import Registry

    directory = Path(args.dir)
    registry = Registry(str(directory / "registry"))
    a, b = registry.resolve("big@v1"), registry.resolve("big@v2")
    categories: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        categories.update(diff_tables(registry, a, b).categories if args.side == "spilled"
                          else diff_in_memory(registry, a, b))  # fmt: skip
        return {"counts": {name: table.num_rows for name, table in categories.items()}}

    measure_side(directory, args.side, work)
    for name, table in categories.items():  # after the measurement: for the comparison of the two sides
        pq.write_table(table, directory / f"{args.side}-{name}.parquet")


def _same_rows(in_memory: Any, spilled: Any) -> bool:
    """The same rows in the same order; the spilled side's extra columns (each key's row numbers) left aside."""
    spilled = spilled.select(in_memory.column_names)
    return in_memory.cast(spilled.schema).equals(spilled)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sides in fresh processes and print the comparison."""
    import pyarrow.parquet as pq

    from bench_browser_index import build

    with tempfile.TemporaryDirectory(prefix="bench-diff-") as tmp:
        directory = Path(tmp)
        began = time.perf_counter()
        build(directory / "registry", args.rows)
        build_s = time.perf_counter() - began
        results = run_sides(__file__, ("in_memory", "spilled"), directory, "--rows", str(args.rows))
        same = all(_same_rows(pq.read_table(directory / f"in_memory-{name}.parquet"),
                              pq.read_table(directory / f"spilled-{name}.parquet"))
                   for name in results["spilled"]["counts"])  # fmt: skip
    samples = args.rows + results["spilled"]["counts"]["added"] + args.rows - results["spilled"]["counts"]["removed"]
    per_sample = {side: round(results[side]["peak_mib"] * 2**20 / samples) for side in results}
    report = {
        "benchmark": "diff", "host_cpus": os.cpu_count(), "rows_a": args.rows,
        "rows_b": samples - args.rows, "build_s": round(build_s, 1), "counts": results["spilled"]["counts"],
        "same_categories": same,
        **{side: {"wall_s": round(results[side]["wall_s"], 2), "peak_mib": round(results[side]["peak_mib"], 1),
                  "bytes_per_sample": per_sample[side]} for side in ("spilled", "in_memory")},
        "memory_ratio": round(results["in_memory"]["peak_mib"] / results["spilled"]["peak_mib"], 1),
        "time_ratio": round(results["in_memory"]["wall_s"] / results["spilled"]["wall_s"], 2),
        # Peak per sample (both versions together) at this size x 2 x 129M.
        "at_129m_each_gib": {side: round(per_sample[side] * 2 * 129e6 / 2**30) for side in per_sample},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


main = benchmark_main(parse_args, child, report)

if __name__ == "__main__":
    main()
