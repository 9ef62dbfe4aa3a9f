"""A small, realistic registry for the manifest browser's tests, benchmark and demos.

It is built only through the public registry API (`Registry.publish`), the way the pipeline stages publish:
webdataset tars (`{key}.jpg`, `{key}.txt`, `{key}.json`, written with tarfile + PIL JPEGs), a per-sample
`index.parquet` (with the byte offset of every `.jpg` member), a CapFilt `texts.parquet` (web + synthetic
captions, ITM scores, keep/drop decisions), model versions with metrics and evaluation versions.

    python -m datasets_manifests.browser.sample_registry /tmp/demo-registry
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image, ImageDraw

from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, write_index, write_texts
from datasets_manifests.manifest import Manifest, Producer
from datasets_manifests.registry import Registry

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("image_sha256", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("caption", pa.string()), ("raw_caption", pa.string()), ("caption_source", pa.string()),
    ("split", pa.string()), ("shard", pa.string()), ("jpg_offset", pa.int64()), ("jpg_bytes", pa.int64()),
    ("status", pa.string()), ("drop_reason", pa.string()),
])
TEXTS_SCHEMA = pa.schema([
    ("key", pa.string()), ("text", pa.string()), ("source", pa.string()), ("itm_score", pa.float32()),
    ("kept", pa.bool_()), ("drop_reason", pa.string()), ("captioner", pa.string()), ("filter", pa.string()),
    ("seed", pa.int64()),
])


def draw_image(color: str, shape: str, background: str, size: tuple[int, int]) -> bytes:
    """A JPEG with one coloured shape on a coloured background: captions can then be checked by eye."""
    image = Image.new("RGB", size, COLORS[background])
    draw = ImageDraw.Draw(image)
    width, height = size
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(width // 2, height // 5), (width // 5, 4 * height // 5), (4 * width // 5, 4 * height // 5)],
                     fill=COLORS[color])
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shard(path: Path, samples: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Write a webdataset tar; return key -> (byte offset, size) of each `.jpg` member's data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            meta = {"url": sample["url"], "key": sample["key"], "width": sample["width"], "height": sample["height"]}
            for suffix, data in (("jpg", sample["jpg"]), ("txt", sample["raw_caption"].encode()),
                                 ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{sample['key']}.{suffix}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    offsets = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                offsets[member.name[: -len(".jpg")]] = (member.offset_data, member.size)
    return offsets


def make_samples(start: int, count: int, rng: random.Random) -> list[dict[str, Any]]:
    samples = []
    for number in range(start, start + count):
        color, background = rng.sample(sorted(COLORS), 2)
        shape = rng.choice(SHAPES)
        size = (rng.choice((96, 128, 160)), rng.choice((80, 96, 120)))
        jpg = draw_image(color, shape, background, size)
        # Web alt-texts are noisy: some describe the picture, some are boilerplate.
        noisy = rng.random() < 0.35
        raw = (f"IMG_{number:04d}.JPG | stock photo buy now" if noisy
               else f"A {color} {shape} on a {background} background")
        samples.append({
            "key": f"{number:09d}", "url": f"https://images.example.org/{number:06d}.jpg", "jpg": jpg,
            "sha256": hashlib.sha256(jpg).hexdigest(), "width": size[0], "height": size[1],
            "raw_caption": raw, "caption": raw.lower().strip(), "color": color, "shape": shape,
            "background": background, "noisy": noisy,
        })
    return samples


def write_dataset_files(staging: Path, samples: list[dict[str, Any]], per_shard: int, split: str,
                        dropped: dict[str, str] | None = None,
                        captions: dict[str, tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Shards + index.parquet for `samples`; returns the FileEntry dicts to publish.

    Dropped samples stay in the index (with their reason) but not in the shards, as the stages do;
    `captions` maps key -> (training caption, its source) where a stage replaced the web caption.
    """
    dropped, captions = dropped or {}, captions or {}
    kept = [s for s in samples if s["key"] not in dropped]
    entries, rows, offsets, shard_of = [], [], {}, {}
    for shard_number, start in enumerate(range(0, len(kept), per_shard)):
        chunk = kept[start:start + per_shard]
        relpath = f"shards/{split}-{shard_number:06d}.tar"
        offsets.update(write_shard(staging / relpath, chunk))
        shard_of.update({sample["key"]: relpath for sample in chunk})
        entries.append({"path": relpath, "role": "shard", "num_samples": len(chunk), "split": split})
    for sample in samples:
        key = sample["key"]
        offset, size = offsets.get(key, (None, None))
        caption, source = captions.get(key, (sample["caption"], "web"))
        rows.append({
            "key": key, "url": sample["url"], "image_sha256": sample["sha256"], "width": sample["width"],
            "height": sample["height"], "caption": caption, "raw_caption": sample["raw_caption"],
            "caption_source": source, "split": split, "shard": shard_of.get(key), "jpg_offset": offset,
            "jpg_bytes": size, "status": "dropped" if key in dropped else "ok", "drop_reason": dropped.get(key),
        })
    write_index(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), staging / INDEX_FILE)
    entries.append({"path": INDEX_FILE, "role": "index"})
    return entries


