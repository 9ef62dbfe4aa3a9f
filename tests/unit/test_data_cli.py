"""`blip data ...` through the real entry point (`pipelines.cli.main`) on a local and a memory:// registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datasets_manifests.registry import Registry
from pipelines.cli import main

from datasets_fixtures import memory_url, publish_dataset, publish_model, sample_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "memory"])
def populated(request, tmp_path) -> Registry:
    """raw@v1 (web, 2 dropped) -> capfilt@v1 (one caption changed, one more dropped, one sample gone)."""
    registry = Registry(tmp_path / "registry" if request.param == "local" else memory_url())
    raw = publish_dataset(registry, tmp_path / "raw", "raw", sample_rows(
        8, dropped={2: "failed_to_download", 5: "image_too_small"}), stage="download")
    rows = sample_rows(8, dropped={2: "failed_to_download", 5: "image_too_small", 6: "itm_below_threshold"},
                       captions={1: "a synthetic caption"})
    rows = [row for row in rows if row["key"] != "s000007"]
    publish_dataset(registry, tmp_path / "cf", "capfilt", rows, parents=(raw,), stage="capfilt")
    return registry


def run(capsys, registry: Registry | str, *args: str) -> tuple[int, str, str]:
    url = registry.url if isinstance(registry, Registry) else registry
    code = main(["data", "--registry", url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_lists_versions_and_empty_registry(populated, capsys, tmp_path):
    code, out, _ = run(capsys, populated, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["VERSION", "KIND", "ID"]
    assert any(line.startswith("capfilt@v1") and "raw@v1" in line for line in lines)
    assert any(line.startswith("raw@v1") and " 6 " in line for line in lines)  # 6 kept samples
    code, out, _ = run(capsys, populated, "ls", "--json", "--kind", "dataset")
    assert {item["ref"] for item in json.loads(out)} == {"raw@v1", "capfilt@v1"}
    code, out, _ = run(capsys, str(tmp_path / "empty"), "ls")
    assert code == 0 and "no versions" in out


def test_show_prints_counts_drop_reasons_lineage_and_browse_hint(populated, capsys):
    code, out, _ = run(capsys, populated, "show", "capfilt@latest")
    assert code == 0
    assert "counts: dropped=3, ok=4, total=7" in out
    assert "drop reasons (3 dropped):" in out and "itm_below_threshold" in out
    assert "stats capfilt:" in out and "made from:" in out and "raw@v1" in out
    assert f"browse: blip data serve --registry {populated.url}" in out
    assert "http://127.0.0.1:8765/#/v/dataset/capfilt/v1" in out  # the version's page, on serve's default port
    assert f"export: blip data --registry {populated.url} export capfilt@v1 --out capfilt.json [--images DIR]" in out
    code, out, _ = run(capsys, populated, "show", "raw", "--json")
    data = json.loads(out)
    assert data["drop_reasons"] == {"failed_to_download": 1, "image_too_small": 1}
    assert data["lineage"]["children"][0]["ref"] == "capfilt@v1"


def test_lineage_up_and_down(populated, capsys):
    code, out, _ = run(capsys, populated, "lineage", "raw@v1")
    assert code == 0 and "used by:" in out and "capfilt@v1" in out
    code, out, _ = run(capsys, populated, "lineage", "capfilt", "--json")
    tree = json.loads(out)
    assert [node["ref"] for node in tree["parents"]] == ["raw@v1"] and tree["children"] == []


def test_diff_by_key(populated, capsys):
    code, out, _ = run(capsys, populated, "diff", "raw@v1", "capfilt@v1", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["counts"] == {"a": 8, "b": 7, "common": 7, "added": 0, "removed": 1, "recaptioned": 1,
                                "newly_dropped": 1, "restored": 0}
    assert result["removed"] == ["s000007"]
    assert result["recaptioned"] == [{"key": "s000001", "a": "a photo of thing 1", "b": "a synthetic caption"}]
    assert result["newly_dropped"] == [{"key": "s000006", "reason": "itm_below_threshold"}]
    code, out, _ = run(capsys, populated, "diff", "raw@v1", "capfilt@v1")
    assert "~ s000001" in out and "x s000006: itm_below_threshold" in out and "- s000007" in out


@pytest.mark.parametrize("weak_hash", [False, True])
def test_diff_a_batch_at_a_time_equals_a_join_in_python(tmp_path, monkeypatch, weak_hash):
    """Unsorted keys, null captions, every status change: the diff computed 7 rows at a time against memory-mapped
    copies gives each category, in order, what a dict join gives; also when the keys' hashes collide (a hash of
    the last character: every match is confirmed on the keys)."""
    import random

    import numpy as np

    from datasets_manifests import spill
    from datasets_manifests.ops import diff_tables

    if weak_hash:
        monkeypatch.setattr(spill, "key_hashes", lambda keys: np.array([ord(k[-1]) for k in keys.to_pylist()],
                                                                        dtype=np.uint64))  # fmt: skip

    rng = random.Random(5)
    registry = Registry(tmp_path / "registry")
    reasons = {i: "failed_to_download" for i in range(60) if rng.random() < 0.3}
    rows_a = sample_rows(60, dropped=reasons, captions={i: None for i in range(60) if rng.random() < 0.1})
    rows_b = sample_rows(80, dropped={i: "itm_below_threshold" for i in range(80) if rng.random() < 0.3},
                         captions={i: rng.choice([None, "a synthetic caption", f"a photo of thing {i}"]) for i in range(80)})  # fmt: skip
    rows_b = [row for row in rows_b if rng.random() < 0.8]
    rng.shuffle(rows_a)
    rng.shuffle(rows_b)
    a = publish_dataset(registry, tmp_path / "a", "web", rows_a)
    b = publish_dataset(registry, tmp_path / "b", "web", rows_b, parents=(a,))
    by_key = {row["key"]: row for row in rows_a}
    common = [(by_key[row["key"]], row) for row in rows_b if row["key"] in by_key]
    row_a = {row["key"]: number for number, row in enumerate(rows_a)}  # where each key is in each index
    row_b = {row["key"]: number for number, row in enumerate(rows_b)}
    rows = lambda key: {"row_a": row_a[key], "row_b": row_b[key]}  # noqa: E731
    expected = {
        "added": [{"key": row["key"], "row_b": row_b[row["key"]]} for row in rows_b if row["key"] not in by_key],
        "removed": [{"key": row["key"], "row_a": row_a[row["key"]]} for row in rows_a if row["key"] not in row_b],
        "recaptioned": [{"key": y["key"], "caption_a": x["caption"], "caption_b": y["caption"], **rows(y["key"])}
                        for x, y in common if x["caption"] != y["caption"]],
        "newly_dropped": [{"key": y["key"], "reason": y["drop_reason"], **rows(y["key"])} for x, y in common
                          if (x["status"], y["status"]) == ("ok", "dropped")],
        "restored": [{"key": y["key"], **rows(y["key"])} for x, y in common
                     if (x["status"], y["status"]) == ("dropped", "ok")],
    }
    assert all(expected.values())  # every category has rows
    for batch_rows in (7, None):
        tables = diff_tables(registry, a, b, batch_rows=batch_rows)
        assert {name: table.to_pylist() for name, table in tables.categories.items()} == expected
        assert tables.counts == {"a": 60, "b": len(rows_b), "common": len(common),
                                 **{name: len(rows) for name, rows in expected.items()}}  # fmt: skip
    # Its files went to the registry's scratch dir (not TMPDIR), unlinked once mapped: nothing is left there.
    assert list((tmp_path / "registry" / ".work" / "scratch").iterdir()) == []


def test_spilled_rows_take_equals_arrows_take(tmp_path):
    import numpy as np
    import pyarrow as pa

    from datasets_manifests.spill import SpilledRows, read_spilled, spill_writer

    schema = pa.schema([("n", pa.int64()), ("text", pa.string())])
    with spill_writer(tmp_path / "rows.arrow", schema) as writer:
        for start in range(0, 1000, 64):  # 16 chunks
            numbers = list(range(start, min(start + 64, 1000)))
            writer.write_table(pa.table({"n": numbers, "text": [f"row {n}" for n in numbers]}, schema=schema))
            if start == 320:
                writer.write_table(schema.empty_table())  # an empty chunk (a raw shard with no samples)
    table = read_spilled([tmp_path / "rows.arrow"], schema)
    rows = np.random.default_rng(0).integers(0, 1000, size=300)
    spilled = SpilledRows(table)  # many takes from one listing of the chunks: each as Arrow's
    assert spilled.take(pa.array(rows)).to_pylist() == table.take(pa.array(rows)).to_pylist()
    assert spilled.take(pa.array([], pa.int64())).num_rows == 0
    for asked in (np.arange(1000)[::-1], np.array([0, 63, 64, 383, 384, 999, 384]), np.array([], np.int64)):
        assert spilled.take(asked).to_pylist() == table.take(pa.array(asked, pa.int64())).to_pylist()


def test_verify_passes_then_names_the_corrupted_file(populated, capsys):
    code, out, _ = run(capsys, populated, "verify", "capfilt@v1")
    assert code == 0 and "ok (2 files" in out
    manifest = populated.resolve("capfilt@v1")
    path = populated.path_of(manifest, "shards/train-000000.tar")
    with populated.fs.open(path, "rb") as handle:
        payload = bytearray(handle.read())
    payload[600] ^= 0xFF  # flip one byte in place: same size, different sha256
    with populated.fs.open(path, "wb") as handle:
        handle.write(bytes(payload))
    code, _, err = run(capsys, populated, "verify", "capfilt@v1")
    assert code == 1 and "shards/train-000000.tar: sha256" in err
    populated.fs.rm(populated.path_of(manifest, "index.parquet"))
    code, out, _ = run(capsys, populated, "verify", "capfilt@v1", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and "index.parquet: missing" in problems and len(problems) == 2
    with populated.fs.open(path, "wb") as handle:  # cut short: found from the listing's sizes, not hashed
        handle.write(bytes(payload[:1024]))
    code, out, _ = run(capsys, populated, "verify", "capfilt@v1", "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and f"shards/train-000000.tar: 1024 bytes, manifest says {len(payload)}" in problems


def test_samples_with_where_text_and_json(populated, capsys):
    code, out, _ = run(capsys, populated, "samples", "capfilt@v1", "--where", "status=dropped")
    assert code == 0 and "3 matching samples" in out
    assert "[dropped:itm_below_threshold]" in out
    code, out, _ = run(capsys, populated, "samples", "capfilt@v1", "--where", "drop_reason=failed_to_download",
                       "--where", "drop_reason=image_too_small", "--json")
    assert [row["key"] for row in json.loads(out)["rows"]] == ["s000002", "s000005"]
    code, out, _ = run(capsys, populated, "samples", "capfilt@v1", "--text", "synthetic", "--columns", "key,caption")
    assert "key='s000001'" in out and "1 matching" in out
    code, out, _ = run(capsys, populated, "samples", "capfilt@v1", "--n", "2", "--offset", "5", "--json")
    assert json.loads(out)["total"] == 7 and [r["key"] for r in json.loads(out)["rows"]] == ["s000005", "s000006"]


def _refuse(constant: str):
    raise AssertionError(f"{constant} in the JSON output")


def test_samples_where_compares_a_carried_score(capsys, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    rows = [{**row, "similarity": n / 10} for n, row in enumerate(sample_rows(8))] + \
        [{**sample_rows(9)[8], "similarity": float("nan")}]  # fmt: skip
    publish_dataset(registry, tmp_path / "scored", "scored", rows, metadata={"source_columns": ["similarity"]})

    def keys(*where: str) -> list[str]:
        code, out, err = run(capsys, registry, "samples", "scored@v1", "--json", "--n", "20",
                             *(arg for item in where for arg in ("--where", item)))  # fmt: skip
        assert code == 0, err
        return [int(row["key"][1:]) for row in json.loads(out, parse_constant=_refuse)["rows"]]

    assert keys("similarity>=0.3") == [3, 4, 5, 6, 7]
    assert keys("similarity>0.3", "similarity<=0.5") == [4, 5]  # repeats all hold
    assert keys("similarity<0.2", "status=ok") == [0, 1]
    assert keys("key=s000008") == [8]  # its NaN score printed as null: `NaN` is not JSON
    assert keys("width>=8", "caption=a photo of thing 2") == [2]  # an int column, and equality beside
    for where, message in (("similarity>=high", "where similarity 'high': not a valid double value"),
                           ("similarity>=", "where similarity>=: a comparison needs a value"),
                           ("similarity>0.1", "both equals and compares")):
        extra = ["--where", "similarity=0.2"] if message.startswith("both") else []
        code, _, err = run(capsys, registry, "samples", "scored@v1", "--where", where, *extra)
        assert code != 0 and message in err, err
    code, _, err = run(capsys, registry, "samples", "scored@v1", "--where", ">=3")
    assert code != 0 and "expected COL=VAL, or COL>=VAL" in err
    code, out, _ = run(capsys, registry, "samples", "scored@v1", "--where", "similarity>0.6")  # the score is shown
    assert code == 0 and out.splitlines()[1:] == ["  s000007  [ok]  train  8x8  similarity=0.7  'a photo of thing 7'"]


def test_catalog_lists_and_shows(capsys, tmp_path):
    code, out, _ = run(capsys, str(tmp_path), "catalog")
    assert code == 0
    for name in ("coco_karpathy", "flickr30k", "cc3m", "cc12m", "sbu", "visual_genome", "laion115m",
                 "blip-14m", "blip-129m"):
        assert name in out
    code, out, _ = run(capsys, str(tmp_path), "catalog", "blip-129m")
    assert "laion_synthetic_filtered_large.json" in out and "~129,000,000 [P]" in out
    code, out, _ = run(capsys, str(tmp_path), "catalog", "sbu", "--json")
    assert json.loads(out)["counts"][0]["evidence"] == "U"


@pytest.mark.parametrize(("args", "message"), [
    (["show", "nope@v1"], "no version of 'nope'"),
    (["show", "raw@v9"], "'raw@v9' not found (versions of raw: v1)"),
    (["samples", "raw", "--where", "colour=red"], "unknown column 'colour'"),
    (["samples", "raw", "--where", "nonsense"], "expected COL=VAL"),
    (["catalog", "imagenet"], "unknown composition 'imagenet'"),
    (["verify", "raw@v1", "--workers", "0"], "--workers 0: must be at least 1"),
])
def test_errors_are_one_line(populated, capsys, args, message):
    code, out, err = run(capsys, populated, *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_registry_option_after_subcommand_and_from_environment(populated, capsys, monkeypatch):
    assert main(["data", "ls", "--registry", populated.url]) == 0
    assert "raw@v1" in capsys.readouterr().out
    monkeypatch.setenv("BLIP_REGISTRY", populated.url)
    assert main(["data", "show", "raw@v1"]) == 0
    assert "raw@v1" in capsys.readouterr().out


def test_data_ls_starts_without_heavy_imports(tmp_path):
    code = (
        "import sys; from pipelines.cli import main; rc = main(['data', '--registry', sys.argv[1], 'ls']);"
        "heavy = sorted(m for m in ('torch', 'ray', 'prefect', 'pyarrow', 'webdataset') if m in sys.modules);"
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_verify_checks_the_index_and_a_tampered_manifest_is_refused(capsys, tmp_path, monkeypatch):
    """An index that points at a shard the version does not list is a problem; an edited manifest is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datasets_manifests.index import INDEX_FILE
    from datasets_manifests.manifest import Producer

    registry = Registry(tmp_path / "registry")
    staging = tmp_path / "staging"
    publish_dataset(registry, staging, "raw", sample_rows(3))
    index = pq.read_table(registry.local_path(registry.resolve("raw"), INDEX_FILE))
    rows = index.to_pylist()
    rows[0]["shard"] = "shards/elsewhere.tar"
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), staging / INDEX_FILE)  # bypasses write_index
    registry.publish(kind="dataset", name="bad", staging_dir=staging, files=[{"path": INDEX_FILE, "role": "index"}],
                     producer=Producer(stage="t"))
    code, _, err = run(capsys, registry, "verify", "bad@v1")
    assert code == 1 and "samples point at shards/elsewhere.tar" in err
    # The index is checked a batch at a time; a key repeated in two batches is still found.
    rows[0]["shard"], rows[2]["key"] = rows[1]["shard"], rows[0]["key"]
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), staging / INDEX_FILE)
    registry.publish(kind="dataset", name="twice", staging_dir=staging, files=[{"path": INDEX_FILE, "role": "index"}],
                     producer=Producer(stage="t"))
    from datasets_manifests import index as index_module

    scan = index_module.scan_index
    key_rows_read = []

    def scan_one_row_at_a_time(*args, **kwargs):
        for batch in scan(*args, batch_rows=1):
            if args[2:] == (["key"],):
                key_rows_read.append(batch.column("key")[0].as_py())
            yield batch

    monkeypatch.setattr(index_module, "scan_index", scan_one_row_at_a_time)
    code, _, err = run(capsys, registry, "verify", "twice@v1")
    assert code == 1 and f"duplicate key {rows[0]['key']!r}" in err
    # The keys are hashed as the validating scan reads them from the first one out of order on; only the two
    # before it are read again (and no more: the repeat's hashes are confirmed on the keys, a third read).
    assert key_rows_read[:2] == [rows[0]["key"], rows[1]["key"]] and len(key_rows_read) == 2 + 3
    # Keys in increasing order (as every stage but CapFilt writes them) are unique as read: no second pass.
    from datasets_manifests import spill

    second_pass = spill.first_repeated_key
    monkeypatch.setattr(spill, "first_repeated_key", lambda *args, **kwargs: pytest.fail("keys read again"))
    code, _, err = run(capsys, registry, "verify", "raw@v1")
    assert code == 0, err
    monkeypatch.setattr(spill, "first_repeated_key", second_pass)
    rows[2]["key"] = rows[1]["key"]  # a repeat right after its first, in the next batch: not increasing either
    pq.write_table(pa.Table.from_pylist(rows, schema=index.schema), staging / INDEX_FILE)
    registry.publish(kind="dataset", name="adjacent", staging_dir=staging, producer=Producer(stage="t"),
                     files=[{"path": INDEX_FILE, "role": "index"}])
    code, _, err = run(capsys, registry, "verify", "adjacent@v1")
    assert code == 1 and f"duplicate key {rows[1]['key']!r}" in err

    manifest_path = tmp_path / "registry" / "datasets" / "raw" / "v1" / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["counts"]["ok"] = 1000
    manifest_path.write_text(json.dumps(data))
    code, _, err = run(capsys, registry, "verify", "raw@v1")
    assert code == 2 and "corrupt manifest" in err and "content id" in err


