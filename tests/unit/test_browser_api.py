"""The manifest browser's JSON API over a registry built with the registry API (real tars, real Parquet).

Every endpoint is exercised, including the refused paths (traversal, absolute, URL-encoded, symlinks out of
the registry), broken shards and hostile images. Expected answers are computed from the Parquet files
themselves, not from constants.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import random
import stat
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from starlette.testclient import TestClient

from datasets_manifests.browser import app as browser_app
from datasets_manifests.browser.app import create_app
from datasets_manifests.browser import thumbnails
from datasets_manifests.browser.sample_registry import (
    TEXTS_SCHEMA, build_sample_registry, capfilt_texts, make_samples, with_texts_position, write_dataset_files,
)
from datasets_manifests.browser.thumbnails import MAX_IMAGE_PIXELS
from datasets_manifests.index import write_texts
from datasets_manifests.manifest import Producer
from datasets_manifests.registry import NotFoundError, Registry

SECRET = b"TOP-SECRET-OUTSIDE-THE-REGISTRY"


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "registry"
    build_sample_registry(root)
    return root


@pytest.fixture(scope="module")
def client(registry_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    app = create_app(str(registry_dir), thumb_cache_dir=tmp_path_factory.mktemp("thumbs"))
    return TestClient(app)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, Path, Path]:
    """A registry of broken versions: missing/corrupt shards, bombs, garbage, no offsets, symlinks out."""
    base = tmp_path_factory.mktemp("hostile")
    root, outside = base / "registry", base / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(SECRET)
    registry = Registry(str(root))

    samples = make_samples(0, 3, random.Random(1))

    def publish(name: str, mutate=None, offsets: bool = True, texts: bool = False) -> None:
        staging = base / f"staging-{name}"
        staging.mkdir()
        items = [dict(s) for s in samples]
        if mutate:
            mutate(items)
        files = write_dataset_files(staging, items, per_shard=3, split="train")
        if texts:
            rows = capfilt_texts(items, random.Random(2), threshold=0.5)
            write_texts(pa.Table.from_pylist(rows, schema=TEXTS_SCHEMA), staging / "texts.parquet")
            files.append({"path": "texts.parquet", "role": "index"})
        if not offsets:
            table = pq.read_table(staging / "index.parquet")
            nulls = pa.nulls(len(table), pa.int64())
            table = table.set_column(table.schema.get_field_index("jpg_offset"), "jpg_offset", nulls)
            table = table.set_column(table.schema.get_field_index("jpg_bytes"), "jpg_bytes", nulls)
            pq.write_table(table, staging / "index.parquet")
        (staging / "images").mkdir()
        (staging / "images" / "cover.jpg").write_bytes(samples[0]["jpg"])
        files.append({"path": "images/cover.jpg", "role": "image"})
        registry.publish(kind="dataset", name=name, staging_dir=staging, files=files, producer=Producer(stage="test"))

    def bomb(items):  # a real JPEG whose header claims 10000 x 8000 pixels (80 Mpx > our limit)
        items[0]["jpg"] = _patch_jpeg_size(items[0]["jpg"], 10000, 8000)

    def huge_bomb(items):  # 65535 x 65535: above Pillow's own bomb threshold too
        items[0]["jpg"] = _patch_jpeg_size(items[0]["jpg"], 65535, 65535)

    def garbage(items):
        items[0]["jpg"] = b"\xff\xd8 this is not a jpeg " * 20

    publish("ok-no-offsets", offsets=False)
    publish("missing-shard")
    publish("corrupt-shard")
    publish("corrupt-shard-no-offsets", offsets=False)
    publish("bomb", bomb)
    publish("huge-bomb", huge_bomb)
    publish("garbage", garbage)
    publish("symlinked")
    publish("corrupt-index")
    publish("truncated-shard")
    publish("symlinked-index")
    publish("symlinked-texts", texts=True)
    publish("symlinked-version", texts=True)
    version = lambda name: root / "datasets" / name / "v1"  # noqa: E731
    (version("missing-shard") / "shards" / "train-000000.tar").unlink()
    for name in ("corrupt-shard", "corrupt-shard-no-offsets"):
        shard = version(name) / "shards" / "train-000000.tar"
        shard.write_bytes(b"\x00garbage" * (shard.stat().st_size // 8))
    (version("corrupt-index") / "index.parquet").write_bytes(b"not parquet at all")
    truncated = version("truncated-shard") / "shards" / "train-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:700])  # ends inside the first JPEG
    # Symlinks out of the registry, placed after publishing (as an attacker with write access to the store would).
    for relpath in ("images/cover.jpg", "shards/train-000000.tar"):
        target = version("symlinked") / relpath
        target.unlink()
        target.symlink_to(outside / "secret.jpg")
    # Valid Parquet files outside, whose captions are the secret: served, they would show it.
    for name, relpath in (("symlinked-index", "index.parquet"), ("symlinked-texts", "texts.parquet")):
        target = version(name) / relpath
        table = pq.read_table(target)
        column = "caption" if relpath == "index.parquet" else "text"
        secret = pa.array([SECRET.decode()] * len(table))
        pq.write_table(table.set_column(table.schema.get_field_index(column), column, secret), outside / relpath)
        target.unlink()
        target.symlink_to(outside / relpath)
    (version("symlinked-version")).rename(outside / "version-v1")
    version("symlinked-version").symlink_to(outside / "version-v1", target_is_directory=True)
    app = create_app(str(root), thumb_cache_dir=base / "thumbs")
    return TestClient(app), root, outside


def _patch_jpeg_size(jpg: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0 frame header's height/width: a tiny file that claims to be a huge image."""
    marker = jpg.index(b"\xff\xc0")
    data = bytearray(jpg)
    data[marker + 5:marker + 7] = height.to_bytes(2, "big")
    data[marker + 7:marker + 9] = width.to_bytes(2, "big")
    return bytes(data)


def _index(registry_dir: Path, name: str, version: str = "v1", file: str = "index.parquet") -> pa.Table:
    return pq.read_table(registry_dir / "datasets" / name / version / file)


