"""A static file server on 127.0.0.1 that answers byte-range requests as object stores do and counts what it sends
per file: reading shards "remotely" in tests (tests/ is on their path through its conftest.py) and benchmarks
(bench_shard_cache.py, bench_capfilt_reads.py)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

CHUNK = 256 << 10  # bytes written at a time (and metered, with a bandwidth)


@dataclass
class ServedFiles:
    url: str  # http://127.0.0.1:PORT, serving the root directory
    bytes_sent: Counter = field(default_factory=Counter)  # path relative to the root -> body bytes sent
    requests: Counter = field(default_factory=Counter)

    def clear(self) -> None:
        """Start counting again (between the sides of a benchmark)."""
        self.bytes_sent.clear()
        self.requests.clear()

    def totals(self) -> tuple[int, int]:
        """(body bytes sent, requests answered) over every file since the last `clear`."""
        return sum(self.bytes_sent.values()), sum(self.requests.values())


class SharedLink:
    """Bytes/s shared by every connection (a node's link to its store): each chunk waits for its turn."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s, self.free_at, self.lock = bytes_per_s, 0.0, threading.Lock()

    def wait(self, size: int) -> None:
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + size / self.bytes_per_s
        time.sleep(max(0.0, self.free_at - time.monotonic()))


def _handler(root: Path, served: ServedFiles, delay: float, link: SharedLink | None) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class RangeHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as fsspec's aiohttp client expects of a store

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self._answer(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            relative = self.path.split("?", 1)[0].lstrip("/")
            path = (root / relative).resolve()
            if delay:
                time.sleep(delay)  # a store's latency per request
            if root not in path.parents or not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            if match:
                first, last = match.groups()
                start = int(first) if first else max(0, size - int(last))
                end = min(size - 1, int(last)) if first and last else size - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            length = max(0, end - start + 1)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if not body:
                return
            with open(path, "rb") as handle:
                handle.seek(start)
                data = handle.read(length)
            with lock:
                served.bytes_sent[relative] += len(data)
                served.requests[relative] += 1
            for begin in range(0, len(data), CHUNK):
                if link is not None:
                    link.wait(min(CHUNK, len(data) - begin))
                self.wfile.write(data[begin:begin + CHUNK])

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
            pass

    return RangeHandler


class _Server(ThreadingHTTPServer):
    # A store takes many connections at once (concurrent ranged reads); socketserver's default backlog of 5 would
    # drop the connection attempts beyond it, each retried by the client a second later.
    request_queue_size = 512


@contextlib.contextmanager
def serve_files(root: str | Path, delay: float = 0.0, bytes_per_s: float | None = None) -> Iterator[ServedFiles]:
    """Serve `root` on an ephemeral port of 127.0.0.1; `delay` seconds are added to every request, and all
    responses together are sent at `bytes_per_s` at most (None: as fast as the loopback goes)."""
    root = Path(root).resolve()
    served = ServedFiles(url="")
    link = SharedLink(bytes_per_s) if bytes_per_s else None
    server = _Server(("127.0.0.1", 0), _handler(root, served, delay, link))
    server.daemon_threads = True
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="http-files", daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
