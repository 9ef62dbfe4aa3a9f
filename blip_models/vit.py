"""Vision Transformer image encoder of BLIP (Dosovitskiy et al. 2021; BLIP `models/vit.py`, timm 0.4.12 layout).

Built from timm's pre-norm `Block` (its `Attention` calls `F.scaled_dot_product_attention` when timm's fused
attention is enabled, the default). Parameter names follow the official checkpoints so `visual_encoder.*` keys of
BLIP `.pth` files load directly: cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}, norm. No classification head: `forward` returns every token after the final norm.
"""

from __future__ import annotations

import math
import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_models.configuration_blip import VisionConfig


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches_new: int) -> torch.Tensor:
    """Resize a (1, 1 + N, D) position embedding to (1, 1 + num_patches_new, D): CLS kept, grid bicubic.

    Both grids must be square (the reference's assumption). Returns the input unchanged when sizes agree.
    """
    num_extra = 1
    old_grid = int(math.isqrt(pos_embed.shape[1] - num_extra))
    new_grid = int(math.isqrt(num_patches_new))
    if old_grid * old_grid != pos_embed.shape[1] - num_extra or new_grid * new_grid != num_patches_new:
        raise ValueError(f"interpolate_pos_embed: non-square grids ({pos_embed.shape[1] - 1} → {num_patches_new})")
    if old_grid == new_grid:
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    dim = pos_embed.shape[-1]
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid_pos = F.interpolate(grid_pos.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)  # (1, g'², D)
    return torch.cat([cls_pos, grid_pos], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches → D-dim tokens with one strided convolution (`patch_embed.proj`)."""

    def __init__(self, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixel_values)  # (B, D, H/p, W/p)
        return patches.flatten(2).transpose(1, 2)  # (B, N, D)


def timm_block() -> type[nn.Module]:
    """timm's pre-norm ViT `Block`, imported without wandb. timm's utils import wandb when it is installed
    (img2dataset requires it); wandb makes two temporary folders at import and removes them only at a normal
    exit, so every killed process that imported timm (each Ray worker when its cluster stops) left two in
    /tmp. timm uses wandb only to log summaries, which this project never asks of it."""
    if "timm.models.vision_transformer" not in sys.modules and "wandb" not in sys.modules:
        sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` raises ImportError: timm skips it
        try:
            import timm.models.vision_transformer  # noqa: F401
        finally:
            if sys.modules.get("wandb", 0) is None:
                del sys.modules["wandb"]  # a later `import wandb` (img2dataset's) finds the real one
    from timm.models.vision_transformer import Block

    return Block


class VisionTransformer(nn.Module):
    """ViT returning all tokens `(B, 1 + N, D)` after the final LayerNorm (CLS first)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        Block = timm_block()  # noqa: N806

        self.config = config
        self.width = config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.width))
        norm_layer = partial(nn.LayerNorm, eps=config.layer_norm_eps)
        # stochastic-depth decay rule (on the CPU: a model may be built on the meta device, see checkpoints.from_pretrained)
        drop_path = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(dim=config.width, num_heads=config.heads, mlp_ratio=config.mlp_ratio, qkv_bias=True,
                  drop_path=drop_path[i], norm_layer=norm_layer)
            for i in range(config.depth)
        )  # fmt: skip
        self.norm = norm_layer(config.width)
        self.grad_ckpt_from = config.depth - config.grad_ckpt_layers  # blocks i >= this are checkpointed
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        nn.init.trunc_normal_(self.pos_embed, std=std)
        nn.init.trunc_normal_(self.cls_token, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, last_k_blocks: int) -> None:
        """Checkpoint the last k blocks (recompute in backward); 0 turns it off."""
        if not 0 <= last_k_blocks <= len(self.blocks):
            raise ValueError(f"grad checkpointing: last_k_blocks={last_k_blocks} not in [0, {len(self.blocks)}]")
        self.grad_ckpt_from = len(self.blocks) - last_k_blocks

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(pixel_values)  # (B, N, D)
        batch, num_patches, _ = tokens.shape
        cls = self.cls_token.expand(batch, -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, D)
        pos_embed = self.pos_embed
        if num_patches + 1 != pos_embed.shape[1]:  # other resolution than configured: resize on the fly
            pos_embed = interpolate_pos_embed(pos_embed, num_patches)
        hidden = tokens + pos_embed[:, : num_patches + 1]
        use_ckpt = self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if use_ckpt and index >= self.grad_ckpt_from:
                hidden = checkpoint(block, hidden, use_reentrant=False)
            else:
                hidden = block(hidden)
        return self.norm(hidden)  # (B, 1 + N, D)
