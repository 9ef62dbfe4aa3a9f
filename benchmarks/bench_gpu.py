"""GPU benchmarks of the two heavy stages' model work, Ray-free (prints JSON).

What a lent GPU machine can run without Ray or webdataset installed (it has torch, timm and transformers):

* `pretrain`: one BLIP pretraining step (ITC + ITM + LM) of the `base` model at 224 px, bf16 autocast, fused AdamW,
  synthetic batch already on the GPU: samples/s, model FLOPs per sample (counted by torch's FlopCounterMode on
  the real step), MFU against the chip's dense bf16 peak, and where the step's time goes (forward, backward,
  optimiser, timed with synchronisation between them in separate steps; and per kernel class: matmul,
  attention, fused Triton, eager elementwise, from torch.profiler).
* `capfilt`: what one CapFilt actor does per batch (`pipelines.tasks.capfilt_models`: nucleus caption with
  per-row seeds + ITM scores of web text and caption, models cast to bf16) for BLIP-base at 384 px, vs the naive
  baseline side by side: transformers' `BlipForConditionalGeneration.generate` then `BlipForImageTextRetrieval`
  on the same (converted) weights. Random weights never emit [SEP], so both decode to `max_length`: the worst case;
  `--caption-ends OFFSET` makes [SEP] likely after the minimum length, so captions end at a trained captioner's
  lengths. Beside the stage, the decoding loop is timed with and without dropping finished rows from the batch
  (`capfilt_models.COMPACT_AT`), and the caption lengths are reported.
  `--compile` compiles the ViT blocks; `--fp8-vision` runs both ViTs' linears in FP8 (blip_models.float8). Also
  prints the decoding loop's top GPU kernels.
* `retrieval`: one retrieval finetuning step (base 384 px, bf16) with image keys/values shared by the ITM pairs vs
  projected per pair as BLIP's code, side by side.
* `decode`: JPEG decode + transform images/s on one CPU core (what feeding the GPU costs: cores needed =
  GPU images/s / this).

    python benchmarks/bench_gpu.py --device cuda               # on a GPU machine
    python benchmarks/bench_gpu.py --device cpu --preset tiny  # the same code paths, tiny, on a CPU (smoke run)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peaks (NVIDIA datasheets, SXM): MFU is relative to these.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--preset", choices=("tiny", "small", "base"), default="base")
    parser.add_argument("--parts", default="pretrain,capfilt,decode",
                        help="comma list of pretrain,capfilt,decode,retrieval")
    parser.add_argument("--pretrain-batch", type=int, default=64, help="per-GPU batch (BLIP: 75)")
    parser.add_argument("--pretrain-steps", type=int, default=10)
    parser.add_argument("--retrieval-batch", type=int, default=32, help="per-GPU batch of the retrieval step (BLIP: 32)")
    parser.add_argument("--capfilt-batches", default="64,256", help="batch sizes to time")
    parser.add_argument("--capfilt-images", type=int, default=512, help="images per timed batch size")
    parser.add_argument("--baseline-images", type=int, default=128, help="images for the transformers baseline")
    parser.add_argument("--vocab", default=None, help="BERT vocab.txt (default: the offline one)")
    parser.add_argument("--peaked-logits", action="store_true",
                        help="give the random captioner a trained model's peaked next-token distribution (LM-head bias "
                             "~N(0, 8^2)): its top-p nucleus then fits the top-64 probe instead of forcing a full sort")
    parser.add_argument("--caption-ends", type=float, default=None, metavar="OFFSET",
                        help="with --peaked-logits: [SEP]'s logit = the top token's + OFFSET, so captions end after the "
                             "minimum length as a trained captioner's do (-3.5: 15-17 tokens with the prompt on average, "
                             "a few rows of a large batch reach max_length; COCO-style captions are ~10 words)")
    parser.add_argument("--compile", action="store_true",
                        help="regional torch.compile (blip_models.compilation.compile_blocks: every transformer block; "
                             "CapFilt: the ViT blocks only); warm-up includes the compilation")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode with --compile (default: torch's)")
    parser.add_argument("--sdpa-backend", choices=("default", "flash", "cudnn", "efficient", "math"), default="default",
                        help="attention kernels for every part (torch.nn.attention.sdpa_kernel): default lets torch "
                             "choose (cuDNN on an H100 for these shapes); flash: FlashAttention-2 where there is no "
                             "mask (the ViT), the memory-efficient kernel for masked text attention")
    parser.add_argument("--fp8-vision", action="store_true",
                        help="capfilt: both ViTs' linear layers in FP8 (blip_models.float8; needs an sm89+ GPU)")
    return parser.parse_args(argv)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: Any, fn: Callable[[], Any]) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def peak_tflops(device: Any) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


# ------------------------------------------------------------------------------------------------- pretrain


def bench_pretrain(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from blip_models import med
    from blip_models.compilation import compile_blocks
    from blip_models.configuration_blip import preset
    from blip_models.modeling_pretrain import BlipPretrain

    def plain_select_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return source.index_select(0, index)

    config = preset(args.preset)
    if args.preset == "base":
        config = config.replace(queue_size=57600)  # BLIP's queue; the image size stays 224 (pretraining)
    batch = args.pretrain_batch
    if config.queue_size % batch:  # a small preset's queue (tiny: 32) holds a whole number of the batches timed
        config = config.replace(queue_size=batch * -(-config.queue_size // batch))
    model = BlipPretrain(config).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    size = config.vision.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    input_ids = torch.randint(1000, 20000, (batch, 30), device=device)
    input_ids[:, 0] = 101
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, 20:] = 0  # captions shorter than the 30-token pad, as in BLIP's batches
    input_ids[:, 20:] = 0
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward() -> Any:
        with autocast:
            return model(images, input_ids, attention_mask, alpha=0.4).loss

    def step() -> None:
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # FLOPs counted on the eager step: compiled regions run Inductor kernels that the counter does not see. The
    # model's FLOPs only: the one-hot product that sums the gradient of image keys/values picked for several pairs
    # (med.select_rows) replaces an index_add_, so it is counted as the gather it stands for (no FLOPs).
    with FlopCounterMode(display=False) as counter, mock.patch.object(med, "select_rows", plain_select_rows):
        step()
    flops_per_step = counter.get_total_flops()
    if args.compile:
        compile_blocks(model, mode=args.compile_mode)
    warmup_began = time.perf_counter()
    for _ in range(3):  # warm-up: allocator, kernels, fused optimiser state (and compilation)
        step()
    sync(device)
    warmup_s = time.perf_counter() - warmup_began
    wall = timed(device, lambda: [step() for _ in range(args.pretrain_steps)])
    samples_per_s = batch * args.pretrain_steps / wall
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for _ in range(3):
        holder: dict[str, Any] = {}
        phases["forward"] += timed(device, lambda: holder.update(loss=forward()))
        optimizer.zero_grad(set_to_none=True)
        phases["backward"] += timed(device, lambda: holder["loss"].backward())
        phases["optimizer"] += timed(device, optimizer.step)
    total = sum(phases.values())
    name, peak = peak_tflops(device)
    achieved = flops_per_step * args.pretrain_steps / wall / 1e12
    result = {
        "model": args.preset, "image_size": size, "batch_per_gpu": batch, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "samples_per_s": round(samples_per_s, 1), "step_s": round(wall / args.pretrain_steps, 4),
        "model_tflop_per_step": round(flops_per_step / 1e12, 3), "achieved_tflops": round(achieved, 1),
        "mfu": round(achieved / peak, 3) if peak else None, "peak_bf16_tflops_assumed": peak, "device_name": name,
        "time_split": {k: round(v / total, 3) for k, v in phases.items()}, "compiled": args.compile and (args.compile_mode or "default"),
        "warmup_s": round(warmup_s, 1), "gpu_busy_fraction": gpu_busy_fraction(device, step),
        "kernels": top_kernels(device, step, 10),
        "note": "synthetic batch already on the GPU: data wait is 0 here; see `decode` for the CPU side",
    }  # fmt: skip
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ retrieval


def bench_retrieval(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """One retrieval finetuning step (BLIP-base 384 px, bf16, ITC + ITM): image keys/values shared by the ITM
    pairs (ours) vs projected per pair as BLIP's code (`share_cross_kv = False`), same model, side by side."""
    import torch

    from blip_models import build_model
    from blip_models.configuration_blip import preset

    config = preset(args.preset)
    if args.preset == "base":
        config = config.replace(vision={"image_size": 384})
    model = build_model("retrieval", config).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")  # fmt: skip
    batch, size = args.retrieval_batch, config.vision.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    input_ids = torch.randint(1000, 20000, (batch, 35), device=device)
    input_ids[:, 0] = 101
    attention_mask = torch.ones_like(input_ids)
    image_ids = torch.arange(batch, device=device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = model(images, input_ids, attention_mask, image_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result: dict[str, Any] = {"model": args.preset, "image_size": size, "batch_per_gpu": batch}
    for name, shared in (("ours_shared_image_keys", True), ("blip_per_pair_keys", False)):
        model.share_cross_kv = shared
        for _ in range(2):
            step()
        wall = timed(device, lambda: [step() for _ in range(args.pretrain_steps)])
        result[name] = {"samples_per_s": round(batch * args.pretrain_steps / wall, 1)}
    result["ratio"] = round(result["ours_shared_image_keys"]["samples_per_s"] / result["blip_per_pair_keys"]["samples_per_s"], 2)
    del model, optimizer
    return result


# -------------------------------------------------------------------------------------------------- capfilt


def bench_capfilt(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from blip_models.configuration_blip import preset
    from blip_models.modeling_caption import BlipCaption
    from blip_models.modeling_retrieval import BlipRetrieval
    from blip_models.tokenizer import load_tokenizer
    from pipelines.tasks.capfilt import CaptionerConfig, FilterConfig
    from pipelines.tasks.capfilt_models import caption_images, score_texts

    config = preset(args.preset)
    if args.preset == "base":
        config = config.replace(vision={"image_size": 384})  # CapFilt runs the finetuned 384 px models
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(args.vocab)
    captioner = BlipCaption(config, tokenizer).eval().to(device=device, dtype=dtype)
    filter_model = BlipRetrieval(config).eval().to(device=device, dtype=dtype)
    if args.peaked_logits:
        with torch.no_grad():
            bias = captioner.text_decoder.cls.predictions.bias
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)).mul_(8.0).to(bias))
            if args.caption_ends is not None:
                bias[tokenizer.sep_token_id] = bias.max() + args.caption_ends
    elif args.caption_ends is not None:
        raise SystemExit("--caption-ends needs --peaked-logits (it is an offset from the peaked top token's logit)")
    if args.fp8_vision:
        from blip_models.float8 import quantize_vision_linears

        reference = _itm_probabilities(captioner, filter_model, tokenizer, config, device, dtype)
        quantize_vision_linears(captioner)
        quantize_vision_linears(filter_model)
        fp8 = _itm_probabilities(captioner, filter_model, tokenizer, config, device, dtype)
        fp8_change = {"itm_probability_max_abs_change": round(float((fp8 - reference).abs().max()), 4),
                      "note": "random weights: the agreement that matters is bench_fp8_vision.py's, on trained models"}
    if args.compile:  # the two ViTs are most of the FLOPs; the decoder's growing KV cache would recompile
        from blip_models.compilation import compile_blocks

        compile_blocks(captioner, vision_only=True, mode=args.compile_mode)
        compile_blocks(filter_model, vision_only=True, mode=args.compile_mode)
    captioner_cfg, filter_cfg = CaptionerConfig(), FilterConfig()
    size = config.vision.image_size
    web = "a photo of a dog running on the beach with a ball"
    result: dict[str, Any] = {"model": args.preset, "image_size": size, "dtype": str(dtype).replace("torch.", ""),
                              "max_length": captioner_cfg.max_length, "compiled": args.compile,
                              "peaked_logits": args.peaked_logits, "caption_ends": args.caption_ends,
                              "fp8_vision": args.fp8_vision, "ours": {}}  # fmt: skip
    if args.fp8_vision:
        result["fp8_vision_change"] = fp8_change

    def run_batch(pixels: Any, offset: int) -> None:
        keys = [f"k{offset + i}" for i in range(pixels.shape[0])]
        captions = caption_images(captioner, tokenizer, pixels, keys, captioner_cfg)
        score_texts(filter_model, tokenizer, pixels, [web] * len(keys), captions, filter_cfg)

    for batch in [int(b) for b in args.capfilt_batches.split(",")]:
        pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        run_batch(pixels, 0)  # warm-up
        rounds = max(1, args.capfilt_images // batch)
        wall = timed(device, lambda: [run_batch(pixels, r * batch) for r in range(rounds)])
        result["ours"][str(batch)] = {"images_per_s": round(rounds * batch / wall, 1), "images": rounds * batch}
    best = max(v["images_per_s"] for v in result["ours"].values())
    result["images_per_s_per_gpu"] = best
    best_batch = max(result["ours"], key=lambda b: result["ours"][b]["images_per_s"])
    pixels = torch.randn(int(best_batch), 3, size, size, device=device, dtype=dtype)
    result["where_time_goes"] = _capfilt_split(device, captioner, filter_model, tokenizer, pixels, web,
                                               captioner_cfg, filter_cfg)  # fmt: skip
    result["decoding_compaction"] = _compaction_side_by_side(device, captioner, tokenizer, pixels, captioner_cfg)
    result["gpu_busy_fraction"] = gpu_busy_fraction(device, lambda: run_batch(pixels, 0))
    keys = [f"k{i}" for i in range(pixels.shape[0])]
    result["decoding_top_kernels"] = top_kernels(device, lambda: caption_images(captioner, tokenizer, pixels, keys,
                                                                                captioner_cfg))  # fmt: skip
    if args.compile or args.fp8_vision:
        return result  # the baseline does not change with our options: run it without them
    try:
        result["baseline"] = _capfilt_baseline(args, device, dtype, captioner, filter_model, tokenizer, size, web)
        base_batch = str(result["baseline"]["batch"])
        if base_batch in result["ours"]:
            result["ratio_vs_baseline_same_batch"] = round(
                result["ours"][base_batch]["images_per_s"] / result["baseline"]["images_per_s"], 2)
    except Exception as error:  # noqa: BLE001 - the baseline depends on the machine's transformers version
        result["baseline"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def _capfilt_split(device, captioner, filter_model, tokenizer, pixels, web, captioner_cfg, filter_cfg) -> dict[str, Any]:
    """Seconds per batch of the captioner's ViT, its decoding loop, the filter's ViT and its ITM text pass."""
    import torch

    from pipelines.tasks.capfilt_models import caption_images, score_texts

    keys = [f"k{i}" for i in range(pixels.shape[0])]
    holder: dict[str, Any] = {}
    with torch.no_grad():
        caption_vit = timed(device, lambda: captioner.visual_encoder(pixels))
        caption_all = timed(device, lambda: holder.update(c=caption_images(captioner, tokenizer, pixels, keys, captioner_cfg)))
        filter_vit = timed(device, lambda: filter_model.visual_encoder(pixels))
        filter_all = timed(device, lambda: score_texts(filter_model, tokenizer, pixels, [web] * len(keys), holder["c"], filter_cfg))
    parts = {"captioner_vit": caption_vit, "decoding": caption_all - caption_vit, "filter_vit": filter_vit,
             "filter_itm": filter_all - filter_vit}  # fmt: skip
    total = sum(parts.values())
    return {"batch": pixels.shape[0], "seconds": round(total, 4), **{k: round(v / total, 3) for k, v in parts.items()}}


def _compaction_side_by_side(device, captioner, tokenizer, pixels, captioner_cfg) -> dict[str, Any]:
    """The decoding loop of one batch with finished rows dropped from it (the default) vs kept to the end."""
    import torch

    from pipelines.tasks import capfilt_models

    seeds = list(range(pixels.shape[0]))
    prompt_ids = capfilt_models._prompt_ids(tokenizer, captioner_cfg.prompt).to(device)
    with torch.no_grad():
        embeds = captioner.visual_encoder(pixels)

        def decode() -> Any:
            return capfilt_models._sample_ids(captioner, tokenizer, embeds, prompt_ids, seeds, captioner_cfg)

        ids = decode()
        seconds = {}
        default = capfilt_models.COMPACT_AT
        for name, share in (("kept", 0.0), ("dropped", default), ("kept_again", 0.0), ("dropped_again", default)):
            capfilt_models.COMPACT_AT = share
            seconds[name] = timed(device, decode)
        capfilt_models.COMPACT_AT = default
    lengths = (ids != tokenizer.pad_token_id).sum(dim=1).float()  # prompt + caption + [SEP]
    kept, dropped = min(seconds["kept"], seconds["kept_again"]), min(seconds["dropped"], seconds["dropped_again"])
    return {"batch": len(seeds), "tokens_mean": round(float(lengths.mean()), 1), "tokens_max": int(lengths.max()),
            "finished_rows_kept_s": round(kept, 4), "finished_rows_dropped_s": round(dropped, 4),
            "speedup": round(kept / dropped, 3)}  # fmt: skip


def _itm_probabilities(captioner, filter_model, tokenizer, config, device, dtype) -> Any:
    """ITM match probabilities of 8 fixed images x their greedy captions (fp8 vs bf16 comparison)."""
    import torch

    from pipelines.tasks.capfilt import CaptionerConfig, FilterConfig
    from pipelines.tasks.capfilt_models import caption_images, score_texts

    size = config.vision.image_size
    pixels = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    captions = caption_images(captioner, tokenizer, pixels, [f"k{i}" for i in range(8)], CaptionerConfig())
    return torch.tensor(score_texts(filter_model, tokenizer, pixels, ["a dog on the beach"] * 8, captions, FilterConfig()))


KERNEL_CLASSES = (  # substrings of CUDA kernel names, first match wins
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "scaled_mm")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("triton (fused elementwise/reductions)", ("triton",)),
    ("softmax/norm/elementwise (eager)", ("elementwise", "reduce", "softmax", "norm", "vectorized", "unrolled")),
)


def top_kernels(device: Any, fn: Callable[[], Any], count: int = 8) -> dict[str, Any] | None:
    """Where `fn`'s GPU time goes: share of kernel time per kernel class, and the `count` costliest kernels."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type.name == "CUDA" and event.time_range.end > event.time_range.start:
            entry = totals.setdefault(event.name[:90], [0.0, 0])
            entry[0] += event.time_range.end - event.time_range.start
            entry[1] += 1
    everything = sum(total for total, _ in totals.values()) or 1.0
    classes: dict[str, float] = {}
    for name, (total, _) in totals.items():
        lowered = name.lower()
        label = next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other")
        classes[label] = classes.get(label, 0.0) + total / everything
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return {"classes": {k: round(v, 3) for k, v in sorted(classes.items(), key=lambda item: -item[1])},
            "top": [{"kernel": name, "share": round(total / everything, 3), "calls": calls}
                    for name, (total, calls) in ranked]}  # fmt: skip


def gpu_busy_fraction(device: Any, fn: Callable[[], Any]) -> float | None:
    """Share of `fn`'s wall time during which a GPU kernel runs (union of kernel intervals, torch.profiler)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        began = time.perf_counter()
        fn()
        sync(device)
        wall_us = (time.perf_counter() - began) * 1e6
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)  # fmt: skip
    busy, current_start, current_end = 0.0, None, None
    for start, end in intervals:
        if current_end is None or start > current_end:
            busy += 0.0 if current_end is None else current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return round(min(1.0, busy / wall_us), 3)


