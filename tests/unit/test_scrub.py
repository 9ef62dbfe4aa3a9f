"""`blip data rm OLD --data-only` after a takedown: the version it replaced is freed and its index, texts, source
list and stats written again as the newest version of its line has them (`datasets_manifests.scrub`), on a local
and a memory:// registry."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from datasets_manifests import scrub as scrub_module
from datasets_manifests.index import read_texts, scan_index
from datasets_manifests.ops import verify
from datasets_manifests.registry import Registry
from pipelines.cli import main

from datasets_fixtures import memory_url, publish_dataset, publish_model, sample_rows

URL = "http://127.0.0.1/img/{}.jpg"


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> Registry:
    """raw@v1 (6 samples; a source list, a ground truth without urls) -> capfilt@v1 (texts, stats quoting rejects)
    -> pretrain@v1 (a model)."""
    registry = Registry(tmp_path / "registry" if request.param == "local" else memory_url())
    rows = sample_rows(6)
    tables = {"source.parquet": [{"url": row["url"], "caption": row["raw_caption"]} for row in rows],
              "ground_truth.parquet": [{"path": f"/img/{i}.jpg", "shape": "circle"} for i in range(6)]}
    raw = publish_dataset(registry, tmp_path / "raw", "raw", rows, stage="download", tables=tables)
    texts = [{"key": row["key"], "text": f"{source} {i}", "source": source, "itm_score": 0.9, "kept": True,
              "drop_reason": None} for i, row in enumerate(rows) for source in ("web", "synthetic")]  # fmt: skip
    rejects = [{"key": row["key"], "text": f"rejected {i}"} for i, row in enumerate(rows)]
    capfilt = publish_dataset(registry, tmp_path / "cf", "capfilt", sample_rows(6), parents=(raw,), stage="capfilt",
                              texts=texts, json_stats={"stats.json": {"rejects": rejects}})  # fmt: skip
    publish_model(registry, tmp_path / "model", [capfilt])
    return registry


def data(capsys, registry: Registry, *args: str) -> tuple[int, str, str]:
    code = main(["data", "--registry", registry.url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def index_of(registry: Registry, ref: str) -> dict[str, dict]:
    return {row["key"]: row for batch in scan_index(registry, registry.resolve(ref)) for row in batch.to_pylist()}


def test_freeing_a_replaced_version_writes_its_files_again_without_what_was_taken(registry, capsys, tmp_path):
    before = {name: index_of(registry, f"{name}@v1") for name in ("raw", "capfilt")}
    code, out, _ = data(capsys, registry, "takedown", "--url", URL.format(3))
    assert code == 0 and "blip data rm capfilt@v1 raw@v1 --data-only" in out
    code, out, _ = data(capsys, registry, "rm", "capfilt@v1", "raw@v1", "--data-only", "--dry-run", "--json")
    plan = {removal["ref"]: removal["scrub"] for removal in json.loads(out)["removals"]}
    assert plan["raw@v1"] == {"as": "raw@v2", "files": ["index.parquet", "source.parquet"]}
    assert plan["capfilt@v1"] == {"as": "capfilt@v2", "files": ["index.parquet", "texts.parquet", "stats.json"]}
    assert index_of(registry, "raw@v1") == before["raw"]  # a dry run writes nothing
    code, out, _ = data(capsys, registry, "rm", "capfilt@v1", "raw@v1", "--data-only", "--yes")
    assert code == 0 and "index.parquet, source.parquet written again as raw@v2 has them" in out

    for name in ("raw", "capfilt"):
        rows = index_of(registry, f"{name}@v1")
        # The old version's own decisions stay (s000003 was kept there); its texts are gone; the rest as it was.
        assert rows["s000003"]["status"] == "ok" and rows["s000003"]["url"] == URL.format(3)
        assert rows["s000003"]["caption"] is None and rows["s000003"]["raw_caption"] is None
        assert {key: row for key, row in rows.items() if key != "s000003"} == \
            {key: row for key, row in before[name].items() if key != "s000003"}  # fmt: skip
        assert verify(registry, f"{name}@v1") == []
    raw_v1, raw_v2 = registry.resolve("raw@v1"), registry.resolve("raw@v2")
    source_list = pq.read_table(registry.open(raw_v1, "source.parquet")).to_pylist()
    assert [row["url"] for row in source_list] == [URL.format(i) for i in range(6) if i != 3]
    assert pq.read_table(registry.open(raw_v1, "ground_truth.parquet")).num_rows == 6  # names no url: as it was
    capfilt_v1 = registry.resolve("capfilt@v1")
    texts = read_texts(registry, capfilt_v1).to_pylist()
    assert [(t["text"], t["kept"]) for t in texts if t["key"] == "s000003"] == [(None, True), (None, True)]
    assert sum(t["text"] is not None for t in texts) == 10
    quoted = [reject["key"] for reject in json.load(registry.open(capfilt_v1, "stats.json"))["rejects"]]
    assert "s000003" not in quoted and len(quoted) == 5
    record = registry.removal(raw_v1)["scrubbed"]
    assert record["as"] == "raw@v2" and record["done"] and set(record["files"]) == {"index.parquet", "source.parquet"}
    assert raw_v1.file("source.parquet").sha256 != record["files"]["source.parquet"]["sha256"]
    assert record["files"]["source.parquet"]["sha256"] == raw_v2.file("source.parquet").sha256

    # An export of the old version names neither the sample's url nor its texts.
    for ref in ("raw@v1", "capfilt@v1"):
        assert data(capsys, registry, "export", ref, "--out", str(tmp_path / f"{ref}.json"))[0] == 0
        exported = json.loads((tmp_path / f"{ref}.json").read_text())
        assert exported and URL.format(3) not in {entry["url"] for entry in exported}, ref
        assert all(entry["caption"] for entry in exported)
    # What the takedown request asks is still answered: the old versions kept it, and what was trained on them.
    code, out, _ = data(capsys, registry, "find", "--url", URL.format(3), "--json")
    found = json.loads(out)
    assert found["kept_in"] == ["capfilt@v1", "raw@v1"]
    assert [m["ref"] for m in found["trained_on_it"]] == ["pretrain@v1"]
    # Again: nothing left to free or to write.
    code, out, _ = data(capsys, registry, "rm", "raw@v1", "--data-only", "--dry-run", "--json")
    assert json.loads(out)["removals"][0]["scrub"] is None and json.loads(out)["removals"][0]["files"] == 0


def test_a_further_takedown_is_written_into_the_versions_the_first_replaced(registry, capsys):
    assert data(capsys, registry, "takedown", "raw@v1", "--key", "s000001")[0] == 0
    assert data(capsys, registry, "rm", "raw@v1", "--data-only", "--yes")[0] == 0
    assert index_of(registry, "raw@v1")["s000001"]["raw_caption"] is None
    code, out, _ = data(capsys, registry, "takedown", "raw@v2", "--key", "s000004")
    assert code == 0 and "blip data rm raw@v1 raw@v2 --data-only" in out  # raw@v1 still quotes s000004
    code, out, _ = data(capsys, registry, "rm", "raw@v1", "raw@v2", "--data-only", "--yes")
    assert code == 0 and "raw@v1 (dataset, its data files): 0 files" in out and "as raw@v3 has them" in out
    for ref in ("raw@v1", "raw@v2"):
        rows = index_of(registry, ref)
        assert [rows[key]["raw_caption"] for key in ("s000001", "s000004")] == [None, None]
        assert rows["s000002"]["raw_caption"] is not None
        urls = [row["url"] for row in pq.read_table(registry.open(registry.resolve(ref), "source.parquet")).to_pylist()]
        assert urls == [URL.format(i) for i in (0, 2, 3, 5)]
        assert verify(registry, ref) == []
        assert registry.removal(registry.resolve(ref))["scrubbed"]["as"] == "raw@v3"


def test_a_scrub_stopped_half_way_verifies_and_is_finished_by_the_same_command(registry, capsys, monkeypatch):
    assert data(capsys, registry, "takedown", "raw@v1", "--key", "s000002")[0] == 0
    real_replace = scrub_module._replace
    replaced = []

    def killed_after_one(registry, manifest, path, written):
        if replaced:
            raise KeyboardInterrupt  # the operator's ^C, or a kill, between two files
        replaced.append(path)
        real_replace(registry, manifest, path, written)

    monkeypatch.setattr(scrub_module, "_replace", killed_after_one)
    assert data(capsys, registry, "rm", "raw@v1", "--data-only", "--yes")[0] == 130  # interrupted
    raw_v1 = registry.resolve("raw@v1")
    assert replaced == ["index.parquet"] and registry.removal(raw_v1)["scrubbed"]["done"] is False
    assert verify(registry, raw_v1) == []  # each file as published or as written again
    monkeypatch.setattr(scrub_module, "_replace", real_replace)
    code, out, _ = data(capsys, registry, "rm", "raw@v1", "--data-only", "--yes")
    assert code == 0 and "written again as raw@v2" in out
    assert registry.removal(raw_v1)["scrubbed"]["done"] is True and verify(registry, raw_v1) == []
    assert len(pq.read_table(registry.open(raw_v1, "source.parquet"))) == 5

    # A further takedown, and its scrub stopped half-way too: a file not yet replaced again is as the first scrub
    # left it, which verify refused (neither the manifest's nor the new step's) until the scrub was finished.
    assert data(capsys, registry, "takedown", "raw@v2", "--key", "s000004")[0] == 0
    replaced.clear()
    monkeypatch.setattr(scrub_module, "_replace", killed_after_one)
    assert data(capsys, registry, "rm", "raw@v1", "--data-only", "--yes")[0] == 130
    assert replaced == ["index.parquet"] and registry.removal(raw_v1)["scrubbed"]["as"] == "raw@v3"
    assert verify(registry, raw_v1) == []
    monkeypatch.setattr(scrub_module, "_replace", real_replace)
    assert data(capsys, registry, "rm", "raw@v1", "--data-only", "--yes")[0] == 0
    assert verify(registry, raw_v1) == [] and len(pq.read_table(registry.open(raw_v1, "source.parquet"))) == 4

    # A file that is neither as published nor as written again is damage, and said so.
    with registry.fs.open(registry.path_of(raw_v1, "source.parquet"), "wb") as handle:
        pq.write_table(pq.read_table(registry.open(registry.resolve("raw@v2"), "ground_truth.parquet")), handle)
    (problem,) = verify(registry, raw_v1)
    assert problem.startswith("source.parquet: ") and "neither the manifest's nor" in problem


def test_a_successor_that_is_not_the_version_row_for_row_is_refused(tmp_path, capsys):
    registry = Registry(tmp_path / "registry")
    rows = sample_rows(4)
    raw = publish_dataset(registry, tmp_path / "raw", "raw", rows, stage="download")
    other = sample_rows(4)
    other[1], other[2] = other[2], other[1]
    publish_dataset(registry, tmp_path / "v2", "raw", other, parents=(raw,), stage="takedown")
    before = index_of(registry, "raw@v1")
    code, _, err = data(capsys, registry, "rm", "raw@v1", "--data-only", "--yes")
    assert code != 0 and "raw@v2/index.parquet is not raw@v1/index.parquet row for row" in err
    assert "first other key: 's000001'" in err and index_of(registry, "raw@v1") == before


def test_the_browser_shows_a_taken_sample_nowhere_and_the_scrubbed_index_at_once(registry, capsys, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    """A taken sample's image is shown by no version (not the takedown's, whose parent still has it; not the
    replaced one's; a thumbnail cached before is not served, and leaves the disk); once the old version is freed,
    a running browser reads its scrubbed index, not the footers it had of the file before."""
    from starlette.testclient import TestClient

    from datasets_manifests.browser import app as browser_app

    monkeypatch.setattr(browser_app, "CATALOG_TTL_S", 0.0)  # every request lists again: no wait in the test
    thumbs = tmp_path / "thumbs"
    client = TestClient(browser_app.create_app(registry.url, thumb_cache_dir=thumbs))

    def samples(ref: str) -> dict[str, dict]:
        name, version = ref.split("@")
        body = client.get(f"/api/versions/dataset/{name}/{version}/samples").json()
        return {row["key"]: row for row in body["samples"]}

    before = samples("raw@v1")
    shown = client.get(before["s000003"]["thumb"])
    assert shown.status_code == 200 and "immutable" not in shown.headers["cache-control"]  # a day in a web browser
    assert len(list(thumbs.rglob("*.jpg"))) == 1
    assert data(capsys, registry, "takedown", "--url", URL.format(3))[0] == 0
    for ref, says in (("raw@v1", "taken out by a takedown (raw@v2)"), ("capfilt@v1", "(capfilt@v2)"),
                      ("raw@v2", "raw@v2 sample 's000003' was taken out by a takedown")):  # fmt: skip
        answer = client.get(samples(ref)["s000003"]["thumb"])
        assert answer.status_code == 410 and says in answer.json()["error"], (ref, answer.json())
    assert list(thumbs.rglob("*.jpg")) == []  # the thumbnail cached before is gone from disk
    assert client.get(before["s000002"]["thumb"]).status_code == 200  # the others are shown
    assert samples("raw@v1")["s000003"]["caption"] == before["s000003"]["caption"] is not None
    assert data(capsys, registry, "rm", "raw@v1", "--data-only", "--yes")[0] == 0
    after = samples("raw@v1")
    assert after["s000003"]["caption"] is None and after["s000002"]["caption"] == before["s000002"]["caption"]


def test_two_files_read_in_batches_of_other_sizes_are_paired_row_for_row():
    """The old and the newest file have other row groups: their rows are paired by position, whatever the sizes."""
    from datasets_manifests.scrub import ScrubError, _row_for_row

    def batches(sizes, texts):
        start = 0
        for size in sizes:
            rows = range(start, start + size)
            yield pa.record_batch({"key": [f"k{i}" for i in rows], "text": [texts(i) for i in rows]})
            start += size

    pairs = list(_row_for_row(batches([3, 0, 4, 1, 2], lambda i: f"t{i}"),
                              batches([5, 5], lambda i: None if i % 4 == 0 else "x")))  # fmt: skip
    assert [len(old) for old, _ in pairs] == [3, 4, 1, 2]
    for old, new in pairs:
        assert old["key"].to_pylist() == new["key"].to_pylist()
        kept = pc.if_else(pc.is_valid(new["text"]), old["text"], pa.scalar(None, pa.string()))
        assert kept.to_pylist() == [None if int(k[1:]) % 4 == 0 else f"t{k[1:]}" for k in old["key"].to_pylist()]
    with pytest.raises(ScrubError, match="fewer rows"):
        list(_row_for_row(batches([6], str), batches([5], str)))
    with pytest.raises(ScrubError, match="more rows"):
        list(_row_for_row(batches([4], str), batches([5], str)))


def test_a_takedown_can_free_the_versions_it_replaced_at_once(registry, capsys):
    code, out, _ = data(capsys, registry, "takedown", "--url", URL.format(4), "--free-old")
    assert code == 0 and "blip data rm" not in out  # nothing left to run
    assert "freed capfilt@v1: 1 files" in out and "written again as capfilt@v2 has them" in out
    assert "freed raw@v1: 1 files" in out and "index.parquet, source.parquet written again as raw@v2" in out
    for ref in ("raw@v1", "capfilt@v1"):
        assert index_of(registry, ref)["s000004"]["raw_caption"] is None and verify(registry, ref) == []
        assert registry.removal(registry.resolve(ref))["scrubbed"]["done"] is True
    code, out, _ = data(capsys, registry, "takedown", "raw@v2", "--key", "s000001", "--free-old", "--json")
    answer = json.loads(out)
    assert answer["old"] == ["raw@v1", "raw@v2"]  # the whole line before raw@v3
    assert sorted((freed["ref"], freed["scrub"]["as"]) for freed in answer["freed"]) == [("raw@v1", "raw@v3"),
                                                                                        ("raw@v2", "raw@v3")]
    assert index_of(registry, "raw@v1")["s000001"]["raw_caption"] is None