def test_lineage_diamond_models_and_missing_parents(capsys, tmp_path):
    """web -> (a, b) -> merged -> model; a parent published in another registry shows as missing."""
    from datasets_manifests.ops import lineage

    registry = Registry(tmp_path / "registry")
    web = publish_dataset(registry, tmp_path / "w", "web", sample_rows(3))
    left = publish_dataset(registry, tmp_path / "a", "left", sample_rows(3), parents=(web,))
    right = publish_dataset(registry, tmp_path / "b", "right", sample_rows(2), parents=(web,))
    merged = publish_dataset(registry, tmp_path / "m", "merged", sample_rows(3), parents=(left, right))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    from datasets_manifests.manifest import Producer

    registry.publish(kind="model", name="blip-tiny", staging_dir=tmp_path / "ckpt", parents=[merged],
                     files=[{"path": "model.safetensors", "role": "weights"}], producer=Producer(stage="pretrain"))

    tree = lineage(registry, "merged")
    assert [node.ref for node in tree.parents] == ["left@v1", "right@v1"]
    assert [node.repeated for node in (tree.parents[0].links[0], tree.parents[1].links[0])] == [False, True]
    assert [node.ref for node in tree.children] == ["blip-tiny@v1"]
    down = lineage(registry, "web")
    assert [n.ref for n in down.children] == ["left@v1", "right@v1"]
    assert down.children[0].links[0].links[0].ref == "blip-tiny@v1"

    elsewhere = Registry(tmp_path / "other")
    publish_dataset(elsewhere, tmp_path / "o", "derived", sample_rows(2), parents=(web,))
    code, out, _ = run(capsys, elsewhere, "lineage", "derived")
    assert code == 0 and "web@v1  [missing from this registry" in out
    code, out, _ = run(capsys, registry, "show", "web")
    assert "(see above)" in out and "blip-tiny@v1  [model" in out

    (tmp_path / "ckpt2").mkdir()
    (tmp_path / "ckpt2" / "model.safetensors").write_bytes(b"better weights")
    registry.publish(kind="model", name="blip-tiny", staging_dir=tmp_path / "ckpt2", parents=[merged],
                     files=[{"path": "model.safetensors", "role": "weights"}], producer=Producer(stage="pretrain"))
    code, out, _ = run(capsys, registry, "diff", "blip-tiny@v1", "blip-tiny@v2")
    assert code == 0 and "manifest differences only" in out and '"changed": ["model.safetensors"]' in out
    code, _, err = run(capsys, registry, "diff", "web@v1", "blip-tiny@v2")
    assert code == 2 and "blip-tiny@v2 has no index.parquet" in err


