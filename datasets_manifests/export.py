"""A dataset version's texts in the form Salesforce released BLIP's bootstrapped data: a JSON list of
`{"url": ..., "caption": ...}` (`ccs_filtered.json` holds the kept web texts, `ccs_synthetic_filtered.json` the
kept synthetic captions; spec §3), so a bootstrapped version can be compared with those files or fed to BLIP's
own code; or JSON lines with each text's key, source and ITM score.

A CapFilt version exports its kept texts (texts.parquet, in the index's order, joined with the index's URLs as
both are read); any other version its kept samples' captions (index.parquet). Both files are read a batch at a
time, and the output is written to a temporary name and renamed when complete: a 129M-sample export holds about
one batch in memory and never leaves half a file under its name.

With an image folder (`export_images`), the version's images are written out of its shards as files and the
entries name them instead of the URL: `{"image": path, "caption": ...}`, the annotation format of BLIP's own
pretraining code (`pretrain_dataset`), so salesforce/BLIP's `pretrain.py` trains on a bootstrapped version as it is.
"""

from __future__ import annotations

import functools
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring  # what json.dumps(ensure_ascii=False) escapes a string with (C)
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, has_layer, iter_registry_parquet
from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import Registry, RegistryError

FORMATS = ("blip-json", "jsonl")
SOURCES = ("all", "web", "synthetic")
OUT_COLUMNS = ("key", "url", "caption", "source", "itm_score", "shard")  # each batch of kept texts, to be written


def export_texts(registry: Registry, manifest: Manifest, out: str | Path, fmt: str = "blip-json",
                 source: str = "all", on_rows: Callable[[int], object] | None = None,
                 images: Path | None = None) -> dict[str, int]:  # fmt: skip
    """Write the kept texts of `manifest` (those of `source`: web, synthetic or all) to `out` in `fmt`;
    returns how many were written per source. `on_rows(n)` after each batch of index rows (progress). With
    `images` (the folder `export_images` wrote), each entry names its image file there instead of its URL; a text
    whose sample has no image in the version (a dropped one) is left out and counted as `no_image`."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: choose one of {', '.join(SOURCES)}")
    if not has_layer(manifest, INDEX_FILE):
        raise RegistryError(f"{manifest.ref} has no {INDEX_FILE}: only dataset versions with a per-sample index "
                            "are exported")  # fmt: skip
    tables = _kept_texts(registry, manifest, on_rows) if has_layer(manifest, TEXTS_FILE) else \
        _kept_captions(registry, manifest, on_rows)  # fmt: skip
    counts: Counter[str] = Counter()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    image_root = None if images is None else str(images.resolve())
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            first = True
            handle.write("[\n" if fmt == "blip-json" else "")
            for table in tables:
                if source != "all":
                    table = table.filter(pc.equal(table["source"], source))
                if image_root is not None:  # a dropped sample's text: no image to name
                    has_image = pc.is_valid(table["shard"])
                    if without := len(table) - (pc.sum(has_image).as_py() or 0):
                        counts["no_image"] += without
                    table = table.filter(has_image)
                if not len(table):
                    continue
                for count in pc.value_counts(table["source"]).to_pylist():
                    counts[count["values"]] += count["counts"]
                lines = _json_lines(table, fmt, image_root)
                if fmt == "blip-json":
                    handle.write(("" if first else ",\n") + ",\n".join(lines))
                else:
                    handle.write("\n".join(lines) + "\n")
                first = False
            handle.write("\n]\n" if fmt == "blip-json" else "")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return dict(counts)


def _json_lines(table: pa.Table, fmt: str, image_root: str | None) -> list[str]:
    """One JSON object a row of `table` (OUT_COLUMNS), as `json.dumps(..., ensure_ascii=False)` writes it, built a
    batch at a time: each string escaped by the json module's C encoder, no dict or encoder object per row."""
    column = {name: table[name].to_pylist() for name in OUT_COLUMNS}
    if image_root is not None:
        column["image"] = [image_path(image_root, shard, key) for shard, key in zip(column["shard"], column["key"])]
    text = {name: [_json_string(value) for value in values] for name, values in column.items()
            if name not in ("shard", "itm_score")}  # fmt: skip
    if fmt == "blip-json":
        where = "image" if image_root is not None else "url"
        return [f'{{"{where}": {place}, "caption": {caption}}}' for place, caption in zip(text[where], text["caption"])]
    scores = ["null" if score is None else repr(round(float(score), 6)) for score in column["itm_score"]]
    lines = [f'{{"key": {key}, "url": {url}, "caption": {caption}, "source": {source}, "itm_score": {score}'
             for key, url, caption, source, score in zip(text["key"], text["url"], text["caption"], text["source"],
                                                         scores)]  # fmt: skip
    if image_root is not None:
        return [f'{line}, "image": {image}}}' for line, image in zip(lines, text["image"])]
    return [f"{line}}}" for line in lines]


