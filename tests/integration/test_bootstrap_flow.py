"""The bootstrap flow end to end, with the real parts: crash and resume, then the deployment path.

1. `blip flow run tiny` (its temporary Prefect server, local Ray) is SIGKILLed while CapFilt runs (after its first
   shard's completion marker appears) and run again: every finished stage is reused (same versions, same
   ids), CapFilt resumes, the flow completes, and the CapFilt output equals an uninterrupted run's bytes.
2. On the same registry: a real Prefect server on 127.0.0.1 (isolated PREFECT_HOME), the process work pool,
   `prefect deploy` of infra/prefect.yaml, a worker, `prefect deployment run 'bootstrap/bootstrap-tiny'
   --watch` -> Completed, and `blip run bootstrap-tiny` -> exit 0; no stage publishes a second version.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest
from flow_helpers import BIN, FAST, ROOT, _env, _flow_command, _snapshot, stop_process_group

from datasets_manifests.registry import Registry

pytestmark = pytest.mark.integration


def test_resumed_capfilt_equals_an_uninterrupted_run(pipeline_registry):
    finished_registry = pipeline_registry
    from pipelines.pipeline_config import load_pipeline
    from pipelines.tasks.capfilt import run_capfilt

    registry = Registry(finished_registry)
    resumed = registry.resolve("tiny-capfilt@latest")
    cfg = load_pipeline("tiny", [f"registry={finished_registry}", *FAST])
    fresh = run_capfilt(cfg.capfilt, registry.resolve("tiny-web@latest"),
                        captioner_ref=registry.resolve("tiny-captioner-web@latest"),
                        filter_ref=registry.resolve("tiny-filter-web@latest"), name="check-capfilt", registry=registry)
    # Shards, the per-sample index and the texts layer are byte-identical; stats.json also holds timings.
    def content(manifest):
        return {e.path: e.sha256 for e in manifest.files if e.path != "stats.json"}

    assert content(resumed) == content(fresh)
    assert resumed.counts == fresh.counts


def test_both_pretrainings_add_the_human_pairs(pipeline_registry):
    """BLIP pretrains on web (or bootstrapped) pairs + the human-annotated train pairs of the downstream set."""
    registry = Registry(pipeline_registry)
    clean, vg = registry.resolve("tiny-downstream@latest"), registry.resolve("tiny-human-vg-caption@latest")
    pairs = sum(int(entry.num_samples) for entry in clean.shards("train"))
    assert pairs == 16 * 5  # FAST: 16 train images x 5 captions, one training pair per caption
    assert vg.splits == {"train": 200 * 3}  # the tiny preset's demo Visual Genome captions
    trained = 0
    for tag, data_name in (("web", "tiny-web"), ("capfilt", "tiny-capfilt")):
        if not registry.versions("model", f"tiny-pretrain-{tag}"):
            continue  # CapFilt kept nothing with the tiny random models: no bootstrapped pretraining
        model, data = registry.resolve(f"tiny-pretrain-{tag}@latest"), registry.resolve(f"{data_name}@latest")
        assert model.parent_ids[:3] == (data.id, clean.id, vg.id)
        assert model.metadata["datasets"][clean.ref] == pairs and model.metadata["datasets"][vg.ref] == 600
        assert model.counts["dataset_samples"] == sum(model.metadata["datasets"].values())
        trained += 1
    assert trained >= 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    env = _env(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_WORKER_QUERY_SECONDS="2")
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None, (home / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "Prefect server did not become healthy"
        time.sleep(0.5)
    try:
        yield env
    finally:
        stop_process_group(server)


def test_deployment_run_completes(prefect_server, pipeline_registry, tmp_path):
    finished_registry = pipeline_registry
    env = prefect_server
    prefect = str(BIN / "prefect")

    def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([prefect, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    run("work-pool", "create", "local-process", "--type", "process", "--overwrite")
    run("--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml")
    listed = run("deployment", "ls").stdout
    assert "bootstrap/bootstrap-tiny" in listed.replace("\n", "") or "bootstrap-129m" in listed
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "local-process", "--name", "test-worker"],
                              cwd=ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    before = _snapshot(Registry(finished_registry))
    overrides = json.dumps([f"registry={finished_registry}", *FAST])
    try:
        run("deployment", "run", "bootstrap/bootstrap-tiny", "--param", f"overrides={overrides}", "--watch",
            "--watch-timeout", "1200", timeout=1300)
        short = subprocess.run([str(BIN / "blip"), "run", "bootstrap-tiny", "-p", f"overrides={overrides}",
                                "--timeout", "1200"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1300)
        assert short.returncode == 0, short.stdout[-3000:] + short.stderr[-3000:]
        assert "Completed" in short.stdout
    finally:
        stop_process_group(worker)
    after = _snapshot(Registry(finished_registry))
    assert after == before  # every stage was reused: the registry is the cache
    report = Registry(finished_registry).resolve("tiny-report@latest")
    assert set(report.metadata["report"]["models"]) == {"web", "capfilt"}


def test_a_given_captioner_and_filter_replace_the_web_pretraining(pipeline_registry, tmp_path):
    """`capfilt_models` (e.g. BLIP's released pair): the flow pretrains nothing on the web pairs and runs CapFilt
    with the given models. Given the pair the first run finetuned, on a copy of its registry, every stage is
    reused (CapFilt's key is its inputs' ids) but the given pair's evaluations, which score as the web pair's, and
    the report comparing them with the bootstrapped model."""
    import shutil

    registry_dir = tmp_path / "registry"
    shutil.copytree(pipeline_registry, registry_dir)
    # The download's images freed once its shards exist (`blip data rm --data-only`): the rerun reuses its record.
    freed = subprocess.run([str(BIN / "blip"), "data", "rm", "tiny-raw@v1", "--data-only", "--yes", "--registry",
                            str(registry_dir)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert freed.returncode == 0 and "removed tiny-raw@v1 (dataset, its data files)" in freed.stdout, freed.stderr
    before = _snapshot(Registry(registry_dir))
    command = _flow_command(registry_dir) + ["--set", "capfilt_models.captioner=tiny-captioner-web@v1",
                                             "--set", "capfilt_models.filter=tiny-filter-web@v1"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=_env(PREFECT_HOME=str(tmp_path / "prefect")), capture_output=True,
                            text=True, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "the given captioner and filter vs CapFilt-bootstrapped data" in result.stdout + result.stderr
    registry = Registry(registry_dir)
    after = _snapshot(registry)
    new = {name for name in after if after[name] != before.get(name)}
    assert new == {"tiny-eval-caption-given", "tiny-eval-retrieval-given", "tiny-report"}  # nothing downloaded
    raw = registry.resolve("tiny-raw@v1")
    assert raw.shards() and set(registry.absent(raw, raw.shards())) == {entry.path for entry in raw.shards()}
    report = registry.resolve("tiny-report@latest").metadata["report"]["models"]
    assert set(report) == {"given", "capfilt"}
    web = {}  # the same models: the same scores
    for task in ("caption", "retrieval"):
        metrics = registry.resolve(f"tiny-eval-{task}-web@latest").metadata["metrics"]
        web.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None})
    assert report["given"]["metrics"] == web


def test_the_flows_temporary_server_outlives_a_ctrl_c_and_stops_after_the_run(tmp_path, monkeypatch):
    """`blip flow run`'s Prefect server (no PREFECT_API_URL) ignores the terminal's Ctrl-C, which reaches every
    process of the group: Prefect's own temporary server stopped at once, and the interrupted flow hung for
    minutes retrying to report to it. It ends when the run's process stops it."""
    import os
    import signal

    from prefect.settings import PREFECT_API_URL

    from pipelines.prefect_server import temporary_server

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with temporary_server() as url:
        assert url and PREFECT_API_URL.value() == url  # this process's client points at it
        [server] = [pid for pid, command in _children().items() if "pipelines.prefect_server" in command]
        os.kill(server, signal.SIGINT)  # the terminal's Ctrl-C
        time.sleep(1)
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
    assert PREFECT_API_URL.value() != url
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    assert server not in _children()


def _children() -> dict[int, str]:
    import os

    from process_table import processes

    return {pid: command for pid, parent, command in processes() if parent == os.getpid()}