@pytest.mark.parametrize("batch_rows", [3, 7, 65536])
def test_verify_checks_where_the_index_places_each_samples_texts(tmp_path, monkeypatch, batch_rows):
    """A CapFilt-like version's index says where each sample's texts are (texts_row, texts_count); verify walks
    texts.parquet beside the index (both read `batch_rows` at a time) and names the first place they disagree."""
    import pyarrow as pa

    from datasets_manifests import index as index_module

    read = index_module.iter_parquet
    monkeypatch.setattr(index_module, "iter_parquet", lambda source, columns, rows=0, **options:
                        read(source, columns, batch_rows, **options))
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from datasets_manifests.browser.sample_registry import build_sample_registry
    from datasets_manifests.manifest import Producer
    from datasets_manifests.ops import verify

    registry = Registry(tmp_path / "registry")
    build_sample_registry(tmp_path / "registry")
    capfilt = registry.resolve("web-demo-capfilt@v1")
    assert verify(registry, capfilt) == []
    index = pq.read_table(registry.local_path(capfilt, "index.parquet"))
    index = index.set_column(index.schema.get_field_index("shard"), "shard", pa.nulls(len(index), pa.string()))
    texts = pq.read_table(registry.local_path(capfilt, "texts.parquet"))
    shifted = index.set_column(index.schema.get_field_index("texts_row"), "texts_row", pc.add(index["texts_row"], 1))
    swapped = pa.concat_tables([texts.slice(3, 3), texts.slice(0, 3), texts.slice(6)])  # samples 0 and 1 swapped
    cases = {  # (the shards stay out of these versions: the index points at none)
        "intact": (index, texts, None),
        "shifted": (shifted, texts, "texts_row of key '000000000' is 1; the texts of the samples before it end at row 0"),
        "swapped": (index, swapped, "row 0 is a text of '000000001'; the index places a text of '000000000' there"),
        "short": (index, texts.slice(0, len(texts) - 2), f"ends at row {len(texts) - 2}, the index places 2 more"),
        "long": (index, pa.concat_tables([texts, texts.slice(0, 1)]), f"1 texts after row {len(texts) - 1}"),
        "unreadable": (index, None, "index.parquet / texts.parquet: "),  # reported, not raised
    }
    for name, (index_table, texts_table, message) in cases.items():
        staging = tmp_path / name
        staging.mkdir()
        pq.write_table(index_table, staging / "index.parquet", row_group_size=4)
        if texts_table is None:
            (staging / "texts.parquet").write_bytes(b"PAR1 not a parquet file")
        else:
            pq.write_table(texts_table, staging / "texts.parquet", row_group_size=5)
        manifest = registry.publish(kind="dataset", name=name, staging_dir=staging, producer=Producer(stage="t"),
                                    files=[{"path": "index.parquet", "role": "index"},
                                           {"path": "texts.parquet", "role": "index"}])  # fmt: skip
        problems = verify(registry, manifest)
        assert problems == [] if message is None else (len(problems) == 1 and message in problems[0]), (name, problems)


