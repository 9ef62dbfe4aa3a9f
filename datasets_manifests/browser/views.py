"""What the manifest browser shows, computed from the registry: the catalog of versions, summary rows,
metrics, lineage graphs, the model/evaluation table, diff rows and where a sample's image lives.

Plain functions over `Registry`/`Manifest` and the lazy Parquet reads of `query.py`; no HTTP here.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import numpy as np

from datasets_manifests.browser.jobs import LRU
from datasets_manifests.browser.query import QueryError, VersionData
from datasets_manifests.index import TEXTS_POSITION
from datasets_manifests.manifest import KINDS, Manifest, children_by_parent
from datasets_manifests.ops import DIFF_CATEGORIES, DiffTables
from datasets_manifests.registry import TAKEDOWN_REASON, NotFoundError, Registry, check_name

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CATALOG_TTL_S = 3.0  # new versions and removals appear within this many seconds


class Catalog:
    """The registry's manifests and removal records, re-listed at most every `CATALOG_TTL_S` seconds, plus
    per-version handles. A version's files never change but for one case: freeing a version a takedown replaced
    writes its index and texts again (`datasets_manifests.scrub`, which rewrites its removal record); its handles
    are keyed by the record's stamp, so footers and filter results of the files before are not used after."""

    def __init__(self, registry: Registry, ttl_s: float = CATALOG_TTL_S) -> None:
        self.registry, self.ttl_s = registry, ttl_s
        self._listed_at = -1e9
        self._manifests: list[Manifest] = []
        self._removals: dict[tuple[str, str, str], str] = {}  # (kind, name, version) -> its removal record's stamp
        self._lock = threading.Lock()
        self._data = LRU(64)
        self.locations = LRU(50_000)  # (manifest id, key) -> shard location, filled by sample pages

    def all(self) -> list[Manifest]:
        with self._lock:
            if time.monotonic() - self._listed_at > self.ttl_s:
                self._manifests = self.registry.list()
                self._removals = self.registry.removal_stamps()
                self._listed_at = time.monotonic()
            return list(self._manifests)

    def data_removed(self, manifest: Manifest) -> bool:
        """Its data files were removed (`blip data rm --data-only`), as of the last listing."""
        self.all()
        return (manifest.kind, manifest.name, manifest.version) in self._removals

    def get(self, kind: str, name: str, version: str) -> Manifest:
        if kind not in KINDS:
            raise QueryError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})", 404)
        check_name(name)
        if not _VERSION_RE.match(version):
            raise QueryError(f"invalid version {version!r}", 400)
        for manifest in self.all():
            if (manifest.kind, manifest.name, manifest.version) == (kind, name, version):
                return manifest
        for manifest in self.registry.versions(kind, name):  # published since the last listing
            if manifest.version == version:
                return manifest
        # Not listed: say why when the version directory is a symlink out of the registry (versions() skips it).
        self.registry.check_inside(self.registry.version_path(kind, name, version), f"{kind} {name}@{version}")
        raise NotFoundError(f"no {kind} version {name}@{version} in {self.registry.url}")

    def data(self, manifest: Manifest) -> VersionData:
        self.all()
        stamp = self._removals.get((manifest.kind, manifest.name, manifest.version))
        return self._data.get_or_make((manifest.id, stamp), lambda: VersionData(self.registry, manifest))

    def newest_of_line(self, manifest: Manifest) -> Manifest | None:
        """The last version of the line of takedowns from `manifest` (`Registry.replaced_by` on this listing)."""
        same_name = [m for m in self.all() if (m.kind, m.name) == (manifest.kind, manifest.name)]
        return self.registry.replaced_by(manifest, same_name)

    def by_id(self) -> dict[str, Manifest]:
        return {m.id: m for m in self.all()}

    def children_map(self) -> dict[str, list[Manifest]]:
        return children_by_parent(self.all())


