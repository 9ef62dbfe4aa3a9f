"""Benchmark: does a version with a 1M-row per-sample index open in the manifest browser in under a second?

Publishes (to a temporary registry, through `Registry.publish`) a dataset version whose `index.parquet` has
`--rows` rows and whose CapFilt `texts.parquet` has 3 texts per row (web + 2 synthetic, ITM scores, decisions),
written by `datasets_manifests.index.write_index/write_texts` (the pipeline's writers, same row groups), plus
one real shard for thumbnails, and a second version of about the same size made from it (keys removed, added,
re-captioned, dropped) to diff. Then times the browser's JSON API in-process (Starlette TestClient, a fresh app
per cold measurement): opening a version, its lineage and histograms, sample filters, thumbnails, and the diff
page, against the obvious baselines: read the Parquet files whole and filter/join in memory, or (diff) compare
the two indexes key by key in Python.

    .venv/bin/python benchmarks/bench_browser_index.py [--rows 1000000]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets_manifests.browser.app import create_app  # noqa: E402
from datasets_manifests.browser.sample_registry import make_samples, write_shard  # noqa: E402
from datasets_manifests.index import write_index, write_texts  # noqa: E402
from datasets_manifests.manifest import Producer  # noqa: E402
from datasets_manifests.registry import Registry  # noqa: E402

WORDS = ("dog", "cat", "beach", "city", "street", "red", "blue", "car", "tree", "man", "woman", "child",
         "table", "food", "mountain", "river", "bird", "house", "train", "boat")
PAGE = 24


def captions(rng: np.random.Generator, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(count)]


def build(root: Path, rows: int, shuffled: bool = False) -> str:
    """The two versions (see the module docstring); `shuffled`: v1's samples in a random order, as CapFilt's index
    lists them (shard order after the shard stage's shuffle), its texts in the same order."""
    rng = np.random.default_rng(0)
    staging = root.parent / "staging"
    real = make_samples(0, PAGE, random.Random(0))
    offsets = write_shard(staging / "shards" / "train-000000.tar", real)
    shard = "shards/train-000000.tar"
    keys = pa.array(np.char.zfill(np.arange(rows).astype(str), 9))
    vocab = pa.array(captions(rng, 2000))
    caption = vocab.take(pa.array(rng.integers(0, len(vocab), rows)))
    dropped = rng.random(rows) < 0.05
    offset = np.full(rows, offsets[real[0]["key"]][0], dtype=np.int64)
    size = np.full(rows, offsets[real[0]["key"]][1], dtype=np.int64)
    for number, sample in enumerate(real):  # the first page points at real images
        offset[number], size[number] = offsets[sample["key"]]
    index = pa.table({
        "key": keys, "url": pc.binary_join_element_wise("https://images.example.org/", keys, ".jpg", ""),
        "image_sha256": pc.binary_join_element_wise(keys, "0" * 55, ""),
        "width": pa.array(rng.integers(64, 1024, rows), pa.int32()),
        "height": pa.array(rng.integers(64, 1024, rows), pa.int32()),
        "caption": caption, "raw_caption": caption, "caption_source": pa.array(["web"] * rows),
        "split": pa.array(np.where(rng.random(rows) < 0.99, "train", "val")),
        "shard": pa.array([shard] * rows), "jpg_offset": pa.array(offset), "jpg_bytes": pa.array(size),
        "status": pa.array(np.where(dropped, "dropped", "ok")),
        "drop_reason": pa.array(np.where(dropped, "too_small", None).tolist(), pa.string()),
    })
    if shuffled:
        index = index.take(pa.array(rng.permutation(rows)))
        keys = index.column("key").combine_chunks()
    index = index.append_column("texts_row", pa.array(np.arange(rows, dtype=np.int64) * 3))
    index = index.append_column("texts_count", pa.array(np.full(rows, 3, dtype=np.int64)))
    write_index(index, staging / "index.parquet")
    scores = rng.random(rows * 3).astype(np.float32)
    kept = scores >= 0.5
    texts = pa.table({
        "key": pa.array(np.repeat(keys.to_numpy(zero_copy_only=False), 3)),
        "text": vocab.take(pa.array(rng.integers(0, len(vocab), rows * 3))),
        "source": pa.array(np.tile(["web", "synthetic", "synthetic"], rows)),
        "itm_score": pa.array(scores), "kept": pa.array(kept),
        "drop_reason": pa.array(np.where(kept, None, "itm_below_threshold").tolist(), pa.string()),
    })
    write_texts(texts, staging / "texts.parquet")
    registry = Registry(str(root))
    files = [{"path": shard, "role": "shard", "num_samples": PAGE, "split": "train"},
             {"path": "index.parquet", "role": "index"}, {"path": "texts.parquet", "role": "index"}]
    v1 = registry.publish(kind="dataset", name="big", staging_dir=staging, producer=Producer(stage="bench"),
                          files=files, counts={"images": rows, "texts": rows * 3}, splits={"train": rows},
                          move=False)
    # v2, made from v1 as a CapFilt-like stage would: 5% of the keys removed, 5% new ones added, 10% re-captioned,
    # 2% newly dropped (same shard and texts files: the diff reads only the indexes).
    keep = rng.random(rows) >= 0.05
    index = index.drop_columns(["texts_row", "texts_count"])  # v2 shares v1's texts file: no positions into it
    changed = index.filter(pa.array(keep))
    recaption = rng.random(len(changed)) < 0.10
    new_caption = pc.binary_join_element_wise(changed["caption"], pa.array(["(synthetic)"] * len(changed)), " ")
    changed = changed.set_column(changed.schema.get_field_index("caption"), "caption",
                                 pc.if_else(pa.array(recaption), new_caption, changed["caption"]))
    drop = (rng.random(len(changed)) < 0.02) & (changed["status"].to_numpy(zero_copy_only=False) == "ok")
    changed = changed.set_column(changed.schema.get_field_index("status"), "status",
                                 pc.if_else(pa.array(drop), "dropped", changed["status"]))
    changed = changed.set_column(changed.schema.get_field_index("drop_reason"), "drop_reason",
                                 pc.if_else(pa.array(drop), "no_caption_kept", changed["drop_reason"]))
    added = index.slice(0, rows // 20)
    added_keys = pa.array(np.char.zfill(np.arange(rows, rows + len(added)).astype(str), 9))
    added = added.set_column(0, "key", added_keys)
    write_index(pa.concat_tables([changed, added]), staging / "index.parquet")
    registry.publish(kind="dataset", name="big", staging_dir=staging, producer=Producer(stage="bench-capfilt"),
                     files=files, parents=[v1], counts={"images": len(changed) + len(added)})
    return "big"


CPU: dict[str, float] = {}  # process CPU seconds (all threads) of the last call of each label: load-independent


def timed(function: Callable[[], Any], label: str = "") -> tuple[float, Any]:
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    if label:
        CPU[label] = round(time.process_time() - cpu, 4)
    return time.perf_counter() - start, result


def ours(root: Path, thumbs: Path) -> dict[str, float]:
    from starlette.testclient import TestClient

    base = "/api/versions/dataset/big/v1"

    def client() -> TestClient:  # a fresh app: no warm per-version handles, no cached thumbnails
        return TestClient(create_app(str(root), thumb_cache_dir=Path(tempfile.mkdtemp(dir=thumbs))))

    def get(c: TestClient, url: str) -> dict[str, Any]:
        response = c.get(url)
        assert response.status_code == 200, (url, response.text[:300])
        return response.json() if response.headers["content-type"].startswith("application/json") else {}

    out: dict[str, float] = {}
    cold = client()
    out["open_version_cold_s"], _ = timed(lambda: (get(cold, base), get(cold, f"{base}/samples?limit={PAGE}")),
                                          "ours_open_version")
    out["open_version_warm_s"], _ = timed(lambda: (get(cold, base), get(cold, f"{base}/samples?limit={PAGE}")))
    out["deep_page_s"], _ = timed(lambda: get(cold, f"{base}/samples?limit={PAGE}&offset=900000"))
    out["search_text_s"], page = timed(lambda: get(cold, f"{base}/samples?limit={PAGE}&q=mountain%20river"),
                                       "ours_search")
    out["filter_synthetic_score_s"], _ = timed(
        lambda: get(cold, f"{base}/samples?limit={PAGE}&source=synthetic&min_score=0.95&decision=kept"))
    out["filter_split_dropped_s"], _ = timed(lambda: get(cold, f"{base}/samples?limit={PAGE}&split=val&decision=dropped"))
    out["histograms_s"], _ = timed(lambda: get(cold, f"{base}/histograms"))
    # What else the version page asks for, each on a fresh app: the lineage graph and the histograms card.
    out["lineage_cold_s"], _ = timed(lambda: get(client(), f"{base}/lineage"), "ours_lineage")
    out["histograms_cold_s"], _ = timed(lambda: get(client(), f"{base}/histograms"), "ours_histograms")
    # The diff page between two 1M-row versions: the first page (computes and caches the diff), then another
    # category and a deep page of the same diff (cached).
    diff = "/api/diff?a=big@v1&b=big@v2"
    diff_client = client()
    out["diff_first_page_cold_s"], first = timed(lambda: get(diff_client, f"{diff}&limit=50"), "ours_diff")
    out["diff_category_page_warm_s"], _ = timed(lambda: get(diff_client, f"{diff}&category=recaptioned&limit=50"))
    out["diff_deep_page_warm_s"], _ = timed(lambda: get(diff_client, f"{diff}&limit=50&offset=100000"))
    out["diff_counts"] = first["counts"]
    keys = [f"{n:09d}" for n in range(PAGE)]
    out["first_page_thumbs_cold_s"], _ = timed(lambda: [get(cold, f"{base}/thumb/{k}?size=256") for k in keys])
    out["first_page_thumbs_cached_s"], _ = timed(lambda: [get(cold, f"{base}/thumb/{k}?size=256") for k in keys])
    out["search_matches"] = page["total"]
    return out


def naive(root: Path) -> dict[str, float]:
    """The obvious baseline: read both tables whole per request, then filter / slice / join in memory."""
    version = root / "datasets" / "big" / "v1"

    def open_version() -> list[dict[str, Any]]:
        index = pq.read_table(version / "index.parquet")
        texts = pq.read_table(version / "texts.parquet")
        page = index.slice(0, PAGE).to_pylist()
        wanted = pa.array([row["key"] for row in page])
        page_texts = texts.filter(pc.is_in(texts["key"], value_set=wanted)).to_pylist()
        return [dict(row, texts=[t for t in page_texts if t["key"] == row["key"]]) for row in page]

    def search() -> int:
        index = pq.read_table(version / "index.parquet")
        texts = pq.read_table(version / "texts.parquet")
        hit = pc.match_substring(index["caption"], "mountain river", ignore_case=True)
        text_keys = texts.filter(pc.match_substring(texts["text"], "mountain river", ignore_case=True))["key"]
        matches = index.filter(pc.or_(hit, pc.is_in(index["key"], value_set=pc.unique(text_keys))))
        return matches.num_rows

    def diff() -> dict[str, int]:
        """Both indexes read whole into Python, compared key by key (what a script would do)."""
        columns = ["key", "caption", "status"]
        a = {r["key"]: r for r in pq.read_table(version / "index.parquet", columns=columns).to_pylist()}
        b_path = root / "datasets" / "big" / "v2" / "index.parquet"
        b = {r["key"]: r for r in pq.read_table(b_path, columns=columns).to_pylist()}
        common = a.keys() & b.keys()
        return {"added": len(b.keys() - a.keys()), "removed": len(a.keys() - b.keys()),
                "recaptioned": sum(a[k]["caption"] != b[k]["caption"] for k in common),
                "newly_dropped": sum(a[k]["status"] == "ok" and b[k]["status"] == "dropped" for k in common)}

    out: dict[str, Any] = {}
    out["open_version_s"], _ = timed(open_version, "naive_open_version")
    out["search_text_s"], matches = timed(search, "naive_search")
    out["search_matches"] = matches
    out["diff_s"], out["diff_counts"] = timed(diff, "naive_diff")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-browser-") as tmp:
        root = Path(tmp) / "registry"
        build_s, _ = timed(lambda: build(root, args.rows))
        version = root / "datasets" / "big" / "v1"
        ours_times = ours(root, Path(tmp))
        naive_times = naive(root)
        assert ours_times["search_matches"] == naive_times["search_matches"], "browser and baseline disagree"
        for category, count in naive_times["diff_counts"].items():
            assert ours_times["diff_counts"][category] == count, f"diff {category}: browser and baseline disagree"
        result = {
            "benchmark": "browser_index", "rows": args.rows, "texts_rows": args.rows * 3,
            "index_mib": round((version / "index.parquet").stat().st_size / 2**20, 1),
            "texts_mib": round((version / "texts.parquet").stat().st_size / 2**20, 1),
            "build_s": round(build_s, 2),
            "ours": {k: round(v, 4) if isinstance(v, float) else v for k, v in ours_times.items()},
            # lineage and histograms have no whole-table baseline to speak of; the diff's is a Python key compare
            "naive_full_read": {k: round(v, 4) if isinstance(v, float) else v for k, v in naive_times.items()},
            "cpu_s": CPU, "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
            "open_version_under_1s": ours_times["open_version_cold_s"] < 1.0,
            "speedup_open_version": round(naive_times["open_version_s"] / ours_times["open_version_cold_s"], 1),
            "speedup_search": round(naive_times["search_text_s"] / ours_times["search_text_s"], 2),
            "speedup_diff_first_page": round(naive_times["diff_s"] / ours_times["diff_first_page_cold_s"], 2),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
