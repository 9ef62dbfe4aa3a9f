"""BLIP VQA model: image-grounded question encoder + answer decoder (spec §4.3).

Follows BLIP `models/blip_vqa.py`. The question (`[ENC]` first) cross-attends to the image tokens; the answer
decoder (`[DEC]` first) cross-attends to the question states, so its cross-attention width is the text width.
Training loss = Σ_answers weight · (per-answer SUM of label-smoothed token losses) / batch size. Inference:
`'generate'` (beam search from `[DEC]`) or `'rank'` (first-token probability top-k over an answer list, then the
full-sequence score −loss, which keeps the label smoothing as the reference does). The ViT uses drop-path 0.1,
hard-coded in the reference for VQA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from blip_models.configuration_blip import BlipConfig
from blip_models.generation import GenerationConfig, generate
from blip_models.med import BertLMHeadModel, BertModel, reorder_cache, with_first_token
from blip_models.vit import VisionTransformer


@dataclass
class VQAOutput:
    loss: torch.Tensor  # weighted answer loss per question, averaged over the batch


class BlipVQA(nn.Module):
    """`visual_encoder` + `text_encoder` (question) + `text_decoder` (answer), official names."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        if config.text.encoder_width != config.vision.width:
            raise ValueError(
                f"BlipVQA: text.encoder_width={config.text.encoder_width} must equal vision.width={config.vision.width}"
            )
        self.config = config
        self.visual_encoder = VisionTransformer(dataclasses.replace(config.vision, drop_path_rate=0.1))
        self.text_encoder = BertModel(config.text)
        # The answer decoder cross-attends to question states (text width), not to the image.
        self.text_decoder = BertLMHeadModel(dataclasses.replace(config.text, encoder_width=config.text.hidden_size))

    @staticmethod
    def prepare_question(
        tokenizer: Any, questions: list[str], max_length: int = 35
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize pre_question'd questions (pad longest, truncate to 35)."""
        from blip_models.tokenizer import tokenize

        return tokenize(tokenizer, questions, max_length, padding="longest")

    def prepare_answers(self, tokenizer: Any, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize answers (pad longest, no truncation) with `[DEC]` first."""
        from blip_models.tokenizer import tokenize

        answer_ids, answer_mask = tokenize(tokenizer, answers, None, padding="longest")
        answer_ids[:, 0] = self.config.text.bos_token_id
        return answer_ids, answer_mask

    def encode_question(
        self, pixel_values: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        """Image-grounded question states (B, Lq, H); position 0 becomes `[ENC]`."""
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+N, Dv)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        encoder_ids = with_first_token(question_ids, self.config.text.enc_token_id)
        output = self.text_encoder(encoder_ids, question_mask, image_embeds, image_atts, mode="multimodal")
        return output.last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor,  # (B, 3, H, W)
        question_ids: torch.Tensor,  # (B, Lq), [CLS] first
        question_mask: torch.Tensor,  # (B, Lq)
        answer_ids: torch.Tensor,  # (A, La), all answers of all questions, [DEC] first (prepare_answers)
        answer_mask: torch.Tensor,  # (A, La)
        weights: torch.Tensor,  # (A,) answer weights
        n_answers: torch.Tensor | list[int],  # (B,) answers per question, sum = A
    ) -> VQAOutput:
        text_cfg = self.config.text
        question_states = self.encode_question(pixel_values, question_ids, question_mask)  # (B, Lq, H)
        counts = torch.as_tensor(n_answers, device=question_states.device)
        question_states = question_states.repeat_interleave(counts, dim=0)  # (A, Lq, H)
        question_atts = question_mask.repeat_interleave(counts, dim=0)
        decoder_ids = with_first_token(answer_ids, text_cfg.bos_token_id)
        targets = decoder_ids.masked_fill(decoder_ids == text_cfg.pad_token_id, -100)
        output = self.text_decoder(
            decoder_ids, answer_mask, question_states, question_atts, labels=targets, reduction="none"
        )  # loss: (A,) per-answer sums
        loss = (weights.to(output.loss.dtype) * output.loss).sum() / pixel_values.shape[0]
        return VQAOutput(loss=loss)

    @torch.no_grad()
    def rank_answers(
        self,
        question_states: torch.Tensor,  # (B, Lq, H)
        question_mask: torch.Tensor,  # (B, Lq)
        answer_ids: torch.Tensor,  # (A, La) candidates, [DEC] first
        answer_mask: torch.Tensor,  # (A, La)
        k: int = 128,
    ) -> torch.Tensor:
        """Index (B,) of the best candidate answer per question (reference two-step ranking)."""
        text_cfg = self.config.text
        num_questions = question_states.shape[0]
        k = min(k, answer_ids.shape[0])
        start_ids = answer_ids[:1, :1].expand(num_questions, 1)  # (B, 1) = [DEC]
        start_output = self.text_decoder(start_ids, None, question_states, question_mask)
        first_token_probs = start_output.logits[:, 0, :].float().softmax(dim=-1)  # (B, V)
        candidate_first = answer_ids[:, 1]  # (A,) first real token of each candidate
        prob_first = first_token_probs.index_select(1, candidate_first)  # (B, A)
        _, topk_ids = prob_first.topk(k, dim=1)  # (B, k)

        input_ids = answer_ids.index_select(0, topk_ids.reshape(-1))  # (B*k, La)
        input_atts = answer_mask.index_select(0, topk_ids.reshape(-1))
        targets = input_ids.masked_fill(input_ids == text_cfg.pad_token_id, -100)
        states = question_states.repeat_interleave(k, dim=0)  # (B*k, Lq, H)
        atts = question_mask.repeat_interleave(k, dim=0)
        output = self.text_decoder(input_ids, input_atts, states, atts, labels=targets, reduction="none")
        log_probs_sum = -output.loss.view(num_questions, k)  # label-smoothed, as the reference
        best = log_probs_sum.argmax(dim=1)  # (B,)
        return topk_ids.gather(1, best[:, None]).squeeze(1)

    @torch.no_grad()
    def answer(
        self,
        pixel_values: torch.Tensor,  # (B, 3, H, W)
        question_ids: torch.Tensor,  # (B, Lq)
        question_mask: torch.Tensor,
        tokenizer: Any,
        mode: Literal["rank", "generate"] = "rank",
        answer_list: list[str] | None = None,  # candidates for 'rank'
        k_test: int = 128,
        num_beams: int = 3,
        max_length: int = 10,
        min_length: int = 1,
    ) -> list[str]:
        """One answer string per question."""
        question_states = self.encode_question(pixel_values, question_ids, question_mask)  # (B, Lq, H)
        if mode == "rank":
            if not answer_list:
                raise ValueError("BlipVQA.answer: mode='rank' needs a non-empty answer_list")
            answer_ids, answer_mask = self.prepare_answers(tokenizer, answer_list)
            answer_ids, answer_mask = answer_ids.to(question_states.device), answer_mask.to(question_states.device)
            best = self.rank_answers(question_states, question_mask, answer_ids, answer_mask, k_test)
            return [answer_list[index] for index in best.tolist()]
        if mode != "generate":
            raise ValueError(f"BlipVQA.answer: mode must be 'rank' or 'generate', got {mode!r}")
        ids = self.generate_ids(question_states, question_mask, num_beams, max_length, min_length)
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, question_states: torch.Tensor, question_mask: torch.Tensor, num_beams: int = 3,
                     max_length: int = 10, min_length: int = 1) -> torch.Tensor:  # fmt: skip
        """Beam-search answer ids (B, T) starting from `[DEC]`."""
        text_cfg = self.config.text
        config = GenerationConfig(
            max_length=max_length, min_length=min_length, num_beams=num_beams,
            eos_token_id=text_cfg.sep_token_id, pad_token_id=text_cfg.pad_token_id,
        )  # fmt: skip
        states = question_states.repeat_interleave(num_beams, dim=0)  # (B*K, Lq, H)
        atts = question_mask.repeat_interleave(num_beams, dim=0)
        start = torch.full((states.shape[0], 1), text_cfg.bos_token_id, dtype=torch.long, device=states.device)

        def step(new_tokens: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
            output = self.text_decoder(new_tokens, None, states, atts, past_key_values=past, use_cache=True)
            return output.logits[:, -1, :], output.past_key_values

        def reorder(past: Any, index: torch.Tensor) -> Any:
            nonlocal states, atts
            states, atts = states.index_select(0, index), atts.index_select(0, index)
            return reorder_cache(past, index)

        return generate(step, reorder, start, config)
