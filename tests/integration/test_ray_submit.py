"""`blip submit` against a real `ray start --head` on 127.0.0.1: the job runs a small stage to completion
and its logs come back through the job server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flow_helpers import stop_process_group
from pipelines.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    ray_bin = Path(sys.executable).parent / "ray"
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: AF_UNIX socket paths are limited to 107 bytes
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Other Ray instances of this test session (local ray.init) hold Ray's default agent ports (52365, ...):
    # give this head its own, or its job agent never comes up ("No available agent to submit job").
    agent_ports = ["--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
                   "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
                   "--ray-client-server-port", str(_free_port())]
    # The job's `python` is the one on the head's PATH (an activated venv here, the image's on a cluster).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # `--block` + own session, stopped by signalling that group: `ray stop` would kill every Ray process on the
    # machine, including the session's local instance, whose driver (this pytest process) then exits at once.
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
             "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard_port), "--disable-usage-stats", "--temp-dir", temp_dir, *agent_ports],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_job_server(address, head, log_path)
        yield address
    finally:
        stop_process_group(head)


def _wait_for_job_server(address: str, head: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError:
            return  # the dashboard answers (401 without the cluster's auth token): the job server is up
        except OSError:
            pass
        time.sleep(1)
    stop_process_group(head)
    pytest.fail(f"Ray job server at {address} did not answer within {timeout_s:.0f} s:\n{log_path.read_text()}")


def test_submit_runs_a_stage_and_streams_its_logs(ray_head, tmp_path, capsys, monkeypatch):
    """The job runs a blip command to completion on the cluster and its output comes back through the job logs.
    --address wins over a RAY_ADDRESS of the shell (Ray's client took the variable over the address it was
    given: the job went to the other cluster), and the shell's BLIP_REGISTRY reaches the job."""
    out_dir = tmp_path / "corpus"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # another cluster's address (nothing listens there)
    code = main(["submit", "--address", ray_head, "--command", f"blip demo-corpus write {out_dir} --n 12 --seed 3"])
    captured = capsys.readouterr().out
    assert code == 0, captured
    assert "SUCCEEDED" in captured and f"to {ray_head}" in captured
    assert (out_dir / "ground_truth.parquet").exists()
    assert str(out_dir) in captured  # the job's own output (the corpus summary), through the job logs
    registry = tmp_path / "shell-registry"
    registry.mkdir()
    monkeypatch.setenv("BLIP_REGISTRY", str(registry))
    assert main(["submit", "--address", ray_head, "--command", "blip data ls"]) == 0
    out = capsys.readouterr().out
    assert f"o versions in {registry}\n" in out, out  # `blip data ls` of the shell's registry, in the job


def test_submit_reports_a_failing_job(ray_head, capsys):
    code = main(["submit", "--address", ray_head, "--command",
                 "blip data --registry /tmp/blip-empty-registry show no-such-dataset@v1"])  # fmt: skip
    captured = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in captured


def test_submit_checks_the_flow_target_before_uploading(ray_head, tmp_path, capsys):
    """A typo in a preset's override failed on the cluster after the project was uploaded; a config outside the
    project does not exist in the job's copy of it; --command with a TARGET or --set dropped them silently."""
    assert main(["submit", "--address", ray_head, "tiny", "--set", "capfilt.filter.treshold=0.6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip submit: error: ") and "capfilt.filter.treshold" in err and err.count("\n") == 1
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / "configs/pipeline/tiny.yaml").read_text())
    assert main(["submit", "--address", ray_head, str(outside)]) == 2
    assert "the job runs in the uploaded project" in capsys.readouterr().err
    assert main(["submit", "--address", ray_head, "tiny", "--command", "blip data ls"]) == 2
    assert "--command runs that command alone" in capsys.readouterr().err
