"""`blip data find` at the index's scale: the row groups whose Bloom filters may hold the URL, vs the asked column
of every row group, vs every column the answer shows read for every row.

A takedown request names a URL (or a key, an image sha256); `find_samples` looks for it in every dataset version's
index. Here one version of `--rows` samples with realistic columns (random sha256s and URL paths, which do not
compress; captions from a vocabulary) is searched for three URLs, side by side (warm page cache for all,
alternated, best of `--repeats`), the same rows found by each:
- ours (`locate.find_samples` on the index as the stages write it, with a Bloom filter per row group on key, url
  and image_sha256): the url filters read, the `url` column of the row groups they may hold it in, then the eight
  columns of the answer from the row groups holding the matches;
- url_column: the same function on the same index written without filters (as before them): the `url` column of
  every row group;
- every_column: the lookup before that, the eight columns (key, url, sha256, status, drop reason, split, shard,
  caption) scanned for every row, matched by the same `is_in`.
Also reported: the compressed bytes each reads (from the Parquet footer), what a cold disk or an object store
pays. Prints one JSON object. `python benchmarks/bench_find.py` (~1 min at the default 2M rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets_manifests.bloom import row_groups_to_read, value_hashes  # noqa: E402
from datasets_manifests.index import INDEX_FILE, ROW_GROUP_SIZE, scan_index, write_index  # noqa: E402
from datasets_manifests.locate import COLUMNS, Found, find_samples  # noqa: E402
from datasets_manifests.manifest import Producer  # noqa: E402
from datasets_manifests.registry import Registry  # noqa: E402

WORDS = ["a", "the", "red", "blue", "dog", "cat", "on", "in", "beach", "city", "street", "photo", "of", "with",
         "man", "woman", "car", "tree", "house", "sunset", "white", "black", "small", "large", "two", "people"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="samples in the version's index")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side (the best is reported)")
    return parser.parse_args(argv)


def build(root: Path, rows: int) -> tuple[tuple[Registry, Any], tuple[Registry, Any], list[str]]:
    """A shard-stage-like version's index (no shards: `find` reads the index alone), with and without the Bloom
    filters, and three URLs it holds."""
    rng = np.random.default_rng(0)
    keys = pa.array(np.char.zfill(np.arange(rows).astype(str), 9))
    paths = pa.array([bytes(row).hex() for row in rng.integers(0, 256, (rows, 8), dtype=np.uint8)])
    hosts = pa.array([f"https://cdn{n}.example.org/images/" for n in rng.integers(0, 50, rows)])
    url = pc.binary_join_element_wise(hosts, paths, "/", keys, ".jpg", "")
    sha256 = pa.array([bytes(row).hex() for row in rng.integers(0, 256, (rows, 32), dtype=np.uint8)])
    vocabulary = pa.array([" ".join(rng.choice(WORDS, int(rng.integers(4, 14)))) for _ in range(5000)])
    caption = vocabulary.take(pa.array(rng.integers(0, len(vocabulary), rows)))
    dropped = rng.random(rows) < 0.05
    index = pa.table({
        "key": keys, "url": url, "image_sha256": sha256,
        "width": pa.array(rng.integers(64, 1024, rows), pa.int32()),
        "height": pa.array(rng.integers(64, 1024, rows), pa.int32()),
        "caption": caption, "raw_caption": caption, "caption_source": pa.array(["web"] * rows),
        "split": pa.array(np.where(rng.random(rows) < 0.99, "train", "val")),
        "shard": pa.array([f"shards/train-{n // 10_000:06d}.tar" for n in range(rows)]),
        "jpg_offset": pa.array(np.arange(rows, dtype=np.int64) * 20_000),
        "jpg_bytes": pa.array(np.full(rows, 19_000, dtype=np.int64)),
        "status": pa.array(np.where(dropped, "dropped", "ok")),
        "drop_reason": pa.array(np.where(dropped, "too_small", None).tolist(), pa.string()),
    })  # fmt: skip
    asked = [url[int(n)].as_py() for n in (rows // 7, rows // 2, rows - 3)]  # three row groups
    return publish(root / "filters", index, filters=True), publish(root / "plain", index, filters=False), asked


def publish(root: Path, index: pa.Table, filters: bool) -> tuple[Registry, Any]:
    """A registry holding the index as one version: as the stages write it, or without the Bloom filters."""
    staging = root / "staging"
    staging.mkdir(parents=True)
    if filters:
        write_index(index, staging / INDEX_FILE)
    else:
        pq.write_table(index, staging / INDEX_FILE, row_group_size=ROW_GROUP_SIZE)
    registry = Registry(str(root / "registry"))
    manifest = registry.publish(kind="dataset", name="web", staging_dir=staging, producer=Producer(stage="bench"),
                                files=[{"path": INDEX_FILE, "role": "index"}])  # fmt: skip
    return registry, manifest


def scan_every_column(registry: Registry, manifest: Any, urls: list[str]) -> list[Found]:
    """The baseline: the lookup before, which read every column of its answer for every row."""
    wanted = pa.array(sorted(urls), pa.string())
    found = []
    for batch in scan_index(registry, manifest, COLUMNS):
        for row in batch.filter(pc.fill_null(pc.is_in(batch.column("url"), value_set=wanted), False)).to_pylist():
            found.append(Found(ref=manifest.ref, **row))
    return found


def compressed_bytes(path: Path, columns: list[str], groups: list[int] | None = None) -> int:
    metadata = pq.read_metadata(path)
    names = metadata.schema.to_arrow_schema().names
    chosen = range(metadata.num_row_groups) if groups is None else groups
    return sum(metadata.row_group(g).column(names.index(c)).total_compressed_size for g in chosen for c in columns)


def filter_bytes(path: Path, column: str) -> int:
    metadata = pq.read_metadata(path)
    names = metadata.schema.to_arrow_schema().names
    return sum(metadata.row_group(g).column(names.index(column)).bloom_filter_length or 0
               for g in range(metadata.num_row_groups))  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-find-") as tmp:
        (registry, manifest), (plain, plain_manifest), urls = build(Path(tmp), args.rows)
        sides = {"ours": lambda: find_samples(registry, urls=urls),
                 "url_column": lambda: find_samples(plain, urls=urls),
                 "every_column": lambda: scan_every_column(plain, plain_manifest, urls)}
        times: dict[str, list[float]] = {side: [] for side in sides}
        answers = {}
        for _ in range(args.repeats):  # alternated: every side sees the same warm page cache
            for side, run in sides.items():
                start = time.perf_counter()
                answers[side] = [dataclasses.replace(found, ref="") for found in run()]
                times[side].append(time.perf_counter() - start)
        path = Path(registry.path_of(manifest, INDEX_FILE))
        metadata = pq.read_metadata(path)
        with open(path, "rb") as handle:
            probed = row_groups_to_read(metadata, handle, {"url": value_hashes(urls)})
        starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        keys = [int(found.key) for found in answers["ours"]]
        groups = sorted({int(np.searchsorted(starts, key, side="right") - 1) for key in keys})
        plain_path = Path(plain.path_of(plain_manifest, INDEX_FILE))
        read = {"ours": filter_bytes(path, "url") + compressed_bytes(path, ["url"], probed)
                + compressed_bytes(path, COLUMNS, groups),
                "url_column": compressed_bytes(plain_path, ["url"]) + compressed_bytes(plain_path, COLUMNS, groups),
                "every_column": compressed_bytes(plain_path, COLUMNS)}
        sizes = {"with_filters": path.stat().st_size, "without": plain_path.stat().st_size}
    best = {side: min(values) for side, values in times.items()}
    report = {
        "benchmark": "find", "rows": args.rows, "urls_asked": len(urls), "row_groups": metadata.num_row_groups,
        "row_groups_read": len(probed),
        **{side: {"wall_s": round(best[side], 3), "rows_per_s": round(args.rows / best[side]),
                  "compressed_mib_read": round(read[side] / 2**20, 1)} for side in sides},
        "ratio_vs_url_column": round(best["url_column"] / best["ours"], 2),
        "bytes_ratio_vs_url_column": round(read["url_column"] / read["ours"], 2),
        "ratio_vs_every_column": round(best["every_column"] / best["ours"], 2),
        "bytes_ratio_vs_every_column": round(read["every_column"] / read["ours"], 2),
        "index_mib": {side: round(size / 2**20, 1) for side, size in sizes.items()},
        "filters_share_of_index": round(sizes["with_filters"] / sizes["without"] - 1, 4),
        "same_rows": answers["ours"] == answers["url_column"] == answers["every_column"]
                     and len(answers["ours"]) == len(urls),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
