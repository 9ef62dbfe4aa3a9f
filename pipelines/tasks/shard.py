"""Shard stage: raw download shards -> training shards (a dataset version ready for pretraining and CapFilt).

What it does, in order, with a drop reason for every sample it drops (datatrove's `filter -> (keep, reason)`):
decode check (`corrupt_image`, `too_large` for decompression bombs; greyscale/CMYK/alpha converted to RGB),
BLIP caption normalisation (`pre_caption`, salesforce/BLIP data/utils.py; raw text kept) with `empty_caption`
and `absurd_caption` (too long, or no letters), then exact dedup by URL (`duplicate_url`) and by the sha256 of
the image bytes (`duplicate_image`), keeping the first sample in key order. The train/val split is a hash of
the key (stable when the corpus grows); the order inside a split is a seeded shuffle. Shards are
`shards/{split}-{i:06d}.tar`, gap-free, written atomically, and `index.parquet` points at each `.jpg` member.

Two passes keep memory at ~200 bytes per sample: pass 1 streams the raw tars and decides; pass 2 reads the
kept bytes back by offset and writes. A truncated raw tar keeps the samples before the truncation; the ones the
raw index says were in it but could not be read are dropped as `truncated_shard` (never a crash).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets_manifests.manifest import Manifest, Producer, cache_key
from datasets_manifests.registry import Registry, now_utc
from pipelines.config import check_range, config_hash, to_dict

STAGE = "shard"
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """How raw shards become training shards."""

    samples_per_shard: int = 1000
    seed: int = 0  # order of samples inside each split
    val_fraction: float = 0.01  # share of keys (by hash) that go to the val split
    max_words: int = 30  # BLIP pre_caption truncation (pretrain uses 30, configs/pretrain.yaml)
    max_caption_chars: int = 1000  # a raw caption longer than this is "absurd_caption"
    dedup_url: bool = True
    dedup_image: bool = True
    max_image_pixels: int = 20_000_000  # decoded pixels above this are dropped as too_large (decompression bombs)
    jpeg_quality: int = 95  # re-encode quality for images that were not RGB JPEGs

    def __post_init__(self) -> None:
        check_range("ShardConfig", "samples_per_shard", self.samples_per_shard, 1, 10_000_000)
        check_range("ShardConfig", "val_fraction", self.val_fraction, 0.0, 0.5)
        check_range("ShardConfig", "max_words", self.max_words, 1, 512)
        check_range("ShardConfig", "max_caption_chars", self.max_caption_chars, 1)
        check_range("ShardConfig", "max_image_pixels", self.max_image_pixels, 1)
        check_range("ShardConfig", "jpeg_quality", self.jpeg_quality, 1, 100)


def split_of(key: str, val_fraction: float) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def caption_problem(raw: str, caption: str, cfg: ShardConfig) -> str | None:
    """Why a caption is unusable, or None."""
    if not caption.strip():
        return "empty_caption"
    if len(raw) > cfg.max_caption_chars or not _LETTER.search(caption):
        return "absurd_caption"
    return None


def check_image(data: bytes, cfg: ShardConfig) -> tuple[str | None, int, int, bool]:
    """(problem or None, width, height, needs re-encoding to an RGB JPEG)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > cfg.max_image_pixels:
                return "too_large", width, height, False
            image.load()
            return None, width, height, not (image.format == "JPEG" and image.mode == "RGB")
    except Image.DecompressionBombError:
        return "too_large", 0, 0, False
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        return "corrupt_image", 0, 0, False


# ---------------------------------------------------------------------------------------------- stage


def run_shard(cfg: ShardConfig, dataset_ref: str | Manifest, *, name: str, registry: Registry) -> Manifest:
    """Turn a raw (download) version into training shards; publishes a new version of `name` (no-op if done)."""
    parent = registry.resolve(dataset_ref, "dataset")
    key = cache_key(STAGE, [parent.id], config_hash(cfg))
    cached = registry.find_cached("dataset", name, key)
    if cached is not None:
        return cached
    started = now_utc()
    stage = registry.work_dir(key) / "stage"
    if stage.exists():  # a crashed run: this stage is cheap next to the download, so start clean
        import shutil

        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    records, input_counts = _scan(cfg, registry, parent)
    _decide_duplicates(records, cfg)
    shard_entries = _write_shards(cfg, registry, parent, records, stage)
    return _publish(cfg, registry, parent, name, key, started, stage, records, shard_entries, input_counts)


