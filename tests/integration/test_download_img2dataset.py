"""Download stage with real img2dataset against the demo corpus on 127.0.0.1, checked against ground truth.

Covers: every good sample exactly once, every bad record counted with its error class, the oversized image
dropped as too_large, resume after a killed download (finished shards not redone), --retry-failed lineage, and
the ray distributor writing to a separate (shared-storage style) output folder on the session's local Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datasets_manifests.registry import Registry
from pipelines.config import load_config
from pipelines.tasks.demo_corpus import DemoCorpusConfig, read_ground_truth, serve_corpus, write_corpus, write_source_list
from pipelines.tasks.download import DownloadConfig, download_key, run_download, run_retry_failed
from pipelines.tasks.shard import ShardConfig, run_shard
from pipelines.tasks.webdata import iter_samples

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["processes=1", "threads=2", "samples_per_shard=10", "image_size=64", "max_image_area=1000000",
             "timeout=5"]
SHARD_LEVEL = {"duplicate_url", "duplicate_image", "empty_caption", "absurd_caption"}
DOWNLOAD_LEVEL = {"http_404", "decode_error", "empty_body", "too_large", "http_503", "disallowed_by_robots"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(DemoCorpusConfig(n=60, seed=11, bad_fraction=0.25, oversized_side=1100, opt_out_fraction=0.1),
                 directory)  # fmt: skip
    return directory


def _config() -> DownloadConfig:
    return load_config(DownloadConfig, ROOT / "configs/download/demo.yaml", OVERRIDES)


def _check_against_truth(registry, manifest, truth, base, redone: bool = False):
    """Every sample's outcome is the corpus's truth. `redone`: the download was stopped mid-shard and that shard
    fetched again, so a transient 503 may have been the URL's first request, made before the stop: then it is ok."""
    index = pq.read_table(registry.local_path(manifest, "index.parquet")).to_pylist()
    assert len(index) == len(truth) and len({row["key"] for row in index}) == len(index)
    outcome = {}
    for row in index:
        outcome[(row["url"], row["raw_caption"])] = row["drop_reason"] or "ok"
    expected = Counter()
    for row in truth:
        got = outcome[(f"{base}/{row['path']}", row["caption"])]
        want = row["expected"] if row["expected"] in DOWNLOAD_LEVEL else "ok"
        if redone and row["bad_kind"] == "transient_503" and got == "ok":
            want = "ok"
        assert got == want, (row["row"], row["bad_kind"], got)
        expected[want] += 1
    assert manifest.counts["ok"] == expected.pop("ok")
    assert manifest.drop_reasons == dict(expected)
    assert manifest.num_samples == manifest.counts["ok"]  # shard entries count exactly the stored samples


def test_download_matches_ground_truth_and_retry(corpus, tmp_path):
    truth = read_ground_truth(corpus).to_pylist()
    registry = Registry(tmp_path / "registry")
    with serve_corpus(corpus) as base:
        source = write_source_list(corpus, base, tmp_path / "source.parquet")
        raw = run_download(_config(), source, name="raw", registry=registry)
        _check_against_truth(registry, raw, truth, base)
        assert raw.drop_reasons["too_large"] == 1 and raw.drop_reasons["http_503"] >= 1
        opted_out = sum(row["bad_kind"] == "opted_out" for row in truth)  # X-Robots-Tag: noai, honoured
        assert opted_out >= 3 and raw.drop_reasons["disallowed_by_robots"] == opted_out
        assert run_download(_config(), source, name="raw", registry=registry).id == raw.id  # no-op re-run
        retried = run_retry_failed(_config(), raw.ref, name="raw", registry=registry)
    assert retried.parents == (raw.ref,) and retried.version == "v2"
    assert retried.counts["recovered"] == raw.drop_reasons["http_503"]
    assert "http_503" not in retried.drop_reasons
    assert retried.drop_reasons["disallowed_by_robots"] == opted_out  # asked again: the site still opts out
    assert retried.counts["ok"] == raw.counts["ok"] + retried.counts["recovered"]
    index = pq.read_table(registry.local_path(retried, "index.parquet"))
    assert len(index) == len(truth) and len(set(index.column("key").to_pylist())) == len(truth)
    # The shard stage on the retried version: its drops are exactly the caption/duplicate kinds of the truth.
    dataset = run_shard(ShardConfig(samples_per_shard=16, val_fraction=0.1), retried, name="demo", registry=registry)
    shard_level = Counter(row["expected"] for row in truth if row["expected"] in SHARD_LEVEL)
    assert dataset.drop_reasons == dict(shard_level)
    assert dataset.num_samples == retried.counts["ok"] - sum(shard_level.values())
    counts = Counter()
    assert sum(1 for _ in iter_samples(registry, dataset, decode=True, counts=counts)) == dataset.num_samples


