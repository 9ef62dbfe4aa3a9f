"""Pretraining on a real local Ray (Train V2, TorchTrainer, 2 CPU workers): losses fall, lineage, fault
tolerance after `kill -9` of a worker, and resume equivalence (N steps straight == N/2 + --resume + N/2)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from datasets_manifests.manifest import Producer
from datasets_manifests.registry import Registry
from pipelines.config import load_config
from pipelines.tasks.pretrain import PretrainConfig, run_pretrain, worker_config
from pipelines.tasks.train_data import shards_of, write_scene_shards

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "pretrain_tiny.yaml"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, Any]:
    root = tmp_path_factory.mktemp("pretrain-ray")
    registry = Registry(root / "registry")
    staging = root / "staging"
    shards = write_scene_shards(staging, num_shards=4, per_shard=32, image_size=32, seed=3, corrupt=(17,))
    dataset = registry.publish(
        kind="dataset", name="scenes", staging_dir=staging, producer=Producer(stage="test"),
        files=[{"path": path, "role": "shard", "split": "train", "num_samples": n} for path, n in shards],
    )  # fmt: skip
    return registry, dataset


def registered_checkpoint(run_dir: Path) -> bool:
    """True once Ray Train's controller has recorded a checkpoint (a directory alone may still be uploading)."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return snapshot.get("latest_checkpoint_result") is not None


def window_mean(history: list[dict[str, Any]], key: str) -> float:
    return sum(item[key] for item in history) / len(history)


def test_pretrain_two_workers_survives_kill_9(ray_session: Any, scenes: tuple[Registry, Any], tmp_path: Path) -> None:
    import json

    from blip_models.checkpoints import from_pretrained

    registry, dataset = scenes
    cfg = load_config(PretrainConfig, CONFIG, ["loop.epochs=100", "loop.max_steps=200", "loop.checkpoint_every=40",
                                              "loop.log_every=20", f"data.shard_cache_dir={tmp_path / 'cache'}"])
    pid_dir, name = tmp_path / "pids", "kill-test"
    run_dir = registry.work_dir("train-runs") / name
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["manifest"] = run_pretrain(cfg, dataset.ref, registry=registry, run_name=name, pid_dir=pid_dir)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = error

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.time() + 400
    while not registered_checkpoint(run_dir) and time.time() < deadline and thread.is_alive():
        time.sleep(0.5)
    assert registered_checkpoint(run_dir), f"no checkpoint was registered: {outcome}"
    victim = int((pid_dir / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)  # a training worker dies mid-run
    thread.join(timeout=400)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    manifest = outcome["manifest"]

    meta = manifest.metadata
    assert meta["final_step"] == meta["planned_steps"] == 200
    assert meta["restarts"] >= 1 and meta["restored_from_checkpoint"] >= 1
    assert manifest.parents == (dataset.ref,) and manifest.parent_ids == (dataset.id,)
    assert registry.children(dataset) == [manifest]
    paths = {entry.path for entry in manifest.files}
    assert {"model/model.safetensors", "model/config.json", "metrics.json", "history.jsonl"} <= paths
    assert any(p.startswith("tensorboard/events.out.tfevents") for p in paths)
    assert manifest.drop_reasons.get("undecodable_image", 0) >= 1  # the corrupt sample, counted every epoch
    # Every planned position was trained on or dropped exactly once: the restart replayed nothing and lost
    # nothing (each rank's counts come back from the checkpoint; a refilled repeat counts as neither).
    counts = manifest.counts
    assert counts["samples_trained"] + counts["dropped"] == meta["final_step"] * meta["global_batch"]

    history = [json.loads(line) for line in registry.local_path(manifest, "history.jsonl").read_text().splitlines()]
    assert [item["step"] for item in history] == list(range(20, 201, 20))  # no gap, no repeat across the restart
    for loss in ("loss_itc", "loss_itm", "loss_lm"):
        assert window_mean(history[-3:], loss) < window_mean(history[:2], loss), loss
    model = from_pretrained(registry.local_path(manifest, "model/config.json").parent)
    assert type(model).__name__ == "BlipPretrain"
    assert (tmp_path / "cache" / "locks").is_dir()  # the workers built the shard cache (local shards: read in place)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(registry.local_path(manifest, "metrics.json").parent / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{name}" for name in ("loss", "loss_itc", "loss_itm", "loss_lm", "lr", "samples_per_s",
                                         "data_wait_fraction")} <= tags, tags  # fmt: skip
    assert "train/gpu_utilisation" not in tags  # CPU workers
    assert sorted({event.step for event in events.Scalars("train/loss_itc")}) == list(range(20, 201, 20))


