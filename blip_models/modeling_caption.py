"""BLIP captioning model (the CapFilt captioner): ViT + image-grounded text decoder (spec §4.2, §3).

Follows BLIP `models/blip.py:BLIP_Decoder`. Training: the dataset prepends the prompt ('a picture of ') to each
caption; the LM targets mask pads and the prompt tokens (`prompt_length` = 4 with the BERT vocab: `[DEC] a picture
of`). Generation uses our own loop (blip_models.generation): beam search or nucleus sampling; `max_length` and
`min_length` count the prompt tokens, and the prompt text is sliced off the decoded strings, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from blip_models.configuration_blip import BlipConfig
from blip_models.generation import GenerationConfig, generate
from blip_models.med import BertLMHeadModel, reorder_cache, with_first_token
from blip_models.vit import VisionTransformer


@dataclass
class CaptionOutput:
    loss: torch.Tensor  # label-smoothed LM loss over caption tokens
    logits: torch.Tensor | None  # (B, L, V); None with return_logits=False


@lru_cache(maxsize=1)
def _default_tokenizer() -> Any:
    from blip_models.tokenizer import load_tokenizer

    return load_tokenizer()


class BlipCaption(nn.Module):
    """`visual_encoder` + `text_decoder` (official names)."""

    def __init__(self, config: BlipConfig, tokenizer: Any | None = None) -> None:
        super().__init__()
        if config.text.encoder_width != config.vision.width:
            raise ValueError(
                f"BlipCaption: text.encoder_width={config.text.encoder_width} must equal vision.width="
                f"{config.vision.width}"
            )
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_decoder = BertLMHeadModel(config.text)
        self.prompt = config.prompt
        # Tokens of "[CLS] a picture of [SEP]" minus the [SEP]: the prompt positions masked from the loss.
        tokenizer = tokenizer or _default_tokenizer()
        self.prompt_length = len(tokenizer(self.prompt).input_ids) - 1 if self.prompt else 1

    def prepare_text(
        self, tokenizer: Any, captions: list[str], max_length: int = 40
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the prompt to pre_caption'd captions and tokenize (pad longest, truncate to `max_length`)."""
        from blip_models.tokenizer import tokenize

        return tokenize(tokenizer, [self.prompt + caption for caption in captions], max_length, padding="longest")

    def forward(
        self,
        pixel_values: torch.Tensor,  # (B, 3, H, W)
        input_ids: torch.Tensor,  # (B, L) prompt + caption, [CLS] first (replaced by [DEC])
        attention_mask: torch.Tensor,  # (B, L)
        prompt_length: int | None = None,  # tokens masked from the loss; default self.prompt_length
        return_logits: bool = True,  # False in training: no (B, L, V) logits, the loss only
    ) -> CaptionOutput:
        text_cfg = self.config.text
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+N, Dv)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        decoder_input_ids = with_first_token(input_ids, text_cfg.bos_token_id)
        targets = decoder_input_ids.masked_fill(decoder_input_ids == text_cfg.pad_token_id, -100)
        targets[:, : self.prompt_length if prompt_length is None else prompt_length] = -100
        output = self.text_decoder(decoder_input_ids, attention_mask, image_embeds, image_atts, labels=targets,
                                   return_logits=return_logits)
        return CaptionOutput(loss=output.loss, logits=output.logits)

    @torch.no_grad()
    def generate_ids(
        self,
        pixel_values: torch.Tensor,  # (B, 3, H, W)
        prompt_ids: torch.Tensor,  # (1 or B, P) prompt tokens starting with [DEC], no [SEP]
        *,
        do_sample: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float = 0.9,
        top_k: int = 50,  # BLIP's effective sampling: transformers 4.15 filled top_k from its config default (50)
        temperature: float = 1.0,
        repetition_penalty: float | None = None,
        length_penalty: float = 1.0,
        num_return_sequences: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token ids (B * num_return_sequences, T), prompt included, grouped per image.

        `repetition_penalty=None` means the reference defaults: 1.1 when sampling, 1.0 for beam search.
        """
        text_cfg = self.config.text
        if repetition_penalty is None:
            repetition_penalty = 1.1 if do_sample else 1.0
        beams = 1 if do_sample else num_beams
        config = GenerationConfig(
            max_length=max_length, min_length=min_length, num_beams=beams, do_sample=do_sample, top_p=top_p,
            top_k=top_k, temperature=temperature, repetition_penalty=repetition_penalty,
            length_penalty=length_penalty, num_return_sequences=num_return_sequences,
            eos_token_id=text_cfg.sep_token_id, pad_token_id=text_cfg.pad_token_id,
        )  # fmt: skip
        batch = pixel_values.shape[0]
        image_embeds = self.visual_encoder(pixel_values)  # (B, 1+N, Dv)
        copies = num_return_sequences if do_sample else beams
        image_embeds = image_embeds.repeat_interleave(copies, dim=0)  # (B * copies, 1+N, Dv)
        prompt_ids = prompt_ids.to(pixel_values.device)
        prompt_ids = prompt_ids.expand(batch, -1) if prompt_ids.shape[0] == 1 else prompt_ids  # (B, P)
        input_ids = prompt_ids.repeat_interleave(copies, dim=0)  # (B * copies, P)

        def step(new_tokens: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
            output = self.text_decoder(
                new_tokens, encoder_hidden_states=image_embeds, past_key_values=past, use_cache=True
            )
            return output.logits[:, -1, :], output.past_key_values

        def reorder(past: Any, index: torch.Tensor) -> Any:
            nonlocal image_embeds
            image_embeds = image_embeds.index_select(0, index)  # keep rows aligned (identical within an item)
            return reorder_cache(past, index)

        return generate(step, reorder, input_ids, config, generator)

    @torch.no_grad()
    def generate(
        self, pixel_values: torch.Tensor, tokenizer: Any, prompt: str | None = None, **kwargs: Any
    ) -> list[str]:
        """Captions (B * num_return_sequences strings, grouped per image) with the prompt removed.

        kwargs: do_sample, num_beams, max_length, min_length, top_p, top_k, temperature, repetition_penalty,
        length_penalty, num_return_sequences, generator (see `generate_ids`).
        """
        prompt = self.prompt if prompt is None else prompt
        prompt_ids = tokenizer([prompt], return_tensors="pt").input_ids[:, :-1]  # drop the trailing [SEP]
        prompt_ids[:, 0] = self.config.text.bos_token_id
        output_ids = self.generate_ids(pixel_values, prompt_ids, **kwargs)
        captions = tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        return [caption[len(prompt) :] for caption in captions]
