"""Task models on tiny configs: retrieval, ITM, captioning, VQA, NLVR2, features; official top-level names."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from blip_models import MODEL_CLASSES, build_model, model_class
from blip_models.configuration_blip import preset
from tests.unit._blip_tiny import (
    MICRO_BOS,
    MICRO_ENC,
    MICRO_SEP,
    assert_shared_cross_kv_matches_reference,
    micro_batch,
    micro_config,
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=1)
def tokenizer():
    from blip_models.tokenizer import load_tokenizer

    return load_tokenizer()


def top_level(model: torch.nn.Module) -> set[str]:
    return {key.split(".")[0] for key in model.state_dict()}


def test_model_classes_and_official_top_level_names():
    assert set(MODEL_CLASSES) == {"pretrain", "retrieval", "itm", "caption", "vqa", "nlvr", "features"}
    with pytest.raises(ValueError, match="unknown BLIP task"):
        model_class("segmentation")
    config = micro_config()
    expected = {
        "pretrain": {"visual_encoder", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head", "temp",
                     "visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m", "image_queue", "text_queue",
                     "queue_ptr"},
        "retrieval": {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "temp",
                      "visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m", "image_queue", "text_queue",
                      "idx_queue", "ptr_queue"},
        "itm": {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"},
        "vqa": {"visual_encoder", "text_encoder", "text_decoder"},
        "nlvr": {"visual_encoder", "text_encoder", "cls_head"},
        "features": {"visual_encoder", "text_encoder", "vision_proj", "text_proj"},
    }  # fmt: skip
    for task, names in expected.items():
        assert top_level(build_model(task, config)) == names, task
    assert top_level(model_class("caption")(config, tokenizer())) == {"visual_encoder", "text_decoder"}


def test_retrieval_trains_with_image_id_positives_and_idx_queue():
    torch.manual_seed(0)
    model = build_model("retrieval", micro_config(queue_size=8))
    pixel_values, input_ids, attention_mask = micro_batch(4)
    image_ids = torch.tensor([5, 5, 6, 7])
    output = model(pixel_values, input_ids, attention_mask, image_ids)
    output.loss.backward()
    assert torch.isfinite(output.loss) and model.visual_encoder.cls_token.grad is not None
    assert int(model.ptr_queue) == 4
    assert model.idx_queue[0, :4].tolist() == [5, 5, 6, 7] and model.idx_queue[0, 4:].tolist() == [-100] * 4
    scores = model.score(pixel_values, input_ids, attention_mask)
    assert scores.shape == (4,)
    # One image in the batch: no negative exists. The model draws from the unmasked weights (finding out would
    # cost a host sync every step); the retrieval task refuses such batches before they get here.
    degenerate = model(pixel_values[:2], input_ids[:2], attention_mask[:2], torch.tensor([1, 1]))
    assert torch.isfinite(degenerate.loss)


def test_retrieval_shared_image_keys_give_blip_losses_and_gradients():
    """ITM pairs with each image's cross-attention keys/values projected once == BLIP's per-pair projection."""
    torch.manual_seed(0)
    model = build_model("retrieval", micro_config(queue_size=8)).eval()  # eval: no dropout draws
    pixel_values, input_ids, attention_mask = micro_batch(6)
    image_ids = torch.tensor([5, 5, 6, 7, 8, 8])
    assert_shared_cross_kv_matches_reference(model, lambda m: m(pixel_values, input_ids, attention_mask, image_ids),
                                             ("loss_itc", "loss_itm"))  # fmt: skip


def test_itm_heads_use_enc_token():
    torch.manual_seed(0)
    model = build_model("itm", micro_config()).eval()
    pixel_values, input_ids, attention_mask = micro_batch(3)
    output = model(pixel_values, input_ids, attention_mask, match_head="both", labels=torch.tensor([1, 0, 1]))
    assert output.itm_logits.shape == (3, 2) and output.itc_similarity.shape == (3,) and output.loss > 0
    assert torch.all(output.itc_similarity.abs() <= 1 + 1e-5)
    probability = model.itm_probability(pixel_values, input_ids, attention_mask)
    assert torch.allclose(probability, output.itm_logits.softmax(-1)[:, 1])
    # the ITM head reads [ENC]-first ids: feeding [ENC] already in place gives the same logits
    enc_ids = input_ids.clone()
    enc_ids[:, 0] = MICRO_ENC
    image_embeds = model.visual_encoder(pixel_values)
    assert torch.allclose(model.itm_logits(image_embeds, enc_ids, attention_mask), output.itm_logits, atol=1e-5)


def test_caption_loss_masks_prompt_and_overfits():
    torch.manual_seed(0)
    model = model_class("caption")(micro_config(vision={"image_size": 16}), tokenizer())
    assert model.prompt_length == 4  # [DEC] a picture of
    pixel_values, input_ids, attention_mask = micro_batch(4, length=9, image_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(25):
        loss = model(pixel_values, input_ids, attention_mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0]
    # the loss ignores pads and the first prompt_length positions
    from blip_models.med import lm_loss

    with torch.no_grad():
        output = model(pixel_values, input_ids, attention_mask)
        targets = input_ids.clone()
        targets[:, 0] = MICRO_BOS
        targets = targets.masked_fill(targets == 0, -100)
        targets[:, :4] = -100
        assert torch.allclose(output.loss, lm_loss(output.logits, targets, 0.1), atol=1e-6)


def test_caption_generation_strings_and_lengths():
    torch.manual_seed(0)
    tok = tokenizer()
    model = model_class("caption")(preset("tiny"), tok).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    beam = model.generate(pixel_values, tok, num_beams=3, max_length=12, min_length=8)
    assert len(beam) == 2 and all(isinstance(caption, str) and caption for caption in beam)
    sampled_a = model.generate(pixel_values, tok, do_sample=True, max_length=12, min_length=8,
                               num_return_sequences=2, generator=torch.Generator().manual_seed(3))  # fmt: skip
    sampled_b = model.generate(pixel_values, tok, do_sample=True, max_length=12, min_length=8,
                               num_return_sequences=2, generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert sampled_a == sampled_b and len(sampled_a) == 4
    prompt_ids = tok(["a picture of "], return_tensors="pt").input_ids[:, :-1]
    prompt_ids[:, 0] = 30522
    for kwargs in ({"num_beams": 3}, {"do_sample": True, "generator": torch.Generator().manual_seed(0)}):
        ids = model.generate_ids(pixel_values, prompt_ids, max_length=10, min_length=7, **kwargs)
        assert ids.shape[1] <= 10 and torch.all(ids[:, :4] == prompt_ids)
        for row in ids.tolist():
            end = row.index(102) if 102 in row else len(row)
            assert end >= 7  # min_length counts the 4 prompt tokens


def test_caption_generation_micro_vocab_respects_min_length():
    torch.manual_seed(0)
    model = model_class("caption")(micro_config(), tokenizer()).eval()
    prompt_ids = torch.tensor([[MICRO_BOS, 7, 8]])
    ids = model.generate_ids(torch.randn(3, 3, 32, 32), prompt_ids, num_beams=2, max_length=9, min_length=6,
                             num_return_sequences=2)  # fmt: skip
    assert ids.shape[0] == 6 and ids.shape[1] <= 9
    for row in ids.tolist():
        if MICRO_SEP in row:
            assert row.index(MICRO_SEP) >= 6


def test_vqa_training_rank_and_generate():
    torch.manual_seed(0)
    tok = tokenizer()
    model = build_model("vqa", preset("tiny"))
    assert model.visual_encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.in_features == 32
    pixel_values = torch.randn(2, 3, 32, 32)
    question_ids, question_mask = model.prepare_question(tok, ["what is it?", "how many dogs"])
    answer_ids, answer_mask = model.prepare_answers(tok, ["yes", "no", "two dogs"])
    assert torch.all(answer_ids[:, 0] == 30522)
    output = model(pixel_values, question_ids, question_mask, answer_ids, answer_mask,
                   torch.tensor([1.0, 0.5, 0.5]), [1, 2])  # fmt: skip
    output.loss.backward()
    assert torch.isfinite(output.loss) and output.loss > 0
    model.eval()
    answers = ["yes", "no", "two dogs", "red"]
    ranked = model.answer(pixel_values, question_ids, question_mask, tok, mode="rank", answer_list=answers, k_test=3)
    assert len(ranked) == 2 and all(answer in answers for answer in ranked)
    generated = model.answer(pixel_values, question_ids, question_mask, tok, mode="generate", max_length=5)
    assert len(generated) == 2 and all(isinstance(answer, str) for answer in generated)
    with pytest.raises(ValueError, match="answer_list"):
        model.answer(pixel_values, question_ids, question_mask, tok, mode="rank")


def test_vqa_rank_picks_the_lowest_loss_candidate():
    torch.manual_seed(0)
    model = build_model("vqa", micro_config()).eval()
    states = torch.randn(1, 4, 32)
    mask = torch.ones(1, 4, dtype=torch.long)
    answer_ids = torch.tensor([[MICRO_BOS, 10, MICRO_SEP], [MICRO_BOS, 11, MICRO_SEP], [MICRO_BOS, 12, MICRO_SEP]])
    answer_mask = torch.ones_like(answer_ids)
    best = model.rank_answers(states, mask, answer_ids, answer_mask, k=3)
    losses = model.text_decoder(answer_ids, answer_mask, states.expand(3, -1, -1), mask.expand(3, -1),
                                labels=answer_ids, reduction="none").loss  # fmt: skip
    assert int(best) == int(losses.argmin())


def test_nlvr_forward_backward_and_names():
    torch.manual_seed(0)
    config = micro_config()
    model = build_model("nlvr", config)
    names = set(model.state_dict())
    assert "text_encoder.encoder.layer.0.crossattention.self0.query.weight" in names
    assert "text_encoder.encoder.layer.0.crossattention.self1.key.weight" in names
    assert "text_encoder.encoder.layer.0.crossattention.output.dense0.weight" in names
    assert "text_encoder.encoder.layer.0.crossattention.output.merge_layer.weight" not in names
    assert "text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight" in names
    assert {"cls_head.0.weight", "cls_head.2.bias"} <= names
    left, input_ids, attention_mask = micro_batch(3)
    right = torch.randn_like(left)
    output = model(left, right, input_ids, attention_mask, labels=torch.tensor([0, 1, 1]))
    output.loss.backward()
    assert output.logits.shape == (3, 2)
    layer1 = model.text_encoder.encoder.layer[1].crossattention
    assert layer1.self1.query.weight.grad is not None and layer1.output.merge_layer.weight.grad is not None
    model.eval()
    with torch.no_grad():
        swapped = model(right, left, input_ids, attention_mask).logits
        same = model(left, right, input_ids, attention_mask).logits
    assert not torch.allclose(swapped, same)  # the two branches are distinct


def test_feature_extractor_modes():
    torch.manual_seed(0)
    model = build_model("features", micro_config()).eval()
    pixel_values, input_ids, attention_mask = micro_batch(2)
    image = model(pixel_values, mode="image")
    text = model(input_ids=input_ids, attention_mask=attention_mask, mode="text")
    multimodal = model.extract_features(pixel_values, input_ids, attention_mask, mode="multimodal")
    assert image.image_embeds.shape == (2, 17, 32) and image.image_embeds_proj.shape == (2, 16)
    assert torch.allclose(text.text_embeds_proj.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert multimodal.multimodal_embeds.shape == (2, 10, 32)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(pixel_values, mode="multimodal")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward(dtype):
    torch.manual_seed(0)
    model = build_model("pretrain", micro_config())
    pixel_values, input_ids, attention_mask = micro_batch(4)
    with torch.autocast("cpu", dtype=dtype):
        output = model(pixel_values, input_ids, attention_mask)
    output.loss.backward()
    assert torch.isfinite(output.loss) and output.loss_itc.dtype == torch.float32


def _attention_by_hand(branch, hidden, image, additive_mask):
    """softmax(q kᵀ / √d + mask) v with plain tensor ops, heads split and merged as in BERT."""
    batch, length, width = hidden.shape
    heads = branch.num_heads
    split = lambda x: x.view(batch, x.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    query, key, value = split(branch.query(hidden)), split(branch.key(image)), split(branch.value(image))
    scores = query @ key.transpose(-1, -2) / (width // heads) ** 0.5 + additive_mask  # (B, h, L, S)
    return (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, length, width)


def test_nlvr_twin_cross_attention_averages_then_merges_by_hand():
    """First half of the layers: LN((dense0(x0) + dense1(x1)) / 2 + h); second half: LN(merge_layer([dense0(x0);
    dense1(x1)]) + h), x_i the cross-attention of branch self_i over image i (BLIP nlvr_encoder.py)."""
    torch.manual_seed(0)
    config = micro_config(text={"num_hidden_layers": 4})
    model = build_model("nlvr", config).eval()
    layers = model.text_encoder.encoder.layer
    assert [layer.crossattention.output.merge for layer in layers] == [False, False, True, True]
    hidden = torch.randn(2, 5, config.text.hidden_size)
    images = (torch.randn(2, 7, config.vision.width), torch.randn(2, 7, config.vision.width))
    masks = (torch.zeros(2, 1, 1, 7), torch.zeros(2, 1, 1, 7))
    masks[1][0, ..., 4:] = torch.finfo(torch.float32).min  # the right image of pair 0 has padding: per-branch masks
    with torch.no_grad():
        for index, layer in enumerate(layers):
            twin = layer.crossattention
            out = twin.output
            left = out.dense0(_attention_by_hand(twin.self0, hidden, images[0], masks[0]))
            right = out.dense1(_attention_by_hand(twin.self1, hidden, images[1], masks[1]))
            mixed = out.merge_layer(torch.cat([left, right], dim=-1)) if index >= 2 else (left + right) / 2
            expected = out.LayerNorm(mixed + hidden)
            actual, _ = twin(hidden, masks, images)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"layer {index}")


def test_nlvr_sends_the_left_image_to_self0_and_the_right_to_self1():
    torch.manual_seed(0)
    model = build_model("nlvr", micro_config()).eval()
    left, input_ids, attention_mask = micro_batch(2)
    right = torch.randn_like(left)
    seen = {}
    for name in ("self0", "self1"):
        branch = getattr(model.text_encoder.encoder.layer[0].crossattention, name)
        branch.register_forward_hook(lambda module, args, output, name=name: seen.update({name: args[2]}))  # None: output kept
    with torch.no_grad():
        model(left, right, input_ids, attention_mask)
        torch.testing.assert_close(seen["self0"], model.visual_encoder(left), rtol=0, atol=0)
        torch.testing.assert_close(seen["self1"], model.visual_encoder(right), rtol=0, atol=0)
