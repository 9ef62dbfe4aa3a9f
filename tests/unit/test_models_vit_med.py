"""ViT and MED building blocks: official parameter names, masks, KV cache, LM loss, tying rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_models.med import BertLMHeadModel, BertModel, lm_loss, select_rows, tie_encoder_decoder_weights
from blip_models.vit import VisionTransformer, interpolate_pos_embed
from tests.unit._blip_tiny import micro_config


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vit_names_shapes_and_any_resolution():
    config = micro_config().vision
    vit = VisionTransformer(config)
    names = set(vit.state_dict())
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias",
                "blocks.1.attn.proj.weight", "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias",
                "norm.weight"):  # fmt: skip
        assert key in names, key
    assert vit.blocks[0].norm1.eps == 1e-6 and vit.blocks[0].attn.fused_attn  # SDPA path
    pixel_values = torch.randn(2, 3, 32, 32)
    assert vit(pixel_values).shape == (2, 17, 32)
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)


def test_vit_imports_timm_without_wandb_and_wandb_still_imports_after():
    """wandb (installed for img2dataset) leaves two folders in /tmp per killed process that imported it: a model
    process must not import it through timm, and img2dataset's own `import wandb` must still work after."""
    import subprocess
    import sys

    code = ("import sys; from blip_models.vit import VisionTransformer; from tests.unit._blip_tiny import micro_config; "
            "VisionTransformer(micro_config().vision); print('wandb' in sys.modules); import wandb; print(bool(wandb.__file__))")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=root)
    assert result.stdout.split() == ["False", "True"]


def test_interpolate_pos_embed_keeps_cls_and_identity():
    pos_embed = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos_embed, 16) is pos_embed
    resized = interpolate_pos_embed(pos_embed, 36)
    assert resized.shape == (1, 37, 8) and torch.equal(resized[:, 0], pos_embed[:, 0])
    with pytest.raises(ValueError, match="non-square"):
        interpolate_pos_embed(pos_embed, 20)


def test_vit_gradient_checkpointing_matches_plain():
    torch.manual_seed(0)
    config = micro_config(vision={"grad_ckpt_layers": 1}).vision
    vit = VisionTransformer(config).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    vit(pixel_values).sum().backward()
    grad_ckpt = vit.patch_embed.proj.weight.grad.clone()
    vit.zero_grad()
    vit.set_grad_checkpointing(0)
    vit(pixel_values).sum().backward()
    assert torch.allclose(grad_ckpt, vit.patch_embed.proj.weight.grad, atol=1e-6)


def test_vit_gradient_checkpointing_wraps_only_the_last_k_blocks(monkeypatch):
    import blip_models.vit as vit_module

    wrapped = []

    def recording_checkpoint(block, *args, **kwargs):
        wrapped.append(block)
        return block(*args)

    monkeypatch.setattr(vit_module, "checkpoint", recording_checkpoint)
    torch.manual_seed(0)
    vit = VisionTransformer(micro_config(vision={"depth": 4, "grad_ckpt_layers": 2}).vision).train()
    pixel_values = torch.randn(1, 3, 32, 32)
    blocks = list(vit.blocks)

    def checkpointed() -> list[int]:
        wrapped.clear()
        vit(pixel_values)
        return [blocks.index(block) for block in wrapped]

    assert checkpointed() == [2, 3]  # from the config: the last 2 of 4
    vit.set_grad_checkpointing(1)
    assert checkpointed() == [3]
    vit.set_grad_checkpointing(4)
    assert checkpointed() == [0, 1, 2, 3]
    with torch.no_grad():
        assert checkpointed() == []  # nothing to recompute without a backward
    vit.eval()
    assert checkpointed() == []
    vit.set_grad_checkpointing(0)
    vit.train()
    assert checkpointed() == []
    with pytest.raises(ValueError, match="last_k_blocks=5"):
        vit.set_grad_checkpointing(5)


def test_med_names_match_official_layout():
    text = micro_config().text
    names = set(BertLMHeadModel(text).state_dict())
    for key in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                "bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.output.dense.weight",
                "bert.encoder.layer.0.attention.output.LayerNorm.bias",
                "bert.encoder.layer.1.crossattention.self.value.bias",
                "bert.encoder.layer.1.crossattention.output.dense.weight",
                "bert.encoder.layer.1.intermediate.dense.weight", "bert.encoder.layer.1.output.LayerNorm.weight",
                "cls.predictions.bias", "cls.predictions.transform.dense.weight",
                "cls.predictions.transform.LayerNorm.bias", "cls.predictions.decoder.weight"):  # fmt: skip
        assert key in names, key
    model = BertModel(micro_config(text={"encoder_width": 48}).text)
    assert model.encoder.layer[0].crossattention.self.key.in_features == 48
    assert model.encoder.layer[0].attention.self.key.in_features == 32


