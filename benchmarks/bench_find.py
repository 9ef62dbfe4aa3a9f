"""`blip data find` at the index's scale: the asked column read alone, then the row groups that hold a match, vs
every column the answer shows read for every row.

A takedown request names a URL (or a key, an image sha256); `find_samples` looks for it in every dataset version's
index. Here one version of `--rows` samples with realistic columns (random sha256s and URL paths, which do not
compress; captions from a vocabulary) is searched for three URLs: ours (`locate.find_samples`: the `url` column
scanned with Arrow's `is_in`, then the eight columns of the answer read from the row groups holding the matches)
against the scan it was before, side by side on the same file (warm page cache for both, alternated, best of
`--repeats`): the eight columns (key, url, sha256, status, drop reason, split, shard, caption) scanned for every
row, matched by the same `is_in`. Both give the same rows. Also reported: the compressed bytes each reads (from the
Parquet footer), which is what a cold disk or an object store pays. Prints one JSON object.
`python benchmarks/bench_find.py` (~1 min at the default 2M rows).
"""

from __future__ import annotations

import argparse
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

from datasets_manifests.index import INDEX_FILE, scan_index, write_index  # noqa: E402
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


def build(root: Path, rows: int) -> tuple[Registry, Any, list[str]]:
    """A shard-stage-like version's index (no shards: `find` reads the index alone) and three URLs it holds."""
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
    staging = root / "staging"
    staging.mkdir(parents=True)
    write_index(index, staging / INDEX_FILE)
    registry = Registry(str(root / "registry"))
    manifest = registry.publish(kind="dataset", name="web", staging_dir=staging, producer=Producer(stage="bench"),
                                files=[{"path": INDEX_FILE, "role": "index"}])  # fmt: skip
    asked = [url[int(n)].as_py() for n in (rows // 7, rows // 2, rows - 3)]  # three row groups
    return registry, manifest, asked


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-find-") as tmp:
        registry, manifest, urls = build(Path(tmp), args.rows)
        times: dict[str, list[float]] = {"ours": [], "every_column": []}
        answers = {}
        for _ in range(args.repeats):  # alternated: both sides see the same warm page cache
            for side, run in (("ours", lambda: find_samples(registry, urls=urls)),
                              ("every_column", lambda: scan_every_column(registry, manifest, urls))):
                start = time.perf_counter()
                answers[side] = run()
                times[side].append(time.perf_counter() - start)
        path = Path(registry.path_of(manifest, INDEX_FILE))
        metadata = pq.read_metadata(path)
        starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        keys = [int(found.key) for found in answers["ours"]]
        groups = sorted({int(np.searchsorted(starts, key, side="right") - 1) for key in keys})
        read_ours = compressed_bytes(path, ["url"]) + compressed_bytes(path, COLUMNS, groups)
        read_baseline = compressed_bytes(path, COLUMNS)
    ours, baseline = min(times["ours"]), min(times["every_column"])
    report = {
        "benchmark": "find", "rows": args.rows, "urls_asked": len(urls), "row_groups": metadata.num_row_groups,
        "ours": {"wall_s": round(ours, 3), "rows_per_s": round(args.rows / ours), "compressed_mib_read":
                 round(read_ours / 2**20, 1)},
        "every_column": {"wall_s": round(baseline, 3), "rows_per_s": round(args.rows / baseline),
                         "compressed_mib_read": round(read_baseline / 2**20, 1)},
        "ratio": round(baseline / ours, 2), "bytes_ratio": round(read_baseline / read_ours, 2),
        "same_rows": answers["ours"] == answers["every_column"] and len(answers["ours"]) == len(urls),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
