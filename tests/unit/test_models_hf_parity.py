"""Parity with transformers' BLIP classes on tiny random models, in both directions of the weight conversion, and
tests that show each place where transformers deviates from the original BLIP (spec §5.3, §9.2, §9.7)."""

from __future__ import annotations

import pytest
import torch
import transformers

from blip_models import checkpoints as ck
from blip_models import hf_convert as hc
from blip_models.configuration_blip import preset
from blip_models.tokenizer import load_tokenizer, tokenize

ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: contended threads make tiny models slow
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    return preset("tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def batch(tiny, tokenizer):
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, tiny.vision.image_size, tiny.vision.image_size)
    input_ids, attention_mask = tokenize(tokenizer, ["a dog on a red couch", "two cats"], 35, padding="longest")
    return pixels, input_ids, attention_mask


def _ours(kind, config, seed=0):
    torch.manual_seed(seed)
    return ck.build_model(kind, config).eval()


def _hf_tiny_config(**vision_overrides):
    """A transformers BlipConfig written directly with transformers' own fields (not via our converter)."""
    vision = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, **vision_overrides}  # layer_norm_eps: transformers default 1e-5
    text = {"vocab_size": 30524, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64}  # fmt: skip
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def test_key_renames_are_inverse_and_follow_the_conversion_script():
    assert hc.ours_to_hf_key("visual_encoder.blocks.3.attn.proj.weight") == "vision_model.encoder.layers.3.self_attn.projection.weight"
    assert hc.ours_to_hf_key("visual_encoder.norm.bias") == "vision_model.post_layernorm.bias"
    assert hc.ours_to_hf_key("visual_encoder.cls_token") == "vision_model.embeddings.class_embedding"
    assert hc.ours_to_hf_key("text_encoder.encoder.layer.0.crossattention.self.key.weight") == (
        "text_encoder.encoder.layer.0.crossattention.self.key.weight")  # fmt: skip
    assert hc.ours_to_hf_key("visual_encoder_m.cls_token") is None and hc.ours_to_hf_key("image_queue") is None
    for key in _ours("itm", preset("tiny")).state_dict():
        assert hc.hf_to_ours_key(hc.ours_to_hf_key(key)) == key


