"""Benchmark: one BLIP pretraining step (forward + backward of ITC + ITM + LM) of our model vs transformers.

Ours: `BlipPretrain` (ITC with momentum encoders and queues, ITM with hard negatives, LM on the shared decoder).
Baseline: the closest computation transformers offers, on the same sizes and weights layout:
`BlipForImageTextRetrieval` (vision, unimodal text + projections for an in-batch ITC loss, the image-grounded
encoder on B positives + 2B negatives for the ITM loss) plus `BlipForConditionalGeneration.text_decoder` (LM loss on
the same image embeddings). transformers has no momentum encoders, so ours does two extra no-grad passes.

Prints one JSON object: steps/s and samples/s for `tiny` and `base` (batch 2 at 224 px, few steps), and ratios.
Usage: python benchmarks/bench_model_step.py [--steps-tiny 10] [--steps-base 1] [--threads N] [--skip-base]
       [--models tiny,base] [--device cpu|cuda] [--precision fp32|bf16] [--image-size PX] [--batch-base 2]
(base builds two ~220M-parameter models: about 2 minutes on two idle cores, much longer on a busy machine)
Both models run under the same autocast; on CUDA every timing is bracketed by `torch.cuda.synchronize()`.
GPU, as the issue asks: --device cuda --precision bf16 --image-size 384 --models base --batch-base 32 --steps-base 10
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


def _batch(config, batch_size, image_size, device):
    import torch

    pixels = torch.randn(batch_size, 3, image_size, image_size)
    input_ids = torch.randint(1000, 20000, (batch_size, 30))
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 20:] = 0  # some padding, as real captions
    input_ids[0, 20:] = 0
    return pixels.to(device), input_ids.to(device), attention_mask.to(device)


def _ours_step(model, optimizer, batch, precision):
    with autocast(batch[0].device, precision):
        output = model(*batch)
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    optimizer.step()


def _hf_models(config):
    import transformers

    from blip_models.hf_convert import hf_config_from_ours

    hf_config = hf_config_from_ours(config)
    retrieval = transformers.BlipForImageTextRetrieval(hf_config).train()
    caption = transformers.BlipForConditionalGeneration(hf_config).train()
    del caption.vision_model  # the LM reuses the retrieval model's image embeddings, as BLIP does
    return retrieval, caption


def _hf_step(models, optimizer, batch, enc_token_id, bos_token_id, precision, temp=0.07):
    with autocast(batch[0].device, precision):
        loss = _hf_loss(models, batch, enc_token_id, bos_token_id, temp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _hf_loss(models, batch, enc_token_id, bos_token_id, temp):
    import torch
    import torch.nn.functional as F

    retrieval, caption = models
    pixels, input_ids, mask = batch
    size, device = pixels.shape[0], pixels.device
    image_embeds = retrieval.vision_model(pixel_values=pixels).last_hidden_state  # (B, 1+N, D)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
    text = retrieval.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    image_feat = F.normalize(retrieval.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(retrieval.text_proj(text[:, 0]), dim=-1)
    sim = image_feat @ text_feat.T / temp
    targets = torch.arange(size, device=device)
    loss_itc = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets)) / 2
    enc_ids = input_ids.clone()
    enc_ids[:, 0] = enc_token_id
    negative = torch.roll(torch.arange(size, device=device), 1)  # one negative image per text and one negative text per image
    ids_all = torch.cat([enc_ids, enc_ids, enc_ids[negative]])  # (3B, L)
    mask_all = torch.cat([mask, mask, mask[negative]])
    images_all = torch.cat([image_embeds, image_embeds[negative], image_embeds])  # (3B, 1+N, D)
    fused = retrieval.text_encoder(input_ids=ids_all, attention_mask=mask_all, encoder_hidden_states=images_all,
                                   encoder_attention_mask=torch.cat([image_atts] * 3)).last_hidden_state  # fmt: skip
    itm_labels = torch.cat([torch.ones(size, device=device), torch.zeros(2 * size, device=device)]).long()
    loss_itm = F.cross_entropy(retrieval.itm_head(fused[:, 0]), itm_labels)
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = bos_token_id
    labels = dec_ids.masked_fill(mask == 0, -100)
    loss_lm = caption.text_decoder(input_ids=dec_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_atts, labels=labels).loss  # fmt: skip
    return loss_itc + loss_itm + loss_lm


def _time(fn, steps, warmup, device):
    for _ in range(warmup):  # allocator and first-call overheads
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def run(name, config, batch_size, image_size, steps, warmup, device, precision):
    import torch

    from blip_models.modeling_pretrain import BlipPretrain

    torch.manual_seed(0)
    config = config.replace(vision={"image_size": image_size})  # pos_embed for this size: no per-step resizing
    batch = _batch(config, batch_size, image_size, device)
    ours = BlipPretrain(config).to(device).train()
    ours_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    ours_s = _time(lambda: _ours_step(ours, ours_opt, batch, precision), steps, warmup, device)
    del ours, ours_opt
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the baseline gets the memory ours held
    hf = tuple(model.to(device) for model in _hf_models(config))
    hf_opt = torch.optim.AdamW([p for m in hf for p in m.parameters()], lr=1e-5)
    text = config.text
    hf_s = _time(lambda: _hf_step(hf, hf_opt, batch, text.enc_token_id, text.bos_token_id, precision), steps, warmup,
                 device)  # fmt: skip
    return {"config": name, "batch_size": batch_size, "image_size": image_size, "steps": steps, "warmup": warmup,
            "ours_s_per_step": round(ours_s, 4), "transformers_s_per_step": round(hf_s, 4),
            "ours_samples_per_s": round(batch_size / ours_s, 3), "transformers_samples_per_s": round(batch_size / hf_s, 3),
            "speed_ratio_ours_over_transformers": round(hf_s / ours_s, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-tiny", type=int, default=10)
    parser.add_argument("--steps-base", type=int, default=1, help="base steps are seconds each on CPU; no warm-up")
    add_options(parser, "tiny 32, base 224")
    parser.add_argument("--batch-base", type=int, default=2, help="base batch size (tiny: 8)")
    parser.add_argument("--warmup-base", type=int, default=None,
                        help="untimed base steps first (default: 0 on CPU, where a step takes seconds; 2 on CUDA)")
    args = parser.parse_args()

    import torch

    from blip_models.configuration_blip import preset

    models, device = resolve(parser, args)
    results = []
    if "tiny" in models:
        results.append(run("tiny", preset("tiny"), 8, args.image_size or 32, args.steps_tiny, 1, device, args.precision))
    if "base" in models:
        base = preset("base").replace(text={"hidden_dropout": 0.0, "attention_dropout": 0.0}, queue_size=57600)
        warmup = args.warmup_base if args.warmup_base is not None else (2 if device.type == "cuda" else 0)
        results.append(run("base", base, args.batch_base, args.image_size or 224, args.steps_base, warmup, device,
                           args.precision))  # fmt: skip
    print(json.dumps({"benchmark": "model_step", "device": str(device), "precision": args.precision,
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
                      "note": "ours includes momentum-encoder passes and queues that transformers has no equivalent for; "
                              "dropout off in base for both",
                      "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
