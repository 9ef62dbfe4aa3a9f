"""Shared integration fixtures: the registry produced by the demo pipeline (the bootstrap flow, killed during
CapFilt and resumed), used by the flow tests and by the browser test."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from datasets_manifests.registry import Registry
from flow_helpers import ROOT, STAGES_BEFORE_CAPFILT, _env, _flow_command, _snapshot


@pytest.fixture(scope="session")
def pipeline_registry(tmp_path_factory, ray_session) -> Path:
    """A registry where the flow was killed during CapFilt and then completed by a second run.

    The test session's Ray instance is up meanwhile, as another one may be on a user's machine: the flow's stages
    start their own beside it, and Ray Train's state-API calls must still find theirs."""
    root = tmp_path_factory.mktemp("flow")
    registry_dir = root / "registry"
    log = open(root / "first-run.log", "w")
    first = subprocess.Popen(_flow_command(registry_dir), cwd=ROOT, env=_env(PREFECT_HOME=str(root / "prefect")),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_capfilt_runs(first, registry_dir, root / "first-run.log")
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
    assert "Downstream metrics" in second.stdout + second.stderr  # the report table, printed by the flow
    for output in ((root / "first-run.log").read_text(), second.stdout + second.stderr):
        assert "Found multiple active Ray instances" not in output
    # The stage's own INFO lines reach the flow's log, once (Prefect's console prints them; ours stands aside).
    progress = [line for line in (second.stdout + second.stderr).splitlines()
                if "| INFO    | pipelines.tasks.capfilt - capfilt: " in line]
    assert progress and " img (100.0 %)" in progress[-1] and len(set(progress)) == len(progress), progress
    # The trainings' progress too: off a terminal, a line a minute and one at the end (not a redrawn bar).
    for stage in ("pretrain-capfilt", "finetune-captioner-capfilt", "finetune-filter-capfilt"):
        trained = [line for line in (second.stdout + second.stderr).splitlines()
                   if f"| INFO    | pipelines.progress - {stage}: " in line]  # fmt: skip
        assert trained and " steps (100.0 %)" in trained[-1] and "loss" in trained[-1], (stage, trained)
    # ... and the run's log on the Prefect server (the ephemeral one's database), as the UI shows it
    with contextlib.closing(sqlite3.connect(root / "prefect" / "prefect.db")) as database:
        served = [row[0] for row in database.execute("SELECT message FROM log WHERE name = 'pipelines.tasks.capfilt'")]
        trained = [row[0] for row in database.execute("SELECT message FROM log WHERE name = 'pipelines.progress'")]
    assert any(message.startswith("capfilt: ") and "(100.0 %)" in message for message in served), served
    assert any(message.startswith("pretrain-capfilt: ") and "(100.0 %)" in message for message in trained), trained
    return registry_dir




def _wait_until_capfilt_runs(flow: subprocess.Popen, registry_dir: Path, log: Path, timeout: float = 1200) -> None:
    """Return as soon as CapFilt has committed its first output shard (of several: the stage is mid-way).

    A timer after the stage's start is not enough: with Ray already warm, the whole stage can finish in 3 s.
    """
    deadline = time.monotonic() + timeout
    work_root = registry_dir / ".work"
    while True:
        assert flow.poll() is None, f"flow ended ({flow.returncode}) before CapFilt ran: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "CapFilt never committed a shard"
        if work_root.exists() and any(work_root.glob("*/done/*.json")):
            return
        time.sleep(0.02)
