"""Download stage pieces that need no network: error classes, config checks, cache key, shard collection from
an fsspec URL, the CLI (presets, missing s3fs, demo-corpus write --config)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
import uuid
from dataclasses import replace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import CommandError, main
from pipelines.commands.stages import stage_config_path
from pipelines.config import ConfigError, load_config, to_dict
from pipelines.config import CONFIG_DIR
from pipelines.tasks import download
from pipelines.tasks.demo_corpus import read_ground_truth
from pipelines.tasks.download import DownloadConfig, _raw_output, classify_error, collect_shards, download_key


@pytest.mark.parametrize("message, label", [
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 503: Service Unavailable (transient)", "http_503"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("image area too large", "too_large"),
    ("Image decoding error", "decode_error"),
    ("OpenCV(4.10.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:994: error: (-215:Assertion failed) "
     "!buf.empty() in function 'imdecode_'", "empty_body"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("something new", "other_error"),
    (None, "unknown_error"),
])
def test_error_classes(message, label):
    assert classify_error(message) == label


def test_configs_load_and_reject_typos():
    for name in ("default", "demo", "ray"):
        load_config(DownloadConfig, CONFIG_DIR / "download" / f"{name}.yaml")
    with pytest.raises(ConfigError, match="did you mean 'threads'"):
        load_config(DownloadConfig, {"thread": 4})
    with pytest.raises(ConfigError, match="'processes' = 0"):
        load_config(DownloadConfig, {"processes": 0})


def test_cli_user_errors(tmp_path, capsys):
    assert main(["download", str(tmp_path / "missing.json"), "--name", "raw", "--registry", str(tmp_path)]) == 2
    assert "source list not found" in capsys.readouterr().err
    assert main(["download", "--name", "raw", "--registry", str(tmp_path)]) == 2
    assert "--retry-failed" in capsys.readouterr().err
    # A list that cannot be read as one: one line (it was a traceback), and no unfinished run left noted
    (tmp_path / "list.txt").write_text("http://a/0.jpg a caption\n")
    assert main(["download", str(tmp_path / "list.txt"), "--name", "raw", "--registry", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip download: error: ") and "unknown source list format 'txt'" in err
    assert not (tmp_path / "r" / ".work").exists()
    (tmp_path / "list.csv").write_text("link,text\nhttp://a/0.jpg,a caption\n")
    assert main(["download", str(tmp_path / "list.csv"), "--name", "raw", "--registry", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("blip download: error: ")  # no url column: named, no traceback
    assert main(["demo-corpus", "write", str(tmp_path / "c"), "--n", "12", "--bad-fraction", "0.0"]) == 0
    assert (tmp_path / "c" / "ground_truth.parquet").exists()


def test_cache_key_covers_only_output_settings():
    # A relaunch with other processes/threads/distributor/output folder must find the crashed run's work dir.
    base = DownloadConfig(samples_per_shard=100)
    key = download_key(base, "source:x")
    for changed in ({"processes": 8}, {"threads": 3}, {"distributor": "ray"}, {"ray_address": "auto"},
                    {"timeout": 30}, {"retries": 2}, {"output_folder": "s3://bucket/work"}):
        assert download_key(replace(base, **changed), "source:x") == key, changed
    assert download_key(replace(base, image_size=224), "source:x") != key
    assert download_key(replace(base, samples_per_shard=50), "source:x") != key
    assert download_key(base, "source:y") != key
    # The honoured opt-outs decide what is stored; at their default the key is the one from before the setting
    # existed (pinned), so no published download is made again.
    assert download_key(replace(base, disallowed_header_directives=()), "source:x") != key
    assert download_key(replace(base, disallowed_header_directives=("noai",)), "source:x") != key
    assert download_key(replace(base, verify_hash_col="sha256"), "source:x") != key
    assert download_key(replace(base, key_col="uid"), "source:x") != key  # other keys: other versions
    assert download_key(DownloadConfig(), "abc") == "9dbd9fc0fa79f82c1a4557a1"
    assert "verify_hash_col" in to_dict(DownloadConfig())  # recorded in the producer config, hashed only when set
    with pytest.raises(ValueError, match="verify_hash_col: empty"):
        DownloadConfig(verify_hash_col=" ")
    with pytest.raises(ValueError, match="key_col: empty"):
        DownloadConfig(key_col="")
    assert download_key(replace(base, save_additional_columns=("similarity",)), "source:x") != key
    for reserved in ("status", "sha256", "source_key", "exif"):  # the index's, the list's, img2dataset's own
        with pytest.raises(ValueError, match=f"save_additional_columns: '{reserved}' is a column the index has"):
            DownloadConfig(save_additional_columns=(reserved,))
    with pytest.raises(ValueError, match="'NoAI' is not a lowercase X-Robots-Tag directive"):
        DownloadConfig(disallowed_header_directives=("NoAI",))


def _img2dataset_shard(fs, root: str, shard_id: int, outcomes: list[tuple[str, bool]]) -> None:
    """One shard as img2dataset writes it: NNNNN.tar (jpg per success), NNNNN.parquet, NNNNN_stats.json."""
    name = f"{shard_id:05d}"
    buffer = io.BytesIO()
    records = []
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for index, (source_key, ok) in enumerate(outcomes):
            key = f"{name}{index:04d}"
            if ok:
                data = f"jpeg bytes {source_key}".encode()
                member = tarfile.TarInfo(f"{key}.jpg")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
            records.append({"key": key, "url": f"http://h/{source_key}.jpg", "caption": f"A photo {source_key}",
                            "source_key": source_key, "status": "success" if ok else "failed_to_download",
                            "error_message": None if ok else "HTTP Error 404: Not Found", "width": 8, "height": 8})
    fs.pipe(f"{root}/{name}.tar", buffer.getvalue())
    parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), parquet)
    fs.pipe(f"{root}/{name}.parquet", parquet.getvalue())
    fs.pipe(f"{root}/{name}_stats.json", json.dumps({"successes": sum(ok for _, ok in outcomes)}).encode())


def test_collect_shards_from_shared_storage_url(tmp_path):
    # On a multi-node Ray cluster img2dataset writes to shared storage; the driver indexes it through fsspec.
    url = f"memory://collect-{uuid.uuid4().hex}/raw"
    fs, root = fsspec.core.url_to_fs(url)
    _img2dataset_shard(fs, root, 0, [("a", True), ("b", False)])
    _img2dataset_shard(fs, root, 1, [("c", True)])
    fs.pipe(f"{root}/00002.tar", b"unfinished: no stats, not collected")
    files = collect_shards(url, "raw", tmp_path / "rows.arrow", copy_to=tmp_path / "raw")
    rows = download.read_rows([tmp_path / "rows.arrow"]).to_pylist()
    assert sorted((row["key"], row["status"], row["drop_reason"]) for row in rows) == [
        ("a", "ok", None), ("b", "dropped", "http_404"), ("c", "ok", None)]
    assert [entry["path"] for entry in files if entry["role"] == "shard"] == ["raw/00000.tar", "raw/00001.tar"]
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]
    ok = next(row for row in rows if row["key"] == "a")
    with open(tmp_path / "raw" / "00000.tar", "rb") as handle:
        handle.seek(ok["jpg_offset"])
        assert handle.read(ok["jpg_bytes"]) == b"jpeg bytes a"
    # Every file entry carries the digest taken while indexing: the registry does not read the shard again.
    for entry in files:
        data = (tmp_path / entry["path"]).read_bytes()
        assert (entry["sha256"], entry["bytes"]) == (hashlib.sha256(data).hexdigest(), len(data))


def test_shards_past_99999_are_collected_in_number_order(tmp_path):
    """img2dataset pads shard numbers to five digits and goes on with six: 100000_stats.json was never found (a
    129M-row list at 1,000 a shard has 129,000 shards), so the download could not complete."""
    url = f"memory://collect-{uuid.uuid4().hex}/raw"
    fs, root = fsspec.core.url_to_fs(url)
    for shard_id, source_key in ((100000, "late"), (99999, "early")):
        _img2dataset_shard(fs, root, shard_id, [(source_key, True)])
    files = collect_shards(url, "raw", tmp_path / "rows.arrow", copy_to=tmp_path / "raw")
    assert [entry["path"] for entry in files if entry["role"] == "shard"] == ["raw/99999.tar", "raw/100000.tar"]
    assert [row["key"] for row in download.read_rows([tmp_path / "rows.arrow"]).to_pylist()] == ["early", "late"]


def test_shards_in_a_remote_registrys_store_are_indexed_and_published_there(tmp_path):
    # Remote registry (memory://, standing in for s3://) and img2dataset's output_folder in the same store: the
    # shards are indexed where they are and the publish copies them inside the store, not through this machine.
    from datasets_manifests.manifest import Producer
    from datasets_manifests.ops import verify
    from datasets_manifests.registry import Registry

    registry = Registry(f"memory://dl-reg-{uuid.uuid4().hex[:8]}")
    raw_output = f"{registry.url}-work/k1/raw"
    assert download._in_registry_store(registry, raw_output)
    assert not download._in_registry_store(Registry(tmp_path / "local"), raw_output)
    fs, root = fsspec.core.url_to_fs(raw_output)
    _img2dataset_shard(fs, root, 0, [("a", True), ("b", False)])
    files = collect_shards(raw_output, "raw", tmp_path / "rows.arrow")
    (tmp_path / "stage").mkdir()
    manifest = download._publish(registry, "raw-web", tmp_path / "stage", [tmp_path / "rows.arrow"], files, Producer(stage="download"),
                                 parents=[], extra_counts={}, stats={}, remote_staging=raw_output.rsplit("/", 1)[0])
    assert {e.path for e in manifest.files} == {"raw/00000.tar", "raw/00000.parquet", "raw/00000_stats.json", "index.parquet"}
    assert verify(registry, manifest) == [] and manifest.counts["ok"] == 1
    assert not list((tmp_path / "stage").glob("raw*"))  # nothing of the shards came to this machine


def test_collect_shards_in_worker_processes_gives_the_same_index(tmp_path):
    # At scale indexing (reading + hashing every image) is spread over processes; the result must not change.
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "raw")
    fs.makedirs(root, exist_ok=True)
    for shard in range(3):
        _img2dataset_shard(fs, root, shard, [(f"k{shard}{i}", i != 1) for i in range(3)])
    serial = collect_shards(root, "raw", tmp_path / "serial.arrow", workers=1)
    assert collect_shards(root, "raw", tmp_path / "parallel.arrow", workers=2) == serial
    rows = download.read_rows([tmp_path / "serial.arrow"])
    assert download.read_rows([tmp_path / "parallel.arrow"]).equals(rows)
    assert [entry["path"] for entry in serial if entry["role"] == "shard"] == [f"raw/0000{i}.tar" for i in range(3)]
    assert rows.column("key").to_pylist() == [f"k{s}{i}" for s in range(3) for i in range(3)]
    assert rows.column("status").to_pylist().count("ok") == 6


def test_raw_output_goes_under_output_folder(tmp_path):
    local = tmp_path / "stage" / "raw"
    assert _raw_output(DownloadConfig(), "k1", local) == str(local)
    assert _raw_output(DownloadConfig(output_folder="s3://b/work/"), "k1", local) == "s3://b/work/k1/raw"


def test_source_table_split_into_parts_of_whole_shards(tmp_path, monkeypatch):
    from datasets_manifests.sources import SOURCE_SCHEMA

    rows = [{"url": f"http://h/{i}.jpg", "caption": f"c{i}", "source_key": f"{i:04d}"} for i in range(47)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), tmp_path / "source.parquet", row_group_size=9)
    monkeypatch.setattr(download, "SOURCE_PART_ROWS", 25)  # parts of 2 shards of 10 rows: 20 + 20 + 7
    parts = download.split_source_table(tmp_path / "source.parquet", tmp_path / "parts", samples_per_shard=10)
    files = sorted(parts.glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [20, 20, 7]
    assert pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() == rows
    pq.write_table(SOURCE_SCHEMA.empty_table(), tmp_path / "empty.parquet")
    empty = download.split_source_table(tmp_path / "empty.parquet", tmp_path / "parts", samples_per_shard=10)
    assert [pq.read_metadata(f).num_rows for f in empty.glob("*.parquet")] == [0]


def _make_temporary_folder_and_hang(queue) -> None:
    import tempfile
    import time

    queue.put(tempfile.mkdtemp(suffix="-like-wandb"))
    time.sleep(60)  # terminated, like img2dataset's pool workers: nothing of its own is cleaned up


def test_workers_temp_dir_collects_what_terminated_workers_leave(tmp_path, monkeypatch):
    import multiprocessing
    import os

    monkeypatch.setenv("TMPDIR", "/tmp")
    workers_dir = tmp_path / "work" / "tmp"
    with download._workers_temp_dir(workers_dir):
        context = multiprocessing.get_context("spawn")  # what img2dataset's distributor uses
        queue = context.Queue()
        worker = context.Process(target=_make_temporary_folder_and_hang, args=(queue,))
        worker.start()
        made = queue.get(timeout=60)
        worker.terminate()
        worker.join()
        assert os.path.dirname(made) == str(workers_dir)
    assert os.environ["TMPDIR"] == "/tmp"
    assert not workers_dir.exists()


def test_config_presets_by_name(tmp_path, capsys):
    assert stage_config_path("download", "ray") == CONFIG_DIR / "download" / "ray.yaml"
    assert stage_config_path("shard", "demo") == CONFIG_DIR / "shard" / "demo.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("threads: 3\n")
    assert stage_config_path("download", str(own)) == own
    with pytest.raises(CommandError, match=r"neither a download preset \(default, demo, ray\)"):
        stage_config_path("download", "fast")
    # Through the CLI: the preset is loaded (its typo check runs) before the source is looked at.
    args = ["download", str(tmp_path / "missing.json"), "--name", "raw", "--registry", str(tmp_path / "r")]
    assert main([*args, "--config", "demo", "--set", "procesess=2"]) == 2
    assert "demo.yaml" in capsys.readouterr().err
    assert main([*args, "--config", "demo"]) == 2
    assert "source list not found" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_s3fs_names_the_extra(tmp_path, capsys):
    assert main(["download", "s3://bucket/list.parquet", "--name", "raw", "--registry", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'blip-bootstrap[s3]'" in err and len(err.strip().splitlines()) == 1
    assert main(["download", str(tmp_path / "x.json"), "--name", "raw", "--registry", "s3://bucket/registry"]) == 2
    assert "pip install 'blip-bootstrap[s3]'" in capsys.readouterr().err


def test_demo_corpus_write_reads_its_config_file(tmp_path):
    config = tmp_path / "corpus.yaml"
    config.write_text("n: 7\nseed: 3\nbad_fraction: 0.0\n")
    assert main(["demo-corpus", "write", str(tmp_path / "a"), "--config", str(config)]) == 0
    assert read_ground_truth(tmp_path / "a").num_rows == 7  # the file's n, not the option's default
    assert main(["demo-corpus", "write", str(tmp_path / "b"), "--config", str(config), "--n", "9"]) == 0
    assert read_ground_truth(tmp_path / "b").num_rows == 9  # an option given on the command line wins
    assert json.loads((tmp_path / "b" / "corpus.json").read_text())["seed"] == 3
