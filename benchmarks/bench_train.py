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

`--device cuda` (a GPU machine): BLIP-base pretraining as `configs/train/pretrain_base.yaml` (224 px, bf16
autocast) fed by the real input pipeline: web-like JPEGs (512x384, ~60 KiB, the download stage's stored size)
in shards on local disk, read, decoded and augmented by `--loader-workers` DataLoader processes. It reports what
the synthetic-batch figures of `bench_gpu.py pretrain` cannot: samples/s with the data pipeline in the loop and
the data-wait fraction (time the step loop waited for a batch). The plain loop (no Ray) always runs; with Ray
importable, Ray Train with 1 GPU worker runs beside it (its overhead ratio on a GPU).

    python benchmarks/bench_train.py --device cuda --batch-size 512 --compile --loader-workers 14
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "base"), default="tiny",
                        help="BlipConfig preset (CPU runs; --device cuda trains base)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels (CPU runs; default: the preset's, 32 / 224)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="micro-batch per worker")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: BLIP-base on one GPU fed by the real input pipeline (see above)")
    parser.add_argument("--loader-workers", type=int, default=12, help="cuda: DataLoader decode processes")
    parser.add_argument("--samples", type=int, default=16384, help="cuda: web-like samples generated (16 shards)")
    parser.add_argument("--compile", action="store_true", help="cuda: loop.compile (regional torch.compile)")
    parser.add_argument("--no-ray", action="store_true", help="cuda: the plain loop only")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return gpu_main(args)

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


