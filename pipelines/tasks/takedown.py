"""Takedown: a dataset version without some of its samples, published as the next version of its name, made from it.

What a takedown request (an opt-out by URL, an image that must go) needs once `blip data find` has said where the
sample is: versions are immutable, so the samples are taken out of a new version — their members cut from the
shards that held them (the other shards are the same files: hard links on a local registry, copies inside the
store on a remote one), their index rows kept as `dropped` with the reason `takedown` and without their texts (the
key, url and image sha256 stay, so the new version says what was taken out and a diff against the old one shows
it), a CapFilt version's texts of them emptied and marked not kept, and their rows cut from the version's other
parquet files that name URLs (a download's source list and img2dataset's per-shard tables). Files without a `url`
column are the same files, listed in the version's stats (`unchanged`) for the operator to judge. Stats that quote
samples (a CapFilt version's rejected texts, in `stats.json` and, before, in its manifest) lose their entries.
The old version is then freed with `blip data rm OLD --data-only` (or `takedown --free-old`): its shards go, its
record stays (with the models trained on it in its lineage), and its index, texts, source list and stats are
written again as the newest version of its line has them (`datasets_manifests.scrub`). A rerun with the same
samples is the version already published (its cache key). A stage whose cached output samples were taken out
of goes on from the new version (`Registry.find_cached`): a flow rerun after a takedown makes again what was made
from the old data (a model trained on it is trained again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, has_layer, iter_registry_parquet, scan_index
from datasets_manifests.manifest import Manifest, Producer, cache_key
from datasets_manifests.registry import TAKEDOWN_REASON, TAKEDOWN_STAGE, Registry, now_utc, place_file
from pipelines.progress import StageProgress

log = logging.getLogger(__name__)

STAGE = TAKEDOWN_STAGE
REASON = TAKEDOWN_REASON
TEXT_COLUMNS = ("caption", "raw_caption")  # an index row's texts, emptied when its sample is taken out


@dataclass(frozen=True)
class TakenSamples:
    """The kept samples of a version to take out, and what finds their rows in its other files."""

    where: dict[str, tuple[str, int | None]]  # key -> (shard, .jpg offset)
    texts: set[tuple[str | None, str | None]]  # (url, raw caption) of each
    urls: set[str]  # their urls
    urls_still_kept: set[str]  # of `urls`, those other kept samples share: only a row of the same text goes


def run_takedown(registry: Registry, ref: str | Manifest, *, urls: Iterable[str] = (), keys: Iterable[str] = (),
                 sha256s: Iterable[str] = ()) -> Manifest | None:
    """The next version of `ref`'s name without its kept samples whose url, key or image sha256 is given (None
    when it keeps none of them)."""
    source = registry.resolve(ref, "dataset")
    if not has_layer(source, INDEX_FILE):
        raise ValueError(f"{source.ref} has no {INDEX_FILE}: its samples cannot be found to take them out")
    if registry.removal(source) is not None:
        raise ValueError(f"{source.ref}: its data files were removed (`blip data rm`); nothing to rewrite")
    found = _taken_samples(registry, source, set(urls), set(keys), {sha.lower() for sha in sha256s})
    taken = found.where
    if not taken:
        return None
    keys_digest = hashlib.sha256("\n".join(sorted(taken)).encode()).hexdigest()
    key = cache_key(STAGE, [source.id], keys_digest[:16])
    cached = registry.find_cached("dataset", source.name, key, follow_takedowns=False)
    if cached is not None:
        return cached
    started = now_utc()
    # One takedown of a version at a time, whatever samples it takes (its work is held by version, not by the
    # samples): two at once both found no successor and published two, a fork whose newest kept the other's
    # samples. Checked again once held: one that finished meanwhile is found.
    line = line_key(source)
    work = registry.note_work(line, stage=STAGE, name=source.name, parents=[source], shared=True)
    if (cached := registry.find_cached("dataset", source.name, key, follow_takedowns=False)) is not None:
        registry.remove_work(line)
        return cached
    if (newest := registry.replaced_by(source)) is not None:  # two successors would fork the line
        registry.remove_work(line)
        raise ValueError(f"a takedown already replaced it ({newest.ref} is the newest of that line): take them out "
                         f"of {newest.ref} (`blip data takedown` without REF finds the versions that keep them)")
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)  # a stopped run's partial files: written again
    stage.mkdir(parents=True)
    out = str(stage) if registry.is_local else registry.shared_work_url(line)
    by_shard: dict[str, set[str]] = {}
    for sample_key, (shard, _) in taken.items():
        by_shard.setdefault(shard, set()).add(sample_key)
    files: list[dict[str, Any]] = []
    moved: dict[tuple[str, int], int] = {}  # (shard, old .jpg offset) -> new offset, in the shards rewritten
    rewritten_tables: list[str] = []  # parquet files whose rows of the samples were cut
    unchanged: list[str] = []  # files that name no URL, left as they are (e.g. a synthetic corpus's ground truth)
    stats_files = []  # JSON stats that may quote samples (a CapFilt version's sample of rejected texts)
    # A file at a time: on a remote registry each shard is copied inside the store (hours at 129M), and the index
    # and texts (written last) take minutes; a bar on a terminal, a log line a minute elsewhere.
    bar = StageProgress(f"takedown {source.ref}", len(source.files), "files", logger=log)
    # each file counted once the loop is done with it; the index and texts when they are written (after the loop)
    for entry in bar.each(source.files, lambda entry: int(entry.path not in (INDEX_FILE, TEXTS_FILE))):
        base = _described(entry)
        if entry.path in (INDEX_FILE, TEXTS_FILE):
            continue
        if _names_samples(entry):  # rewritten once the index says which dropped rows lose their texts too
            stats_files.append(entry)
            continue
        if entry.path.endswith(".parquet") and entry.role != "shard":
            written_table = _rewrite_table(registry, source, entry.path, found, stage / entry.path)
            if written_table is not None:
                files.append({**base, "sha256": written_table[0], "bytes": written_table[1]})
                rewritten_tables.append(entry.path)
                continue
            unchanged.append(entry.path)
        elif entry.path not in by_shard and entry.role not in ("shard", "stats"):
            unchanged.append(entry.path)
        if entry.path in by_shard:
            offsets = {taken[k][1] for k in by_shard[entry.path] if taken[k][1] is not None}
            stems = {k for k in by_shard[entry.path] if taken[k][1] is None}  # an index without offsets
            written, dropped, new_offsets = _rewrite_shard(registry, source, entry.path, offsets, stems, out)
            if dropped != len(by_shard[entry.path]):
                raise ValueError(f"{source.ref}/{entry.path}: {len(by_shard[entry.path])} samples to take out, "
                                 f"{dropped} found in the shard")  # fmt: skip
            moved.update({(entry.path, old): new for old, new in new_offsets.items()})
            samples = None if entry.num_samples is None else entry.num_samples - dropped
            files.append({**base, "num_samples": samples, "sha256": written.sha256, "bytes": written.bytes})
        else:
            _same_file(registry, source, entry.path, out)
            files.append({**base, "sha256": entry.sha256, "bytes": entry.bytes})
    emptied: set[str] = set()  # dropped samples of the same image (a repeated url): their texts go too
    summary = _write_index(registry, source, found, moved, stage / INDEX_FILE, emptied)
    files.append({"path": INDEX_FILE, "role": "index"})
    bar.update(1)
    without_texts = set(taken) | emptied  # the samples whose texts go: taken out, or dropped repeats of those
    if has_layer(source, TEXTS_FILE):
        _write_texts(registry, source, without_texts, stage / TEXTS_FILE)
        files.append({"path": TEXTS_FILE, "role": "index"})
        bar.update(1)
    stats_rewritten = []
    for entry in stats_files:
        base = _described(entry)
        with registry.open(source, entry.path) as handle:
            stats = json.load(handle)
        if (kept := without_samples(stats, without_texts)) != stats:
            (stage / entry.path).parent.mkdir(parents=True, exist_ok=True)
            (stage / entry.path).write_text(json.dumps(kept, indent=2, sort_keys=True))
            files.append({**base, **_digest(stage / entry.path)})
            stats_rewritten.append(entry.path)
        else:
            _same_file(registry, source, entry.path, out)
            files.append({**base, "sha256": entry.sha256, "bytes": entry.bytes})
    bar.close()
    manifest = registry.publish(
        kind="dataset", name=source.name, staging_dir=stage, parents=[source], digests_from_writer=True,
        remote_staging=None if registry.is_local else out, files=files,
        producer=Producer(stage=STAGE, config={"samples": len(taken), "keys_sha256": keys_digest}, cache_key=key,
                          started_at=started),
        counts={"input": summary["counts"]["total"], "kept": summary["counts"]["ok"],
                "dropped": summary["counts"]["dropped"], "taken_down": len(taken)},
        drop_reasons=summary["drop_reasons"], splits=summary["splits"],
        stats={**without_samples(source.stats, without_texts),
               STAGE: {"of": source.ref, "samples": len(taken), "shards_rewritten": len(by_shard),
                       "dropped_rows_emptied": len(emptied), "tables_rewritten": rewritten_tables,
                       "stats_rewritten": stats_rewritten, "unchanged": unchanged}},
        sample_schema=source.sample_schema, metadata=source.metadata,
    )  # fmt: skip
    registry.remove_work(line)
    return manifest


def line_key(source: Manifest) -> str:
    """The work key of every takedown of `source`: one at a time."""
    return cache_key(STAGE, [source.id], "takedown-of-version")


def without_samples(stats: Any, keys: set[str]) -> Any:
    """`stats` (JSON) without the list entries that quote one of the samples `keys` (an entry with a `key`): a
    CapFilt version's sample of rejected texts quotes each text and its sample."""
    if isinstance(stats, dict):
        return {name: without_samples(value, keys) for name, value in stats.items()}
    if isinstance(stats, list):
        return [without_samples(item, keys) for item in stats
                if not (isinstance(item, dict) and item.get("key") in keys)]
    return stats


