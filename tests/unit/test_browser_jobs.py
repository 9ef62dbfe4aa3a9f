"""The browser's background answers: one computation per question, progress while it runs, errors reported once,
abandoned computations stopped."""

from __future__ import annotations

import threading
import time

import pytest

from datasets_manifests.browser.jobs import LRU, Abandoned, BackgroundAnswers, Pending, Progress


class Scan:
    """A computation of `batches` batches of 10 rows that waits for `go` before each batch after the first."""

    def __init__(self, batches: int = 3, fail: bool = False) -> None:
        self.batches, self.fail = batches, fail
        self.go, self.started, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, progress: Progress) -> str:
        self.calls += 1
        self.started.set()
        for batch in range(self.batches):
            if batch:
                assert self.go.wait(10), "the test never let the scan go on"
            progress.advance(10)
        if self.fail:
            raise ValueError("the index is corrupt")
        return f"answer after {progress.done} rows"


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_slow_answer_is_pending_with_its_progress_then_kept() -> None:
    answers, scan = BackgroundAnswers(2), Scan()
    with pytest.raises(Pending) as pending:
        answers.get("filter", scan, what="filtering v1", total=30, wait_s=0)
    assert pending.value.what == "filtering v1" and pending.value.total == 30
    scan.started.wait(5)
    _until(lambda: answers._running["filter"].progress.done == 10)
    with pytest.raises(Pending) as pending:  # a second request joins the same computation
        answers.get("filter", scan, what="filtering v1", total=30, wait_s=0.01)
    assert pending.value.done == 10
    assert pending.value.body() == {"pending": True, "what": "filtering v1", "done": 10, "total": 30,
                                    "message": "filtering v1: 10 of 30 rows (33%)"}  # fmt: skip
    scan.go.set()
    assert answers.get("filter", scan, what="filtering v1", total=30, wait_s=None) == "answer after 30 rows"
    assert answers.get("filter", scan, what="filtering v1", wait_s=0) == "answer after 30 rows"  # kept
    assert scan.calls == 1 and answers.running() == 0


def test_concurrent_requests_share_one_computation() -> None:
    answers, scan = BackgroundAnswers(2), Scan()
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(answers.get("k", scan, what="w", wait_s=None)))
               for _ in range(4)]  # fmt: skip
    for thread in threads:
        thread.start()
    scan.started.wait(5)
    scan.go.set()
    for thread in threads:
        thread.join(10)
    assert results == ["answer after 30 rows"] * 4 and scan.calls == 1


def test_a_failure_is_reported_then_computed_again() -> None:
    answers, scan = BackgroundAnswers(2), Scan(batches=1, fail=True)
    with pytest.raises(ValueError, match="the index is corrupt"):
        answers.get("k", scan, what="w", wait_s=None)
    with pytest.raises(ValueError, match="the index is corrupt"):
        answers.get("k", scan, what="w", wait_s=None)  # not kept: asked again, computed again
    assert scan.calls == 2


def test_an_abandoned_computation_stops_and_a_new_request_starts_it_again() -> None:
    answers, scan = BackgroundAnswers(2, abandon_s=0.05), Scan()
    with pytest.raises(Pending):
        answers.get("k", scan, what="w", wait_s=0)
    scan.started.wait(5)
    time.sleep(0.1)  # nobody asks for longer than abandon_s
    scan.go.set()
    _until(lambda: answers.running() == 0)
    assert "k" not in answers._running and answers.kept.get("k") is None  # stopped, nothing kept
    scan.started.clear()
    assert answers.get("k", scan, what="w", wait_s=None) == "answer after 30 rows"
    assert scan.calls == 2


def test_a_request_waiting_longer_than_the_quiet_time_keeps_its_computation_going() -> None:
    # `blip data serve --wait-s 600`: a script's request blocks; its computation must not count as abandoned.
    answers, scan = BackgroundAnswers(2, abandon_s=0.05), Scan()
    threading.Timer(0.3, scan.go.set).start()  # the batches after the first come well after abandon_s
    assert answers.get("k", scan, what="w", wait_s=None) == "answer after 30 rows"
    assert scan.calls == 1
    # Once that request has its answer, the quiet time counts again from then (nobody is waiting).
    other = Scan()
    with pytest.raises(Pending):
        answers.get("other", other, what="w", wait_s=0.01)
    time.sleep(0.1)
    other.go.set()
    _until(lambda: answers.running() == 0)
    assert answers.kept.get("other") is None


def test_progress_raises_abandoned_only_after_the_quiet_time() -> None:
    progress = Progress("w", 100, abandon_s=60)
    progress.advance(5)
    assert progress.done == 5
    progress.asked_at -= 61
    with pytest.raises(Abandoned, match="nobody asked"):
        progress.advance(5)


def test_lru_keeps_the_most_recent() -> None:
    lru = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    assert lru.get_or_make("d", lambda: 4) == 4 and lru.get("a") is None
