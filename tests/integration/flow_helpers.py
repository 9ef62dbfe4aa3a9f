"""Helpers shared by the flow tests and the pipeline-registry fixture (tests/integration/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from datasets_manifests.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# The tiny preset made smaller still: a few minutes for the whole recipe on 2 cores.
FAST = [
    "pretrain.model=tiny",  # the orchestration is under test here, not learning: the fastest model
    "source.demo.n=160",
    "download.samples_per_shard=100",
    "shard.samples_per_shard=20",  # ~8 shards: the crash test kills CapFilt after its first
    "pretrain.loop.max_steps=6",
    "pretrain.loop.checkpoint_every=3",
    "pretrain.data.batch_size=8",
    "downstream.num_train=16",
    "downstream.num_val=4",
    "downstream.num_test=8",
    "finetune_captioner.loop.max_steps=3",
    "finetune_filter.loop.max_steps=3",
    "finetune_captioner.data.batch_size=8",
    "finetune_filter.data.batch_size=8",
    "capfilt.compute.batch_size=8",
    # A filter finetuned for 3 steps scores everything near its prior (~1/3 match): keep every text so the
    # bootstrapped pretraining has data. The filter decisions themselves are tested in test_capfilt_ray.py.
    "capfilt.filter.threshold=0.0",
    "evaluate_retrieval.k_test=4",
    "evaluate_caption.caption_metrics=[Bleu,ROUGE_L,CIDEr]",
]
STAGES_BEFORE_CAPFILT = ("tiny-raw", "tiny-web", "tiny-downstream", "tiny-pretrain-web", "tiny-captioner-web",
                         "tiny-filter-web")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _flow_command(registry: Path) -> list[str]:
    args = [str(BIN / "python"), "-m", "pipelines.cli", "flow", "run", "tiny", "--set", f"registry={registry}"]
    for override in FAST:
        args += ["--set", override]
    return args


def _snapshot(registry: Registry) -> dict[str, list[str]]:
    return {name: [m.id for m in registry.versions("dataset", name) + registry.versions("model", name)
                   + registry.versions("evaluation", name)]
            for kind in ("dataset", "model", "evaluation") for name in registry.names(kind)}




def stop_process_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the process's group, SIGKILL what is still there after `grace_s` (a loaded machine can take
    longer than a fixed wait to shut a Prefect worker or a Ray head down: never fail a test on its teardown)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
