"""`blip data find`: where a sample is in the registry — every dataset version whose per-sample index holds one of
the given URLs, keys or image sha256s, whether it is kept there (or why it was dropped) and in which shard, and
the models and evaluations made from the versions that keep it (`trained_on`).

The question a takedown request asks ("is my photo in your training data, and what was trained on it?"; web-scale
opt-outs name URLs). An index carries a Bloom filter per row group on its key, url and image_sha256 columns
(datasets_manifests.bloom): only the row groups whose filters may hold an asked value are read (~1 % of the others
at 1 % false positives), a row group at a time and only the columns asked about (a URL search reads the `url`
column, not the keys, hashes and captions beside it), the values looked up by Arrow (`is_in`); the rest of a
matching row is then read from the row groups that hold matches. An index written before the filters (or before
the key's) has the asked column of every row group read: bounded memory on a 129M-row index either way.
Versions whose data files were removed (`blip data rm --data-only`) keep their index, so they are searched too
and said to be so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np

from datasets_manifests.bloom import row_groups_to_read, value_hashes
from datasets_manifests.index import (INDEX_FILE, bool_mask, check_index_columns, has_layer, open_parquet,
                                      open_registry_file)
from datasets_manifests.manifest import Manifest, children_by_parent
from datasets_manifests.registry import Registry

COLUMNS = ["key", "url", "image_sha256", "status", "drop_reason", "split", "shard", "caption"]


@dataclass(frozen=True)
class Found:
    """One sample of one version that matched."""

    ref: str
    key: str
    url: str | None
    image_sha256: str | None
    status: str
    drop_reason: str | None
    split: str | None
    shard: str | None
    caption: str | None
    data_removed: bool = False  # the version's data files were removed; its index remains

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_samples(registry: Registry, *, urls: Iterable[str] = (), keys: Iterable[str] = (),
                 sha256s: Iterable[str] = (), on_version: Callable[[Manifest], object] | None = None) -> list[Found]:
    """Every row of every dataset version's index whose url, key or image_sha256 is one of those given."""
    import pyarrow as pa

    wanted = {column: pa.array(sorted(set(values)), pa.string())
              for column, values in (("url", urls), ("key", keys), ("image_sha256", [s.lower() for s in sha256s]))
              if values}  # fmt: skip
    if not wanted:
        raise ValueError("nothing to find: give a URL, a key or an image sha256")
    hashes = {column: value_hashes(values.to_pylist()) for column, values in wanted.items()}
    removed = registry.removed_versions()
    found = []
    for manifest in registry.list("dataset"):
        if on_version is not None:
            on_version(manifest)
        if not has_layer(manifest, INDEX_FILE):
            continue
        data_removed = (manifest.kind, manifest.name, manifest.version) in removed
        with open_registry_file(registry, registry.path_of(manifest, INDEX_FILE)) as handle:
            file = open_parquet(handle)
            check_index_columns(file.schema_arrow, manifest, COLUMNS)  # the answer's columns, before the scan
            matches = _matching_rows(file, handle, wanted, hashes)
            for row in _index_rows(file, matches, COLUMNS).to_pylist():
                found.append(Found(ref=manifest.ref, data_removed=data_removed, **row))
    return found


def _matching_rows(file: Any, handle: Any, wanted: dict[str, Any], hashes: dict[str, list[int]]) -> Any:
    """The row numbers (ascending) whose asked column holds an asked value: only the row groups whose Bloom filters
    may hold one are read (all of them in an index written without filters), a row group at a time."""
    import pyarrow.compute as pc

    starts = _row_group_starts(file)
    rows = [np.zeros(0, dtype=np.int64)]
    for group in row_groups_to_read(file.metadata, handle, hashes):
        table = file.read_row_group(group, columns=list(wanted))
        mask = None
        for column, values in wanted.items():
            hit = pc.is_in(table.column(column), value_set=values)
            mask = hit if mask is None else pc.or_(mask, hit)
        rows.append(np.flatnonzero(bool_mask(mask)) + starts[group])
    return np.concatenate(rows)


def _row_group_starts(file: Any) -> Any:
    return np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)])


def _index_rows(file: Any, rows: Any, columns: list[str]) -> Any:
    """`columns` of the index rows numbered `rows` (ascending), reading only the row groups that hold them."""
    import pyarrow as pa

    if not len(rows):
        return pa.table({column: pa.array([], pa.string()) for column in columns})
    starts = _row_group_starts(file)
    groups = np.searchsorted(starts, rows, side="right") - 1
    pieces = [file.read_row_group(int(group), columns=columns).take(pa.array(rows[groups == group] - starts[group]))
              for group in np.unique(groups)]  # fmt: skip
    return pa.concat_tables(pieces)


def trained_on(registry: Registry, refs: Iterable[str]) -> list[Manifest]:
    """The models and evaluations made from the dataset versions `refs` (those that keep a sample): models trained
    on one of them, the models finetuned from those, their evaluations, and so on. Datasets made from them are not
    followed: each is searched itself (`find_samples`), and one that dropped the sample passed it on to nothing."""
    everything = registry.list()
    by_ref = {manifest.ref: manifest for manifest in everything}
    children = children_by_parent(everything)
    seen: dict[str, Manifest] = {}
    pending = [by_ref[ref] for ref in refs if ref in by_ref]
    while pending:
        for child in children.get(pending.pop().id, []):
            if child.kind != "dataset" and child.id not in seen:
                seen[child.id] = child
                pending.append(child)
    return sorted(seen.values(), key=lambda m: (m.kind, m.name, m.version))
