"""The finetuning TrainTasks (Li et al. 2022, salesforce/BLIP `train_{retrieval,caption,vqa,nlvr}.py`; spec §4).

Each class is one `train_loop.TrainTask` run by `finetune.run_finetune` on Ray Train: it builds the task model
(loading the init weights by key name, with a report), decodes one webdataset sample of the downstream version's
train shards (seeded augmentation), collates a micro-batch and computes the loss:

- `RetrievalTask`: ITC (image-id positives over batch + queue, momentum distillation) + ITM (hard negatives
  with same-image entries masked), alpha = 0.4 * min(1, i / len(loader)) in epoch 0 and 0.4 after.
- `CaptionTask`: LM loss of the image-grounded decoder on 'a picture of ' + caption, prompt masked from the loss.
- `VQATask`: weighted answer loss (VQA: count/len; VG: 0.2); `NLVRTask`: 2-way CE with BLIP's left/right swap.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

from pipelines.tasks.train_loop import StepInfo

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


# ---------------------------------------------------------------------------------------------- weights


def load_weights(model: Any, source: str, kind: str) -> dict[str, Any]:
    """Load a save_pretrained dir or an official .pth into a task model by key name; returns the report.

    Keys the target lacks are reported as unexpected (a pretrain checkpoint's decoder in a retrieval model),
    training state and new task heads as freshly initialised; anything else missing is an error.
    """
    from blip_models.checkpoints import (CheckpointError, accept_fresh, from_pretrained, infer_kind, is_pretrained_dir,
                                         load_into, read_official, read_pretrained_config)

    if is_pretrained_dir(source):
        source_kind, state = read_pretrained_config(source)["kind"], from_pretrained(source).state_dict()
    else:
        state = read_official(source)
        source_kind = infer_kind(state)
    report = accept_fresh(model, load_into(model, state, source=str(source), kind=kind), source_kind)
    if report.missing:
        raise CheckpointError(f"{source}: a '{source_kind}' model lacks {len(report.missing)} tensor(s) the '{kind}' "
                              f"model needs, e.g. {', '.join(report.missing[:3])}")  # fmt: skip
    return {"from": source_kind, "source": str(source), **report.to_dict()}


# ---------------------------------------------------------------------------------------------- the tasks


class _ImageTask:
    """Shared parts: model construction + init weights, image decoding with seeded augmentation, tokenizer."""

    kind = ""  # blip_models.checkpoints.MODEL_CLASSES key
    fixed_batch_size = False

    def __init__(self, model_config: dict[str, Any], data: dict[str, Any], init: str | None = None) -> None:
        from pipelines.tasks.finetune import FinetuneData

        self.model_config, self.data, self.init = model_config, FinetuneData(**data), init
        self.image_size = int(model_config["vision"]["image_size"])
        self.init_report: dict[str, Any] = {"from": "scratch"}
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers get a copy without the tokenizer
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from blip_models.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer()
        return self._tokenizer

    def build_model(self) -> Any:
        from blip_models.checkpoints import build_model, config_from_dict

        from pipelines.tasks.pretrain import shard_cache_setting
        from pipelines.tasks.shard_cache import ShardCache, local_model_source

        model = build_model(self.kind, config_from_dict(self.model_config))
        if self.init:  # a model version of a remote registry: copied to this node first
            with local_model_source(self.init, ShardCache.from_setting(shard_cache_setting(self.data))) as path:
                self.init_report = {**load_weights(model, path, self.kind), "source": self.init}
        return model

    def image(self, data: bytes, rng_seed: int) -> Any:
        from PIL import Image

        from blip_models.processing import eval_transform, train_transform
        from pipelines.tasks.train_data import DropSample
        from pipelines.tasks.train_loop import seeded

        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files
            raise DropSample("undecodable_image", str(error)) from error
        if not self.data.augment:
            return eval_transform(self.image_size)(image)
        with seeded(rng_seed):  # crop/flip use torch's global RNG, RandAugment its own seeded one
            return train_transform(self.image_size, self.data.min_scale, augment_seed=rng_seed)(image)

    @staticmethod
    def meta(raw: dict[str, bytes]) -> dict[str, Any]:
        from pipelines.tasks.train_data import DropSample

        if "json" not in raw:
            raise DropSample("no_json")
        try:
            return json.loads(raw["json"])
        except ValueError as error:
            raise DropSample("bad_json", str(error)) from error

    @staticmethod
    def image_bytes(raw: dict[str, bytes], prefix: str = "") -> bytes:
        from pipelines.tasks.train_data import DropSample

        found = next((raw[prefix + ext] for ext in IMAGE_EXTENSIONS if prefix + ext in raw), None)
        if found is None:
            raise DropSample("no_image")
        return found


def check_negatives_possible(image_ids: list[int]) -> None:
    """ITM hard negatives come from the batch's other images: a batch of one image has none. Checked here, on the
    host, so that the model's step needs no host sync to find out."""
    if len(set(image_ids)) < 2:
        raise ValueError(f"retrieval: a batch of {len(image_ids)} caption(s) shows only image id {image_ids[:1]}; ITM "
                         "hard negatives need at least two distinct images per batch (raise data.batch_size or "
                         "data.shuffle_buffer, or set data.negative_all_rank to draw from every worker's batch)")


class RetrievalTask(_ImageTask):
    """ITC + ITM finetuning with image-id positives (BLIP `blip_retrieval.py`)."""

    kind = "retrieval"
    fixed_batch_size = True  # momentum features and image ids are all-gathered into the queues every step

    def build_model(self) -> Any:
        model = super().build_model()
        model.negative_all_rank = self.data.negative_all_rank
        return model

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        from blip_models.processing import pre_caption
        from pipelines.tasks.train_data import DropSample

        meta = self.meta(raw)
        caption = pre_caption(str(meta.get("caption", "")), self.data.max_words)
        if not caption:
            raise DropSample("empty_caption")
        if not isinstance(meta.get("idx"), int):
            raise DropSample("no_image_idx")
        return {"image": self.image(self.image_bytes(raw), rng_seed), "caption": caption, "idx": meta["idx"]}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from blip_models.tokenizer import tokenize

        ids = [s["idx"] for s in samples]
        if not self.data.negative_all_rank:
            check_negatives_possible(ids)
        input_ids, attention_mask = tokenize(self.tokenizer, [s["caption"] for s in samples], 35, "max_length")
        return {"image": torch.stack([s["image"] for s in samples]), "input_ids": input_ids,
                "attention_mask": attention_mask, "idx": torch.tensor(ids)}  # fmt: skip

    def loss(self, model: Any, batch: dict[str, Any], info: StepInfo) -> tuple[Any, dict[str, Any]]:
        # BLIP train_retrieval: epoch 0 ramps alpha = 0.4 * min(1, i / len(loader)); later epochs use 0.4.
        alpha = self.model_config["alpha"] * min(1.0, info.step / info.steps_per_epoch)
        output = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["idx"], alpha=alpha)
        return output.loss, {"loss": output.loss.detach(), "loss_itc": output.loss_itc.detach(),
                             "loss_itm": output.loss_itm.detach(), "alpha": alpha}  # fmt: skip