def gpu_main(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from pipelines.runtime import apply_environment

    apply_environment()
    from datasets_manifests.registry import Registry

    if not torch.cuda.is_available():
        print(json.dumps({"error": "--device cuda asked for, but torch sees no GPU on this machine"}))
        return 1
    root = Path(tempfile.mkdtemp(prefix="bench-train-gpu-"))
    overrides = [f"loop.max_steps={args.steps}", "loop.epochs=1000", f"loop.log_every={max(1, args.steps // 6)}",
                 "loop.checkpoint_every=100000", f"data.batch_size={args.batch_size}",
                 f"data.loader_workers={args.loader_workers}", f"loop.compile={str(args.compile).lower()}",
                 "data.shuffle_buffer=2000", "output_name=bench-gpu", "scaling.use_gpu=true"]  # fmt: skip
    out: dict[str, Any] = {"benchmark": "train_base_gpu", "device": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "cpus": os.cpu_count(), "batch_size": args.batch_size,
                           "steps": args.steps, "loader_workers": args.loader_workers, "compiled": args.compile}
    try:
        began = time.perf_counter()
        shards = write_photo_shards(root / "staging", num_shards=16, per_shard=args.samples // 16)
        samples, tar_bytes = sum(n for _, n in shards), sum((root / "staging" / p).stat().st_size for p, _ in shards)
        out["data"] = {"samples": samples, "generate_s": round(time.perf_counter() - began, 1),
                       "mean_sample_kib": round(tar_bytes / max(1, samples) / 1024, 1)}
        config = CONFIG.with_name("pretrain_base.yaml")
        out["plain_loop"] = plain_run(Registry(root / "registry-plain"), root / "staging", shards,
                                      overrides, config=config, device="cuda")  # fmt: skip
        print(json.dumps(out), file=sys.stderr, flush=True)  # the plain figures, should the Ray run fail
        if args.no_ray or importlib.util.find_spec("ray") is None:
            out["ray_1_worker"] = "not run: " + ("--no-ray" if args.no_ray else "Ray is not installed here")
        else:
            from pipelines.runtime import ensure_ray

            ray_overrides = [*overrides, "scaling.gpus_per_worker=1",
                             f"scaling.cpus_per_worker={args.loader_workers + 1}"]  # fmt: skip
            try:
                ensure_ray(num_cpus=os.cpu_count())
                out["ray_1_worker"] = ray_run(Registry(root / "registry-1w"), root / "staging", shards, ray_overrides,
                                              1, config=config)  # fmt: skip
                out["ray_overhead_ratio"] = round(out["ray_1_worker"]["samples_per_s"]
                                                  / out["plain_loop"]["samples_per_s"], 3)  # fmt: skip
            except Exception as error:  # noqa: BLE001 - a carried Ray may not start there; keep the plain figures
                out["ray_1_worker"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["note"] = ("steady state: the first log window (start-up, compilation) excluded; data_wait_fraction = time "
                   "the step loop waited for the next batch / step time")
    print(json.dumps(out, indent=2))
    return 0


def write_photo_shards(staging: Path, num_shards: int, per_shard: int) -> list[tuple[str, int]]:
    """`num_shards` shards of web-like samples, written in parallel (one process per shard)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(num_shards, os.cpu_count() or 1)) as pool:
        parts = pool.map(_photo_shard, [(staging, number, per_shard) for number in range(num_shards)])
        return [(f"part{number:03d}/{path}", count) for number, part in enumerate(parts) for path, count in part]


def _photo_shard(job: tuple[Path, int, int]) -> list[tuple[str, int]]:
    """One shard: 512x384 JPEGs (quality 90) of smooth colour noise, which compress like photos (~60 KiB, where
    the rendered demo scenes take ~9), each with a demo scene's caption."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from pipelines.tasks.demo_corpus import random_scene, true_caption
    from pipelines.tasks.webdata import TarShardWriter

    staging, number, per_shard = job
    rng, scenes = np.random.default_rng(number), random.Random(number)
    with TarShardWriter(staging / f"part{number:03d}", "train", per_shard) as writer:
        for index in range(per_shard):
            pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).resize((512, 384), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
            key = f"{number:03d}{index:06d}"
            caption = true_caption(random_scene(scenes))
            writer.write(key, {"jpg": buffer.getvalue(), "txt": caption.encode(),
                               "json": json.dumps({"key": key, "caption": caption}).encode()})  # fmt: skip
    return writer.shards


def write_shards(staging: Path, image_size: int) -> list[tuple[str, int]]:
    from pipelines.tasks.train_data import write_scene_shards

    return write_scene_shards(staging, num_shards=4, per_shard=64, image_size=image_size, seed=0)


def publish(registry: Any, staging: Path, shards: list[tuple[str, int]]) -> Any:
    from datasets_manifests.manifest import Producer

    return registry.publish(kind="dataset", name="bench-scenes", staging_dir=staging, producer=Producer(stage="bench"),
                            files=[{"path": p, "role": "shard", "split": "train", "num_samples": n} for p, n in shards],
                            move=False)  # fmt: skip


def plain_run(registry: Any, staging: Path, shards: list[tuple[str, int]], overrides: list[str],
              config: Path = CONFIG, device: str = "cpu") -> dict:  # fmt: skip
    """The plain loop: one process; on the CPU one thread (a Ray worker gets OMP_NUM_THREADS=1 for its 1 CPU)."""
    import torch

    from pipelines.config import load_config
    from pipelines.tasks._ray_train import run_local
    from pipelines.tasks.pretrain import PretrainConfig, worker_config
    from pipelines.tasks.train_data import shards_of

    dataset = publish(registry, staging, shards)
    if device == "cpu":
        torch.set_num_threads(1)
    cfg = load_config(PretrainConfig, config, [*overrides, "scaling.num_workers=1"])
    history: list[dict] = []
    started = time.perf_counter()
    run_local(worker_config(cfg, shards_of(registry, dataset)), on_log=lambda step, m: history.append(m), device=device)
    return {**steady(history), "wall_s": round(time.perf_counter() - started, 2)}


def steady(history: list[dict]) -> dict:
    """samples/s and, where logged, data-wait fraction and GPU busy, averaged over the steady windows."""
    windows = history[1:] or history  # the first window holds start-up
    out = {}
    for key, digits in (("samples_per_s", 3), ("data_wait_fraction", 4), ("gpu_utilisation", 4)):
        values = [item[key] for item in windows if key in item]
        if values:
            out[key] = round(sum(values) / len(values), digits)
    return out


def ray_run(registry: Any, staging: Path, shards: list[tuple[str, int]], overrides: list[str], workers: int,
            config: Path = CONFIG) -> dict:  # fmt: skip
    from pipelines.config import load_config
    from pipelines.tasks.pretrain import PretrainConfig, run_pretrain

    dataset = publish(registry, staging, shards)
    cfg = load_config(PretrainConfig, config, [*overrides, f"scaling.num_workers={workers}",
                                               f"output_name=bench-{workers}w"])  # fmt: skip
    started = time.perf_counter()
    manifest = run_pretrain(cfg, dataset.ref, registry=registry, run_name=f"bench-{workers}w-{os.getpid()}")
    wall = time.perf_counter() - started
    lines = registry.local_path(manifest, "history.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines]
    shutil.rmtree(registry.root, ignore_errors=True)  # the run's checkpoints and model, before the next run
    return {**steady(history), "wall_s": round(wall, 2), "final_step": manifest.metadata["final_step"]}


if __name__ == "__main__":
    sys.exit(main())
