"""Benchmark: caption generation throughput (beam 3, max 20, min 5, prompt 'a picture of ') of our BlipCaption
(own beam search with a key/value cache, blip_models.generation) vs transformers BlipForConditionalGeneration.generate
with the same weights (converted by blip_models.hf_convert.to_hf).

Prints one JSON object: images/s of both for `tiny` (32 px) and `base` (ViT-B/16 at 384 px, a few images), their
ratio, and whether the generated token ids are identical.
Usage: python benchmarks/bench_caption_generate.py [--images-tiny 16] [--images-base 2] [--threads N] [--skip-base]
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def run(name, config, num_images, batch_size, repeats):
    import torch

    from blip_models.checkpoints import build_model
    from blip_models.hf_convert import to_hf
    from blip_models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    ours = build_model("caption", config).eval()
    hf = to_hf(ours)
    pixels = torch.randn(num_images, 3, config.vision.image_size, config.vision.image_size)
    prompt = tokenizer(["a picture of "], return_tensors="pt").input_ids  # [CLS] a picture of [SEP]
    prompt_ids = prompt[:, :-1].clone()
    prompt_ids[:, 0] = config.text.bos_token_id
    settings = {"num_beams": 3, "max_length": 20, "min_length": 5}

    def ours_generate():
        return torch.cat([ours.generate_ids(pixels[i : i + batch_size], prompt_ids, **settings)
                          for i in range(0, num_images, batch_size)])  # fmt: skip

    def hf_generate():
        with torch.no_grad():
            chunks = []
            for i in range(0, num_images, batch_size):
                chunk = pixels[i : i + batch_size]
                chunks.append(hf.generate(pixel_values=chunk, input_ids=prompt.repeat(chunk.shape[0], 1),
                                          do_sample=False, **settings))  # fmt: skip
            return torch.cat(chunks)

    timings = {}
    outputs = {}
    for label, fn in (("ours", ours_generate), ("transformers", hf_generate)):
        outputs[label] = fn()  # warm-up, and the ids to compare
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
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
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-base", action="store_true")
    args = parser.parse_args()

    import torch

    from blip_models.configuration_blip import preset

    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run("tiny", preset("tiny"), args.images_tiny, 8, args.repeats)]
    if not args.skip_base:
        base = preset("base").replace(vision={"image_size": 384})
        results.append(run("base", base, args.images_base, args.images_base, 1))
    print(json.dumps({"benchmark": "caption_generate", "device": "cpu", "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "machine": platform.machine(),
                      "settings": {"num_beams": 3, "max_length": 20, "min_length": 5, "prompt": "a picture of "},
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
