"""ITM re-ranking with per-image cached cross-attention keys/values (`precompute_cross_kv`, `itm_logits_cached`,
`itm_logits_grouped`, `retrieval_eval.itm_score_fn_for`) against the uncached `itm_logits` and BLIP's per-query loop.
Tiny preset, fp32, random weights."""

from __future__ import annotations

import pytest
import torch

from blip_models.configuration_blip import preset
from blip_models.modeling_itm import BlipITM
from blip_models.modeling_retrieval import BlipRetrieval
from pipelines.tasks.retrieval_eval import (
    group_pairs,
    itm_score_fn_for,
    retrieval_scores,
    retrieval_scores_from_sims,
    retrieval_scores_loop,
    similarity_matrix,
    uncached_itm_score_fn_for,
)

NUM_IMAGES, NUM_TEXTS, LENGTH = 6, 17, 35
TOLERANCE = 1e-5


def padded_texts(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`[CLS] w… [SEP]` padded to 35 like BLIP's retrieval texts, 4 to 20 real tokens."""
    input_ids = torch.zeros(NUM_TEXTS, LENGTH, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row in range(NUM_TEXTS):
        length = int(torch.randint(4, 21, (1,), generator=generator))
        input_ids[row, :length] = torch.randint(1000, 5000, (length,), generator=generator)
        input_ids[row, 0], input_ids[row, length - 1] = 101, 102
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny forwards: on a shared 2-core machine, spinning OpenMP threads cost 10-50x their work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[BlipRetrieval, BlipITM])
def encoded(request):
    torch.manual_seed(0)
    model = request.param(preset("tiny")).eval()
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(NUM_IMAGES, 3, 32, 32, generator=generator)
    input_ids, attention_mask = padded_texts(generator)
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixels)  # (N_img, 17, 32)
        image_feats = torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
        text_out = model.text_encoder(input_ids, attention_mask, mode="text").last_hidden_state[:, 0]
        text_feats = torch.nn.functional.normalize(model.text_proj(text_out), dim=-1)
    return model, image_embeds, input_ids, attention_mask, image_feats, text_feats


def test_cached_logits_equal_uncached(encoded):
    model, image_embeds, input_ids, attention_mask, *_ = encoded
    image_index = torch.tensor([0, 5, 5, 2, 0, 1, 3, 3, 4, 5, 0, 2, 1, 4, 4, 3, 2])  # repeats, any order
    with torch.no_grad():
        reference = model.itm_logits(image_embeds[image_index], input_ids, attention_mask)  # (17, 2)
        cross_kv = model.precompute_cross_kv(image_embeds)
        cached = model.itm_logits_cached(cross_kv, image_index, input_ids, attention_mask)
    assert len(cross_kv) == model.config.text.num_hidden_layers
    heads = model.config.text.num_attention_heads
    assert cross_kv[0][0].shape == (NUM_IMAGES, heads, image_embeds.shape[1], model.config.text.hidden_size // heads)
    assert cached.shape == reference.shape == (NUM_TEXTS, 2)
    assert torch.allclose(cached, reference, atol=TOLERANCE, rtol=0)


def test_grouped_logits_equal_uncached(encoded):
    model, image_embeds, input_ids, attention_mask, *_ = encoded
    texts = torch.arange(16)  # 4 rows (images 3, 0, 3, 5) × 4 texts each
    rows = torch.tensor([3, 0, 3, 5])
    with torch.no_grad():
        reference = model.itm_logits(image_embeds[rows.repeat_interleave(4)], input_ids[texts], attention_mask[texts])
        cross_kv = tuple((key[rows], value[rows]) for key, value in model.precompute_cross_kv(image_embeds))
        grouped = model.itm_logits_grouped(cross_kv, input_ids[texts], attention_mask[texts])
        with pytest.raises(ValueError, match="equal image groups"):
            model.itm_logits_grouped(cross_kv, input_ids[:15], attention_mask[:15])
    assert torch.allclose(grouped, reference, atol=TOLERANCE, rtol=0)


def test_group_pairs_layout():
    image_index = torch.tensor([4, 1, 4, 4, 9, 1, 4, 4, 4, 4, 2])
    images, row_image, slot, group = group_pairs(image_index)
    assert images.tolist() == [1, 2, 4, 9] and group == 2  # 7 rows, 14 slots: the least slots + rows
    assert len(set(slot.tolist())) == len(image_index)  # one slot per pair
    assert torch.equal(images[row_image[slot // group]], image_index)  # the slot's row holds the pair's image
    images, row_image, slot, group = group_pairs(torch.tensor([3, 3, 3, 0, 0, 0]))
    assert group == 3 and row_image.tolist() == [0, 1] and slot.tolist() == [3, 4, 5, 0, 1, 2]  # no padding


@pytest.mark.parametrize("max_cached_images, share_pairs", [(None, True), (0, False), (2, True)])
def test_retrieval_scores_with_cached_scorer_equal_reference_loop(encoded, max_cached_images, share_pairs):
    model, image_embeds, input_ids, attention_mask, image_feats, text_feats = encoded
    sims = similarity_matrix(image_feats, text_feats)
    k_test = 4
    reference = retrieval_scores_loop(sims, uncached_itm_score_fn_for(model, image_embeds, input_ids, attention_mask),
                                      k_test)
    scorer = itm_score_fn_for(model, image_embeds, input_ids, attention_mask, max_cached_images=max_cached_images)
    scores = retrieval_scores(image_feats, text_feats, scorer, k_test, pairs_per_batch=7, share_pairs=share_pairs)
    assert torch.allclose(scores.score_i2t, reference.score_i2t, atol=TOLERANCE, rtol=0)
    assert torch.allclose(scores.score_t2i, reference.score_t2i, atol=TOLERANCE, rtol=0)
    assert (scores.score_i2t == -100).sum() == (reference.score_i2t == -100).sum()


@pytest.mark.parametrize("max_cached_images, projected", [(1, NUM_IMAGES), (None, NUM_IMAGES)])
def test_each_image_is_projected_once_with_image_sorted_pairs(encoded, max_cached_images, projected):
    """`share_pairs` sends pairs sorted by image: a cache of one image is enough to project each image once."""
    model, image_embeds, input_ids, attention_mask, image_feats, text_feats = encoded
    seen: list[int] = []

    class Counting:  # the real model; only counts the images it projects
        def precompute_cross_kv(self, embeds):
            seen.append(len(embeds))
            return model.precompute_cross_kv(embeds)

        def itm_logits_grouped(self, *args):
            return model.itm_logits_grouped(*args)

    scorer = itm_score_fn_for(Counting(), image_embeds, input_ids, attention_mask,  # type: ignore[arg-type]
                              max_cached_images=max_cached_images)
    retrieval_scores_from_sims(similarity_matrix(image_feats, text_feats), scorer, 4, pairs_per_batch=5)
    assert sum(seen) == projected


def test_bad_arguments_are_rejected(encoded):
    model, image_embeds, input_ids, attention_mask, *_ = encoded
    none = torch.empty(0, dtype=torch.long)
    assert itm_score_fn_for(model, image_embeds, input_ids, attention_mask)(none, none).shape == (0,)
    with pytest.raises(ValueError, match="max_cached_images"):
        itm_score_fn_for(model, image_embeds, input_ids, attention_mask, max_cached_images=-1)
    with pytest.raises(ValueError, match="image_embeds"):
        itm_score_fn_for(model, image_embeds[:, 0], input_ids, attention_mask)
    with pytest.raises(ValueError, match="text_ids and text_mask"):
        uncached_itm_score_fn_for(model, image_embeds, input_ids, attention_mask[:, :5])
