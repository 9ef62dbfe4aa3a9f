"""Freeing a version a takedown replaced, at the index's scale: its index and texts written again row for row by
Arrow, vs a set of the emptied keys and a row loop.

`blip data rm OLD --data-only` on a version a takedown replaced writes its index and a CapFilt version's texts
again with the texts the newest version of its line emptied (`datasets_manifests/scrub.py`). Here a CapFilt-like
version of `--rows` samples with three texts each (`bench_browser_index.build`, keys shuffled as CapFilt lists
them) loses the three asked for (those it keeps) to a takedown; then ours (both files read side by side in batches, the texts set by
`pc.if_else` where the newest version's are null) against the obvious way, on the same files: the keys whose
texts the newest version emptied collected in a Python set, then every row of the old files through `to_pylist`.
Both write the same tables (Arrow equality). Also timed: the whole `rm --data-only` (shards freed, index, texts,
stats and the record written). Prints one JSON object. `python benchmarks/bench_scrub.py` (~1 min at 1M rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_browser_index import build  # noqa: E402  (benchmarks/ is the script's directory)
from datasets_manifests import scrub  # noqa: E402
from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, iter_registry_parquet  # noqa: E402
from datasets_manifests.registry import Registry  # noqa: E402
from datasets_manifests.removal import plan_removals, remove  # noqa: E402
from pipelines.tasks.takedown import run_takedown  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="samples of the version (3 texts each)")
    return parser.parse_args(argv)


def row_loop(registry: Registry, old: Any, newest: Any, path: str, target: Path) -> None:
    """The obvious way: the keys whose texts the newest version emptied, then the old file a row at a time."""
    from datasets_manifests.index import write_index_batches, write_texts_batches

    columns = scrub.ROW_FOR_ROW[path]
    schema = pq.read_schema(registry.local_path(old, path))
    emptied: dict[str, set[str]] = {column: set() for column in columns}
    for batch in iter_registry_parquet(registry, registry.path_of(newest, path), ["key", *columns]):
        for row in batch.to_pylist():
            for column in columns:
                if row[column] is None:
                    emptied[column].add(row["key"])

    def tables() -> Iterator[pa.Table]:
        for batch in iter_registry_parquet(registry, registry.path_of(old, path), schema.names):
            rows = batch.to_pylist()
            for row in rows:
                for column in columns:
                    if row["key"] in emptied[column]:
                        row[column] = None
            yield pa.Table.from_pylist(rows, schema=schema)

    if path == INDEX_FILE:
        write_index_batches(tables(), target, schema, in_key_order=False)
    else:
        write_texts_batches(tables(), target, schema)


def null_count(registry: Registry, manifest: Any) -> int:
    return pq.read_table(registry.local_path(manifest, INDEX_FILE), columns=["raw_caption"])["raw_caption"].null_count


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-scrub-"))
    try:
        build(root / "registry", args.rows, shuffled=True)
        registry = Registry(str(root / "registry"))
        newest = run_takedown(registry, "big@v1", keys=["000000003", "000000010"],
                              urls=["https://images.example.org/000000007.jpg"])  # fmt: skip
        old, taken = registry.resolve("big@v1"), newest.counts["taken_down"]  # of 3 asked for: those kept
        timings: dict[str, float] = {"ours": 0.0, "row_loop": 0.0}
        same = True
        for path in (INDEX_FILE, TEXTS_FILE):
            began = time.perf_counter()
            scrub._emptied_as_newest(registry, old, newest, path, root / f"ours-{path}")
            timings["ours"] += time.perf_counter() - began
            began = time.perf_counter()
            row_loop(registry, old, newest, path, root / f"loop-{path}")
            timings["row_loop"] += time.perf_counter() - began
            same = same and pq.read_table(root / f"ours-{path}").equals(pq.read_table(root / f"loop-{path}"))
        raw_captions_before = null_count(registry, old)
        began = time.perf_counter()
        for removal in plan_removals(registry, ["big@v1"], data_only=True):
            remove(registry, removal)
        whole = time.perf_counter() - began
        emptied = null_count(registry, old) - raw_captions_before
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "scrub", "rows": args.rows, "texts": 3 * args.rows, "samples_taken_out": taken,
        "ours": {"wall_s": round(timings["ours"], 2), "rows_per_s": round(args.rows / timings["ours"])},
        "row_loop": {"wall_s": round(timings["row_loop"], 2), "rows_per_s": round(args.rows / timings["row_loop"])},
        "ratio": round(timings["row_loop"] / timings["ours"], 2), "same_index_and_texts": same,
        "rm_data_only_wall_s": round(whole, 2), "index_raw_captions_emptied": emptied,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
