"""BLIP feature extractor: image, text and multimodal embeddings (spec §1.7 `BLIP_Base`, LAVIS feature extractor).

Modes: 'image' → ViT tokens (B, 1+N, Dv) and normalised projected CLS (B, E); 'text' → `[CLS]` unimodal states
(B, L, H) and normalised projected `[CLS]` (B, E); 'multimodal' → `[ENC]`-first image-grounded states (B, L, H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from blip_models.configuration_blip import BlipConfig
from blip_models.med import BertModel, with_first_token
from blip_models.vit import VisionTransformer


@dataclass
class FeatureOutput:
    image_embeds: torch.Tensor | None = None  # (B, 1+N, Dv)
    image_embeds_proj: torch.Tensor | None = None  # (B, E), L2-normalised
    text_embeds: torch.Tensor | None = None  # (B, L, H)
    text_embeds_proj: torch.Tensor | None = None  # (B, E), L2-normalised
    multimodal_embeds: torch.Tensor | None = None  # (B, L, H)


class BlipFeatureExtractor(nn.Module):
    """`visual_encoder` + `text_encoder` + `vision_proj` + `text_proj` (official names)."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        if config.text.encoder_width != config.vision.width:
            raise ValueError(
                f"BlipFeatureExtractor: text.encoder_width={config.text.encoder_width} must equal "
                f"vision.width={config.vision.width}"
            )
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = BertModel(config.text)
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.embed_dim)

    @staticmethod
    def prepare_text(tokenizer: Any, texts: list[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
        from blip_models.tokenizer import tokenize

        return tokenize(tokenizer, texts, max_length, padding="longest")

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,  # (B, 3, H, W)
        input_ids: torch.Tensor | None = None,  # (B, L), [CLS] first
        attention_mask: torch.Tensor | None = None,
        mode: Literal["image", "text", "multimodal"] = "multimodal",
    ) -> FeatureOutput:
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"BlipFeatureExtractor: mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        if mode in ("image", "multimodal") and pixel_values is None:
            raise ValueError(f"BlipFeatureExtractor: mode={mode!r} needs pixel_values")
        if mode in ("text", "multimodal") and input_ids is None:
            raise ValueError(f"BlipFeatureExtractor: mode={mode!r} needs input_ids")
        output = FeatureOutput()
        if mode == "text":
            states = self.text_encoder(input_ids, attention_mask, mode="text").last_hidden_state
            output.text_embeds = states
            output.text_embeds_proj = F.normalize(self.text_proj(states[:, 0, :]), dim=-1)
            return output
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+N, Dv)
        output.image_embeds = image_embeds
        output.image_embeds_proj = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        if mode == "multimodal":
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            encoder_ids = with_first_token(input_ids, self.config.text.enc_token_id)
            output.multimodal_embeds = self.text_encoder(
                encoder_ids, attention_mask, image_embeds, image_atts, mode="multimodal"
            ).last_hidden_state
        return output

    extract_features = forward
