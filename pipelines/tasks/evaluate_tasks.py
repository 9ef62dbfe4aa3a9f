"""VQA, NLVR2 and zero-shot video retrieval evaluation (the second half of `evaluate.py`).

Follows BLIP's `train_vqa.py` (rank / generate inference, `vqa_result.json`), `train_nlvr.py` (accuracy) and
`eval_retrieval_video.py` (Li et al. 2022; shared/docs/blip_spec.md §4.3-§4.5). Rows (questions, pairs) are split
over the workers of `evaluate.ModelWorkers`; video retrieval reuses `evaluate.evaluate_retrieval` with video
features (`encode_video_rows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.tasks.evaluate import (K_TEST, EvaluateConfig, ModelWorkers, _annotation, evaluate_retrieval,
                                      load_images, report_batch_done, work_parts)

VIDEO_MAX_WORDS = 40  # BLIP video_dataset.py: pre_caption(caption, 40) (blip_spec text-length table)


def encode_videos(model: Any, video_paths: list[str], num_frames: int) -> tuple[Any, Any]:
    """BLIP eval_retrieval_video: `num_frames` uniform frames per video; ITC feature = normalised mean of the
    frames' projected CLS features; ITM memory = all frames' token sequences concatenated (F*(1+N), D)."""
    import torch
    import torch.nn.functional as F

    from blip_models.processing import eval_transform
    from pipelines.tasks.downstream_data import read_video_frames

    size = model.config.vision.image_size
    transform = eval_transform(size)
    device = next(model.parameters()).device
    embeds, feats = [], []
    with torch.no_grad():
        for path in video_paths:
            frames = torch.stack([transform(frame) for frame in read_video_frames(path, num_frames, size)])  # (F,3,S,S)
            tokens = model.visual_encoder(frames.to(device))  # (F, 1+N, D)
            feats.append(F.normalize(model.vision_proj(tokens[:, 0, :]).mean(dim=0), dim=-1))  # (E,)
            embeds.append(tokens.reshape(1, -1, tokens.shape[-1]))  # (1, F*(1+N), D)
    return torch.cat(embeds), torch.stack(feats)


def encode_video_rows(model: Any, video_paths: list[str], num_frames: int, rows: range) -> tuple[Any, Any]:
    """`encode_videos` of the clips in `rows` (one worker's share)."""
    return encode_videos(model, video_paths[rows.start:rows.stop], num_frames)


# ---------------------------------------------------------------------------------------------- VQA, NLVR2


def vqa_rows(model: Any, image_urls: list[str], questions: list[str], answer_list: list[str],
             options: dict[str, Any], rows: range) -> list[str]:
    """Answers of the questions in `rows` (batched rank or generate inference)."""
    from blip_models.tokenizer import load_tokenizer, tokenize

    device = next(model.parameters()).device
    tokenizer = load_tokenizer()
    options = dict(options)
    batch = options.pop("batch_size")
    answers: list[str] = []
    for start in range(rows.start, rows.stop, batch):
        stop = min(start + batch, rows.stop)
        ids, mask = tokenize(tokenizer, questions[start:stop], 35, "longest")
        pixels = load_images(image_urls[start:stop], model.config.vision.image_size)
        answers += model.answer(pixels.to(device), ids.to(device), mask.to(device), tokenizer, answer_list=answer_list,
                                **options)  # fmt: skip
        report_batch_done(stop, rows)
    return answers


def nlvr_rows(model: Any, left_urls: list[str], right_urls: list[str], sentences: list[str], batch: int,
              rows: range) -> list[int]:
    """Predicted labels (1 = True) of the pairs in `rows`."""
    import torch

    from blip_models.tokenizer import load_tokenizer, tokenize

    device = next(model.parameters()).device
    tokenizer = load_tokenizer()
    size = model.config.vision.image_size
    predictions: list[int] = []
    with torch.no_grad():
        for start in range(rows.start, rows.stop, batch):
            stop = min(start + batch, rows.stop)
            ids, mask = tokenize(tokenizer, sentences[start:stop], None, "longest")
            output = model(load_images(left_urls[start:stop], size).to(device),
                           load_images(right_urls[start:stop], size).to(device), ids.to(device), mask.to(device))
            predictions += output.logits.argmax(-1).tolist()
            report_batch_done(stop, rows)
    return predictions


def evaluate_vqa(registry: Any, dataset: Any, model_dir: str, cfg: EvaluateConfig,
                 staging: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    from blip_models.processing import pre_question
    from pipelines.tasks.downstream_data import load_answer_list, load_vqa, load_vqa_official
    from pipelines.tasks.metrics import vqa_accuracy, write_vqa_results

    annotations = dataset.metadata["annotations"]
    path = _annotation(registry, dataset, annotations[cfg.split])
    questions = load_vqa(path, "test" if cfg.split == "test" else "train")
    questions = [q for q in questions if q.dataset in ("vqa", "test")][: cfg.max_images or None]
    answer_list = load_answer_list(_annotation(registry, dataset, annotations["answer_list"]))
    options = {"mode": cfg.vqa_inference, "k_test": cfg.vqa_k_test, "num_beams": cfg.num_beams, "max_length": 10,
               "min_length": 1, "batch_size": cfg.vqa_batch_size}  # fmt: skip
    urls = [registry.url_of(dataset, f"images/{q.image}") for q in questions]
    parts = work_parts(len(questions), cfg.vqa_batch_size, cfg.num_workers)
    shared = (urls, [pre_question(q.question) for q in questions], answer_list, options)
    with ModelWorkers(model_dir, "vqa", cfg) as workers:
        answers = [a for part in workers.map(vqa_rows, shared, parts, progress=("eval vqa: questions", "questions"))
                   for a in part]  # fmt: skip
    predictions = {int(q.question_id): a for q, a in zip(questions, answers)}  # type: ignore[arg-type]
    write_vqa_results(staging / "vqa_result.json", predictions)
    details = {"num_images": len(questions), "inference": cfg.vqa_inference, "workers": cfg.num_workers}
    if cfg.split == "test":
        return {}, details, {"vqa": "test split: submit vqa_result.json to the VQA evaluation server"}
    truth = [t for t in load_vqa_official(_annotation(registry, dataset, annotations["val_questions"]),
                                          _annotation(registry, dataset, annotations["val_annotations"]))
             if t.question_id in predictions]  # fmt: skip
    scores = vqa_accuracy(predictions, truth)
    metrics = {"vqa_accuracy": scores["overall"]}
    metrics.update({f"vqa_accuracy_{kind.replace('/', '_')}": value for kind, value in scores["per_answer_type"].items()})
    notes = {}
    if dataset.metadata.get("train_on_val", True):  # BLIP's recipe; versions from before the switch did too
        notes["vqa_accuracy"] = "optimistic: this dataset's train shards include vqa_val (BLIP's recipe)"
    return metrics, details, notes


def evaluate_nlvr(registry: Any, dataset: Any, model_dir: str, cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    from blip_models.processing import pre_caption
    from pipelines.tasks.downstream_data import NLVR_MAX_WORDS, load_nlvr
    from pipelines.tasks.metrics import nlvr_accuracy

    pairs = load_nlvr(_annotation(registry, dataset, dataset.metadata["annotations"][cfg.split]))[: cfg.max_images or None]
    lefts = [registry.url_of(dataset, f"images/{p.images[0]}") for p in pairs]
    rights = [registry.url_of(dataset, f"images/{p.images[1]}") for p in pairs]
    sentences = [pre_caption(p.sentence, NLVR_MAX_WORDS) for p in pairs]
    parts = work_parts(len(pairs), cfg.image_batch_size, cfg.num_workers)
    shared = (lefts, rights, sentences, cfg.image_batch_size)
    with ModelWorkers(model_dir, "nlvr", cfg) as workers:
        predictions = [p for part in workers.map(nlvr_rows, shared, parts, progress=("eval nlvr: pairs", "pairs"))
                       for p in part]  # fmt: skip
    return ({"accuracy": nlvr_accuracy(predictions, [p.label for p in pairs])},
            {"num_images": len(pairs), "workers": cfg.num_workers})


def evaluate_video(registry: Any, dataset: Any, model_dir: str, cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    from blip_models.processing import pre_caption
    from pipelines.tasks.downstream_data import RetrievalEvalSet, load_msrvtt

    annotations = dataset.metadata["annotations"]
    if cfg.split not in annotations:  # MSRVTT 1k-A: test only; another split ran on test, labelled as asked
        raise ValueError(f"{dataset.ref} has no {cfg.split} split for video retrieval (it has: "
                         f"{', '.join(sorted(annotations))}): set split: test")  # fmt: skip
    clips = load_msrvtt(_annotation(registry, dataset, annotations[cfg.split]))[: cfg.max_images or None]
    paths = [registry.url_of(dataset, f"videos/{c.clip_name}.mp4") for c in clips]  # workers read them on any node
    texts = tuple(pre_caption(c.caption, VIDEO_MAX_WORDS) for c in clips)
    eval_set = RetrievalEvalSet(tuple(c.clip_name for c in clips), texts,
                                tuple((i,) for i in range(len(clips))), tuple(range(len(clips))))  # fmt: skip
    return evaluate_retrieval(model_dir, paths, eval_set, cfg.k_test or K_TEST["msrvtt"], cfg)