# Pass 1 decodes every image (~30-60 MB/s per core): a process of its own pays off from about this much input.
SCAN_BYTES_PER_PROCESS = 64 << 20


def _scan(cfg: ShardConfig, registry: Registry, parent: Manifest) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pass 1: one record per raw sample (no image bytes kept), with its first drop reason if any.

    The raw shards are independent: they are checked in worker processes (`pipelines.runtime.process_count`),
    records coming back in shard order, so the result is the same as one process's."""
    from tqdm import tqdm

    from pipelines.runtime import map_in_processes, process_count

    expected = _expected_by_shard(registry, parent)
    entries = parent.shards()
    jobs = [(cfg, registry.url_of(parent, entry.path), entry.path, expected.get(entry.path, {})) for entry in entries]
    workers = process_count(sum(entry.bytes for entry in entries), SCAN_BYTES_PER_PROCESS, len(jobs))
    records: list[dict[str, Any]] = []
    truncated = 0
    for shard_records, was_truncated in tqdm(map_in_processes(scan_raw_shard, jobs, workers), total=len(jobs),
                                             desc="checking raw shards", unit="shard", disable=len(jobs) < 4):  # fmt: skip
        records.extend(shard_records)
        truncated += was_truncated
    return records, {"raw_shards": len(entries), "truncated_shards": truncated}


