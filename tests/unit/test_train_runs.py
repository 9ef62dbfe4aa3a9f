"""The driver side of a training run without Ray: where a run lives (paths and URLs), resume checks, rank 0's
progress file, the lineage of `--init`, and what a published model's config says."""

from __future__ import annotations

import dataclasses
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.runtime import process_temp_dir, remove_orphaned_temp_dirs
from pipelines.tasks._ray_train import (
    UserError,
    _RankZeroFiles,
    plan_run,
    TrainingInterrupted,
    last_checkpoint_step,
    read_progress,
    watch_progress,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def rank_zero(run_dir: str) -> _RankZeroFiles:
    return _RankZeroFiles({"run_dir": run_dir, "progress_url": f"{run_dir}/progress.json"}, rank=0)


@pytest.fixture
def scenes(tmp_path: Path) -> tuple[Any, Any]:
    """A registry holding one dataset version of 16 scene samples (one global batch of pretrain_tiny)."""
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry
    from pipelines.tasks.train_data import write_scene_shards

    registry = Registry(tmp_path / "registry")
    shards = write_scene_shards(tmp_path / "staging", num_shards=1, per_shard=16, image_size=32, seed=0)
    files = [{"path": path, "role": "shard", "split": "train", "num_samples": n} for path, n in shards]
    dataset = registry.publish(kind="dataset", name="scenes", staging_dir=tmp_path / "staging",
                               producer=Producer(stage="test"), files=files)  # fmt: skip
    return registry, dataset


# ---------------------------------------------------------------------------------------------- where a run lives


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_url_storage_paths_keep_their_protocol_through_the_run_files(scheme: str, tmp_path: Path) -> None:
    storage = f"memory://runs-{uuid.uuid4().hex[:8]}" if scheme == "memory" else f"file://{tmp_path}/runs"
    storage_path, run_dir = plan_run(storage, "run-a", resume=False)
    assert storage_path == storage and run_dir.startswith(f"{scheme}://") and run_dir.endswith("/run-a")
    files = rank_zero(run_dir)
    files.start_attempt(0)
    assert files.attempts() == 1
    files.write_progress({"step": 3, "total": 10})
    assert read_progress(f"{run_dir}/progress.json") == {"step": 3, "total": 10}
    if scheme == "file":
        assert len(list((tmp_path / "runs" / "run-a" / "blip_attempts").glob("*.json"))) == 1
    with pytest.raises(UserError, match="already exists"):
        plan_run(storage, "run-a", resume=False)
    assert plan_run(storage, "run-a", resume=True)[1] == run_dir


def test_a_relative_storage_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert plan_run("runs", "x", resume=False) == (str(tmp_path / "runs"), str(tmp_path / "runs" / "x"))


def test_resuming_a_run_that_does_not_exist_is_an_error_unless_asked_to_start_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no training run named 'gone' .* leave out --resume to start it fresh"):
        plan_run(str(tmp_path), "gone", resume=True)
    # finetuning's resume-if-present: a crashed run of the same key continues, a missing one starts
    assert plan_run(str(tmp_path), "gone", resume=True, start_if_missing=True)[1] == str(tmp_path / "gone")


def test_blip_train_resume_of_an_unknown_run_is_one_line_before_ray_starts(
    scenes: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pipelines.runtime
    from pipelines.cli import main

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipelines.runtime, "ensure_ray", no_ray)
    registry, dataset = scenes
    code = main(["train", "pretrain_tiny", "--dataset", dataset.ref, "--resume", "--name", "never-ran",
                 "--registry", registry.url, "--no-progress"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert error.startswith("blip train: error: there is no training run named 'never-ran'") and "--resume" in error


# ---------------------------------------------------------------------------------------------- rank 0's progress


def test_progress_goes_to_a_missing_folder_and_a_failure_never_stops_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = rank_zero(str(tmp_path / "not" / "yet" / "there"))
    files.log(1, {"loss": 2.0}, total=10)  # the folder is created
    assert read_progress(str(tmp_path / "not/yet/there/progress.json")) == {"step": 1, "total": 10, "loss": 2.0}
    files.close()

    (tmp_path / "a-file").write_text("")
    files = rank_zero(str(tmp_path / "a-file" / "run"))  # a folder that cannot be made
    for step in (1, 2):
        files.log(step, {"loss": 1.0}, total=10)
    files.close()
    assert [item["step"] for item in files.history] == [1, 2]  # training bookkeeping went on
    warnings = [line for line in capsys.readouterr().err.splitlines() if "cannot write progress" in line]
    assert len(warnings) == 1


def test_the_progress_watcher_calls_back_in_the_callers_context(tmp_path: Path) -> None:
    """A flow's task run is found in the context: the watcher's log lines reach the run's log on the server."""
    import contextvars
    import threading

    run = contextvars.ContextVar("run", default=None)
    run.set("task-run-1")
    files = rank_zero(str(tmp_path / "run"))
    files.log(5, {"loss": 2.0}, total=10)
    seen: list[tuple[Any, dict[str, Any]]] = []
    stop = threading.Event()
    watcher = watch_progress(str(tmp_path / "run" / "progress.json"), lambda p: seen.append((run.get(), p)), stop)
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    watcher.join(timeout=5)
    files.close()
    assert seen == [("task-run-1", {"step": 5, "total": 10, "loss": 2.0})]


@pytest.mark.parametrize("scheme", ["", "memory://"])
def test_an_interrupted_run_names_its_last_checkpoint(tmp_path: Path, scheme: str) -> None:
    """What `blip train` says after Ctrl-C or a full disk: the step of the newest checkpoint Ray Train registered
    (the run goes on from it), not a newer folder whose write failed half-way."""
    import json

    import fsspec

    run_dir = f"{scheme}{tmp_path}/runs/stopped"
    assert last_checkpoint_step(run_dir) is None  # no run folder yet
    assert str(TrainingInterrupted("stopped", None)) == ("training run 'stopped' stopped; before its first checkpoint: "
                                                         "it starts again from step 0")  # fmt: skip
    fs, root = fsspec.core.url_to_fs(run_dir)
    for name in ("checkpoint_step00000050", "checkpoint_step00000100", "checkpoint_step00000150", "x"):
        fs.makedirs(f"{root}/{name}", exist_ok=True)
    assert last_checkpoint_step(run_dir) is None  # folders, none registered: the run starts again from step 0
    snapshot = {"ray_version": "2.60.0", "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_step00000100",
                                                                     "metrics": {"step": 100}}}  # fmt: skip
    fs.pipe_file(f"{root}/checkpoint_manager_snapshot.json", json.dumps(snapshot).encode())
    assert last_checkpoint_step(run_dir) == 100  # step 150's write failed half-way: never registered
    stopped = TrainingInterrupted("stopped", last_checkpoint_step(run_dir))
    assert isinstance(stopped, KeyboardInterrupt)  # the CLI's Ctrl-C path: exit 130 with this line
    assert str(stopped) == "training run 'stopped' stopped; its last checkpoint is step 100"


# ---------------------------------------------------------------------------------------------- lineage and config


def test_init_from_a_model_version_is_a_parent_and_changes_the_cache_key(
    scenes: tuple[Any, Any], tmp_path: Path
) -> None:
    from blip_models import checkpoints as ck
    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_pretrain import BlipPretrain
    from datasets_manifests.manifest import Producer
    from pipelines.config import load_config
    from pipelines.tasks.pretrain import InitConfig, PretrainConfig, lineage

    registry, dataset = scenes
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_pretrained(BlipPretrain(preset("tiny")), tmp_path / f"init{seed}" / "model")
        versions.append(registry.publish(kind="model", name="tiny-init", staging_dir=tmp_path / f"init{seed}",
                                         producer=Producer(stage="test"),
                                         files=[{"path": "model/model.safetensors", "role": "weights"},
                                                {"path": "model/config.json", "role": "config"}]))  # fmt: skip
    cfg = load_config(PretrainConfig, CONFIGS / "train" / "pretrain_tiny.yaml")
    parents, source, _, scratch_key, _ = lineage(registry, cfg, [dataset])
    assert parents == [dataset] and source is None

    first = dataclasses.replace(cfg, init=InitConfig(checkpoint=versions[0].ref))
    parents, source, _, first_key, _ = lineage(registry, first, [dataset])
    assert [p.id for p in parents] == [dataset.id, versions[0].id]
    assert source is not None and (Path(source) / "config.json").is_file()
    latest = dataclasses.replace(cfg, init=InitConfig(checkpoint="tiny-init"))  # resolves to the second version
    parents, _, _, latest_key, _ = lineage(registry, latest, [dataset])
    assert parents[-1].id == versions[1].id
    assert len({scratch_key, first_key, latest_key}) == 3
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        lineage(registry, dataclasses.replace(cfg, init=InitConfig(checkpoint="no-such-model")), [dataset])
    # A released checkpoint by its BLIP (or LAVIS) name: its URL, which the workers download into their cache.
    named = dataclasses.replace(cfg, init=InitConfig(checkpoint="model_base_capfilt_large"))
    parents, source, _, named_key, _ = lineage(registry, named, [dataset])
    assert parents == [dataset] and source == ck.OFFICIAL_URL_PREFIX + "model_base_capfilt_large.pth"
    assert named_key not in {scratch_key, first_key, latest_key}
    assert lineage(registry, dataclasses.replace(cfg, init=InitConfig(checkpoint="blip_pretrain/base")),
                   [dataset])[1] == source  # fmt: skip
    from pipelines.tasks.finetune import resolve_model_source  # finetuning's --init the same way

    assert resolve_model_source(registry, "blip_retrieval/coco") == (None, ck.LAVIS_URL_PREFIX + "blip_coco_retrieval.pth")
    # A directory outside the registry: keyed by its weights, so new weights at the same path are new work.
    outside = tmp_path / "outside"
    shutil.copytree(registry.local_path(versions[0], "model/config.json").parent, outside)
    by_path = dataclasses.replace(cfg, init=InitConfig(checkpoint=str(outside)))
    parents, source, _, outside_key, _ = lineage(registry, by_path, [dataset])
    assert parents == [dataset] and source == str(outside) and outside_key == lineage(registry, by_path, [dataset])[3]
    shutil.copy(registry.local_path(versions[1], "model/model.safetensors"), outside / "model.safetensors")
    assert lineage(registry, by_path, [dataset])[3] not in {outside_key, first_key}


def test_a_rerun_with_more_retries_goes_on_from_the_same_training_run(scenes: tuple[Any, Any], tmp_path: Path) -> None:
    """The Ray Train run a rerun goes on from was named by the cache key, which holds how a run goes too: a run
    that used up `max_failures`, rerun with more, started again from step 0 (days at scale). The run's name now
    leaves those settings out; the published version's key keeps them. A run named the old way is still found."""
    from pipelines.config import load_config
    from pipelines.tasks._ray_train import run_name_for
    from pipelines.tasks.pretrain import PretrainConfig, lineage, run_key

    registry, dataset = scenes
    cfg = load_config(PretrainConfig, CONFIGS / "train" / "pretrain_tiny.yaml")
    how = ["scaling.max_failures=7", "loop.log_every=3", "loop.checkpoint_every=11", "data.loader_workers=0",
           "scaling.checkpoints_to_keep=5"]  # fmt: skip
    rerun = load_config(PretrainConfig, CONFIGS / "train" / "pretrain_tiny.yaml", how)
    other = load_config(PretrainConfig, CONFIGS / "train" / "pretrain_tiny.yaml", ["optim.lr=0.00042"])
    _, _, _, key, inputs = lineage(registry, cfg, [dataset])
    rerun_key = lineage(registry, rerun, [dataset])[3]
    assert key != rerun_key  # another version's key: the published version says how it was trained
    assert run_key(cfg, "pretrain", inputs) == run_key(rerun, "pretrain", inputs)
    assert run_key(other, "pretrain", inputs) != run_key(cfg, "pretrain", inputs)  # what it trains: another run
    storage = tmp_path / "runs"
    name = run_name_for("pretrain", key, run_key(cfg, "pretrain", inputs), str(storage))
    assert name == run_name_for("pretrain", rerun_key, run_key(rerun, "pretrain", inputs), str(storage))
    assert name != f"pretrain-{key[:12]}"
    (storage / f"pretrain-{key[:12]}").mkdir(parents=True)  # a run started by the code before
    assert run_name_for("pretrain", key, run_key(cfg, "pretrain", inputs), str(storage)) == f"pretrain-{key[:12]}"


def test_published_models_do_not_carry_gradient_checkpointing(tmp_path: Path) -> None:
    """A training-time switch: the run trains with it, the model version it publishes is built without it."""
    from blip_models.checkpoints import config_from_dict, from_pretrained, read_pretrained_config
    from blip_models.modeling_pretrain import BlipPretrain
    from pipelines.config import load_config
    from pipelines.tasks._ray_train import save_model
    from pipelines.tasks.pretrain import PretrainConfig, PretrainTask, worker_config

    cfg = load_config(PretrainConfig, CONFIGS / "train" / "pretrain_tiny.yaml", ["loop.grad_checkpointing=true"])
    model_config = worker_config(cfg, ())["task"]["kwargs"]["model_config"]
    assert model_config["vision"]["grad_ckpt_layers"] == 2  # training checkpoints every block of the tiny ViT
    model = BlipPretrain(config_from_dict(model_config))
    save_model(PretrainTask(model_config, {}, {}), model, tmp_path / "model")
    assert read_pretrained_config(tmp_path / "model")["config"]["vision"]["grad_ckpt_layers"] == 0
    assert model.config.vision.grad_ckpt_layers == 2  # the trained model itself is left as it was
    assert from_pretrained(tmp_path / "model").visual_encoder.grad_ckpt_from == 2  # no block checkpointed


def test_scratch_folders_of_killed_workers_are_removed_and_live_ones_kept(tmp_path: Path, monkeypatch):
    """A worker killed by SIGKILL leaves its local TensorBoard events or half-written checkpoint; the next
    process taking a folder of the same kind on the node removes it, and nothing else."""
    import os
    import subprocess
    import sys
    import tempfile

    from pipelines.tasks._ray_train import CHECKPOINT_PREFIX, TB_PREFIX

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # that process has exited: nothing runs under its pid (unless reused)
    orphan = tmp_path / f"{CHECKPOINT_PREFIX}{dead_pid}-abc123"
    other_kind = tmp_path / f"{TB_PREFIX}{dead_pid}-abc123"  # swept by the next TensorBoard folder, not this one
    live = tmp_path / f"{CHECKPOINT_PREFIX}{os.getpid()}-def456"
    unrelated = tmp_path / f"{CHECKPOINT_PREFIX}notapid"
    for folder in (orphan, other_kind, live, unrelated):
        folder.mkdir()
        (folder / "train_state.pt").write_bytes(b"x")
    try:
        os.kill(dead_pid, 0)
        pytest.skip(f"pid {dead_pid} was reused meanwhile")
    except ProcessLookupError:
        pass
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    created = process_temp_dir(CHECKPOINT_PREFIX)
    assert created.parent == tmp_path and created.name.startswith(f"{CHECKPOINT_PREFIX}{os.getpid()}-")
    assert not orphan.exists() and other_kind.exists() and live.exists() and unrelated.exists()
    assert remove_orphaned_temp_dirs(TB_PREFIX, str(tmp_path)) == 1 and not other_kind.exists()
