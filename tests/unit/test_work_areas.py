"""`blip data work`: what stage runs left in the work dirs (a local registry's `.work`, this machine's work dir and a
remote registry's store prefix), said for what each is, and removed on request; a published run's note goes with
its publish."""

from __future__ import annotations

import json

import pytest

from datasets_manifests.filesystems import url_to_fs
from datasets_manifests.manifest import Producer
from datasets_manifests.ops import work_entries
from datasets_manifests.registry import CLAIM_NAME, WORK_NOTE, Registry
from pipelines.cli import main

from datasets_fixtures import memory_url


def _publish(registry: Registry, staging, name: str, key: str, metadata: dict | None = None, kind: str = "dataset"):
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "x.bin").write_bytes(name.encode())
    return registry.publish(kind=kind, name=name, staging_dir=staging, files=[{"path": "x.bin", "role": "other"}],
                            producer=Producer(stage="test", cache_key=key), metadata=metadata or {})  # fmt: skip


def test_a_published_run_s_note_goes_with_its_publish(tmp_path):
    registry = Registry(tmp_path / "registry")
    work = registry.note_work("k1", stage="pretrain", name="model-a")
    assert json.loads((work / WORK_NOTE).read_text())["name"] == "model-a"
    _publish(registry, work / "publish", "model-a", "k1", kind="model")
    assert not work.exists()  # moved out by the publish, then the note, then the emptied dir


