"""`blip data takedown`: samples taken out of every dataset version that keeps them, each as its next version made
from it (shards rewritten without them, their index rows dropped as 'takedown', a CapFilt version's texts too), on a
local and a memory:// registry."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import pyarrow.parquet as pq

from datasets_manifests.index import read_texts, scan_index
from datasets_manifests.ops import verify
from datasets_manifests.registry import Registry
from pipelines.cli import main

from datasets_fixtures import memory_url, publish_dataset, publish_model, sample_rows

URL = "http://127.0.0.1/img/{}.jpg"


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> Registry:
    """raw@v1 (8 samples, 1 dropped; its source list and a ground truth without urls) -> capfilt@v1 (with texts)
    -> pretrain@v1 (a model)."""
    registry = Registry(tmp_path / "registry" if request.param == "local" else memory_url())
    rows = sample_rows(8, dropped={2: "failed_to_download"})
    tables = {"source.parquet": [{"url": row["url"], "caption": row["raw_caption"]} for row in rows],
              "ground_truth.parquet": [{"path": f"/img/{i}.jpg", "shape": "circle"} for i in range(8)]}
    raw = publish_dataset(registry, tmp_path / "raw", "raw", rows, stage="download", cache_key="raw-key",
                          tables=tables)  # fmt: skip
    texts = [{"key": f"s{i:06d}", "text": text, "source": source, "itm_score": 0.9, "kept": True, "drop_reason": None}
             for i in range(8) if i != 2 for text, source in ((f"web {i}", "web"), (f"synthetic {i}", "synthetic"))]
    capfilt = publish_dataset(registry, tmp_path / "cf", "capfilt", sample_rows(8, dropped={2: "failed_to_download"}),
                              parents=(raw,), stage="capfilt", texts=texts)  # fmt: skip
    publish_model(registry, tmp_path / "model", [capfilt])
    return registry


def rows_of(registry: Registry, ref: str) -> dict[str, dict]:
    manifest = registry.resolve(ref)
    return {row["key"]: row for batch in scan_index(registry, manifest) for row in batch.to_pylist()}


def test_a_takedown_by_url_rewrites_every_version_that_keeps_it(registry, capsys, caplog):
    assert registry.find_cached("dataset", "raw", "raw-key").version == "v1"
    with caplog.at_level(logging.INFO, logger="pipelines.tasks.takedown"):
        code = main(["data", "--registry", registry.url, "takedown", "--url", URL.format(3), "--url", URL.format(2)])
    out = capsys.readouterr().out
    assert code == 0
    # Its progress, a file at a time (a line a minute off a terminal, and one at the end)
    files = {ref: len(registry.resolve(ref).files) for ref in ("capfilt@v1", "raw@v1")}
    assert sorted(record.getMessage().split(",")[0] for record in caplog.records) == [
        f"takedown {ref}: {count} / {count} files (100.0 %)" for ref, count in files.items()]
    assert "capfilt@v1 -> capfilt@v2: 1 samples taken out (1 shards rewritten)" in out
    assert "raw@v1 -> raw@v2: 1 samples taken out" in out  # s000002 was dropped already: nothing to take out
    assert "the same files (they name no url; look at them): ground_truth.parquet" in out
    assert "blip data rm capfilt@v1 raw@v1 --data-only" in out
    assert "made from the old versions (a takedown does not change them): pretrain@v1 (model)" in out

    for name in ("raw", "capfilt"):
        old, new = registry.resolve(f"{name}@v1"), registry.resolve(f"{name}@v2")
        assert new.parents == (old.ref,) and new.producer.stage == "takedown"
        kept_before = sum(row["status"] == "ok" for row in rows_of(registry, old.ref).values())
        assert new.counts["taken_down"] == 1 and new.counts["kept"] == kept_before - 1
        assert new.drop_reasons == {"failed_to_download": 1, "takedown": 1}
        assert new.shards()[0].num_samples == old.shards()[0].num_samples - 1
        rows = rows_of(registry, new.ref)
        assert rows["s000003"]["status"] == "dropped" and rows["s000003"]["shard"] is None
        assert rows["s000003"]["drop_reason"] == "takedown" and rows["s000003"]["url"] == URL.format(3)
        assert rows["s000003"]["caption"] is None and rows["s000003"]["raw_caption"] is None  # its texts are gone
        assert new.producer.config == {"samples": 1, "keys_sha256": hashlib.sha256(b"s000003").hexdigest()}
        for row in rows.values():  # every kept image is where the new index says, the same bytes
            if row["status"] == "ok":
                data = registry.read_range(new, row["shard"], row["jpg_offset"], row["jpg_bytes"])
                assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
        assert verify(registry, new) == []
    texts = read_texts(registry, registry.resolve("capfilt@v2")).to_pylist()
    assert [(t["text"], t["source"], t["kept"], t["drop_reason"]) for t in texts if t["key"] == "s000003"] == [
        (None, "web", False, "takedown"), (None, "synthetic", False, "takedown")]
    # The download's source list loses the url; a file that names no url is the same file, and says so.
    raw_v1, raw_v2 = registry.resolve("raw@v1"), registry.resolve("raw@v2")
    source_list = pq.read_table(registry.open(raw_v2, "source.parquet")).to_pylist()
    assert [row["url"] for row in source_list] == [URL.format(i) for i in range(8) if i != 3]
    assert raw_v2.stats["takedown"]["tables_rewritten"] == ["source.parquet"]
    assert raw_v2.stats["takedown"]["unchanged"] == ["ground_truth.parquet"]
    assert raw_v2.file("ground_truth.parquet").sha256 == raw_v1.file("ground_truth.parquet").sha256
    assert sum(t["kept"] for t in texts) == 2 * 6

    # Again: nothing left but the replaced versions; named, the versions already published.
    assert main(["data", "--registry", registry.url, "takedown", "--url", URL.format(3)]) == 0
    assert "keeps them, but those a takedown replaced" in capsys.readouterr().out
    assert main(["data", "--registry", registry.url, "takedown", "raw@v1", "capfilt@v1", "--url", URL.format(3),
                 "--json"]) == 0  # fmt: skip
    again = json.loads(capsys.readouterr().out)
    assert sorted((v["from"], v["to"]) for v in again["versions"]) == [("capfilt@v1", "capfilt@v2"),
                                                                       ("raw@v1", "raw@v2")]
    assert [m.version for m in registry.versions("dataset", "raw")] == ["v1", "v2"]
    # A rerun of the stage that made raw@v1 goes on from the data as it is now.
    assert registry.find_cached("dataset", "raw", "raw-key").version == "v2"
    assert registry.find_cached("dataset", "raw", "raw-key", follow_takedowns=False).version == "v1"
    main(["data", "--registry", registry.url, "find", "--url", URL.format(3), "--json"])
    assert json.loads(capsys.readouterr().out)["kept_in"] == ["capfilt@v1", "raw@v1"]


def test_two_takedowns_of_one_version_at_once_do_not_fork_its_line(tmp_path):
    """Takedowns of different samples of one version held different work: both found no successor, both
    published one (v2 without A, v3 without B, both made from v1) and the newest kept A. Now a version's
    takedowns hold one work: the second is refused while the first runs (here another process holds it)."""
    import subprocess
    import sys

    from datasets_manifests.registry import WorkInProgressError
    from pipelines.tasks.takedown import line_key, run_takedown

    registry = Registry(tmp_path / "registry")
    publish_dataset(registry, tmp_path / "raw", "raw", sample_rows(8), stage="download")
    holding = ("import sys, time\nfrom datasets_manifests.registry import Registry\n"
               "from pipelines.tasks.takedown import line_key\n"
               f"registry = Registry({str(registry.root)!r})\n"
               "registry.note_work(line_key(registry.resolve('raw@v1')), stage='takedown', name='raw')\n"
               "print('held', flush=True)\ntime.sleep(120)\n")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", holding], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkInProgressError, match="takedown → raw .* running already"):
            run_takedown(registry, "raw@v1", urls=[URL.format(4)])
    finally:
        holder.kill()
        holder.wait()
    assert run_takedown(registry, "raw@v1", urls=[URL.format(4)]).version == "v2"
    with pytest.raises(ValueError, match="a takedown already replaced it"):
        run_takedown(registry, "raw@v1", urls=[URL.format(5)])
    assert [m.version for m in registry.versions("dataset", "raw")] == ["v1", "v2"]
    assert line_key(registry.resolve("raw@v1")) != line_key(registry.resolve("raw@v2"))


def test_a_takedown_of_a_named_version_by_key_and_what_it_refuses(registry, capsys):
    assert main(["data", "--registry", registry.url, "takedown", "raw@v1", "--key", "s000005", "--key", "s000006"]) == 0
    assert "raw@v1 -> raw@v2: 2 samples taken out" in capsys.readouterr().out
    assert registry.versions("dataset", "capfilt")[-1].version == "v1"  # only the version named
    assert main(["data", "--registry", registry.url, "takedown", "raw@v2", "--key", "s000005"]) == 0
    assert "raw@v2: keeps none of them" in capsys.readouterr().out
    # Another sample later, everywhere: out of the newest versions, not again out of the replaced raw@v1.
    assert main(["data", "--registry", registry.url, "takedown", "--key", "s000007"]) == 0
    out = capsys.readouterr().out
    assert "raw@v2 -> raw@v3" in out and "capfilt@v1 -> capfilt@v2" in out and "raw@v1 ->" not in out
    assert registry.find_cached("dataset", "raw", "raw-key").version == "v3"
    # A version a takedown replaced, named again for other samples: refused (a second successor would fork it).
    assert main(["data", "--registry", registry.url, "takedown", "raw@v1", "--key", "s000004"]) != 0
    assert "a takedown already replaced it (raw@v3 is the newest of that line)" in capsys.readouterr().err
    assert main(["data", "--registry", registry.url, "takedown", "raw@v1"]) != 0
    assert "give --url" in capsys.readouterr().err


def test_a_url_two_samples_share_loses_only_the_taken_row(tmp_path):
    """Two samples with the same url and different texts: taking one out by key cuts its row of the source list
    (told apart by the text), and a table without texts keeps the url the other sample still needs."""
    registry = Registry(tmp_path / "registry")
    rows = sample_rows(4)
    rows[3]["url"] = rows[2]["url"]
    tables = {"source.parquet": [{"url": row["url"], "caption": row["raw_caption"]} for row in rows],
              "urls.parquet": [{"url": row["url"]} for row in rows]}
    publish_dataset(registry, tmp_path / "raw", "raw", rows, stage="download", tables=tables)
    assert main(["data", "--registry", registry.url, "takedown", "raw@v1", "--key", "s000003"]) == 0
    new = registry.resolve("raw@v2")
    source_list = pq.read_table(registry.open(new, "source.parquet")).to_pylist()
    assert [row["caption"] for row in source_list] == [rows[i]["raw_caption"] for i in range(3)]
    assert [row["url"] for row in pq.read_table(registry.open(new, "urls.parquet")).to_pylist()] == [
        rows[i]["url"] for i in range(4)]
    assert verify(registry, new) == []


def test_a_dropped_row_of_the_same_image_loses_its_texts_too(tmp_path):
    """A sample dropped before as a repeat of the taken one's url keeps its drop reason and loses its texts, in the
    index and in a CapFilt version's texts."""
    registry = Registry(tmp_path / "registry")
    rows = sample_rows(5, dropped={4: "duplicate_url"})
    rows[4]["url"] = rows[1]["url"]
    texts = [{"key": row["key"], "text": f"text {i}", "source": "web", "itm_score": 0.9, "kept": i != 4,
              "drop_reason": "itm_below_threshold" if i == 4 else None} for i, row in enumerate(rows)]
    publish_dataset(registry, tmp_path / "cf", "capfilt", rows, stage="capfilt", texts=texts)
    assert main(["data", "--registry", registry.url, "takedown", "--url", rows[1]["url"]]) == 0
    new = registry.resolve("capfilt@v2")
    index = rows_of(registry, new.ref)
    assert (index["s000001"]["drop_reason"], index["s000004"]["drop_reason"]) == ("takedown", "duplicate_url")
    assert [index[key]["raw_caption"] for key in ("s000001", "s000004")] == [None, None]
    assert index["s000003"]["raw_caption"] == rows[3]["raw_caption"]
    after = {t["key"]: t for t in read_texts(registry, new).to_pylist()}
    assert after["s000004"]["text"] is None and after["s000004"]["drop_reason"] == "itm_below_threshold"
    assert after["s000001"]["text"] is None and after["s000001"]["drop_reason"] == "takedown"
    assert new.stats["takedown"]["dropped_rows_emptied"] == 1 and new.counts["taken_down"] == 1
    assert verify(registry, new) == []


