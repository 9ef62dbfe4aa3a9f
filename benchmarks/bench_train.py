"""Training throughput of BLIP pretraining on CPU: Ray Train vs a plain loop, and 1 vs 2 workers.

Three runs of the same steps on the same synthetic shards (rendered scenes at the model's image size):
- plain: `TrainLoop` in this process, no Ray (the baseline);
- ray_1: TorchTrainer with 1 worker (ratio ray_1 / plain = what Ray Train costs per step);
- ray_2: TorchTrainer with 2 DDP workers (ratio ray_2 / ray_1 = scaling; gloo all-reduce on 2 cores).
`--model tiny` (32 px) or `--model base` (ViT-B/16, 224 px by default; minutes per run on 2 cores: use a few
steps and batch 2-4). Samples/s are measured inside the loop after the first logged window (steady state,
start-up excluded; a log every steps/4 steps); the wall time of each whole run (Ray start-up, worker group
creation and the final checkpoint included) is reported beside it. Each Ray run gets its own registry, removed
after it (a base run's final checkpoint holds gigabytes of weights and optimiser state). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "pretrain_tiny.yaml"


def steady_rate(history: list[dict]) -> float:
    windows = history[1:] or history  # the first window holds start-up
    return sum(item["samples_per_s"] for item in windows) / len(windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "base"), default="tiny", help="BlipConfig preset")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: the preset's, 32 / 224)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch per worker")
    args = parser.parse_args(argv)

    from pipelines.runtime import apply_environment, ensure_ray

    apply_environment()
    from blip_models.configuration_blip import preset
    from datasets_manifests.registry import Registry

    image_size = args.image_size or preset(args.model).vision.image_size
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        shards = write_shards(root / "staging", image_size)
        overrides = [f"model={args.model}", f"model_overrides={{vision: {{image_size: {image_size}}}}}",
                     f"loop.max_steps={args.steps}", "loop.epochs=1000", f"loop.log_every={max(1, args.steps // 4)}",
                     "loop.checkpoint_every=100000", f"data.batch_size={args.batch_size}"]  # fmt: skip
        plain = plain_run(Registry(root / "registry-plain"), root / "staging", shards, overrides)
        ensure_ray(num_cpus=2)
        results = {workers: ray_run(Registry(root / f"registry-{workers}w"), root / "staging", shards, overrides,
                                    workers) for workers in (1, 2)}  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(json.dumps({
        "benchmark": f"train_{args.model}_cpu", "model": args.model, "image_size": image_size,
        "steps": args.steps, "batch_size_per_worker": args.batch_size, "cpus": os.cpu_count(),
        "plain_loop": plain, "ray_1_worker": results[1], "ray_2_workers": results[2],
        "ray_overhead_ratio": round(results[1]["samples_per_s"] / plain["samples_per_s"], 3),
        "scaling_2_vs_1": round(results[2]["samples_per_s"] / results[1]["samples_per_s"], 3),
        "note": "samples/s in steady state (first log window excluded); wall_s includes Ray start-up and the "
                "final checkpoint. Other processes on this machine share its cores.",
    }, indent=2))  # fmt: skip
    return 0


def write_shards(staging: Path, image_size: int) -> list[tuple[str, int]]:
    from pipelines.tasks.train_data import write_scene_shards

    return write_scene_shards(staging, num_shards=4, per_shard=64, image_size=image_size, seed=0)


def publish(registry: Any, staging: Path, shards: list[tuple[str, int]]) -> Any:
    from datasets_manifests.manifest import Producer

    return registry.publish(kind="dataset", name="bench-scenes", staging_dir=staging, producer=Producer(stage="bench"),
                            files=[{"path": p, "role": "shard", "split": "train", "num_samples": n} for p, n in shards],
                            move=False)  # fmt: skip


def plain_run(registry: Any, staging: Path, shards: list[tuple[str, int]], overrides: list[str]) -> dict:
    """The plain loop: one process, one thread (a Ray worker gets OMP_NUM_THREADS=1 for its 1 CPU)."""
    import torch

    from pipelines.config import load_config
    from pipelines.tasks._ray_train import run_local
    from pipelines.tasks.pretrain import PretrainConfig, worker_config
    from pipelines.tasks.train_data import shards_of

    dataset = publish(registry, staging, shards)
    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, CONFIG, [*overrides, "scaling.num_workers=1"])
    history: list[dict] = []
    started = time.perf_counter()
    run_local(worker_config(cfg, shards_of(registry, dataset)), on_log=lambda step, m: history.append(m))
    return {"samples_per_s": round(steady_rate(history), 3), "wall_s": round(time.perf_counter() - started, 2)}


def ray_run(registry: Any, staging: Path, shards: list[tuple[str, int]], overrides: list[str], workers: int) -> dict:
    from pipelines.config import load_config
    from pipelines.tasks.pretrain import PretrainConfig, run_pretrain

    dataset = publish(registry, staging, shards)
    cfg = load_config(PretrainConfig, CONFIG, [*overrides, f"scaling.num_workers={workers}",
                                               f"output_name=bench-{workers}w"])  # fmt: skip
    started = time.perf_counter()
    manifest = run_pretrain(cfg, dataset.ref, registry=registry, run_name=f"bench-{workers}w-{os.getpid()}")
    wall = time.perf_counter() - started
    lines = registry.local_path(manifest, "history.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    shutil.rmtree(registry.root, ignore_errors=True)  # the run's checkpoints and model, before the next run
    return {"samples_per_s": round(steady_rate(history), 3), "wall_s": round(wall, 2),
            "final_step": manifest.metadata["final_step"]}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
