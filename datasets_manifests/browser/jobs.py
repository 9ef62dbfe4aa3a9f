"""The browser's long computations (a filter over a 129M-sample index, the diff of two versions) run in a thread.

A filter's first page on a 129M-sample CapFilt version reads a few columns of every index and texts row: about a
minute. Held inside one HTTP request, that is a page frozen on "Loading…" with no sign of life, and a request a
proxy may cut at its timeout. Instead a request starts the computation in a background thread (or joins the one
already running for the same question: two tabs asking for one filter scan once), waits a little for it
(`wait_s`: small indexes answer in that one request, as before), and otherwise answers 202 with how far the
computation is; the page polls until the answer is there. A computation nobody has asked about for `abandon_s`
(2 minutes: the tab was closed, the filter changed) stops at its next batch, so abandoned filters do not pile up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
WAIT_S = 1.0  # how long a request waits for a computation before answering 202 with its progress
# A computation nobody asked about for this long stops. The page polls about every second, but a browser slows
# the timers of a tab left in the background to one a minute after a few minutes: that tab's polls still count.
ABANDON_S = 120.0
MISSING = object()


class LRU:
    """A small thread-safe LRU of computed values (per-version handles, filter matches, diffs, thumbnails)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self._items, self._lock = capacity, OrderedDict(), threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def get_or_make(self, key: Hashable, make: Callable[[], T]) -> T:
        found = self.get(key, MISSING)
        if found is not MISSING:
            return found
        value = make()  # outside the lock: two threads may both compute; the results are identical
        self.put(key, value)
        return value


class Pending(Exception):
    """The answer is being computed: the HTTP answer is 202 with this progress, and the page asks again."""

    status = 202

    def __init__(self, what: str, done: int, total: int | None) -> None:
        share = f" ({100 * done / total:.0f}%)" if total else ""
        super().__init__(f"{what}: {done:,} of {total:,} rows{share}" if total else f"{what}: {done:,} rows")
        self.what, self.done, self.total = what, done, total

    def body(self) -> dict[str, Any]:
        return {"pending": True, "what": self.what, "done": self.done, "total": self.total, "message": str(self)}


class Abandoned(Exception):
    """No request has asked for this computation for a while: it stopped at a batch boundary."""


@dataclass
class Progress:
    """What a running computation reports (rows done of `total`); `advance` also stops it once abandoned."""

    what: str
    total: int | None
    abandon_s: float
    done: int = 0
    asked_at: float = field(default_factory=time.monotonic)
    waiting: int = 0  # requests waiting for the answer right now (a wait longer than `abandon_s` keeps it going)

    def advance(self, rows: int) -> None:
        self.done += rows
        if not self.waiting and time.monotonic() - self.asked_at > self.abandon_s:
            raise Abandoned(f"{self.what}: nobody asked for the answer for {self.abandon_s:g} s")


@dataclass
class _Job(Generic[T]):
    progress: Progress
    finished: threading.Event = field(default_factory=threading.Event)
    value: Any = MISSING
    error: BaseException | None = None


class BackgroundAnswers(Generic[T]):
    """Answers computed in background threads, the last `kept` of them kept (an LRU), one computation per key."""

    def __init__(self, kept: int, *, abandon_s: float = ABANDON_S) -> None:
        self.kept: LRU = LRU(kept)
        self.abandon_s = abandon_s
        self._running: dict[Hashable, _Job[T]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[Progress], T], *, what: str, total: int | None = None,
            wait_s: float | None = WAIT_S) -> T:  # fmt: skip
        """The answer for `key`: kept, or computed by `compute(progress)` in a thread started (or joined) here.

        Waits up to `wait_s` seconds (None: until it is there); raises `Pending` with the progress if the answer
        is not there by then, and the computation's own error once it has failed (the next request retries)."""
        found = self.kept.get(key, MISSING)
        if found is not MISSING:
            return found
        with self._lock:
            job = self._running.get(key)
            if job is None:  # (kept before its job left `_running`: it may have finished since the look above)
                found = self.kept.get(key, MISSING)
                if found is not MISSING:
                    return found
            if job is None or isinstance(job.error, Abandoned):
                job = _Job(Progress(what, total, self.abandon_s))
                self._running[key] = job
                threading.Thread(target=self._run, args=(key, job, compute), name=f"browser: {what}",
                                 daemon=True).start()  # fmt: skip
            job.progress.asked_at = time.monotonic()
            job.progress.waiting += 1
        try:
            finished = job.finished.wait(wait_s)
        finally:
            with self._lock:
                job.progress.waiting -= 1
                job.progress.asked_at = time.monotonic()
        if not finished or isinstance(job.error, Abandoned):
            # (abandoned just before this request asked: the next request starts it again)
            raise Pending(job.progress.what, job.progress.done, job.progress.total)
        if job.error is not None:
            with self._lock:
                if self._running.get(key) is job:  # a failure is reported once; the next request computes again
                    del self._running[key]
            raise job.error
        return job.value

    def _run(self, key: Hashable, job: _Job[T], compute: Callable[[Progress], T]) -> None:
        try:
            job.value = compute(job.progress)
            self.kept.put(key, job.value)
        except Abandoned as error:
            log.info("%s", error)
            job.error = error
        except BaseException as error:  # noqa: BLE001 - handed to the request that asks next
            job.error = error
        with self._lock:
            if job.error is None or isinstance(job.error, Abandoned):
                if self._running.get(key) is job:
                    del self._running[key]
        job.finished.set()

    def running(self) -> int:
        with self._lock:
            return sum(not job.finished.is_set() for job in self._running.values())