def test_an_index_that_disagrees_with_its_shard_is_refused_not_rewritten_wrong(tmp_path, monkeypatch, capsys):
    """A kept sample of a rewritten shard whose .jpg offset is not one of the shard's: the new index would point
    at the wrong bytes, so the takedown stops naming the shard."""
    import datasets_fixtures

    registry = Registry(tmp_path / "registry")
    real_write_shard = datasets_fixtures.write_shard

    def shifted(staging, rows, shard="shards/train-000000.tar"):
        real_write_shard(staging, rows, shard)
        rows[2]["jpg_offset"] += 512  # the index no longer says where s000002's image is

    monkeypatch.setattr(datasets_fixtures, "write_shard", shifted)
    publish_dataset(registry, tmp_path / "raw", "raw", sample_rows(4), stage="download")
    assert main(["data", "--registry", registry.url, "takedown", "raw@v1", "--key", "s000001"]) != 0
    assert "shards/train-000000.tar: a kept sample's .jpg offset is not among the rewritten shard's" in \
        capsys.readouterr().err  # fmt: skip
    assert registry.versions("dataset", "raw")[-1].version == "v1"


def test_stats_that_quote_a_taken_sample_lose_those_quotes(tmp_path, capsys):
    """A CapFilt version's sample of rejected texts quotes texts and their samples: in its stats.json and (versions
    made before that moved there) in its manifest. The takedown's version keeps the others' quotes only."""
    registry = Registry(tmp_path / "registry")
    rows = sample_rows(4)
    rejects = [{"key": row["key"], "source": "web", "text": f"rejected {i}", "itm_score": 0.1,
                "drop_reason": "itm_below_threshold"} for i, row in enumerate(rows)]  # fmt: skip
    stats = {"capfilt": {"samples": 4}, "rejects_sample": rejects}
    publish_dataset(registry, tmp_path / "cf", "capfilt", rows, stage="capfilt", stats=stats,
                    json_stats={"stats.json": {"samples": 4, "rejects": rejects}})  # fmt: skip
    assert main(["data", "--registry", registry.url, "takedown", "--key", "s000002"]) == 0
    new = registry.resolve("capfilt@v2")
    quoted = [reject["text"] for reject in json.load(registry.open(new, "stats.json"))["rejects"]]
    assert quoted == ["rejected 0", "rejected 1", "rejected 3"]
    assert [reject["text"] for reject in new.stats["rejects_sample"]] == quoted
    assert new.stats["capfilt"] == {"samples": 4} and new.stats["takedown"]["stats_rewritten"] == ["stats.json"]
    assert verify(registry, new) == []
    capsys.readouterr()
