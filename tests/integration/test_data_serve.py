"""`blip data serve` end to end: the real CLI starts the real browser on 127.0.0.1 over a real registry."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from datasets_manifests.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from datasets_fixtures import publish_dataset, sample_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:  # the OS picks a free ephemeral port; released just before the server binds
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.integration
def test_blip_data_serve_answers_over_http(tmp_path):
    registry = Registry(tmp_path / "registry")
    publish_dataset(registry, tmp_path / "raw", "raw", sample_rows(4, dropped={1: "failed_to_download"}))
    port = free_port()
    command = [sys.executable, "-m", "pipelines.cli", "data", "--registry", registry.url, "serve", "--port", str(port)]
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, response = time.monotonic() + 60, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/versions", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert response is not None, server.stdout.read() if server.poll() is not None else "server never answered"
        assert response.status_code == 200 and "raw" in response.text
    finally:
        server.terminate()
        server.wait(timeout=20)