def _described(entry: Any) -> dict[str, Any]:
    """A file entry of the new version as the source's says it, before its digest is known."""
    return {"path": entry.path, "role": entry.role, "split": entry.split, "num_samples": entry.num_samples}


def _names_samples(entry: Any) -> bool:
    """A JSON stats file that may quote samples; img2dataset's per-shard `_stats.json` only count (thousands of
    them at 129M: not read)."""
    return entry.role == "stats" and entry.path.endswith(".json") and not entry.path.endswith("_stats.json")


def _digest(path: Path) -> dict[str, Any]:
    from datasets_manifests.filesystems import sha256_file

    digest, size = sha256_file(path)
    return {"sha256": digest, "bytes": size}


def _taken_samples(registry: Registry, source: Manifest, urls: set[str], keys: set[str],
                   sha256s: set[str]) -> TakenSamples:  # fmt: skip
    """The kept samples whose url, key or image sha256 is given: the index matched a batch at a time by Arrow
    (a few seconds a million rows), then, when one was asked for by key or hash, its url looked for among the
    other kept samples (a second pass over the url column)."""
    wanted = {column: pa.array(sorted(values), pa.string())
              for column, values in (("key", keys), ("url", urls), ("image_sha256", sha256s))}  # fmt: skip
    where, texts = {}, set()
    columns = ["key", "url", "raw_caption", "image_sha256", "status", "shard", "jpg_offset"]
    for batch in scan_index(registry, source, columns):
        hit = _matches(batch, wanted)
        for row in batch.filter(pc.and_(pc.equal(batch.column("status"), "ok"), hit)).to_pylist():
            if row["shard"] is None:
                raise ValueError(f"{source.ref}: kept sample {row['key']!r} names no shard")
            where[row["key"]] = (row["shard"], row["jpg_offset"])
            texts.add((row["url"], row["raw_caption"]))
    taken_urls = {url for url, _ in texts if url is not None}
    shared: set[str] = set()
    if taken_urls - urls:  # samples asked for by key or hash: do kept others have their urls?
        taken_keys = pa.array(sorted(where), pa.string())
        url_set = pa.array(sorted(taken_urls), pa.string())
        for batch in scan_index(registry, source, ["key", "url", "status"]):
            other = pc.and_(pc.and_(pc.equal(batch.column("status"), "ok"),
                                    pc.invert(pc.is_in(batch.column("key"), value_set=taken_keys))),
                            pc.is_in(batch.column("url"), value_set=url_set))  # fmt: skip
            shared.update(batch.column("url").filter(other).to_pylist())
    return TakenSamples(where, texts, taken_urls, shared)