class CaptionTask(_ImageTask):
    """Decoder LM loss on prompt + caption, prompt tokens masked (BLIP `BLIP_Decoder`)."""

    kind = "caption"

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        from blip_models.processing import pre_caption
        from pipelines.tasks.train_data import DropSample

        caption = pre_caption(str(self.meta(raw).get("caption", "")), self.data.max_words)
        if not caption:
            raise DropSample("empty_caption")
        return {"image": self.image(self.image_bytes(raw), rng_seed), "caption": caption}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from blip_models.tokenizer import tokenize

        prompt = self.model_config["prompt"]  # the dataset prepends it (BLIP coco_karpathy_train)
        texts = [prompt + s["caption"] for s in samples]
        input_ids, attention_mask = tokenize(self.tokenizer, texts, 40, "longest")
        return {"image": torch.stack([s["image"] for s in samples]), "input_ids": input_ids,
                "attention_mask": attention_mask}  # fmt: skip

    def loss(self, model: Any, batch: dict[str, Any], info: StepInfo) -> tuple[Any, dict[str, Any]]:
        output = model(batch["image"], batch["input_ids"], batch["attention_mask"], return_logits=False)
        return output.loss, {"loss": output.loss.detach(), "loss_lm": output.loss.detach()}


class VQATask(_ImageTask):
    """Weighted answer-decoder loss (BLIP `blip_vqa.py`); shard json: question, answers, weights."""

    kind = "vqa"

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        from blip_models.processing import pre_question
        from pipelines.tasks.train_data import DropSample

        meta = self.meta(raw)
        answers, weights = meta.get("answers") or [], meta.get("weights") or []
        if not answers or len(answers) != len(weights):
            raise DropSample("no_answers")
        return {"image": self.image(self.image_bytes(raw), rng_seed), "question": pre_question(meta["question"]),
                "answers": [str(a) for a in answers], "weights": [float(w) for w in weights]}  # fmt: skip

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from blip_models.tokenizer import tokenize

        question_ids, question_mask = tokenize(self.tokenizer, [s["question"] for s in samples], 35, "longest")
        answers = [a for s in samples for a in s["answers"]]
        answer_ids, answer_mask = tokenize(self.tokenizer, answers, None, "longest")
        answer_ids[:, 0] = self.model_config["text"]["bos_token_id"]
        return {"image": torch.stack([s["image"] for s in samples]), "question_ids": question_ids,
                "question_mask": question_mask, "answer_ids": answer_ids, "answer_mask": answer_mask,
                "weights": torch.tensor([w for s in samples for w in s["weights"]]),
                "n_answers": torch.tensor([len(s["answers"]) for s in samples])}  # fmt: skip

    def loss(self, model: Any, batch: dict[str, Any], info: StepInfo) -> tuple[Any, dict[str, Any]]:
        output = model(batch["image"], batch["question_ids"], batch["question_mask"], batch["answer_ids"],
                       batch["answer_mask"], batch["weights"], batch["n_answers"])  # fmt: skip
        return output.loss, {"loss": output.loss.detach()}


