"""`blip data rm`: remove versions, whole or only their data files, without cutting the lineage of what stays.

A version goes whole (manifest and files) only when no kept version names it as a parent: a bootstrapped
dataset's or a model's lineage never points at nothing. `data_only` frees the heavy files (shards, weights,
images: terabytes at 129M) and keeps the manifest, the per-sample index, stats and configs: the version stays
listed, browsable and diffable, its lineage whole; a rerun of the stage that made it reuses the record, so what
was made from it stays cached (a flow rerun after freeing a download whose shards exist downloads nothing), and a
stage that has to read its data refuses, naming the removal (`Registry.path_of`, `Registry.absent`). A version a
takedown replaced also has the files that still name what it took out written again, as the newest version of its
line has them (`datasets_manifests.scrub`: the texts emptied, the source list without the urls).
Neither removes a version that an unfinished stage run reads (its rerun would fail half-way), and a version with
a tag (`blip data tag`) is not removed whole: the tag is moved or removed first.

Each removal writes its record first (`<root>/.removed/<kind>s/<name>/<version>.json`), then deletes: a removal
killed half-way is finished by the next `blip data rm` (`finish_removals`, or the same command again), a removed
version's name is never given again (`Registry.next_version`), and asking for it says when and where it was
removed. On a local registry a whole version leaves in one rename (into `.removing/`, emptied at once); on an
object store its manifest goes first, so no reader sees a half-removed version.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from datasets_manifests.manifest import Manifest
from datasets_manifests.ops import COPY_PREFIXES, run_described
from datasets_manifests.registry import MANIFEST_NAME, Registry, RegistryError, now_utc
from datasets_manifests.scrub import Scrub, plan_scrub, scrub
from datasets_manifests.tags import tags_by_id

DATA_ROLES = ("shard", "weights", "image")  # what --data-only frees; the index, stats, configs and metrics stay
REMOVING_DIR = ".removing"  # a local registry's whole versions on their way out
DELETE_BATCH = 1000  # paths per delete request on an object store (S3's DeleteObjects takes up to 1,000)


class RemovalRefused(RegistryError):
    """A removal that would cut a kept version's lineage or pull the inputs from under an unfinished run."""


@dataclass(frozen=True)
class Removal:
    """One version to remove, and what of it is still there to delete."""

    manifest: Manifest
    data_only: bool
    files: tuple[str, ...]  # the version's files this removal deletes that are still there
    bytes: int
    shared_bytes: int = 0  # of `bytes`, what another version's hard links to the same files keep on disk (local)
    scrub: Scrub | None = None  # a version a takedown replaced: the files that still name what it took out

    @property
    def what(self) -> str:
        return "data" if self.data_only else "all"

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.manifest.ref, "kind": self.manifest.kind, "id": self.manifest.id, "what": self.what,
                "files": len(self.files), "bytes": self.bytes, "shared_bytes": self.shared_bytes,
                "scrub": None if self.scrub is None else self.scrub.to_dict()}  # fmt: skip


def plan_removals(registry: Registry, refs: Iterable[str], *, data_only: bool) -> list[Removal]:
    """The removals of `refs`, children before parents; raises `RemovalRefused` naming every reason when one of
    them may not be removed (nothing is removed then)."""
    manifests: dict[str, Manifest] = {}
    for ref in refs:
        manifest = registry.resolve(ref)
        manifests.setdefault(manifest.id, manifest)
    everything = registry.list()
    readers = _unfinished_readers(registry)
    tags = tags_by_id(registry)
    problems = []
    for manifest in manifests.values():
        for tag in tags.get(manifest.id, []) if not data_only else []:
            problems.append(f"{manifest.ref} is tagged {manifest.name}@{tag}: move the tag (`blip data tag "
                            f"{manifest.name}@vN {tag}`) or remove it (`blip data untag {manifest.name}@{tag}`) first")
        for key, run in readers.get(manifest.ref, []):
            problems.append(f"{manifest.ref} is read by the unfinished run {key} ({run}): let it finish, or remove "
                            f"its work first (`blip data work --remove {key}`)")  # fmt: skip
        children = [m.ref for m in everything if manifest.id in m.parent_ids and m.id not in manifests]
        if children and not data_only:
            problems.append(f"{manifest.ref} is a parent of {', '.join(sorted(children))}: remove those in the same "
                            "command, or free only its data files with --data-only (its record and lineage stay)")
        if data_only and not any(entry.role in DATA_ROLES for entry in manifest.files):
            problems.append(f"{manifest.ref} has no data files (shards, weights, images) to free: remove it whole, "
                            "without --data-only")  # fmt: skip
    if problems:
        raise RemovalRefused("refused, nothing removed:\n  " + "\n  ".join(problems))
    return [_removal(registry, manifest, data_only) for manifest in _children_first(list(manifests.values()))]


