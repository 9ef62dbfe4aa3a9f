"""BlipPretrain: objectives learn, parameter sharing, momentum update, queues, hard negatives."""

from __future__ import annotations

import pytest
import torch

from blip_models.modeling_pretrain import BlipPretrain
from tests.unit._blip_tiny import assert_shared_cross_kv_matches_reference, micro_batch, micro_config


@pytest.fixture(autouse=True)
def one_thread():
    # The 2-core box is shared; one thread keeps these tiny models fast and deterministic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_each_objective_overfits_eight_pairs():
    torch.manual_seed(0)
    model = BlipPretrain(micro_config(queue_size=8, vision={"image_size": 16}))
    pixel_values, input_ids, attention_mask = micro_batch(8, length=8, image_size=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    history = []
    for _ in range(60):
        output = model(pixel_values, input_ids, attention_mask, alpha=0.0)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        history.append((output.loss_itc.item(), output.loss_itm.item(), output.loss_lm.item()))
    start = history[0]
    best_end = [min(step[i] for step in history[-10:]) for i in range(3)]
    assert best_end[0] < 0.5 * start[0], f"ITC did not fall: {start[0]:.3f} → {best_end[0]:.3f}"
    assert best_end[1] < 0.75 * start[1], f"ITM did not fall: {start[1]:.3f} → {best_end[1]:.3f}"
    assert best_end[2] < 0.3 * start[2], f"LM did not fall: {start[2]:.3f} → {best_end[2]:.3f}"


def test_encoder_decoder_share_all_but_self_attention():
    model = BlipPretrain(micro_config())
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    layer_e, layer_d = encoder.encoder.layer[0], decoder.encoder.layer[0]
    assert encoder.embeddings.word_embeddings.weight is decoder.embeddings.word_embeddings.weight
    assert encoder.embeddings.LayerNorm.weight is decoder.embeddings.LayerNorm.weight
    assert layer_e.crossattention.self.key.weight is layer_d.crossattention.self.key.weight
    assert layer_e.crossattention.output.LayerNorm.bias is layer_d.crossattention.output.LayerNorm.bias
    assert layer_e.intermediate.dense.weight is layer_d.intermediate.dense.weight
    assert layer_e.output.dense.bias is layer_d.output.dense.bias
    assert layer_e.attention.self.query.weight is not layer_d.attention.self.query.weight
    assert layer_e.attention.output.dense.weight is not layer_d.attention.output.dense.weight
    # the LM head is tied to the (shared) word embeddings
    assert model.text_decoder.cls.predictions.decoder.weight is decoder.embeddings.word_embeddings.weight
    # a shared tensor is one Parameter: the optimizer sees it once, both keys stay in the state dict
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    state = model.state_dict()
    assert "text_encoder.encoder.layer.0.crossattention.self.key.weight" in state
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight" in state
    assert "text_decoder.cls.predictions.bias" in state and "queue_ptr" in state


def test_gradients_reach_shared_parameters_from_both_paths():
    torch.manual_seed(0)
    model = BlipPretrain(micro_config())
    pixel_values, input_ids, attention_mask = micro_batch(4)
    shared = model.text_encoder.encoder.layer[0].intermediate.dense.weight
    output = model(pixel_values, input_ids, attention_mask)
    grad_itc = torch.autograd.grad(output.loss_itc, shared, retain_graph=True)[0]
    grad_lm = torch.autograd.grad(output.loss_lm, shared, retain_graph=True)[0]
    assert grad_itc.abs().sum() > 0 and grad_lm.abs().sum() > 0
    output.loss.backward()
    assert shared.grad is not None and shared.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.visual_encoder_m.parameters())
    assert not any(p.requires_grad for p in model.text_encoder_m.parameters())


def test_momentum_update_follows_ema():
    model = BlipPretrain(micro_config(momentum=0.9))
    online = model.vision_proj.weight
    momentum = model.vision_proj_m.weight
    assert torch.equal(online, momentum)  # initialised by copying
    with torch.no_grad():
        online.add_(1.0)
    before = momentum.detach().clone()
    model.momentum_update()
    assert torch.allclose(momentum, 0.9 * before + 0.1 * online.detach(), atol=1e-6)
    # the momentum copy of a shared text parameter is its own tensor
    word_m = model.text_encoder_m.embeddings.word_embeddings.weight
    assert word_m is not model.text_encoder.embeddings.word_embeddings.weight


