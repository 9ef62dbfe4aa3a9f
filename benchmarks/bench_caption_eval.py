"""Benchmark: caption-evaluation generation throughput (beam 3, max 20, min 5, BLIP caption_coco.yaml) of the
evaluation stage's batched path (`pipelines.tasks.evaluate.caption_rows`, `caption_batch_size` images per
generate call) vs the obvious per-image loop (one generate call per image), on the test images of a generated
COCO-Karpathy set with a tiny random captioner. Both read and transform the same image files.

Prints one JSON object: images/s of both, their ratio, and whether the captions are identical.
Usage: python benchmarks/bench_caption_eval.py [--images 12] [--batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)

    import torch

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_caption import BlipCaption
    from pipelines.tasks.downstream_synth import write_karpathy
    from pipelines.tasks.evaluate import caption_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-caption-eval-"))
    written = write_karpathy(root / "data", num_train=1, num_val=1, num_test=args.images, image_size=64)
    urls = [str(root / "data" / item["image"]) for item in json.loads(written["coco_karpathy_test"].read_text())]
    torch.manual_seed(0)
    model_dir = str(save_pretrained(BlipCaption(preset("tiny")), root / "model"))
    options = {"num_beams": 3, "max_length": 20, "min_length": 5, "repetition_penalty": 1.0}

    def timed(batch: int) -> tuple[float, list[str]]:
        caption_rows(model_dir, urls[:1], dict(options, batch_size=1), range(1))  # warm-up (model load, tokenizer)
        started = time.perf_counter()
        captions = caption_rows(model_dir, urls, dict(options, batch_size=batch), range(len(urls)))
        return time.perf_counter() - started, captions

    batched_s, batched = timed(args.batch)
    loop_s, looped = timed(1)
    print(json.dumps({
        "benchmark": "caption_eval_generation", "model": "tiny (32 px, random weights)", "images": len(urls),
        "beams": 3, "max_length": 20, "min_length": 5, "batch_size": args.batch,
        "ours_batched_images_per_s": round(len(urls) / batched_s, 3),
        "baseline_per_image_loop_images_per_s": round(len(urls) / loop_s, 3),
        "speedup": round(loop_s / batched_s, 3), "identical_captions": batched == looped,
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
        "note": "both timings include the model load of caption_rows (one per call, as each Ray task does)",
    }, indent=2))  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)  # generated images and model: nothing to keep


if __name__ == "__main__":
    main()
