"""benchmarks/bench_gpu.py, the script a lent GPU's 15 minutes run, on the CPU with the tiny preset: every part's
code path runs to its JSON (a failure here would otherwise first show on a GPU lease)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_part_of_the_gpu_benchmark_runs_on_the_cpu_with_tiny_models():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--device", "cpu", "--preset", "tiny",
         "--parts", "pretrain,capfilt,retrieval,decode", "--pretrain-steps", "2", "--capfilt-batches", "8",
         "--capfilt-images", "16", "--baseline-images", "8", "--retrieval-batch", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # One line after each part (what a timed-out run leaves), then the whole report, indented.
    report = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert report["pretrain"]["samples_per_s"] > 0 and report["pretrain"]["time_split"]["backward"] > 0
    assert report["capfilt"]["ours"]["8"]["images"] == 16 and report["capfilt"]["baseline"]["images_per_s"] > 0
    assert report["retrieval"]["ratio"] > 0 and report["decode"]["train_224_images_per_s_per_core"] > 0
