"""Benchmark: caption generation throughput (beam 3, max 20, min 5, prompt 'a picture of ') of our BlipCaption
(own beam search with a key/value cache, blip_models.generation) vs transformers BlipForConditionalGeneration.generate
with the same weights (converted by blip_models.hf_convert.to_hf).

Prints one JSON object: images/s of both for `tiny` (32 px) and `base` (ViT-B/16 at 384 px, a few images), their
ratio, and whether the generated token ids are identical.
Usage: python benchmarks/bench_caption_generate.py [--images-tiny 16] [--images-base 2] [--threads N] [--skip-base]
       [--models tiny,base] [--device cpu|cuda] [--precision fp32|bf16] [--image-size PX] [--vocab vocab.txt]
Both generators run under the same autocast; on CUDA every timing is bracketed by `torch.cuda.synchronize()`.
GPU, as the issue asks: --device cuda --precision bf16 --image-size 384 --models base --images-base 64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

# The project from a plain checkout too (the lent GPU machine has no install of it).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_bench_options import add_options, autocast, resolve, synchronize


def run(name, config, num_images, batch_size, repeats, device, precision, vocab=None):
    import torch

    from blip_models.hf_convert import to_hf
    from blip_models.modeling_caption import BlipCaption
    from blip_models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(vocab)
    ours = BlipCaption(config, tokenizer).eval()  # this tokenizer, not the default one (absent on the device machine)
    hf = to_hf(ours).to(device)
    ours = ours.to(device)
    pixels = torch.randn(num_images, 3, config.vision.image_size, config.vision.image_size).to(device)
    prompt = tokenizer(["a picture of "], return_tensors="pt").input_ids.to(device)  # [CLS] a picture of [SEP]
    prompt_ids = prompt[:, :-1].clone()
    prompt_ids[:, 0] = config.text.bos_token_id
    settings = {"num_beams": 3, "max_length": 20, "min_length": 5}

    def ours_generate():
        with autocast(device, precision):
            return torch.cat([ours.generate_ids(pixels[i : i + batch_size], prompt_ids, **settings)
                              for i in range(0, num_images, batch_size)])  # fmt: skip

    def hf_generate():
        with torch.no_grad(), autocast(device, precision):
            chunks = []
            for i in range(0, num_images, batch_size):
                chunk = pixels[i : i + batch_size]
                chunks.append(hf.generate(pixel_values=chunk, input_ids=prompt.repeat(chunk.shape[0], 1),
                                          do_sample=False, **settings))  # fmt: skip
            return torch.cat(chunks)

    timings = {}
    outputs = {}
    for label, fn in (("ours", ours_generate), ("transformers", hf_generate)):
        outputs[label] = fn().cpu()  # warm-up, and the ids to compare
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        timings[label] = (time.perf_counter() - start) / repeats
    same = outputs["ours"].shape == outputs["transformers"].shape and bool((outputs["ours"] == outputs["transformers"]).all())
    return {"config": name, "images": num_images, "batch_size": batch_size, "image_size": config.vision.image_size,
            "repeats": repeats, "ours_images_per_s": round(num_images / timings["ours"], 3),
            "transformers_images_per_s": round(num_images / timings["transformers"], 3),
            "speed_ratio_ours_over_transformers": round(timings["transformers"] / timings["ours"], 3),
            "identical_tokens": same}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-tiny", type=int, default=16)
    parser.add_argument("--images-base", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    add_options(parser, "tiny 32, base 384")
    parser.add_argument("--repeats-base", type=int, default=None, help="timed passes of base (default: 1 on CPU, --repeats on CUDA)")
    parser.add_argument("--vocab", default=None, help="BERT vocab.txt or tokenizer directory (default: the offline one)")
    args = parser.parse_args()

    import torch

    from blip_models.configuration_blip import preset

    models, device = resolve(parser, args)
    results = []
    if "tiny" in models:
        tiny = preset("tiny").replace(vision={"image_size": args.image_size or 32})
        results.append(run("tiny", tiny, args.images_tiny, 8, args.repeats, device, args.precision, args.vocab))
    if "base" in models:
        base = preset("base").replace(vision={"image_size": args.image_size or 384})
        repeats = args.repeats_base or (args.repeats if device.type == "cuda" else 1)
        results.append(run("base", base, args.images_base, args.images_base, repeats, device, args.precision, args.vocab))
    print(json.dumps({"benchmark": "caption_generate", "device": str(device), "precision": args.precision,
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
                      "settings": {"num_beams": 3, "max_length": 20, "min_length": 5, "prompt": "a picture of "},
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
