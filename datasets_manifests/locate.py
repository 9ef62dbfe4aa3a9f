"""`blip data find`: where a sample is in the registry — every dataset version whose per-sample index holds one of
the given URLs, keys or image sha256s, whether it is kept there (or why it was dropped) and in which shard, and
the models and evaluations made from the versions that keep it (`trained_on`).

The question a takedown request asks ("is my photo in your training data, and what was trained on it?"; web-scale
opt-outs name URLs). Each index is read a batch at a time, only the columns asked about (a URL search reads the
`url` column, not the keys, hashes and captions beside it), the values looked up by Arrow (`is_in`): bounded
memory on a 129M-row index; the rest of a matching row is then read from the row groups that hold matches.
Versions whose data files were removed (`blip data rm --data-only`) keep their index, so they are searched too
and said to be so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np

from datasets_manifests.index import INDEX_FILE, bool_mask, check_index_columns, has_layer, open_parquet, scan_index
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
    import pyarrow.compute as pc

    wanted = {column: pa.array(sorted(set(values)), pa.string())
              for column, values in (("url", urls), ("key", keys), ("image_sha256", [s.lower() for s in sha256s]))
              if values}  # fmt: skip
    if not wanted:
        raise ValueError("nothing to find: give a URL, a key or an image sha256")
    removed = registry.removed_versions()
    found = []
    for manifest in registry.list("dataset"):
        if on_version is not None:
            on_version(manifest)
        if not has_layer(manifest, INDEX_FILE):
            continue
        data_removed = (manifest.kind, manifest.name, manifest.version) in removed
        check_index_columns(registry, manifest, COLUMNS)  # the answer's columns, before the scan
        rows = []  # the row numbers of the matches in the index, ascending
        start = 0
        for batch in scan_index(registry, manifest, list(wanted)):
            mask = None
            for column, values in wanted.items():
                hit = pc.is_in(batch.column(column), value_set=values)
                mask = hit if mask is None else pc.or_(mask, hit)
            rows.append(np.flatnonzero(bool_mask(mask)) + start)
            start += batch.num_rows
        matches = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        for row in _index_rows(registry, manifest, matches, COLUMNS).to_pylist():
            found.append(Found(ref=manifest.ref, data_removed=data_removed, **row))
    return found


def _index_rows(registry: Registry, manifest: Manifest, rows: Any, columns: list[str]) -> Any:
    """`columns` of the index rows numbered `rows` (ascending), reading only the row groups that hold them."""
    import pyarrow as pa

    if not len(rows):
        return pa.table({column: pa.array([], pa.string()) for column in columns})
    path = registry.path_of(manifest, INDEX_FILE)
    handle = None if registry.is_local else registry.fs.open(path, "rb")
    try:
        file = open_parquet(path if handle is None else handle)
        starts = np.cumsum([0] + [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)])
        groups = np.searchsorted(starts, rows, side="right") - 1
        pieces = [file.read_row_group(int(group), columns=columns).take(pa.array(rows[groups == group] - starts[group]))
                  for group in np.unique(groups)]  # fmt: skip
        return pa.concat_tables(pieces)
    finally:
        if handle is not None:
            handle.close()


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
