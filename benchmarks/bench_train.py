"""Training throughput of tiny BLIP pretraining on CPU: Ray Train vs a plain loop, and 1 vs 2 workers.

Three runs of the same steps on the same synthetic shards (32 px scenes):
- plain: `TrainLoop` in this process, no Ray (the baseline);
- ray_1: TorchTrainer with 1 worker (ratio ray_1 / plain = what Ray Train costs per step);
- ray_2: TorchTrainer with 2 DDP workers (ratio ray_2 / ray_1 = scaling; gloo all-reduce on 2 cores).
Samples/s are measured inside the loop after the first logged window (steady state, start-up excluded); the
wall time of each whole run (Ray start-up and worker group creation included) is reported beside it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "pretrain_tiny.yaml"


def steady_rate(history: list[dict]) -> float:
    windows = history[1:] or history  # the first window holds start-up
    return sum(item["samples_per_s"] for item in windows) / len(windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from pipelines.runtime import apply_environment, ensure_ray

    apply_environment()
    import torch

    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry
    from pipelines.config import load_config
    from pipelines.tasks._ray_train import run_local
    from pipelines.tasks.pretrain import PretrainConfig, run_pretrain, worker_config
    from pipelines.tasks.train_data import shards_of, write_scene_shards

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    registry = Registry(root / "registry")
    shards = write_scene_shards(root / "staging", num_shards=4, per_shard=64, image_size=32, seed=0)
    dataset = registry.publish(kind="dataset", name="bench-scenes", staging_dir=root / "staging",
                               producer=Producer(stage="bench"),
                               files=[{"path": p, "role": "shard", "split": "train", "num_samples": n} for p, n in shards])  # fmt: skip
    overrides = [f"loop.max_steps={args.steps}", "loop.epochs=1000", "loop.log_every=10", "loop.checkpoint_every=1000",
                 f"data.batch_size={args.batch_size}"]  # fmt: skip

    # Plain loop: one process, one thread (a Ray worker gets OMP_NUM_THREADS=1 for its 1 CPU).
    torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, CONFIG, [*overrides, "scaling.num_workers=1"])
    history: list[dict] = []
    started = time.perf_counter()
    run_local(worker_config(cfg, shards_of(registry, dataset)), on_log=lambda step, m: history.append(m))
    plain = {"samples_per_s": round(steady_rate(history), 2), "wall_s": round(time.perf_counter() - started, 2)}

    ensure_ray(num_cpus=2)
    results = {}
    for workers in (1, 2):
        cfg = load_config(PretrainConfig, CONFIG, [*overrides, f"scaling.num_workers={workers}",
                                                   f"output_name=bench-{workers}w"])  # fmt: skip
        started = time.perf_counter()
        manifest = run_pretrain(cfg, dataset.ref, registry=registry, run_name=f"bench-{workers}w-{os.getpid()}")
        wall = time.perf_counter() - started
        lines = registry.local_path(manifest, "history.jsonl").read_text().splitlines()
        run_history = [json.loads(line) for line in lines]
        results[workers] = {"samples_per_s": round(steady_rate(run_history), 2), "wall_s": round(wall, 2),
                            "final_step": manifest.metadata["final_step"]}  # fmt: skip

    print(json.dumps({
        "benchmark": "train_tiny_cpu",
        "steps": args.steps, "batch_size_per_worker": args.batch_size, "cpus": os.cpu_count(),
        "plain_loop": plain, "ray_1_worker": results[1], "ray_2_workers": results[2],
        "ray_overhead_ratio": round(results[1]["samples_per_s"] / plain["samples_per_s"], 3),
        "scaling_2_vs_1": round(results[2]["samples_per_s"] / results[1]["samples_per_s"], 3),
        "note": "samples/s in steady state (first log window excluded); wall_s includes Ray start-up. "
                "Other processes on this machine share its cores.",
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