def _matches(batch: pa.RecordBatch, wanted: dict[str, pa.Array]) -> pa.Array:
    """Rows whose column value is one of those wanted (any column), null as no."""
    hit = pa.array([False] * batch.num_rows)
    for column, values in wanted.items():
        if len(values):
            hit = pc.or_(hit, pc.fill_null(pc.is_in(batch.column(column), value_set=values), False))
    return hit


def _rewrite_shard(registry: Registry, source: Manifest, path: str, offsets: set[int], stems: set[str],
                   out: str) -> tuple[Any, int, dict[int, int]]:  # fmt: skip
    """`path` without the samples whose `.jpg` data starts at one of `offsets` (the index's; a raw version's tar
    keys are not its sample keys) or whose tar key is in `stems` (an index without offsets); returns what was
    written, how many samples were cut and each kept `.jpg`'s new offset by its old one."""
    from datasets_manifests.filesystems import url_to_fs
    from pipelines.tasks.webdata import group_tar, write_tar

    cut = 0
    old_offset_of: dict[str, int] = {}  # new member name of each kept .jpg -> its old data offset

    def members() -> Iterator[tuple[str, bytes]]:
        nonlocal cut
        with registry.open(source, path) as handle:
            for sample in group_tar(handle):
                if sample.offsets.get("jpg") in offsets or sample.key in stems:
                    cut += 1
                    continue
                for extension, data in sample.members.items():
                    if extension == "jpg":
                        old_offset_of[f"{sample.key}.jpg"] = sample.offsets["jpg"]
                    yield f"{sample.key}.{extension}", data

    fs, root = url_to_fs(out)
    written = write_tar(f"{root}/{path}", members(), fs)
    return written, cut, {old: written.data_offsets[name][0] for name, old in old_offset_of.items()}


