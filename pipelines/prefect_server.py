"""The temporary Prefect server of `blip flow run` when no PREFECT_API_URL is set.

Prefect's own temporary server (ephemeral mode) is a uvicorn process in the flow's process group: a terminal's
Ctrl-C reached it too, it stopped at once, and the interrupted flow then hung for minutes retrying to report its
state to it, with a traceback per retry. This one serves the same app (`prefect.server.api.server:create_app`, on
127.0.0.1, the UI off) but ignores Ctrl-C: the flow's process stops it (SIGTERM) once the run has ended and said
so. It stays in the flow's process group, so a `kill -9` of the group takes it with the rest.

`python -m pipelines.prefect_server PORT` runs it; `temporary_server()` starts one, waits until it answers, points
this process's Prefect client at it, and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a first start migrates a new database: ~30 s on 2 busy cores


def serve(port: int) -> None:
    import uvicorn

    # uvicorn sets its own SIGINT/SIGTERM handlers only in the main thread: served from another one, Ctrl-C stays
    # ignored here and SIGTERM ends the server gracefully.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = uvicorn.Server(uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                                           port=port, log_level="error", lifespan="on"))  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    thread = threading.Thread(target=server.run, name="prefect-server")
    thread.start()
    while thread.is_alive():  # join with a timeout, so that the SIGTERM handler runs in this thread
        thread.join(timeout=0.5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def temporary_server() -> Iterator[str | None]:
    """A temporary server for this process's flow runs, unless Prefect is configured with one (PREFECT_API_URL,
    in the environment or the profile): its API URL, or None when the configured one is used."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    # The UI off and only the services a temporary server runs, as Prefect's own temporary server sets them.
    process = subprocess.Popen([sys.executable, "-m", "pipelines.prefect_server", str(port)],
                               env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(url):
            if process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {process.returncode} before it "
                                   "answered (its error is above); set PREFECT_API_URL to use a running server")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server on {url} did not answer within "
                                   f"{START_TIMEOUT_S:.0f} s; set PREFECT_API_URL to use a running server")
            time.sleep(0.2)
        log.info("Prefect: a temporary server on %s for this run (PREFECT_API_URL: use a running server instead)",
                 url)  # fmt: skip
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _send_what_is_queued()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _send_what_is_queued() -> None:
    """Prefect's log and event workers send in the background: what they hold goes before the server stops (an
    interrupted run's last lines were left to them at exit, retried against a stopped server for over a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # best effort: the run itself has ended either way
            worker.drain_all(timeout=10)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
