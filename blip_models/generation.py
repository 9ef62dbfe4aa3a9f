"""Our own decoding loop for the BLIP decoder: beam search and nucleus sampling with a key/value cache.

Follows the semantics of HF transformers 4.15 `generate` that BLIP was built on (spec §4.2, §9.1): length counts
include the prompt tokens; `min_length` bans eos until reached; repetition penalty divides positive and multiplies
negative scores of already-present tokens; beam hypotheses are scored as sum log-prob / length**length_penalty and
stored without their eos; nucleus sampling keeps the smallest set of tokens whose probability reaches `top_p`.
It is owned here so that no transformers release can change BLIP's decoding (pitfall §9.1).

The model side is two callables: `step(input_ids, past) -> (logits (N, V), past)` feeding only the new tokens, and
`reorder(past, index) -> past` selecting rows of the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
ReorderFn = Callable[[Any, torch.Tensor], Any]


@dataclass(frozen=True)
class GenerationConfig:
    max_length: int = 30  # total tokens including the prompt
    min_length: int = 10  # eos banned while the sequence is shorter than this (prompt included)
    num_beams: int = 1
    do_sample: bool = False  # nucleus sampling instead of beam/greedy search
    top_p: float = 0.9
    # 0 = off. BLIP sampled with transformers 4.15 `generate`, whose top_k falls back to the config default 50
    # (its med_config sets none): its captions come from the top-p nucleus of the 50 best tokens. Task models pass 50.
    top_k: int = 0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int = 102  # [SEP]
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.min_length < 0 or self.min_length > self.max_length:
            raise ValueError(f"generation: need 0 <= min_length ({self.min_length}) <= max_length ({self.max_length})")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("generation: num_beams and num_return_sequences must be >= 1")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"generation: num_return_sequences={self.num_return_sequences} > num_beams={self.num_beams}"
            )
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0 or self.repetition_penalty <= 0:
            raise ValueError("generation: need 0 < top_p <= 1, temperature > 0, repetition_penalty > 0")


def apply_repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token already in `input_ids`: score / penalty if positive, score * penalty if negative."""
    if penalty == 1.0:
        return scores
    previous = scores.gather(1, input_ids)  # (N, L)
    previous = torch.where(previous < 0, previous * penalty, previous / penalty)
    return scores.scatter(1, input_ids, previous)


def apply_min_length(scores: torch.Tensor, cur_len: int, min_length: int, eos_token_id: int) -> torch.Tensor:
    if cur_len < min_length:
        scores = scores.clone()
        scores[:, eos_token_id] = -float("inf")
    return scores