def _rewrite_table(registry: Registry, source: Manifest, path: str, found: TakenSamples,
                   target: Path) -> tuple[str, int] | None:  # fmt: skip
    """`path` (a parquet file beside the shards) without the rows of the samples taken out, written to `target` a
    batch at a time (a 129M-row source list is ~20 GB in memory): the rows of their urls (of their url and text,
    where another kept sample has the same url). Returns its sha256 and size, or None when the file has no `url`
    column (it names no sample this way and stays as it is)."""
    import pyarrow.parquet as pq

    from datasets_manifests.filesystems import sha256_file
    from datasets_manifests.index import open_parquet

    urls = pa.array(sorted(found.urls), pa.string())
    shared = pa.array(sorted(found.urls_still_kept), pa.string())
    with registry.open(source, path) as handle:
        table_file = open_parquet(handle)
        schema = table_file.schema_arrow
        if "url" not in schema.names:
            return None
        has_text = "caption" in schema.names
        target.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(str(target), schema) as writer:
            for batch in table_file.iter_batches(batch_size=1 << 16):
                url = batch.column("url")
                taken = pc.fill_null(pc.is_in(url, value_set=urls), False).to_numpy(zero_copy_only=False)
                in_shared = pc.fill_null(pc.is_in(url, value_set=shared), False).to_numpy(zero_copy_only=False)
                if in_shared.any():
                    # A url a kept sample also has: only the row of the taken text goes (none in a file without).
                    rows = batch.to_pylist()
                    for index in in_shared.nonzero()[0]:
                        taken[index] = has_text and (rows[index]["url"], rows[index]["caption"]) in found.texts
                writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(~taken)))
    return sha256_file(target)


def _same_file(registry: Registry, source: Manifest, path: str, out: str) -> None:
    """A file the takedown leaves as it is, put in the new version's staging: a hard link locally (no copy), a
    copy inside the store on a remote registry."""
    if registry.is_local:
        target = Path(out) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        place_file(registry.local_path(source, path), target, link=True)
        return
    registry.fs.copy(registry.path_of(source, path), f"{registry.fs._strip_protocol(out)}/{path}")


