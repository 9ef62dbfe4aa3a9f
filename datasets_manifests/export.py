"""A dataset version's texts in the form Salesforce released BLIP's bootstrapped data: a JSON list of
`{"url": ..., "caption": ...}` (`ccs_filtered.json` holds the kept web texts, `ccs_synthetic_filtered.json` the
kept synthetic captions; spec §3), so a bootstrapped version can be compared with those files or fed to BLIP's
own code; or JSON lines with each text's key, source and ITM score.

A CapFilt version exports its kept texts (texts.parquet, in the index's order, joined with the index's URLs as
both are read); any other version its kept samples' captions (index.parquet). Both files are read a batch at a
time, and the output is written to a temporary name and renamed when complete: a 129M-sample export holds about
one batch in memory and never leaves half a file under its name.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, has_layer, iter_registry_parquet
from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import Registry, RegistryError

FORMATS = ("blip-json", "jsonl")
SOURCES = ("all", "web", "synthetic")


def export_texts(registry: Registry, manifest: Manifest, out: str | Path, fmt: str = "blip-json",
                 source: str = "all", on_rows: Callable[[int], object] | None = None) -> dict[str, int]:  # fmt: skip
    """Write the kept texts of `manifest` (those of `source`: web, synthetic or all) to `out` in `fmt`;
    returns how many were written per source. `on_rows(n)` after each batch of index rows (progress)."""
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
                counts[item["source"]] += 1
                if fmt == "blip-json":
                    handle.write(("" if first else ",\n") + json.dumps({"url": item["url"], "caption": item["caption"]},
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
    columns = ["key", "url", "caption", "caption_source", "status"]
    for batch in iter_registry_parquet(registry, path, columns):
        for row in batch.to_pylist():
            if row["status"] == "ok" and row["caption"]:
                yield {"key": row["key"], "url": row["url"], "caption": row["caption"],
                       "source": row["caption_source"] or "web", "itm_score": None}  # fmt: skip
        if on_rows is not None:
            on_rows(batch.num_rows)


def _kept_texts(registry: Registry, manifest: Manifest,
                on_rows: Callable[[int], object] | None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """texts.parquet's kept rows with their sample's URL: the two files are in the same key order (CapFilt writes
    the texts in the index's order), so one pass over each joins them."""
    urls = _index_urls(registry, manifest, on_rows)
    key, url = None, None
    texts = iter_registry_parquet(registry, registry.path_of(manifest, TEXTS_FILE),
                                  ["key", "text", "source", "itm_score", "kept"])  # fmt: skip
    for batch in texts:
        for row in batch.to_pylist():
            while key != row["key"]:
                try:
                    key, url = next(urls)
                except StopIteration:
                    raise RegistryError(f"{manifest.ref}: {TEXTS_FILE} has texts of key {row['key']!r}, which "
                                        f"{INDEX_FILE} does not list at that place (the two are not in the same "
                                        "order): not a CapFilt version's texts") from None  # fmt: skip
            if row["kept"]:
                score = row["itm_score"]
                yield {"key": key, "url": url, "caption": row["text"], "source": row["source"],
                       "itm_score": None if score is None else round(float(score), 6)}  # fmt: skip


def _index_urls(registry: Registry, manifest: Manifest,
                on_rows: Callable[[int], object] | None) -> Iterator[tuple[str, str | None]]:  # fmt: skip
    for batch in iter_registry_parquet(registry, registry.path_of(manifest, INDEX_FILE), ["key", "url"]):
        yield from zip(batch.column("key").to_pylist(), batch.column("url").to_pylist())
        if on_rows is not None:
            on_rows(batch.num_rows)
