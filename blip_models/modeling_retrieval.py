"""BLIP image-text retrieval model: ITC + ITM finetuning with image-id positives (spec §4.1).

Follows BLIP `models/blip_retrieval.py`. Differences from pretraining: positives are every pair sharing an image
id (in the batch and in the queue, via `idx_queue`), hard negatives come from online-vs-online similarities with
same-image entries masked out, and there is no decoder. Inference: `image_features`, `text_features`,
`itm_logits` and `score` (ITM positive logit + ITC cosine, as the reference's evaluation). Re-ranking many
(image, text) pairs: `precompute_cross_kv` once per image, then `itm_logits_cached` (any pairs) or
`itm_logits_grouped` (texts grouped per image). Hard negatives come from the local batch, or from every rank's
batch with `negative_all_rank=True` (the reference's COCO setting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip_models.configuration_blip import BlipConfig
from blip_models.gather import all_gather_with_grad, concat_all_gather
from blip_models.med import BertModel, CrossKV, reorder_cache, with_first_token
from blip_models.vit import VisionTransformer


@dataclass
class RetrievalOutput:
    loss: torch.Tensor  # loss_itc + loss_itm
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor


class BlipRetrieval(nn.Module):
    """Retrieval model with momentum encoders, feature queues, `idx_queue` and `ptr_queue` (official names)."""

    # Project each image's cross-attention keys/values once per step for all its ITM pairs (False: once per pair,
    # as BLIP's code; the same losses and gradients, kept as the test reference).
    share_cross_kv = True

    def __init__(self, config: BlipConfig, negative_all_rank: bool = False) -> None:
        super().__init__()
        self.negative_all_rank = negative_all_rank  # ITM hard negatives from every rank's batch (BLIP COCO: True)
        if config.text.encoder_width != config.vision.width:
            raise ValueError(
                f"BlipRetrieval: text.encoder_width={config.text.encoder_width} must equal vision.width="
                f"{config.vision.width}"
            )
        self.config = config
        text, embed_dim = config.text, config.embed_dim
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = BertModel(text)
        self.vision_proj = nn.Linear(config.vision.width, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))

        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for _, momentum in self._model_pairs():
            momentum.requires_grad_(False)

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))

    def _model_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def copy_params(self) -> None:
        """Reset momentum copies to the online weights."""
        for online, momentum in self._model_pairs():
            for param, param_m in zip(online.parameters(), momentum.parameters(), strict=True):
                param_m.copy_(param)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_m ← m·θ_m + (1 − m)·θ."""
        online_params, momentum_params = [], []
        for online, momentum in self._model_pairs():
            for param, param_m in zip(online.parameters(), momentum.parameters(), strict=True):
                online_params.append(param.detach())
                momentum_params.append(param_m)
        torch._foreach_lerp_(momentum_params, online_params, 1.0 - self.config.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idxs: torch.Tensor) -> None:
        """Write gathered features and image ids at `ptr_queue` (wrapping) and advance the pointer."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        all_idxs = concat_all_gather(idxs.view(-1))
        batch = image_feats.shape[0]
        queue_size = self.image_queue.shape[1]
        if batch > queue_size:
            raise ValueError(f"BlipRetrieval: global batch {batch} exceeds queue_size {queue_size}")
        # The pointer stays on the device (reading it would stall the step on a host sync).
        index = (torch.arange(batch, device=image_feats.device) + self.ptr_queue) % queue_size
        self.image_queue[:, index] = image_feats.T.to(self.image_queue.dtype)
        self.text_queue[:, index] = text_feats.T.to(self.text_queue.dtype)
        self.idx_queue[:, index] = all_idxs.view(1, -1).to(self.idx_queue.dtype)
        self.ptr_queue.add_(batch).remainder_(queue_size)

    @staticmethod
    def prepare_text(tokenizer, captions: list[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize pre_caption'd captions padded to `max_length` (35 for retrieval train/eval)."""
        from blip_models.tokenizer import tokenize

        return tokenize(tokenizer, captions, max_length, padding="max_length")

    def forward(
        self,
        pixel_values: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, L), [CLS] first
        attention_mask: torch.Tensor,  # (B, L)
        image_ids: torch.Tensor,  # (B,) consecutive integer per distinct image: all its captions are positives
        alpha: float | None = None,
    ) -> RetrievalOutput:
        alpha = self.config.alpha if alpha is None else alpha
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        batch = pixel_values.shape[0]
        idx = image_ids.view(-1, 1)  # (B, 1)

        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+N, Dv)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)  # (B, E)
        text_output = self.text_encoder(input_ids, attention_mask, mode="text")
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)  # (B, E)

        # ---- ITC with image-id positives over batch + queue, mixed with momentum soft targets
        idx_all = torch.cat([idx.T, self.idx_queue.clone()], dim=1)  # (1, B+Q)
        pos_idx = torch.eq(idx, idx_all).float()  # (B, B+Q)
        sim_targets = pos_idx / pos_idx.sum(dim=1, keepdim=True)
        with torch.no_grad():
            self.momentum_update()
            image_embeds_m = self.visual_encoder_m(pixel_values)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
            image_feat_m_all = torch.cat([image_feat_m.T, self.image_queue.clone()], dim=1)  # (E, B+Q)
            text_output_m = self.text_encoder_m(input_ids, attention_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_output_m.last_hidden_state[:, 0, :]), dim=-1)
            text_feat_m_all = torch.cat([text_feat_m.T, self.text_queue.clone()], dim=1)
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):  # fp32 similarities
            image_feat, text_feat = image_feat.float(), text_feat.float()
            image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()
            image_feat_m_all, text_feat_m_all = image_feat_m_all.float(), text_feat_m_all.float()
            with torch.no_grad():
                sim_i2t_m = image_feat_m @ text_feat_m_all / self.temp  # (B, B+Q)
                sim_t2i_m = text_feat_m @ image_feat_m_all / self.temp
                sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
                sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
            sim_i2t = image_feat @ text_feat_m_all / self.temp
            sim_t2i = text_feat @ image_feat_m_all / self.temp
            loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
            loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
            loss_itc = (loss_i2t + loss_t2i) / 2
        self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        encoder_input_ids = with_first_token(input_ids, self.config.text.enc_token_id)

        # ---- ITM hard negatives: online-vs-online similarity, same-image entries masked to 0; candidates from the
        # local batch, or with `negative_all_rank` from every rank's batch (image embeddings gathered with their
        # gradient, ids and masks without): BLIP's COCO setting. Same-shaped batches on every rank are required
        # (the retrieval task refills short batches; captions are padded to a fixed length).
        if self.negative_all_rank:
            idx_pool, image_feat_pool = concat_all_gather(idx), concat_all_gather(image_feat)
            text_feat_pool = concat_all_gather(text_feat)
            image_embeds_pool = all_gather_with_grad(image_embeds)
            text_ids_pool, text_atts_pool = concat_all_gather(encoder_input_ids), concat_all_gather(attention_mask)
        else:
            idx_pool, image_feat_pool, text_feat_pool = idx, image_feat, text_feat
            image_embeds_pool, text_ids_pool, text_atts_pool = image_embeds, encoder_input_ids, attention_mask
        with torch.no_grad():
            same = idx == idx_pool.T  # (B, P)
            weights_i2t = F.softmax((image_feat @ text_feat_pool.T / self.temp).float(), dim=1)
            weights_t2i = F.softmax((text_feat @ image_feat_pool.T / self.temp).float(), dim=1)
            # A row whose whole pool shows its own image has no negative; it draws from the unmasked softmax instead
            # (an all-zero row would be a device-side assert on CUDA). Deciding that on the device keeps the step
            # free of host syncs; the retrieval task refuses such batches before they reach the model
            # (`check_negatives_possible`).
            negative_image_index = torch.multinomial(negative_weights(weights_t2i, same), 1).squeeze(1)  # (B,) in pool
            negative_text_index = torch.multinomial(negative_weights(weights_i2t, same), 1).squeeze(1)
        positives = torch.arange(batch, device=pixel_values.device)
        # Pair rows: [0, B) positives, [B, 2B) text i with a hard negative image, [2B, 3B) a hard negative text with
        # image i, in one pass (BLIP runs positives and negatives as two passes: the same math).
        pair_ids = torch.cat([encoder_input_ids, encoder_input_ids, text_ids_pool[negative_text_index]])  # (3B, L)
        pair_mask = torch.cat([attention_mask, attention_mask, text_atts_pool[negative_text_index]])
        if self.share_cross_kv:
            # Each image's cross-attention keys/values projected once, not once per pair (BLIP: 3 x B images).
            cross_kv = self.text_encoder.precompute_cross_kv(image_embeds)  # per layer (B, h, 1+N, d) x 2
            if self.negative_all_rank:  # the drawn negatives may be other ranks' images: project those B
                negative_kv = self.text_encoder.precompute_cross_kv(image_embeds_pool[negative_image_index])
                cross_kv = tuple((torch.cat([key, key_n]), torch.cat([value, value_n]))
                                 for (key, value), (key_n, value_n) in zip(cross_kv, negative_kv))  # fmt: skip
                negative_rows = batch + positives
            else:
                negative_rows = negative_image_index
            pair_image = torch.cat([positives, negative_rows, positives])  # (3B,) rows of cross_kv
            output_itm = self.text_encoder.forward_pairs(pair_ids, pair_mask, cross_kv, pair_image)
        else:
            pair_embeds = torch.cat([image_embeds, image_embeds_pool[negative_image_index], image_embeds])
            output_itm = self.text_encoder(pair_ids, pair_mask, pair_embeds, None, mode="multimodal")
        itm_logits = self.itm_head(output_itm.last_hidden_state[:, 0, :])  # (3B, 2)
        itm_labels = (torch.arange(3 * batch, device=pixel_values.device) < batch).long()  # positives first
        loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)
        return RetrievalOutput(loss=loss_itc + loss_itm, loss_itc=loss_itc, loss_itm=loss_itm)

    # ----------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds (B, 1+N, Dv) for ITM, normalised ITC features (B, E))."""
        image_embeds = self.visual_encoder(pixel_values)
        return image_embeds, F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised unimodal ITC features (B, E) from `[CLS]`-first ids."""
        output = self.text_encoder(input_ids, attention_mask, mode="text")
        return F.normalize(self.text_proj(output.last_hidden_state[:, 0, :]), dim=-1)

    @torch.no_grad()
    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """2-way ITM logits (B, 2) for aligned (image_embeds[i], text[i]) pairs; position 0 becomes `[ENC]`."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        encoder_input_ids = with_first_token(input_ids, self.config.text.enc_token_id)
        output = self.text_encoder(encoder_input_ids, attention_mask, image_embeds, image_atts, mode="multimodal")
        return self.itm_head(output.last_hidden_state[:, 0, :])

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

    @torch.no_grad()
    def score(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Retrieval score of aligned pairs (B,): ITM positive logit + ITC cosine (reference evaluation)."""
        image_embeds, image_feat = self.image_features(pixel_values)
        text_feat = self.text_features(input_ids, attention_mask)
        return self.itm_logits(image_embeds, input_ids, attention_mask)[:, 1] + (image_feat * text_feat).sum(-1)


def negative_weights(weights: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """`weights` (B, P) with the entries of the row's own image (`same`) set to 0; a row left all zero keeps its
    unmasked weights (no negative exists in its pool: degenerate, refused by the retrieval task beforehand)."""
    masked = weights.masked_fill(same, 0)
    return torch.where(masked.sum(dim=1, keepdim=True) > 0, masked, weights)