def test_text_mode_ignores_image_and_padding_is_masked():
    torch.manual_seed(0)
    model = BertModel(micro_config().text).eval()
    ids = torch.tensor([[1, 10, 11, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    out_a = model(ids, mask, mode="text").last_hidden_state
    ids_b = ids.clone()
    ids_b[0, 4:] = 33  # change padded tokens only
    out_b = model(ids_b, mask, mode="text").last_hidden_state
    assert torch.allclose(out_a[:, :4], out_b[:, :4], atol=1e-5)
    image = torch.randn(1, 5, 32)
    multimodal = model(ids, mask, image, torch.ones(1, 5), mode="multimodal").last_hidden_state
    assert not torch.allclose(multimodal[:, :4], out_a[:, :4])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(ids, mask, mode="multimodal")


def test_decoder_is_causal_and_cache_matches_full_pass():
    torch.manual_seed(0)
    decoder = BertLMHeadModel(micro_config().text).eval()
    image = torch.randn(2, 5, 32)
    seq = torch.randint(3, 60, (2, 7))
    full = decoder(seq, encoder_hidden_states=image).logits
    changed = seq.clone()
    changed[:, 5:] = 4
    assert torch.allclose(decoder(changed, encoder_hidden_states=image).logits[:, :5], full[:, :5], atol=1e-5)
    out = decoder(seq[:, :3], encoder_hidden_states=image, use_cache=True)
    pieces, past = [out.logits], out.past_key_values
    for t in range(3, 7):
        out = decoder(seq[:, t : t + 1], encoder_hidden_states=image, past_key_values=past, use_cache=True)
        pieces.append(out.logits)
        past = out.past_key_values
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_lm_loss_label_smoothing_and_per_sequence_sum():
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[5, 1, 2, -100], [5, 3, -100, -100]])
    per_sequence = lm_loss(logits, labels, 0.1, reduction="none")
    manual = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3], label_smoothing=0.1, reduction="sum")
    assert per_sequence.shape == (2,) and torch.allclose(per_sequence[0], manual)
    mean = lm_loss(logits, labels, 0.1)
    assert torch.allclose(mean, per_sequence.sum() / 3)  # mean over the 3 non-ignored targets
    with pytest.raises(ValueError, match="reduction"):
        lm_loss(logits, labels, 0.1, reduction="sum")


def test_loss_on_target_positions_only_equals_full_logits_loss():
    torch.manual_seed(0)
    decoder = BertLMHeadModel(micro_config().text)
    image = torch.randn(3, 5, 32)
    seq = torch.randint(3, 60, (3, 8))
    labels = seq.clone()
    labels[0, 6:], labels[1, 3:], labels[2, :2] = -100, -100, -100  # padding, and a masked prompt
    for reduction in ("mean", "none"):
        full = decoder(seq, encoder_hidden_states=image, labels=labels, reduction=reduction)
        fast = decoder(seq, encoder_hidden_states=image, labels=labels, reduction=reduction, return_logits=False)
        assert fast.logits is None and torch.allclose(fast.loss, full.loss, atol=1e-6)
    full_grad = torch.autograd.grad(decoder(seq, encoder_hidden_states=image, labels=labels).loss,
                                    decoder.cls.predictions.decoder.weight)[0]  # fmt: skip
    fast_grad = torch.autograd.grad(decoder(seq, encoder_hidden_states=image, labels=labels, return_logits=False).loss,
                                    decoder.cls.predictions.decoder.weight)[0]  # fmt: skip
    assert torch.allclose(fast_grad, full_grad, atol=1e-6)


def test_tie_rule_skips_only_self_attention():
    text = micro_config().text
    encoder, decoder = BertModel(text), BertLMHeadModel(text)
    tied = tie_encoder_decoder_weights(encoder, decoder.bert)
    assert "encoder.layer.0.crossattention.self.query" in tied
    assert "embeddings.word_embeddings" in tied
    assert not any(".attention." in name for name in tied)


def test_width_scaled_init_keeps_image_features_apart_at_step_0():
    """At width 64 timm's std 0.02 makes every image's [CLS] output nearly the same vector (what kept the demo's
    models from learning); the `small` preset's initializer_range keeps them apart."""
    import dataclasses

    from blip_models.configuration_blip import preset

    def mean_cosine(initializer_range: float) -> float:
        torch.manual_seed(0)
        vit = VisionTransformer(dataclasses.replace(preset("small").vision, initializer_range=initializer_range))
        with torch.no_grad():
            cls = torch.nn.functional.normalize(vit(torch.randn(16, 3, 64, 64))[:, 0], dim=-1)
        return float((cls @ cls.T)[~torch.eye(16, dtype=torch.bool)].mean())

    assert preset("small").vision.initializer_range == 0.08 and preset("base").vision.initializer_range == 0.02
    assert mean_cosine(0.02) > 0.95
    assert mean_cosine(0.08) < mean_cosine(0.02) - 0.1


def test_select_rows_gradient_sums_repeated_picks_like_index_select():
    """The one-hot backward of `select_rows` gives index_select's gradient (repeats summed, unpicked rows zero),
    in float64 to rounding and checked numerically, and without autograd it is a plain index_select."""
    torch.manual_seed(0)
    source = torch.randn(5, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 3, 3, 1, 0, 0, 3])  # row 2 and 4 never picked, rows 0 and 3 picked several times
    upstream = torch.randn(7, 3, 4, 2, dtype=torch.float64)
    (ours,) = torch.autograd.grad((select_rows(source, index) * upstream).sum(), source)
    (reference,) = torch.autograd.grad((source.index_select(0, index) * upstream).sum(), source)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert ours[2].abs().max() == 0 and ours[4].abs().max() == 0
    assert torch.autograd.gradcheck(lambda s: select_rows(s, index), (source,))
    with torch.no_grad():
        torch.testing.assert_close(select_rows(source, index), source.index_select(0, index), rtol=0, atol=0)