def capfilt_texts(samples: list[dict[str, Any]], rng: random.Random, threshold: float) -> list[dict[str, Any]]:
    """Web caption + two synthetic captions per image, scored by a pretend ITM head (scores follow the truth)."""
    rows = []
    for sample in samples:
        truth = f"a {sample['color']} {sample['shape']} on a {sample['background']} background"
        candidates = [
            (sample["caption"], "web", 0.15 + 0.2 * rng.random() if sample["noisy"] else 0.6 + 0.35 * rng.random()),
            (truth, "synthetic", 0.7 + 0.29 * rng.random()),
            (f"a {sample['shape']} in the middle of the picture", "synthetic", 0.3 + 0.5 * rng.random()),
        ]
        if sample["key"].endswith("7"):  # a captioner failure: nothing good enough, the image is dropped
            candidates = [(text, source, score * 0.4) for text, source, score in candidates]
        for text, source, score in candidates:
            kept = score >= threshold
            rows.append({"key": sample["key"], "text": text, "source": source, "itm_score": round(score, 4),
                         "kept": kept, "drop_reason": None if kept else "itm_below_threshold",
                         "captioner": "blip-tiny-pretrain@v1", "filter": "blip-tiny-pretrain@v1", "seed": 1234})
    return rows


def add_texts_position(index_path: Path, texts: list[dict[str, Any]]) -> None:
    """Add `texts_row` / `texts_count` to an index whose texts are listed in its order, as CapFilt writes them."""
    import pyarrow.parquet as pq

    write_index(with_texts_position(pq.read_table(index_path), [row["key"] for row in texts]), index_path)


def with_texts_position(index: pa.Table, text_keys: list[str]) -> pa.Table:
    """`index` with `texts_row` / `texts_count` (replaced if there) for texts whose keys, in order, are `text_keys`:
    texts listed in the index's order, each sample's together (a sample may have none)."""
    import numpy as np

    from datasets_manifests.index import TEXTS_POSITION

    per_key = Counter(text_keys)
    count = np.array([per_key[key] for key in index.column("key").to_pylist()], dtype=np.int64)
    index = index.drop_columns([name for name in TEXTS_POSITION if name in index.column_names])
    index = index.append_column("texts_row", pa.array(np.cumsum(count) - count))
    return index.append_column("texts_count", pa.array(count))


