"""What a takedown took out, taken out of the versions it replaced as well, when their data are freed.

A takedown (`pipelines.tasks.takedown`) publishes a next version without some samples; the version it replaced
is immutable and still names them: its index and texts quote their captions, its source list their urls, its
stats their rejected texts. `blip data rm OLD --data-only` frees the old version's shards and, for a version a
takedown replaced, writes those files again as the newest version of its line has them (`Registry.replaced_by`:
after two takedowns, the second's samples go too):

- the index and a CapFilt version's texts: row for row the same (the old version's own decisions: status, shard,
  kept), with the texts the newest version emptied emptied (its rows are the old ones in the same order, checked
  key by key);
- any other file the takedown rewrote (a source list without the urls, stats without the quotes): the newest
  version's file.

The key, url and image sha256 of each sample stay, as in the new version: `blip data find` still says the old
version kept the sample and which models were trained on it. A manifest cannot change (its id is its content's
hash): the removal record (`Registry.removal`) gives each file written again its new sha256 and size, which
`blip data verify` checks instead. The record is written before the files are replaced and marked done after, so
a scrub stopped half-way leaves each file either as published or as scrubbed (both verify) and is finished by
the same command again.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from datasets_manifests.filesystems import sha256_file
from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, iter_registry_parquet, scan_index
from datasets_manifests.manifest import FileEntry, Manifest
from datasets_manifests.registry import Registry, RegistryError, now_utc

# The files kept row for row, and their columns a takedown empties.
ROW_FOR_ROW = {INDEX_FILE: ("caption", "raw_caption"), TEXTS_FILE: ("text",)}
SCRUB_DIR = "scrub-"  # this machine's files written before they replace a version's (under `work_base`)


class ScrubError(RegistryError):
    """The newest version of a line is not the replaced one row for row: nothing is written."""


@dataclass(frozen=True)
class Scrub:
    """A version a takedown replaced, the newest version of its line, and the files to write again."""

    manifest: Manifest
    newest: Manifest
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"as": self.newest.ref, "files": list(self.files)}


def plan_scrub(registry: Registry, manifest: Manifest, kept: Iterable[FileEntry]) -> Scrub | None:
    """The scrub of `manifest`'s files `kept` (those a data-only removal leaves), or None when no takedown replaced
    it or it was scrubbed as the newest version of its line already."""
    if manifest.kind != "dataset" or (newest := registry.replaced_by(manifest)) is None:
        return None
    earlier = (registry.removal(manifest) or {}).get("scrubbed") or {}
    if earlier.get("as_id") == newest.id and earlier.get("done"):
        return None
    theirs = {entry.path: entry for entry in newest.files}
    files = tuple(entry.path for entry in kept if entry.path in theirs
                  and (entry.path in ROW_FOR_ROW or theirs[entry.path].sha256 != entry.sha256))  # fmt: skip
    return Scrub(manifest, newest, files) if files else None


def scrub(registry: Registry, plan: Scrub) -> dict[str, dict[str, Any]]:
    """Write `plan`'s files again and put them in place (recorded first); returns path -> new sha256 and size of
    each file now not as published."""
    manifest, newest = plan.manifest, plan.newest
    work = registry.work_base() / f"{SCRUB_DIR}{manifest.id[:24]}"
    shutil.rmtree(work, ignore_errors=True)  # a stopped scrub's files: written again
    written: dict[str, dict[str, Any]] = {}
    try:
        for path in plan.files:
            target = work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if path in ROW_FOR_ROW:
                _emptied_as_newest(registry, manifest, newest, path, target)
            else:
                with registry.open(newest, path) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
            digest, size = sha256_file(target)
            if digest != manifest.file(path).sha256:
                written[path] = {"sha256": digest, "bytes": size}
        record = registry.removal(manifest) or {}
        last = record.get("scrubbed") or {}
        earlier = last.get("files", {})
        # What each file may still be until this step is done, beside the manifest's: any earlier step's (a file
        # not yet replaced again is as the scrub before left it; a stopped step's, as it or as before it).
        before = {path: list(digests) for path, digests in last.get("before", {}).items()}
        for path, digest in earlier.items():
            if digest not in before.setdefault(path, []):
                before[path].append(digest)
        step = {"as": newest.ref, "as_id": newest.id, "at": now_utc(), "files": {**earlier, **written},
                "before": before}  # fmt: skip
        registry.write_removal(manifest, {**record, "scrubbed": {**step, "done": False}})
        for path in written:
            _replace(registry, manifest, path, work / path)
        registry.write_removal(manifest, {**record, "scrubbed": {**step, "done": True}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return written


def _emptied_as_newest(registry: Registry, manifest: Manifest, newest: Manifest, path: str, target: Path) -> None:
    """`manifest`'s index or texts with the texts `newest` emptied emptied; every other value its own."""
    import pyarrow.parquet as pq

    from datasets_manifests.index import write_index_batches, write_texts_batches

    with registry.open(manifest, path) as handle:
        schema = pq.read_schema(handle)
    columns = [column for column in ROW_FOR_ROW[path] if column in schema.names]

    def batches(version: Manifest, names: list[str]) -> Iterator[pa.RecordBatch]:
        if path == INDEX_FILE:
            return scan_index(registry, version, names)
        return iter_registry_parquet(registry, registry.path_of(version, path), names)

    def tables() -> Iterator[pa.Table]:
        for old, new in _row_for_row(batches(manifest, schema.names), batches(newest, ["key", *columns])):
            if not pc.all(pc.equal(old["key"], new["key"])).as_py():
                raise ScrubError(f"{newest.ref}/{path} is not {manifest.ref}/{path} row for row (first other key: "
                                 f"{_first_other_key(old, new)!r}): nothing scrubbed")  # fmt: skip
            for column in columns:
                values = pc.if_else(pc.is_valid(new[column]), old[column], pa.scalar(None, old[column].type))
                old = old.set_column(old.schema.get_field_index(column), old.schema.field(column), values)
            yield old

    if path == INDEX_FILE:
        write_index_batches(tables(), target, schema, in_key_order=False)  # the keys of a published index
    else:
        write_texts_batches(tables(), target, schema)


def _row_for_row(old: Iterator[pa.RecordBatch], new: Iterator[pa.RecordBatch]) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Pairs of tables of the same rows from two files read in batches of different sizes (row groups differ)."""
    left = pa.table({})
    for batch in old:
        if not batch.num_rows:
            continue
        parts = []
        while sum(len(part) for part in parts) < batch.num_rows:
            if not len(left):
                following = next(new, None)
                if following is None:
                    raise ScrubError("the newest version's file has fewer rows: nothing scrubbed")
                left = pa.Table.from_batches([following])
            wanted = batch.num_rows - sum(len(part) for part in parts)
            parts.append(left.slice(0, wanted))
            left = left.slice(min(wanted, len(left)))
        yield pa.Table.from_batches([batch]), pa.concat_tables(parts)
    if len(left) or any(following.num_rows for following in new):
        raise ScrubError("the newest version's file has more rows: nothing scrubbed")


def _first_other_key(old: pa.Table, new: pa.Table) -> str | None:
    differ = pc.fill_null(pc.not_equal(old["key"], new["key"]), True)
    return old["key"].filter(differ)[0].as_py()


def _replace(registry: Registry, manifest: Manifest, path: str, written: Path) -> None:
    """One file of a version replaced whole: a rename locally (a reader sees the old file or the new one), one
    put on an object store."""
    destination = registry.path_of(manifest, path)
    if registry.is_local:
        os.replace(written, destination)  # the work base is inside the registry: the same disk
    else:
        registry.fs.put_file(str(written), destination)
