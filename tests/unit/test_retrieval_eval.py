"""Batched BLIP retrieval re-ranking vs a per-query reference written here (BLIP `evaluation()` semantics)."""

from __future__ import annotations

import pytest
import torch

from pipelines.tasks.metrics import itm_eval
from pipelines.tasks.retrieval_eval import (
    retrieval_scores,
    retrieval_scores_from_sims,
    retrieval_scores_loop,
    similarity_matrix,
    split_rows,
)

NUM_IMAGES, NUM_TEXTS, DIM = 7, 23, 16


@pytest.fixture(scope="module")
def setup():
    generator = torch.Generator().manual_seed(0)
    image_embeds = torch.nn.functional.normalize(torch.randn(NUM_IMAGES, DIM, generator=generator), dim=-1)
    text_embeds = torch.nn.functional.normalize(torch.randn(NUM_TEXTS, DIM, generator=generator), dim=-1)
    itm_table = torch.randn(NUM_IMAGES, NUM_TEXTS, generator=generator) * 3  # the "ITM logit" of each pair
    calls: list[int] = []

    def itm_score_fn(image_indices: torch.Tensor, text_indices: torch.Tensor) -> torch.Tensor:
        calls.append(len(image_indices))
        return itm_table[image_indices, text_indices]

    return image_embeds, text_embeds, itm_table, itm_score_fn, calls


def reference(sims: torch.Tensor, itm_table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's loop, spelled out: top-k by cosine, score = ITM logit + cosine, everything else -100."""
    score_i2t = torch.full(sims.shape, -100.0)
    for i in range(sims.shape[0]):
        values, indices = sims[i].topk(min(k, sims.shape[1]))
        for value, j in zip(values.tolist(), indices.tolist()):
            score_i2t[i, j] = itm_table[i, j] + value
    score_t2i = torch.full(sims.T.shape, -100.0)
    for j in range(sims.shape[1]):
        values, indices = sims[:, j].topk(min(k, sims.shape[0]))
        for value, i in zip(values.tolist(), indices.tolist()):
            score_t2i[j, i] = itm_table[i, j] + value
    return score_i2t, score_t2i


@pytest.mark.parametrize("k_test", [1, 4, 256])
@pytest.mark.parametrize("pairs_per_batch", [1, 5, 1024])
@pytest.mark.parametrize("share_pairs", [True, False])
def test_batched_matches_reference(setup, k_test, pairs_per_batch, share_pairs):
    image_embeds, text_embeds, itm_table, itm_score_fn, _ = setup
    expected_i2t, expected_t2i = reference(image_embeds @ text_embeds.T, itm_table, k_test)
    result = retrieval_scores(image_embeds, text_embeds, itm_score_fn, k_test, pairs_per_batch=pairs_per_batch,
                              share_pairs=share_pairs)
    torch.testing.assert_close(result.score_i2t, expected_i2t, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.score_t2i, expected_t2i, rtol=0, atol=1e-6)
    # -100 everywhere outside the top-k: each row has exactly min(k, N) re-ranked entries.
    assert ((result.score_i2t > -100).sum(dim=1) == min(k_test, NUM_TEXTS)).all()
    assert ((result.score_t2i > -100).sum(dim=1) == min(k_test, NUM_IMAGES)).all()


def test_ranks_and_metrics_match_loop_reference(setup):
    image_embeds, text_embeds, _, itm_score_fn, _ = setup
    sims = similarity_matrix(image_embeds, text_embeds)
    batched = retrieval_scores_from_sims(sims, itm_score_fn, 5, pairs_per_batch=8)
    loop = retrieval_scores_loop(sims, itm_score_fn, 5)
    assert torch.equal(batched.score_i2t.argsort(dim=1), loop.score_i2t.argsort(dim=1))
    assert torch.equal(batched.score_t2i.argsort(dim=1), loop.score_t2i.argsort(dim=1))
    img2txt = [list(range(i, NUM_TEXTS, NUM_IMAGES)) for i in range(NUM_IMAGES)]
    txt2img = [t % NUM_IMAGES for t in range(NUM_TEXTS)]
    assert itm_eval(batched.score_i2t, batched.score_t2i, txt2img, img2txt) == itm_eval(
        loop.score_i2t, loop.score_t2i, txt2img, img2txt)
    assert loop.itm_calls == NUM_IMAGES + NUM_TEXTS


def test_shared_pairs_are_scored_once_in_batches(setup):
    image_embeds, text_embeds, _, itm_score_fn, calls = setup
    calls.clear()
    result = retrieval_scores(image_embeds, text_embeds, itm_score_fn, 4, pairs_per_batch=10)
    i2t_pairs = {(i, int(j)) for i in range(NUM_IMAGES)
                 for j in (image_embeds[i] @ text_embeds.T).topk(4).indices}
    t2i_pairs = {(int(i), j) for j in range(NUM_TEXTS) for i in (image_embeds @ text_embeds[j]).topk(4).indices}
    union = len(i2t_pairs | t2i_pairs)
    assert result.itm_pairs == union == sum(calls) < len(i2t_pairs) + len(t2i_pairs)
    assert result.itm_calls == len(calls) == -(-union // 10)
    assert max(calls) == 10


@pytest.mark.parametrize("workers", [3, 8])  # 8 > NUM_IMAGES: some workers get an empty image slice
def test_row_slices_sum_to_the_full_matrices(setup, workers):
    image_embeds, text_embeds, _, itm_score_fn, _ = setup
    full = retrieval_scores(image_embeds, text_embeds, itm_score_fn, 6)
    parts = [retrieval_scores(image_embeds, text_embeds, itm_score_fn, 6, image_rows=image_rows, text_rows=text_rows)
             for image_rows, text_rows in zip(split_rows(NUM_IMAGES, workers), split_rows(NUM_TEXTS, workers))]
    assert torch.equal(sum(p.score_i2t for p in parts), full.score_i2t)
    assert torch.equal(sum(p.score_t2i for p in parts), full.score_t2i)
    # Outside its slice a part is exactly zero, so an all_reduce(SUM) of parts is the full result.
    assert (parts[0].score_i2t[split_rows(NUM_IMAGES, workers)[1].start:] == 0).all()


def test_split_rows_covers_every_row_once():
    for rows, parts in [(10, 3), (5, 8), (0, 2), (25000, 16)]:
        ranges = split_rows(rows, parts)
        assert len(ranges) == parts
        assert [r for part in ranges for r in part] == list(range(rows))


def test_bad_scorer_and_arguments_are_rejected(setup):
    image_embeds, text_embeds, *_ = setup
    with pytest.raises(ValueError, match="itm_score_fn returned shape"):
        retrieval_scores(image_embeds, text_embeds, lambda i, t: torch.zeros(len(i), 2), 3)
    with pytest.raises(ValueError, match="k_test"):
        retrieval_scores(image_embeds, text_embeds, lambda i, t: torch.zeros(len(i)), 0)
    with pytest.raises(ValueError, match="image_rows"):
        retrieval_scores(image_embeds, text_embeds, lambda i, t: torch.zeros(len(i)), 3, image_rows=range(0, 99))
    with pytest.raises(ValueError, match="embeddings"):
        similarity_matrix(image_embeds, text_embeds[:, :4])