def summary_row(manifest: Manifest) -> dict[str, Any]:
    return {
        "kind": manifest.kind, "name": manifest.name, "version": manifest.version, "ref": manifest.ref,
        "id": manifest.id, "short_id": manifest.short_id, "stage": manifest.producer.stage,
        "finished_at": manifest.producer.finished_at, "num_samples": manifest.num_samples,
        "counts": manifest.counts, "parents": list(manifest.parents), "num_files": len(manifest.files),
        "bytes": sum(entry.bytes for entry in manifest.files), "metrics": metrics_of(manifest),
    }


def metrics_of(manifest: Manifest, limit: int = 40) -> dict[str, float]:
    """Numeric metrics of a model or evaluation, flattened ("a.b": 1.0).

    Explicit `metadata.metrics` / `stats.metrics` win; otherwise a model's last logged training values
    (`stats.last`, as the pretrain stage records them) or an evaluation's numeric stats.
    """
    found: dict[str, Any] = {}
    for source in (manifest.metadata.get("metrics"), manifest.stats.get("metrics")):
        if isinstance(source, dict):
            found.update(source)
    if not found and manifest.kind == "model" and isinstance(manifest.stats.get("last"), dict):
        found = manifest.stats["last"]
    elif not found and manifest.kind == "evaluation":
        found = manifest.stats
    return dict(list(_flatten_numbers(found).items())[:limit])


