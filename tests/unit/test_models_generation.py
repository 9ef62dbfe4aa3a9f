"""Our decoding loop on a toy Markov "model": exact beam search, sampling, length limits, penalties."""

from __future__ import annotations

import itertools

import pytest
import torch

from blip_models.generation import (
    GenerationConfig,
    apply_repetition_penalty,
    beam_search,
    sample,
    top_k_top_p_filter,
)

VOCAB, BOS, EOS, PAD = 6, 1, 2, 0


def markov(seed: int, scale: float = 2.0):
    """step/reorder pair whose next-token logits depend on the last token only; counts calls and cache use."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    table[:, PAD] = -1e4  # the model never wants pad / bos
    table[:, BOS] = -1e4

    def step(new_tokens, past):
        history = new_tokens if past is None else torch.cat([past, new_tokens], dim=1)
        return table[history[:, -1]], history

    def reorder(past, index):
        return past.index_select(0, index)

    return table, step, reorder


def brute_force_best(table, prompt, max_length, min_length):
    log_probs = table.log_softmax(dim=-1)
    best, best_score = None, -float("inf")
    new_max = max_length - len(prompt)
    for length in range(1, new_max + 1):
        for tail in itertools.product(range(VOCAB), repeat=length):
            seq = list(prompt) + list(tail)
            if any(token in (PAD, BOS) for token in tail):
                continue
            if EOS in tail[:-1]:
                continue
            ends = tail[-1] == EOS
            if not ends and len(seq) < max_length:
                continue
            if ends and len(seq) - 1 < min_length:
                continue  # eos banned before min_length
            score = sum(float(log_probs[a, b]) for a, b in zip(seq[:-1], seq[1:]))
            if score > best_score:
                best, best_score = seq, score
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_search_finds_the_exact_best_sequence(seed):
    table, step, reorder = markov(seed)
    config = GenerationConfig(max_length=5, min_length=3, num_beams=64, length_penalty=0.0, eos_token_id=EOS,
                              pad_token_id=PAD)  # fmt: skip
    prompt = [BOS, 3]
    input_ids = torch.tensor([prompt] * 64)
    output = beam_search(step, reorder, input_ids, config)[0].tolist()
    expected = brute_force_best(table, prompt, 5, 3)
    assert output[: len(expected)] == expected
    assert all(token == PAD for token in output[len(expected) :])


def test_beam_search_batches_items_independently_and_returns_k_sequences():
    _, step, reorder = markov(3)
    config = GenerationConfig(max_length=6, min_length=2, num_beams=3, num_return_sequences=2, eos_token_id=EOS)
    single = [beam_search(step, reorder, torch.tensor([[BOS, t]] * 3), config) for t in (3, 4)]
    batched = beam_search(step, reorder, torch.tensor([[BOS, 3]] * 3 + [[BOS, 4]] * 3), config)
    assert batched.shape[0] == 4
    for index, alone in enumerate(single):
        rows = batched[2 * index : 2 * index + 2, : alone.shape[1]]
        assert torch.equal(rows, alone)


def test_sampling_is_seeded_and_respects_lengths():
    _, step, _ = markov(4, scale=0.3)
    config = GenerationConfig(max_length=7, min_length=5, do_sample=True, top_p=0.9, eos_token_id=EOS)
    input_ids = torch.tensor([[BOS, 3]] * 16)
    out_a = sample(step, input_ids, config, torch.Generator().manual_seed(11))
    out_b = sample(step, input_ids, config, torch.Generator().manual_seed(11))
    out_c = sample(step, input_ids, config, torch.Generator().manual_seed(12))
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out_c)
    assert out_a.shape[1] <= 7
    for row in out_a.tolist():
        if EOS in row:
            end = row.index(EOS)
            assert end >= 5  # eos only once the sequence (prompt included) has min_length tokens
            assert all(token == PAD for token in row[end + 1 :])
        assert PAD not in row[: row.index(EOS) if EOS in row else len(row)]


def test_tiny_top_p_is_greedy():
    _, step, _ = markov(5)
    greedy = sample(step, torch.tensor([[BOS, 3]]), GenerationConfig(max_length=8, min_length=0, eos_token_id=EOS))
    nucleus = sample(step, torch.tensor([[BOS, 3]]),
                     GenerationConfig(max_length=8, min_length=0, do_sample=True, top_p=1e-6, eos_token_id=EOS),
                     torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(greedy, nucleus)


def test_top_p_keeps_the_smallest_nucleus():
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(top_k_top_p_filter(scores, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_k_top_p_filter(scores, 1, 1.0))
    assert kept.tolist() == [[True, False, False, False]]
    # top-k first, then the nucleus of the distribution renormalised over the k: above the 2nd token lies 0.5 of
    # the full row but 0.5 / 0.95 = 0.526 of the top 3, so top-p 0.5 keeps it only without top-k
    assert torch.isfinite(top_k_top_p_filter(scores, 0, 0.5)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_k_top_p_filter(scores, 3, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_k_top_p_filter(scores, 3, 0.53)).tolist() == [[True, True, False, False]]


def test_top_k_then_top_p_matches_the_warpers_on_the_full_vocabulary():
    """The (N, k) path equals transformers' TopK warper (mask below the k-th score) then TopP over the full row."""
    generator = torch.Generator().manual_seed(0)
    for scale in (0.3, 3.0, 12.0):
        scores = torch.randn(8, 500, generator=generator) * scale
        masked = scores.masked_fill(scores < scores.topk(50, dim=-1).values[:, -1:], -float("inf"))
        reference = top_k_top_p_filter(masked, 0, 0.9)  # full sort of the masked row
        fast = top_k_top_p_filter(scores, 50, 0.9)
        assert torch.equal(torch.isfinite(fast), torch.isfinite(reference))
        assert torch.equal(fast[torch.isfinite(fast)], scores[torch.isfinite(reference)])


def test_repetition_penalty():
    scores = torch.tensor([[2.0, -2.0, 1.0]])
    penalised = apply_repetition_penalty(scores, torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]


def test_invalid_generation_config():
    with pytest.raises(ValueError, match="min_length"):
        GenerationConfig(max_length=3, min_length=5)
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_beams=2, num_return_sequences=3)