def test_serve_wait_option_parses_seconds_and_names_a_bad_value(capsys):
    from pipelines.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["data", "serve"]).wait_s == 1.0
    assert parser.parse_args(["data", "serve", "--wait-s", "600"]).wait_s == 600.0
    for bad, message in (("soon", "not a number of seconds: 'soon'"), ("-1", "must be a finite number >= 0")):
        with pytest.raises(SystemExit):
            parser.parse_args(["data", "serve", "--wait-s", bad])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("remote", [False, True])
def test_find_reads_the_asked_column_then_the_row_groups_holding_matches(tmp_path, monkeypatch, remote):
    """Matches in several row groups (and several in one), by url, key and sha256 together: the rows found are
    the index's own, in its order, on a local and a remote registry."""
    import pyarrow.parquet as pq

    from datasets_manifests import index
    from datasets_manifests.locate import COLUMNS, find_samples

    monkeypatch.setattr(index, "ROW_GROUP_SIZE", 4)  # 20 rows: 5 row groups
    registry = Registry(memory_url() if remote else str(tmp_path / "registry"))
    manifest = publish_dataset(registry, tmp_path / "v", "web", sample_rows(20, dropped={9: "too_small"}))
    table = index.read_index(registry, manifest)
    with registry.open(manifest, index.INDEX_FILE) as handle:
        assert pq.ParquetFile(handle).metadata.num_row_groups == 5
    rows = table.to_pylist()
    found = find_samples(registry, urls=[rows[1]["url"], rows[2]["url"], "http://nowhere/x.jpg"], keys=[rows[9]["key"]],
                         sha256s=[rows[17]["image_sha256"].upper()])  # fmt: skip
    assert [f.to_dict() for f in found] == [{**{c: rows[n][c] for c in COLUMNS}, "ref": "web@v1", "data_removed": False}
                                            for n in (1, 2, 9, 17)]  # fmt: skip
    assert find_samples(registry, urls=["http://nowhere/x.jpg"]) == []