def _json_string(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def _kept_captions(registry: Registry, manifest: Manifest,
                   on_rows: Callable[[int], object] | None) -> Iterator[pa.Table]:  # fmt: skip
    """The index's kept samples with a caption, a batch at a time (OUT_COLUMNS; no ITM score)."""
    path = registry.path_of(manifest, INDEX_FILE)
    columns = ["key", "url", "caption", "caption_source", "status", "shard"]
    for batch in iter_registry_parquet(registry, path, columns):
        rows = pa.Table.from_batches([batch])
        rows = rows.filter(pc.and_(pc.equal(rows["status"], "ok"), pc.greater(pc.utf8_length(rows["caption"]), 0)))
        yield pa.table({"key": rows["key"], "url": rows["url"], "caption": rows["caption"],
                        "source": pc.fill_null(rows["caption_source"], "web"),
                        "itm_score": pa.nulls(len(rows), pa.float32()), "shard": rows["shard"]})  # fmt: skip
        if on_rows is not None:
            on_rows(batch.num_rows)


def _kept_texts(registry: Registry, manifest: Manifest,
                on_rows: Callable[[int], object] | None) -> Iterator[pa.Table]:  # fmt: skip
    """texts.parquet's kept rows with their sample's URL and shard (OUT_COLUMNS), a batch at a time: the two files
    are in the same key order (CapFilt writes the texts in the index's order), so each batch of texts finds its
    samples among the index rows not yet passed (a window of about a batch) and one pass over each joins them."""
    index = iter_registry_parquet(registry, registry.path_of(manifest, INDEX_FILE), ["key", "url", "shard"])
    window = pa.table({"key": pa.array([], pa.string()), "url": pa.array([], pa.string()),
                       "shard": pa.array([], pa.string())})  # fmt: skip
    texts = iter_registry_parquet(registry, registry.path_of(manifest, TEXTS_FILE),
                                  ["key", "text", "source", "itm_score", "kept"])  # fmt: skip
    for batch in texts:
        if not batch.num_rows:
            continue
        keys = batch.column("key")
        while not pc.is_in(keys[-1:], value_set=window["key"].combine_chunks())[0].as_py():
            more = next(index, None)
            if more is None:
                raise _out_of_order(manifest, keys, pc.index_in(keys, value_set=window["key"].combine_chunks()))
            window = pa.concat_tables([window, pa.Table.from_batches([more])]).combine_chunks()
            if on_rows is not None:
                on_rows(more.num_rows)
        positions = pc.index_in(keys, value_set=window["key"].combine_chunks())
        if positions.null_count or (np.diff(positions.to_numpy(zero_copy_only=False)) < 0).any():
            raise _out_of_order(manifest, keys, positions)
        # a text emptied by a takedown (`blip data rm` wrote the replaced version's texts again) is not exported
        kept = pc.and_(pc.fill_null(batch.column("kept"), False), pc.is_valid(batch.column("text")))
        samples = window.take(positions.filter(kept))
        yield pa.table({"key": samples["key"], "url": samples["url"], "caption": batch.column("text").filter(kept),
                        "source": batch.column("source").filter(kept),
                        "itm_score": batch.column("itm_score").filter(kept), "shard": samples["shard"]})  # fmt: skip
        window = window.slice(positions[-1].as_py())  # the last sample's texts may go on in the next batch


def _out_of_order(manifest: Manifest, keys: pa.Array, positions: pa.Array) -> RegistryError:
    """The error naming the first text whose sample is not where the index's order puts it (`positions`: each
    text's row among the index rows not yet passed; null where it is not among them)."""
    places = positions.to_pylist()
    wrong = next((i for i, place in enumerate(places) if place is None or (i and places[i - 1] is not None
                                                                          and place < places[i - 1])), 0)  # fmt: skip
    return RegistryError(f"{manifest.ref}: {TEXTS_FILE} has texts of key {keys[wrong].as_py()!r}, which {INDEX_FILE} "
                         "does not list at that place (the two are not in the same order): not a CapFilt version's "
                         "texts")


# ------------------------------------------------------------------------------------------------ images
IMAGE_EXTENSION = ".jpg"  # every shard stores its images as <key>.jpg (the shard stage re-encodes the others)
COMPLETE = ".complete"  # in a shard's folder once every image of it is written


def image_path(root: str, shard: str, key: str) -> str:
    """Where `export_images` writes the image of sample `key` of `shard` (a path inside the version) under its
    folder `root` (resolved: the annotation names absolute paths)."""
    return f"{root}/{_stem(shard)}/{key}{IMAGE_EXTENSION}"


def export_images(registry: Registry, manifest: Manifest, folder: Path, workers: int | None = None,
                  on_shard: Callable[[int], object] | None = None) -> dict[str, int]:  # fmt: skip
    """Every image of the version's shards as a file, `folder/<shard>/<key>.jpg` (`image_path`), each shard read
    once front to back, several at a time (`workers`; default 2 a core locally, 16 on a store). Resumable: a shard
    whose folder holds its `.complete` mark is skipped, a shard stopped midway is written again, and each image
    file is whole or absent; the mark is written once the shard's images are on disk (a power cut included). Returns {"shards": written now, "shards_already": skipped, "images": written now};
    a tar that breaks is a RegistryError naming it (`blip data verify` checks a version's shards)."""
    shards = manifest.shards()
    done = [entry for entry in shards if (folder / _stem(entry.path) / COMPLETE).is_file()]
    todo = [entry for entry in shards if entry not in done]
    workers = workers or (2 * (os.cpu_count() or 1) if registry.is_local else 16)

    def extract(entry: Any) -> int:
        from pipelines.tasks.tar_reader import iter_tar_members  # raises on a member cut short

        path = entry.path
        target = folder / _stem(path)
        target.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            with registry.open(manifest, path) as handle:
                for member in iter_tar_members(handle):
                    if not member.name.endswith(IMAGE_EXTENSION):
                        continue
                    data = member.read()
                    final = target / Path(member.name).name
                    partial = final.with_name(final.name + ".partial")
                    partial.write_bytes(data)
                    os.replace(partial, final)
                    written += 1
            if entry.num_samples is not None and written != entry.num_samples:  # cut between two members
                raise tarfile.ReadError(f"{written} images, the manifest lists {entry.num_samples} samples")
        except (tarfile.TarError, EOFError) as error:
            raise RegistryError(f"{manifest.ref}: shard {path} cannot be read to its end ({error}); "
                                f"`blip data verify {manifest.ref}` checks every file") from None  # fmt: skip
        # The images on disk before the mark that says so: after a power cut a shard without its mark is written
        # again, and one with it holds whole files (one sync a shard, not an fsync an image: ~10k a shard).
        os.sync()
        mark = target / f"{COMPLETE}.partial"
        mark.write_text(f"{written}\n")
        os.replace(mark, target / COMPLETE)
        return written

    images = 0
    with ThreadPoolExecutor(max_workers=min(workers, max(len(todo), 1))) as pool:
        for written in pool.map(extract, todo):
            images += written
            if on_shard is not None:
                on_shard(1)
    return {"shards": len(todo), "shards_already": len(done), "images": images}


@functools.cache  # a few thousand shards; called for every image entry of an export
def _stem(shard_path: str) -> str:
    return Path(shard_path).name.removesuffix(".tar")