def _capfilt_baseline(args, device, dtype, captioner, filter_model, tokenizer, size: int, web: str) -> dict[str, Any]:
    import torch

    from blip_models.hf_convert import to_hf

    hf_caption = to_hf(captioner.float().cpu()).to(device=device, dtype=dtype).eval()
    hf_itm = to_hf(filter_model.float().cpu()).to(device=device, dtype=dtype).eval()
    batch = min(64, args.baseline_images)
    prompt_ids = tokenizer(["a picture of "], return_tensors="pt").input_ids[:, :-1].to(device)

    def run_batch(pixels: Any) -> None:
        with torch.no_grad():
            ids = hf_caption.generate(pixel_values=pixels, input_ids=prompt_ids.repeat(pixels.shape[0], 1),
                                      do_sample=True, top_k=50, top_p=0.9, repetition_penalty=1.1, max_length=30,
                                      min_length=10)  # fmt: skip
            captions = tokenizer.batch_decode(ids, skip_special_tokens=True)
            texts = [t for c in captions for t in (web, c)]
            owners = torch.arange(pixels.shape[0], device=device).repeat_interleave(2)
            encoded = tokenizer(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
            hf_itm(input_ids=encoded.input_ids.to(device), attention_mask=encoded.attention_mask.to(device),
                   pixel_values=pixels[owners], use_itm_head=True)  # fmt: skip

    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    run_batch(pixels)
    rounds = max(1, args.baseline_images // batch)
    wall = timed(device, lambda: [run_batch(pixels) for _ in range(rounds)])
    return {"what": "transformers BlipForConditionalGeneration.generate + BlipForImageTextRetrieval, per batch",
            "batch": batch, "images_per_s": round(rounds * batch / wall, 1)}


# --------------------------------------------------------------------------------------------------- decode


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from blip_models.processing import eval_transform, train_transform

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    # Web-like JPEGs: 512x384, smooth noise (compresses like a photo, not like white noise).
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    jpegs = []
    for i in range(32):
        image = Image.fromarray(np.roll(base, i, axis=1)).resize((512, 384), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    result = {}
    for name, transform in (("train_224", train_transform(224, 0.2, augment_seed=0)), ("eval_384", eval_transform(384))):
        began = time.perf_counter()
        for _ in range(3):
            for data in jpegs:
                transform(Image.open(io.BytesIO(data)).convert("RGB"))
        result[f"{name}_images_per_s_per_core"] = round(3 * len(jpegs) / (time.perf_counter() - began), 1)
    return result


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "--device cuda asked for, but torch sees no GPU on this machine"}))
        return 1
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    out: dict[str, Any] = {"benchmark": "bench_gpu", "device": peak_tflops(device)[0], "torch": torch.__version__,
                           "sdpa_backend": args.sdpa_backend}
    with attention_kernels(args.sdpa_backend):
        run_parts(args, device, parts, out)
    print(json.dumps(out, indent=2))
    return 0


