"""pipelines.runtime: the worker-process helpers the download and shard stages share."""

from __future__ import annotations

import pytest

from pipelines import runtime


def test_process_count_follows_cores_work_and_items(monkeypatch):
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    assert runtime.process_count(10, 100, 50) == 1  # too little work for a second process
    assert runtime.process_count(350, 100, 50) == 4  # one per 100 bytes started
    assert runtime.process_count(10_000, 100, 50) == 8  # at most one per core
    assert runtime.process_count(10_000, 100, 3) == 3  # and per item
    assert runtime.process_count(0, 100, 0) == 1


def test_map_in_processes_keeps_order_and_raises_a_workers_error():
    jobs = [(base, 2) for base in range(9)]  # more jobs than the 2 x workers submitted ahead
    assert list(runtime.map_in_processes(pow, jobs, 2)) == [base**2 for base in range(9)]
    assert list(runtime.map_in_processes(pow, jobs, 1)) == [base**2 for base in range(9)]
    assert list(runtime.map_in_processes(pow, iter(jobs), 2)) == [base**2 for base in range(9)]  # a generator
    with pytest.raises(ZeroDivisionError):
        list(runtime.map_in_processes(pow, [(2, 1), (0, -1), (3, 1)], 2))
