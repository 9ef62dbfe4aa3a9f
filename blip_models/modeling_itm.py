"""BLIP image-text matching model (the CapFilt filter): ITM probability and ITC cosine heads (spec §1.7, §3, §9.2).

Follows BLIP `models/blip_itm.py` with one deliberate difference: the ITM head reads the `[ENC]`-first sequence
that training used (the reference demo and HF feed `[CLS]`, pitfall §9.2). Loads the `visual_encoder`,
`text_encoder`, `vision_proj`, `text_proj`, `itm_head` keys of pretrain/retrieval checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from blip_models.configuration_blip import BlipConfig
from blip_models.med import BertModel, CrossKV, reorder_cache, with_first_token
from blip_models.vit import VisionTransformer


@dataclass
class ITMOutput:
    itm_logits: torch.Tensor | None = None  # (B, 2), class 1 = match
    itc_similarity: torch.Tensor | None = None  # (B,) cosine of aligned pairs
    loss: torch.Tensor | None = None  # ITM cross-entropy when labels are given


class BlipITM(nn.Module):
    """Image-grounded encoder + ITM head, and unimodal encoders + projections for ITC cosine."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        if config.text.encoder_width != config.vision.width:
            raise ValueError(
                f"BlipITM: text.encoder_width={config.text.encoder_width} must equal vision.width={config.vision.width}"
            )
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = BertModel(config.text)
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.text.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.text.hidden_size, 2)

    @staticmethod
    def prepare_text(tokenizer, captions: list[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize pre_caption'd texts padded to `max_length` (35 as the reference ITM)."""
        from blip_models.tokenizer import tokenize

        return tokenize(tokenizer, captions, max_length, padding="max_length")

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, 2) ITM logits of aligned pairs; `image_embeds` = visual_encoder output (B, 1+N, Dv)."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        encoder_input_ids = with_first_token(input_ids, self.config.text.enc_token_id)
        output = self.text_encoder(encoder_input_ids, attention_mask, image_embeds, image_atts, mode="multimodal")
        return self.itm_head(output.last_hidden_state[:, 0, :])  # (B, 2)

    @torch.no_grad()
    def precompute_cross_kv(self, image_embeds: torch.Tensor) -> CrossKV:
        """Per text layer, the ITM cross-attention (key, value), each (N_img, h, 1+N, d), of `image_embeds`."""
        return self.text_encoder.precompute_cross_kv(image_embeds)

    @torch.no_grad()
    def itm_logits_cached(
        self, cross_kv: CrossKV, image_index: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """2-way ITM logits (B, 2) of the pairs (image image_index[b], text b), with image keys/values from
        `precompute_cross_kv`: equal to `itm_logits(image_embeds[image_index], input_ids, attention_mask)`."""
        rows = reorder_cache(cross_kv, image_index)  # (B, h, S, d) each
        return self.itm_logits_grouped(rows, input_ids, attention_mask)

    @torch.no_grad()
    def itm_logits_grouped(
        self, cross_kv: CrossKV, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (B, 2) of texts grouped G = B // R per row of `cross_kv` (R rows): text b is paired with
        row b // G. No per-text copy of image keys/values (the fast path of retrieval re-ranking)."""
        encoder_input_ids = with_first_token(input_ids, self.config.text.enc_token_id)
        hidden = self.text_encoder.forward_with_cross_kv(
            encoder_input_ids, attention_mask, cross_kv, first_token_only=True
        )  # (B, 1, H)
        return self.itm_head(hidden[:, 0, :])  # (B, 2)

    def itc_similarity(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B,) cosine between normalised projected image CLS and `[CLS]` text features (aligned pairs)."""
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_output = self.text_encoder(input_ids, attention_mask, mode="text")
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)
        return (image_feat * text_feat).sum(dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, L), [CLS] first (replaced by [ENC] for the ITM head)
        attention_mask: torch.Tensor,
        match_head: Literal["itm", "itc", "both"] = "itm",
        labels: torch.Tensor | None = None,  # (B,) 1 = match, 0 = no match (ITM loss)
    ) -> ITMOutput:
        if match_head not in ("itm", "itc", "both"):
            raise ValueError(f"BlipITM: match_head must be 'itm', 'itc' or 'both', got {match_head!r}")
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+N, Dv)
        output = ITMOutput()
        if match_head in ("itm", "both"):
            output.itm_logits = self.itm_logits(image_embeds, input_ids, attention_mask)
            if labels is not None:
                output.loss = F.cross_entropy(output.itm_logits.float(), labels.long())
        if match_head in ("itc", "both"):
            output.itc_similarity = self.itc_similarity(image_embeds, input_ids, attention_mask)
        return output

    @torch.no_grad()
    def itm_probability(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """(B,) probability that text i matches image i (softmax of the ITM logits, class 1)."""
        logits = self.forward(pixel_values, input_ids, attention_mask, match_head="itm").itm_logits
        return logits.float().softmax(dim=-1)[:, 1]
