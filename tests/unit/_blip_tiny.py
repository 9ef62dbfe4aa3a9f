"""Shared helpers for the blip_models unit tests: a micro config (64-token vocab) and synthetic batches."""

from __future__ import annotations

import torch

from blip_models.configuration_blip import BlipConfig, preset

MICRO_BOS, MICRO_ENC, MICRO_SEP, MICRO_CLS = 62, 63, 2, 1


def micro_config(**changes) -> BlipConfig:
    """The 'tiny' preset with a 64-token vocabulary (ids: pad 0, [CLS] 1, [SEP] 2, [DEC] 62, [ENC] 63)."""
    text = dict(vocab_size=64, bos_token_id=MICRO_BOS, enc_token_id=MICRO_ENC, sep_token_id=MICRO_SEP)
    text.update(changes.pop("text", {}))
    return preset("tiny").replace(text=text, **changes)


def micro_batch(batch: int = 8, length: int = 10, seed: int = 1, image_size: int = 32):
    """Distinct random images and token sequences `[CLS] w… [SEP]`, with some padding in the last rows."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator)
    input_ids = torch.randint(5, 60, (batch, length), generator=generator)
    input_ids[:, 0] = MICRO_CLS
    input_ids[:, -1] = MICRO_SEP
    attention_mask = torch.ones_like(input_ids)
    if batch > 1 and length > 4:
        input_ids[-1, length - 3 :] = 0
        input_ids[-1, length - 4] = MICRO_SEP
        attention_mask[-1, length - 3 :] = 0
    return pixel_values, input_ids, attention_mask


def assert_shared_cross_kv_matches_reference(model, forward, loss_names) -> None:
    """`model` (in eval mode: no dropout draws) with `share_cross_kv` on vs a copy with it off: equal losses and
    gradients. `forward(m)` runs a seeded forward pass of `m` and returns its output."""
    import copy

    reference = copy.deepcopy(model)
    reference.share_cross_kv = False
    results = []
    for candidate in (model, reference):
        torch.manual_seed(1)  # same hard negatives
        output = forward(candidate)
        output.loss.backward()
        results.append((output, {n: p.grad for n, p in candidate.named_parameters() if p.grad is not None}))
    (shared, shared_grads), (plain, plain_grads) = results
    for name in loss_names:
        torch.testing.assert_close(getattr(shared, name), getattr(plain, name), rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys() and len(shared_grads) > 50
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
