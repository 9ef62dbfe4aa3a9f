"""Benchmark: one page of filtered samples from a large per-sample index (`blip data samples`).

Publishes a dataset version whose `index.parquet` has `--rows` rows (written by `index.write_index`, the
pipeline's writer) to a temporary local registry, then times `index.query_samples` (Arrow dataset scan with
a pushed-down filter that stops at the page) against the obvious baseline: read the whole Parquet file,
filter in memory, slice the page. Both answer the same queries; the answers are checked equal.

    .venv/bin/python benchmarks/bench_index_query.py [--rows 500000] [--repeat 2]   (--rows 1000000 for the 1M-row case)

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets_manifests.index import INDEX_FILE, build_filter, query_samples, write_index  # noqa: E402
from datasets_manifests.manifest import Producer  # noqa: E402
from datasets_manifests.registry import Registry  # noqa: E402

QUERIES: list[dict[str, Any]] = [
    {"where": None, "text": None, "offset": 0},  # the first page
    {"where": {"status": "dropped", "drop_reason": "failed_to_download"}, "text": None, "offset": 0},
    {"where": {"split": "train"}, "text": None, "offset": 400_000},  # a deep page
    {"where": None, "text": "bicycle", "offset": 0},  # caption search
]
PAGE = 50


def make_index(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    numbers = pa.array(np.arange(rows))
    keys = pc.binary_join_element_wise("k", pc.utf8_lpad(numbers.cast(pa.string()), width=9, padding="0"), "")
    words = np.array(["a", "dog", "red", "bicycle", "on", "street", "cat", "the", "beach", "photo"])
    captions = pa.array([" ".join(w) for w in words[rng.integers(0, len(words), size=(rows, 6))]])
    dropped = rng.random(rows) < 0.3
    reasons = np.where(rng.random(rows) < 0.7, "failed_to_download", "image_too_small")
    return pa.table({
        "key": keys, "url": pc.binary_join_element_wise("http://example.com/", keys, ".jpg", ""),
        "image_sha256": pa.nulls(rows, pa.string()),
        "width": pa.array(rng.integers(64, 1024, rows), pa.int32()), "height": pa.array(rng.integers(64, 1024, rows), pa.int32()),
        "caption": captions, "raw_caption": captions, "caption_source": pa.repeat("web", rows),
        "split": pa.array(np.where(rng.random(rows) < 0.99, "train", "val")),
        "shard": pa.nulls(rows, pa.string()), "jpg_offset": pa.nulls(rows, pa.int64()), "jpg_bytes": pa.nulls(rows, pa.int64()),
        "status": pa.array(np.where(dropped, "dropped", "ok")),
        "drop_reason": pa.array(np.where(dropped, reasons, None)),
    })


def baseline(path: Path, query: dict[str, Any]) -> tuple[list[str], int]:
    table = pq.read_table(path)
    expression = build_filter(table.schema, query["where"], query["text"])
    matched = table.filter(expression) if expression is not None else table
    return matched.slice(query["offset"], PAGE).column("key").to_pylist(), matched.num_rows


def ours(registry: Registry, manifest: Any, query: dict[str, Any]) -> tuple[list[str], int]:
    page, total = query_samples(registry, manifest, where=query["where"], text=query["text"], limit=PAGE,
                                offset=query["offset"])
    return page.column("key").to_pylist(), total


def best_time(func: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "staging"
        write_index(make_index(args.rows), staging / INDEX_FILE)
        registry = Registry(Path(tmp) / "registry")
        manifest = registry.publish(kind="dataset", name="bench", staging_dir=staging, producer=Producer(stage="bench"),
                                    files=[{"path": INDEX_FILE, "role": "index"}])
        path = registry.local_path(manifest, INDEX_FILE)
        results = []
        for query in QUERIES:
            ours_s, ours_answer = best_time(lambda: ours(registry, manifest, query), args.repeat)
            base_s, base_answer = best_time(lambda: baseline(path, query), args.repeat)
            if ours_answer != base_answer:
                raise SystemExit(f"answers differ for {query}")
            results.append({"query": query, "total": ours_answer[1], "ours_ms": round(ours_s * 1000, 1),
                            "baseline_ms": round(base_s * 1000, 1), "speedup": round(base_s / ours_s, 2)})
    ours_total = sum(r["ours_ms"] for r in results)
    base_total = sum(r["baseline_ms"] for r in results)
    print(json.dumps({
        "benchmark": "index_query_page", "rows": args.rows, "page": PAGE, "index_bytes": manifest.file(INDEX_FILE).bytes,
        "ours": "index.query_samples (pyarrow.dataset filter pushdown, early-stopping scan)",
        "baseline": "pq.read_table (whole file) + filter + slice",
        "ours_ms_total": round(ours_total, 1), "baseline_ms_total": round(base_total, 1),
        "speedup": round(base_total / ours_total, 2), "queries": results,
    }))


if __name__ == "__main__":
    main()