def _write_index(registry: Registry, source: Manifest, found: TakenSamples, moved: dict[tuple[str, int], int],
                 target: Path, emptied: set[str]) -> dict[str, Any]:  # fmt: skip
    """The index with the samples taken out dropped (reason `takedown`, no shard, no texts) and the kept `.jpg`
    offsets of the rewritten shards moved; the same rows in the same order, every column kept (a CapFilt index's
    too). A row dropped before whose url (and text, for a url kept samples share) is one of theirs keeps its reason
    and loses its texts; its key is added to `emptied`. Column by column with Arrow, a batch at a time."""
    from datasets_manifests.index import write_index_batches

    taken_keys = pa.array(sorted(found.where), pa.string())
    only_theirs = pa.array(sorted(found.urls - found.urls_still_kept), pa.string())
    shared = pa.array(sorted(found.urls_still_kept), pa.string())
    shared_texts = pa.array(sorted(f"{url}\n{text}" for url, text in found.texts if url in found.urls_still_kept
                                   and text is not None), pa.string())  # fmt: skip
    offsets_by_shard: dict[str, tuple[Any, Any]] = {}  # shard -> (old .jpg offsets sorted, their new offsets)
    for (shard, old), new in sorted(moved.items()):
        olds, news = offsets_by_shard.setdefault(shard, ([], []))
        olds.append(old)
        news.append(new)

    def tables() -> Iterator[pa.Table]:
        for batch in scan_index(registry, source):
            table = pa.Table.from_batches([batch])
            taken = pc.fill_null(pc.is_in(table["key"], value_set=taken_keys), False)
            url = table["url"]
            same_image = pc.fill_null(pc.is_in(url, value_set=only_theirs), False)
            if len(shared_texts):  # a url kept samples share: only the rows of the taken text (joined once, here)
                text = table["raw_caption"] if "raw_caption" in table.column_names else \
                    pa.nulls(len(table), pa.string())  # fmt: skip
                same_text = pc.is_in(pc.binary_join_element_wise(url, text, "\n"), value_set=shared_texts)
                same_image = pc.or_(same_image, pc.and_(pc.fill_null(pc.is_in(url, value_set=shared), False),
                                                        pc.fill_null(same_text, False)))  # fmt: skip
            dropped_before = pc.and_(pc.not_equal(table["status"], "ok"), pc.invert(taken))
            emptied_here = pc.and_(dropped_before, same_image)
            emptied.update(table["key"].filter(emptied_here).to_pylist())
            no_texts = pc.or_(taken, emptied_here)
            table = _set(table, "status", pc.if_else(taken, "dropped", table["status"]))
            table = _set(table, "drop_reason", pc.if_else(taken, REASON, table["drop_reason"]))
            for column in ("shard", "jpg_offset", "jpg_bytes"):
                table = _set(table, column, pc.if_else(taken, pa.scalar(None, table.schema.field(column).type),
                                                       table[column]))  # fmt: skip
            for column in TEXT_COLUMNS:
                if column in table.column_names:
                    table = _set(table, column, pc.if_else(no_texts, pa.scalar(None, pa.string()), table[column]))
            yield _moved_offsets(table, offsets_by_shard)

    return write_index_batches(tables(), target, _schema(registry, source, INDEX_FILE), in_key_order=False)


def _moved_offsets(table: pa.Table, offsets_by_shard: dict[str, tuple[Any, Any]]) -> pa.Table:
    """The kept samples' `.jpg` offsets in the rewritten shards moved to where the new shards hold them."""
    import numpy as np

    offsets = table["jpg_offset"].combine_chunks()
    kept = pc.equal(table["status"], "ok")  # after the taken samples were marked dropped
    for shard, (olds, news) in offsets_by_shard.items():
        here = pc.and_(pc.and_(pc.fill_null(pc.equal(table["shard"], shard), False), kept),
                       pc.is_valid(offsets)).combine_chunks()  # fmt: skip
        if not pc.any(here).as_py():
            continue
        old = offsets.filter(here).to_numpy()
        place = np.searchsorted(olds, old)
        if (place >= len(olds)).any() or (np.asarray(olds)[np.minimum(place, len(olds) - 1)] != old).any():
            raise ValueError(f"{shard}: a kept sample's .jpg offset is not among the rewritten shard's")
        offsets = pc.replace_with_mask(offsets, here, pa.array(np.asarray(news)[place], pa.int64()))
    return _set(table, "jpg_offset", offsets)


def _set(table: pa.Table, column: str, values: Any) -> pa.Table:
    return table.set_column(table.schema.get_field_index(column), table.schema.field(column), values)


def _write_texts(registry: Registry, source: Manifest, taken: set[str], target: Path) -> None:
    """A CapFilt version's texts, those of the samples `taken` emptied and not kept (reason `takedown` for a text
    that was kept); column by column with Arrow, a batch at a time."""
    from datasets_manifests.index import write_texts_batches

    schema = _schema(registry, source, TEXTS_FILE)
    keys = pa.array(sorted(taken), pa.string())

    def tables() -> Iterator[pa.Table]:
        for batch in iter_registry_parquet(registry, registry.path_of(source, TEXTS_FILE), schema.names):
            table = pa.Table.from_batches([batch])
            hit = pc.fill_null(pc.is_in(table["key"], value_set=keys), False)
            table = _set(table, "drop_reason", pc.if_else(pc.and_(hit, pc.fill_null(table["kept"], False)), REASON,
                                                          table["drop_reason"]))  # fmt: skip
            table = _set(table, "text", pc.if_else(hit, pa.scalar(None, pa.string()), table["text"]))
            yield _set(table, "kept", pc.if_else(hit, False, table["kept"])).cast(schema)

    write_texts_batches(tables(), target, schema)


def _schema(registry: Registry, source: Manifest, relpath: str) -> pa.Schema:
    import pyarrow.parquet as pq

    with registry.open(source, relpath) as handle:
        return pq.read_schema(handle)
