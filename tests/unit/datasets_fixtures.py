"""Builders for tiny dataset versions used by the registry / index / CLI tests.

A version here is real: a webdataset-style tar of 8x8 JPEGs (key.jpg + key.txt), an `index.parquet`
whose `jpg_offset` points at each JPEG's bytes inside the tar, published through `Registry.publish`.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, summarize_index, validate_index, write_index, write_texts
from datasets_manifests.manifest import Manifest, Producer
from datasets_manifests.registry import Registry


def memory_url() -> str:
    """A fresh registry on fsspec's in-process memory filesystem (shared per process, so unique roots)."""
    return f"memory://reg-{uuid.uuid4().hex[:10]}"


def jpeg_bytes(seed: int, size: int = 8) -> bytes:
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def sample_rows(n: int, *, dropped: dict[int, str] | None = None, prefix: str = "s",
                captions: dict[int, str] | None = None) -> list[dict[str, Any]]:
    dropped = dropped or {}
    captions = captions or {}
    rows = []
    for i in range(n):
        reason = dropped.get(i)
        rows.append({
            "key": f"{prefix}{i:06d}", "url": f"http://127.0.0.1/img/{i}.jpg",
            "caption": captions.get(i, f"a photo of thing {i}"), "raw_caption": f"A Photo of Thing #{i}!",
            "caption_source": "web", "split": "train", "width": 8, "height": 8,
            "status": "dropped" if reason else "ok", "drop_reason": reason,
        })
    return rows


def write_shard(staging: Path, rows: list[dict[str, Any]], shard: str = "shards/train-000000.tar") -> None:
    """Write the kept rows into one tar and fill in shard, jpg_offset, jpg_bytes, image_sha256."""
    path = staging / shard
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for seed, row in enumerate(rows):
            if row["status"] != "ok":
                row.update(shard=None, jpg_offset=None, jpg_bytes=None, image_sha256=None)
                continue
            for suffix, payload in ((".jpg", jpeg_bytes(seed)), (".txt", (row["caption"] or "").encode())):
                info = tarfile.TarInfo(row["key"] + suffix)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                if suffix == ".jpg":
                    row.update(shard=shard, jpg_bytes=len(payload), image_sha256=hashlib.sha256(payload).hexdigest())
    with tarfile.open(path) as tar:
        offsets = {m.name[:-4]: m.offset_data for m in tar.getmembers() if m.name.endswith(".jpg")}
    for row in rows:
        if row["status"] == "ok":
            row["jpg_offset"] = offsets[row["key"]]


def publish_dataset(registry: Registry, staging: Path, name: str, rows: list[dict[str, Any]], *,
                    parents: tuple[Manifest, ...] = (), version: str | None = None, stage: str = "shard",
                    texts: list[dict[str, Any]] | None = None, config: dict[str, Any] | None = None,
                    cache_key: str = "", tables: dict[str, list[dict[str, Any]]] | None = None,
                    json_stats: dict[str, Any] | None = None, stats: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None) -> Manifest:
    """`tables`: other parquet files of the version ({path: rows}, role "other"), e.g. a download's source list;
    `json_stats`: JSON files of role "stats" ({path: value}); `stats`: the manifest's stats. Keys of `rows` beyond
    the index's own are extra index columns (with `metadata={"source_columns": [...]}`: the source list's)."""
    staging.mkdir(parents=True, exist_ok=True)
    write_shard(staging, rows)
    write_index(rows, staging / INDEX_FILE)
    files: list[dict[str, Any]] = [
        {"path": "shards/train-000000.tar", "role": "shard", "split": "train",
         "num_samples": sum(r["status"] == "ok" for r in rows)},
        {"path": INDEX_FILE, "role": "index"},
    ]
    if texts is not None:
        write_texts(texts, staging / TEXTS_FILE)
        files.append({"path": TEXTS_FILE, "role": "index"})
    for path, table_rows in (tables or {}).items():
        pq.write_table(pa.Table.from_pylist(table_rows), staging / path)
        files.append({"path": path, "role": "other"})
    for path, value in (json_stats or {}).items():
        (staging / path).write_text(json.dumps(value, indent=2, sort_keys=True))
        files.append({"path": path, "role": "stats"})
    summary = summarize_index(validate_index(rows))
    config = config or {"name": name}
    return registry.publish(
        kind="dataset", name=name, staging_dir=staging, files=files, parents=parents, version=version,
        producer=Producer(stage=stage, config=config, cache_key=cache_key,
                          config_hash=hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()),
        counts=summary["counts"], drop_reasons=summary["drop_reasons"], splits=summary["splits"],
        stats=stats or {stage: {"input": len(rows)}}, sample_schema={"jpg": "JPEG bytes", "txt": "caption"},
        metadata=metadata or {},
    )


def publish_model(registry: Registry, staging: Path, parents: list[Manifest], name: str = "pretrain") -> Manifest:
    """A model version (a few bytes of weights) trained on `parents`."""
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"weights")
    return registry.publish(kind="model", name=name, staging_dir=staging, producer=Producer(stage="pretrain"),
                            files=[{"path": "model.safetensors", "role": "weights"}], parents=parents)
