"""BLIP pretraining model: ITC (momentum distillation + queues) + ITM (hard negatives) + LM (spec §2.1).

Follows BLIP `models/blip_pretrain.py` (Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training").
The unimodal text encoder (`text_encoder`) and the image-grounded decoder (`text_decoder.bert`) share every
parameter except self-attention (spec §1.5). Total loss = ITC + ITM + LM with equal weights. One difference in
how (not what) it computes: the images' cross-attention keys/values are projected once per step and shared by
the ITM pairs and the decoder, where the reference projects them in each of its three text passes.

Distribution: when torch.distributed is initialised, momentum features are all-gathered before they enter the
queues (as the reference); nothing else in the model knows about ranks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip_models.configuration_blip import BlipConfig
from blip_models.gather import concat_all_gather
from blip_models.med import BertLMHeadModel, BertModel, tie_encoder_decoder_weights, with_first_token
from blip_models.vit import VisionTransformer


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # loss_itc + loss_itm + loss_lm
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor


class BlipPretrain(nn.Module):
    """Pretraining model. Momentum copies and queues follow the official names (`*_m`, `image_queue`, `queue_ptr`)."""

    # Project the images' cross-attention keys/values once per step and share them between the ITM pairs and the
    # decoder (False: once per pass, as BLIP's code; the same losses and gradients, kept as the test reference).
    share_cross_kv = True

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        if config.text.encoder_width != config.vision.width:
            raise ValueError(
                f"BlipPretrain: text.encoder_width={config.text.encoder_width} must equal vision.width="
                f"{config.vision.width} (cross-attention reads ViT tokens)"
            )
        self.config = config
        text, embed_dim = config.text, config.embed_dim
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = BertModel(text)
        self.text_decoder = BertLMHeadModel(text)
        # Encoder reuses the decoder's Parameters except self-attention ('/attention' paths).
        tie_encoder_decoder_weights(self.text_encoder, self.text_decoder.bert, skip_key="/attention")
        self.vision_proj = nn.Linear(config.vision.width, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))

        # Momentum encoders: EMA copies, never trained by gradient.
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for module in self._momentum_modules():
            module.requires_grad_(False)

        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, config.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------------------------------ momentum / queue

    def _model_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    def _momentum_modules(self) -> list[nn.Module]:
        return [momentum for _, momentum in self._model_pairs()]

    @torch.no_grad()
    def copy_params(self) -> None:
        """Reset momentum copies to the online weights (after loading a checkpoint without momentum keys)."""
        for online, momentum in self._model_pairs():
            for param, param_m in zip(online.parameters(), momentum.parameters(), strict=True):
                param_m.copy_(param)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_m ← m·θ_m + (1 − m)·θ for every (online, momentum) pair."""
        online_params, momentum_params = [], []
        for online, momentum in self._model_pairs():
            for param, param_m in zip(online.parameters(), momentum.parameters(), strict=True):
                online_params.append(param.detach())
                momentum_params.append(param_m)
        torch._foreach_lerp_(momentum_params, online_params, 1.0 - self.config.momentum)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Write gathered momentum features (B_global, E) at `queue_ptr` (wrapping) and advance the pointer."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        batch = image_feats.shape[0]
        queue_size = self.image_queue.shape[1]
        if batch > queue_size:
            raise ValueError(f"BlipPretrain: global batch {batch} exceeds queue_size {queue_size}")
        # The pointer stays on the device (reading it would stall the step on a host sync).
        index = (torch.arange(batch, device=image_feats.device) + self.queue_ptr) % queue_size
        self.image_queue[:, index] = image_feats.T.to(self.image_queue.dtype)
        self.text_queue[:, index] = text_feats.T.to(self.text_queue.dtype)
        self.queue_ptr.add_(batch).remainder_(queue_size)

    # ------------------------------------------------------------------------------------------------- forward

    def _itc_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, image_feat_all, text_feat_all, alpha):
        """ITC with momentum distillation; positive = same index in the batch. Returns (loss, sim_i2t, sim_t2i)."""
        with torch.no_grad():
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp  # (B, B+Q)
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            sim_targets = torch.zeros_like(sim_i2t_m)
            sim_targets.fill_diagonal_(1)
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / self.temp  # (B, B+Q)
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        return (loss_i2t + loss_t2i) / 2, sim_i2t, sim_t2i

    def _cross_attention_tied(self) -> bool:
        encoder, decoder = self.text_encoder.encoder.layer, self.text_decoder.bert.encoder.layer
        return all(e.crossattention.self.key.weight is d.crossattention.self.key.weight
                   and e.crossattention.self.value.weight is d.crossattention.self.value.weight
                   for e, d in zip(encoder, decoder))  # fmt: skip

    @torch.no_grad()
    def _hard_negatives(self, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                        image_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(negative image per text, negative text per image), each (B,), drawn from the in-batch similarity
        softmax, never the positive nor another pair of the same image.

        A row whose every other pair shows its own image (a degenerate batch) falls back to BLIP's own rule, any
        other pair; deciding that on the device keeps the step free of host syncs."""
        batch = sim_i2t.shape[0]
        if batch < 2:
            raise ValueError("BlipPretrain: ITM needs at least two pairs per batch for hard negatives")
        weights_t2i = F.softmax(sim_t2i[:, :batch].float(), dim=1) + 1e-4  # (B, B)
        weights_i2t = F.softmax(sim_i2t[:, :batch].float(), dim=1) + 1e-4
        diagonal = torch.eye(batch, dtype=torch.bool, device=sim_i2t.device)
        same = diagonal if image_ids is None else diagonal | (image_ids.view(-1, 1) == image_ids.view(1, -1))

        def allowed(weights: torch.Tensor) -> torch.Tensor:
            strict = weights.masked_fill(same, 0)
            return torch.where(strict.sum(dim=1, keepdim=True) > 0, strict, weights.masked_fill(diagonal, 0))

        negative_image = torch.multinomial(allowed(weights_t2i), 1).squeeze(1)
        return negative_image, torch.multinomial(allowed(weights_i2t), 1).squeeze(1)

    @staticmethod
    def prepare_text(tokenizer, captions: list[str], max_length: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize pre_caption'd captions, padded to `max_length` (reference pretraining setting)."""
        from blip_models.tokenizer import tokenize

        return tokenize(tokenizer, captions, max_length, padding="max_length")

    def forward(
        self,
        pixel_values: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, L) tokenizer output, [CLS] first
        attention_mask: torch.Tensor,  # (B, L)
        alpha: float | None = None,  # distillation weight; None = config.alpha (the trainer ramps it)
        image_ids: torch.Tensor | None = None,  # (B,) optional: same-image pairs are never hard negatives
    ) -> PretrainOutput:
        alpha = self.config.alpha if alpha is None else alpha
        text_cfg = self.config.text
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        batch = pixel_values.shape[0]

        # ---- ITC: online features
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+N, Dv)
        # Every image token is visible to cross-attention (BLIP's all-ones image_atts): no mask at all, which is the
        # same attention and lets SDPA pick its flash kernel (an additive mask rules it out).
        image_atts = None
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)  # (B, E)
        text_output = self.text_encoder(input_ids, attention_mask, mode="text")
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)  # (B, E)

        # ---- ITC: momentum features and distillation targets
        with torch.no_grad():
            self.momentum_update()
            image_embeds_m = self.visual_encoder_m(pixel_values)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)  # (B, E)
            image_feat_all = torch.cat([image_feat_m.T, self.image_queue.clone()], dim=1)  # (E, B+Q)
            text_output_m = self.text_encoder_m(input_ids, attention_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_output_m.last_hidden_state[:, 0, :]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.T, self.text_queue.clone()], dim=1)  # (E, B+Q)

        # Similarities and softmaxes in fp32 even under autocast (temperature 0.07 amplifies bf16 rounding).
        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            image_feat, text_feat = image_feat.float(), text_feat.float()
            image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()
            image_feat_all, text_feat_all = image_feat_all.float(), text_feat_all.float()
            loss_itc, sim_i2t, sim_t2i = self._itc_loss(
                image_feat, text_feat, image_feat_m, text_feat_m, image_feat_all, text_feat_all, alpha
            )
        self.dequeue_and_enqueue(image_feat_m, text_feat_m)

        # ---- ITM: one hard negative image per text and one hard negative text per image (local batch)
        negative_image_index, negative_text_index = self._hard_negatives(sim_i2t, sim_t2i, image_ids)  # (B,) each
        positives = torch.arange(batch, device=pixel_values.device)
        # Pair rows: [0, B) positives, [B, 2B) text i with a hard negative image, [2B, 3B) a hard negative text with
        # image i. One pass over all 3B pairs (BLIP runs positives and negatives as two passes: the same math).
        pair_image = torch.cat([positives, negative_image_index, positives])  # (3B,)
        pair_text = torch.cat([positives, positives, negative_text_index])
        encoder_input_ids = with_first_token(input_ids, text_cfg.enc_token_id)  # (B, L)
        pair_ids, pair_mask = encoder_input_ids[pair_text], attention_mask[pair_text]  # (3B, L)
        decoder_input_ids = with_first_token(input_ids, text_cfg.bos_token_id)  # LM: [DEC] first, pads ignored
        decoder_targets = decoder_input_ids.masked_fill(decoder_input_ids == text_cfg.pad_token_id, -100)
        if self.share_cross_kv and self._cross_attention_tied():
            # Each cross-attention layer's image keys/values, projected once per image: the ITM pairs pick rows of
            # them, and the decoder's cross-attention is the encoder's (tied weights, §1.5). BLIP's code projects
            # them in every pass, 4 x B images per step: ~1/6 of a BLIP-base step's FLOPs.
            cross_kv = self.text_encoder.precompute_cross_kv(image_embeds)  # per layer (B, h, 1+N, d) x 2
            output_itm = self.text_encoder.forward_pairs(pair_ids, pair_mask, cross_kv, pair_image)
            decoder_output = self.text_decoder(decoder_input_ids, attention_mask, labels=decoder_targets,
                                               return_logits=False, cross_kv=cross_kv)  # fmt: skip
        else:
            output_itm = self.text_encoder(pair_ids, pair_mask, image_embeds[pair_image], image_atts, mode="multimodal")
            decoder_output = self.text_decoder(decoder_input_ids, attention_mask, image_embeds, image_atts,
                                               labels=decoder_targets, return_logits=False)  # fmt: skip
        itm_logits = self.itm_head(output_itm.last_hidden_state[:, 0, :])  # (3B, 2)
        itm_labels = (torch.arange(3 * batch, device=pixel_values.device) < batch).long()  # positives first
        loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)
        loss_lm = decoder_output.loss

        return PretrainOutput(loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm, loss_lm=loss_lm)
