"""CapFilt model side: captioner sampling and ITM filter scoring on one device (BLIP, Li et al. 2022, §3.3).

Pure tensor functions called by the Ray actors of `_ray_capfilt.py` (and by the unit tests without Ray):
`caption_images` (nucleus sampling with one seed per caption, or beam search), `regenerate_caption` (one
published caption back from its recorded seed), `score_texts` (ITM match probability of the web text and every
caption, the image encoded once), and the helpers they use. Decoding
follows blip_models.generation (lengths include the prompt, repetition penalty, top-k then top-p); the only
change is the random draw: each row draws with its own seeded uniforms, so the draws do not depend on which
other images shared its batch (see `sample_rows`). The logits themselves can differ in their last bits with the
batch's size and company (matrix kernels sum in other orders; more so in bf16), which once in a while turns a
draw near a token boundary to its neighbour: a resumed run makes the same batches (fixed slices of each shard,
the batch size in the cache key) and so the same captions, while `regenerate_caption` (a batch of one) gives
back the published caption as a rule, not bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.tasks.capfilt import BEAM_REPETITION_PENALTY, CaptionerConfig, FilterConfig
from pipelines.tasks.shard_cache import MODEL_FILES, ShardCache, local_copies


def load_model(source: dict[str, str], device: Any, dtype: str, cache: tuple[str, int] | None = None) -> Any:
    """A model version's weights on `device`: a local directory, or the two files of a remote registry's version.

    Remote files are fetched into a temporary directory removed once the model is loaded (each actor used to leave
    its ~1 GB copy in /tmp), or, with the node's shard cache (`compute.shard_cache_dir`), taken from the node's
    copy: the actors of a node download a model once, not once each."""
    import torch

    from blip_models.checkpoints import from_pretrained

    directory = source.get("dir")
    if directory:
        return from_pretrained(directory).eval().to(device=device, dtype=getattr(torch, dtype))
    node_cache = ShardCache.from_setting(cache, "compute")
    with local_copies({name: source[name] for name in MODEL_FILES}, node_cache) as staging:
        model = from_pretrained(staging).eval()
    return model.to(device=device, dtype=getattr(torch, dtype))


def normalize_pixels(array: Any, device: Any, dtype: str) -> Any:
    """uint8 (n, S, S, 3) -> normalised (n, 3, S, S): ToTensor + Normalize(CLIP) of eval_transform, on the device."""
    import torch

    from blip_models.processing import CLIP_MEAN, CLIP_STD

    pixels = torch.from_numpy(array.copy()).to(device)  # (n, S, S, 3) uint8
    pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0)  # (n, 3, S, S)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return ((pixels - mean) / std).to(getattr(torch, dtype))


def synchronize(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _decoder_step(model: Any, image_embeds: Any) -> Any:
    """`step(new_tokens, past) -> (logits (N, V), past)` of the image-grounded decoder, as BlipCaption.generate_ids
    builds it (no attention mask: prompt rows are never padded; the key/value cache carries the prefix)."""

    def step(new_tokens: Any, past: Any) -> tuple[Any, Any]:
        # After the first step the cache holds every layer's image keys/values (rows as the cache's, which
        # `sample_rows` may have compacted): the image embeddings are needed only to project them once.
        embeds = image_embeds if past is None else None
        output = model.text_decoder(new_tokens, encoder_hidden_states=embeds, past_key_values=past, use_cache=True)
        return output.logits[:, -1, :], output.past_key_values  # (N, V)

    return step


CHECK_DONE_EVERY = 4  # decoding steps between host syncs on "every row has finished"
COMPACT_AT = 0.5  # drop finished rows from the cache once no more than this share of its rows is still decoding


def sample_rows(step: Any, input_ids: Any, generation: Any, uniforms: Any, reorder: Any = None) -> Any:
    """Nucleus sampling where row i draws its t-th token with `uniforms[i, t]` (inverse CDF over the nucleus).

    Same logits processing as blip_models.generation.sample (repetition penalty, then min length, then top-k and
    top-p); only the random draw differs: each row draws with its own seeded uniforms, so a caption does not
    depend on what else was in the batch. Returns (N, T) ids, pad after eos.

    Whether every row has finished is asked of the device only every CHECK_DONE_EVERY steps (a host sync stalls
    the kernel queue once per step otherwise); the columns decoded after the last row finished are cut off, so
    the output is the same as stopping at once. With `reorder(past, index) -> past` (med.reorder_cache), the
    finished rows leave the computation at those checks once at most COMPACT_AT of the decoded rows are still
    open: each step reads every row's cached image keys/values (577 tokens x 12 layers for BLIP-base at 384 px),
    so without compaction a batch decodes at full size until its longest caption ends. Halving the rows each time
    keeps the copying below two steps' reads of the whole cache.
    """
    import torch

    from blip_models.generation import apply_min_length, apply_repetition_penalty

    count, prompt_length = input_ids.shape
    output = input_ids.new_full((count, generation.max_length), generation.pad_token_id)
    rows = torch.arange(count, device=input_ids.device)  # the output row of each decoded row
    sequences, new_tokens, past = input_ids, input_ids, None  # (n, L0)
    finished = torch.zeros(count, dtype=torch.bool, device=input_ids.device)
    steps_with_work = torch.zeros((), dtype=torch.long, device=input_ids.device)  # a prefix of the steps
    step_index = 0
    while prompt_length + step_index < generation.max_length:
        steps_with_work += (~finished).any()
        logits, past = step(new_tokens, past)  # (n, V)
        scores = apply_repetition_penalty(logits.float(), sequences, generation.repetition_penalty)
        scores = apply_min_length(scores, sequences.shape[1], generation.min_length, generation.eos_token_id)
        next_token = nucleus_draw(scores, generation.top_p, uniforms[:, step_index], generation.top_k)  # (n,)
        next_token = torch.where(finished, torch.full_like(next_token, generation.pad_token_id), next_token)
        sequences = torch.cat([sequences, next_token[:, None]], dim=1)
        finished = finished | (next_token == generation.eos_token_id)
        step_index += 1
        if step_index % CHECK_DONE_EVERY == 0:
            still_open = int((~finished).sum())
            if still_open == 0:
                break
            decoding = finished.shape[0]  # rows in the batch now
            if reorder is not None and still_open < decoding and still_open <= COMPACT_AT * decoding:
                done, keep = finished.nonzero().squeeze(1), (~finished).nonzero().squeeze(1)
                output[rows[done], : sequences.shape[1]] = sequences[done]
                rows, sequences, finished = rows[keep], sequences[keep], finished[keep]
                uniforms, next_token = uniforms[keep], next_token[keep]
                # Layer by layer, each old layer freed as its rows are copied: the peak is the cache plus one
                # layer, not two caches (BLIP-base at 384 px, batch 2048: ~44 GB of image keys/values in bf16).
                layers, past = list(past), None
                for number in range(len(layers)):
                    layers[number] = reorder((layers[number],), keep)[0]
                past = tuple(layers)
        new_tokens = next_token[:, None]
    output[rows, : sequences.shape[1]] = sequences
    return output[:, : prompt_length + int(steps_with_work)]


NUCLEUS_PROBE = 64  # top-k size that holds a trained captioner's nucleus in almost every step


def nucleus_mask(probs: Any, top_p: float) -> Any:
    """(N, V) bool: the top-p nucleus of each row of `probs`, as blip_models.generation.top_k_top_p_filter.

    A token is in the nucleus when the mass of the tokens more probable than it is <= top_p (the best token
    always); that mass falls as the token's probability rises, so the nucleus is {p >= tau} with tau the
    smallest kept probability of the row. A full sort of 30k probabilities costs ~10 ms per row on a CPU core;
    a top-k probe finds tau whenever the nucleus lies inside the top k (trained captioners, nearly always),
    and only the other rows (flat distributions, e.g. random weights) are sorted.
    """
    import torch

    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)

    def smallest_kept(top_probs: Any) -> tuple[Any, Any]:
        above = top_probs.cumsum(dim=-1) - top_probs  # mass strictly above each ranked token
        inside = (above <= top_p).sum(dim=-1, keepdim=True)  # (N, 1) >= 1
        return top_probs.gather(1, inside - 1), above[:, -1] <= top_p  # tau, "nucleus may go past the probe"

    k = min(NUCLEUS_PROBE, probs.shape[-1])
    tau, spill = smallest_kept(probs.topk(k, dim=-1).values)  # (N, 1), (N,)
    if k < probs.shape[-1] and bool(spill.any()):
        tau[spill] = smallest_kept(_sorted_descending(probs[spill]))[0]
    return probs >= tau


def _sorted_descending(values: Any) -> Any:
    # torch's CPU sort of (N, 30k) floats is ~15x slower than numpy's (measured here: 300 ms vs 20 ms).
    if values.device.type != "cpu":
        return values.sort(dim=-1, descending=True).values
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.sort(values.numpy(), axis=-1)[:, ::-1]))


def nucleus_draw(scores: Any, top_p: float, uniforms: Any, top_k: int = 0) -> Any:
    """One token per row from the top-k/top-p nucleus of softmax(scores), by inverse CDF with `uniforms`.

    The candidates are walked in vocabulary order, so a draw does not depend on how a device ranked equal scores.
    With top-k on (BLIP's 50) everything happens on (N, k): no (N, V) pass and no host sync.
    """
    import torch

    from blip_models.generation import outside_nucleus

    if 0 < top_k < scores.shape[-1]:
        values, index = scores.topk(top_k, dim=-1)  # (N, k), best first
        probs = values.softmax(dim=-1)  # renormalised over the top-k, as transformers' TopK then TopP warpers
        probs = probs.masked_fill(outside_nucleus(probs, top_p), 0.0)
        index, order = index.sort(dim=-1)  # vocabulary order
        probs = probs.gather(1, order)
    else:
        probs = scores.softmax(dim=-1)  # (N, V)
        probs, index = probs * nucleus_mask(probs, top_p), None
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # (N, 1) in (0, nucleus mass]
    position = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1)  # (N, 1)
    return (position if index is None else index.gather(1, position)).squeeze(1)


def row_uniforms(seeds: list[int], steps: int, device: Any) -> Any:
    """(N, steps) uniforms in (0, 1], row i from a CPU generator seeded with seeds[i] (device-independent draws)."""
    import torch

    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        rows.append(1.0 - torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows).to(device=device, dtype=torch.float32) if rows else torch.zeros(0, steps, device=device)


def caption_images(model: Any, tokenizer: Any, pixel_values: Any, keys: list[str], config: CaptionerConfig) -> list[list[str]]:
    """`config.num_captions` synthetic captions per image (prompt removed, pre_caption applied)."""
    import torch

    from blip_models.generation import GenerationConfig, beam_search
    from blip_models.med import reorder_cache

    count = len(keys)
    if count == 0 or config.num_captions == 0:
        return [[] for _ in keys]
    device = pixel_values.device
    prompt_ids = _prompt_ids(tokenizer, config.prompt).to(device)  # (1, P)
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixel_values)  # (B, S, D)
        if config.method == "nucleus":
            # Row b * N + i = caption i of image b, drawn with its own seed.
            seeds = [seed for key in keys for seed in config.caption_seeds(key)]
            embeds = image_embeds.repeat_interleave(config.num_captions, dim=0)  # (B*N, S, D)
            ids = _sample_ids(model, tokenizer, embeds, prompt_ids, seeds, config)
        else:
            generation = GenerationConfig(max_length=config.max_length, min_length=config.min_length,
                                          num_beams=config.num_beams, num_return_sequences=config.num_captions,
                                          repetition_penalty=BEAM_REPETITION_PENALTY,
                                          eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            embeds = image_embeds.repeat_interleave(config.num_beams, dim=0)  # (B*K, S, D)
            input_ids = prompt_ids.repeat(count * config.num_beams, 1)
            ids = beam_search(_decoder_step(model, embeds), reorder_cache, input_ids, generation)
    captions = _decode(tokenizer, ids, config)
    return [captions[b * config.num_captions : (b + 1) * config.num_captions] for b in range(count)]


def regenerate_caption(model: Any, tokenizer: Any, pixel_values: Any, seed: int, config: CaptionerConfig) -> str:
    """The nucleus caption of one image (1, 3, S, S) drawn with `seed`: texts.parquet's `seed` column + the
    version's recorded sampling settings give back the published caption (its row's key is not needed)."""
    import torch

    if config.method != "nucleus":
        raise ValueError("regenerate_caption: beam search captions have no seed (rerun caption_images)")
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixel_values)  # (1, S, D)
        prompt_ids = _prompt_ids(tokenizer, config.prompt).to(pixel_values.device)
        ids = _sample_ids(model, tokenizer, image_embeds, prompt_ids, [seed], config)
    return _decode(tokenizer, ids, config)[0]


def _prompt_ids(tokenizer: Any, prompt: str) -> Any:
    prompt_ids = tokenizer([prompt], return_tensors="pt")["input_ids"][:, :-1]  # drop [SEP]: (1, P)
    prompt_ids[:, 0] = tokenizer.bos_token_id  # [DEC] a picture of
    return prompt_ids


def _sample_ids(model: Any, tokenizer: Any, embeds: Any, prompt_ids: Any, seeds: list[int],
                config: CaptionerConfig) -> Any:  # fmt: skip
    """Nucleus-sampled ids (rows, T), row r conditioned on embeds[r] and drawing with seeds[r]."""
    from blip_models.generation import GenerationConfig
    from blip_models.med import reorder_cache

    generation = GenerationConfig(max_length=config.max_length, min_length=config.min_length, do_sample=True,
                                  top_p=config.top_p, top_k=config.top_k, repetition_penalty=config.repetition_penalty,
                                  eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    uniforms = row_uniforms(seeds, config.max_length, embeds.device)
    return sample_rows(_decoder_step(model, embeds), prompt_ids.repeat(len(seeds), 1), generation, uniforms,
                       reorder=reorder_cache)  # fmt: skip


def _decode(tokenizer: Any, ids: Any, config: CaptionerConfig) -> list[str]:
    from blip_models.processing import pre_caption

    texts = tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
    # BLIP strips the prompt by characters (caption[len(prompt):]), after decoding.
    return [pre_caption(text[len(config.prompt) :], config.max_words) for text in texts]


def score_texts(model: Any, tokenizer: Any, pixel_values: Any, web_texts: list[str | None],
                captions: list[list[str]], config: FilterConfig) -> list[list[float]]:  # fmt: skip
    """ITM match probabilities (softmax(itm_logits)[:, 1]) of [web text] + captions for each image.

    Every image has the same number of texts (1 + its captions; a missing web text is scored as ""), so the texts
    go through the ITM encoder grouped by image: each image's cross-attention keys/values are computed once and
    shared by its texts instead of being recomputed per (image, text) pair (~1/8 of the stage's FLOPs at 384 px).
    """
    import torch

    from blip_models.processing import pre_caption
    from blip_models.tokenizer import tokenize

    if not web_texts:
        return []
    per_image = {1 + len(synthetic) for synthetic in captions}
    if len(per_image) != 1:
        raise ValueError(f"score_texts: images have different caption counts {sorted(per_image)}")
    texts = [pre_caption(text, 30) for web, synthetic in zip(web_texts, captions) for text in [web or "", *synthetic]]
    group = per_image.pop()
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixel_values)  # (B, S, D): once per image, shared by its texts
        cross_kv = model.precompute_cross_kv(image_embeds)  # per layer (B, h, S, d) keys and values
        input_ids, attention_mask = tokenize(tokenizer, texts, config.max_text_tokens, padding="longest")
        device = pixel_values.device
        logits = model.itm_logits_grouped(cross_kv, input_ids.to(device), attention_mask.to(device))  # (B*G, 2)
        probs = logits.float().softmax(dim=-1)[:, 1].view(len(web_texts), group).tolist()
    return probs
