"""The salesforce/BLIP repository's model factories and calls, so code written against it (its `demo.ipynb`,
`predict.py`) runs on our models:

    model = blip_decoder(pretrained=model_url, image_size=384, vit="base").eval()
    model.generate(image, sample=False, num_beams=3, max_length=20, min_length=5)       # ['a woman sitting ...']
    blip_vqa(pretrained=url, image_size=480)(image, question, train=False, inference="generate")
    blip_feature_extractor(pretrained=url, image_size=224)(image, caption, mode="multimodal")[0, 0]
    blip_itm(pretrained=url, image_size=384)(image, caption, match_head="itm")
    blip_nlvr(pretrained=url)(torch.cat([left, right]), text, targets, train=False)

`pretrained` is whatever our loaders take (a `.pth` path or URL, a checkpoint name, a directory); without it the
model is BLIP's `vit` ('base' or 'large') at `image_size`, randomly initialised, as BLIP's factories build it. Each
wrapper (named as BLIP's class) holds our task model (`.model`, every other attribute is the model's) and BLIP's
tokenizer settings; the arithmetic is our models' own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blip_models.lavis_compat import ModelWrapper
from blip_models.tokenizer import load_tokenizer, tokenize


class _BlipRepoModel(ModelWrapper):
    def _tokens(self, texts: str | list[str], padding: str, max_length: int | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        ids, mask = tokenize(self.tokenizer, [texts] if isinstance(texts, str) else list(texts), max_length, padding)
        return ids.to(device), mask.to(device)


class BLIP_Decoder(_BlipRepoModel):
    """`models.blip.BLIP_Decoder`: `generate(image, sample, num_beams, max_length, min_length, top_p,
    repetition_penalty)`, one caption per image (nucleus sampling uses BLIP's repetition penalty 1.1)."""

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: str = "a picture of ") -> None:
        super().__init__(model, tokenizer)
        self.prompt = prompt

    @torch.no_grad()
    def generate(self, image: torch.Tensor, sample: bool = False, num_beams: int = 3, max_length: int = 30,
                 min_length: int = 10, top_p: float = 0.9, repetition_penalty: float = 1.0) -> list[str]:  # fmt: skip
        return self.model.generate(image, self.tokenizer, prompt=self.prompt, do_sample=sample, num_beams=num_beams,
                                   max_length=max_length, min_length=min_length, top_p=top_p,
                                   repetition_penalty=1.1 if sample else repetition_penalty)  # fmt: skip


class BLIP_Base(_BlipRepoModel):
    """`models.blip.BLIP_Base`: `forward(image, caption, mode)` -> the last hidden states, unprojected: the ViT's
    (B, 1+N, Dv) for 'image', the text encoder's (B, L, H) for 'text', the image-grounded encoder's for
    'multimodal' ([ENC] first)."""

    @torch.no_grad()
    def forward(self, image: torch.Tensor, caption: str | list[str], mode: str) -> torch.Tensor:
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode parameter must be image, text, or multimodal, got {mode!r}")
        if mode == "image":
            return self.model.visual_encoder(image)
        ids, mask = self._tokens(caption, "longest", None, image.device)
        if mode == "text":
            return self.model.text_encoder(ids, mask, mode="text").last_hidden_state
        return self.multimodal(self.model.visual_encoder(image), ids, mask)


class BLIP_ITM(_BlipRepoModel):
    """`models.blip_itm.BLIP_ITM`: `forward(image, caption, match_head)` -> (B, 2) ITM logits ('itm'), or the
    (B, T) cosine of image and text [CLS] features ('itc'); texts padded to 35 tokens as BLIP's."""

    @torch.no_grad()
    def forward(self, image: torch.Tensor, caption: str | list[str], match_head: str = "itm") -> torch.Tensor:
        return self.match(image, *self._tokens(caption, "max_length", 35, image.device), match_head)


