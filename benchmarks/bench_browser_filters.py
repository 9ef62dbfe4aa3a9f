"""The browser's filters on captions (source, ITM score, decision, text search) at dataset scale: the texts
walked beside the index vs a set of every matching text's key.

A sample matches a caption filter when one of its texts does. The browser collected the key of every matching
text (`ds.field("key").isin(...)` on the index): at 129M samples with ~300M texts, a filter that matches most
of them ("kept") held several GB of keys and their hash table per request. CapFilt writes each sample's texts
together and in the index's order, so the browser now walks texts.parquet beside the index a batch at a time and
places each run of a key's texts on its index row (`browser.query._TextGroups`); the key set stays as the
fallback for versions whose texts are in another order.

Both sides run in fresh processes on the same published version (`bench_browser_index.build`: `--rows` samples,
3 texts each; `--shuffled`: in a random key order, as CapFilt's index lists them) and answer the same filters
(first page, a further page, the total). Also timed: the texts of one page of samples, read by position (the
index's `texts_row` / `texts_count`) vs looked up by key (Arrow prunes that scan with the row groups' key
statistics only when the keys are sorted). Reports wall time per filter, peak anonymous memory (RssAnon, sampled)
above the process's start, and checks that both sides give the same pages, totals and texts. Prints one JSON
object. `python benchmarks/bench_browser_filters.py` (~2 min on 2 cores at 3M rows).
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peak_memory import benchmark_main, measure_side, run_sides  # noqa: E402  (benchmarks/ is the script's directory)

FILTERS = {
    "kept": {"decision": "kept"},  # most samples have a kept caption: the largest key set
    "synthetic_score_0.9": {"source": "synthetic", "min_score": 0.9},
    "search": {"q": "mountain river"},
}
PAGE = 24


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000, help="samples in the version (3 texts each)")
    parser.add_argument("--shuffled", action="store_true",
                        help="samples in a random key order, as CapFilt's index lists them (default: key order)")
    parser.add_argument("--side", choices=["walked", "key_set"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def key_set_page(data: Any, where: Any) -> tuple[list[str], int]:
    """The filter before: every matching text's key collected, then `isin` on the index (now the fallback)."""
    from datasets_manifests.browser.query import Matches

    matches = Matches.of(data._key_set_masks(where, data.index_columns()))
    page = data.rows_at(data.index_path, matches.rows(0, PAGE), ["key"])
    return page.column("key").to_pylist(), matches.total


def child(args: argparse.Namespace) -> None:
    from datasets_manifests.browser.query import SampleFilter, VersionData
    from datasets_manifests.registry import Registry

    directory = Path(args.dir)
    registry = Registry(str(directory / "registry"))
    data = VersionData(registry, registry.resolve("big@v1"))

    def work() -> dict[str, Any]:
        answers, seconds = {}, {}
        for name, filters in FILTERS.items():
            where = SampleFilter(**filters)
            began = time.perf_counter()
            if args.side == "walked":
                rows, total = data.query_samples(where, PAGE, 0)
                answers[name] = ([row["key"] for row in rows], total)
                seconds[name] = round(time.perf_counter() - began, 2)
                began = time.perf_counter()  # a further page: the filter's matches are kept
                data.query_samples(where, PAGE, total // 2)
                seconds[f"{name}_next_page"] = round(time.perf_counter() - began, 3)
            else:
                answers[name] = key_set_page(data, where)
                seconds[name] = round(time.perf_counter() - began, 2)
        # The texts of one unfiltered page: by position (the index's texts_row / texts_count) vs by key.
        rows = data.rows_at(data.index_path, np.arange(args.rows // 2, args.rows // 2 + PAGE),
                            ["key", "texts_row", "texts_count"]).to_pylist()  # fmt: skip
        began = time.perf_counter()
        texts = data.texts_of(rows) if args.side == "walked" else data.texts_for([row["key"] for row in rows])
        seconds["page_texts"] = round(time.perf_counter() - began, 3)
        answers["page_texts"] = sorted((key, [t["text"] for t in group]) for key, group in texts.items())
        return {"answers": answers, "filter_s": seconds}

    measure_side(directory, args.side, work)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sides in fresh processes and print the comparison."""
    from bench_browser_index import build

    with tempfile.TemporaryDirectory(prefix="bench-browser-filters-") as tmp:
        directory = Path(tmp)
        began = time.perf_counter()
        build(directory / "registry", args.rows, shuffled=args.shuffled)
        build_s = time.perf_counter() - began
        extra = ["--shuffled"] if args.shuffled else []
        results = run_sides(__file__, ("key_set", "walked"), directory, "--rows", str(args.rows), *extra)
    per_sample = {side: round(results[side]["peak_mib"] * 2**20 / args.rows) for side in results}
    report = {
        "benchmark": "browser_filters", "host_cpus": os.cpu_count(), "rows": args.rows, "texts": 3 * args.rows,
        "build_s": round(build_s, 1),
        "shuffled_keys": args.shuffled, "matches": {name: results["walked"]["answers"][name][1] for name in FILTERS},
        "same_pages_and_totals": results["walked"]["answers"] == results["key_set"]["answers"],
        **{side: {"wall_s": round(results[side]["wall_s"], 2), "filter_s": results[side]["filter_s"],
                  "peak_mib": round(results[side]["peak_mib"], 1), "bytes_per_sample": per_sample[side]}
           for side in ("walked", "key_set")},
        "memory_ratio": round(results["key_set"]["peak_mib"] / results["walked"]["peak_mib"], 1),
        "time_ratio": round(results["key_set"]["wall_s"] / results["walked"]["wall_s"], 2),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


main = benchmark_main(parse_args, child, report)

if __name__ == "__main__":
    main()
