"""Operations over published versions: verify checksums, diff two versions sample by sample, walk lineage.

`verify` recomputes the sha256 and size of every file a manifest lists (the check `git fsck` or DVC's
`status` does for their stores). `diff` joins the per-sample indexes of two versions on the stable sample
key: what was added, removed, re-captioned or newly dropped by a stage (`diff_tables` keeps the result in
memory-mapped Arrow files, for the browser's pages). `lineage` walks parents (up to the sources) and children
(down to models and evaluations) by content id.
pyarrow is imported inside `diff`, so `blip data ls|verify|lineage` stay light.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from datasets_manifests.filesystems import sha256_file
from datasets_manifests.manifest import FileEntry, Manifest, children_by_parent
from datasets_manifests.registry import Registry


# --------------------------------------------------------------------------- verify
def verify(registry: Registry, ref: str | Manifest, chunk: int = 1 << 20, workers: int | None = None,
           progress: bool = False) -> list[str]:  # fmt: skip
    """Problems with a version's files (missing, wrong size, wrong sha256) and, when they are intact, with its
    per-sample index (contract, shards it points at, where it places each sample's texts); empty when all is well.

    Files are hashed by `workers` threads (hashlib and file reads release the GIL; default: one per core on a
    local registry, 16 on object storage, where each read waits on the network): a 129M-sample version is
    terabytes. `progress`: a bar over the bytes on stderr (shown on a terminal only)."""
    manifest = registry.resolve(ref)
    workers = workers or ((os.cpu_count() or 1) if registry.is_local else 16)
    from tqdm import tqdm

    removal = registry.removal(manifest)  # files `blip data rm --data-only` removed are not damage: not checked
    files = [entry for entry in manifest.files if entry.path not in set((removal or {}).get("files", ()))]
    scrubbed = registry.accepted_digests(manifest, removal)  # files written again after a takedown replaced it
    with tqdm(total=sum(entry.bytes for entry in files), unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"verifying {manifest.ref}", disable=None if progress else True) as bar:  # fmt: skip

        damaged = registry.absent(manifest, files)  # missing or resized: one listing, nothing to hash

        def check(entry: FileEntry) -> str | None:
            path = registry.path_of(manifest, entry.path)
            if entry.path in damaged:
                return damaged[entry.path]
            digest, size = sha256_file(path, registry.fs, chunk, on_read=bar.update)
            if entry.path in scrubbed:
                if (digest, size) in scrubbed[entry.path]:
                    return None
                return f"{entry.path}: sha256 {digest[:12]}, {size} bytes: neither the manifest's nor what `blip " \
                    "data rm --data-only` wrote again after a takedown (its removal record)"  # fmt: skip
            if size != entry.bytes:  # changed between the listing and the read
                return f"{entry.path}: {size} bytes, manifest says {entry.bytes}"
            if digest != entry.sha256:
                return f"{entry.path}: sha256 {digest[:12]} != manifest {entry.sha256[:12]}"
            return None

        with ThreadPoolExecutor(max_workers=workers) as pool:  # results in the manifest's file order
            problems = [problem for problem in pool.map(check, files) if problem is not None]
    if not problems:  # only a verified index is worth reading
        problems += _index_problems(registry, manifest)
    if not problems:
        problems += _texts_position_problems(registry, manifest)
    # Parents missing from this registry are not damage to this version; `lineage` shows them as missing.
    return problems


def _index_problems(registry: Registry, manifest: Manifest) -> list[str]:
    """The index must satisfy its contract and point only at shards this version lists. Read a batch at a time
    (a 129M-row index does not fit in memory). Keys in strictly increasing order (every stage but CapFilt
    writes them so) are unique as read; otherwise their uniqueness is checked on 64-bit hashes of the key column
    (`spill.first_repeated_key`: 8 bytes a key, where Arrow's hash of the strings took ~65), hashed as they are
    read from the first batch out of order on (the keys before it are read again: none for CapFilt's index)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from datasets_manifests.index import INDEX_FILE, has_layer, scan_index, validate_index
    from datasets_manifests.spill import first_repeated_key, key_hashes

    if not has_layer(manifest, INDEX_FILE):
        return []

    def key_batches() -> Iterator[pa.Array]:
        return (batch.column("key") for batch in scan_index(registry, manifest, ["key"]))

    shards: set[str] = set()
    increasing, last_key, rows_read = True, None, 0
    hashes: list[Any] | None = None  # the keys' hashes, once they are found out of order
    try:
        for batch in scan_index(registry, manifest):
            table = validate_index(pa.Table.from_batches([batch]), what=INDEX_FILE)
            shards.update(s for s in pc.unique(table.column("shard")).to_pylist() if s is not None)
            keys = table.column("key")
            if increasing and len(keys):
                increasing = (last_key is None or last_key < keys[0].as_py()) and _strictly_increasing(keys)
                last_key = keys[-1].as_py()
                if not increasing:
                    hashes = [key_hashes(before) for before in _first_rows(key_batches(), rows_read)]
            if hashes is not None:
                hashes.append(key_hashes(keys))
            rows_read += len(keys)
        repeated = None if increasing else first_repeated_key(key_batches, hashes=hashes)
        if repeated is not None:
            return [f"{INDEX_FILE}: duplicate key {repeated[0]!r}; keys must be unique per version"]
    except Exception as error:  # noqa: BLE001 - any unreadable/invalid index is a problem to report
        return [f"{INDEX_FILE}: {error}"]
    listed = {entry.path for entry in manifest.files}
    return [f"{INDEX_FILE}: samples point at {s}, which the manifest does not list" for s in sorted(shards - listed)]


def _texts_position_problems(registry: Registry, manifest: Manifest) -> list[str]:
    """Where the index says each sample's texts are (`TEXTS_POSITION`), texts.parquet must have them: its keys,
    read a batch at a time beside the index's, are each index key repeated `texts_count` times, from `texts_row`
    on, with nothing before, between or after (a merge of two streams: bounded memory at 129M samples)."""
    import pyarrow.parquet as pq

    from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, TEXTS_POSITION, has_layer

    if not has_layer(manifest, TEXTS_FILE) or not has_layer(manifest, INDEX_FILE):
        return []
    with registry.fs.open(registry.path_of(manifest, INDEX_FILE), "rb") as handle:
        if not set(TEXTS_POSITION) <= set(pq.read_schema(handle).names):
            return []
    try:
        return _walk_texts_positions(registry, manifest)
    except Exception as error:  # noqa: BLE001 - an unreadable file or a corrupt column is a problem to report
        return [f"{INDEX_FILE} / {TEXTS_FILE}: {error}"]


def _walk_texts_positions(registry: Registry, manifest: Manifest) -> list[str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from datasets_manifests.index import (INDEX_FILE, TEXTS_FILE, TEXTS_POSITION, bool_mask, iter_registry_parquet,
                                          scan_index)

    texts = iter_registry_parquet(registry, registry.path_of(manifest, TEXTS_FILE), ["key"])
    with closing(texts):  # an early answer closes the texts file too
        text_keys = (batch.column(0) for batch in texts)
        pending, next_row = pa.array([], pa.string()), 0
        for batch in scan_index(registry, manifest, ["key", *TEXTS_POSITION]):
            rows = batch.column("texts_row").to_numpy(zero_copy_only=False)
            counts = batch.column("texts_count").to_numpy(zero_copy_only=False)
            starts = next_row + np.concatenate([[0], np.cumsum(counts)[:-1]])
            if len(rows) and not np.array_equal(rows, starts):
                at = int(np.argmax(rows != starts))
                return [f"{INDEX_FILE}: texts_row of key {batch.column('key')[at].as_py()!r} is {rows[at]}; the texts "
                        f"of the samples before it end at row {starts[at]} of {TEXTS_FILE}"]
            expected = batch.column("key").take(pa.array(np.repeat(np.arange(len(counts)), counts)))
            next_row += int(counts.sum())
            while len(expected):
                if not len(pending):
                    pending = next(text_keys, None)
                    if pending is None:
                        return [f"{TEXTS_FILE}: ends at row {next_row - len(expected)}, the index places "
                                f"{len(expected)} more texts after it"]
                take = min(len(pending), len(expected))
                same = bool_mask(pc.equal(pending.slice(0, take), expected.slice(0, take)))
                if not same.all():
                    at = int(np.argmin(same))
                    row = next_row - len(expected) + at
                    return [f"{TEXTS_FILE}: row {row} is a text of {pending[at].as_py()!r}; the index places a text "
                            f"of {expected[at].as_py()!r} there"]
                pending, expected = pending.slice(take), expected.slice(take)
        extra = len(pending) + sum(len(keys) for keys in text_keys)
    if extra:
        return [f"{TEXTS_FILE}: {extra} texts after row {next_row - 1}, which no index row places"]
    return []


def _first_rows(arrays: Iterator[Any], count: int) -> Iterator[Any]:
    """The first `count` values of a stream of arrays, as arrays (the last one sliced)."""
    if count <= 0:
        return
    for values in arrays:
        yield values.slice(0, count)
        count -= len(values)
        if count <= 0:
            return


def _strictly_increasing(keys: Any) -> bool:
    import pyarrow.compute as pc

    return len(keys) < 2 or bool(pc.all(pc.less(keys.slice(0, len(keys) - 1), keys.slice(1))).as_py())


# --------------------------------------------------------------------------- diff
@dataclass(frozen=True)
class SampleDiff:
    """What changed between two versions, per sample key."""

    a: str
    b: str
    added: list[str]  # keys only in b
    removed: list[str]  # keys only in a
    recaptioned: list[dict[str, Any]]  # {key, a, b}: the training caption changed
    newly_dropped: list[dict[str, Any]]  # {key, reason}: ok in a, dropped in b
    restored: list[str]  # dropped in a, ok in b
    counts: dict[str, int] = field(default_factory=dict)  # the full counts (the lists above may be cut)
    manifest_changes: dict[str, Any] = field(default_factory=dict)  # counts / config / files that differ

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "counts": self.counts, "added": self.added, "removed": self.removed,
            "recaptioned": self.recaptioned, "newly_dropped": self.newly_dropped, "restored": self.restored,
            "manifest_changes": self.manifest_changes,
        }


DIFF_CATEGORIES = ("added", "removed", "recaptioned", "newly_dropped", "restored")


@dataclass(frozen=True)
class DiffTables:
    """A sample diff kept in Arrow: one table per category (`key`, plus `caption_a`/`caption_b` for recaptioned
    and `reason` for newly_dropped), in version b's order (removed: a's). The tables are memory-mapped files
    (already unlinked: they go when the tables do) and pages are slices, so nothing is converted to Python or
    read into memory until a page is shown, whatever the size of the diff."""

    categories: dict[str, Any]  # category -> pa.Table
    counts: dict[str, int]


DIFF_COLUMNS = ["key", "caption", "status", "drop_reason"]


def diff_tables(registry: Registry, a: Manifest, b: Manifest, batch_rows: int | None = None,
                progress: bool = False, on_rows: Callable[[int], None] | None = None) -> DiffTables:  # fmt: skip
    """Join two per-sample indexes by key without holding them: both indexes' four columns are copied to Arrow
    files and memory-mapped, a's keys become sorted 64-bit hashes (`spill.KeyLookup`: 16 bytes a key; each match
    confirmed on the keys), b is compared with its rows of a `batch_rows` at a time, and each category is
    appended to its own file. Measured (benchmarks/bench_diff.py): ~10 bytes of memory per sample of the two
    versions beyond ~0.3 GB (~3 GB for two 129M-row versions; Arrow's hash of a's key strings took ~30: ~8 GB),
    and ~80 bytes per sample of temporary disk, beside the registry's work dirs (`_scratch_dir`). `progress`: a
    bar over the rows read and compared, on stderr (a terminal only): minutes at 129M. `on_rows(n)` is told the
    same (rows of a, then of b twice: read, then compared) and may raise to stop the diff (the browser's
    abandoned requests)."""
    import tempfile

    import numpy as np
    import pyarrow as pa

    from datasets_manifests.index import INDEX_BATCH_ROWS, INDEX_SCHEMA, scan_index
    from datasets_manifests.spill import KeyLookup, SpilledRows, read_spilled, spill_writer

    batch_rows = batch_rows or INDEX_BATCH_ROWS
    copied = pa.schema([INDEX_SCHEMA.field(name) for name in DIFF_COLUMNS])
    key, caption, reason = copied.field("key"), copied.field("caption"), copied.field("drop_reason")
    # Each row also says where its key is in each index (row numbers): a page of the diff reads those rows only.
    row_a, row_b = pa.field("row_a", pa.int64()), pa.field("row_b", pa.int64())
    schemas = {
        "added": pa.schema([key, row_b]), "removed": pa.schema([key, row_a]),
        "recaptioned": pa.schema([key, caption.with_name("caption_a"), caption.with_name("caption_b"), row_a, row_b]),
        "newly_dropped": pa.schema([key, reason.with_name("reason"), row_a, row_b]),
        "restored": pa.schema([key, row_a, row_b]),
    }
    from tqdm import tqdm

    bar = tqdm(desc="diff: reading", unit=" rows", unit_scale=True, disable=None if progress else True)

    def advance(rows: int) -> None:
        bar.update(rows)
        if on_rows is not None:
            on_rows(rows)

    with bar, tempfile.TemporaryDirectory(prefix="blip-diff-", dir=_scratch_dir(registry)) as temporary:
        directory = Path(temporary)
        for side, manifest in (("a", a), ("b", b)):
            # Written batch_rows at a time (the scan gives row groups): few chunks for SpilledRows.
            with spill_writer(directory / f"{side}.arrow", copied, batch_rows) as writer:
                for batch in scan_index(registry, manifest, DIFF_COLUMNS):
                    advance(batch.num_rows)
                    writer.write_table(pa.Table.from_batches([batch]).cast(copied))
        table_a = read_spilled([directory / "a.arrow"], copied)
        table_b = read_spilled([directory / "b.arrow"], copied)
        # The row of each b key in a, by 64-bit hashes confirmed on the keys of a's rows, read whole (compared next).
        keys_a = KeyLookup(table_a["key"], rows=SpilledRows(table_a))
        in_b = np.zeros(len(table_a), dtype=bool)  # a's rows that b has
        common = 0
        with ExitStack() as stack:
            out = {name: stack.enter_context(spill_writer(directory / f"{name}.arrow", schema))
                   for name, schema in schemas.items()}  # fmt: skip
            bar.set_description("diff: comparing")
            for start in range(0, len(table_b), batch_rows):
                advance(min(batch_rows, len(table_b) - start))
                part_b = table_b.slice(start, batch_rows)
                rows_in_a, common_a = keys_a.find(part_b["key"])  # -1: not in a; a's rows of the others
                in_a = rows_in_a >= 0
                in_b[rows_in_a[in_a]] = True
                new_keys = part_b["key"].filter(pa.array(~in_a))
                out["added"].write_table(pa.table([new_keys, start + np.flatnonzero(~in_a)], schema=schemas["added"]))
                common_b = part_b.filter(pa.array(in_a))
                common_rows_a = rows_in_a[in_a]
                common += len(common_b)
                rows = {"row_a": pa.array(common_rows_a), "row_b": start + np.flatnonzero(in_a)}
                for name, table in compare_rows(common_a, common_b, rows).items():
                    out[name].write_table(table.cast(schemas[name]))
            for start in range(0, len(table_a), batch_rows):
                gone = ~in_b[start:start + batch_rows]
                out["removed"].write_table(pa.table([table_a["key"].slice(start, batch_rows).filter(pa.array(gone)),
                                                     start + np.flatnonzero(gone)], schema=schemas["removed"]))
        # Unlinked when the folder goes; the memory maps keep the category files readable (POSIX).
        categories = {name: read_spilled([directory / f"{name}.arrow"], schema) for name, schema in schemas.items()}
    counts = {"a": len(table_a), "b": len(table_b), "common": common}
    counts.update({name: table.num_rows for name, table in categories.items()})
    return DiffTables(categories=categories, counts=counts)


def _scratch_dir(registry: Registry) -> str | None:
    """Where large temporary files go: beside the registry's work dirs (the registry's own disk for a local one,
    BLIP_WORK_DIR for a remote one), not TMPDIR, which is often a small tmpfs, i.e. memory; TMPDIR when that
    is not writable (a read-only registry one only browses)."""
    try:
        return str(registry.work_dir("scratch"))
    except OSError:
        return None


def compare_rows(common_a: Any, common_b: Any, carry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The re-captioned, newly dropped and restored samples among rows of a and b aligned by key (Arrow tables of
    `DIFF_COLUMNS`, row i of each the same key): one table per category, in the rows' order, each with the
    `carry` columns (one value per aligned row) after its own."""
    import pyarrow as pa
    import pyarrow.compute as pc

    caption_a, caption_b = common_a["caption"], common_b["caption"]
    # A caption that appears or disappears counts as re-captioned; null on both sides does not.
    recaptioned = pc.or_(pc.fill_null(pc.not_equal(caption_a, caption_b), False),
                         pc.xor(pc.is_null(caption_a), pc.is_null(caption_b)))
    status_a, status_b = common_a["status"], common_b["status"]
    newly_dropped = pc.fill_null(pc.and_(pc.equal(status_a, "ok"), pc.equal(status_b, "dropped")), False)
    restored = pc.fill_null(pc.and_(pc.equal(status_a, "dropped"), pc.equal(status_b, "ok")), False)
    keys, carry = common_b["key"], carry or {}
    return {
        "recaptioned": pa.table({"key": keys, "caption_a": caption_a, "caption_b": caption_b, **carry})
        .filter(recaptioned),
        "newly_dropped": pa.table({"key": keys, "reason": common_b["drop_reason"], **carry}).filter(newly_dropped),
        "restored": pa.table({"key": keys, **carry}).filter(restored),
    }


def diff(registry: Registry, ref_a: str | Manifest, ref_b: str | Manifest, limit: int | None = 20,
         progress: bool = False) -> SampleDiff:  # fmt: skip
    """Samples added / removed / re-captioned / newly dropped from version a to version b (joined by key).

    `counts` are exact; each list keeps at most `limit` examples (all of them with `limit=None`).
    """
    from datasets_manifests.index import INDEX_FILE, has_layer

    a, b = registry.resolve(ref_a), registry.resolve(ref_b)
    if not has_layer(a, INDEX_FILE) and not has_layer(b, INDEX_FILE):  # e.g. two models: manifests only
        return SampleDiff(a=a.ref, b=b.ref, added=[], removed=[], recaptioned=[], newly_dropped=[], restored=[],
                          counts={}, manifest_changes=manifest_changes(a, b))
    tables = diff_tables(registry, a, b, progress=progress)

    def head(category: str) -> list[dict[str, Any]]:
        table = tables.categories[category]
        return (table if limit is None else table.slice(0, limit)).to_pylist()

    return SampleDiff(
        a=a.ref, b=b.ref,
        added=[r["key"] for r in head("added")],
        removed=[r["key"] for r in head("removed")],
        recaptioned=[{"key": r["key"], "a": r["caption_a"], "b": r["caption_b"]} for r in head("recaptioned")],
        newly_dropped=[{"key": r["key"], "reason": r["reason"]} for r in head("newly_dropped")],
        restored=[r["key"] for r in head("restored")],
        counts=tables.counts,
        manifest_changes=manifest_changes(a, b),
    )


def manifest_changes(a: Manifest, b: Manifest) -> dict[str, Any]:
    """Manifest-level differences: counts, splits, drop reasons, producer config hash, file list."""
    changes: dict[str, Any] = {}
    for name in ("counts", "splits", "drop_reasons"):
        left, right = getattr(a, name), getattr(b, name)
        delta = {k: [left.get(k), right.get(k)] for k in sorted(set(left) | set(right)) if left.get(k) != right.get(k)}
        if delta:
            changes[name] = delta
    if a.producer.stage != b.producer.stage:
        changes["stage"] = [a.producer.stage, b.producer.stage]
    if a.producer.config_hash != b.producer.config_hash:
        changes["config_hash"] = [a.producer.config_hash, b.producer.config_hash]
    files_a, files_b = {e.path: e.sha256 for e in a.files}, {e.path: e.sha256 for e in b.files}
    file_changes = {
        "added": sorted(set(files_b) - set(files_a)),
        "removed": sorted(set(files_a) - set(files_b)),
        "changed": sorted(p for p in set(files_a) & set(files_b) if files_a[p] != files_b[p]),
    }
    if any(file_changes.values()):
        changes["files"] = file_changes
    return changes


# --------------------------------------------------------------------------- lineage
@dataclass
class LineageNode:
    """One version in a lineage tree; `manifest` is None for a parent this registry does not hold."""

    ref: str
    id: str
    manifest: Manifest | None
    links: list[LineageNode] = field(default_factory=list)  # parents (upward tree) or children (downward)
    repeated: bool = False  # already shown elsewhere in the tree (diamond lineage)
    data_removed: bool = False  # its data files were removed (`blip data rm --data-only`); its record stays

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ref": self.ref, "id": self.id, "missing": self.manifest is None}
        if self.manifest is not None:
            data.update(kind=self.manifest.kind, stage=self.manifest.producer.stage)
        if self.repeated:
            data["repeated"] = True
        if self.data_removed:
            data["data_removed"] = True
        data["links"] = [link.to_dict() for link in self.links]
        return data


@dataclass
class Lineage:
    root: Manifest
    parents: list[LineageNode]  # each with its own parents, up to the sources
    children: list[LineageNode]  # each with its own children, down to the leaves
    root_data_removed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.root.ref, "id": self.root.id,
            "parents": [node.to_dict() for node in self.parents],
            "children": [node.to_dict() for node in self.children],
        }

    def render(self) -> list[str]:
        """A text tree: sources above (indented upward), the version, then what was made from it."""
        lines = [f"{self.root.ref}  [{self.root.kind}, {self.root.short_id}, {self.root.producer.stage}]"
                 + ("  (data removed)" if self.root_data_removed else "")]
        if self.parents:
            lines.append("  made from:")
            lines += _render(self.parents, "    ")
        if self.children:
            lines.append("  used by:")
            lines += _render(self.children, "    ")
        if not self.parents and not self.children:
            lines.append("  (no parents, no children)")
        return lines


def _render(nodes: list[LineageNode], indent: str) -> list[str]:
    lines = []
    for position, node in enumerate(nodes):
        last = position == len(nodes) - 1
        if node.manifest is None:
            label = f"{node.ref}  [missing from this registry, {node.id[:12]}]"
        else:
            label = f"{node.ref}  [{node.manifest.kind}, {node.id[:12]}, {node.manifest.producer.stage}]"
        if node.data_removed:
            label += "  (data removed)"
        if node.repeated:
            label += "  (see above)"
        lines.append(f"{indent}{'└─ ' if last else '├─ '}{label}")
        lines += _render(node.links, indent + ("   " if last else "│  "))
    return lines


def lineage(registry: Registry, ref: str | Manifest) -> Lineage:
    """Parents up to the sources and children down to the leaves, by content id."""
    root = registry.resolve(ref)
    everything = registry.list()
    by_id = {m.id: m for m in everything}
    removed = registry.removed_versions()  # one listing

    def data_removed(manifest: Manifest | None) -> bool:
        return manifest is not None and (manifest.kind, manifest.name, manifest.version) in removed
    children_of = children_by_parent(everything)

    def up(manifest: Manifest, seen: set[str]) -> list[LineageNode]:
        nodes = []
        for parent_ref, parent_id in zip(manifest.parents, manifest.parent_ids):
            parent = by_id.get(parent_id)
            node = LineageNode(ref=parent_ref, id=parent_id, manifest=parent, repeated=parent_id in seen,
                               data_removed=data_removed(parent))  # fmt: skip
            if parent is not None and not node.repeated:
                seen.add(parent_id)
                node.links = up(parent, seen)
            nodes.append(node)
        return nodes

    def down(manifest: Manifest, seen: set[str]) -> list[LineageNode]:
        nodes = []
        for child in sorted(children_of.get(manifest.id, []), key=lambda m: (m.kind, m.name, m.version)):
            node = LineageNode(ref=child.ref, id=child.id, manifest=child, repeated=child.id in seen,
                               data_removed=data_removed(child))  # fmt: skip
            if not node.repeated:
                seen.add(child.id)
                node.links = down(child, seen)
            nodes.append(node)
        return nodes

    return Lineage(root=root, parents=up(root, {root.id}), children=down(root, {root.id}),
                   root_data_removed=data_removed(root))


# ------------------------------------------------------------------------------------------------- work areas

TRAIN_RUNS = "train-runs"  # the training stages' default Ray Train storage, a folder of the work dir
COPY_PREFIXES = ("fetch-", "model-")  # local copies of a remote registry's files, fetched again when needed
CACHES = {"scratch": "temporary files of diffs", "demo-corpus-": "the generated demo corpus",  # made again
          "scrub-": "files a stopped `blip data rm --data-only` wrote to replace a version's (scrub.SCRUB_DIR)"}


@dataclass(frozen=True)
class WorkEntry:
    """One row of `blip data work`: a stage run's work, a training run's checkpoints, or a local copy."""

    key: str  # what `--remove` takes: the work key, or train-runs/<run name>
    what: str
    state: str  # "running" | "unfinished" | "leftover" | "cache" | "checkpoints" | "uncommitted"
    detail: str
    bytes: int
    files: int
    modified: float | None
    places: tuple[str, ...]
    outside: tuple[str, ...] = ()  # places outside the registry the run noted (a download's output_folder run)
    # Nothing a rerun needs (what --remove-leftovers takes): a published run's work, a cache, the checkpoints of
    # a run whose model is published.
    removable_as_leftover: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "what": self.what, "state": self.state, "detail": self.detail, "bytes": self.bytes,
                "files": self.files, "modified": self.modified, "places": list(self.places),
                "outside": list(self.outside), "removable_as_leftover": self.removable_as_leftover}  # fmt: skip


def work_entries(registry: Registry) -> list[WorkEntry]:
    """What the registry's stage runs left in their work dirs (`Registry.work_areas`), each said for what it is:
    an unfinished run (a rerun of the same inputs and config goes on from it), the leftover of a published one,
    a cache (a local copy of a remote version's files, the demo corpus: made again when needed), or a training
    run's checkpoints (`_training_runs`). Empty folders are left out."""
    entries = []
    by_id_prefix = {m.id[:24]: m.ref for m in registry.list()}
    areas = registry.work_areas()
    for area in areas:
        common = {"bytes": area.bytes, "files": area.files, "modified": area.modified, "places": area.places}
        outside = [_listing(place) for place in (area.note or {}).get("outside", [])]
        outside = [(place, size, files, modified) for place, size, files, modified in outside if files]
        if outside:  # counted with the run's own work, and removed with it
            times = [t for t in [area.modified, *(o[3] for o in outside)] if t is not None]
            common = {"bytes": area.bytes + sum(o[1] for o in outside), "modified": max(times, default=None),
                      "files": area.files + sum(o[2] for o in outside), "places": area.places,
                      "outside": tuple(o[0] for o in outside)}  # fmt: skip
        cache = next((what for prefix, what in CACHES.items() if area.key.startswith(prefix)), None)
        if area.key == TRAIN_RUNS:
            continue  # its runs, one by one, below
        elif area.files == 0:
            continue
        elif area.published is not None:
            entries.append(WorkEntry(key=area.key, what=run_described(area.note), state="leftover",
                                     detail=f"published as {area.published}", removable_as_leftover=True,
                                     **common))  # fmt: skip
        elif area.key.startswith(COPY_PREFIXES):
            source = by_id_prefix.get(area.key.split("-", 1)[1], "a version no longer in the registry")
            entries.append(WorkEntry(key=area.key, what=f"local copy of {source}", state="cache",
                                     detail="fetched again when needed", removable_as_leftover=True,
                                     **common))  # fmt: skip
        elif cache is not None:
            entries.append(WorkEntry(key=area.key, what=cache, state="cache", detail="made again when needed",
                                     removable_as_leftover=True, **common))  # fmt: skip
        else:
            note = area.note or {}
            detail = f"started {note.get('started_at', '?')} on {note.get('host', '?')}" if note else "not published"
            # its process holds the run's lock now (this machine), or beat in the store's note (another one)
            running = registry.running_elsewhere(area.key) or registry.alive_elsewhere(note)
            if running:
                detail = f"{detail} (pid {note.get('pid', '?')}); --remove refuses it while it runs"
            entries.append(WorkEntry(key=area.key, what=run_described(area.note),
                                     state="running" if running else "unfinished", detail=detail,
                                     **common))  # fmt: skip
    return entries + _training_runs(registry, areas) + _uncommitted(registry)


def run_described(note: dict[str, Any] | None) -> str:
    """'stage → version name' from a run's note (`Registry.note_work`)."""
    if not note:
        return "stage run (no note: an older run)"
    return f"{note.get('stage', '?')} → {note.get('name', '?')}"


def _uncommitted(registry: Registry) -> list[WorkEntry]:
    """Publishes that stopped before their commit: never removed by `--remove-leftovers`, since a publish going
    on now looks the same."""
    entries = []
    removed = registry.removed_versions() if not registry.is_local else set()
    for label, place in registry.uncommitted_publishes():
        _, size, files, modified = _listing(place)
        parts = label.split("/")  # .staging/<name>-<id>, or <kind>s/<name>/<version>
        version = parts[1].rsplit("-", 1)[0] if parts[0] == ".staging" else f"{parts[1]}@{parts[2]}"
        what = f"a publish of {version}"
        detail = "stopped before its commit, or publishing now: remove it with --remove once no publish runs"
        if parts[0] != ".staging" and (claim := registry.claim_of(place)):
            who = f"{claim.get('host', '?')} (pid {claim.get('pid', '?')}, {claim.get('stage', '?')})"
            detail = f"started {claim.get('started_at', '?')} on {who}; {detail}"
        if parts[0] != ".staging" and (parts[0][:-1], parts[1], parts[2]) in removed:
            what, detail = f"a removal of {version}", "stopped half-way: the next `blip data rm` finishes it"
        entries.append(WorkEntry(key=label, what=what, state="uncommitted", detail=detail, bytes=size, files=files,
                                 modified=modified, places=(place,)))  # fmt: skip
    return entries


def _training_runs(registry: Registry, areas: list[Any]) -> list[WorkEntry]:
    """Ray Train runs and their checkpoints: every run folder of the default storage (`train-runs` in the work
    dir), and the runs of another storage (`scaling.storage_path`: s3://... on a cluster) that a published model or
    an unfinished run's note names; each with the model published from it, if any."""
    default = str(registry.work_base() / TRAIN_RUNS)
    runs: dict[tuple[str, str], str | None] = {}  # (storage, run name) -> the model published from it
    if Path(default).is_dir():
        runs.update({(default, folder.name): None for folder in Path(default).iterdir() if folder.is_dir()})
    for area in areas:
        run = (area.note or {}).get("ray_run") or {}
        if run.get("name") and run.get("storage_path"):
            runs.setdefault((str(run["storage_path"]), run["name"]), None)
    for model in registry.list("model"):
        run = model.metadata.get("ray_run") or {}
        if run.get("name") and run.get("storage_path"):
            runs[(str(run["storage_path"]), run["name"])] = model.ref
    entries = []
    for (storage, name), model in sorted(runs.items()):
        place, size, files, modified = _listing(f"{storage.rstrip('/')}/{name}")
        if not files:
            continue
        detail = f"model {model} published from it" if model else "no model published: `--resume` continues it"
        entries.append(WorkEntry(key=f"{TRAIN_RUNS}/{name}" if storage == default else place,
                                 what=f"Ray Train run {name}", state="checkpoints", detail=detail, bytes=size,
                                 files=files, modified=modified, places=(place,),
                                 removable_as_leftover=model is not None))  # fmt: skip
    return entries


def _listing(place: str) -> tuple[str, int, int, float | None]:
    """(place, bytes, files, latest modification) of a folder or prefix anywhere fsspec reaches; 0 files if absent."""
    from datasets_manifests.filesystems import url_to_fs
    from datasets_manifests.registry import listed_totals

    fs, root = url_to_fs(place)
    if not fs.exists(root):
        return place, 0, 0, None
    return (place, *listed_totals(fs.find(root, detail=True).values()))


def remove_work_entry(registry: Registry, entry: WorkEntry) -> list[str]:
    """Remove what `entry` holds (a training run's folder, or a work key's folder and store prefix, and what the
    run noted outside the registry)."""
    from datasets_manifests.filesystems import url_to_fs

    if entry.state in ("checkpoints", "uncommitted"):
        fs, root = url_to_fs(entry.places[0])
        fs.rm(root, recursive=True)
        return [entry.places[0]]
    removed = registry.remove_work(entry.key)
    for place in entry.outside:
        fs, root = url_to_fs(place)
        if fs.exists(root):
            fs.rm(root, recursive=True)
            removed.append(place)
    return removed
