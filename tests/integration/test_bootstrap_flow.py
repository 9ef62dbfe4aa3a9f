"""The bootstrap flow end to end, with the real parts: crash and resume, then the deployment path.

1. `blip flow run tiny` (Prefect ephemeral mode, local Ray) is SIGKILLed while CapFilt runs (after its first
   shard's completion marker appears) and run again: every finished stage is reused (same versions, same
   ids), CapFilt resumes, the flow completes, and the CapFilt output equals an uninterrupted run's bytes.
2. On the same registry: a real Prefect server on 127.0.0.1 (isolated PREFECT_HOME), the process work pool,
   `prefect deploy` of infra/prefect.yaml, a worker, `prefect deployment run 'bootstrap/bootstrap-tiny'
   --watch` -> Completed, and `blip run bootstrap-tiny` -> exit 0; no stage publishes a second version.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from datasets_manifests.registry import Registry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The tiny preset made smaller still: a few minutes for the whole recipe on 2 cores.
FAST = [
    "source.demo.n=160",
    "download.samples_per_shard=100",
    "shard.samples_per_shard=40",
    "pretrain.loop.max_steps=6",
    "pretrain.loop.checkpoint_every=3",
    "pretrain.data.batch_size=8",
    "downstream.num_train=16",
    "downstream.num_val=4",
    "downstream.num_test=8",
    "finetune_captioner.loop.max_steps=3",
    "finetune_filter.loop.max_steps=3",
    "finetune_captioner.data.batch_size=8",
    "finetune_filter.data.batch_size=8",
    "capfilt.compute.batch_size=8",
    # A filter finetuned for 3 steps scores everything near its prior (~1/3 match): keep every text so the
    # bootstrapped pretraining has data. The filter decisions themselves are tested in test_capfilt_ray.py.
    "capfilt.filter.threshold=0.0",
    "evaluate_retrieval.k_test=4",
    "evaluate_caption.caption_metrics=[Bleu,ROUGE_L,CIDEr]",
]
STAGES_BEFORE_CAPFILT = ("tiny-raw", "tiny-web", "tiny-downstream", "tiny-pretrain-web", "tiny-captioner-web",
                         "tiny-filter-web")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _flow_command(registry: Path) -> list[str]:
    args = [str(BIN / "python"), "-m", "pipelines.cli", "flow", "run", "tiny", "--set", f"registry={registry}"]
    for override in FAST:
        args += ["--set", override]
    return args


def _snapshot(registry: Registry) -> dict[str, list[str]]:
    return {name: [m.id for m in registry.versions("dataset", name) + registry.versions("model", name)
                   + registry.versions("evaluation", name)]
            for kind in ("dataset", "model", "evaluation") for name in registry.names(kind)}


@pytest.fixture(scope="module")
def finished_registry(tmp_path_factory) -> Path:
    """A registry where the flow was killed during CapFilt and then completed by a second run."""
    root = tmp_path_factory.mktemp("flow")
    registry_dir = root / "registry"
    log = open(root / "first-run.log", "w")
    first = subprocess.Popen(_flow_command(registry_dir), cwd=ROOT, env=_env(PREFECT_HOME=str(root / "prefect")),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 1200
    try:
        while not list((registry_dir / ".work").glob("*/done/*.json")):
            assert first.poll() is None, f"flow ended ({first.returncode}) before CapFilt: {(root / 'first-run.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "CapFilt never started"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    registry = Registry(registry_dir)
    before = _snapshot(registry)
    for name in STAGES_BEFORE_CAPFILT:
        assert before.get(name), f"{name} was not published before CapFilt"
    assert "tiny-capfilt" not in before

    second = subprocess.run(_flow_command(registry_dir), cwd=ROOT, env=_env(PREFECT_HOME=str(root / "prefect")),
                            capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    after = _snapshot(Registry(registry_dir))
    for name in STAGES_BEFORE_CAPFILT:  # reused: no new version, same content
        assert after[name] == before[name], name
    assert len(after["tiny-capfilt"]) == 1 and len(after["tiny-report"]) == 1
    assert "Downstream metrics" in second.stdout
    return registry_dir


def test_resumed_capfilt_equals_an_uninterrupted_run(finished_registry):
    from pipelines.pipeline_config import load_pipeline
    from pipelines.tasks.capfilt import run_capfilt

    registry = Registry(finished_registry)
    resumed = registry.resolve("tiny-capfilt@latest")
    cfg = load_pipeline("tiny", [f"registry={finished_registry}", *FAST])
    fresh = run_capfilt(cfg.capfilt, registry.resolve("tiny-web@latest"),
                        captioner_ref=registry.resolve("tiny-captioner-web@latest"),
                        filter_ref=registry.resolve("tiny-filter-web@latest"), name="check-capfilt", registry=registry)
    assert {e.path: e.sha256 for e in resumed.files} == {e.path: e.sha256 for e in fresh.files}
    assert resumed.counts == fresh.counts


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
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_deployment_run_completes(prefect_server, finished_registry, tmp_path):
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
        from pipelines.cli import main

        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
        try:
            assert main(["run", "bootstrap-tiny", "-p", f"overrides={overrides}", "--timeout", "1200"]) == 0
        finally:
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    after = _snapshot(Registry(finished_registry))
    assert after == before  # every stage was reused: the registry is the cache
    report = Registry(finished_registry).resolve("tiny-report@latest")
    assert set(report.metadata["report"]["models"]) == {"web", "capfilt"}