def test_opt_outs_are_honoured_unless_the_config_turns_them_off(corpus, tmp_path):
    registry = Registry(tmp_path / "registry")
    truth = read_ground_truth(corpus).to_pylist()
    everything = load_config(DownloadConfig, ROOT / "configs/download/demo.yaml",
                             [*OVERRIDES, "disallowed_header_directives=[]"])  # fmt: skip
    with serve_corpus(corpus) as base:
        source = write_source_list(corpus, base, tmp_path / "source.parquet")
        raw = run_download(everything, source, name="raw", registry=registry)
    assert "disallowed_by_robots" not in raw.drop_reasons
    index = {row["url"]: row for row in pq.read_table(registry.local_path(raw, "index.parquet")).to_pylist()}
    opted_out = [row for row in truth if row["bad_kind"] == "opted_out"]
    assert opted_out and all(index[f"{base}/{row['path']}"]["status"] == "ok" for row in opted_out)


def test_an_image_changed_since_the_list_was_made_is_not_stored(corpus, tmp_path):
    """`verify_hash_col`: each image checked against the sha256 its list gives (DataComp's metadata has one); an
    image whose bytes changed after is dropped as hash_mismatch, here and again in a --retry-failed, which takes the
    expected hashes from the download's normalised list."""
    import shutil

    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    truth = read_ground_truth(copy).to_pylist()
    changed = next(row for row in truth[2:] if row["bad_kind"] is None)
    registry = Registry(tmp_path / "registry")
    verified = load_config(DownloadConfig, ROOT / "configs/download/demo.yaml", [*OVERRIDES, "verify_hash_col=sha256"])
    with serve_corpus(copy) as base:
        source = write_source_list(copy, base, tmp_path / "source.parquet", sha256=True)
        (copy / changed["path"]).write_bytes((corpus / truth[0]["path"]).read_bytes())  # another image there now
        raw = run_download(verified, source, name="raw", registry=registry)
        retried = run_retry_failed(verified, raw.ref, name="raw", registry=registry)
    index = {row["url"]: row for row in pq.read_table(registry.local_path(raw, "index.parquet")).to_pylist()}
    assert index[f"{base}/{changed['path']}"]["drop_reason"] == "hash_mismatch"
    assert raw.drop_reasons["hash_mismatch"] == 1
    assert raw.counts["ok"] == sum(row["expected"] not in DOWNLOAD_LEVEL for row in truth) - 1  # the rest stored
    assert retried.drop_reasons["hash_mismatch"] == 1 and "http_503" not in retried.drop_reasons
    assert retried.counts["recovered"] == raw.drop_reasons["http_503"]


def test_a_lists_own_ids_and_extra_columns_reach_the_index_its_retry_and_the_shards(corpus, tmp_path):
    """`key_col: uid` (DataComp's ids) names the samples; `save_additional_columns: [similarity]` (LAION's CLIP
    score) is carried by img2dataset into the raw index, each value beside its sample, by --retry-failed into
    the retried rows as well, and by the shard stage into its index and each sample's json."""
    import pyarrow as pa

    registry = Registry(tmp_path / "registry")
    carried = load_config(DownloadConfig, ROOT / "configs/download/demo.yaml",
                          [*OVERRIDES, "key_col=uid", "save_additional_columns=[similarity]"])  # fmt: skip
    with serve_corpus(corpus) as base:
        listed = pq.read_table(write_source_list(corpus, base, tmp_path / "plain.parquet"))
        uids = [f"uid{row:04d}x" for row in range(len(listed))]
        scores = [round(0.2 + row / 1000, 3) for row in range(len(listed))]
        source = tmp_path / "source.parquet"
        pq.write_table(listed.append_column("uid", pa.array(uids)).append_column("similarity", pa.array(scores)),
                       source)  # fmt: skip
        raw = run_download(carried, source, name="raw", registry=registry)
        retried = run_retry_failed(carried, raw.ref, name="raw", registry=registry)
    expected = {(url, caption): (uid, score) for url, caption, uid, score
                in zip(listed["url"].to_pylist(), listed["caption"].to_pylist(), uids, scores)}  # fmt: skip
    for version in (raw, retried):
        index = pq.read_table(registry.local_path(version, "index.parquet"))
        assert index.schema.field("similarity").type == pa.float64()
        for row in index.to_pylist():
            assert (row["key"], row["similarity"]) == expected[(row["url"], row["raw_caption"])]
        assert version.metadata["source_columns"] == ["similarity"]
    assert retried.counts["recovered"] == raw.drop_reasons["http_503"] > 0
    web = run_shard(ShardConfig(samples_per_shard=16), retried.ref, name="web", registry=registry)
    assert web.metadata["source_columns"] == ["similarity"]
    score_of = dict(zip(uids, scores))
    index = pq.read_table(registry.local_path(web, "index.parquet"))
    assert index.schema.field("similarity").type == pa.float64()
    assert {row["key"]: row["similarity"] for row in index.to_pylist()} == \
        {key: score_of[key] for key in index.column("key").to_pylist()}  # fmt: skip
    assert len(index) == retried.counts["ok"]  # the shard stage's drops too (their score says what was dropped)
    assert set(index.column("status").to_pylist()) == {"ok", "dropped"}
    in_shards = {key: meta["similarity"] for key, _, _, meta in iter_samples(registry, web, decode=False)}
    assert in_shards and in_shards == {key: score_of[key] for key in in_shards}


