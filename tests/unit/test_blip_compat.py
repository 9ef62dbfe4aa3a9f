"""salesforce/BLIP's factories and calls (`blip_decoder(pretrained=...)`, `model(image, caption, match_head='itm')`,
...) on our models: each gives what our model's own methods give, in BLIP's shapes and conventions."""

from __future__ import annotations

import pytest
import torch

from blip_models import blip_compat
from blip_models import checkpoints as ck
from blip_models.configuration_blip import preset
from blip_models.tokenizer import tokenize


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Tiny files in the layout of BLIP's released ones, one per kind."""
    folder = tmp_path_factory.mktemp("released")
    config = preset("tiny").replace(vision={"width": 64, "heads": 1},
                                    text={"hidden_size": 64, "num_attention_heads": 1,
                                          "encoder_width": 64})  # fmt: skip
    paths = {}
    for kind in ("caption", "features", "itm", "vqa", "nlvr"):
        torch.manual_seed(0)
        paths[kind] = folder / f"model_{kind}.pth"
        torch.save({"model": ck.build_model(kind, config).state_dict()}, paths[kind])
    return paths


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_decoder_generate_as_blips_demo(released, image):
    model = blip_compat.blip_decoder(pretrained=str(released["caption"]), image_size=32, vit="base").eval()
    captions = model.generate(image, sample=False, num_beams=3, max_length=12, min_length=3)
    assert captions == model.model.generate(image, model.tokenizer, num_beams=3, max_length=12, min_length=3)
    assert len(model.generate(image, sample=True, top_p=0.9, max_length=12, min_length=3)) == 2
    assert model.config.vision.image_size == 32  # the wrapped model's attributes
    with pytest.raises(ValueError, match="vit parameter must be base or large"):
        blip_compat.blip_decoder(vit="huge")


def test_feature_extractor_and_itm_as_blips_demo(released, image):
    features = blip_compat.blip_feature_extractor(pretrained=str(released["features"]), image_size=32).eval()
    torch.testing.assert_close(features(image, "a red square", mode="image"), features.model.visual_encoder(image))
    multimodal = features(image[:1], "a red square", mode="multimodal")
    assert multimodal[0, 0].shape == (64,)  # the demo's [0, 0]: the [ENC] state
    ids, mask = tokenize(features.tokenizer, ["a red square"], None, "longest")
    text = features.model(input_ids=ids, attention_mask=mask, mode="text")
    torch.testing.assert_close(features(image[:1], "a red square", mode="text"), text.text_embeds)

    itm = blip_compat.blip_itm(pretrained=str(released["itm"]), image_size=32).eval()
    logits = itm(image, ["a red square", "two dogs"], match_head="itm")
    ids, mask = tokenize(itm.tokenizer, ["a red square", "two dogs"], 35, "max_length")
    torch.testing.assert_close(logits, itm.model.itm_logits(itm.model.visual_encoder(image), ids, mask))
    assert itm(image, ["a red square", "two dogs", "grass"], match_head="itc").shape == (2, 3)


def test_vqa_and_nlvr_as_blips(released, image):
    vqa = blip_compat.blip_vqa(pretrained=str(released["vqa"]), image_size=32).eval()
    questions, answers = ["what colour is it?", "how many?"], ["red", "two", "blue"]
    indices = vqa(image, questions, answer=answers, train=False, inference="rank", k_test=3)
    ids, mask = vqa.model.prepare_question(vqa.tokenizer, questions)
    assert [answers[i] for i in indices.tolist()] == vqa.model.answer(image, ids, mask, vqa.tokenizer,
                                                                      answer_list=answers, k_test=3)  # fmt: skip
    assert len(vqa(image, questions, train=False, inference="generate")) == 2
    loss = vqa.train()(image, questions, answer=["red", "two"], n=[1, 1], weights=torch.ones(2))
    assert loss.ndim == 0 and torch.isfinite(loss)

    nlvr = blip_compat.blip_nlvr(pretrained=str(released["nlvr"]), image_size=32).eval()
    targets = torch.tensor([1, 0])
    predictions = nlvr(torch.cat([image, image.flip(0)]), ["the left one is red", "both are blue"], targets,
                       train=False)  # fmt: skip
    assert predictions.shape == (2,) and set(predictions.tolist()) <= {0, 1}
    assert torch.isfinite(nlvr.train()(torch.cat([image, image]), ["a", "b"], targets, train=True))
