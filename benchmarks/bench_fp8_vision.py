"""Benchmark: CapFilt with FP8 ViTs (`compute.fp8_vision`) vs the same models in their own dtype, on trained models.

FP8 only pays off on an FP8 GPU (bench_gpu.py --fp8-vision times it there); what it costs is measured here, on
models that have learnt something: the captioner and filter versions of a `make demo` run and the web images they
filtered. Both sides caption (same per-sample seeds) and score the same images; the JSON reports how many keep
decisions and captions FP8 changes, the largest change of an ITM probability, and both sides' images/s (on a CPU
`torch._scaled_mm` is not faster than an fp32 matmul: the ratio there says nothing about a GPU).

    make demo && python benchmarks/bench_fp8_vision.py                        # the demo's tiny-* versions
    python benchmarks/bench_fp8_vision.py --captioner REF --filter REF --dataset REF --registry URL
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default=None, help="registry URL (default BLIP_REGISTRY or ./artifacts/registry)")
    parser.add_argument("--captioner", default="tiny-captioner-web", help="captioner model version")
    parser.add_argument("--filter", default="tiny-filter-web", help="filter model version")
    parser.add_argument("--dataset", default="tiny-web", help="web dataset version (its shards' jpg + txt)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    return parser.parse_args(argv)


def read_samples(registry, dataset, count: int) -> list[tuple[str, bytes, str]]:
    """(key, jpg, web text) of the first `count` samples of the dataset's shards."""
    samples: list[tuple[str, bytes, str]] = []
    for entry in dataset.shards():
        with tarfile.open(registry.local_path(dataset, entry.path)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for key in sorted({name.split(".", 1)[0] for name in members}):
            if f"{key}.jpg" in members and f"{key}.txt" in members:
                samples.append((key, members[f"{key}.jpg"], members[f"{key}.txt"].decode()))
        if len(samples) >= count:
            break
    return samples[:count]


def run(models, tokenizer, pixel_batches, key_batches, web_batches, config) -> tuple[list, list, float]:
    """Captions and ITM probabilities of every batch, and the seconds it took."""
    import torch

    from pipelines.tasks.capfilt_models import caption_images, score_texts

    captions, probabilities = [], []
    began = time.perf_counter()
    for pixels, keys, web in zip(pixel_batches, key_batches, web_batches):
        batch_captions = caption_images(models["captioner"], tokenizer, pixels, keys, config.captioner)
        captions += batch_captions
        probabilities += score_texts(models["filter"], tokenizer, pixels, web, batch_captions, config.filter)
    if pixel_batches and pixel_batches[0].is_cuda:
        torch.cuda.synchronize()
    return captions, probabilities, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from PIL import Image

    from blip_models.float8 import quantize_vision_linears
    from blip_models.processing import eval_transform
    from blip_models.tokenizer import load_tokenizer
    from datasets_manifests.registry import Registry
    from pipelines.tasks.capfilt import CapFiltConfig
    from pipelines.tasks.capfilt_models import load_model, score_texts

    registry = Registry(args.registry) if args.registry else Registry()
    defaults = parse_args([])
    asked_for_defaults = (args.captioner, args.filter) == (defaults.captioner, defaults.filter)
    if asked_for_defaults and not registry.versions("model", args.filter):
        print(json.dumps({"benchmark": "fp8_vision", "skipped": f"no {args.filter} model in {registry.root}: run "
                          "`make demo` first, or name trained models with --captioner/--filter/--dataset"}))
        return 0
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    refs = {"captioner": registry.resolve(args.captioner, "model"), "filter": registry.resolve(args.filter, "model")}
    exact = {role: load_model({"dir": str(registry.local_path(m, "config.json").parent)}, device, dtype)
             for role, m in refs.items()}  # fmt: skip
    fp8 = {role: copy.deepcopy(model) for role, model in exact.items()}
    swapped = sum(quantize_vision_linears(model) for model in fp8.values())
    tokenizer = load_tokenizer()
    image_size = exact["captioner"].config.vision.image_size
    transform = eval_transform(image_size)
    dataset = registry.resolve(args.dataset, "dataset")
    samples = read_samples(registry, dataset, args.images)
    pixel_batches, key_batches, web_batches = [], [], []
    for start in range(0, len(samples), args.batch_size):
        batch = samples[start : start + args.batch_size]
        images = [transform(Image.open(io.BytesIO(jpg)).convert("RGB")) for _, jpg, _ in batch]
        pixel_batches.append(torch.stack(images).to(device=device, dtype=getattr(torch, dtype)))
        key_batches.append([key for key, _, _ in batch])
        web_batches.append([text for _, _, text in batch])
    config = CapFiltConfig()
    with torch.no_grad():
        run(exact, tokenizer, pixel_batches[:1], key_batches[:1], web_batches[:1], config)  # warm-up
        captions, probabilities, exact_s = run(exact, tokenizer, pixel_batches, key_batches, web_batches, config)
        run(fp8, tokenizer, pixel_batches[:1], key_batches[:1], web_batches[:1], config)
        fp8_captions, fp8_probabilities, fp8_s = run(fp8, tokenizer, pixel_batches, key_batches, web_batches, config)
        # the filter alone on the exact side's captions: FP8's effect on scores, without its effect on captions
        same_texts = []
        for pixels, web, start in zip(pixel_batches, web_batches, range(0, len(samples), args.batch_size)):
            batch_captions = captions[start : start + len(web)]
            same_texts += score_texts(fp8["filter"], tokenizer, pixels, web, batch_captions, config.filter)
    web_exact = torch.tensor([p[0] for p in probabilities])
    web_fp8 = torch.tensor([p[0] for p in fp8_probabilities])
    synthetic_exact = torch.tensor([q for p in probabilities for q in p[1:]])
    synthetic_same = torch.tensor([q for p in same_texts for q in p[1:]])
    threshold = args.threshold
    result = {
        "benchmark": "fp8_vision", "captioner": refs["captioner"].ref, "filter": refs["filter"].ref,
        "dataset": dataset.ref,
        "images": len(samples), "device": str(device), "dtype": dtype, "fp8_linears": swapped,
        "web_keep_agreement": round(float(((web_exact >= threshold) == (web_fp8 >= threshold)).float().mean()), 4),
        "web_probability_max_abs_change": round(float((web_exact - web_fp8).abs().max()), 4),
        "web_probability_mean_abs_change": round(float((web_exact - web_fp8).abs().mean()), 5),
        "synthetic_captions_identical": round(sum(a == b for a, b in zip(captions, fp8_captions)) / len(captions), 4),
        "synthetic_keep_agreement_same_captions": round(float(
            ((synthetic_exact >= threshold) == (synthetic_same >= threshold)).float().mean()), 4),
        "kept_fraction": {"exact": round(float((web_exact >= threshold).float().mean()), 4),
                          "fp8": round(float((web_fp8 >= threshold).float().mean()), 4)},
        "images_per_s": {"exact": round(len(samples) / exact_s, 2), "fp8": round(len(samples) / fp8_s, 2)},
        "ratio_fp8_vs_exact": round(exact_s / fp8_s, 3),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
