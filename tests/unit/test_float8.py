"""FP8 ViT linears (`blip_models.float8`): the real `torch._scaled_mm` path, run on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from blip_models.configuration_blip import preset
from blip_models.float8 import Float8Linear, quantize_rows, quantize_vision_linears


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


def test_row_quantisation_keeps_each_row_within_e4m3_precision() -> None:
    torch.manual_seed(0)
    values = torch.randn(64, 96) * torch.logspace(-3, 3, 64)[:, None]  # rows six decades apart
    quantised, scale = quantize_rows(values)
    assert quantised.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    restored = quantised.float() * scale
    # 3 mantissa bits: at most 1/16 relative rounding per element, whatever the row's magnitude
    assert bool(((restored - values).abs() <= values.abs() / 16 + scale * 2**-9).all())


def test_float8_linear_follows_the_linear_it_replaces() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    hidden = torch.randn(2, 37, 128)  # 74 rows: not a multiple of 16
    with torch.no_grad():
        exact, fp8 = linear(hidden), Float8Linear(linear)(hidden)
    assert fp8.shape == exact.shape and fp8.dtype == exact.dtype
    error = relative_error(fp8, exact)
    assert 1e-4 < error < 0.05, error  # really quantised, and close
    with torch.no_grad():
        bf16 = Float8Linear(linear.to(torch.bfloat16))(hidden.to(torch.bfloat16))
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16.float(), exact) < 0.05


def test_vit_blocks_run_in_fp8_with_close_itm_probabilities() -> None:
    from blip_models.modeling_itm import BlipITM

    torch.manual_seed(0)
    config = preset("tiny")
    model = BlipITM(config).eval()
    pixels = torch.randn(3, 3, config.vision.image_size, config.vision.image_size)
    ids = torch.randint(1000, 2000, (3, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        exact_embeds = model.visual_encoder(pixels)
        exact_itm = model.itm_logits_grouped(model.precompute_cross_kv(exact_embeds), ids, mask)
        text_params = {name: p.clone() for name, p in model.named_parameters() if not name.startswith("visual")}
        swapped = quantize_vision_linears(model)
        fp8_embeds = model.visual_encoder(pixels)
        fp8_itm = model.itm_logits_grouped(model.precompute_cross_kv(fp8_embeds), ids, mask)
    assert swapped == 4 * config.vision.depth  # qkv, proj, fc1, fc2 of every block
    assert all(isinstance(block.mlp.fc1, Float8Linear) for block in model.visual_encoder.blocks)
    assert all(torch.equal(p, text_params[n]) for n, p in model.named_parameters() if n in text_params)
    assert relative_error(fp8_embeds, exact_embeds) < 0.05
    probs = fp8_itm.softmax(-1)[:, 1], exact_itm.softmax(-1)[:, 1]
    assert float((probs[0] - probs[1]).abs().max()) < 0.02

