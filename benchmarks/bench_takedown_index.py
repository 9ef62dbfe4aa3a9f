"""Takedown at the index's scale: the per-sample index and texts rewritten by Arrow, column by column, vs row by row.

`bench_takedown.py` times the shards of a takedown; at 129M samples its index (and a CapFilt version's texts) is
the rest of the work: every row read and written again, the samples taken out marked. Here a CapFilt-like version
of `--rows` samples with three texts each (`bench_browser_index.build`, keys in a shuffled order as CapFilt's index
lists them) loses three samples (two by key, one by URL): ours (`run_takedown`: the index matched by `is_in`, its
columns set by `if_else`, the moved `.jpg` offsets placed by `searchsorted`) against the loop it was before, side
by side on an identical version (the same build, seeded): finding the samples, the index and the texts a row
at a time through `to_pylist`. Both write the same index and texts (Arrow table equality). Prints one JSON object.
`python benchmarks/bench_takedown_index.py` (~1 min at the default 1M rows).
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
from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, iter_registry_parquet, scan_index  # noqa: E402
from datasets_manifests.registry import Registry  # noqa: E402
from pipelines.tasks import takedown  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="samples of the version (3 texts each)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ the baseline: the row loop the stage was before
def rows_taken(registry: Registry, source: Any, urls: set[str], keys: set[str], sha256s: set[str]) -> Any:
    where, texts, kept_urls = {}, set(), set()
    columns = ["key", "url", "raw_caption", "image_sha256", "status", "shard", "jpg_offset"]
    for batch in scan_index(registry, source, columns):
        for row in batch.to_pylist():
            if row["status"] != "ok":
                continue
            if row["key"] in keys or row["url"] in urls or row["image_sha256"] in sha256s:
                where[row["key"]] = (row["shard"], row["jpg_offset"])
                texts.add((row["url"], row["raw_caption"]))
            else:
                kept_urls.add(row["url"])
    taken_urls = {url for url, _ in texts if url is not None}
    return takedown.TakenSamples(where, texts, taken_urls, taken_urls & kept_urls)


def same_image(found: Any, url: str | None, text: str | None) -> bool:
    if url in found.urls_still_kept:
        return (url, text) in found.texts
    return url in found.urls


def rows_index(registry: Registry, source: Any, found: Any, moved: dict[tuple[str, int], int], target: Path,
               emptied: set[str]) -> dict[str, Any]:  # fmt: skip
    from datasets_manifests.index import write_index_batches

    def tables() -> Iterator[pa.Table]:
        for batch in scan_index(registry, source):
            rows = batch.to_pylist()
            for row in rows:
                if row["key"] in found.where:
                    row.update(status="dropped", drop_reason=takedown.REASON, shard=None, jpg_offset=None,
                               jpg_bytes=None, caption=None, raw_caption=None)  # fmt: skip
                elif row["status"] != "ok" and same_image(found, row["url"], row.get("raw_caption")):
                    row.update(caption=None, raw_caption=None)
                    emptied.add(row["key"])
                elif row["status"] == "ok" and row["jpg_offset"] is not None:
                    row["jpg_offset"] = moved.get((row["shard"], row["jpg_offset"]), row["jpg_offset"])
            yield pa.Table.from_pylist(rows, schema=batch.schema)

    schema = takedown._schema(registry, source, INDEX_FILE)
    return write_index_batches(tables(), target, schema, in_key_order=False)


def rows_texts(registry: Registry, source: Any, taken: set[str], target: Path) -> None:
    from datasets_manifests.index import write_texts_batches

    schema = takedown._schema(registry, source, TEXTS_FILE)

    def tables() -> Iterator[pa.Table]:
        for batch in iter_registry_parquet(registry, registry.path_of(source, TEXTS_FILE), schema.names):
            rows = batch.to_pylist()
            for row in rows:
                if row["key"] in taken:
                    row.update(text=None, kept=False,
                               drop_reason=takedown.REASON if row["kept"] else row["drop_reason"])  # fmt: skip
            yield pa.Table.from_pylist(rows, schema=schema)

    write_texts_batches(tables(), target, schema)


def timed_takedown(rows: int, row_loop: bool) -> tuple[float, pa.Table, pa.Table]:
    """A fresh version of `rows` samples, three taken out; (seconds, new index, new texts)."""
    root = Path(tempfile.mkdtemp(prefix="bench-takedown-index-"))
    saved = (takedown._taken_samples, takedown._write_index, takedown._write_texts)
    try:
        build(root / "registry", rows, shuffled=True)
        registry = Registry(str(root / "registry"))
        if row_loop:
            takedown._taken_samples, takedown._write_index, takedown._write_texts = rows_taken, rows_index, rows_texts
        began = time.perf_counter()
        new = takedown.run_takedown(registry, "big@v1", keys=["000000003", "000000010"],
                                    urls=["https://images.example.org/000000007.jpg"])  # fmt: skip
        seconds = time.perf_counter() - began
        return (seconds, pq.read_table(registry.local_path(new, INDEX_FILE)),
                pq.read_table(registry.local_path(new, TEXTS_FILE)))  # fmt: skip
    finally:
        takedown._taken_samples, takedown._write_index, takedown._write_texts = saved
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ours, index, texts = timed_takedown(args.rows, row_loop=False)
    baseline, index_before, texts_before = timed_takedown(args.rows, row_loop=True)
    report = {
        "benchmark": "takedown_index", "rows": args.rows, "texts": 3 * args.rows, "samples_taken_out": 3,
        "ours": {"wall_s": round(ours, 2), "rows_per_s": round(args.rows / ours)},
        "row_loop": {"wall_s": round(baseline, 2), "rows_per_s": round(args.rows / baseline)},
        "ratio": round(baseline / ours, 2), "same_index_and_texts": index.equals(index_before)
        and texts.equals(texts_before),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