def test_resume_equals_uninterrupted(ray_session: Any, scenes: tuple[Registry, Any]) -> None:
    from blip_models.checkpoints import from_pretrained
    from pipelines.tasks._ray_train import UserError, run_local

    registry, dataset = scenes
    base = ["scaling.num_workers=1", "loop.epochs=100", "loop.checkpoint_every=5", "data.shuffle_buffer=16"]
    half = load_config(PretrainConfig, CONFIG, [*base, "loop.max_steps=10"])
    full = load_config(PretrainConfig, CONFIG, [*base, "loop.max_steps=20"])

    torch.set_num_threads(1)  # as in a Ray worker (OMP_NUM_THREADS=1), for the same float reductions
    straight = run_local(worker_config(full, shards_of(registry, dataset)))

    progress: list[dict[str, Any]] = []
    first = run_pretrain(half, dataset.ref, registry=registry, run_name="resume-test", on_progress=progress.append)
    assert first.metadata["final_step"] == 10
    assert progress[-1]["step"] == progress[-1]["total"] == 10  # rank 0's progress.json in the run's folder
    with pytest.raises(UserError, match="--resume"):
        run_pretrain(full, dataset.ref, registry=registry, run_name="resume-test")
    resumed = run_pretrain(full, dataset.ref, registry=registry, run_name="resume-test", resume=True)
    assert resumed.metadata["final_step"] == 20
    assert resumed.metadata["restarts"] == 1 and resumed.metadata["restored_from_checkpoint"] == 1

    model = from_pretrained(registry.local_path(resumed, "model/config.json").parent)
    expected = straight.model.state_dict()
    worst = max((expected[k].float() - v.float()).abs().max().item() for k, v in model.state_dict().items())
    assert worst < 1e-5, worst


def test_ctrl_c_stops_a_run_that_then_goes_on_with_resume(ray_session: Any, scenes: tuple[Registry, Any],
                                                          tmp_path: Path) -> None:  # fmt: skip
    """Ctrl-C on `blip train` (SIGINT to its process group, as a terminal sends it): Ray Train aborts the run and
    the command exits 130 naming the run's last checkpoint and how to go on (it exited 1 and said nothing); then
    `--resume --name` goes on from that checkpoint."""
    registry, dataset = scenes
    name, run_dir = "ctrl-c", registry.work_dir("train-runs") / "ctrl-c"
    published = registry.versions("model", "blip-tiny-pretrain")  # the module's other runs
    base = ["scaling.num_workers=1", "loop.epochs=1000", "loop.checkpoint_every=5"]
    command = [sys.executable, "-m", "pipelines.cli", "train", str(CONFIG), "--dataset", dataset.ref, "--registry",
               registry.url, "--name", name, "--no-progress", *[arg for item in base for arg in ("--set", item)]]
    with open(tmp_path / "train.log", "w") as log:
        # Its own session, and SIGINT handled as in a terminal even where this test runs with it ignored (a
        # background job of a script).
        process = subprocess.Popen(command, cwd=CONFIG.parents[2], stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address},
                                   start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        deadline = time.time() + 400
        while not registered_checkpoint(run_dir) and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert registered_checkpoint(run_dir), (tmp_path / "train.log").read_text()[-3000:]
        os.killpg(process.pid, signal.SIGINT)
        returncode = process.wait(timeout=300)
    output = (tmp_path / "train.log").read_text()
    said = re.search(r"blip train: interrupted: training run 'ctrl-c' stopped; its last checkpoint is step (\d+); "
                     r"the same command with `--resume --name ctrl-c` goes on from it", output)  # fmt: skip
    assert returncode == 130 and said, output[-3000:]
    assert output.count("`--resume --name ctrl-c` goes on from it") == 1  # said once (it was said twice)
    step = int(said.group(1))
    assert step >= 5 and step % 5 == 0
    assert registry.versions("model", "blip-tiny-pretrain") == published  # nothing published

    cfg = load_config(PretrainConfig, CONFIG, [*base, f"loop.max_steps={step + 5}"])
    resumed = run_pretrain(cfg, dataset.ref, registry=registry, run_name=name, resume=True)
    assert resumed.metadata["final_step"] == step + 5
    assert resumed.metadata["restored_from_checkpoint"] == 1


def test_a_dataset_that_cannot_be_read_fails_the_run_with_the_reason(ray_session: Any, tmp_path: Path) -> None:
    """Every shard's bytes lost after the publish (zeros of the same size: the driver's listing cannot tell): the
    run stops at the end of its first epoch with the drop reasons, through Ray Train, instead of training every
    step on nothing."""
    registry = Registry(tmp_path / "registry")
    staging = tmp_path / "staging"
    shards = write_scene_shards(staging, num_shards=2, per_shard=16, image_size=32, seed=4)
    dataset = registry.publish(
        kind="dataset", name="gone", staging_dir=staging, producer=Producer(stage="test"),
        files=[{"path": path, "role": "shard", "split": "train", "num_samples": n} for path, n in shards],
    )  # fmt: skip
    for entry in dataset.shards("train"):
        registry.local_path(dataset, entry.path).write_bytes(bytes(entry.bytes))
    cfg = load_config(PretrainConfig, CONFIG, ["loop.epochs=3", "scaling.max_failures=0"])
    from pipelines.tasks._ray_train import TrainingDataError

    with pytest.raises(TrainingDataError, match=r"training run 'unreadable' stopped on its data \(rank 0\): epoch 0: "
                                                r"this rank trained on no sample, every one was dropped \("
                                                r"missing_from_shard: 16\).*--resume --name unreadable"):
        run_pretrain(cfg, dataset.ref, registry=registry, run_name="unreadable")
    assert registry.versions("model", cfg.output_name) == []