def clip_scores(samples: list[dict[str, Any]]) -> dict[str, float | None]:
    """A LAION-like `similarity` per sample, as a source list gives it (`save_additional_columns`): lower for
    the noisy alt-texts; every eleventh sample has none. From the key alone (the registry's rng is left alone)."""
    scores: dict[str, float | None] = {}
    for sample in samples:
        spread = int(hashlib.sha256(sample["key"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        missing = int(sample["key"]) % 11 == 10
        scores[sample["key"]] = None if missing else round((0.15 if sample["noisy"] else 0.28) + 0.1 * spread, 4)
    return scores


def add_source_column(index_path: Path, name: str, values: dict[str, float | None]) -> None:
    """Append a float32 source-list column (by key) to an index, as the stages carry one."""
    import pyarrow.parquet as pq

    index = pq.read_table(index_path)
    column = pa.array([values.get(key) for key in index.column("key").to_pylist()], pa.float32())
    write_index(index.append_column(pa.field(name, pa.float32()), column), index_path)


def build_sample_registry(root: str | Path) -> dict[str, Manifest]:
    """Publish web v1/v2, a CapFilt version, two models and two evaluations; return them by role."""
    registry = Registry(str(root))
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="blip-sample-registry-") as staging_root:
        return _publish_all(registry, Path(staging_root), rng)


def _publish_all(registry: Registry, staging_root: Path, rng: random.Random) -> dict[str, Manifest]:
    samples = make_samples(0, 24, rng)

    def stage(name: str) -> Path:
        path = staging_root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def producer(stage_name: str, **config: Any) -> Producer:
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        return Producer(stage=stage_name, config=config, config_hash=digest)

    # web v1: 24 downloaded pairs in 2 shards (+ one example image file), one dropped at shard time.
    staging = stage("web1")
    files = write_dataset_files(staging, samples, per_shard=12, split="train", dropped={"000000005": "too_small"})
    scores = clip_scores(samples)  # the source list's CLIP score, carried by web v1 and its CapFilt version
    add_source_column(staging / INDEX_FILE, "similarity", scores)
    (staging / "images").mkdir(exist_ok=True)
    (staging / "images" / "example.jpg").write_bytes(samples[0]["jpg"])
    files.append({"path": "images/example.jpg", "role": "image"})
    web1 = registry.publish(
        kind="dataset", name="web-demo", staging_dir=staging, files=files, producer=producer("shard", per_shard=12),
        splits={"train": 23}, counts={"input": 25, "ok": 23, "dropped": 1, "failed_download": 1},
        drop_reasons={"too_small": 1, "failed_download": 1}, stats={"success_rate": 0.96, "mean_width": 128.0},
        sample_schema={"jpg": "JPEG bytes", "txt": "web caption", "json": "url, key, size"},
        metadata={"source_columns": ["similarity"]},
    )
    # web v2: two samples taken down, four new ones, two captions re-cleaned.
    staging = stage("web2")
    v2_samples = [dict(s) for s in samples if s["key"] not in ("000000003", "000000010")] + make_samples(24, 4, rng)
    for sample in v2_samples[:2]:
        sample["caption"] = sample["caption"] + " (cleaned)"
    files = write_dataset_files(staging, v2_samples, per_shard=13, split="train")
    web2 = registry.publish(kind="dataset", name="web-demo", staging_dir=staging, files=files,
                            producer=producer("shard", per_shard=13), parents=[web1], splits={"train": 26},
                            counts={"input": 26, "ok": 26, "dropped": 0})
    # pretrain on web v1
    staging = stage("model1")
    (staging / "model.safetensors").write_bytes(b"\0" * 64)
    (staging / "config.json").write_text(json.dumps({"arch": "blip_tiny", "hidden_size": 32}))
    model1 = registry.publish(
        kind="model", name="blip-tiny-pretrain", staging_dir=staging, producer=producer("pretrain", epochs=1),
        files=[{"path": "model.safetensors", "role": "weights"}, {"path": "config.json", "role": "config"}],
        parents=[web1], metadata={"arch": "blip_tiny", "metrics": {"loss_itc": 2.91, "loss_itm": 0.62, "loss_lm": 4.1}},
    )
    # CapFilt of web v1 with the pretrained model as captioner and filter.
    staging = stage("capfilt")
    threshold = 0.5
    inputs = [s for s in samples if s["key"] != "000000005"]  # CapFilt reads the kept samples of web v1
    texts = capfilt_texts(inputs, rng, threshold)
    best: dict[str, dict[str, Any]] = {}  # the training caption: the best-scoring kept text, as CapFilt does
    for row in texts:
        if row["kept"] and (row["key"] not in best or row["itm_score"] > best[row["key"]]["itm_score"]):
            best[row["key"]] = row
    dropped = {s["key"]: "no_caption_kept" for s in inputs if s["key"] not in best}
    captions = {key: (row["text"], row["source"]) for key, row in best.items()}
    files = write_dataset_files(staging, inputs, per_shard=12, split="train", dropped=dropped, captions=captions)
    write_texts(pa.Table.from_pylist(texts, schema=TEXTS_SCHEMA), staging / TEXTS_FILE)
    add_texts_position(staging / INDEX_FILE, texts)
    add_source_column(staging / INDEX_FILE, "similarity", scores)
    from pipelines.tasks.capfilt import source_column_stats  # CapFilt's decisions along the list's score

    by_score = source_column_stats(staging / INDEX_FILE, staging / TEXTS_FILE, [pa.field("similarity", pa.float32())])
    files.append({"path": TEXTS_FILE, "role": "index"})
    kept_texts = sum(row["kept"] for row in texts)
    capfilt = registry.publish(
        kind="dataset", name="web-demo-capfilt", staging_dir=staging, files=files,
        producer=producer("capfilt", threshold=threshold, num_captions=2), parents=[web1, model1],
        splits={"train": len(inputs) - len(dropped)}, counts={"images": len(inputs), "texts": len(texts), "kept_texts": kept_texts,
                                      "dropped_texts": len(texts) - kept_texts, "dropped_images": len(dropped)},
        drop_reasons={"itm_below_threshold": len(texts) - kept_texts, "no_caption_kept": len(dropped)},
        stats={"capfilt": {"itm_threshold": threshold, "by_source_column": by_score}},
        metadata={"source_columns": ["similarity"]},
    )
    staging = stage("model2")
    (staging / "model.safetensors").write_bytes(b"\1" * 64)
    model2 = registry.publish(
        kind="model", name="blip-tiny-bootstrapped", staging_dir=staging, producer=producer("pretrain", epochs=1),
        files=[{"path": "model.safetensors", "role": "weights"}], parents=[capfilt],
        metadata={"arch": "blip_tiny", "metrics": {"loss_itc": 2.55, "loss_itm": 0.48, "loss_lm": 3.7}},
    )
    evaluations = []
    for model, scores in ((model1, (11.2, 8.4, 12.0)), (model2, (14.9, 10.7, 15.3))):
        staging = stage(f"eval-{model.name}")
        metrics = {"tr_r1": scores[0], "ir_r1": scores[1], "cider": scores[2]}
        (staging / "metrics.json").write_text(json.dumps(metrics))
        evaluations.append(registry.publish(
            kind="evaluation", name=f"eval-{model.name}", staging_dir=staging, producer=producer("evaluate"),
            files=[{"path": "metrics.json", "role": "metrics"}], parents=[model, web2],
            stats={"metrics": metrics}, metadata={"task": "retrieval+caption", "metrics": metrics},
        ))
    return {"web1": web1, "web2": web2, "capfilt": capfilt, "model1": model1, "model2": model2,
            "eval1": evaluations[0], "eval2": evaluations[1]}


if __name__ == "__main__":
    built = build_sample_registry(sys.argv[1] if len(sys.argv) > 1 else "./artifacts/demo-registry")
    print("\n".join(f"{role}: {m.kind} {m.ref} {m.short_id}" for role, m in built.items()))