def test_vision_and_text_encoder_and_itc_match(tiny, batch):
    pixels, input_ids, mask = batch
    ours = _ours("itm", tiny)
    hf = hc.to_hf(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours.visual_encoder(pixels), hf.vision_model(pixel_values=pixels).last_hidden_state,
                                   rtol=0, atol=ATOL)  # fmt: skip
        torch.testing.assert_close(ours.text_encoder(input_ids, mask, mode="text").last_hidden_state,
                                   hf.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state,
                                   rtol=0, atol=ATOL)  # fmt: skip
        itc = ours(pixels, input_ids, mask, match_head="itc").itc_similarity  # aligned pairs (B,)
        hf_itc = hf(input_ids=input_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        torch.testing.assert_close(itc, hf_itc.diagonal(), rtol=0, atol=ATOL)  # HF returns the (B, B) matrix


def test_itm_matches_hf_only_when_hf_is_fed_enc_first(tiny, batch):
    """Original BLIP trained ITM with [ENC] first; transformers feeds [CLS] unchanged (pitfall §9.2)."""
    pixels, input_ids, mask = batch
    ours = _ours("itm", tiny)
    hf = hc.to_hf(ours)
    with torch.no_grad():
        logits = ours(pixels, input_ids, mask, match_head="itm").itm_logits
        enc_first = input_ids.clone()
        enc_first[:, 0] = tiny.text.enc_token_id
        hf_enc = hf(input_ids=enc_first, pixel_values=pixels, attention_mask=mask).itm_score
        hf_cls = hf(input_ids=input_ids, pixel_values=pixels, attention_mask=mask).itm_score
    torch.testing.assert_close(logits, hf_enc, rtol=0, atol=ATOL)
    assert (logits - hf_cls).abs().max() > 1e-3


def test_decoder_logits_and_label_smoothing(tiny, batch):
    """Same logits; same LM loss only when transformers' label_smoothing is set to the original 0.1 (§9.7)."""
    pixels, input_ids, mask = batch
    ours = _ours("caption", tiny)
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = tiny.text.bos_token_id
    labels = decoder_ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        image_embeds = ours.visual_encoder(pixels)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        output = ours.text_decoder(decoder_ids, mask, image_embeds, atts, labels=labels)
        hf_original = hc.to_hf(ours)(pixel_values=pixels, input_ids=decoder_ids, attention_mask=mask, labels=labels)
        hf_default = hc.to_hf(ours, label_smoothing=0.0)(pixel_values=pixels, input_ids=decoder_ids,
                                                         attention_mask=mask, labels=labels)  # fmt: skip
    torch.testing.assert_close(output.logits, hf_original.logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(output.loss, hf_original.loss, rtol=0, atol=ATOL)
    assert abs(float(output.loss - hf_default.loss)) > 1e-4
    manual = torch.nn.functional.cross_entropy(output.logits[:, :-1].reshape(-1, output.logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), label_smoothing=0.1)  # fmt: skip
    torch.testing.assert_close(output.loss, manual, rtol=0, atol=ATOL)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_generation_gives_identical_tokens(tiny, batch, tokenizer, num_beams):
    pixels, _, _ = batch
    ours = _ours("caption", tiny, seed=5)
    hf = hc.to_hf(ours)
    prompt = tokenizer(["a picture of "], return_tensors="pt").input_ids  # [CLS] a picture of [SEP]
    prompt_ids = prompt[:, :-1].clone()
    prompt_ids[:, 0] = tiny.text.bos_token_id
    ours_ids = ours.generate_ids(pixels, prompt_ids, num_beams=num_beams, max_length=12, min_length=5)
    # HF replaces the first token by bos and drops the trailing [SEP] itself.
    hf_ids = hf.generate(pixel_values=pixels, input_ids=prompt.repeat(2, 1), num_beams=num_beams, max_length=12,
                         min_length=5, do_sample=False)  # fmt: skip
    assert ours_ids.tolist() == hf_ids.tolist()


def test_vqa_question_states_and_generated_answers_match(tiny, batch):
    pixels, input_ids, mask = batch
    ours = _ours("vqa", tiny, seed=7)
    hf = hc.to_hf(ours)
    question, question_mask = input_ids[:1], mask[:1]  # one unpadded question: HF's generate ignores padding
    enc_first = question.clone()
    enc_first[:, 0] = tiny.text.enc_token_id
    with torch.no_grad():
        states = ours.encode_question(pixels[:1], question, question_mask)
        image_embeds = hf.vision_model(pixel_values=pixels[:1]).last_hidden_state
        hf_states = hf.text_encoder(input_ids=enc_first, attention_mask=question_mask, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long))  # fmt: skip
        torch.testing.assert_close(states, hf_states.last_hidden_state, rtol=0, atol=ATOL)
        ours_ids = ours.generate_ids(states, question_mask, num_beams=3, max_length=8, min_length=1)
        hf_ids = hf.generate(input_ids=enc_first, pixel_values=pixels[:1], num_beams=3, max_length=8, min_length=1)
    assert ours_ids.tolist() == hf_ids.tolist()


@pytest.mark.parametrize("hf_class, kind", [("BlipForConditionalGeneration", "caption"),
                                            ("BlipForImageTextRetrieval", "itm"),
                                            ("BlipForQuestionAnswering", "vqa")])  # fmt: skip
def test_load_transformers_directory(tmp_path, batch, hf_class, kind):
    """A directory saved by transformers itself (tiny random config, hub-style eps 1e-5) loads into our model."""
    pixels, _, _ = batch
    torch.manual_seed(11)
    hf = getattr(transformers, hf_class)(_hf_tiny_config()).eval()
    hf.save_pretrained(tmp_path)
    assert hc.is_hf_dir(tmp_path)
    ours, report = hc.load_hf(tmp_path)
    assert report.kind == kind and report.ok and not report.unexpected
    assert ours.config.vision.layer_norm_eps == 1e-6  # the original's eps, not the hub config's 1e-5
    assert any("layer_norm_eps" in note for note in report.adapted)
    assert ours.config.text.label_smoothing == 0.1
    same_eps, _ = hc.load_hf(tmp_path, keep_hf_eps=True)
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(same_eps.eval().visual_encoder(pixels), expected, rtol=0, atol=ATOL)
    # Every HF tensor landed in our model (round trip back to the HF layout reproduces the state dict).
    hf_state = hf.state_dict()
    for key, value in hc.state_dict_to_hf(ours.state_dict()).items():
        torch.testing.assert_close(value, hf_state[key], rtol=0, atol=0, msg=key)


def test_vision_layer_norm_eps_deviation_changes_outputs(tiny, batch):
    """With eps at transformers' default (1e-5) instead of BLIP's 1e-6 the vision outputs differ.

    Small-variance activations (as after a small patch projection) make the eps visible in a tiny model.
    """
    pixels, _, _ = batch
    ours = _ours("caption", tiny)
    with torch.no_grad():
        ours.visual_encoder.patch_embed.proj.weight.mul_(1e-3)
        ours.visual_encoder.pos_embed.mul_(1e-3)
        ours.visual_encoder.cls_token.mul_(1e-3)
        ours.visual_encoder.patch_embed.proj.bias.zero_()
        reference = ours.visual_encoder(pixels)
        same = hc.to_hf(ours).vision_model(pixel_values=pixels).last_hidden_state
        hf_default = hc.to_hf(ours, vision_eps=1e-5).vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(reference, same, rtol=0, atol=ATOL)
    assert (reference - hf_default).abs().max() > 1e-2


def test_no_hf_class_for_pretrain(tiny):
    with pytest.raises(ck.CheckpointError, match="no BLIP class"):
        hc.to_hf(_ours("nlvr", tiny))