def scan_raw_shard(cfg: ShardConfig, url: str, path: str,
                   expected: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:  # fmt: skip
    """Pass 1 over one raw shard (`url`, published as `path`): its records, and whether it was truncated (then the
    samples the raw index lists in it that could not be read are dropped as `truncated_shard`)."""
    import fsspec

    from blip_models.processing import pre_caption
    from pipelines.tasks.webdata import iter_tar

    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    errors: Counter = Counter()
    with fsspec.open(url, "rb") as handle:
        for sample in iter_tar(handle, errors, path):
            record = _record(cfg, sample, path, pre_caption)
            if record is None:
                continue
            seen.add(record["key"])
            records.append(record)
    if errors:
        for missing in sorted(set(expected) - seen):
            records.append({**expected[missing], "status": "dropped", "drop_reason": "truncated_shard", "source_shard": path})
    return records, bool(errors)


def _record(cfg: ShardConfig, sample: Any, shard_path: str, pre_caption: Any) -> dict[str, Any] | None:
    data = sample.members.get("jpg")
    try:
        meta = json.loads(sample.members.get("json", b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    key = meta.get("source_key") or sample.key
    raw = sample.members.get("txt", b"").decode("utf-8", errors="replace")
    caption = pre_caption(raw, cfg.max_words)
    record = {"key": key, "url": meta.get("url"), "raw_caption": raw, "caption": caption, "source_shard": shard_path,
              "raw_key": sample.key, "status": "ok", "drop_reason": None, "width": None, "height": None,
              "image_sha256": None, "source_offset": sample.offsets.get("jpg"), "source_bytes": len(data or b""),
              "reencode": False}
    if data is None:
        record.update(status="dropped", drop_reason="missing_image")
        return record
    problem, width, height, reencode = check_image(data, cfg)
    record.update(width=width or None, height=height or None, reencode=reencode,
                  image_sha256=hashlib.sha256(data).hexdigest())
    problem = problem or caption_problem(raw, caption, cfg)
    if problem:
        record.update(status="dropped", drop_reason=problem)
    return record


def _expected_by_shard(registry: Registry, parent: Manifest) -> dict[str, dict[str, dict[str, Any]]]:
    """The raw index's ok rows, by shard: what a truncated shard should have held."""
    from datasets_manifests.index import INDEX_FILE, read_index

    if not any(e.path == INDEX_FILE for e in parent.files):
        return {}
    table = read_index(registry, parent, ["key", "url", "raw_caption", "caption", "shard", "status"])
    expected: dict[str, dict[str, dict[str, Any]]] = {}
    for row in table.to_pylist():
        if row["status"] == "ok" and row["shard"]:
            expected.setdefault(row["shard"], {})[row["key"]] = {
                "key": row["key"], "url": row["url"], "raw_caption": row["raw_caption"], "caption": row["caption"]}
    return expected


def _decide_duplicates(records: list[dict[str, Any]], cfg: ShardConfig) -> None:
    """Exact dedup in key order: the first sample with a URL / image hash stays, later ones are dropped."""
    records.sort(key=lambda record: (record["key"], record["source_shard"]))
    seen_keys: set[str] = set()
    seen_urls: set[str] = set()
    seen_images: set[str] = set()
    for record in records:
        if record["status"] != "ok":
            continue
        if record["key"] in seen_keys:
            # The same source row twice (the download stage refuses this; a hand-made raw version may not).
            record.update(status="dropped", drop_reason="duplicate_key")
        elif cfg.dedup_url and record["url"] in seen_urls:
            record.update(status="dropped", drop_reason="duplicate_url")
        elif cfg.dedup_image and record["image_sha256"] in seen_images:
            record.update(status="dropped", drop_reason="duplicate_image")
        seen_keys.add(record["key"])
        if record["status"] == "ok":
            seen_urls.add(record["url"])
            seen_images.add(record["image_sha256"])


# Pass 2 reads each kept image back and writes it: a process of its own pays off from about this much output.
WRITE_BYTES_PER_PROCESS = 256 << 20


def _write_shards(cfg: ShardConfig, registry: Registry, parent: Manifest, records: list[dict[str, Any]],
                  stage: Path) -> list[dict[str, Any]]:
    """Pass 2: split, shuffle by seed, read kept bytes back by offset, write gap-free shards.

    Each output shard (a fixed slice of its split's shuffled order) is written by `write_output_shard`, in
    worker processes when there is enough data (`pipelines.runtime.process_count`); the same bytes either way."""
    from tqdm import tqdm

    from pipelines.runtime import map_in_processes, process_count

    kept = [r for r in records if r["status"] == "ok"]
    by_split: dict[str, list[dict[str, Any]]] = {}
    for record in kept:
        record["split"] = split_of(record["key"], cfg.val_fraction)
        by_split.setdefault(record["split"], []).append(record)
    urls = {entry.path: registry.url_of(parent, entry.path) for entry in parent.shards()}
    chunks: list[list[dict[str, Any]]] = []
    jobs: list[tuple[Any, ...]] = []
    for split in sorted(by_split):
        order = by_split[split]  # already in key order
        random.Random(f"{cfg.seed}:{split}").shuffle(order)
        for first in range(0, len(order), cfg.samples_per_shard):
            chunk = order[first : first + cfg.samples_per_shard]
            sources = {path: urls[path] for path in {record["source_shard"] for record in chunk}}
            chunks.append(chunk)
            jobs.append((cfg, str(stage), split, first // cfg.samples_per_shard, chunk, sources))
    workers = process_count(sum(record["source_bytes"] for record in kept), WRITE_BYTES_PER_PROCESS, len(jobs))
    entries: list[dict[str, Any]] = []
    results = map_in_processes(write_output_shard, jobs, workers)
    for chunk, (split, (path, count), updates) in tqdm(zip(chunks, results), total=len(jobs), desc="writing shards",
                                                       unit="shard", disable=len(jobs) < 4):  # fmt: skip
        for record, update in zip(chunk, updates):  # the worker's copy of the records was changed, not ours
            record.update(update)
        entries.append({"path": path, "role": "shard", "split": split, "num_samples": count})
    return entries


def write_output_shard(cfg: ShardConfig, stage: str, split: str, index: int, chunk: list[dict[str, Any]],
                       sources: dict[str, str]) -> tuple[str, tuple[str, int], list[dict[str, Any]]]:  # fmt: skip
    """Write `shards/{split}-{index:06d}.tar` from `chunk` (records of one output shard, in order), reading each
    image from its raw shard (`sources`: path -> URL). Returns the split, (path, samples) and, per record, what
    the index needs (shard, offsets, and the sha256 of a re-encoded image)."""
    from pipelines.tasks.webdata import TarShardWriter

    handles: dict[str, Any] = {}
    updates = []
    try:
        with TarShardWriter(stage, split, cfg.samples_per_shard, first_index=index) as writer:
            for record in chunk:
                jpg = _read_jpg(sources, record, handles, cfg)
                shard, offset, size = writer.write(record["key"], _members(record, jpg))
                updates.append({"shard": shard, "jpg_offset": offset, "jpg_bytes": size,
                                "image_sha256": record["image_sha256"]})  # fmt: skip
    finally:
        for handle in handles.values():
            handle.close()
    return split, writer.shards[0], updates


def _read_jpg(sources: dict[str, str], record: dict[str, Any], handles: dict[str, Any], cfg: ShardConfig) -> bytes:
    import fsspec

    path = record["source_shard"]
    if path not in handles:
        handles[path] = fsspec.open(sources[path], "rb").open()
    handle = handles[path]
    handle.seek(record["source_offset"])
    data = handle.read(record["source_bytes"])
    if record["reencode"]:
        from pipelines.tasks.webdata import decode_rgb

        buffer = io.BytesIO()
        decode_rgb(data).save(buffer, format="JPEG", quality=cfg.jpeg_quality)
        data = buffer.getvalue()
        record["image_sha256"] = hashlib.sha256(data).hexdigest()
    return data


def _members(record: dict[str, Any], jpg: bytes) -> dict[str, bytes]:
    meta = {"key": record["key"], "url": record["url"], "raw_caption": record["raw_caption"],
            "caption": record["caption"], "image_sha256": record["image_sha256"], "width": record["width"],
            "height": record["height"], "source_key": record["key"], "caption_source": "web"}
    return {"jpg": jpg, "txt": record["caption"].encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def _publish(cfg: ShardConfig, registry: Registry, parent: Manifest, name: str, key: str, started: str,
             stage: Path, records: list[dict[str, Any]], shard_entries: list[dict[str, Any]],
             input_counts: dict[str, int]) -> Manifest:
    from datasets_manifests.index import INDEX_FILE, summarize_index, validate_index, write_index

    columns = ("key", "url", "image_sha256", "width", "height", "caption", "raw_caption", "split", "shard",
               "jpg_offset", "jpg_bytes", "status", "drop_reason")
    # One index row per key: a repeated key (drop reason duplicate_key) is counted, not given a second row.
    repeated = sum(1 for r in records if r["drop_reason"] == "duplicate_key")
    rows = [{**{c: r.get(c) for c in columns}, "caption_source": "web",
             **({"split": None, "shard": None, "jpg_offset": None, "jpg_bytes": None} if r["status"] != "ok" else {})}
            for r in sorted(records, key=lambda r: r["key"]) if r["drop_reason"] != "duplicate_key"]
    if repeated:
        input_counts = {**input_counts, "duplicate_key": repeated}
    table = validate_index(rows)
    write_index(table, stage / INDEX_FILE)
    summary = summarize_index(table)
    producer = Producer(stage=STAGE, config=to_dict(cfg), config_hash=config_hash(cfg), cache_key=key,
                        started_at=started)
    return registry.publish(
        kind="dataset", name=name, staging_dir=stage, producer=producer, parents=[parent],
        files=[*shard_entries, {"path": INDEX_FILE, "role": "index"}],
        splits=summary["splits"], counts={"input": summary["counts"]["total"], "kept": summary["counts"]["ok"],
                                          "dropped": summary["counts"]["dropped"], **input_counts},
        drop_reasons=summary["drop_reasons"],
        stats={"seed": cfg.seed, "val_fraction": cfg.val_fraction, "max_words": cfg.max_words},
        sample_schema={"jpg": "RGB JPEG bytes", "txt": "normalised caption (BLIP pre_caption)",
                       "json": "key, url, raw_caption, caption, image_sha256, width, height, source_key"},
        metadata={"layout": "webdataset", "shard_pattern": "shards/{split}-{i:06d}.tar"},
    )


def summary(manifest: Manifest) -> dict[str, Any]:
    return {"ref": manifest.ref, "id": manifest.short_id, "counts": manifest.counts, "splits": manifest.splits,
            "drop_reasons": manifest.drop_reasons, "shards": len(manifest.shards())}
