"""LAVIS's calling convention for its BLIP models, so that LAVIS's examples run as written on what
`inference.load_model_and_preprocess` returns:

    model, vis_processors, txt_processors = load_model_and_preprocess("blip_caption", "base_coco", is_eval=True)
    image = vis_processors["eval"](raw_image).unsqueeze(0)
    model.generate({"image": image})                                           # ['a large fountain ...']
    model.generate({"image": image}, use_nucleus_sampling=True, num_captions=3)
    model.extract_features({"image": image, "text_input": [text]}, mode="image").image_embeds_proj[:, 0, :]
    model({"image": image, "text_input": [text]}, match_head="itm")            # (B, 2) ITM logits
    model.predict_answers({"image": image, "text_input": [question]}, answer_list=answers)
    model.predict({"image0": left, "image1": right, "text_input": [sentence]})["predictions"]  # NLVR2 (B, 2)
    gradcams, _ = compute_gradcam(model, image, text, model.tokenizer(text, return_tensors="pt"), block_num=7)
    model({"image": image, "text_input": [txt_processors["train"](caption)]}).loss  # a training step's loss

`LavisModel` wraps our model (`.model`; every other attribute is the model's) with the tokenizer LAVIS's models
hold inside, and takes LAVIS's `samples` dicts and keyword names; the arithmetic is our models' own (the same as
the `blip infer` tasks). Texts are expected already cleaned by the returned text processors, as in LAVIS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip_models.med import with_first_token


@dataclass
class BlipOutputFeatures:
    """LAVIS's feature output: every token, projected features L2-normalised per token ([:, 0, :] is the [CLS])."""

    image_embeds: torch.Tensor | None = None  # (B, 1+N, Dv)
    image_embeds_proj: torch.Tensor | None = None  # (B, 1+N, E)
    text_embeds: torch.Tensor | None = None  # (B, L, H)
    text_embeds_proj: torch.Tensor | None = None  # (B, L, E)
    multimodal_embeds: torch.Tensor | None = None  # (B, L, H): the image-grounded text encoder, [ENC] first


