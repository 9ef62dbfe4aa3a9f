"""Per-sample index: the contract (columns, unique keys, drop reasons), reads and filtered queries."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from datasets_manifests.index import (
    INDEX_FILE, INDEX_SCHEMA, TEXTS_FILE, SampleIndexError, get_sample, query_samples, read_index, read_texts,
    summarize_index, write_index, write_texts,
)
from datasets_manifests.manifest import Producer
from datasets_manifests.registry import NotFoundError, Registry

from datasets_fixtures import memory_url, publish_dataset, sample_rows


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> Registry:
    return Registry(tmp_path / "registry" if request.param == "local" else memory_url())


def full_rows(n: int, **kwargs) -> list[dict]:
    rows = sample_rows(n, **kwargs)
    for row in rows:
        ok = row["status"] == "ok"
        row.update(image_sha256="ab" * 32 if ok else None, shard="shards/a.tar" if ok else None,
                   jpg_offset=512 if ok else None, jpg_bytes=100 if ok else None)
    return rows


def test_write_index_casts_to_schema_and_keeps_extra_columns(tmp_path):
    rows = full_rows(3)
    rows[0]["clip_score"] = 0.3  # extra columns are allowed
    assert write_index(rows, tmp_path / INDEX_FILE) == 3
    table = pq.read_table(tmp_path / INDEX_FILE)
    for field in INDEX_SCHEMA:
        assert table.schema.field(field.name).type == field.type
    assert table.column("clip_score").to_pylist() == [0.3, None, None]


@pytest.mark.parametrize(("change", "message"), [
    (lambda rows: rows[2].pop("url"), "row 's000002' lacks required column.*url"),
    (lambda rows: rows[1].update(key=rows[0]["key"]), "duplicate key 's000000'"),
    (lambda rows: rows[0].update(status="maybe"), "'status' has value 'maybe'"),
    (lambda rows: rows[0].update(status="dropped"), "dropped sample 's000000' has no drop_reason"),
    (lambda rows: rows[0].update(drop_reason="too_small"), "status 'ok' but a drop_reason"),
    (lambda rows: rows[0].update(key=None), "'key' has 1 null"),
    (lambda rows: rows[0].update(width="wide"), "column 'width'"),
])
def test_write_index_rejects_broken_contract(tmp_path, change, message):
    rows = full_rows(3)
    change(rows)
    with pytest.raises(SampleIndexError, match=message):
        write_index(rows, tmp_path / INDEX_FILE)
    assert not (tmp_path / INDEX_FILE).exists()


def test_write_index_accepts_a_table_and_rejects_a_bad_one(tmp_path):
    table = pa.Table.from_pylist(full_rows(2))  # inferred types (int64 width) are cast to the schema
    assert write_index(table, tmp_path / "a.parquet") == 2
    with pytest.raises(SampleIndexError, match="missing required column.*drop_reason"):
        write_index(table.drop_columns(["drop_reason"]), tmp_path / "b.parquet")


def test_index_written_in_batches_is_the_file_written_at_once(tmp_path, monkeypatch):
    from datasets_manifests import index

    monkeypatch.setattr(index, "ROW_GROUP_SIZE", 2)
    rows = full_rows(7, dropped={1: "failed_to_download", 4: "too_small"})
    write_index(rows, tmp_path / "whole.parquet")
    batches = [pa.Table.from_pylist(rows[first:last]) for first, last in ((0, 3), (3, 4), (4, 7))]
    summary = index.write_index_batches(batches, tmp_path / "batches.parquet")
    assert (tmp_path / "batches.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()
    assert summary == summarize_index(pa.Table.from_pylist(rows))
    with pytest.raises(SampleIndexError, match="out of key order"):
        index.write_index_batches(batches[::-1], tmp_path / "wrong.parquet")
    with pytest.raises(SampleIndexError, match="duplicate key"):
        index.write_index_batches([pa.Table.from_pylist(rows[:2] * 2)], tmp_path / "twice.parquet")


def test_summarize_index_counts_every_drop_with_its_reason():
    rows = full_rows(6, dropped={1: "failed_to_download", 4: "failed_to_download", 5: "too_small"})
    rows[0]["split"] = "val"
    summary = summarize_index(pa.Table.from_pylist(rows))
    assert summary["counts"] == {"total": 6, "ok": 3, "dropped": 3}
    assert summary["drop_reasons"] == {"failed_to_download": 2, "too_small": 1}
    assert summary["splits"] == {"train": 2, "val": 1}


def test_published_index_points_into_the_shard(registry, tmp_path):
    manifest = publish_dataset(registry, tmp_path / "s", "web", sample_rows(5, dropped={2: "failed_to_download"}))
    index = read_index(registry, manifest)
    assert index.num_rows == 5 and manifest.counts == {"total": 5, "ok": 4, "dropped": 1}
    assert manifest.file(INDEX_FILE).role == "index"
    import hashlib

    for row in index.to_pylist():
        if row["status"] != "ok":
            assert row["shard"] is None and row["drop_reason"] == "failed_to_download"
            continue
        with registry.open(manifest, row["shard"]) as handle:
            handle.seek(row["jpg_offset"])
            payload = handle.read(row["jpg_bytes"])
        assert payload[:2] == b"\xff\xd8"  # a JPEG starts here
        assert hashlib.sha256(payload).hexdigest() == row["image_sha256"]
    assert read_index(registry, manifest, columns=["key"]).column_names == ["key"]
    with pytest.raises(SampleIndexError, match="no column 'nope'"):
        read_index(registry, manifest, columns=["nope"])


def test_query_samples_filters_and_pages(registry, tmp_path):
    rows = sample_rows(30, dropped={3: "too_small", 7: "failed_to_download", 9: "too_small"},
                       captions={5: "A red Bicycle leaning", 6: "two dogs"})
    rows[0]["split"] = "val"
    manifest = publish_dataset(registry, tmp_path / "s", "web", rows)

    page, total = query_samples(registry, manifest, where={"status": "dropped"})
    assert total == 3 and page.column("key").to_pylist() == ["s000003", "s000007", "s000009"]
    page, total = query_samples(registry, manifest, where={"drop_reason": ["too_small", "failed_to_download"]})
    assert total == 3
    page, total = query_samples(registry, manifest, where={"drop_reason": "null", "split": "val"})
    assert (total, page.column("key").to_pylist()) == (1, ["s000000"])
    page, total = query_samples(registry, manifest, where={"width": "8"}, limit=0)  # CLI strings are cast
    assert (total, page.num_rows) == (30, 0)
    page, total = query_samples(registry, manifest, text="BICYCLE")
    assert (total, page.column("key").to_pylist()) == (1, ["s000005"])
    page, total = query_samples(registry, manifest, text="thing #2", columns=["key", "raw_caption"])
    assert page.column_names == ["key", "raw_caption"] and "s000002" in page.column("key").to_pylist()

    keys = [query_samples(registry, manifest, limit=7, offset=o)[0].column("key").to_pylist() for o in (0, 7, 28)]
    assert keys[0] == [f"s{i:06d}" for i in range(7)]
    assert keys[1] == [f"s{i:06d}" for i in range(7, 14)]
    assert keys[2] == ["s000028", "s000029"]
    page, total = query_samples(registry, manifest, limit=5, offset=100)
    assert (page.num_rows, total) == (0, 30)

    with pytest.raises(SampleIndexError, match="unknown column 'colour'"):
        query_samples(registry, manifest, where={"colour": "red"})
    with pytest.raises(SampleIndexError, match="not a valid int32"):
        query_samples(registry, manifest, where={"width": "wide"})


def test_query_pages_through_a_large_index_with_small_row_groups(tmp_path):
    """A 100k-row index (2 row groups): a filtered page in the second group and the count come back right."""
    registry = Registry(tmp_path / "r")
    n = 100_000
    numbers = pa.array(np.arange(n))
    keys = pc.binary_join_element_wise("k", pc.utf8_lpad(numbers.cast(pa.string()), width=7, padding="0"), "")
    table = pa.table({
        "key": keys, "url": keys, "image_sha256": pa.nulls(n, pa.string()),
        "width": pa.array(np.arange(n) % 7, pa.int32()),
        "height": pa.repeat(8, n).cast(pa.int32()), "caption": pa.repeat("c", n), "raw_caption": pa.repeat("c", n),
        "caption_source": pa.repeat("web", n), "split": pa.repeat("train", n), "shard": pa.nulls(n, pa.string()),
        "jpg_offset": pa.nulls(n, pa.int64()), "jpg_bytes": pa.nulls(n, pa.int64()),
        "status": pa.repeat("ok", n), "drop_reason": pa.nulls(n, pa.string()),
    })
    staging = tmp_path / "staging"
    write_index(table, staging / INDEX_FILE)
    manifest = registry.publish(kind="dataset", name="big", staging_dir=staging, files=[{"path": INDEX_FILE,
                                "role": "index"}], producer=Producer(stage="t"))
    assert pq.ParquetFile(registry.local_path(manifest, INDEX_FILE)).num_row_groups > 1
    page, total = query_samples(registry, manifest, where={"width": 3}, limit=3, offset=10_000)
    assert total == int(np.sum(np.arange(n) % 7 == 3))
    assert page.column("key").to_pylist() == [f"k{i:07d}" for i in (70_003, 70_010, 70_017)]


def test_texts_layer(registry, tmp_path):
    texts = [
        {"key": "s000000", "text": "a photo of thing 0", "source": "web", "itm_score": 0.9, "kept": True,
         "drop_reason": None, "captioner": "model@v1"},
        {"key": "s000000", "text": "a cat on a mat", "source": "synthetic", "itm_score": 0.2, "kept": False,
         "drop_reason": "itm_below_threshold", "captioner": "model@v1"},
        {"key": "s000001", "text": "x", "source": "synthetic", "itm_score": 0.7, "kept": True, "drop_reason": None,
         "captioner": "model@v1"},
    ]
    plain = publish_dataset(registry, tmp_path / "a", "web", sample_rows(2))
    assert read_texts(registry, plain) is None
    derived = publish_dataset(registry, tmp_path / "b", "capfilt", sample_rows(2), parents=(plain,), texts=texts)
    assert read_texts(registry, derived).num_rows == 3
    only = read_texts(registry, derived, keys=["s000000"], columns=["key", "source", "kept"])
    assert only.to_pylist() == [{"key": "s000000", "source": "web", "kept": True},
                                {"key": "s000000", "source": "synthetic", "kept": False}]
    sample = get_sample(registry, derived, "s000000")
    assert sample["caption"] == "a photo of thing 0" and len(sample["texts"]) == 2
    assert sample["texts"][1]["captioner"] == "model@v1"  # provenance columns pass through
    with pytest.raises(NotFoundError, match="no sample with key 'zzz'"):
        get_sample(registry, derived, "zzz")


@pytest.mark.parametrize(("change", "message"), [
    ({"source": "human"}, "'source' has value 'human'"),
    ({"kept": False}, "dropped text of 'k' has no drop_reason"),
])
def test_write_texts_rejects_broken_rows(tmp_path, change, message):
    row = {"key": "k", "text": "t", "source": "web", "itm_score": 0.5, "kept": True, "drop_reason": None}
    with pytest.raises(SampleIndexError, match=message):
        write_texts([{**row, **change}], tmp_path / TEXTS_FILE)


def test_version_without_index_says_so(registry, tmp_path):
    (tmp_path / "x.bin").write_bytes(b"x")

    manifest = registry.publish(kind="model", name="m", staging_dir=tmp_path, files=[{"path": "x.bin"}],
                                producer=Producer(stage="pretrain"))
    with pytest.raises(NotFoundError, match="m@v1 has no index.parquet"):
        query_samples(registry, manifest)


def test_whole_file_reads_hold_about_one_batch(tmp_path):
    """`iter_parquet` over a file of 40 row groups allocates about one row group at a time: pyarrow's default
    pre-buffering keeps every row group read cached until the file closes (apache/arrow#39808)."""
    from datasets_manifests.index import iter_parquet

    rng = np.random.default_rng(0)
    texts = pa.array([f"{value:032x}" for value in rng.integers(0, 2**62, 400_000)])
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"key": texts, "n": np.arange(len(texts))}), path, row_group_size=10_000,
                   compression="none")
    before, peak, rows = pa.total_allocated_bytes(), 0, 0
    for batch in iter_parquet(str(path), ["key"], 10_000):
        peak, rows = max(peak, pa.total_allocated_bytes() - before), rows + batch.num_rows
    assert rows == len(texts) and peak < path.stat().st_size / 8, peak

    # Expressions and filters are Arrow's, evaluated a batch at a time: the dataset scan's answer, in order.
    import pyarrow.dataset as ds

    project = {"key": ds.field("key"), "even": pc.equal(pc.bit_wise_and(ds.field("n"), 1), 0)}
    where = pc.match_substring(ds.field("key"), "ab")
    expected = ds.dataset(str(path)).to_table(columns=project, filter=where)
    got = pa.Table.from_batches(list(iter_parquet(str(path), ["key", "n"], 7_777, project=project, where=where)))
    assert got.equals(expected) and 0 < got.num_rows < len(texts)


def test_read_ahead_keeps_order_bounds_the_lead_and_stops_with_its_consumer() -> None:
    import threading
    import time

    from datasets_manifests.index import read_ahead

    produced: list[int] = []
    closed = threading.Event()

    def numbers(count: int, fail_at: int | None = None):
        try:
            for number in range(count):
                if number == fail_at:
                    raise ValueError(f"unreadable batch {number}")
                produced.append(number)
                yield number
        finally:
            closed.set()

    assert list(read_ahead(numbers(50), depth=3)) == list(range(50)) and closed.is_set()
    produced.clear()
    closed.clear()
    reader = read_ahead(numbers(1000), depth=2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    time.sleep(0.2)
    assert len(produced) <= 3 + 2 + 1  # taken, queued, and the one waiting to be queued: never the whole file
    reader.close()  # the consumer stops (an abandoned filter): the producer stops and closes its source
    assert closed.is_set() and len(produced) < 1000  # (close() returns once the producer's thread has ended)
    closed.clear()
    with pytest.raises(ValueError, match="unreadable batch 4"):
        list(read_ahead(numbers(10, fail_at=4)))
    assert closed.is_set()