def attention_kernels(backend: str) -> Any:
    """The SDPA backend every attention call uses (compiled regions are traced inside it, so they keep it)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "default":
        return contextlib.nullcontext()
    # The text layers' attention has a padding mask, which FlashAttention does not take: those calls fall back
    # to the memory-efficient kernel (the ViT's, unmasked, run on the chosen one).
    efficient = SDPBackend.EFFICIENT_ATTENTION
    return sdpa_kernel({"flash": [SDPBackend.FLASH_ATTENTION, efficient], "cudnn": [SDPBackend.CUDNN_ATTENTION, efficient],
                        "efficient": [efficient], "math": [SDPBackend.MATH]}[backend])


def run_parts(args: argparse.Namespace, device: Any, parts: set[str], out: dict[str, Any]) -> None:
    if "pretrain" in parts:
        out["pretrain"] = bench_pretrain(args, device)
        print(json.dumps(out), flush=True)
    if "capfilt" in parts:
        out["capfilt"] = bench_capfilt(args, device)
        print(json.dumps(out), flush=True)
    if "retrieval" in parts:
        out["retrieval"] = bench_retrieval(args, device)
        print(json.dumps(out), flush=True)
    if "decode" in parts:
        out["decode"] = bench_decode(args)


if __name__ == "__main__":
    raise SystemExit(main())