class NLVRTask(_ImageTask):
    """2-way classification of (left, right, sentence) (BLIP `blip_nlvr.py`); shard: left.*, right.*, json."""

    kind = "nlvr"

    def decode(self, raw: dict[str, bytes], rng_seed: int) -> dict[str, Any]:
        from pipelines.tasks.downstream_data import NLVRPair, nlvr_train_swap
        from pipelines.tasks.train_data import DropSample

        meta = self.meta(raw)
        if meta.get("label") not in (0, 1) or not meta.get("sentence"):
            raise DropSample("no_label")
        left, right = self.image_bytes(raw, "left."), self.image_bytes(raw, "right.")
        sentence = str(meta["sentence"])
        if self.data.augment:  # BLIP: p=0.5 swap the images, and left<->right in the sentence with them
            pair = NLVRPair(("left", "right"), sentence, int(meta["label"]))
            first, _, sentence = nlvr_train_swap(pair, random.Random(rng_seed))
            left, right = (left, right) if first == "left" else (right, left)
        else:
            from blip_models.processing import pre_caption

            sentence = pre_caption(sentence, 40)
        return {"left": self.image(left, rng_seed), "right": self.image(right, rng_seed + 1),
                "sentence": sentence, "label": int(meta["label"])}  # fmt: skip

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        from blip_models.tokenizer import tokenize

        input_ids, attention_mask = tokenize(self.tokenizer, [s["sentence"] for s in samples], None, "longest")
        return {"left": torch.stack([s["left"] for s in samples]), "right": torch.stack([s["right"] for s in samples]),
                "input_ids": input_ids, "attention_mask": attention_mask,
                "labels": torch.tensor([s["label"] for s in samples])}  # fmt: skip

    def loss(self, model: Any, batch: dict[str, Any], info: StepInfo) -> tuple[Any, dict[str, Any]]:
        output = model(batch["left"], batch["right"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        accuracy = (output.logits.argmax(-1) == batch["labels"]).float().mean()
        return output.loss, {"loss": output.loss.detach(), "accuracy": accuracy}


TASK_CLASSES = {"retrieval": RetrievalTask, "caption": CaptionTask, "vqa": VQATask, "nlvr": NLVRTask}