@dataclass
class BlipOutput:
    """LAVIS's training output: `loss` is what its runner back-propagates, with its parts where the model has
    several (retrieval: ITC + ITM; pretraining: + LM); NLVR2 also gives the logits."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    loss_lm: torch.Tensor | None = None


class ModelWrapper(nn.Module):
    """One of our models (`.model`) with another library's calls around it (here LAVIS's; `blip_compat`: the BLIP
    repository's); every attribute the wrapper lacks is the model's (config, visual_encoder, ...)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "model" not in modules:
                raise
            return getattr(modules["model"], name)

    def multimodal(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The image-grounded text encoder's states (B, L, H) of text i over image i, [ENC] first."""
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        ids = with_first_token(ids, self.model.config.text.enc_token_id)
        return self.model.text_encoder(ids, mask, image_embeds, atts, mode="multimodal").last_hidden_state

    def match(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, match_head: str) -> torch.Tensor:
        """An ITM model's two heads as both libraries call them: 'itm', the (B, 2) ITM logits of image i with text
        i; 'itc', the (B, T) cosine of every image [CLS] feature with every text's."""
        image_embeds = self.model.visual_encoder(image)
        if match_head == "itm":
            return self.model.itm_logits(image_embeds, ids, mask)
        if match_head != "itc":
            raise ValueError(f"match_head must be 'itm' or 'itc', got {match_head!r}")
        image_feat = F.normalize(self.model.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_states = self.model.text_encoder(ids, mask, mode="text").last_hidden_state
        return image_feat @ F.normalize(self.model.text_proj(text_states[:, 0, :]), dim=-1).T


class LavisModel(ModelWrapper):
    """One of our BLIP task models with LAVIS's methods for its kind: caption `generate`, feature extractor
    `extract_features`, ITM `forward(samples, match_head)`, VQA `predict_answers`, NLVR2 `predict`; and LAVIS's
    training `forward(samples)` of the pretraining, retrieval, caption, VQA and NLVR2 models (their loss, as
    LAVIS's runner takes it)."""

    def __init__(self, model: nn.Module, kind: str, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        self.kind = kind

    def _needs(self, method: str, *kinds: str) -> None:
        if self.kind not in kinds:
            raise TypeError(f"{method}: LAVIS's BLIP {' / '.join(kinds)} models have it; this is a '{self.kind}' model")

    def _texts(self, samples: dict[str, Any], max_length: int | None = 35) -> tuple[torch.Tensor, torch.Tensor]:
        from blip_models.tokenizer import tokenize

        texts = samples["text_input"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids, mask = tokenize(self.tokenizer, texts, max_length, padding="longest")
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(self, samples: dict[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 3,
                 max_length: int = 30, min_length: int = 10, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 num_captions: int = 1) -> list[str]:  # fmt: skip
        """LAVIS's `BlipCaption.generate` (its defaults): `num_captions` per image, grouped per image."""
        self._needs("generate", "caption")
        return self.model.generate(samples["image"], self.tokenizer, num_beams=num_beams, max_length=max_length,
                                   min_length=min_length, do_sample=use_nucleus_sampling, top_p=top_p,
                                   repetition_penalty=repetition_penalty,
                                   num_return_sequences=num_captions)  # fmt: skip

    @torch.no_grad()
    def extract_features(self, samples: dict[str, Any], mode: str = "multimodal") -> BlipOutputFeatures:
        """LAVIS's `BlipFeatureExtractor.extract_features`: 'image', 'text' or 'multimodal' (the default)."""
        self._needs("extract_features", "features", "pretrain", "retrieval", "itm")
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"extract_features: mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        model, output = self.model, BlipOutputFeatures()
        if mode in ("text", "multimodal"):
            ids, mask = self._texts(samples)
        if mode == "text":
            output.text_embeds = model.text_encoder(ids, mask, mode="text").last_hidden_state
            output.text_embeds_proj = F.normalize(model.text_proj(output.text_embeds), dim=-1)
            return output
        image_embeds = model.visual_encoder(samples["image"])
        if mode == "image":
            output.image_embeds = image_embeds
            output.image_embeds_proj = F.normalize(model.vision_proj(image_embeds), dim=-1)
            return output
        output.image_embeds = image_embeds
        output.multimodal_embeds = self.multimodal(image_embeds, ids, mask)
        return output

    def forward(self, samples: dict[str, Any], match_head: str = "itm", is_train: bool = True) -> Any:
        """LAVIS's `forward(samples)` of the model's kind. ITM (`BlipITM`): 'itm' gives the (B, 2) ITM logits of
        image i with text i, 'itc' the (B, T) cosine of every image [CLS] feature with every text's. Caption:
        the LM loss of `text_input` (the train text processor's output: prompt + caption; the prompt's tokens
        are not scored). VQA: the answers' weighted LM loss (`answer`: every question's answers in one list,
        `weight`, `n_answers`). NLVR2 (`image0`, `image1`, `text_input`, `label`): the cross-entropy, or with
        `is_train=False` LAVIS's {"predictions": (B, 2) logits, "targets": label}. Pretraining and retrieval
        (`epoch`, `iters`, `num_iters_per_epoch`; retrieval also `image_id`): ITC (+ ITM, + LM) with the
        distillation weight ramped up as LAVIS does, over the first epoch (pretraining) or two (retrieval)."""
        if self.kind == "itm":
            return self.match(samples["image"], *self._texts(samples), match_head)
        if self.kind in ("pretrain", "retrieval"):
            ids, mask = self._texts(samples)
            epochs = 1 if self.kind == "pretrain" else 2  # LAVIS's _rampup_factor of each model
            per_epoch = samples["num_iters_per_epoch"]
            ramp = min(1.0, (samples["epoch"] * per_epoch + samples["iters"]) / (epochs * per_epoch))
            alpha = self.model.config.alpha * ramp
            if self.kind == "pretrain":
                out = self.model(samples["image"], ids, mask, alpha=alpha)
                return BlipOutput(loss=out.loss, loss_itc=out.loss_itc, loss_itm=out.loss_itm, loss_lm=out.loss_lm)
            image_ids = torch.as_tensor(samples["image_id"], device=ids.device)
            out = self.model(samples["image"], ids, mask, image_ids, alpha=alpha)
            return BlipOutput(loss=out.loss, loss_itc=out.loss_itc, loss_itm=out.loss_itm)
        if self.kind == "caption":
            ids, mask = self._texts(samples, max_length=40)  # LAVIS's BlipCaption max_txt_len
            return BlipOutput(loss=self.model(samples["image"], ids, mask, return_logits=False).loss)
        if self.kind == "vqa":
            ids, mask = self._texts(samples)
            answer_ids, answer_mask = self.model.prepare_answers(self.tokenizer, list(samples["answer"]))
            device = ids.device
            loss = self.model(samples["image"], ids, mask, answer_ids.to(device), answer_mask.to(device),
                              torch.as_tensor(samples["weight"], device=device),
                              torch.as_tensor(samples["n_answers"], device=device)).loss  # fmt: skip
            return BlipOutput(loss=loss)
        self._needs("forward(samples)", "itm", "pretrain", "retrieval", "caption", "vqa", "nlvr")
        ids, mask = self._texts(samples, max_length=None)  # LAVIS's NLVR2 pads, never truncates
        labels = samples.get("label")
        output = self.model(samples["image0"], samples["image1"], ids, mask,
                            labels=labels.to(ids.device) if is_train and labels is not None else None)  # fmt: skip
        if not is_train:
            return {"predictions": output.logits, "targets": labels}
        if output.loss is None:
            raise ValueError("forward: an NLVR2 training step needs samples['label'] (or is_train=False)")
        return BlipOutput(loss=output.loss, logits=output.logits)

    @torch.no_grad()
    def predict(self, samples: dict[str, Any]) -> dict[str, Any]:
        """LAVIS's `BlipNLVR.predict`: {"predictions": (B, 2) logits (index 1: the sentence is true of the image
        pair), "targets": samples' label or None}."""
        self._needs("predict", "nlvr")
        return self.forward(samples, is_train=False)

    @torch.no_grad()
    def predict_answers(self, samples: dict[str, Any], num_beams: int = 3, inference_method: str = "rank",
                        max_len: int = 10, min_len: int = 1, num_ans_candidates: int = 128,
                        answer_list: list[str] | None = None, **_: Any) -> list[str]:  # fmt: skip
        """LAVIS's `BlipVQA.predict_answers`: the answer to question i about image i, ranked from `answer_list`
        ('rank', the candidates kept after the first token: `num_ans_candidates`) or generated ('generate')."""
        self._needs("predict_answers", "vqa")
        if inference_method == "rank" and not answer_list:
            raise ValueError("predict_answers: inference_method='rank' needs answer_list (or use 'generate')")
        ids, mask = self._texts(samples)
        return self.model.answer(samples["image"], ids, mask, self.tokenizer, mode=inference_method,
                                 answer_list=answer_list, k_test=num_ans_candidates, num_beams=num_beams,
                                 max_length=max_len, min_length=min_len)  # fmt: skip


def compute_gradcam(model: nn.Module, visual_input: torch.Tensor, text_input: list[str], tokenized_text: Any,
                    block_num: int = 6) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
    """LAVIS's `compute_gradcam` (blip_image_text_matching) for image i with text i (`tokenized_text`: the texts
    tokenized, with `input_ids` and `attention_mask`): per pair the maps (2 + L - 1, g, g) in LAVIS's order, the
    [ENC] position's, the average over the words, then each position after [ENC] (padding zero); and the ITM
    logits. `inference.gradcam` is the same arithmetic per word, with the words named."""
    from blip_models.inference import pair_gradcams

    del text_input  # LAVIS takes it for its own forward; the tokenized texts are what is scored
    itm = model.model if isinstance(model, LavisModel) else model
    device = visual_input.device
    ids, mask = tokenized_text["input_ids"].to(device), tokenized_text["attention_mask"].to(device)
    cams, logits = pair_gradcams(itm, visual_input, ids, mask, block_num)
    results = []
    for row in range(cams.shape[0]):
        words = int(mask[row].sum()) - 2  # between [CLS] and [SEP]
        average = cams[row, 1 : words + 1].sum(0, keepdim=True) / max(words, 1)
        results.append(torch.cat([cams[row, :1], average, cams[row, 1:]]))
    return results, logits