def _flatten_numbers(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_numbers(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def diff_page(tables: DiffTables, category: str, offset: int, limit: int) -> list[dict[str, Any]]:
    """Rows {key, category, reason?} of one page of a diff: one category, or all of them one after the other.
    Only the page's slice of each category table is converted to Python."""
    rows: list[dict[str, Any]] = []
    for name in [category] if category else DIFF_CATEGORIES:
        table = tables.categories[name]
        if offset >= table.num_rows:  # the page starts after this category
            offset -= table.num_rows
            continue
        part = table.slice(offset, limit - len(rows))
        offset = 0
        columns = ["key", "reason"] if name == "newly_dropped" else ["key"]
        columns += [c for c in ("row_a", "row_b") if c in table.column_names]  # where the key is in each index
        for row in part.select(columns).to_pylist():
            rows.append({**row, "category": name})
        if len(rows) >= limit:
            break
    return rows


def side_rows(data: VersionData, numbers: list[int]) -> dict[str, dict[str, Any]]:
    """What one side of a diff holds at some of its index rows (row numbers): each row and its kept texts, by key.
    Read by position (`VersionData.rows_at`): a diff page of a 129M-sample version reads a few row groups."""
    if not numbers:
        return {}
    names = data.index_columns()
    wanted = ("key", "caption", "caption_source", "status", "drop_reason", "shard", "jpg_offset", "jpg_bytes",
              *TEXTS_POSITION)  # the image's location too: the page's thumbnails need no lookup by key
    columns = [c for c in wanted if c in names]
    found = data.rows_at(data.index_path, np.unique(np.asarray(numbers, dtype=np.int64)), columns).to_pylist()
    texts = data.texts_of(found)
    rows = {}
    for row in found:
        if row["key"] in texts:
            row["kept_texts"] = [t["text"] for t in texts[row["key"]] if t.get("kept")]
        rows[row["key"]] = row
    return rows


def image_source(catalog: Catalog, manifest: Manifest, key: str) -> tuple[Manifest, dict[str, Any]]:
    """The version whose shards hold `key`'s image: this one, or (for a sample a stage dropped from its shards,
    e.g. a CapFilt image with no kept caption) the nearest parent dataset that still has it."""
    location = catalog.locations.get_or_make((manifest.id, key), lambda: catalog.data(manifest).locate(key))
    if location is None:
        raise QueryError(f"{manifest.ref} has no sample with key {key!r} in its index", 404)
    _refuse_taken_out(catalog, manifest, key, location)
    if location.get("shard"):
        return manifest, location
    by_id, queue, seen = catalog.by_id(), list(manifest.parent_ids), {manifest.id}
    while queue:
        parent = by_id.get(queue.pop(0))
        if parent is None or parent.id in seen or parent.kind != "dataset":
            continue
        seen.add(parent.id)
        data = catalog.data(parent)
        if data.has_index:
            found = catalog.locations.get_or_make((parent.id, key), lambda data=data: data.locate(key))
            if found is not None and found.get("shard"):
                _refuse_taken_out(catalog, parent, key, found)
                return parent, found
        queue.extend(parent.parent_ids)
    reason = location.get("drop_reason") or "not in any shard"
    raise QueryError(f"{manifest.ref} sample {key!r} has no image in its shards or its parents' ({reason})", 404)


def _refuse_taken_out(catalog: Catalog, manifest: Manifest, key: str, location: dict[str, Any]) -> None:
    """A sample a takedown took out is shown by no version: not by the takedown's (whose row says so, and
    whose parent still has the image until its data are freed), nor by the versions it replaced (the newest of
    their line says so)."""
    if location.get("drop_reason") == TAKEDOWN_REASON:
        raise QueryError(f"{manifest.ref} sample {key!r} was taken out by a takedown: its image is not shown", 410)
    newest = catalog.newest_of_line(manifest) if manifest.kind == "dataset" else None
    if newest is not None:
        there = catalog.locations.get_or_make((newest.id, key), lambda: catalog.data(newest).locate(key))
        if there is not None and there.get("drop_reason") == TAKEDOWN_REASON:
            raise QueryError(f"{manifest.ref} sample {key!r} was taken out by a takedown ({newest.ref}): its image "
                             "is not shown", 410)  # fmt: skip


def lineage_graph(catalog: Catalog, manifest: Manifest, max_depth: int = 12) -> dict[str, Any]:
    """Ancestors up to the sources (level < 0) and descendants down to models/evaluations (level > 0)."""
    by_id, children = catalog.by_id(), catalog.children_map()
    nodes: dict[str, dict[str, Any]] = {manifest.id: _node(manifest, 0)}
    edges: set[tuple[str, str]] = set()
    frontier = [manifest]
    for depth in range(1, max_depth + 1):  # upwards
        next_frontier = []
        for current in frontier:
            for ref, parent_id in zip(current.parents, current.parent_ids):
                edges.add((parent_id, current.id))
                if parent_id in nodes:
                    continue
                parent = by_id.get(parent_id)
                nodes[parent_id] = _node(parent, -depth) if parent else {
                    "id": parent_id, "ref": ref, "kind": "missing", "level": -depth, "name": ref, "version": ""}
                if parent:
                    next_frontier.append(parent)
        frontier = next_frontier
    frontier = [manifest]
    for depth in range(1, max_depth + 1):  # downwards
        next_frontier = []
        for current in frontier:
            for child in children.get(current.id, []):
                edges.add((current.id, child.id))
                if child.id not in nodes:
                    nodes[child.id] = _node(child, depth)
                    next_frontier.append(child)
        frontier = next_frontier
    return {"root": manifest.id, "nodes": list(nodes.values()),
            "edges": [{"source": s, "target": t} for s, t in sorted(edges) if s in nodes and t in nodes]}


def _node(manifest: Manifest, level: int) -> dict[str, Any]:
    return {"id": manifest.id, "ref": manifest.ref, "kind": manifest.kind, "name": manifest.name,
            "version": manifest.version, "level": level, "stage": manifest.producer.stage}


def model_table(catalog: Catalog) -> dict[str, Any]:
    """One row per model version: its training metrics and the metrics of the evaluations made of it."""
    children = catalog.children_map()
    rows, columns = [], []
    for model in (m for m in catalog.all() if m.kind == "model"):
        metrics = {f"train/{k}": v for k, v in metrics_of(model).items()}
        evaluations = [m for m in children.get(model.id, []) if m.kind == "evaluation"]
        for evaluation in evaluations:  # later versions of the same task overwrite earlier ones
            task = evaluation.metadata.get("task") or evaluation.name
            metrics.update({f"{task}/{k}": v for k, v in metrics_of(evaluation).items()})
        for column in metrics:
            if column not in columns:
                columns.append(column)
        rows.append({**summary_row(model), "datasets": [p for p in model.parents],
                     "evaluations": [e.ref for e in evaluations], "metrics": metrics})
    columns.sort(key=lambda c: (c.startswith("train/"), c))
    return {"columns": columns, "models": rows}
