"""VQAv2, NLVR2, MSRVTT, NoCaps and VG-caption sets as dataset versions (the non-Karpathy half of `downstream.py`).

Follows BLIP's `vqa_dataset.py`, `nlvr_dataset.py`, `video_dataset.py`, `nocaps_dataset.py` (Li et al. 2022;
shared/docs/blip_spec.md §4.2-§4.5, §8.2). Each version holds the public annotation files unchanged under
`annotation/`, the media under `images/` (`videos/` for MSRVTT), and the training split again as webdataset shards
for the training engine:

- vqa: `{key}.jpg` + `{key}.json` (`question`, `answers`, `weights`, `dataset`, `question_id`) from
  vqa_train + vqa_val + vg_qa (BLIP `train_files`; vqa_val only with `vqa_train_on_val`), weights as BLIP
  computes them;
- nlvr: `{key}.left.<ext>` + `{key}.right.<ext>` + `{key}.json` (`sentence`, `label`) from nlvr_train;
- msrvtt: no training shards (zero-shot evaluation only);
- nocaps: `nocaps_{val,test}.json` (`{"image", "img_id"}`) + images, no shards and no references (the
  captions are scored by the official server from `nocaps_<split>_results.json`);
- vg_caption: BLIP's human-annotated pretraining pairs (`vg_caption.json`, `{"image", "caption"}`): train shards
  only (`{key}.jpg` + `{key}.json` as the Karpathy train pairs), for pretraining beside the web data.
Each stager returns (files, counts, drop_reasons, metadata) for `downstream.publish_downstream`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pipelines.tasks.downstream import copy_file, counted

VQA_FILES = {"train": ("vqa_train.json", "vqa_val.json", "vg_qa.json"), "test": "vqa_test.json",
             "answer_list": "answer_list.json", "val_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
             "val_annotations": "v2_mscoco_val2014_annotations.json", "val": "vqa_val.json"}  # fmt: skip
NLVR_SPLITS = {"train": "nlvr_train.json", "val": "nlvr_dev.json", "test": "nlvr_test.json"}  # LAVIS: test = dev


def _shard_writer(staging: Path, cfg: Any) -> Any:
    from pipelines.tasks.webdata import TarShardWriter

    return TarShardWriter(staging, "train", cfg.samples_per_shard)


def _suffix(path: str) -> str:
    extension = Path(path).suffix.lower().lstrip(".") or "jpg"
    return "jpg" if extension == "jpeg" else extension


def stage_vqa(staging: Path, annotation_dir: Path, image_root: Path, cfg: Any) -> tuple[list, dict, dict, dict]:
    from pipelines.tasks.downstream_data import (AnnotationError, load_answer_list, load_vqa, load_vqa_official,
                                                 vqa_answer_weights)

    files: list[dict[str, Any]] = []
    drops: dict[str, int] = {}
    train = []
    for name in VQA_FILES["train"]:
        path = annotation_dir / name
        if name == VQA_FILES["val"] and not cfg.vqa_train_on_val:
            continue  # held out: val accuracy on unseen questions (copied below as the val split)
        if path.is_file():  # vg_qa.json is optional (BLIP trains with it, LAVIS's coco_vqa does not)
            train += load_vqa(path, "train")
            copy_file(path, staging, f"annotation/{name}", files, "annotation")
    test = load_vqa(annotation_dir / VQA_FILES["test"], "test")
    load_answer_list(annotation_dir / VQA_FILES["answer_list"])
    val_truth = load_vqa_official(annotation_dir / VQA_FILES["val_questions"], annotation_dir / VQA_FILES["val_annotations"])
    for key in ("test", "answer_list", "val_questions", "val_annotations"):
        copy_file(annotation_dir / VQA_FILES[key], staging, f"annotation/{VQA_FILES[key]}", files, "annotation")
    val = load_vqa(annotation_dir / VQA_FILES["val"], "train")
    if not cfg.vqa_train_on_val:
        copy_file(annotation_dir / VQA_FILES["val"], staging, f"annotation/{VQA_FILES['val']}", files, "annotation")
    val_ids = {truth.question_id for truth in val_truth}
    if not {q.question_id for q in val} <= val_ids:
        raise AnnotationError(annotation_dir / VQA_FILES["val"], "questions missing from the official val annotations")
    images = {q.image for q in test} | {q.image for q in val}
    missing = sorted(i for i in images if not (image_root / i).is_file())
    if missing:
        raise AnnotationError(annotation_dir, f"{len(missing)} val/test images missing under {image_root} (first: {missing[0]})")
    kept = [q for q in train if (image_root / q.image).is_file()]
    if len(kept) < len(train):
        drops["missing_image"] = len(train) - len(kept)
    order = list(range(len(kept)))
    random.Random(cfg.shuffle_seed).shuffle(order)
    with _shard_writer(staging, cfg) as writer:
        for number, index in enumerate(counted(order, "downstream: train shards", "questions")):
            question = kept[index]
            weights = vqa_answer_weights(question)
            meta = {"question": question.question, "answers": list(weights), "weights": list(weights.values()),
                    "dataset": question.dataset, "question_id": question.question_id, "image": question.image}
            writer.write(f"{number:08d}", {_suffix(question.image): (image_root / question.image).read_bytes(),
                                           "json": json.dumps(meta).encode()})  # fmt: skip
    files += writer.entries(role="shard", split="train")
    for image in sorted(images | {q.image for q in kept}):
        copy_file(image_root / image, staging, f"images/{image}", files, "image")
    counts = {"train_items": len(kept), "val_items": len(val), "test_items": len(test)}
    metadata = {"benchmark": "vqa", "format": "vqa", "image_root": "images", "train_on_val": cfg.vqa_train_on_val,
                "annotations": {"val": f"annotation/{VQA_FILES['val']}", "test": f"annotation/{VQA_FILES['test']}",
                                "answer_list": f"annotation/{VQA_FILES['answer_list']}",
                                "val_questions": f"annotation/{VQA_FILES['val_questions']}",
                                "val_annotations": f"annotation/{VQA_FILES['val_annotations']}"}}  # fmt: skip
    return files, counts, drops, metadata


def stage_nlvr(staging: Path, annotation_dir: Path, image_root: Path, cfg: Any) -> tuple[list, dict, dict, dict]:
    from pipelines.tasks.downstream_data import AnnotationError, load_nlvr

    files: list[dict[str, Any]] = []
    splits = {split: load_nlvr(annotation_dir / name) for split, name in NLVR_SPLITS.items()}
    for split, name in NLVR_SPLITS.items():
        copy_file(annotation_dir / name, staging, f"annotation/{name}", files, "annotation")
    for split in ("val", "test"):
        missing = [i for pair in splits[split] for i in pair.images if not (image_root / i).is_file()]
        if missing:
            raise AnnotationError(annotation_dir / NLVR_SPLITS[split], f"{len(missing)} images missing (first: {missing[0]})")
    train = [p for p in splits["train"] if all((image_root / i).is_file() for i in p.images)]
    drops = {"missing_image": len(splits["train"]) - len(train)} if len(train) < len(splits["train"]) else {}
    order = list(range(len(train)))
    random.Random(cfg.shuffle_seed).shuffle(order)
    with _shard_writer(staging, cfg) as writer:
        for number, index in enumerate(counted(order, "downstream: train shards", "pairs")):
            pair = train[index]
            left, right = pair.images
            writer.write(f"{number:08d}", {f"left.{_suffix(left)}": (image_root / left).read_bytes(),
                                           f"right.{_suffix(right)}": (image_root / right).read_bytes(),
                                           "json": json.dumps({"sentence": pair.sentence, "label": pair.label,
                                                               "images": list(pair.images)}).encode()})  # fmt: skip
    files += writer.entries(role="shard", split="train")
    images = sorted({i for split in ("val", "test") for p in splits[split] for i in p.images} |
                    {i for p in train for i in p.images})  # fmt: skip
    for image in images:
        copy_file(image_root / image, staging, f"images/{image}", files, "image")
    counts = {"train_items": len(train), "val_items": len(splits["val"]), "test_items": len(splits["test"])}
    metadata = {"benchmark": "nlvr", "format": "nlvr", "image_root": "images",
                "annotations": {split: f"annotation/{name}" for split, name in NLVR_SPLITS.items()}}  # fmt: skip
    return files, counts, drops, metadata


def stage_msrvtt(staging: Path, annotation_dir: Path, video_root: Path, cfg: Any) -> tuple[list, dict, dict, dict]:
    from pipelines.tasks.downstream_data import AnnotationError, load_msrvtt

    files: list[dict[str, Any]] = []
    path = annotation_dir / "msrvtt_test.jsonl"
    clips = load_msrvtt(path)
    missing = [c.clip_name for c in clips if not (video_root / f"{c.clip_name}.mp4").is_file()]
    if missing:
        raise AnnotationError(path, f"{len(missing)} videos missing under {video_root} (first: {missing[0]}.mp4)")
    copy_file(path, staging, "annotation/msrvtt_test.jsonl", files, "annotation")
    for name in sorted({c.clip_name for c in clips}):
        copy_file(video_root / f"{name}.mp4", staging, f"videos/{name}.mp4", files, "image")
    metadata = {"benchmark": "msrvtt", "format": "msrvtt", "video_root": "videos",
                "annotations": {"test": "annotation/msrvtt_test.jsonl"}}
    return files, {"test_items": len(clips)}, {}, metadata


def stage_nocaps(staging: Path, annotation_dir: Path, image_root: Path, cfg: Any) -> tuple[list, dict, dict, dict]:
    from pipelines.tasks.downstream_data import AnnotationError, load_nocaps

    files: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    images: set[str] = set()
    for split in ("val", "test"):
        path = annotation_dir / f"nocaps_{split}.json"
        items = load_nocaps(path)
        ids = [item.img_id for item in items]
        if len(set(ids)) != len(ids):  # the server file needs exactly one caption per img_id
            raise AnnotationError(path, "duplicate img_id")
        missing = [item.image for item in items if not (image_root / item.image).is_file()]
        if missing:  # an evaluation split with holes is not the benchmark any more
            raise AnnotationError(path, f"{len(missing)} images missing under {image_root} (first: {missing[0]})")
        copy_file(path, staging, f"annotation/nocaps_{split}.json", files, "annotation")
        images.update(item.image for item in items)
        counts[f"{split}_items"] = len(items)
    for image in sorted(images):
        copy_file(image_root / image, staging, f"images/{image}", files, "image")
    metadata = {"benchmark": "nocaps", "format": "nocaps", "image_root": "images",
                "annotations": {split: f"annotation/nocaps_{split}.json" for split in ("val", "test")}}
    return files, counts, {}, metadata


def stage_vg_caption(staging: Path, annotation_dir: Path, image_root: Path, cfg: Any) -> tuple[list, dict, dict, dict]:
    """Human-annotated pretraining pairs (`vg_caption.json`): train shards only, images inside the shards."""
    from pipelines.tasks.downstream import pairs_with_images, write_train_shards
    from pipelines.tasks.downstream_data import consecutive_image_ids, load_caption_pairs

    path = annotation_dir / "vg_caption.json"
    present, drops = pairs_with_images(path, load_caption_pairs(path), image_root)
    files: list[dict[str, Any]] = []
    copy_file(path, staging, "annotation/vg_caption.json", files, "annotation")
    files += write_train_shards(staging, present, consecutive_image_ids(present), image_root, cfg)
    counts = {"train_items": len(present), "train_images": len({pair.image_id for pair in present})}
    metadata = {"benchmark": "vg_caption", "format": "pairs", "annotations": {"train": "annotation/vg_caption.json"}}
    return files, counts, drops, metadata


STAGERS = {"vqa": stage_vqa, "nlvr": stage_nlvr, "msrvtt": stage_msrvtt, "nocaps": stage_nocaps,
           "vg_caption": stage_vg_caption}