def top_k_top_p_filter(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to −inf every token outside the top-k and outside the nucleus (always keeps the best token).

    Order and semantics of transformers' TopK then TopP warpers: the nucleus is taken in the distribution
    renormalised over the top-k. With top-k on, only the k best are sorted (a (N, k) top-k instead of a full
    (N, V) sort); of tokens tied with the k-th score, only those `torch.topk` returns are kept.
    """
    vocabulary = scores.shape[-1]
    if 0 < top_k < vocabulary:
        values, index = torch.topk(scores, top_k, dim=-1)  # (N, k), best first
        if top_p < 1.0:
            values = values.masked_fill(outside_nucleus(values.softmax(dim=-1), top_p), -float("inf"))
        return torch.full_like(scores, -float("inf")).scatter(1, index, values)
    if top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=True, dim=-1)
        remove_sorted = outside_nucleus(sorted_scores.softmax(dim=-1), top_p)
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def outside_nucleus(ranked_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(N, K) bool over probabilities ranked best first: the mass strictly above the token exceeds top_p."""
    remove = (ranked_probs.cumsum(dim=-1) - ranked_probs) > top_p
    remove[:, 0] = False
    return remove


def sample(step: StepFn, input_ids: torch.Tensor, config: GenerationConfig,
           generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Nucleus (or greedy when do_sample=False) decoding of N independent rows; returns (N, T) ids, pad after eos."""
    sequences = input_ids  # (N, L0)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    past = None
    new_tokens = input_ids
    while sequences.shape[1] < config.max_length:
        logits, past = step(new_tokens, past)  # (N, V)
        scores = logits.float()
        scores = apply_repetition_penalty(scores, sequences, config.repetition_penalty)
        scores = apply_min_length(scores, sequences.shape[1], config.min_length, config.eos_token_id)
        if config.do_sample:
            scores = top_k_top_p_filter(scores / config.temperature, config.top_k, config.top_p)
            probs = scores.softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
        else:
            next_token = scores.argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, config.pad_token_id), next_token)
        sequences = torch.cat([sequences, next_token[:, None]], dim=1)
        finished = finished | (next_token == config.eos_token_id)
        if bool(finished.all()):
            break
        new_tokens = next_token[:, None]
    return sequences


def beam_search(step: StepFn, reorder: ReorderFn, input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Beam search. `input_ids` is (B * num_beams, L0) with each item's beams contiguous (repeat_interleave).

    Returns (B * num_return_sequences, T) ids: best hypotheses first, eos appended when shorter than max_length,
    pad afterwards.
    """
    num_beams = config.num_beams
    total, _ = input_ids.shape
    if total % num_beams:
        raise ValueError(f"beam_search: {total} rows is not a multiple of num_beams={num_beams}")
    batch = total // num_beams
    device = input_ids.device
    beam_scores = torch.zeros(batch, num_beams, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only the first one may expand at step 0
    beam_scores = beam_scores.view(-1)  # (B * K,)
    hypotheses: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    sequences = input_ids
    new_tokens = input_ids
    past = None

    def add_hypothesis(item: int, tokens: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (tokens.shape[0] ** config.length_penalty)
        hyps = hypotheses[item]
        if len(hyps) < num_beams or score > min(s for s, _ in hyps):
            hyps.append((score, tokens))
            hyps.sort(key=lambda pair: pair[0], reverse=True)
            del hyps[num_beams:]

    def is_done(item: int, best_sum_logprobs: float, cur_len: int) -> bool:
        hyps = hypotheses[item]
        if len(hyps) < num_beams:
            return False
        return hyps[-1][0] >= best_sum_logprobs / (cur_len**config.length_penalty)

    while sequences.shape[1] < config.max_length:
        cur_len = sequences.shape[1]
        logits, past = step(new_tokens, past)  # (B * K, V)
        scores = torch.log_softmax(logits.float(), dim=-1)
        scores = apply_repetition_penalty(scores, sequences, config.repetition_penalty)
        scores = apply_min_length(scores, cur_len, config.min_length, config.eos_token_id)
        vocab = scores.shape[-1]
        scores = scores + beam_scores[:, None]  # (B * K, V)
        scores = scores.view(batch, num_beams * vocab)
        top_scores, top_index = torch.topk(scores, 2 * num_beams, dim=1)  # (B, 2K)
        top_beam = top_index // vocab
        top_token = top_index % vocab
        next_scores = torch.zeros(batch, num_beams, device=device)
        next_tokens = torch.full((batch, num_beams), config.pad_token_id, dtype=torch.long, device=device)
        next_rows = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
        top_scores_l, top_beam_l, top_token_l = top_scores.tolist(), top_beam.tolist(), top_token.tolist()
        for item in range(batch):
            if done[item]:
                next_rows[item] = item * num_beams  # keep shapes; these rows are ignored
                continue
            slot = 0
            candidates = zip(top_scores_l[item], top_beam_l[item], top_token_l[item])
            for rank, (score, beam, token) in enumerate(candidates):
                row = item * num_beams + beam
                if token == config.eos_token_id:
                    # HF rule: only an eos ranked within the first K candidates finishes a hypothesis
                    if rank < num_beams:
                        add_hypothesis(item, sequences[row].clone(), score)
                else:
                    next_scores[item, slot] = score
                    next_tokens[item, slot] = token
                    next_rows[item, slot] = row
                    slot += 1
                if slot == num_beams:
                    break
            done[item] = done[item] or is_done(item, max(top_scores_l[item]), cur_len)
        if all(done):
            break
        beam_scores = next_scores.view(-1)
        rows = next_rows.view(-1)
        sequences = torch.cat([sequences.index_select(0, rows), next_tokens.view(-1, 1)], dim=1)
        past = reorder(past, rows)
        new_tokens = next_tokens.view(-1, 1)

    # Open beams of unfinished items become hypotheses too.
    for item in range(batch):
        if done[item]:
            continue
        for beam in range(num_beams):
            row = item * num_beams + beam
            add_hypothesis(item, sequences[row].clone(), float(beam_scores[row]))

    best: list[torch.Tensor] = []
    for item in range(batch):
        for _, tokens in hypotheses[item][: config.num_return_sequences]:
            if tokens.shape[0] < config.max_length:
                tokens = torch.cat([tokens, tokens.new_tensor([config.eos_token_id])])
            best.append(tokens)
    length = max(tokens.shape[0] for tokens in best)
    output = torch.full((len(best), length), config.pad_token_id, dtype=torch.long, device=device)
    for index, tokens in enumerate(best):
        output[index, : tokens.shape[0]] = tokens
    return output


def generate(step: StepFn, reorder: ReorderFn, input_ids: torch.Tensor, config: GenerationConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Dispatch: sampling/greedy when `do_sample` or num_beams == 1, else beam search."""
    if config.do_sample or config.num_beams == 1:
        return sample(step, input_ids, config, generator)
    return beam_search(step, reorder, input_ids, config)
