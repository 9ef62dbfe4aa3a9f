"""Regional compilation: `torch.compile` each transformer block in place, not the whole model.

BLIP's towers are stacks of identical blocks (ViT `Block`, MED `BertLayer`). Compiling the blocks one by one
fuses what eager mode runs as separate memory-bound kernels (LayerNorm, GELU, bias, residual adds, dropout)
while compiling each block shape once for the whole stack: minutes less compilation than compiling the full
training step (which timed out here at > 10 min for BLIP-base), with parameter names and state dicts unchanged.
The code around the blocks (losses, queues, hard-negative sampling, decoding loops) stays eager.
"""

from __future__ import annotations

from torch import nn

from blip_models.med import BertLayer
from blip_models.vit import timm_block


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every ViT block and MED layer of `model` (each shared module once)."""
    kinds = (timm_block(), BertLayer)
    return [module for module in model.modules() if isinstance(module, kinds)]


def compile_blocks(model: nn.Module, *, vision_only: bool = False, mode: str | None = None) -> int:
    """`torch.compile` every transformer block of `model` in place; returns how many were compiled.

    `vision_only` leaves the text layers eager: for decoding loops, whose key/value cache grows by one position
    per step and would make the text layers recompile for dynamic shapes. `mode` is torch.compile's (None =
    default; "max-autotune-no-cudagraphs" also benchmarks Triton matmuls against cuBLAS, at a longer compile).
    """
    import torch._dynamo

    vit_block = timm_block()
    blocks = [b for b in transformer_blocks(model) if isinstance(b, vit_block) or not vision_only]
    # Each MED layer is called in several modes (unimodal, multimodal, causal, no-grad momentum copies): one
    # graph per (mode, shape) call signature; the default limit of 8 would fall back to eager mid-training.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)
