"""FP8 inference for the ViT's linear layers: CapFilt's two image encoders on Ada / Hopper GPUs.

At 384 px the captioner's and the filter's ViT-B/16 are ~56 % of CapFilt's GPU time (577 tokens per image), and
their matmuls already run near the bf16 peak; FP8 tensor cores double that peak. Each `nn.Linear` of a ViT block
(qkv, proj, fc1, fc2) becomes a `Float8Linear`: the weight is stored once in float8 e4m3 with one scale per output
row; the activations are quantised per token (row-wise amax) at each call; `torch._scaled_mm` multiplies and
rescales into the model's dtype. Attention, LayerNorm, GELU and the text side stay in bf16. Inference only (no
backward), and only where the caller asks for it: a changed ITM score near the threshold changes a keep decision,
so the agreement with the bf16 model is measured (benchmarks/bench_fp8_vision.py) before it is switched on.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_CUDA_ALIGNMENT = 16  # cuBLASLt FP8 matmuls need dimensions divisible by 16


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) → float8 e4m3 (M, K) and float32 scales (M, 1) with values ≈ quantised * scale (per-row amax).

    The scaling multiply runs in the input's dtype (no float32 copy of a bf16 activation: half the memory
    traffic); the returned scale is the exact inverse of the multiplier used."""
    amax = values.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)  # (M, 1)
    multiplier = (E4M3_MAX / amax).to(values.dtype)
    quantised = (values * multiplier).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return quantised, 1.0 / multiplier.float()


class Float8Linear(nn.Module):
    """y = x W^T + b with W and x in float8 e4m3 (row-wise scales), accumulated and returned in x's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_rows(linear.weight.detach())  # (N, K), (N, 1)
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, N): scale of output column n
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, self.in_features)  # (M, K)
        count = rows.shape[0]
        padding = (-count) % _CUDA_ALIGNMENT
        if padding:  # M rounded up for cuBLASLt (on every device: one code path); zero rows, cut off below
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padding))
        quantised, scale = quantize_rows(rows)
        output = torch._scaled_mm(quantised, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                                  out_dtype=hidden.dtype)[:count]  # fmt: skip
        if self.bias is not None:
            output = output + self.bias
        return output.reshape(*hidden.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


def check_float8_device(device: torch.device) -> None:
    """Raise when `device` has no FP8 matmul: CUDA GPUs before compute capability 8.9 (Ada, Hopper)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"fp8_vision needs an FP8 GPU (compute capability >= 8.9: L4, L40, H100, H200); "
                             f"{name} is sm{major}{minor} — switch fp8_vision off")  # fmt: skip


def quantize_vision_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` inside the ViT blocks of `model` for a `Float8Linear`, in place; returns the count.

    Layers whose sizes a CUDA FP8 matmul cannot take (not multiples of 16) stay as they are.
    """
    from blip_models.vit import timm_block

    check_float8_device(next(model.parameters()).device)
    swapped = 0
    vit_block = timm_block()
    for block in [module for module in model.modules() if isinstance(module, vit_block)]:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child.in_features % _CUDA_ALIGNMENT == 0 \
                        and child.out_features % _CUDA_ALIGNMENT == 0:  # fmt: skip
                    setattr(parent, name, Float8Linear(child))
                    swapped += 1
    return swapped
