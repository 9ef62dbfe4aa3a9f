"""LAVIS's calls on what `load_model_and_preprocess` returns (`lavis_compat.LavisModel`): each gives what our
model's own methods give for the same inputs, in LAVIS's shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip_models import checkpoints as ck
from blip_models.configuration_blip import preset
from blip_models.lavis_compat import LavisModel
from blip_models.tokenizer import load_tokenizer, tokenize

TEXTS = ["a red square on grass", "two dogs"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _wrapped(kind, tokenizer):
    torch.manual_seed(0)
    return LavisModel(ck.build_model(kind, preset("tiny")).eval(), kind, tokenizer).eval()


def test_caption_generate_as_lavis(tokenizer, pixels):
    model = _wrapped("caption", tokenizer)
    captions = model.generate({"image": pixels}, max_length=12, min_length=3)
    assert captions == model.model.generate(pixels, tokenizer, num_beams=3, max_length=12, min_length=3,
                                            repetition_penalty=1.0)  # fmt: skip
    sampled = model.generate({"image": pixels}, use_nucleus_sampling=True, num_captions=3, max_length=12)
    assert len(sampled) == 2 * 3 and all(isinstance(caption, str) for caption in sampled)
    assert model.config is model.model.config  # the wrapped model's attributes
    with pytest.raises(TypeError, match="predict_answers: LAVIS's BLIP vqa models have it; this is a 'caption'"):
        model.predict_answers({"image": pixels, "text_input": TEXTS})


def test_features_and_itm_as_lavis(tokenizer, pixels):
    features = _wrapped("features", tokenizer)
    image = features.extract_features({"image": pixels}, mode="image")
    text = features.extract_features({"text_input": TEXTS}, mode="text")
    ids, mask = tokenize(tokenizer, TEXTS, 35, padding="longest")
    ours_image = features.model(pixel_values=pixels, mode="image")
    ours_text = features.model(input_ids=ids, attention_mask=mask, mode="text")
    assert image.image_embeds_proj.shape[:2] == image.image_embeds.shape[:2] == (2, 1 + 4 * 4)
    torch.testing.assert_close(image.image_embeds_proj[:, 0, :], ours_image.image_embeds_proj)  # LAVIS's [:, 0, :]
    torch.testing.assert_close(text.text_embeds_proj[:, 0, :], ours_text.text_embeds_proj)
    multimodal = features.extract_features({"image": pixels, "text_input": TEXTS})
    ours = features.model(pixel_values=pixels, input_ids=ids, attention_mask=mask, mode="multimodal")
    torch.testing.assert_close(multimodal.multimodal_embeds, ours.multimodal_embeds)

    itm = _wrapped("itm", tokenizer)
    logits = itm({"image": pixels, "text_input": TEXTS}, match_head="itm")
    image_embeds = itm.model.visual_encoder(pixels)
    torch.testing.assert_close(logits, itm.model.itm_logits(image_embeds, ids, mask))
    similarity = itm({"image": pixels, "text_input": TEXTS}, match_head="itc")
    assert similarity.shape == (2, 2)
    torch.testing.assert_close(similarity.diagonal(), itm.model.itc_similarity(image_embeds, ids, mask))
    assert F.softmax(logits, dim=1).shape == (2, 2)
    with pytest.raises(ValueError, match="match_head must be 'itm' or 'itc'"):
        itm({"image": pixels, "text_input": TEXTS}, match_head="both")


def test_vqa_predict_answers_as_lavis(tokenizer, pixels):
    model = _wrapped("vqa", tokenizer)
    questions = ["what colour is it?", "how many dogs?"]
    answers = ["red", "two", "blue"]
    ranked = model.predict_answers({"image": pixels, "text_input": questions}, answer_list=answers)
    ids, mask = model.model.prepare_question(tokenizer, questions)
    assert ranked == model.model.answer(pixels, ids, mask, tokenizer, answer_list=answers)
    generated = model.predict_answers({"image": pixels, "text_input": questions}, inference_method="generate")
    assert len(generated) == 2
    with pytest.raises(ValueError, match="needs answer_list"):
        model.predict_answers({"image": pixels, "text_input": questions})


def test_compute_gradcam_as_lavis(tokenizer, pixels):
    """LAVIS's layout per pair: [ENC]'s map, the words' average, then every position after [ENC] (padding zero);
    the same maps as `inference.gradcam` names by word."""
    from blip_models.inference import gradcam
    from blip_models.lavis_compat import compute_gradcam

    model = _wrapped("itm", tokenizer)
    text = "a red square"
    tokens = model.tokenizer([text, "two dogs on a big lawn"], return_tensors="pt", padding="longest")
    maps, logits = compute_gradcam(model, pixels, [text, "two dogs on a big lawn"], tokens, block_num=0)
    assert logits.shape == (2, 2) and len(maps) == 2
    assert maps[0].shape == (2 + tokens["input_ids"].shape[1] - 1, 4, 4)
    (named,) = gradcam(model.model, tokenizer, pixels[:1], [text], block=0)
    torch.testing.assert_close(maps[0][1], named.average)
    torch.testing.assert_close(maps[0][2 : 2 + len(named.tokens)], named.per_token)
    assert maps[0][2 + len(named.tokens) + 1 :].abs().sum() == 0  # [SEP] is kept, the padding after it is zero


def test_training_forwards_and_nlvr_predict_as_lavis(tokenizer, pixels):
    """LAVIS's `model(samples)` of the caption, VQA and NLVR2 models is the loss our models compute from the same
    tokens (and back-propagates); NLVR2's `predict` gives LAVIS's {"predictions", "targets"}."""
    caption = _wrapped("caption", tokenizer).train()
    texts = ["a picture of " + text for text in TEXTS]  # what the train text processor returns
    output = caption({"image": pixels, "text_input": texts})
    ids, mask = caption.model.prepare_text(tokenizer, TEXTS, 40)
    torch.manual_seed(1)  # dropout: the same draws for both
    loss = caption({"image": pixels, "text_input": texts}).loss
    torch.manual_seed(1)
    torch.testing.assert_close(loss, caption.model(pixels, ids, mask).loss)
    output.loss.backward()
    assert caption.model.text_decoder.cls.predictions.decoder.weight.grad is not None

    vqa = _wrapped("vqa", tokenizer)
    questions, answers = ["what colour is it?", "how many dogs?"], ["red", "blue", "two"]
    loss = vqa({"image": pixels, "text_input": questions, "answer": answers, "weight": torch.tensor([0.5, 0.5, 1.0]),
                "n_answers": torch.tensor([2, 1])}).loss  # fmt: skip
    q_ids, q_mask = vqa.model.prepare_question(tokenizer, questions)
    a_ids, a_mask = vqa.model.prepare_answers(tokenizer, answers)
    torch.testing.assert_close(loss, vqa.model(pixels, q_ids, q_mask, a_ids, a_mask, torch.tensor([0.5, 0.5, 1.0]),
                                               [2, 1]).loss)  # fmt: skip

    nlvr = _wrapped("nlvr", tokenizer)
    right = pixels.flip(0)
    samples = {"image0": pixels, "image1": right, "text_input": TEXTS, "label": torch.tensor([0, 1])}
    predicted = nlvr.predict(samples)
    n_ids, n_mask = tokenize(tokenizer, TEXTS, None, padding="longest")
    expected = nlvr.model(pixels, right, n_ids, n_mask)
    torch.testing.assert_close(predicted["predictions"], expected.logits)
    assert predicted["targets"].tolist() == [0, 1]
    trained = nlvr(samples)
    torch.testing.assert_close(trained.loss, F.cross_entropy(expected.logits, torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="needs samples\\['label'\\]"):
        nlvr({key: value for key, value in samples.items() if key != "label"})
    with pytest.raises(TypeError, match="predict: LAVIS's BLIP nlvr models have it; this is a 'vqa'"):
        vqa.predict(samples)
    with pytest.raises(TypeError, match="forward\\(samples\\): .* this is a 'features' model"):
        _wrapped("features", tokenizer)({"image": pixels, "text_input": TEXTS})


@pytest.mark.parametrize("kind", ["pretrain", "retrieval"])
def test_pretraining_and_retrieval_training_forwards_ramp_alpha_as_lavis(kind, tokenizer, pixels):
    """LAVIS's pretraining / retrieval `forward(samples)`: the model's loss at LAVIS's ramped distillation weight
    (over one epoch for pretraining, two for retrieval); the momentum state moves as the model's own step moves it."""
    import copy

    wrapped = _wrapped(kind, tokenizer).train()
    twin = copy.deepcopy(wrapped.model)
    samples = {"image": pixels, "text_input": TEXTS, "image_id": torch.tensor([7, 9]), "epoch": 0, "iters": 30,
               "num_iters_per_epoch": 100}  # fmt: skip
    torch.manual_seed(3)
    output = wrapped(samples)
    ids, mask = tokenize(tokenizer, TEXTS, 35, padding="longest")
    alpha = twin.config.alpha * (0.3 if kind == "pretrain" else 0.15)
    torch.manual_seed(3)
    expected = twin(pixels, ids, mask, alpha=alpha) if kind == "pretrain" else twin(pixels, ids, mask,
                                                                                    torch.tensor([7, 9]), alpha=alpha)
    torch.testing.assert_close(output.loss, expected.loss)
    torch.testing.assert_close(output.loss_itc + output.loss_itm + (output.loss_lm if kind == "pretrain" else 0),
                               output.loss)  # fmt: skip
    output.loss.backward()