# ---------------------------------------------------------------------------------------------- pages
def test_page_and_static_files(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200
    for bad in ("/static/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fapp.py", "/static/../app.py"):
        response = client.get(bad)
        assert response.status_code == 404, bad
        assert "def create_app" not in response.text


def test_versions_lists_every_kind(client: TestClient, registry_dir: Path) -> None:
    body = client.get("/api/versions").json()
    refs = {(row["kind"], row["ref"]) for row in body["versions"]}
    expected = {(m.kind, m.ref) for m in Registry(str(registry_dir)).list()}
    assert refs == expected and len(refs) == 7
    capfilt = next(row for row in body["versions"] if row["ref"] == "web-demo-capfilt@v1")
    assert capfilt["parents"] == ["web-demo@v1", "blip-tiny-pretrain@v1"]
    evaluation = next(row for row in body["versions"] if row["kind"] == "evaluation")
    assert set(evaluation["metrics"]) == {"tr_r1", "ir_r1", "cider"}


def test_version_detail(client: TestClient, registry_dir: Path) -> None:
    body = client.get("/api/versions/dataset/web-demo-capfilt/v1").json()
    manifest = Registry(str(registry_dir)).resolve("web-demo-capfilt@v1")
    assert body["manifest"]["id"] == manifest.id
    assert [f["sha256"] for f in body["manifest"]["files"]] == [f.sha256 for f in manifest.files]
    assert body["parquet"]["index"]["rows"] == len(_index(registry_dir, "web-demo-capfilt"))
    assert body["parquet"]["texts"]["rows"] == len(_index(registry_dir, "web-demo-capfilt", file="texts.parquet"))
    assert {p["ref"] for p in body["parents"]} == {"web-demo@v1", "blip-tiny-pretrain@v1"}
    assert all(p["found"] for p in body["parents"])
    assert [c["ref"] for c in body["children"]] == ["blip-tiny-bootstrapped@v1"]
    model = client.get("/api/versions/model/blip-tiny-bootstrapped/v1").json()
    assert model["parquet"] is None
    assert [e["ref"] for e in model["evaluations"]] == ["eval-blip-tiny-bootstrapped@v1"]
    assert model["evaluations"][0]["metrics"]["tr_r1"] == pytest.approx(14.9)


def test_version_lookup_errors(client: TestClient) -> None:
    cases = {
        "/api/versions/dataset/web-demo/v9": 404,
        "/api/versions/secrets/web-demo/v1": 404,
        "/api/versions/dataset/Web..Demo/v1": 400,
        "/api/versions/dataset/web-demo/..": 404,
        "/api/versions/dataset/%2e%2e/v1": 400,
    }
    for url, status in cases.items():
        response = client.get(url)
        assert response.status_code == status, (url, response.text)
        assert response.json()["error"]


def test_lineage_goes_up_to_sources_and_down_to_evaluations(client: TestClient) -> None:
    graph = client.get("/api/versions/dataset/web-demo-capfilt/v1/lineage").json()
    levels = {node["ref"]: node["level"] for node in graph["nodes"]}
    assert levels["web-demo-capfilt@v1"] == 0
    assert levels["blip-tiny-pretrain@v1"] == -1 and levels["web-demo@v1"] == -1
    assert levels["blip-tiny-bootstrapped@v1"] == 1 and levels["eval-blip-tiny-bootstrapped@v1"] == 2
    ids = {node["ref"]: node["id"] for node in graph["nodes"]}
    edges = {(e["source"], e["target"]) for e in graph["edges"]}
    assert (ids["web-demo@v1"], ids["blip-tiny-pretrain@v1"]) in edges  # the captioner was trained on web v1
    assert (ids["blip-tiny-bootstrapped@v1"], ids["eval-blip-tiny-bootstrapped@v1"]) in edges


def test_histograms_count_every_caption(client: TestClient, registry_dir: Path) -> None:
    body = client.get("/api/versions/dataset/web-demo-capfilt/v1/histograms").json()
    texts = _index(registry_dir, "web-demo-capfilt", file="texts.parquet")
    series = {s["label"]: sum(s["counts"]) for s in body["itm_score"]["series"]}
    assert sum(series.values()) == len(texts)
    kept_synthetic = pc.and_(pc.equal(texts["source"], "synthetic"), texts["kept"])
    assert series["synthetic kept"] == pc.sum(pc.cast(kept_synthetic, pa.int64())).as_py()
    assert len(body["itm_score"]["edges"]) == 21
    web = client.get("/api/versions/dataset/web-demo/v1/histograms").json()
    assert "itm_score" not in web and web["caption_words"]["total"] == len(_index(registry_dir, "web-demo"))
    assert client.get("/api/versions/model/blip-tiny-pretrain/v1/histograms").status_code == 200


def test_histograms_read_in_batches_equal_one_read(registry_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets_manifests.browser import query
    from datasets_manifests.registry import Registry

    registry = Registry(str(registry_dir))
    manifest = registry.resolve("web-demo-capfilt@v1")
    whole = query.VersionData(registry, manifest).histograms()
    monkeypatch.setattr(query, "SCAN_BATCH_ROWS", 3)
    assert query.VersionData(registry, manifest).histograms() == whole
    assert set(whole) == {"itm_score", "megapixels", "caption_words"} and whole["megapixels"]["total"] > 3


def test_filtered_pages_read_in_batches_equal_one_read(registry_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets_manifests.browser import query
    from datasets_manifests.registry import Registry

    registry = Registry(str(registry_dir))
    data = query.VersionData(registry, registry.resolve("web-demo-capfilt@v1"))
    where = query.SampleFilter(source="synthetic")
    everything, total = data.query_samples(where, limit=1000, offset=0)
    assert total == len(everything) > 6
    monkeypatch.setattr(query, "SCAN_BATCH_ROWS", 2)
    data = query.VersionData(registry, registry.resolve("web-demo-capfilt@v1"))  # matches found 2 rows at a time
    for offset in range(0, total + 2):
        page, counted = data.query_samples(where, limit=3, offset=offset)
        assert counted == total and page == everything[offset:offset + 3]


def _poll(client: TestClient, url: str) -> tuple[dict, list[dict]]:
    """The answer to `url` once it is there, and the 202 bodies seen before it."""
    pending: list[dict] = []
    for _ in range(2000):
        response = client.get(url)
        if response.status_code != 202:
            assert response.status_code == 200, response.text
            return response.json(), pending
        pending.append(response.json())
    raise AssertionError(f"{url} stayed pending")


def test_long_filters_and_diffs_answer_202_with_progress_until_they_are_there(
        client: TestClient, registry_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filter or diff that takes longer than the app's `wait_s` answers 202 with how far it is (the page
    polls), goes on in the background, and then answers what a request that waited would have."""
    import threading

    from datasets_manifests import ops
    from datasets_manifests.browser import query

    release = threading.Event()
    masks = query.VersionData._match_masks

    def held_masks(self, *args):  # the scan stops after its first batch until the test lets it go on
        for number, mask in enumerate(masks(self, *args)):
            if number:
                assert release.wait(30)
            yield mask

    diff_tables = ops.diff_tables

    def held_diff(registry, a, b, **options):
        options["on_rows"](5)
        assert release.wait(30)
        return diff_tables(registry, a, b, **options)

    monkeypatch.setattr(query, "SCAN_BATCH_ROWS", 2)
    monkeypatch.setattr(query.VersionData, "_match_masks", held_masks)
    monkeypatch.setattr(ops, "diff_tables", held_diff)
    slow = TestClient(create_app(str(registry_dir), thumb_cache_dir=tmp_path, wait_s=0))
    samples = "/api/versions/dataset/web-demo-capfilt/v1/samples?source=synthetic&limit=5"
    diff = "/api/diff?a=web-demo@v1&b=web-demo-capfilt@v1&category=newly_dropped"
    rows = {ref: _index(registry_dir, *ref.split("@")).num_rows for ref in ("web-demo@v1", "web-demo-capfilt@v1")}
    for url, what, total in ((samples, "filtering web-demo-capfilt@v1", rows["web-demo-capfilt@v1"]),
                             (diff, "diff of web-demo@v1 and web-demo-capfilt@v1",
                              rows["web-demo@v1"] + 2 * rows["web-demo-capfilt@v1"])):  # fmt: skip
        first = slow.get(url)
        assert first.status_code == 202, first.text
        body = first.json()
        assert body["pending"] and body["what"] == what and body["total"] == total, body
        deadline = time.monotonic() + 10
        while body["done"] == 0 and time.monotonic() < deadline:  # its first batch is read in the background
            body = slow.get(url).json()
        assert 0 < body["done"] < total and f"of {total:,} rows" in body["message"], body
    release.set()
    for url in (samples, diff):
        answer, _ = _poll(slow, url)
        assert answer == client.get(url).json()  # what the app that waits answers


def test_matches_give_the_rows_of_any_page() -> None:
    """The kept bitmap of a filter's matches gives the same row numbers as the whole mask, for every page."""
    from datasets_manifests.browser.query import Matches

    rng = np.random.default_rng(3)
    masks = [rng.random(size) < share for size, share in ((5, 0.5), (0, 0.5), (9, 0.0), (17, 0.3), (3, 1.0), (8, 0.9))]
    matches, everything = Matches.of(iter(masks)), np.flatnonzero(np.concatenate(masks))
    assert matches.total == len(everything)
    for offset in range(len(everything) + 2):
        for limit in (1, 2, 5, 100):
            assert matches.rows(offset, limit).tolist() == everything[offset:offset + limit].tolist(), (offset, limit)


TEXT_FILTERS = [
    {"source": "synthetic"}, {"q": "circle"}, {"decision": "dropped", "source": "web", "q": "stock"},
    {"min_score": 0.9, "split": "train"}, {"max_score": 0.3, "decision": "dropped"}, {"q": "no such words"},
]


def _pages(data, where, batch_rows: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], int]:
    """The keys and total of `where` on a fresh handle (a handle keeps the matches of the filters it answered)."""
    from datasets_manifests.browser import query

    monkeypatch.setattr(query, "SCAN_BATCH_ROWS", batch_rows)
    rows, total = query.VersionData(data.registry, data.manifest).query_samples(where, limit=1000, offset=0)
    return [row["key"] for row in rows], total


def _key_set_answer(data, where) -> tuple[list[str], int]:
    """The fallback's answer: the matching texts' keys as a set, `isin` on the index."""
    keys = data.dataset(data.index_path).to_table(columns=["key"]).column("key")
    matched = keys.filter(pa.array(np.concatenate(list(data._key_set_masks(where, data.index_columns())))))
    return matched.to_pylist(), len(matched)


def test_text_filters_walk_the_texts_beside_the_index(registry_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The texts walked in the index's order (runs cut by batch edges, index batches of 1 row up to the whole
    file) give the key-set answer, and that answer is the filter's meaning."""
    from datasets_manifests.browser import query
    from datasets_manifests.registry import Registry

    registry = Registry(str(registry_dir))
    data = query.VersionData(registry, registry.resolve("web-demo-capfilt@v1"))
    for filters in TEXT_FILTERS:
        where = query.SampleFilter(**filters)
        expected, _ = _key_set_answer(data, where)
        for batch_rows in (1, 2, 3, 5, 1 << 18):
            with caplog.at_level(logging.WARNING, logger=query.__name__):
                assert _pages(data, where, batch_rows, monkeypatch) == (expected, len(expected)), (filters, batch_rows)
        if "split" not in filters and "max_score" not in filters:
            low = filters.get("min_score")
            semantic = {k: v for k, v in filters.items() if k in ("q", "source", "decision")}
            assert expected == _expected_keys(registry_dir, low=low, **semantic)
    assert not caplog.records  # the sample registry's texts are in the index's order: no fallback


@pytest.mark.parametrize("disorder", ["shuffled", "orphan", "split_run", "gaps"])
def test_texts_out_of_the_index_order_fall_back_to_the_key_set(registry_dir: Path, tmp_path: Path, disorder: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from datasets_manifests.browser import query
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry

    source = Registry(str(registry_dir))
    capfilt = source.resolve("web-demo-capfilt@v1")
    texts = pq.read_table(source.local_path(capfilt, "texts.parquet"))
    if disorder == "shuffled":
        texts = texts.take(np.random.default_rng(0).permutation(len(texts)))
    elif disorder == "orphan":  # a text whose key the index does not have, in the middle
        orphan = texts.slice(5, 1).set_column(0, "key", pa.array(["zz-not-in-index"]))
        texts = pa.concat_tables([texts.slice(0, 5), orphan, texts.slice(5)])
    elif disorder == "split_run":  # one key's texts in two places
        texts = pa.concat_tables([texts.slice(1), texts.slice(0, 1)])
    else:  # in order, but some samples have no texts: found by key, no fallback
        keys = texts.column("key").to_pylist()
        texts = texts.filter(pa.array([int(key) % 4 != 1 for key in keys]))
        assert 0 < len(texts) < len(keys)
    staging = tmp_path / "staging"
    staging.mkdir()
    # Row groups of 5: pages are read by row number from the groups that hold them. Without the texts' positions
    # (they would point at the ordered texts): texts found by key.
    index = pq.read_table(source.local_path(capfilt, "index.parquet")).drop_columns(["texts_row", "texts_count"])
    pq.write_table(index, staging / "index.parquet", row_group_size=5)
    pq.write_table(texts, staging / "texts.parquet", row_group_size=7)
    registry = Registry(str(tmp_path / "registry"))
    files = [{"path": "index.parquet", "role": "index"}, {"path": "texts.parquet", "role": "index"}]
    manifest = registry.publish(kind="dataset", name="disordered", staging_dir=staging, producer=Producer(stage="test"),
                                files=files)
    data, ordered = query.VersionData(registry, manifest), query.VersionData(source, capfilt)
    with caplog.at_level(logging.WARNING, logger=query.__name__):
        for filters in TEXT_FILTERS:
            where = query.SampleFilter(**filters)
            answer = _pages(data, where, 3, monkeypatch)
            assert answer == _key_set_answer(data, where), filters
            if disorder != "gaps":  # the same texts as the ordered version's
                assert answer == _pages(ordered, where, 3, monkeypatch), filters
    messages = [r.getMessage() for r in caplog.records]
    if disorder == "gaps":
        assert not messages
    else:
        assert messages and all("disordered@v1: " in m and "filtering through a key set" in m for m in messages)


def _publish_texts(tmp_path: Path, name: str, index: pa.Table, texts: pa.Table):
    """A version of `index` (row groups of 5) and `texts` (row groups of 7) in a registry under tmp_path."""
    from datasets_manifests.manifest import Producer

    staging = tmp_path / f"staging-{name}"
    staging.mkdir()
    pq.write_table(index, staging / "index.parquet", row_group_size=5)
    pq.write_table(texts, staging / "texts.parquet", row_group_size=7)
    registry = Registry(str(tmp_path / "registry"))
    files = [{"path": "index.parquet", "role": "index"}, {"path": "texts.parquet", "role": "index"}]
    return registry, registry.publish(kind="dataset", name=name, staging_dir=staging, files=files,
                                      producer=Producer(stage="test"))


@pytest.mark.parametrize("case", ["ordered", "gaps", "stale_positions", "orphan", "shuffled_texts"])
def test_ranges_of_the_index_walked_in_parallel_give_the_same_matches(
        registry_dir: Path, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A version whose index places its texts is walked in ranges of RANGE_ROWS rows by parallel threads, each
    reading the texts its rows place: the same matches as the key set, at every range size. Positions that do
    not tile texts.parquet fall back to the one-pass walk (and texts out of order from there to the key set)."""
    from datasets_manifests.browser import query

    source = Registry(str(registry_dir))
    capfilt = source.resolve("web-demo-capfilt@v1")
    index = pq.read_table(source.local_path(capfilt, "index.parquet"))
    texts = pq.read_table(source.local_path(capfilt, "texts.parquet"))
    if case == "gaps":  # some samples have no texts (count 0): positions recomputed, still one after the other
        texts = texts.filter(pa.array([int(key) % 4 != 1 for key in texts.column("key").to_pylist()]))
        index = with_texts_position(index, texts.column("key").to_pylist())
    elif case == "stale_positions":  # the texts in order, the positions shifted by one from the 8th sample on
        rows = index.column("texts_row").to_numpy().copy()
        rows[7:] += 1
        index = index.set_column(index.schema.get_field_index("texts_row"), "texts_row", pa.array(rows))
    elif case == "orphan":  # a text of a key the index lacks, between two samples' texts; positions around it
        rows = index.column("texts_row").to_numpy().copy()
        cut = int(rows[9])
        orphan = texts.slice(cut, 1).set_column(0, "key", pa.array(["zz-not-in-index"]))
        texts = pa.concat_tables([texts.slice(0, cut), orphan, texts.slice(cut)])
        rows[9:] += 1  # each range's texts are one after the other; only the ranges' tiling leaves a gap
        index = index.set_column(index.schema.get_field_index("texts_row"), "texts_row", pa.array(rows))
    elif case == "shuffled_texts":  # positions of the ordered texts over shuffled ones
        texts = texts.take(np.random.default_rng(1).permutation(len(texts)))
    registry, manifest = _publish_texts(tmp_path, case, index, texts)
    data = query.VersionData(registry, manifest)
    if case in ("ordered", "gaps"):  # only ranges read the texts: the one-pass walk would fail here
        batches = query.VersionData._batches
        monkeypatch.setattr(query.VersionData, "_batches", lambda self, relpath, *args, **kwargs: pytest.fail(
            "texts walked in one pass") if relpath == self.texts_path else batches(self, relpath, *args, **kwargs))
    expected = {str(filters): _key_set_answer(data, query.SampleFilter(**filters)) for filters in TEXT_FILTERS}
    for workers, range_rows in ((2, 1), (3, 2), (2, 5), (2, 7)):
        monkeypatch.setattr(query, "RANGE_WORKERS", workers)
        monkeypatch.setattr(query, "RANGE_ROWS", range_rows)
        for filters in TEXT_FILTERS:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger=query.__name__):
                answer = _pages(data, query.SampleFilter(**filters), 3, monkeypatch)
            assert answer == expected[str(filters)], (filters, workers, range_rows)
            walks = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{case}@v1: ")]
            one_pass = any("walking the texts in one pass" in m for m in walks)
            key_set = any("filtering through a key set" in m for m in walks)
            # ordered, gaps: ranges only; stale positions over ordered texts: the one pass answers; texts out of
            # order (a text of no sample between two ranges' texts, shuffled texts): the key set answers
            assert (one_pass, key_set) == {"ordered": (False, False), "gaps": (False, False),
                                           "stale_positions": (True, False)}.get(case, (True, True)), \
                (filters, workers, range_rows, walks)  # fmt: skip


def test_page_texts_are_read_by_position_and_stale_positions_fall_back_to_keys(
        registry_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from datasets_manifests.browser import query
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry

    source = Registry(str(registry_dir))
    capfilt = source.resolve("web-demo-capfilt@v1")
    data = query.VersionData(source, capfilt)
    everything, total = data.query_samples(query.SampleFilter(), limit=1000, offset=0)
    assert total == 23 and all(len(row["texts"]) == 3 and "texts_row" not in row for row in everything)
    by_key = {row["key"]: row["texts"] for row in everything}
    assert by_key == {key: texts for key, texts in data.texts_for(list(by_key)).items()}  # the same as by key
    monkeypatch.setattr(query.VersionData, "texts_for", lambda *args: pytest.fail("texts looked up by key"))
    for offset in range(0, total, 4):  # every page by position: no scan of texts.parquet for keys
        page, _ = query.VersionData(source, capfilt).query_samples(query.SampleFilter(source="web"), 4, offset)
        assert all(row["texts"] == by_key[row["key"]] for row in page)
    monkeypatch.undo()

    # Positions that do not match the texts (a texts file rewritten after the index): found by key, logged.
    staging = tmp_path / "staging"
    staging.mkdir()
    index = pq.read_table(source.local_path(capfilt, "index.parquet"))
    shifted = pc.add(index.column("texts_row"), 1)
    pq.write_table(index.set_column(index.schema.get_field_index("texts_row"), "texts_row", shifted),
                   staging / "index.parquet")
    pq.write_table(pq.read_table(source.local_path(capfilt, "texts.parquet")), staging / "texts.parquet")
    registry = Registry(str(tmp_path / "registry"))
    files = [{"path": "index.parquet", "role": "index"}, {"path": "texts.parquet", "role": "index"}]
    stale = registry.publish(kind="dataset", name="stale", staging_dir=staging, producer=Producer(stage="t"),
                             files=files)
    with caplog.at_level(logging.WARNING, logger=query.__name__):
        page, _ = query.VersionData(registry, stale).query_samples(query.SampleFilter(), limit=1000, offset=0)
    assert {row["key"]: row["texts"] for row in page} == by_key
    assert any("do not point at the samples' texts" in r.getMessage() for r in caplog.records)
    # An absurd count (a corrupt index) is refused before any array is built for it.
    counts = pc.if_else(pc.equal(index["key"], "000000000"), 10**12, index["texts_count"])
    pq.write_table(index.set_column(index.schema.get_field_index("texts_count"), "texts_count", counts),
                   staging / "index.parquet")
    pq.write_table(pq.read_table(source.local_path(capfilt, "texts.parquet")), staging / "texts.parquet")
    absurd = registry.publish(kind="dataset", name="absurd", staging_dir=staging, producer=Producer(stage="t"),
                              files=files)
    page, _ = query.VersionData(registry, absurd).query_samples(query.SampleFilter(), limit=3, offset=0)
    assert {row["key"]: row["texts"] for row in page} == {row["key"]: by_key[row["key"]] for row in page}


# ---------------------------------------------------------------------------------------------- samples
def test_samples_pages_cover_the_index_once(client: TestClient, registry_dir: Path) -> None:
    keys = []
    for offset in range(0, 30, 7):
        body = client.get(f"/api/versions/dataset/web-demo-capfilt/v1/samples?limit=7&offset={offset}").json()
        assert body["total"] == 23
        keys += [s["key"] for s in body["samples"]]
    assert keys == _index(registry_dir, "web-demo-capfilt")["key"].to_pylist()
    first = client.get("/api/versions/dataset/web-demo-capfilt/v1/samples?limit=1").json()["samples"][0]
    sources = [t["source"] for t in first["texts"]]
    assert sources == ["web", "synthetic", "synthetic"]  # web text first, then the synthetic captions
    assert all("itm_score" in t and "kept" in t for t in first["texts"])
    assert first["thumb"].endswith(f"/thumb/{first['key']}")


def test_a_sample_card_has_the_source_lists_columns_its_version_carries(tmp_path: Path) -> None:
    from datasets_fixtures import publish_dataset, sample_rows

    registry = Registry(str(tmp_path / "registry"))
    rows = [{**row, "uid": f"u{n}", "similarity": 0.25 + n / 100 if n != 3 else float("nan")}
            for n, row in enumerate(sample_rows(4, dropped={2: "similarity_below_min"}))]  # fmt: skip
    publish_dataset(registry, tmp_path / "scored", "scored", rows, metadata={"source_columns": ["uid", "similarity"]})
    publish_dataset(registry, tmp_path / "plain", "plain", sample_rows(2))
    client = TestClient(create_app(str(tmp_path / "registry"), thumb_cache_dir=tmp_path / "thumbs"))
    samples = client.get("/api/versions/dataset/scored/v1/samples").json()["samples"]
    assert [s["source_columns"] for s in samples] == [{"uid": f"u{n}", "similarity": pytest.approx(0.25 + n / 100)}
                                                      for n in range(3)] + [{"uid": "u3", "similarity": None}]  # NaN
    assert "uid" not in samples[0] and samples[2]["drop_reason"] == "similarity_below_min"
    assert [s["source_columns"] for s in client.get("/api/versions/dataset/plain/v1/samples").json()["samples"]] == \
        [{}, {}]  # fmt: skip


def test_samples_filter_by_a_range_of_a_numeric_source_column(tmp_path: Path) -> None:
    from datasets_fixtures import publish_dataset, sample_rows

    registry = Registry(str(tmp_path / "registry"))
    scores = [0.25 + n / 100 for n in range(5)] + [None]  # the last sample's list had no score
    rows = [{**row, "uid": f"u{n}", "similarity": score} for n, (row, score) in enumerate(zip(sample_rows(6), scores))]
    texts = [text for n, row in enumerate(rows) for text in (
        {"key": row["key"], "text": row["caption"], "source": "web", "itm_score": 0.9 if n % 2 == 0 else 0.1,
         "kept": n % 2 == 0, "drop_reason": None if n % 2 == 0 else "itm_below_threshold"},
        {"key": row["key"], "text": f"a synthetic caption {n}", "source": "synthetic", "itm_score": 0.8, "kept": True,
         "drop_reason": None})]  # fmt: skip
    publish_dataset(registry, tmp_path / "scored", "scored", rows, texts=texts,
                    metadata={"source_columns": ["uid", "similarity"]})  # fmt: skip
    publish_dataset(registry, tmp_path / "plain", "plain", sample_rows(2))
    client = TestClient(create_app(str(tmp_path / "registry"), thumb_cache_dir=tmp_path / "thumbs"))
    base = "/api/versions/dataset/scored/v1"
    assert client.get(base).json()["source_columns"] == [
        {"name": "uid", "type": "string", "numeric": False}, {"name": "similarity", "type": "double", "numeric": True}]
    assert client.get("/api/versions/dataset/plain/v1").json()["source_columns"] == []

    def keys(query: str) -> list[str]:
        body = client.get(f"{base}/samples?{query}").json()
        assert body["total"] == len(body["samples"])
        return [sample["key"] for sample in body["samples"]]

    key = [row["key"] for row in rows]
    assert keys("column=similarity&column_min=0.255&column_max=0.285") == key[1:4]
    assert keys("column=similarity&column_max=0.255") == key[:1]
    assert keys("column=similarity&column_min=0") == key[:5]  # no value: outside any range
    # With conditions on the texts too (the walk beside texts.parquet): a kept web text and the list's score.
    assert keys("column=similarity&column_min=0.255&source=web&decision=kept") == [key[2], key[4]]
    assert keys("column=similarity&column_min=0.255&q=synthetic caption 3") == [key[3]]
    for query, message in [
        ("column=uid&column_min=0", "scored@v1: source column 'uid' is string, not a number"),
        ("column=punsafe&column_min=0", "scored@v1 carries no source column 'punsafe' (it carries: uid, similarity)"),
        ("column_min=0.3", "column_min / column_max bound a source column: name it"),
        ("column=similarity", "column=similarity without column_min or column_max"),
        ("column=similarity&column_min=0.3&column_max=0.2", "column_min 0.3 is above column_max 0.2"),
        ("column=similarity&column_min=high", "column_min must be a number"),
    ]:
        answer = client.get(f"{base}/samples?{query}")
        assert answer.status_code == 400 and message in answer.json()["error"], (query, answer.json())
    answer = client.get("/api/versions/dataset/plain/v1/samples?column=similarity&column_min=0")
    assert answer.status_code == 400 and "carries no source column 'similarity' (it carries: none)" in answer.text


def _expected_keys(registry_dir: Path, q: str = "", source: str = "", low: float | None = None,
                   decision: str = "") -> list[str]:
    """The filter semantics, recomputed in plain Python from the full tables."""
    index = _index(registry_dir, "web-demo-capfilt").to_pylist()
    texts = _index(registry_dir, "web-demo-capfilt", file="texts.parquet").to_pylist()
    text_ok = {t["key"] for t in texts
               if (not source or t["source"] == source) and (low is None or t["itm_score"] >= low)
               and (not decision or t["kept"] == (decision == "kept"))}
    q_keys = {t["key"] for t in texts if q.lower() in t["text"].lower()}
    return [row["key"] for row in index
            if (not (source or low is not None or decision) or row["key"] in text_ok)
            and (not q or q.lower() in row["caption"].lower() or q.lower() in row["raw_caption"].lower()
                 or row["key"] in q_keys)]


@pytest.mark.parametrize("query, expected_args", [
    ("q=CIRCLE", {"q": "circle"}),
    ("source=synthetic&min_score=0.9", {"source": "synthetic", "low": 0.9}),
    ("decision=dropped", {"decision": "dropped"}),
    ("decision=dropped&source=web&q=stock", {"decision": "dropped", "source": "web", "q": "stock"}),
    ("min_score=0.95", {"low": 0.95}),
    ("split=train&source=synthetic&min_score=0.9", {"source": "synthetic", "low": 0.9}),
])
def test_sample_filters(client: TestClient, registry_dir: Path, query: str, expected_args: dict) -> None:
    body = client.get(f"/api/versions/dataset/web-demo-capfilt/v1/samples?{query}&limit=200").json()
    expected = _expected_keys(registry_dir, **expected_args)
    assert body["total"] == len(expected)
    assert [s["key"] for s in body["samples"]] == expected
    assert 0 < len(expected) < 23  # each filter really selects something, and not everything


def test_sample_filters_without_texts_and_splits(client: TestClient) -> None:
    base = "/api/versions/dataset/web-demo/v1/samples"
    dropped = client.get(f"{base}?decision=dropped").json()
    assert [s["key"] for s in dropped["samples"]] == ["000000005"]
    assert dropped["samples"][0]["drop_reason"] == "too_small" and dropped["samples"][0]["texts"] == []
    assert client.get(f"{base}?split=train").json()["total"] == 24
    assert client.get(f"{base}?split=val").json()["total"] == 0
    response = client.get(f"{base}?min_score=0.5")
    assert response.status_code == 400 and "no ITM scores" in response.json()["error"]


@pytest.mark.parametrize("query, message", [
    ("min_score=abc", "min_score must be a number"),
    ("decision=maybe", "decision must be"),
    ("source=llm", "source must be"),
    ("limit=0", "limit must be"),
    ("limit=100000", "limit must be"),
    ("offset=-1", "offset must be"),
    ("min_score=0.8&max_score=0.2", "above max_score"),
])
def test_sample_query_errors(client: TestClient, query: str, message: str) -> None:
    response = client.get(f"/api/versions/dataset/web-demo-capfilt/v1/samples?{query}")
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_samples_of_a_model_is_a_clear_error(client: TestClient) -> None:
    response = client.get("/api/versions/model/blip-tiny-pretrain/v1/samples")
    assert response.status_code == 404 and "no per-sample index" in response.json()["error"]


# ---------------------------------------------------------------------------------------------- thumbnails
def test_thumbnail_is_cut_from_the_shard_and_cached(client: TestClient, registry_dir: Path) -> None:
    url = "/api/versions/dataset/web-demo/v1/thumb/000000002?size=64"
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG" and max(image.size) == 64
    # The thumbnail shows the sample's own picture: compare the mean colour with the shard's JPEG.
    with tarfile.open(registry_dir / "datasets/web-demo/v1/shards/train-000000.tar") as tar:
        original = Image.open(io.BytesIO(tar.extractfile("000000002.jpg").read())).convert("RGB")
    mean = lambda im: np.asarray(im.resize((8, 8)), dtype=float).reshape(-1, 3).mean(axis=0)  # noqa: E731
    assert all(abs(a - b) < 12 for a, b in zip(mean(image.convert("RGB")), mean(original)))
    thumbs = client.app.state.thumbs
    hits = thumbs.hits
    assert client.get(url).content == response.content
    assert thumbs.hits == hits + 1


def test_thumbnail_of_a_dropped_capfilt_image_comes_from_the_parent(client: TestClient, registry_dir: Path) -> None:
    index = _index(registry_dir, "web-demo-capfilt").to_pylist()
    dropped = next(row for row in index if row["status"] == "dropped")
    assert dropped["shard"] is None  # CapFilt leaves it out of its shards
    response = client.get(f"/api/versions/dataset/web-demo-capfilt/v1/thumb/{dropped['key']}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    # web v1 dropped 000000005 before sharding and has no parent: a clear error, not a crash.
    response = client.get("/api/versions/dataset/web-demo/v1/thumb/000000005")
    assert response.status_code == 404 and "too_small" in response.json()["error"]


def test_thumbnail_errors(client: TestClient) -> None:
    base = "/api/versions/dataset/web-demo/v1"
    assert client.get(f"{base}/thumb/999999999").status_code == 404
    assert "size must be one of" in client.get(f"{base}/thumb/000000001?size=100").json()["error"]
    # (A bare ".." is resolved by the HTTP client itself before the request is sent.)
    for key in ("..%2f..%2fmanifest.json", "%2e%2e%2fmanifest.json", "%2e%2e", ".%2E"):
        response = client.get(f"{base}/thumb/{key}")
        assert response.status_code == 404, key
        assert response.headers["content-type"].startswith("application/json")


def test_referenced_image_file(client: TestClient) -> None:
    response = client.get("/api/versions/dataset/web-demo/v1/image?path=images/example.jpg")
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).format == "JPEG"


@pytest.mark.parametrize("raw_query, status", [
    ("path=../../../../etc/passwd", 400),
    ("path=/etc/passwd", 400),
    ("path=%2Fetc%2Fpasswd", 400),
    ("path=%2e%2e%2f%2e%2e%2fv2%2fimages%2fexample.jpg", 400),
    ("path=%252e%252e%252fmanifest.json", 404),
    ("path=images/../images/example.jpg", 400),
    ("path=images/./example.jpg", 400),
    ("path=images%5cexample.jpg", 400),
    ("path=manifest.json", 404),
    ("path=images/other.jpg", 404),
    ("path=index.parquet", 403),
    ("path=", 400),
])
def test_image_paths_are_refused(client: TestClient, raw_query: str, status: int) -> None:
    response = client.get(f"/api/versions/dataset/web-demo/v1/image?{raw_query}")
    assert response.status_code == status, response.text
    assert "refused" in response.json()["error"] or "empty" in response.json()["error"]
    assert b"root:" not in response.content


def test_symlinks_out_of_the_registry_are_refused(hostile) -> None:
    client, _, _ = hostile
    for url in ("/api/versions/dataset/symlinked/v1/image?path=images/cover.jpg",
                "/api/versions/dataset/symlinked/v1/thumb/000000000"):
        response = client.get(url)
        assert response.status_code == 403, response.text
        assert "outside the registry" in response.json()["error"]
        assert SECRET not in response.content


def _refused(response, status: int = 403) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "outside the registry" in response.json()["error"]
    assert SECRET not in response.content


def test_symlinked_index_is_refused(hostile) -> None:
    client, _, _ = hostile
    base = "/api/versions/dataset/symlinked-index/v1"
    for url in (f"{base}/samples", f"{base}/samples?q=secret", f"{base}/histograms", f"{base}/thumb/000000001",
                "/api/diff?a=ok-no-offsets@v1&b=symlinked-index@v1"):  # the diff reads through index.read_index
        _refused(client.get(url))
    detail = client.get(base)  # the page still opens, the index shows as refused
    assert detail.status_code == 200 and SECRET not in detail.content
    assert "outside the registry" in detail.json()["parquet"]["index"]["error"]


def test_symlinked_texts_are_refused(hostile) -> None:
    client, _, _ = hostile
    base = "/api/versions/dataset/symlinked-texts/v1"
    for url in (f"{base}/samples", f"{base}/samples?source=synthetic", f"{base}/histograms"):
        _refused(client.get(url))
    assert "outside the registry" in client.get(base).json()["parquet"]["texts"]["error"]


def test_symlinked_version_directory_is_refused(hostile, caplog: pytest.LogCaptureFixture) -> None:
    client, root, _ = hostile
    listed = client.get("/api/versions").json()["versions"]
    assert "symlinked-version@v1" not in {row["ref"] for row in listed}
    with caplog.at_level(logging.WARNING, logger="datasets_manifests.registry"):
        assert Registry(str(root)).versions("dataset", "symlinked-version") == []  # its manifest is never read
    assert "symlinked-version" in caplog.text and "outside the registry" in caplog.text
    base = "/api/versions/dataset/symlinked-version/v1"
    for url in (base, f"{base}/samples", f"{base}/histograms", f"{base}/lineage", f"{base}/thumb/000000000"):
        _refused(client.get(url))
    response = client.get("/api/diff?a=ok-no-offsets@v1&b=symlinked-version@v1")
    assert response.status_code == 404 and SECRET not in response.content


def test_image_byte_limit_is_413(registry_dir: Path, hostile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thumbnails, "MAX_IMAGE_BYTES", 100)  # every test JPEG is larger
    fresh = TestClient(create_app(str(registry_dir), thumb_cache_dir=tmp_path / "a"))  # nothing cached
    _, hostile_root, _ = hostile
    no_offsets = TestClient(create_app(str(hostile_root), thumb_cache_dir=tmp_path / "b"))
    for client, url in ((fresh, "/api/versions/dataset/web-demo/v1/thumb/000000001"),  # index byte range
                        (fresh, "/api/versions/dataset/web-demo/v1/image?path=images/example.jpg"),  # listed file
                        (no_offsets, "/api/versions/dataset/ok-no-offsets/v1/thumb/000000002")):  # tar member
        response = client.get(url)
        assert response.status_code == 413, (url, response.text)
        assert "100 byte limit" in response.json()["error"] or "image size limit" in response.json()["error"]


def test_tar_scan_fallback_without_offsets(hostile) -> None:
    client, _, _ = hostile
    response = client.get("/api/versions/dataset/ok-no-offsets/v1/thumb/000000001")
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).format == "JPEG"


@pytest.mark.parametrize("name, status, words", [
    ("missing-shard", 404, "missing from the registry"),
    ("corrupt-shard", 422, "cannot decode image"),
    ("corrupt-shard-no-offsets", 502, "corrupt"),
    ("truncated-shard", 502, "truncated"),
    ("bomb", 422, "pixel limit"),
    ("huge-bomb", 422, "cannot decode image"),
    ("garbage", 422, "cannot decode image"),
])
def test_broken_images_are_json_errors(hostile, name: str, status: int, words: str) -> None:
    client, _, _ = hostile
    response = client.get(f"/api/versions/dataset/{name}/v1/thumb/000000000")
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    # The rest of the version still works: its sample page and the other thumbnails.
    assert client.get(f"/api/versions/dataset/{name}/v1/samples").status_code == 200
    if name in ("bomb", "huge-bomb", "garbage"):
        assert client.get(f"/api/versions/dataset/{name}/v1/thumb/000000001").status_code == 200


def test_bomb_limit_is_below_pillows(hostile) -> None:
    from PIL import Image as PILImage

    assert 10000 * 8000 > MAX_IMAGE_PIXELS  # the "bomb" fixture trips our own header check
    assert PILImage.MAX_IMAGE_PIXELS is None or MAX_IMAGE_PIXELS <= PILImage.MAX_IMAGE_PIXELS


def test_corrupt_index_is_a_json_error(hostile) -> None:
    client, _, _ = hostile
    detail = client.get("/api/versions/dataset/corrupt-index/v1")
    assert detail.status_code == 200 and "cannot read index.parquet" in detail.json()["parquet"]["index"]["error"]
    response = client.get("/api/versions/dataset/corrupt-index/v1/samples")
    assert response.status_code == 502 and "per-sample index" in response.json()["error"]


# ---------------------------------------------------------------------------------------------- diff, models
def test_diff_between_versions(client: TestClient, registry_dir: Path) -> None:
    body = client.get("/api/diff?a=web-demo@v1&b=web-demo@v2").json()
    a, b = (_index(registry_dir, "web-demo", v).to_pylist() for v in ("v1", "v2"))
    keys_a, keys_b = {r["key"] for r in a}, {r["key"] for r in b}
    captions_a = {r["key"]: r["caption"] for r in a}
    recaptioned = {r["key"] for r in b if r["key"] in keys_a and captions_a[r["key"]] != r["caption"]}
    assert body["counts"]["added"] == len(keys_b - keys_a) == 4
    assert body["counts"]["removed"] == len(keys_a - keys_b) == 2
    assert body["counts"]["recaptioned"] == len(recaptioned) == 2
    assert body["counts"]["restored"] == 1  # 000000005 was dropped in v1 and is back in v2
    added = client.get("/api/diff?a=web-demo@v1&b=web-demo@v2&category=added").json()
    assert {row["key"] for row in added["rows"]} == keys_b - keys_a
    assert all(row["a"] is None and row["b"]["caption"] for row in added["rows"])
    removed = client.get("/api/diff?a=web-demo@v1&b=web-demo@v2&category=removed").json()
    assert all(row["b"] is None and "/web-demo/v1/thumb/" in row["thumb"] for row in removed["rows"])
    assert client.get(removed["rows"][0]["thumb"]).status_code == 200
    paged = client.get("/api/diff?a=web-demo@v1&b=web-demo@v2&limit=3&offset=3").json()
    assert paged["total"] == 9 and len(paged["rows"]) == 3
    # Pages of "all changes" (slices across category boundaries) are the categories one after the other.
    walked = [(row["category"], row["key"]) for offset in range(0, 10, 2)
              for row in client.get(f"/api/diff?a=web-demo@v1&b=web-demo@v2&limit=2&offset={offset}").json()["rows"]]
    by_category = [(row["category"], row["key"]) for category in body["counts"]
                   for row in client.get(f"/api/diff?a=web-demo@v1&b=web-demo@v2&category={category}").json()["rows"]]
    assert walked == by_category and len(walked) == 9
    # Each side's row is the row of that key in its index (read by row number), and only the rows' fields.
    by_key_a, by_key_b = {r["key"]: r for r in a}, {r["key"]: r for r in b}
    for row in body["rows"]:
        assert set(row) <= {"key", "category", "reason", "a", "b", "thumb"}
        for side, index in (("a", by_key_a), ("b", by_key_b)):
            if row[side] is not None:
                assert row[side]["caption"] == index[row["key"]]["caption"]
                assert row[side]["status"] == index[row["key"]]["status"]
            else:
                assert row["key"] not in index


def test_diff_of_capfilt_shows_kept_texts(client: TestClient) -> None:
    body = client.get("/api/diff?a=web-demo@v1&b=web-demo-capfilt@v1&category=newly_dropped").json()
    assert body["total"] == body["counts"]["newly_dropped"] > 0
    row = body["rows"][0]
    assert row["reason"] == "no_caption_kept" and row["b"]["kept_texts"] == []
    recaptioned = client.get("/api/diff?a=web-demo@v1&b=web-demo-capfilt@v1&category=recaptioned").json()
    assert all(r["b"]["caption_source"] == "synthetic" for r in recaptioned["rows"])


def test_diff_page_thumbnails_need_no_lookup_by_key(registry_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A diff page reads each side's rows by row number, with their images' locations: its thumbnails (a dropped
    CapFilt sample's from its parent) are served without a scan of either index for their keys."""
    from datasets_manifests.browser import query

    client = TestClient(create_app(str(registry_dir), thumb_cache_dir=tmp_path / "thumbs"))  # empty caches
    rows = client.get("/api/diff?a=web-demo@v1&b=web-demo-capfilt@v1&limit=50").json()["rows"]
    assert {row["category"] for row in rows} >= {"newly_dropped", "recaptioned", "removed"}
    monkeypatch.setattr(query.VersionData, "locate", lambda *args: pytest.fail("index scanned for a key"))
    for row in rows:
        response = client.get(row["thumb"])
        if row["key"] == "000000005":  # dropped before sharding in v1 (too small): no image anywhere
            assert response.status_code == 404 and "too_small" in response.json()["error"]
        else:
            assert response.status_code == 200, row


@pytest.mark.parametrize("query, status", [
    ("a=web-demo@v1", 400), ("a=web-demo@v1&b=web-demo@v7", 404), ("a=nothing&b=web-demo@v1", 404),
    ("a=web-demo@v1&b=web-demo@v2&category=renamed", 400), ("a=../etc&b=web-demo@v1", 400),
])
def test_diff_errors(client: TestClient, query: str, status: int) -> None:
    response = client.get(f"/api/diff?{query}")
    assert response.status_code == status and response.json()["error"]


def test_models_side_by_side(client: TestClient) -> None:
    body = client.get("/api/models").json()
    rows = {row["ref"]: row for row in body["models"]}
    assert set(rows) == {"blip-tiny-pretrain@v1", "blip-tiny-bootstrapped@v1"}
    assert rows["blip-tiny-bootstrapped@v1"]["datasets"] == ["web-demo-capfilt@v1"]
    assert rows["blip-tiny-bootstrapped@v1"]["metrics"]["retrieval+caption/tr_r1"] == pytest.approx(14.9)
    assert rows["blip-tiny-pretrain@v1"]["metrics"]["train/loss_itc"] == pytest.approx(2.91)
    assert set(body["columns"]) == set().union(*(row["metrics"] for row in rows.values()))


def test_unknown_api_path_is_json_and_serve_binds_loopback(client: TestClient) -> None:
    response = client.get("/api/nope")
    assert response.status_code == 404 and response.json()["error"]
    assert inspect.signature(browser_app.serve).parameters["host"].default == "127.0.0.1"
    assert client.get("/favicon.ico").status_code == 204


@pytest.mark.parametrize("path", ["/", "/api/versions", "/api/versions/dataset/web-demo/v1",
                                  "/api/versions/dataset/web-demo/v1/samples", "/api/diff?a=web-demo@v1&b=web-demo@v2",
                                  "/api/versions/dataset/web-demo/v1/image?path=images/example.jpg"])
def test_the_app_is_read_only(client: TestClient, registry_dir: Path, path: str) -> None:
    before = sorted(p.relative_to(registry_dir) for p in registry_dir.rglob("*"))
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = client.request(method, path, content=b"{}")
        assert response.status_code == 405, (method, path, response.text)
        assert response.json()["error"]
    assert sorted(p.relative_to(registry_dir) for p in registry_dir.rglob("*")) == before


def test_a_missing_local_registry_is_refused_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "registry"
    with pytest.raises(NotFoundError, match="no registry at .*does not exist"):
        create_app(str(missing), thumb_cache_dir=tmp_path / "thumbs")
    assert not (tmp_path / "typo").exists()


def test_thumbnail_cache_is_per_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = thumbnails.ThumbnailCache()
    assert cache.cache_dir == tmp_path / "cache" / "blip" / "thumbs"
    assert stat.S_IMODE(os.stat(cache.cache_dir).st_mode) == 0o700
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert thumbnails.default_cache_dir() == tmp_path / "home" / ".cache" / "blip" / "thumbs"


def test_version_url_and_browse_line() -> None:
    from datasets_manifests.browser import browse_line, version_url
    from datasets_manifests.manifest import Manifest

    manifest = Manifest(kind="dataset", name="web-demo", version="v2", producer=Producer(stage="test"))
    assert version_url(manifest) == "http://127.0.0.1:8765/#/v/dataset/web-demo/v2"
    assert browse_line(manifest, "/data/my registry") == (
        "browse: blip data serve --registry '/data/my registry'  ->  http://127.0.0.1:8765/#/v/dataset/web-demo/v2")


def test_stage_runs_log_and_record_the_browser_url(registry_dir: Path, stages_without_prefect) -> None:
    """`run_stage` (Prefect stubbed out: the wiring, not Prefect, is under test) prints the browse line."""
    from pipelines.flows import stages

    registry = Registry(str(registry_dir))
    manifest = registry.resolve("web-demo@v2")
    logged, artifacts, metadata = stages_without_prefect
    result = stages.run_stage("shard", lambda registry: manifest, registry=registry, output_kind="dataset",
                              output_name="web-demo")
    url = "http://127.0.0.1:8765/#/v/dataset/web-demo/v2"
    assert result == manifest
    assert f"browse: blip data serve --registry {registry.url}  ->  {url}" in logged
    table = {row["field"]: row["value"] for row in artifacts[0]["table"]}
    assert table["browse"] == url and table["registry"] == registry.url
    assert url in artifacts[0]["description"] and metadata["browse"] == url


def test_new_versions_appear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser_app, "CATALOG_TTL_S", 0.0)
    root = tmp_path / "registry"
    root.mkdir()  # the browser never creates a registry
    client = TestClient(create_app(str(root), thumb_cache_dir=tmp_path / "thumbs"))
    assert client.get("/api/versions").json()["versions"] == []
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "metrics.json").write_text(json.dumps({"cider": 1.0}))
    Registry(str(root)).publish(kind="evaluation", name="late-eval", staging_dir=staging,
                                files=[{"path": "metrics.json", "role": "metrics"}],
                                producer=Producer(stage="evaluate"), stats={"metrics": {"cider": 1.0}})
    assert [row["ref"] for row in client.get("/api/versions").json()["versions"]] == ["late-eval@v1"]
    assert client.get("/api/versions/evaluation/late-eval/v1").status_code == 200


def test_remote_registry_over_fsspec(tmp_path: Path) -> None:
    """An fsspec registry (memory://, as s3:// or gs:// would be): Parquet and shards read through fsspec."""
    import uuid

    url = f"memory://browser-{uuid.uuid4().hex[:8]}"
    build_sample_registry(url)
    client = TestClient(create_app(url, thumb_cache_dir=tmp_path / "thumbs"))
    body = client.get("/api/versions/dataset/web-demo-capfilt/v1/samples?source=synthetic&min_score=0.9").json()
    assert body["total"] > 0 and all(
        any(t["source"] == "synthetic" and t["itm_score"] >= 0.9 for t in s["texts"]) for s in body["samples"])
    thumb = client.get(body["samples"][0]["thumb"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert client.get("/api/diff?a=web-demo@v1&b=web-demo@v2").json()["counts"]["added"] == 4
    refused = client.get("/api/versions/dataset/web-demo/v1/image?path=../v2/index.parquet")
    assert refused.status_code == 400


def test_metrics_fall_back_to_what_stages_record() -> None:
    from datasets_manifests.browser.views import metrics_of
    from datasets_manifests.manifest import Manifest

    model = Manifest(kind="model", name="m", version="v1", producer=Producer(stage="pretrain"),
                     stats={"last": {"loss_itc": 2.5, "step": 10, "lr": {"vit": 1e-4}}, "wall_time_s": 3.0})
    assert metrics_of(model) == {"loss_itc": 2.5, "step": 10, "lr.vit": 1e-4}
    evaluation = Manifest(kind="evaluation", name="e", version="v1", producer=Producer(stage="evaluate"),
                          stats={"coco": {"tr_r1": 12.0, "note": "text"}, "flag": True})
    assert metrics_of(evaluation) == {"coco.tr_r1": 12.0}
    explicit = Manifest(kind="model", name="m", version="v2", producer=Producer(stage="pretrain"),
                        metadata={"metrics": {"cider": 1.5}}, stats={"last": {"loss": 1.0}})
    assert metrics_of(explicit) == {"cider": 1.5}


@pytest.mark.parametrize("remote", [False, True])
def test_locating_a_key_reads_the_row_groups_its_bloom_filter_may_hold_it_in(tmp_path: Path, monkeypatch, remote):
    """A sample's image is found by its key (a thumbnail outside a listed page, the takedown check): in an index
    whose keys are shuffled (as CapFilt lists them) the min/max statistics rule out no row group, the key's Bloom
    filters rule out all but ~1 %. An index written without filters has every row group read, the same answer."""
    import random

    from datasets_fixtures import memory_url, publish_dataset, sample_rows

    from datasets_manifests import index
    from datasets_manifests.browser import query
    from datasets_manifests.registry import Registry

    monkeypatch.setattr(index, "ROW_GROUP_SIZE", 4)  # 40 rows: 10 row groups
    rows = sample_rows(40)
    random.Random(0).shuffle(rows)
    registry = Registry(memory_url() if remote else str(tmp_path / "registry"))
    manifest = publish_dataset(registry, tmp_path / "v", "capfilt-like", rows)
    table = index.read_index(registry, manifest)
    data = query.VersionData(registry, manifest)
    wanted = table.column("key")[21].as_py()
    groups = data._row_groups_that_may_hold(data.index_path, "key", wanted)
    assert 5 in groups and len(groups) <= 2  # row 21 is in row group 5
    found = data.locate(wanted)
    assert found is not None and found["key"] == wanted and found["shard"] == table.column("shard")[21].as_py()
    assert data.locate("no-such-key") is None
    with registry.fs.open(registry.path_of(manifest, index.INDEX_FILE), "wb") as handle:
        pq.write_table(table, handle, row_group_size=4)  # as an index written before the filters
    data = query.VersionData(registry, manifest)
    assert data._row_groups_that_may_hold(data.index_path, "key", wanted) == list(range(10))
    assert data.locate(wanted) == found