def test_work_is_listed_for_what_it_is_and_leftovers_removed(tmp_path, capsys):
    registry = Registry(tmp_path / "registry")
    base = registry.work_base()
    unfinished = registry.note_work("k-unfinished", stage="shard", name="web-shards")
    (unfinished / "scan").mkdir()
    (unfinished / "scan/000000.arrow").write_bytes(b"r" * 1000)
    leftover = registry.note_work("k-leftover", stage="capfilt", name="web-capfilt")
    (leftover / "records.arrow").write_bytes(b"l" * 500)  # a run killed between its publish and its clean-up
    version = _publish(registry, tmp_path / "staging", "web-capfilt", "k-leftover")
    assert sorted(p.name for p in leftover.iterdir()) == ["records.arrow"]  # the publish took the note only
    copy = registry.work_dir(f"fetch-{version.id[:24]}")
    (copy / "x.bin").write_bytes(b"c" * 200)
    for run in ("pretrain-aaa", "pretrain-bbb"):
        (base / "train-runs" / run / "checkpoint_000001").mkdir(parents=True)
        (base / "train-runs" / run / "checkpoint_000001/model.pt").write_bytes(b"m" * 3000)
    _publish(registry, tmp_path / "model-staging", "tiny-pretrain", "k-model", kind="model",
             metadata={"ray_run": {"name": "pretrain-aaa", "storage_path": str(base / "train-runs")}})

    entries = {entry.key: entry for entry in work_entries(registry)}
    assert set(entries) == {"k-unfinished", "k-leftover", f"fetch-{version.id[:24]}", "train-runs/pretrain-aaa",
                            "train-runs/pretrain-bbb"}  # fmt: skip
    assert (entries["k-unfinished"].state, entries["k-unfinished"].what) == ("unfinished", "shard → web-shards")
    assert entries["k-unfinished"].files == 2 and entries["k-unfinished"].bytes > 1000  # the note counts
    assert entries["k-leftover"].state == "leftover" and entries["k-leftover"].detail == "published as web-capfilt@v1"
    assert entries[f"fetch-{version.id[:24]}"].what == "local copy of web-capfilt@v1"
    assert entries["train-runs/pretrain-aaa"].detail == "model tiny-pretrain@v1 published from it"
    assert entries["train-runs/pretrain-bbb"].detail.startswith("no model published")

    assert main(["data", "--registry", str(registry.root), "work"]) == 0
    out = capsys.readouterr().out
    assert "shard → web-shards" in out and "unfinished" in out and "5 in all" in out
    assert main(["data", "--registry", str(registry.root), "work", "--remove-leftovers"]) == 0
    assert sorted(e.key for e in work_entries(registry)) == ["k-unfinished", "train-runs/pretrain-bbb"]
    assert "removed " in capsys.readouterr().err
    assert main(["data", "--registry", str(registry.root), "work", "--remove", "train-runs/pretrain-bbb",
                 "--remove", "k-unfinished", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == []
    assert not unfinished.exists() and not (base / "train-runs/pretrain-bbb").exists()
    assert main(["data", "--registry", str(registry.root), "work", "--remove", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no work 'nope'" in err[0]


def test_a_remote_registry_s_work_is_listed_from_its_store_and_removed_there(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "machine-work"))
    registry = Registry(memory_url())
    registry.note_work("k-shard", stage="shard", name="web-shards", shared=True)
    store_prefix = f"{registry.root}/.work/k-shard"
    registry.fs.pipe_file(f"{store_prefix}/shards/train-000000.tar", b"t" * 4096)
    (tmp_path / "machine-work" / "k-shard" / WORK_NOTE).unlink()  # another machine's run: only the store knows it
    (tmp_path / "machine-work" / "k-shard").rmdir()
    [entry] = work_entries(registry)
    assert (entry.key, entry.state, entry.what) == ("k-shard", "unfinished", "shard → web-shards")
    assert entry.bytes > 4096 and entry.places == (registry.fs.unstrip_protocol(store_prefix),)
    assert entry.modified is not None
    assert main(["data", "--registry", registry.url, "work", "--remove", "k-shard"]) == 0
    assert not registry.fs.exists(store_prefix) and work_entries(registry) == []


def test_an_area_without_a_note_is_still_listed_and_caches_are_named(tmp_path):
    registry = Registry(tmp_path / "registry")
    (registry.work_dir("old") / "stage").mkdir()
    (registry.work_dir("old") / "stage/source.parquet").write_bytes(b"s")
    registry.work_dir("scratch")  # empty: left out
    (registry.work_dir("demo-corpus-abc") / "corpus.json").write_text("{}")
    (registry.work_dir("scrub-0123abcd") / "index.parquet").write_bytes(b"i")  # a killed `rm --data-only`
    corpus, old, scrub = work_entries(registry)  # by key
    assert (old.key, old.state, old.files) == ("old", "unfinished", 1) and old.what.startswith("stage run (no note")
    assert (corpus.state, corpus.what, corpus.removable_as_leftover) == ("cache", "the generated demo corpus", True)
    assert (scrub.state, scrub.removable_as_leftover) == ("cache", True) and "stopped `blip data rm" in scrub.what


def test_training_runs_in_another_storage_are_listed_from_the_model_and_the_note(tmp_path):
    """A cluster's `scaling.storage_path` (memory:// for s3://): the run a published model names, and the run an
    unfinished training stage's note names, each with its checkpoints; the published one's are a leftover."""
    registry = Registry(tmp_path / "registry")
    storage = memory_url()
    for run in ("pretrain-done", "pretrain-going"):
        fs, root = url_to_fs(f"{storage}/{run}/checkpoint_000001/model.pt")
        fs.pipe_file(root, b"m" * 2048)
    _publish(registry, tmp_path / "model-staging", "tiny-pretrain", "k-model", kind="model",
             metadata={"ray_run": {"name": "pretrain-done", "storage_path": storage}})
    registry.note_work("k-going", stage="pretrain", name="tiny-pretrain-2",
                       ray_run={"name": "pretrain-going", "storage_path": storage})
    entries = {entry.key: entry for entry in work_entries(registry)}
    done, going = entries[f"{storage}/pretrain-done"], entries[f"{storage}/pretrain-going"]
    assert (done.state, done.bytes, done.removable_as_leftover) == ("checkpoints", 2048, True)
    assert done.detail == "model tiny-pretrain@v1 published from it"
    assert going.detail.startswith("no model published") and not going.removable_as_leftover
    assert entries["k-going"].what == "pretrain → tiny-pretrain-2"
    assert main(["data", "--registry", str(registry.root), "work", "--remove-leftovers"]) == 0
    assert f"{storage}/pretrain-done" not in {entry.key for entry in work_entries(registry)}
    fs, going_root = url_to_fs(f"{storage}/pretrain-going")
    assert fs.exists(going_root)


def test_a_download_s_output_folder_run_is_counted_with_its_work_and_removed_with_it(tmp_path, monkeypatch):
    """A download into `output_folder` (s3://... at 129M; memory:// here) notes its run's folder there, in a remote
    registry's store too: listed and removed with the run's work."""
    from pipelines.tasks.download import DownloadConfig, _outside_work

    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "machine-work"))
    registry = Registry(memory_url())
    output_folder = memory_url()
    cfg = DownloadConfig(output_folder=output_folder)
    registry.note_work("k-download", stage="download", name="web-raw", shared=True,
                       outside=_outside_work(cfg, "k-download"))
    fs, root = url_to_fs(f"{output_folder}/k-download/raw/00000.tar")
    fs.pipe_file(root, b"r" * 5000)
    [entry] = work_entries(registry)
    assert (entry.what, entry.state) == ("download → web-raw", "unfinished")
    assert entry.bytes > 5000 and entry.outside == (f"{output_folder}/k-download",)
    assert main(["data", "--registry", registry.url, "work", "--remove", "k-download"]) == 0
    assert not fs.exists(root) and work_entries(registry) == []


def test_publishes_stopped_before_their_commit_are_listed_and_removed_only_on_request(tmp_path, capsys):
    """A killed publish leaves a local registry's `.staging/<name>-<id>` and a remote one's version folder without
    its manifest: listed as `uncommitted`, never taken by --remove-leftovers (a publish going on looks the same)."""
    local = Registry(tmp_path / "registry")
    (tmp_path / "registry/.staging/web-raw-1a2b3c4d/shards").mkdir(parents=True)
    (tmp_path / "registry/.staging/web-raw-1a2b3c4d/shards/x.tar").write_bytes(b"x" * 100)
    remote = Registry(memory_url())
    _publish(remote, tmp_path / "committed", "web-shards", "k-committed")
    remote.fs.pipe_file(f"{remote.root}/datasets/web-raw/v1/shards/x.tar", b"x" * 300)
    claim = json.dumps({"host": "node-7", "pid": 41, "started_at": "2026-11-29T10:00:00Z", "stage": "download"})
    remote.fs.pipe_file(f"{remote.root}/datasets/web-raw/v1/{CLAIM_NAME}", claim.encode())  # who was publishing
    for registry, key, what, size in ((local, ".staging/web-raw-1a2b3c4d", "a publish of web-raw", 100),
                                      (remote, "datasets/web-raw/v1", "a publish of web-raw@v1", 300 + len(claim))):
        [entry] = work_entries(registry)
        assert (entry.key, entry.what, entry.state, entry.bytes) == (key, what, "uncommitted", size)
        if registry is remote:
            assert entry.detail.startswith("started 2026-11-29T10:00:00Z on node-7 (pid 41, download); stopped")
        url = registry.url if registry is remote else str(registry.root)
        assert main(["data", "--registry", url, "work", "--remove-leftovers"]) == 0
        assert [e.key for e in work_entries(registry)] == [key]
        assert main(["data", "--registry", url, "work", "--remove", key]) == 0
        assert work_entries(registry) == []
    assert [m.ref for m in remote.list()] == ["web-shards@v1"]


def test_remove_stale_takes_abandoned_work_by_its_last_write(tmp_path, capsys):
    import os
    import time

    registry = Registry(tmp_path / "registry")
    old = _noted_run(registry, "k-old", "shard", "web-shards", 100)
    _noted_run(registry, "k-fresh", "shard", "web-shards-2", 100)
    ten_days_ago = time.time() - 10 * 86400
    for path in old.rglob("*"):
        os.utime(path, (ten_days_ago, ten_days_ago))
    assert main(["data", "--registry", str(registry.root), "work", "--remove-stale", "7"]) == 0
    assert [entry.key for entry in work_entries(registry)] == ["k-fresh"]
    assert main(["data", "--registry", str(registry.root), "work", "--remove-stale", "-1"]) == 2
    assert "--remove-stale takes a number of days >= 0" in capsys.readouterr().err


def test_the_browser_shows_the_work_as_blip_data_work_lists_it_and_writes_nothing(tmp_path, capsys):
    from starlette.testclient import TestClient

    from datasets_manifests.browser.app import create_app

    registry = Registry(tmp_path / "registry")
    _noted_run(registry, "k-unfinished", "shard", "web-shards", 1000)
    _noted_run(registry, "k-leftover", "capfilt", "web-capfilt", 500)
    _publish(registry, tmp_path / "staging", "web-capfilt", "k-leftover")
    before = sorted(str(p) for p in (tmp_path / "registry").rglob("*"))

    data = TestClient(create_app(str(tmp_path / "registry"))).get("/api/work").json()
    assert main(["data", "--registry", str(tmp_path / "registry"), "work", "--json"]) == 0
    assert data["entries"] == json.loads(capsys.readouterr().out)
    assert {e["key"]: e["state"] for e in data["entries"]} == {"k-unfinished": "unfinished", "k-leftover": "leftover"}
    assert data["spare_bytes"] == next(e["bytes"] for e in data["entries"] if e["key"] == "k-leftover")
    assert data["bytes"] == sum(e["bytes"] for e in data["entries"])
    assert sorted(str(p) for p in (tmp_path / "registry").rglob("*")) == before  # read-only


def _noted_run(registry, key, stage, name, size):
    """A stage run's noted work dir holding one file of `size` bytes."""
    work = registry.note_work(key, stage=stage, name=name)
    (work / "records.arrow").write_bytes(b"r" * size)
    return work


def test_a_second_process_on_the_same_run_is_refused_until_the_first_ends_or_publishes(tmp_path):
    """Two processes on the same stage inputs and config would write one work dir (two img2dataset runs into one
    output folder): the second is told which process runs it; a killed run holds nothing; a publish lets go."""
    import os
    import signal
    import subprocess
    import sys

    from datasets_manifests.registry import WorkInProgressError

    registry = Registry(tmp_path / "registry")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom datasets_manifests.registry import Registry\n"
         f"Registry({str(registry.root)!r}).note_work('k1', stage='download', name='web-raw')\n"
         "print('noted', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "noted"
        refused = rf"download → web-raw .* running already \(pid {holder.pid} on"
        with pytest.raises(WorkInProgressError, match=refused):
            registry.note_work("k1", stage="download", name="web-raw")
        with pytest.raises(WorkInProgressError, match="stop it first"):
            registry.remove_work("k1")
        registry.note_work("k2", stage="download", name="other")  # another run: not held
        running = {entry.key: entry for entry in work_entries(registry)}
        assert running["k1"].state == "running" and f"(pid {holder.pid})" in running["k1"].detail
        assert running["k2"].state == "unfinished"  # held by this process, not another
        assert main(["data", "--registry", str(registry.root), "work", "--remove-stale", "0"]) == 0
        assert [entry.key for entry in work_entries(registry)] == ["k1"]  # a running one is never stale
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    work = registry.note_work("k1", stage="download", name="web-raw")  # the killed run's lock went with it
    assert json.loads((work / WORK_NOTE).read_text())["pid"] == os.getpid()
    assert registry.note_work("k1", stage="download", name="web-raw") == work  # a retry in the same process
    _publish(registry, work / "publish", "web-raw", "k1")
    assert not (tmp_path / "registry/.work-locks/k1.lock").exists()
    second = subprocess.run([sys.executable, "-c", "from datasets_manifests.registry import Registry\n"
                             f"Registry({str(registry.root)!r}).note_work('k1', stage='download', name='web-raw')"])
    assert second.returncode == 0  # published: the lock was let go
    assert [path.name for path in (tmp_path / "registry/.work-locks").iterdir()] == ["k1.lock"]  # the second's


def test_a_run_noted_in_a_store_by_another_machine_is_refused_while_it_beats(tmp_path, monkeypatch):
    """A remote registry's stage run shares its note in the store and rewrites its `alive_at` every WORK_ALIVE_S:
    the same run started on another machine is refused while the note beats, and takes the work over once it has
    not beaten for WORK_STALE_S (the first machine stopped). The publish stops the beat."""
    import time
    from datetime import datetime, timedelta, timezone

    from datasets_manifests import registry as registry_module
    from datasets_manifests.registry import WorkInProgressError

    monkeypatch.setattr(registry_module, "WORK_ALIVE_S", 0.05)
    monkeypatch.setattr(registry_module, "WORK_TAKEOVER_SETTLE_S", 0.1)
    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work"))  # this machine's side of a remote registry
    registry = Registry(memory_url())
    url = f"{registry.root}/.work/k1/{WORK_NOTE}"

    def noted_elsewhere(seconds_ago: float) -> None:
        beat = (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
        registry.fs.pipe_file(url, json.dumps({"stage": "shard", "name": "web", "host": "node-7", "pid": 41,
                                                "started_at": "2026-11-29T10:00:00Z", "alive_at": beat}).encode())

    noted_elsewhere(5)
    with pytest.raises(WorkInProgressError, match=r"shard → web .* running already on node-7 \(pid 41"):
        registry.note_work("k1", stage="shard", name="web", shared=True)
    [entry] = work_entries(registry)
    assert entry.state == "running"
    with pytest.raises(WorkInProgressError, match="stop it first"):
        registry.remove_work("k1")
    noted_elsewhere(registry_module.WORK_STALE_S + 60)  # node-7 stopped: its work is this run's to go on from
    registry.note_work("k1", stage="shard", name="web", shared=True)
    first = json.loads(registry.fs.cat_file(url))
    assert first["host"] != "node-7" and first["alive_at"]
    time.sleep(1.2)  # the beat rewrites alive_at (a second's resolution)
    assert json.loads(registry.fs.cat_file(url))["alive_at"] > first["alive_at"]
    _publish(registry, tmp_path / "publish", "web", "k1")
    stopped = json.loads(registry.fs.cat_file(url))["alive_at"]
    time.sleep(1.2)
    assert json.loads(registry.fs.cat_file(url))["alive_at"] == stopped  # published: no beat


def test_of_two_machines_taking_over_one_stopped_run_the_later_note_goes_on(tmp_path, monkeypatch):
    """Two machines that find the same stopped run's note both overwrite it (a store cannot make a write
    conditional on the file it replaces): each reads the note back WORK_TAKEOVER_SETTLE_S after writing, and the
    one whose note is no longer there is refused, before its beat starts (it would overwrite the other's note).
    Here the other machine (node-9) writes its note just after this one's."""
    import threading
    import time
    from datetime import datetime, timedelta, timezone

    from datasets_manifests import registry as registry_module
    from datasets_manifests.registry import WorkInProgressError

    monkeypatch.setattr(registry_module, "WORK_ALIVE_S", 0.05)
    monkeypatch.setattr(registry_module, "WORK_TAKEOVER_SETTLE_S", 2.0)
    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work"))
    registry = Registry(memory_url())
    url = f"{registry.root}/.work/k1/{WORK_NOTE}"
    stopped = (datetime.now(timezone.utc) - timedelta(seconds=registry_module.WORK_STALE_S + 60))

    def note(host: str, beat: datetime, claim: str) -> bytes:
        return json.dumps({"stage": "shard", "name": "web", "host": host, "pid": 41, "claim": claim,
                           "started_at": "2026-11-29T10:00:00Z",
                           "alive_at": beat.strftime("%Y-%m-%dT%H:%M:%SZ")}).encode()  # fmt: skip

    registry.fs.pipe_file(url, note("node-7", stopped, "c7"))
    taken = threading.Event()

    def node_9_takes_it_over_too() -> None:  # as soon as this machine's note is there
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and json.loads(registry.fs.cat_file(url))["host"] == "node-7":
            time.sleep(0.005)
        registry.fs.pipe_file(url, note("node-9", datetime.now(timezone.utc), "c9"))
        taken.set()

    other = threading.Thread(target=node_9_takes_it_over_too)
    other.start()
    with pytest.raises(WorkInProgressError, match=r"running already on node-9"):
        registry.note_work("k1", stage="shard", name="web", shared=True)
    other.join()
    assert taken.is_set()
    time.sleep(0.3)  # no beat of this machine's overwrites node-9's note
    assert json.loads(registry.fs.cat_file(url))["host"] == "node-9"

    registry.fs.pipe_file(url, note("node-9", stopped, "c9"))  # node-9 stopped too; no one else comes now
    registry.note_work("k1", stage="shard", name="web", shared=True)
    mine = json.loads(registry.fs.cat_file(url))
    assert mine["host"] != "node-9" and mine["claim"] not in ("c7", "c9")
    _publish(registry, tmp_path / "publish", "web", "k1")


def test_a_training_run_shares_its_note_in_the_store_and_is_refused_to_another_machine(tmp_path, monkeypatch):
    """Pretraining (finetuning the same) notes its run in a remote registry's store as the data stages do: started
    from another machine while that one's note beats (a second Prefect worker), it is refused before any Ray Train
    worker starts, instead of training into the same run directory; its own run beats there, and its publish
    leaves nothing behind (the note in the store, the uploaded copy here). Ray Train itself is replaced by a run
    that writes a final checkpoint: memory:// is not shared with worker processes."""
    from datetime import datetime, timezone
    from pathlib import Path

    import ray.train

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_pretrain import BlipPretrain
    from datasets_manifests import registry as registry_module
    from datasets_manifests.registry import WorkInProgressError
    from pipelines.config import load_config
    from pipelines.tasks import _ray_train
    from pipelines.tasks.pretrain import PretrainConfig, lineage, run_pretrain

    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work"))
    registry = Registry(memory_url())
    staging = tmp_path / "shards"
    (staging / "shards").mkdir(parents=True)
    (staging / "shards/train-000000.tar").write_bytes(b"\0" * 1024)
    dataset = registry.publish(kind="dataset", name="web", staging_dir=staging, producer=Producer(stage="test"),
                               files=[{"path": "shards/train-000000.tar", "role": "shard", "split": "train",
                                       "num_samples": 64}])  # fmt: skip
    cfg = load_config(PretrainConfig, Path(__file__).resolve().parents[2] / "configs/train/pretrain_tiny.yaml",
                      ["scaling.num_workers=1"])  # fmt: skip
    key = lineage(registry, cfg, [dataset])[3]
    note_url = f"{registry.root}/.work/{key}/{WORK_NOTE}"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    registry.fs.pipe_file(note_url, json.dumps({"stage": "pretrain", "name": cfg.output_name, "host": "node-7",
                                                "pid": 41, "started_at": now, "alive_at": now}).encode())
    with pytest.raises(WorkInProgressError, match=rf"pretrain → {cfg.output_name} .* running already on node-7"):
        run_pretrain(cfg, dataset.ref, registry=registry)
    assert not any((tmp_path / "work" / "train-runs").iterdir())  # refused before a run directory was planned

    registry.fs.rm_file(note_url)  # node-7 stopped and its note was cleared
    seen = []

    def final_checkpoint_only(worker_config, *, storage_path, run_name, **kwargs):
        seen.append(json.loads(registry.fs.cat_file(note_url)))  # the run's own note, shared while it trains
        folder = tmp_path / "checkpoint"
        save_pretrained(BlipPretrain(preset("tiny")), folder / "model")
        metrics = {"final_step": 1, "planned_steps": 1, "restarts": 0, "restores": 0, "samples_seen": 64,
                   "dropped": {}, "init": {"from": "scratch"}, "summary": {}}  # fmt: skip
        (folder / _ray_train.METRICS_FILE).write_text(json.dumps(metrics))
        (folder / _ray_train.HISTORY_FILE).write_text("")
        return _ray_train.Outcome(ray.train.Checkpoint.from_directory(str(folder)), metrics)

    monkeypatch.setattr(_ray_train, "launch", final_checkpoint_only)
    model = run_pretrain(cfg, dataset.ref, registry=registry)
    assert seen[0]["host"] != "node-7" and seen[0]["stage"] == "pretrain" and seen[0]["alive_at"]
    assert model.producer.cache_key == key and not registry.fs.exists(f"{registry.root}/.work/{key}")
    assert not (tmp_path / "work" / key).exists() and work_entries(registry) == []
    assert registry_module._HEARTBEATS.get(note_url) is None  # the beat stopped with the publish


def test_two_machines_starting_the_same_run_at_once_do_not_both_go_on(tmp_path, monkeypatch):
    """Both look for the store note before either has written it (a deployment triggered twice): the note is
    created only if absent, so the one that writes second finds the other's and is refused."""
    from datetime import datetime, timezone

    from datasets_manifests.registry import WorkInProgressError

    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "work"))
    registry = Registry(memory_url())
    url = f"{registry.root}/.work/k1/{WORK_NOTE}"
    real_work_note = Registry._work_note

    def looked_before_the_other_wrote(self, key, store_only=False):
        if store_only and not looked:  # this machine's look: no note yet; node-7 writes its own right after
            looked.append(key)
            now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.fs.pipe_file(url, json.dumps({"stage": "shard", "name": "web", "host": "node-7", "pid": 41,
                                               "started_at": now, "alive_at": now}).encode())  # fmt: skip
            return None
        return real_work_note(self, key, store_only)

    looked: list[str] = []
    monkeypatch.setattr(Registry, "_work_note", looked_before_the_other_wrote)
    with pytest.raises(WorkInProgressError, match=r"running already on node-7 \(pid 41"):
        registry.note_work("k1", stage="shard", name="web", shared=True)
    assert looked == ["k1"] and json.loads(registry.fs.cat_file(url))["host"] == "node-7"  # its note stands
    assert not registry.running_elsewhere("k1")  # this process let go of its lock