def remove(registry: Registry, removal: Removal, on_files: Callable[[int], object] | None = None) -> None:
    """Carry out one planned removal: its record, then its files (`on_files(n)` after each `n` deleted)."""
    manifest = removal.manifest
    _write_record(registry, removal)
    root = registry.version_path(manifest.kind, manifest.name, manifest.version)
    if removal.data_only:
        _delete_files(registry, manifest, removal.files, on_files)
        if removal.scrub is not None:
            scrub(registry, removal.scrub)
    elif registry.is_local:
        parking = Path(registry.root) / REMOVING_DIR / f"{manifest.kind}s-{manifest.name}-{manifest.version}-" \
            f"{uuid.uuid4().hex[:8]}"  # fmt: skip
        parking.parent.mkdir(exist_ok=True)
        if Path(root).exists():  # absent: a removal killed after the rename (`finish_removals` empties it)
            os.rename(root, parking)  # the version is gone in one step
        shutil.rmtree(parking, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(root).parent.rmdir()  # the name's last version
        if on_files is not None:
            on_files(len(removal.files))
    else:
        with contextlib.suppress(FileNotFoundError):
            registry.fs.rm_file(f"{root}/{MANIFEST_NAME}")  # first: the version is no longer listed
        _delete_files(registry, manifest, removal.files, on_files)
        with contextlib.suppress(FileNotFoundError):
            registry.fs.rm(root, recursive=True)  # what is left: empty folders, files no manifest named
    for prefix in COPY_PREFIXES:  # this machine's copies of what was removed
        shutil.rmtree(registry.work_base() / f"{prefix}{manifest.id[:24]}", ignore_errors=True)


def finish_removals(registry: Registry) -> list[str]:
    """Finish the whole removals a kill stopped after the version left the listing: what a local registry's
    `.removing/` holds, a store's version folders that lost their manifest to a removal (its record names them);
    returns the places emptied."""
    emptied = []
    parking = Path(registry.root) / REMOVING_DIR
    if registry.is_local and parking.is_dir():
        for folder in sorted(parking.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
            emptied.append(str(folder))
    elif not registry.is_local and (removed := registry.removed_versions()):
        for label, place in registry.uncommitted_publishes():  # <kind>s/<name>/<version>, without a manifest
            kind_dir, name, version = label.split("/")
            if (kind_dir[:-1], name, version) in removed:
                registry.fs.rm(registry.version_path(kind_dir[:-1], name, version), recursive=True)
                emptied.append(place)
    return emptied


def _removal(registry: Registry, manifest: Manifest, data_only: bool) -> Removal:
    entries = [entry for entry in manifest.files if entry.role in DATA_ROLES or not data_only]
    gone = registry.absent(manifest, entries)  # one listing: a rerun of a stopped removal deletes what is left
    left = [entry for entry in entries if entry.path not in gone]
    shared = 0
    if registry.is_local:  # a takedown's new version hard-links the shards it left as they were: those stay
        root = registry.version_path(manifest.kind, manifest.name, manifest.version)
        shared = sum(entry.bytes for entry in left if os.stat(f"{root}/{entry.path}").st_nlink > 1)
    kept = [entry for entry in manifest.files if entry.role not in DATA_ROLES]
    return Removal(manifest=manifest, data_only=data_only, files=tuple(entry.path for entry in left),
                   bytes=sum(entry.bytes for entry in left), shared_bytes=shared,
                   scrub=plan_scrub(registry, manifest, kept) if data_only else None)  # fmt: skip


def _children_first(manifests: list[Manifest]) -> list[Manifest]:
    """The manifests ordered so that each comes before its parents among them: a removal stopped half-way never
    leaves a kept version whose parent is gone."""
    ordered: list[Manifest] = []
    pending = list(manifests)
    while pending:
        # (a cycle cannot be made: a parent's id is fixed before its child's; the fallback only keeps this finite)
        leaves = [m for m in pending if not any(m.id in other.parent_ids for other in pending)] or pending[:1]
        ordered += leaves
        pending = [m for m in pending if m.id not in {leaf.id for leaf in leaves}]
    return ordered


def _unfinished_readers(registry: Registry) -> dict[str, list[tuple[str, str]]]:
    """ref -> (work key, 'stage → name') of each unfinished stage run whose note names the version as an input."""
    readers: dict[str, list[tuple[str, str]]] = {}
    for area in registry.work_areas():
        note = area.note or {}
        if area.published is None and area.files:
            for ref in note.get("parents", []):
                readers.setdefault(ref, []).append((area.key, run_described(note)))
    return readers


def _write_record(registry: Registry, removal: Removal) -> None:
    manifest = removal.manifest
    earlier = registry.removal(manifest) or {}  # a data-only removal before (or this one, stopped half-way)
    sizes = {entry.path: entry.bytes for entry in manifest.files}
    files = sorted(set(earlier.get("files", ())) | set(removal.files)) if removal.data_only else sorted(sizes)
    record = {"ref": manifest.ref, "kind": manifest.kind, "id": manifest.id, "what": removal.what,
              "files": files if removal.data_only else [], "bytes": sum(sizes[path] for path in files),
              "removed_at": now_utc(), "host": socket.gethostname(),
              **({"scrubbed": earlier["scrubbed"]} if "scrubbed" in earlier and removal.data_only else {})}  # fmt: skip
    registry.write_removal(manifest, record)


def _delete_files(registry: Registry, manifest: Manifest, relpaths: tuple[str, ...],
                  on_files: Callable[[int], object] | None) -> None:  # fmt: skip
    root = registry.version_path(manifest.kind, manifest.name, manifest.version)
    paths = [f"{root}/{relpath}" for relpath in relpaths]
    for relpath, path in zip(relpaths, paths):
        registry.check_inside(path, f"{manifest.ref}/{relpath}")  # never a file a symlink takes outside the registry
    if registry.is_local:
        for path in paths:
            Path(path).unlink(missing_ok=True)
            if on_files is not None:
                on_files(1)
        for folder in sorted({Path(path).parent for path in paths}, key=lambda p: len(p.parts), reverse=True):
            while folder != Path(root) and Path(root) in folder.parents:  # the folders it emptied (shards/...)
                try:
                    folder.rmdir()
                except OSError:
                    break
                folder = folder.parent
        return
    for start in range(0, len(paths), DELETE_BATCH):
        batch = paths[start : start + DELETE_BATCH]
        registry.fs.rm(batch)  # one request for the batch on s3 / gcs
        if on_files is not None:
            on_files(len(batch))
