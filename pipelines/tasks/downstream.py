"""The clean downstream set as a dataset version: COCO / Flickr30k Karpathy splits for retrieval and captioning.

Follows BLIP's `data/coco_karpathy_dataset.py` / `flickr30k_dataset.py` (Li et al. 2022; shared/docs/blip_spec.md
§4.1, §4.2, §8.2). A version holds exactly what a user downloads for the benchmark, in the official schemas:

    annotation/coco_karpathy_{train,val,test}.json      (or flickr30k_{train,val,test}.json)
    annotation/coco_gt/coco_karpathy_{val,test}_gt.json (COCO-caption ground truth; COCO only)
    images/<the annotation's relative image paths>
    shards/train-000000.tar ...                          (the train pairs again, for the training engine)

The train shards are webdataset tars of `{key}.jpg` + `{key}.json` (`caption`, `image_id`, `idx`, `image`), where
`idx` is BLIP's consecutive integer per distinct `image_id` (the retrieval ITC positives); pairs are written in a
seeded shuffled order so that micro-batches mix images. `kind: demo` generates the set with
`downstream_synth.write_karpathy`; `kind: files` reads real annotation files + an image root. Idempotent: the
same config (and, for files, the same annotation bytes) returns the published version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, TypeVar

from pipelines.config import check_range, config_hash, to_dict

log = logging.getLogger(__name__)
_Item = TypeVar("_Item")

STAGE = "downstream"
PREFIXES = {"coco": "coco_karpathy", "flickr": "flickr30k"}
EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True, kw_only=True)
class DownstreamConfig:
    """Which downstream set to publish (configs/pipeline/*.yaml `downstream:` section)."""

    kind: Literal["demo", "files"] = "demo"  # demo: generated shape scenes; files: real Karpathy annotations
    # coco / flickr: Karpathy retrieval + captioning; vqa: VQAv2 (+ VG QA) as BLIP ships it; nlvr: NLVR2;
    # msrvtt: the MSRVTT test split for zero-shot video retrieval (no training data); nocaps: the NoCaps val/test
    # images for captioning (no training data, no references: scored by the official server)
    # vg_caption: Visual Genome captions (train pairs only), human-annotated pairs for pretraining, as BLIP's 14M
    benchmark: Literal["coco", "flickr", "vqa", "nlvr", "msrvtt", "nocaps", "vg_caption"] = "coco"
    # kind=demo: sizes of the generated set (images per split; every image gets captions_per_image captions)
    num_train: int = 64
    num_val: int = 16
    num_test: int = 16
    captions_per_image: int = 5
    image_size: int = 64  # rendered side in pixels (models resize to their own input size)
    seed: int = 0
    # kind=files: BLIP's layout, e.g. annotation_dir=.../annotation (with coco_gt/ inside), image_root=.../coco
    annotation_dir: str | None = None
    image_root: str | None = None
    samples_per_shard: int = 1000  # train pairs per webdataset tar
    # vqa: also train on vqa_val.json, as BLIP's recipe does (train_files: vqa_train, vqa_val, vg_qa). Then the val
    # split's accuracy is measured on trained questions and is optimistic (the evaluation notes it); set false
    # to keep val held out, or report test-dev from the server.
    vqa_train_on_val: bool = True
    shuffle_seed: int = 0  # order of the train pairs in the shards

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_test", "captions_per_image", "image_size", "samples_per_shard"):
            check_range("downstream", name, getattr(self, name), 1)
        if self.kind == "files" and not (self.annotation_dir and self.image_root):
            raise ValueError("'downstream.annotation_dir' and 'downstream.image_root' are required when kind is 'files'")


@dataclass(frozen=True)
class KarpathyLayout:
    """Where each file of a downstream version is, relative to the version directory (also its metadata)."""

    benchmark: str

    @property
    def prefix(self) -> str:
        return PREFIXES[self.benchmark]

    def annotation(self, split: str) -> str:
        return f"annotation/{self.prefix}_{split}.json"

    def caption_gt(self, split: str) -> str | None:
        return f"annotation/coco_gt/{self.prefix}_{split}_gt.json" if self.benchmark == "coco" else None

    def to_metadata(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "format": "karpathy", "image_root": "images",
                "annotations": {s: self.annotation(s) for s in ("train", *EVAL_SPLITS)},
                "caption_gt": {s: self.caption_gt(s) for s in EVAL_SPLITS if self.caption_gt(s)}}  # fmt: skip


def layout_of(manifest: Any) -> KarpathyLayout:
    """The layout of a published downstream version; a clear error for any other dataset."""
    meta = manifest.metadata
    if meta.get("format") != "karpathy" or meta.get("benchmark") not in PREFIXES:
        raise ValueError(f"{manifest.ref} is not a Karpathy-format downstream set (metadata format="
                         f"{meta.get('format')!r}); publish one with `publish_downstream`")  # fmt: skip
    return KarpathyLayout(meta["benchmark"])


def publish_downstream(cfg: DownstreamConfig, *, name: str, registry: Any = None) -> Any:
    """Publish the downstream set as dataset version `name` (returns the existing one for the same inputs)."""
    from datasets_manifests.manifest import Producer, cache_key
    from datasets_manifests.registry import Registry, check_name, now_utc

    check_name(name)
    registry = registry if registry is not None else Registry()
    source_digests = _source_digests(cfg) if cfg.kind == "files" else []
    key = cache_key(STAGE, source_digests, config_hash(cfg))
    cached = registry.find_cached("dataset", name, key)
    if cached is not None:
        return cached
    started = now_utc()
    staging = registry.work_dir(key) / "publish"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if cfg.kind == "demo":
        annotation_dir, image_root = generate_demo(cfg, staging / "generated")
    else:
        annotation_dir, image_root = Path(str(cfg.annotation_dir)), Path(str(cfg.image_root))
    if cfg.benchmark in PREFIXES:
        layout = KarpathyLayout(cfg.benchmark)
        files, counts, drops = stage_karpathy(staging, layout, annotation_dir, image_root, cfg)
        metadata, splits = layout.to_metadata(), {"train": counts["train_pairs"], "val": counts["val_images"],
                                                  "test": counts["test_images"]}
    else:
        from pipelines.tasks import downstream_sets

        files, counts, drops, metadata = downstream_sets.STAGERS[cfg.benchmark](staging, annotation_dir, image_root, cfg)
        splits = {k[:-len("_items")]: v for k, v in counts.items() if k.endswith("_items")}
    if cfg.kind == "demo":
        shutil.rmtree(staging / "generated")
    producer = Producer(stage=STAGE, config=to_dict(cfg), config_hash=config_hash(cfg), cache_key=key,
                        started_at=started)  # fmt: skip
    return registry.publish(
        kind="dataset", name=name, staging_dir=staging, files=files, producer=producer,
        splits=splits, counts=counts, drop_reasons=drops, metadata=metadata,
        sample_schema=SAMPLE_SCHEMAS.get(cfg.benchmark, SAMPLE_SCHEMAS["coco"]),
        digests_from_writer=True,  # the train shards were hashed as written (tens of GB for COCO / VG)
    )  # fmt: skip


SAMPLE_SCHEMAS = {
    "coco": {"jpg": "image bytes (as in the source file)",
             "json": "caption (raw), image_id (annotation's), idx (consecutive int per image_id), image"},
    "vqa": {"jpg": "image bytes", "json": "question (raw), answers, weights (BLIP: VQA count/n, VG 0.2), dataset"},
    "nlvr": {"left.jpg": "left image bytes", "right.jpg": "right image bytes", "json": "sentence (raw), label 0/1"},
    "msrvtt": {},
    "nocaps": {},
    "vg_caption": {"jpg": "image bytes (as in the source file)",
                   "json": "caption (raw), image_id (annotation's, else the image path), idx, image"},
}


def generate_demo(cfg: DownstreamConfig, root: Path) -> tuple[Path, Path]:
    """Write the demo set in the benchmark's public layout; returns (annotation dir, image/video root)."""
    from pipelines.tasks import downstream_synth as synth

    size, seed = cfg.image_size, cfg.seed
    if cfg.benchmark in PREFIXES:
        synth.write_karpathy(root, style=cfg.benchmark, num_train=cfg.num_train, num_val=cfg.num_val,
                             num_test=cfg.num_test, captions_per_image=cfg.captions_per_image, image_size=size,
                             seed=seed)  # fmt: skip
    elif cfg.benchmark == "vqa":
        synth.write_vqa(root, num_train_images=cfg.num_train, num_val_images=cfg.num_val, num_test_images=cfg.num_test,
                        num_vg_images=max(1, cfg.num_train // 4), image_size=size, seed=seed)  # fmt: skip
    elif cfg.benchmark == "vg_caption":
        synth.write_vg_caption(root, num_images=cfg.num_train, captions_per_image=cfg.captions_per_image,
                               image_size=size, seed=seed)  # fmt: skip
    elif cfg.benchmark == "nocaps":
        synth.write_nocaps(root, num_val=cfg.num_val, num_test=cfg.num_test, image_size=size, seed=seed)
    elif cfg.benchmark == "nlvr":
        synth.write_nlvr(root, num_train=cfg.num_train, num_dev=cfg.num_val, num_test=cfg.num_test, image_size=size,
                         seed=seed)  # fmt: skip
    else:
        synth.write_msrvtt(root, num_videos=cfg.num_test, frame_size=size, seed=seed)
        return root / "annotation", root / "videos"
    return root / "annotation", root


def _source_digests(cfg: DownstreamConfig) -> list[str]:
    """sha256 of the annotation files, so a changed file is a new version even under the same config."""
    directory = Path(str(cfg.annotation_dir))
    if not directory.is_dir():
        raise FileNotFoundError(f"downstream.annotation_dir {directory} is not a directory")
    return [f"{p.relative_to(directory)}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
            for p in sorted(directory.rglob("*.json*")) if p.is_file()]


def stage_karpathy(staging: Path, layout: KarpathyLayout, annotation_dir: Path, image_root: Path,
                   cfg: DownstreamConfig) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, int]]:
    """Validate the annotations, stage annotations + images + train shards; return (files, counts, drops).

    A train pair whose image is missing is dropped (counted as `missing_image`); a missing val/test image is an
    error, since an evaluation split with holes is not the benchmark any more.
    """
    from pipelines.tasks.downstream_data import (AnnotationError, consecutive_image_ids, load_caption_eval,
                                                 load_caption_train, load_coco_caption_gt)

    files: list[dict[str, Any]] = []
    images: set[str] = set()
    train_path = annotation_dir / Path(layout.annotation("train")).name
    pairs, drops = pairs_with_images(train_path, load_caption_train(train_path), image_root)
    counts = {"train_pairs": len(pairs), "train_images": len({p.image_id for p in pairs})}
    copy_file(train_path, staging, layout.annotation("train"), files, "annotation")
    for split in EVAL_SPLITS:
        path = annotation_dir / Path(layout.annotation(split)).name
        items = load_caption_eval(path)
        missing = [item.image for item in items if not (image_root / item.image).is_file()]
        if missing:
            raise AnnotationError(path, f"{len(missing)} images missing under {image_root} (first: {missing[0]})")
        counts[f"{split}_images"], counts[f"{split}_texts"] = len(items), sum(len(i.captions) for i in items)
        images.update(item.image for item in items)
        copy_file(path, staging, layout.annotation(split), files, "annotation")
        gt = layout.caption_gt(split)
        if gt is not None:
            gt_source = annotation_dir / "coco_gt" / Path(gt).name
            load_coco_caption_gt(gt_source)  # validate the schema
            copy_file(gt_source, staging, gt, files, "annotation")
    images.update(p.image for p in pairs)
    for relative in sorted(images):
        copy_file(image_root / relative, staging, f"images/{relative}", files, "image")
    files += write_train_shards(staging, pairs, consecutive_image_ids(pairs), image_root, cfg)
    return files, counts, {k: v for k, v in drops.items() if v}


def pairs_with_images(path: Path, pairs: list[Any], image_root: Path) -> tuple[list[Any], dict[str, int]]:
    """The train pairs whose image exists under `image_root`, and the drop count of the others (`missing_image`);
    an error naming the annotation file when none is left."""
    from pipelines.tasks.downstream_data import AnnotationError

    present = [pair for pair in pairs if (image_root / pair.image).is_file()]
    if not present:
        raise AnnotationError(path, f"no train pair has its image under {image_root}")
    missing = len(pairs) - len(present)
    return present, {"missing_image": missing} if missing else {}


def write_train_shards(staging: Path, pairs: list[Any], idxs: list[int], image_root: Path,
                       cfg: DownstreamConfig) -> list[dict[str, Any]]:
    """The train pairs as webdataset shards (seeded shuffled order); returns their file entries."""
    from pipelines.tasks.webdata import TarShardWriter

    order = list(range(len(pairs)))
    random.Random(cfg.shuffle_seed).shuffle(order)  # BLIP shuffles the train set; shards keep one fixed order
    with TarShardWriter(staging, "train", cfg.samples_per_shard) as writer:
        for number, index in enumerate(counted(order, "downstream: train shards", "pairs")):
            pair = pairs[index]
            extension = Path(pair.image).suffix.lower().lstrip(".") or "jpg"
            extension = "jpg" if extension == "jpeg" else extension
            meta = {"caption": pair.caption, "image_id": pair.image_id, "idx": idxs[index], "image": pair.image}
            writer.write(f"{number:08d}", {extension: (image_root / pair.image).read_bytes(),
                                           "json": json.dumps(meta).encode()})  # fmt: skip
    return writer.entries(role="shard", split="train")


def counted(items: Sequence[_Item], desc: str, unit: str) -> Iterator[_Item]:
    """`items`, with a bar (a log line a minute off a terminal): a downstream set's train shards read every image
    of its training pairs (566k for COCO, about 20 GB)."""
    from pipelines.progress import StageProgress

    with StageProgress(desc, len(items), unit, logger=log) as bar:
        yield from bar.each(items)


def copy_file(source: Path, staging: Path, relative: str, files: list[dict[str, Any]], role: str) -> None:
    """Hard-link (or copy) `source` to `staging/relative` and record its file entry."""
    from datasets_manifests.registry import place_file

    target = staging / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    place_file(source, target, link=True)
    files.append({"path": relative, "role": role})
