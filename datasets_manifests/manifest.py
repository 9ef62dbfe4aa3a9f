"""Manifests: immutable, content-addressed records of dataset, model and evaluation versions.

A manifest is JSON (schema-versioned). Its `id` is the sha256 of the canonical content: everything except
the wall-clock times and the host of the producer, so the same inputs + config + code give the same id.
Stdlib only (no torch, no ray, no prefect): `blip data ls` must start fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

SCHEMA_VERSION = 1
Kind = Literal["dataset", "model", "evaluation"]
KINDS: tuple[str, ...] = ("dataset", "model", "evaluation")
FileRole = Literal["shard", "index", "stats", "weights", "config", "metrics", "annotation", "image", "other"]


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a version, relative to the version directory."""

    path: str  # e.g. "shards/train-000003.tar"
    sha256: str
    bytes: int
    role: str = "other"  # one of FileRole
    num_samples: int | None = None  # for shards
    split: str | None = None  # "train" / "val" / ... for shards


@dataclass(frozen=True, kw_only=True)
class Producer:
    """Who made a version: the stage, its resolved config and hash, the code version and when."""

    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    code_version: str = ""
    cache_key: str = ""  # hash(stage, parent ids, config hash): a stage re-run with this key is a no-op
    started_at: str = ""
    finished_at: str = ""
    host: str = ""


# Fields of Producer that describe *when/where*, not *what*: left out of the content id.
_VOLATILE_PRODUCER_FIELDS = ("started_at", "finished_at", "host")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A dataset, model or evaluation version."""

    kind: str  # one of KINDS
    name: str
    version: str
    producer: Producer
    files: tuple[FileEntry, ...] = ()
    parents: tuple[str, ...] = ()  # "name@version" refs of input versions (datasets, models)
    parent_ids: tuple[str, ...] = ()  # content ids of the same parents, in the same order
    splits: dict[str, int] = field(default_factory=dict)  # split -> sample count
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"input": 5000, "kept": 4012, "dropped": 988}
    drop_reasons: dict[str, int] = field(default_factory=dict)  # reason -> count
    stats: dict[str, Any] = field(default_factory=dict)  # per-stage stats, free form but JSON
    sample_schema: dict[str, str] = field(default_factory=dict)  # field -> description/type ("jpg": "JPEG bytes")
    metadata: dict[str, Any] = field(default_factory=dict)  # kind-specific (model arch, metrics, ...)
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ identity
    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def id(self) -> str:
        """Content id: sha256 of the canonical content (no times, no host)."""
        return content_id(self.to_dict())

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def num_samples(self) -> int:
        return sum(entry.num_samples or 0 for entry in self.files if entry.role == "shard")

    def shards(self, split: str | None = None) -> list[FileEntry]:
        return [e for e in self.files if e.role == "shard" and (split is None or e.split == split)]

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(f"{self.ref} has no file {path!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["files"] = [dataclasses.asdict(entry) for entry in self.files]
        data["parents"] = list(self.parents)
        data["parent_ids"] = list(self.parent_ids)
        return data

    def to_json(self) -> str:
        data = self.to_dict()
        data["id"] = self.id
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        stored_id = data.pop("id", None)
        version = data.get("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise ValueError(f"manifest schema_version {version} is newer than this code ({SCHEMA_VERSION})")
        producer = Producer(**data.pop("producer"))
        files = tuple(FileEntry(**entry) for entry in data.pop("files", ()))
        manifest = cls(
            producer=producer,
            files=files,
            parents=tuple(data.pop("parents", ())),
            parent_ids=tuple(data.pop("parent_ids", ())),
            **data,
        )
        if stored_id is not None and stored_id != manifest.id:
            raise ValueError(f"manifest {manifest.ref}: stored id {stored_id[:12]} != content id {manifest.short_id}")
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


def children_by_parent(manifests: Iterable[Manifest]) -> dict[str, list[Manifest]]:
    """parent id -> the versions among `manifests` that name it as a parent (lineage walked downwards)."""
    children: dict[str, list[Manifest]] = {}
    for manifest in manifests:
        for parent_id in manifest.parent_ids:
            children.setdefault(parent_id, []).append(manifest)
    return children


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_id(manifest_dict: dict[str, Any]) -> str:
    data = {key: value for key, value in manifest_dict.items() if key != "id"}
    producer = {k: v for k, v in data.get("producer", {}).items() if k not in _VOLATILE_PRODUCER_FIELDS}
    data["producer"] = producer
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def cache_key(stage: str, parent_ids: list[str] | tuple[str, ...], config_hash: str) -> str:
    """Key of a stage run: the same stage on the same inputs with the same config is the same work."""
    payload = canonical_json({"stage": stage, "parents": list(parent_ids), "config": config_hash})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]