@pytest.mark.parametrize("remote", [False, True])
def test_find_reads_only_the_row_groups_whose_bloom_filters_may_hold_what_it_asks(tmp_path, monkeypatch, remote):
    """The index's key, url and image_sha256 columns carry a Bloom filter per row group: a search reads the row
    groups whose filters may hold what it asks; an index written before the filters has every row group read. The
    same rows either way."""
    import pyarrow.parquet as pq

    from datasets_manifests import index, locate
    from datasets_manifests.locate import find_samples

    monkeypatch.setattr(index, "ROW_GROUP_SIZE", 4)  # 40 rows: 10 row groups
    registry = Registry(memory_url() if remote else str(tmp_path / "registry"))
    manifest = publish_dataset(registry, tmp_path / "v", "web", sample_rows(40))
    rows = index.read_index(registry, manifest).to_pylist()
    read: list[tuple[int, tuple[str, ...]]] = []
    open_parquet = locate.open_parquet

    def counting(source):
        file = open_parquet(source)
        read_row_group = file.read_row_group
        file.read_row_group = lambda group, columns: read.append((group, tuple(columns))) or read_row_group(
            group, columns=columns)
        return file

    monkeypatch.setattr(locate, "open_parquet", counting)
    found = find_samples(registry, urls=[rows[9]["url"]], sha256s=[rows[30]["image_sha256"]])
    assert [f.key for f in found] == [rows[9]["key"], rows[30]["key"]]
    asked = sorted(group for group, columns in read if columns == ("url", "image_sha256"))
    assert {2, 7} <= set(asked) and len(asked) <= 4  # the two that hold them (a false positive is ~1 % each)
    read.clear()
    assert [f.key for f in find_samples(registry, keys=[rows[9]["key"]])] == [rows[9]["key"]]
    asked = sorted(group for group, columns in read if columns == ("key",))
    assert 2 in asked and len(asked) <= 2
    # An index written without filters (before they were): every row group, the same answer.
    read.clear()
    table = index.read_index(registry, manifest)
    with registry.fs.open(registry.path_of(manifest, index.INDEX_FILE), "wb") as handle:
        pq.write_table(table, handle, row_group_size=4)
    assert [f.key for f in find_samples(registry, urls=[rows[9]["url"]])] == [rows[9]["key"]]
    assert sorted(group for group, columns in read if columns == ("url",)) == list(range(10))


