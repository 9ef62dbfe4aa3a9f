"""pipelines.runtime: the worker-process helpers the download and shard stages share."""

from __future__ import annotations

import os

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


def test_local_inputs_on_a_multi_node_cluster_are_refused_before_training_starts(monkeypatch, tmp_path):
    """Shards or initial weights of a local registry exist on the driver's machine only: a multi-node cluster is
    refused in one line before any worker starts (as CapFilt refuses it), unless BLIP_SHARED_FILESYSTEM=1 says the
    path is mounted on every node."""
    from types import SimpleNamespace

    from pipelines.tasks import _ray_train

    two = [{"Alive": True, "NodeID": "a"}, {"Alive": True, "NodeID": "b"}]
    monkeypatch.delenv(runtime.SHARED_FILESYSTEM_ENV, raising=False)
    assert runtime.unreachable_local_inputs(two[:1], ["/reg/a.tar"]) is None  # one node: its own disk
    assert runtime.unreachable_local_inputs(two, ["s3://bucket/a.tar", "gs://bucket/b.tar"]) is None
    assert "2 nodes but the inputs are local paths (/reg/a.tar)" in runtime.unreachable_local_inputs(two, ["/reg/a.tar"])
    monkeypatch.setattr(runtime, "ensure_ray", lambda: SimpleNamespace(nodes=lambda: two))
    scaling = SimpleNamespace(use_gpu=False)
    with pytest.raises(_ray_train.UserError, match=r"training run 'r': the Ray cluster has 2 nodes .*/reg/a.tar.*=1$"):
        _ray_train.launch({"shards": [("/reg/a.tar", 4, 100)]}, scaling=scaling, run_name="r",
                          storage_path=str(tmp_path / "runs"), resume=False)  # fmt: skip
    # Remote shards, but initial weights on the driver's disk (a local registry's model version, a ViT file).
    for init in ("/reg/models/captioner/v1", {"checkpoint": None, "vit_weights": "/weights/vit_b16.npz"}):
        config = {"shards": [("s3://bucket/a.tar", 4, 100)], "task": {"kwargs": {"init": init}}}
        with pytest.raises(_ray_train.UserError, match=r"2 nodes but the inputs are local paths \((/reg|/weights)"):
            _ray_train.launch(config, scaling=scaling, run_name="r", storage_path="memory://runs", resume=False)
    assert _ray_train.init_sources({"task": {"kwargs": {"init": {"checkpoint": "s3://b/m", "vit_weights": None}}}}) \
        == ["s3://b/m"]
    assert _ray_train.init_sources({"task": {"kwargs": {"init": None}}}) == []
    # Remote shards, but the run's storage on this machine's disk: the checkpoints would stay on each node's.
    with pytest.raises(_ray_train.UserError, match=r"scaling.storage_path is a local path \(/.*/runs\) on a 2-node"):
        _ray_train.launch({"shards": [("s3://bucket/a.tar", 4, 100)]}, scaling=scaling, run_name="r",
                          storage_path=str(tmp_path / "runs"), resume=False)  # fmt: skip
    monkeypatch.setenv(runtime.SHARED_FILESYSTEM_ENV, "1")
    assert runtime.unreachable_local_inputs(two, ["/nfs/reg/a.tar"]) is None


def test_a_worker_process_that_dies_is_named_in_one_line(monkeypatch):
    """A worker killed mid-job (the kernel's OOM killer sends SIGKILL; here os.abort, SIGABRT, in the worker
    itself) ends the map with WorkerProcessDied naming the function and the signal, which the CLI prints as one
    line; BLIP_MAX_PROCESSES caps the processes a stage starts."""
    import os

    from pipelines import cli

    with pytest.raises(runtime.WorkerProcessDied, match=r"running posix.abort was killed by SIGABRT; nothing was "
                                                        r"published: run the command again") as raised:
        list(runtime.map_in_processes(os.abort, [(), ()], 2))
    assert cli._is_user_error(raised.value)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    monkeypatch.setenv(runtime.MAX_PROCESSES_ENV, "3")
    assert runtime.process_count(10_000, 100, 50) == 3
    monkeypatch.setenv(runtime.MAX_PROCESSES_ENV, "none")
    with pytest.raises(ValueError, match="BLIP_MAX_PROCESSES='none': expected a whole number"):
        runtime.process_count(10_000, 100, 50)


def test_without_an_address_a_run_starts_its_own_ray_even_beside_one_that_ray_start_left(monkeypatch, caplog):
    """`ray.init()` would join the cluster `ray start` left running (and refuse `num_cpus` there): a run without
    RAY_ADDRESS gets its own instance; RAY_ADDRESS=auto (Ray's word) joins that cluster."""
    calls = []

    class FakeRay:
        def init(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_enable_metrics_collection", "")  # restored after the test, as the next line leaves it
    monkeypatch.delenv("RAY_enable_metrics_collection")
    monkeypatch.setenv("RAY_task_events_shutdown_flush_timeout_ms", "3000")  # the user's
    monkeypatch.setattr(runtime, "_cluster_left_by_ray_start", lambda: "127.0.0.1:6390")
    with caplog.at_level("INFO", logger="pipelines.runtime"):
        runtime._init_ray(FakeRay(), None, 2, {})
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] == 2 and not calls[-1]["include_dashboard"]
    assert calls[-1]["runtime_env"]["worker_process_setup_hook"] == "pipelines.runtime.quiet_state_api_warnings"
    assert calls[-1]["runtime_env"]["env_vars"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # one node: no drains
    assert "a local Ray cluster (127.0.0.1:6390)" in caplog.text and "RAY_ADDRESS=auto" in caplog.text
    # No dashboard: no metrics, and a short task-event flush at exit (where the user has not said otherwise)
    assert os.environ["RAY_enable_metrics_collection"] == "0"
    assert os.environ["RAY_task_events_shutdown_flush_timeout_ms"] == "3000"

    monkeypatch.setenv("RAY_ADDRESS", "auto")
    runtime._init_ray(FakeRay(), None, None, {})
    assert calls[-1] == {"address": "auto", "log_to_driver": True}
    runtime._init_ray(FakeRay(), "127.0.0.1:6379", None, {"log_to_driver": False})  # the argument wins
    assert calls[-1] == {"address": "127.0.0.1:6379", "log_to_driver": False}
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setattr(runtime, "_cluster_left_by_ray_start", lambda: None)
    runtime._init_ray(FakeRay(), None, None, {"runtime_env": {"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}})
    assert calls[-1]["address"] == "local"
    assert calls[-1]["runtime_env"]["env_vars"] == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                                    "NO_ALBUMENTATIONS_UPDATE": "1"}  # fmt: skip
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # the user's setting wins
    runtime._init_ray(FakeRay(), None, None, {})
    assert "env_vars" not in calls[-1]["runtime_env"]