def test_queue_pointer_and_contents():
    torch.manual_seed(0)
    model = BlipPretrain(micro_config(queue_size=12))
    image_feat = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    text_feat = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    model.dequeue_and_enqueue(image_feat, text_feat)
    assert int(model.queue_ptr) == 4
    assert torch.allclose(model.image_queue[:, :4], image_feat.T)
    assert torch.allclose(model.text_queue[:, :4], text_feat.T)
    model.dequeue_and_enqueue(image_feat, text_feat)
    model.dequeue_and_enqueue(image_feat * 0 + 0.5, text_feat)
    assert int(model.queue_ptr) == 0  # 12 written: wrapped to the start
    assert torch.allclose(model.image_queue[:, 8:], torch.full((16, 4), 0.5))
    # the forward pass enqueues its momentum features
    pixel_values, input_ids, attention_mask = micro_batch(4)
    model(pixel_values, input_ids, attention_mask)
    assert int(model.queue_ptr) == 4
    assert torch.allclose(model.image_queue[:, :4].norm(dim=0), torch.ones(4), atol=1e-5)
    assert torch.allclose(model.image_queue[:, 8:], torch.full((16, 4), 0.5))  # untouched by this batch


def test_temperature_is_clamped():
    model = BlipPretrain(micro_config())
    with torch.no_grad():
        model.temp.fill_(5.0)
    pixel_values, input_ids, attention_mask = micro_batch(2)
    model(pixel_values, input_ids, attention_mask)
    assert model.temp.item() == pytest.approx(0.5)


def test_hard_negatives_never_pick_positive_or_same_image(monkeypatch):
    torch.manual_seed(0)
    model = BlipPretrain(micro_config(queue_size=8))
    pixel_values, input_ids, attention_mask = micro_batch(4)
    image_ids = torch.tensor([0, 0, 1, 2])
    picked: list[torch.Tensor] = []
    real_multinomial = torch.multinomial

    def recording_multinomial(weights, num_samples, *args, **kwargs):
        draw = real_multinomial(weights, num_samples, *args, **kwargs)
        picked.append((weights.clone(), draw.clone()))
        return draw

    monkeypatch.setattr(torch, "multinomial", recording_multinomial)
    same = image_ids[:, None] == image_ids[None, :]
    for _ in range(5):
        model(pixel_values, input_ids, attention_mask, image_ids=image_ids)
    assert len(picked) == 10
    for weights, draw in picked:
        assert torch.all(weights[same] == 0)
        rows = torch.arange(4)
        assert not torch.any(same[rows, draw.squeeze(1)])


def test_batch_without_negatives_is_a_clear_error_or_falls_back_to_any_other_pair():
    model = BlipPretrain(micro_config())
    pixel_values, input_ids, attention_mask = micro_batch(2)
    with pytest.raises(ValueError, match="two pairs per batch"):
        model(pixel_values[:1], input_ids[:1], attention_mask[:1])
    torch.manual_seed(0)
    sims = torch.randn(3, 3)
    for _ in range(5):  # every pair shows the same image: BLIP's rule, any other pair, never the positive
        negative_image, negative_text = model._hard_negatives(sims, sims.T, torch.tensor([7, 7, 7]))
        assert not torch.any(negative_image == torch.arange(3)) and not torch.any(negative_text == torch.arange(3))
    output = model(pixel_values, input_ids, attention_mask, image_ids=torch.tensor([3, 3]))
    assert torch.isfinite(output.loss)


def test_mismatched_encoder_width_is_rejected():
    with pytest.raises(ValueError, match="encoder_width"):
        BlipPretrain(micro_config(text={"encoder_width": 48}))


def test_shared_image_keys_give_blip_losses_and_gradients():
    """Image cross-attention keys/values projected once (ITM pairs + decoder) == projected in every pass."""
    import copy

    torch.manual_seed(0)
    model = BlipPretrain(micro_config(queue_size=8)).eval()  # eval: no dropout, so both paths draw the same
    pixel_values, input_ids, attention_mask = micro_batch(4)
    assert_shared_cross_kv_matches_reference(model, lambda m: m(pixel_values, input_ids, attention_mask, alpha=0.4),
                                             ("loss_itc", "loss_itm", "loss_lm"))  # fmt: skip
    untied = copy.deepcopy(model)  # a decoder whose cross-attention is not the encoder's takes the plain path
    untied.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight = torch.nn.Parameter(
        untied.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.detach().clone() * 2)
    assert not untied._cross_attention_tied() and model._cross_attention_tied()
