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

import json
import os
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, has_layer, iter_registry_parquet
from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import Registry, RegistryError

FORMATS = ("blip-json", "jsonl")
SOURCES = ("all", "web", "synthetic")


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
    items = _kept_texts(registry, manifest, on_rows) if has_layer(manifest, TEXTS_FILE) else \
        _kept_captions(registry, manifest, on_rows)  # fmt: skip
    counts: Counter[str] = Counter()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w", encoding="utf-8") as handle:
            first = True
            handle.write("[\n" if fmt == "blip-json" else "")
            for item in items:
                if source != "all" and item["source"] != source:
                    continue
                shard = item.pop("shard")
                if images is not None:
                    if shard is None:  # a dropped sample's text: no image to name
                        counts["no_image"] += 1
                        continue
                    item["image"] = str(image_path(images, shard, item["key"]))
                counts[item["source"]] += 1
                if fmt == "blip-json":
                    where = {"image": item["image"]} if images is not None else {"url": item["url"]}
                    handle.write(("" if first else ",\n") + json.dumps({**where, "caption": item["caption"]},
                                                                       ensure_ascii=False))  # fmt: skip
                else:
                    handle.write(json.dumps(item, ensure_ascii=False) + "\n")
                first = False
            handle.write("\n]\n" if fmt == "blip-json" else "")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return dict(counts)


def _kept_captions(registry: Registry, manifest: Manifest,
                   on_rows: Callable[[int], object] | None) -> Iterator[dict[str, Any]]:  # fmt: skip
    path = registry.path_of(manifest, INDEX_FILE)
    columns = ["key", "url", "caption", "caption_source", "status", "shard"]
    for batch in iter_registry_parquet(registry, path, columns):
        for row in batch.to_pylist():
            if row["status"] == "ok" and row["caption"]:
                yield {"key": row["key"], "url": row["url"], "caption": row["caption"],
                       "source": row["caption_source"] or "web", "itm_score": None, "shard": row["shard"]}  # fmt: skip
        if on_rows is not None:
            on_rows(batch.num_rows)


def _kept_texts(registry: Registry, manifest: Manifest,
                on_rows: Callable[[int], object] | None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """texts.parquet's kept rows with their sample's URL: the two files are in the same key order (CapFilt writes
    the texts in the index's order), so one pass over each joins them."""
    urls = _index_urls(registry, manifest, on_rows)
    key, url, shard = None, None, None
    texts = iter_registry_parquet(registry, registry.path_of(manifest, TEXTS_FILE),
                                  ["key", "text", "source", "itm_score", "kept"])  # fmt: skip
    for batch in texts:
        for row in batch.to_pylist():
            while key != row["key"]:
                try:
                    key, url, shard = next(urls)
                except StopIteration:
                    raise RegistryError(f"{manifest.ref}: {TEXTS_FILE} has texts of key {row['key']!r}, which "
                                        f"{INDEX_FILE} does not list at that place (the two are not in the same "
                                        "order): not a CapFilt version's texts") from None  # fmt: skip
            if row["kept"]:
                score = row["itm_score"]
                yield {"key": key, "url": url, "caption": row["text"], "source": row["source"],
                       "itm_score": None if score is None else round(float(score), 6), "shard": shard}  # fmt: skip


def _index_urls(registry: Registry, manifest: Manifest,
                on_rows: Callable[[int], object] | None) -> Iterator[tuple[str, str | None, str | None]]:  # fmt: skip
    for batch in iter_registry_parquet(registry, registry.path_of(manifest, INDEX_FILE), ["key", "url", "shard"]):
        yield from zip(*(batch.column(name).to_pylist() for name in ("key", "url", "shard")))
        if on_rows is not None:
            on_rows(batch.num_rows)


# ------------------------------------------------------------------------------------------------ images
IMAGE_EXTENSION = ".jpg"  # every shard stores its images as <key>.jpg (the shard stage re-encodes the others)
COMPLETE = ".complete"  # in a shard's folder once every image of it is written


def image_path(folder: Path, shard: str, key: str) -> Path:
    """Where `export_images` writes the image of sample `key` of `shard` (a path inside the version)."""
    return folder.resolve() / _stem(shard) / f"{key}{IMAGE_EXTENSION}"


def export_images(registry: Registry, manifest: Manifest, folder: Path, workers: int | None = None,
                  on_shard: Callable[[int], object] | None = None) -> dict[str, int]:  # fmt: skip
    """Every image of the version's shards as a file, `folder/<shard>/<key>.jpg` (`image_path`), each shard read
    once front to back, several at a time (`workers`; default 2 a core locally, 16 on a store). Resumable: a shard
    whose folder holds its `.complete` mark is skipped, a shard stopped midway is written again, and each image
    file is whole or absent. Returns {"shards": written now, "shards_already": skipped, "images": written now};
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
        (target / COMPLETE).write_text(f"{written}\n")
        return written

    images = 0
    with ThreadPoolExecutor(max_workers=min(workers, max(len(todo), 1))) as pool:
        for written in pool.map(extract, todo):
            images += written
            if on_shard is not None:
                on_shard(1)
    return {"shards": len(todo), "shards_already": len(done), "images": images}


def _stem(shard_path: str) -> str:
    return Path(shard_path).name.removesuffix(".tar")