def test_retry_on_a_remote_registry_copies_the_parent_shards_inside_its_store(corpus, tmp_path, monkeypatch):
    # A registry on fsspec memory:// (as s3://): the retried version's unchanged parent shards are copied inside
    # the store at publish, not downloaded to this machine and uploaded again.
    import uuid

    from datasets_manifests.ops import verify

    from pipelines.tasks import download

    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setattr(download, "SOURCE_PART_ROWS", 25)  # img2dataset reads the list as 3 files of 2 shards
    staged_before_removal: dict[str, set[str]] = {}
    remove_work = download._remove_work

    def spy(registry, cfg, key):  # what a run had on this machine, just before its work dir goes
        staged = {f"raw/{p.name}" for p in (tmp_path / "work" / key / "stage" / "raw").glob("*.tar")}
        staged_before_removal.setdefault(key, set()).update(staged)
        remove_work(registry, cfg, key)

    monkeypatch.setattr(download, "_remove_work", spy)
    registry = Registry(f"memory://dl-retry-{uuid.uuid4().hex[:8]}")
    with serve_corpus(corpus) as base:
        source = write_source_list(corpus, base, tmp_path / "source.parquet")
        raw = run_download(_config(), source, name="raw", registry=registry)
        retried = run_retry_failed(_config(), raw.ref, name="raw", registry=registry)
    truth = read_ground_truth(corpus).to_pylist()
    assert raw.counts["ok"] + sum(raw.drop_reasons.values()) == len(truth)
    assert sorted(e.path for e in raw.files if e.path.endswith(".tar")) == [f"raw/{i:05d}.tar" for i in range(6)]
    parent_shards = {e.path: e.sha256 for e in raw.files if e.path.startswith("raw/")}
    assert {e.path: e.sha256 for e in retried.files if e.path in parent_shards} == parent_shards
    assert retried.counts["recovered"] == raw.drop_reasons["http_503"] and verify(registry, retried) == []
    staged = staged_before_removal[retried.producer.cache_key]
    assert staged and not staged & set(parent_shards)  # only the retried shards were on this machine
    assert not any((tmp_path / "work").iterdir())  # and the work dirs are gone


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_resume_after_kill(corpus, tmp_path, stop):
    """A download killed (kill -9), or stopped with Ctrl-C (SIGINT to its process group, as a terminal sends it:
    it exited 0, as if finished, through img2dataset's own handler), goes on from its finished shards."""
    truth = read_ground_truth(corpus).to_pylist()
    registry_dir = tmp_path / "registry"
    with serve_corpus(corpus, delay=0.08) as base:
        source = write_source_list(corpus, base, tmp_path / "source.parquet")
        command = [sys.executable, "-m", "pipelines.cli", "download", str(source), "--name", "raw",
                   "--registry", str(registry_dir), "--config", str(ROOT / "configs/download/demo.yaml")]
        command += [arg for override in OVERRIDES for arg in ("--set", override)]
        with open(tmp_path / "download.log", "w") as log:
            # SIGINT handled as in a terminal even where the tests run with it ignored (a script's background job)
            process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=log, stderr=log,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.time() + 120
            finished: list[Path] = []
            while time.time() < deadline and not finished:
                finished = list(registry_dir.glob(".work/*/stage/raw/00000_stats.json"))
                time.sleep(0.05)
            os.killpg(process.pid, stop)  # the whole group: img2dataset's pool processes too
            returncode = process.wait(timeout=60)
        assert finished, "first shard never finished"
        if stop == signal.SIGINT:
            said = (tmp_path / "download.log").read_text()
            message = ("blip download: interrupted: the download stopped; the shards it finished are kept: the same "
                       "command goes on from them")
            assert returncode == 130 and message in said, said[-3000:]
            assert "Traceback" not in said  # its workers ignore the terminal's Ctrl-C: the driver stops them
            assert _group_ends(process.pid), "a process of the stopped download is still running"
        raw_dir = finished[0].parent
        done_before = sorted(p.name for p in raw_dir.glob("*_stats.json"))
        assert len(done_before) < 6, "download finished before the kill; the test proves nothing"
        first_mtime = (raw_dir / "00000.tar").stat().st_mtime_ns
        registry = Registry(registry_dir)
        assert registry.versions("dataset", "raw") == []  # nothing half-published
        raw = run_download(_config(), source, name="raw", registry=registry)
    assert registry.local_path(raw, "raw/00000.tar").stat().st_mtime_ns == first_mtime  # not redone
    assert len(raw.shards()) == 6
    _check_against_truth(registry, raw, truth, base, redone=True)