def test_find_says_where_a_url_is_kept_or_dropped_and_what_was_trained_on_it(populated, capsys, tmp_path):
    from datasets_manifests.manifest import Producer

    capfilt = populated.resolve("capfilt@v1")
    model = publish_model(populated, tmp_path / "model", [capfilt])
    scores = tmp_path / "eval"
    scores.mkdir()
    (scores / "metrics.json").write_text("{}")
    populated.publish(kind="evaluation", name="eval", staging_dir=scores, producer=Producer(stage="evaluate"),
                      files=[{"path": "metrics.json", "role": "metrics"}], parents=[model])

    code, out, _ = run(capsys, populated, "find", "--url", "http://127.0.0.1/img/1.jpg")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[:2]}
    assert lines["raw@v1"].startswith("raw@v1  s000001  kept  train split, shards/train-000000.tar")
    assert lines["capfilt@v1"].startswith("capfilt@v1  s000001  kept") and "'a synthetic caption'" in out
    assert "kept in capfilt@v1, raw@v1" in out
    assert "made from the versions that keep it: pretrain@v1 (model), eval@v1 (evaluation)" in out.replace(
        "eval@v1 (evaluation), pretrain@v1 (model)", "pretrain@v1 (model), eval@v1 (evaluation)")

    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1/img/6.jpg\n\nhttp://nowhere/x.jpg\n")
    code, out, _ = run(capsys, populated, "find", "--urls", str(urls), "--json")
    data = json.loads(out)
    assert sorted((item["ref"], item["status"], item["drop_reason"]) for item in data["found"]) == [
        ("capfilt@v1", "dropped", "itm_below_threshold"), ("raw@v1", "ok", None)]
    assert data["kept_in"] == ["raw@v1"] and data["trained_on_it"] == []  # CapFilt dropped it: no model saw it

    code, out, _ = run(capsys, populated, "find", "--key", "s000007")
    assert code == 0 and out.splitlines()[0].startswith("raw@v1  s000007") and "capfilt@v1  s000007" not in out
    from datasets_manifests.index import scan_index

    raw = populated.resolve("raw@v1")
    sha = next(row["image_sha256"] for batch in scan_index(populated, raw, ["key", "image_sha256"])
               for row in batch.to_pylist() if row["key"] == "s000003")  # fmt: skip
    code, out, _ = run(capsys, populated, "find", "--sha256", sha.upper())
    assert code == 0 and {line.split()[1] for line in out.splitlines()[:2]} == {"s000003"}
    code, out, _ = run(capsys, populated, "find", "--url", "http://nowhere/x.jpg")
    assert code == 1 and "not found in any dataset version" in out
    for typo in (sha[:-1], sha[:-1] + "g"):  # a hash cut short or mistyped is refused, not "not found"
        with pytest.raises(SystemExit):
            run(capsys, populated, "find", "--sha256", typo)
        assert f"not a sha256 (64 hexadecimal digits): '{typo}'" in capsys.readouterr().err
    code, _, err = run(capsys, populated, "find")
    assert code != 0 and "give --url" in err
