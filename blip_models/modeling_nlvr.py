"""BLIP NLVR2 model: one sentence, two images, binary label (spec §1.7, §4.4).

Follows BLIP `models/blip_nlvr.py` + `models/nlvr_encoder.py`. Each layer's cross-attention has two branches
(`self0` for the left image, `self1` for the right) with their own output projections (`dense0`, `dense1`). In the
first half of the layers the two projected outputs are averaged; in the second half they are concatenated and
merged by `merge_layer` Linear(2H → H). The `[ENC]` output feeds `cls_head` = Linear → ReLU → Linear(H → 2).
Loading a pretrained checkpoint copies `crossattention.self.*` into self0/self1 and `output.dense` into
dense0/dense1 (the checkpoint loader's job). The ViT uses drop-path 0.1, hard-coded in the reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip_models.configuration_blip import BlipConfig, TextConfig
from blip_models.med import BertModel, BertSelfAttention, init_bert_weights, with_first_token
from blip_models.vit import VisionTransformer


class TwinSelfOutput(nn.Module):
    """dense0/dense1 per branch → average (or merge_layer on the concatenation) → dropout → LayerNorm(+ input)."""

    def __init__(self, config: TextConfig, merge: bool) -> None:
        super().__init__()
        self.dense0 = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.merge = merge
        if merge:
            self.merge_layer = nn.Linear(2 * config.hidden_size, config.hidden_size)

    def forward(self, branches: tuple[torch.Tensor, torch.Tensor], input_tensor: torch.Tensor) -> torch.Tensor:
        left = self.dense0(branches[0])  # (B, L, H)
        right = self.dense1(branches[1])
        if self.merge:
            hidden = self.merge_layer(torch.cat([left, right], dim=-1))  # (B, L, H)
        else:
            hidden = (left + right) / 2
        return self.LayerNorm(self.dropout(hidden) + input_tensor)


class TwinCrossAttention(nn.Module):
    """Cross-attention to two images: `self0`, `self1`, `output` (TwinSelfOutput)."""

    def __init__(self, config: TextConfig, merge: bool) -> None:
        super().__init__()
        self.self0 = BertSelfAttention(config, is_cross_attention=True)
        self.self1 = BertSelfAttention(config, is_cross_attention=True)
        self.output = TwinSelfOutput(config, merge)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, L, H)
        attention_mask: tuple[torch.Tensor | None, torch.Tensor | None] | None,  # additive masks per image
        key_value_states: tuple[torch.Tensor, torch.Tensor],  # ((B, S, W), (B, S, W))
        past_key_value: Any = None,
    ) -> tuple[torch.Tensor, tuple]:
        masks = attention_mask if attention_mask is not None else (None, None)
        left, _ = self.self0(hidden_states, masks[0], key_value_states[0], is_cross_attention=True)
        right, _ = self.self1(hidden_states, masks[1], key_value_states[1], is_cross_attention=True)
        return self.output((left, right), hidden_states), ()


@dataclass
class NLVROutput:
    logits: torch.Tensor  # (B, 2)
    loss: torch.Tensor | None = None


class BlipNLVR(nn.Module):
    """`visual_encoder` + NLVR `text_encoder` (twin cross-attention) + `cls_head`."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        if config.text.encoder_width != config.vision.width:
            raise ValueError(
                f"BlipNLVR: text.encoder_width={config.text.encoder_width} must equal "
                f"vision.width={config.vision.width}"
            )
        self.config = config
        text = config.text
        self.visual_encoder = VisionTransformer(dataclasses.replace(config.vision, drop_path_rate=0.1))
        self.text_encoder = BertModel(text)
        half = text.num_hidden_layers // 2
        for index, layer in enumerate(self.text_encoder.encoder.layer):
            layer.crossattention = TwinCrossAttention(text, merge=index >= half)
            layer.crossattention.apply(lambda module: init_bert_weights(module, text.initializer_range))
        self.cls_head = nn.Sequential(
            nn.Linear(text.hidden_size, text.hidden_size),
            nn.ReLU(),
            nn.Linear(text.hidden_size, 2),
        )

    @staticmethod
    def prepare_text(
        tokenizer: Any, sentences: list[str], max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize pre_caption(…, 40)'d sentences (pad longest, no truncation by default)."""
        from blip_models.tokenizer import tokenize

        return tokenize(tokenizer, sentences, max_length, padding="longest")

    def forward(
        self,
        pixel_values_left: torch.Tensor,  # (B, 3, H, W)
        pixel_values_right: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, L), [CLS] first (replaced by [ENC])
        attention_mask: torch.Tensor,  # (B, L)
        labels: torch.Tensor | None = None,  # (B,) 1 = True
    ) -> NLVROutput:
        batch = pixel_values_left.shape[0]
        images = torch.cat([pixel_values_left, pixel_values_right], dim=0)  # (2B, 3, H, W): one ViT pass
        image_embeds = self.visual_encoder(images)  # (2B, 1+N, Dv)
        left_embeds, right_embeds = image_embeds[:batch], image_embeds[batch:]
        image_atts = torch.ones(left_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        encoder_ids = with_first_token(input_ids, self.config.text.enc_token_id)
        output = self.text_encoder(
            encoder_ids, attention_mask, (left_embeds, right_embeds), (image_atts, image_atts), mode="multimodal"
        )
        logits = self.cls_head(output.last_hidden_state[:, 0, :])  # (B, 2)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.long())
        return NLVROutput(logits=logits, loss=loss)