def _group_ends(group: int, timeout: float = 30) -> bool:
    """True once no process of the process group is left."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _spawned_children() -> set[int]:
    """Pids of this process's children started by multiprocessing's spawn (download workers, img2dataset's logger)."""
    from process_table import processes

    return {pid for pid, parent, command in processes() if parent == os.getpid() and "spawn_main" in command}


@pytest.mark.timeout(300, method="thread")  # img2dataset's own pool waited forever here (signals do not reach it)
def test_download_workers_killed_mid_shard_have_their_shards_done_again(corpus, tmp_path):
    """SIGKILL every download worker process once the first shard is written (an OOM kill): their shards go to
    new workers and the version is complete, every good sample exactly once."""
    import threading

    truth = read_ground_truth(corpus).to_pylist()
    registry = Registry(tmp_path / "registry")
    killed: list[int] = []

    def kill_the_workers_after_the_first_shard() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if list(Path(registry.root).glob(".work/*/stage/raw/00000_stats.json")):
                for pid in _spawned_children() - before:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    with serve_corpus(corpus, delay=0.08) as base:
        source = write_source_list(corpus, base, tmp_path / "source.parquet")
        before = _spawned_children()
        killer = threading.Thread(target=kill_the_workers_after_the_first_shard, daemon=True)
        killer.start()
        config = load_config(DownloadConfig, ROOT / "configs/download/demo.yaml", [*OVERRIDES, "processes=2"])
        raw = run_download(config, source, name="raw", registry=registry)
        killer.join(timeout=5)
    assert killed, "the download ended before its workers could be killed"
    assert len(raw.shards()) == 6
    _check_against_truth(registry, raw, truth, base, redone=True)


def test_ray_distributor_into_an_output_folder_url(corpus, tmp_path, ray_session):
    # Each shard is a Ray task writing to output_folder (on a cluster: s3://...; here a file:// URL outside the
    # registry); the driver collects the shards through fsspec and the counts match the ground truth exactly.
    truth = read_ground_truth(corpus).to_pylist()
    registry = Registry(tmp_path / "registry")
    shared = tmp_path / "shared"
    cfg = load_config(DownloadConfig, ROOT / "configs/download/ray.yaml",
                      [*OVERRIDES, "threads=4", "retries=0", f"output_folder=file://{shared}"])  # 503s stay
    assert cfg.distributor == "ray"
    with serve_corpus(corpus) as base:
        source = write_source_list(corpus, base, tmp_path / "source.parquet")
        raw = run_download(cfg, source, name="raw-ray", registry=registry)
        _check_against_truth(registry, raw, truth, base)
        assert len(raw.shards()) == 6
        key = raw.producer.cache_key
        assert key == download_key(cfg, f"source:{_sha256(source)}")
        # The run's folder in output_folder held the shards the publish copied: removed after it.
        assert shared.is_dir() and not (shared / key).exists()
        assert not (tmp_path / "registry" / ".work" / key).exists()
        # Same output settings through the multiprocessing distributor: the same version, not a new download.
        assert run_download(_config(), source, name="raw-ray", registry=registry).id == raw.id


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_download_that_gets_no_image_says_so_and_the_shard_stage_refuses_it(tmp_path, capsys):
    import json
    import socket

    from pipelines.cli import main

    with socket.socket() as closed:  # a port nothing listens on: every request is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    source = tmp_path / "source.json"
    source.write_text(json.dumps([{"url": f"http://127.0.0.1:{port}/{i}.jpg", "caption": f"a dog {i}"}
                                  for i in range(12)]))  # fmt: skip
    common = ["--registry", str(tmp_path / "registry"), "--config", str(ROOT / "configs/download/demo.yaml")]
    overrides = [arg for override in OVERRIDES for arg in ("--set", override)]
    assert main(["download", str(source), "--name", "raw-dead", *common, *overrides]) == 1
    error = capsys.readouterr().err
    assert "blip download: error: no image could be downloaded (connection_error: 12)" in error
    assert "--retry-failed raw-dead@v1 --name raw-dead" in error
    assert main(["shard", "raw-dead@v1", "--name", "web-dead", "--registry", str(tmp_path / "registry")]) == 2
    assert "blip shard: error: raw-dead@v1 holds no image" in capsys.readouterr().err