class BLIP_VQA(_BlipRepoModel):
    """`models.blip_vqa.BLIP_VQA`: `forward(image, question, answer, n, weights, train, inference, k_test)`:
    training gives the loss; `train=False` the generated answers ('generate') or, for 'rank', the index into
    `answer` (the candidate list) of each question's best answer, as BLIP's."""

    def forward(self, image: torch.Tensor, question: str | list[str], answer: list[str] | None = None,
                n: list[int] | None = None, weights: torch.Tensor | None = None, train: bool = True,
                inference: str = "rank", k_test: int = 128) -> Any:  # fmt: skip
        ids, mask = self._tokens(question, "longest", 35, image.device)
        if train:
            answer_ids, answer_mask = self.model.prepare_answers(self.tokenizer, list(answer or []))
            return self.model(image, ids, mask, answer_ids.to(image.device), answer_mask.to(image.device),
                              weights, n).loss  # fmt: skip
        with torch.no_grad():
            if inference == "generate":
                return self.model.answer(image, ids, mask, self.tokenizer, mode="generate")
            if inference != "rank":
                raise ValueError(f"inference must be 'rank' or 'generate', got {inference!r}")
            answers = self.model.answer(image, ids, mask, self.tokenizer, mode="rank", answer_list=list(answer or []),
                                        k_test=k_test)  # fmt: skip
            position = {text: index for index, text in enumerate(answer or [])}
            return torch.tensor([position[text] for text in answers], device=image.device)


class BLIP_NLVR(_BlipRepoModel):
    """`models.blip_nlvr.BLIP_NLVR`: `forward(image, text, targets, train)` with the left images then the right
    ones stacked in `image`: the loss when training, else the predicted class (1 = the statement is true)."""

    def forward(self, image: torch.Tensor, text: str | list[str], targets: torch.Tensor, train: bool = True) -> Any:
        left, right = torch.split(image, targets.size(0))
        ids, mask = self._tokens(text, "longest", None, image.device)
        if train:
            return self.model(left, right, ids, mask, labels=targets).loss
        with torch.no_grad():
            return self.model(left, right, ids, mask).logits.argmax(dim=1)


def _load(kind: str, pretrained: str, image_size: int, vit: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    from blip_models.checkpoints import build_model
    from blip_models.configuration_blip import preset
    from blip_models.inference import load_for

    if vit not in ("base", "large"):
        raise ValueError(f"vit parameter must be base or large, got {vit!r}")
    if pretrained:
        loaded = load_for(pretrained, kind, image_size=image_size)
        return loaded.model, load_tokenizer(loaded.tokenizer_source)
    config = preset(vit).replace(vision={"image_size": image_size})
    return build_model(kind, config), load_tokenizer()


def blip_decoder(pretrained: str = "", image_size: int = 384, vit: str = "base", prompt: str = "a picture of ",
                 **kwargs: Any) -> BLIP_Decoder:  # fmt: skip
    return BLIP_Decoder(*_load("caption", pretrained, image_size, vit), prompt=prompt)


def blip_feature_extractor(pretrained: str = "", image_size: int = 224, vit: str = "base",
                           **kwargs: Any) -> BLIP_Base:  # fmt: skip
    return BLIP_Base(*_load("features", pretrained, image_size, vit))


def blip_itm(pretrained: str = "", image_size: int = 384, vit: str = "base", **kwargs: Any) -> BLIP_ITM:
    return BLIP_ITM(*_load("itm", pretrained, image_size, vit))


def blip_vqa(pretrained: str = "", image_size: int = 480, vit: str = "base", **kwargs: Any) -> BLIP_VQA:
    return BLIP_VQA(*_load("vqa", pretrained, image_size, vit))


def blip_nlvr(pretrained: str = "", image_size: int = 384, vit: str = "base", **kwargs: Any) -> BLIP_NLVR:
    return BLIP_NLVR(*_load("nlvr", pretrained, image_size, vit))
