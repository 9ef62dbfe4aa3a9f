"""Shard stage: raw download shards -> training shards (a dataset version ready for pretraining and CapFilt).

What it does, in order, with a drop reason for every sample it drops (datatrove's `filter -> (keep, reason)`):
decode check (`corrupt_image`, `too_large` for decompression bombs; greyscale/CMYK/alpha converted to RGB),
with evaluation sets given, near copies of their val/test images (`eval_overlap`, by difference hash), BLIP
caption normalisation (`pre_caption`, salesforce/BLIP data/utils.py; raw text kept) with `empty_caption` and
`absurd_caption` (too long, or no letters), then exact dedup by URL (`duplicate_url`; samples without a URL are
not compared) and by the sha256 of the image bytes (`duplicate_image`), keeping the first sample in key order.
The train/val split is a hash of the key (stable when the corpus grows); the order inside a split is a seeded
shuffle. Shards are `shards/{split}-{i:06d}.tar`, gap-free, written atomically, and `index.parquet` points at
each `.jpg` member.

Two passes, each spread over worker processes: pass 1 checks every raw shard and appends its records (no image
bytes) to an Arrow file on disk; the driver decides the dedup and the output shards on arrays (the records
stay memory-mapped, ~70 bytes per sample in the driver's memory); pass 2 writes each output shard, reading the
kept bytes back by offset; the index is written a batch at a time. A truncated raw tar keeps the samples before
the truncation; the ones the raw index says were in it but could not be read are dropped as `truncated_shard`
(never a crash). A run that stops (crash, kill, a lost node) leaves its work under the registry's work dir for
its cache key: the next run of the same inputs and config checks only the raw shards not yet checked and writes
only the output shards not yet written. With a remote registry what a rerun needs is also kept in its store
(`KeptFiles`), so a rerun on another machine (a new pod, the driver's disk gone) goes on from it as well.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets_manifests.index import finite_or_none
from datasets_manifests.manifest import Manifest, Producer, cache_key
from datasets_manifests.registry import Registry, now_utc
from datasets_manifests.spill import (SpilledRows, ascending_order, digest16, read_spilled, repeated_values,
                                      spill_writer)
from pipelines.config import check_range, config_hash, to_dict

STAGE = "shard"
log = logging.getLogger(__name__)
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True, kw_only=True)
class SourceBounds:
    """The values one source-list column may have (`ShardConfig.source_bounds`); either bound may be left out."""

    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise ValueError("a bound needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}: no sample could pass")


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """How raw shards become training shards."""

    samples_per_shard: int = 1000
    seed: int = 0  # order of samples inside each split
    val_fraction: float = 0.01  # share of keys (by hash) that go to the val split
    max_words: int = 30  # BLIP pre_caption truncation (pretrain uses 30, configs/pretrain.yaml)
    max_caption_chars: int = 1000  # a raw caption longer than this is "absurd_caption"
    dedup_url: bool = True
    dedup_image: bool = True
    max_image_pixels: int = 20_000_000  # decoded pixels above this are dropped as too_large (decompression bombs)
    jpeg_quality: int = 95  # re-encode quality for images that were not RGB JPEGs
    # With evaluation sets to keep out (`run_shard(eval_sets=...)`, `blip shard --decontaminate`): a web image whose
    # 256-bit difference hash is within this many bits of an evaluation image's is dropped as `eval_overlap` (a
    # resized or re-encoded copy differs by a few bits; unrelated images by ~100).
    eval_overlap_max_distance: int = 10
    # Bounds on the source list's columns the raw version carries (the download's `save_additional_columns`), as
    # DataComp's and LAION's CLIP-score filtering: {similarity: {min: 0.28}, punsafe: {max: 0.1}}. A sample out of
    # them is dropped as `<column>_below_min` / `<column>_above_max`, one without a value as `<column>_missing`,
    # before its image is decoded (a filter that keeps 30 % decodes 30 % of the images).
    source_bounds: dict[str, SourceBounds] = field(default_factory=dict)
    ADDED_LATER = ("source_bounds",)  # out of the hash while empty: versions sharded before it stay reused

    def __post_init__(self) -> None:
        check_range("ShardConfig", "samples_per_shard", self.samples_per_shard, 1, 10_000_000)
        check_range("ShardConfig", "val_fraction", self.val_fraction, 0.0, 0.5)
        check_range("ShardConfig", "max_words", self.max_words, 1, 512)
        check_range("ShardConfig", "max_caption_chars", self.max_caption_chars, 1)
        check_range("ShardConfig", "max_image_pixels", self.max_image_pixels, 1)
        check_range("ShardConfig", "jpeg_quality", self.jpeg_quality, 1, 100)
        check_range("ShardConfig", "eval_overlap_max_distance", self.eval_overlap_max_distance, 0, 128)


def split_of(key: str, val_fraction: float) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def source_bound_problem(record: dict[str, Any], bounds: dict[str, SourceBounds]) -> str | None:
    """Why a sample's source-list values are out of `bounds` (`ShardConfig.source_bounds`), or None."""
    for column, bound in bounds.items():
        value = record.get(column)
        if value is None or value != value:  # null, or NaN
            return f"{column}_missing"
        if not isinstance(value, (int, float)):
            continue  # not a number: building the records table names the column and its type
        if bound.min is not None and value < bound.min:
            return f"{column}_below_min"
        if bound.max is not None and value > bound.max:
            return f"{column}_above_max"
    return None


def check_source_bounds(bounds: dict[str, SourceBounds], carried: list[pa.Field], ref: str) -> None:
    """Each bounded column is a numeric source column `ref` carries, or a ValueError names it."""
    from datasets_manifests.index import is_numeric

    types = {field.name: field.type for field in carried}
    for column in bounds:
        if column not in types:
            have = ", ".join(types) or "none: its download had no save_additional_columns"
            raise ValueError(f"source_bounds.{column}: {ref} carries no source column {column!r} (it carries {have})")
        if not is_numeric(types[column]):
            raise ValueError(f"source_bounds.{column}: {ref}'s column {column!r} is {types[column]}, not a number")


def caption_problem(raw: str, caption: str, cfg: ShardConfig) -> str | None:
    """Why a caption is unusable, or None."""
    if not caption.strip():
        return "empty_caption"
    if len(raw) > cfg.max_caption_chars or not _LETTER.search(caption):
        return "absurd_caption"
    return None


def check_image(data: bytes, cfg: ShardConfig,
                eval_hashes: np.ndarray | None = None) -> tuple[str | None, int, int, bool]:  # fmt: skip
    """(problem or None, width, height, needs re-encoding to an RGB JPEG). With `eval_hashes` (`eval_image_hashes`)
    a decoded image that is a near copy of an evaluation image is the problem `eval_overlap`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > cfg.max_image_pixels:
                return "too_large", width, height, False
            image.load()
            reencode = not (image.format == "JPEG" and image.mode == "RGB")
            # A near copy of an evaluation image: training on it would inflate the scores.
            if eval_hashes is not None and \
                    nearest_distance(image_dhash(image), eval_hashes) <= cfg.eval_overlap_max_distance:  # fmt: skip
                return "eval_overlap", width, height, reencode
            return None, width, height, reencode
    except Image.DecompressionBombError:
        return "too_large", 0, 0, False
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        return "corrupt_image", 0, 0, False


HASH_WORDS = 4  # an image's difference hash: 4 x 64 bits (the red, green, blue and grey gradients)


def image_dhash(image: Any) -> np.ndarray:
    """The difference hash of an image, 256 bits as 4 uint64: at 9 x 8 pixels, whether each pixel is brighter than
    its right neighbour, in each of the red, green and blue channels and in their sum. Resizing, re-encoding and
    small brightness changes move a few bits; other images differ in about half. The colour channels matter: on
    grey alone, drawings of different shapes and colours on plain backgrounds (the demo corpus) came within 4 bits
    of each other for 29 % of its web images; with them, 1.8 %. Used to keep evaluation images out of training
    data (`eval_overlap`)."""
    from PIL import Image

    # reducing_gap: a box reduction first, then bilinear: half the time of bilinear from full size, the same bits
    # but for near-equal neighbours.
    rgb = np.asarray(image.convert("RGB").resize((9, 8), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.int16)
    planes = [rgb[:, :, channel] for channel in range(3)] + [rgb.sum(axis=2)]
    bits = np.concatenate([(plane[:, 1:] > plane[:, :-1]).ravel() for plane in planes])
    return np.packbits(bits).view(">u8").astype(np.uint64)


def nearest_distance(value: np.ndarray, hashes: np.ndarray) -> int:
    """The fewest bits the hash `value` (`image_dhash`) differs in from any of `hashes` (HASH_WORDS x n uint64,
    a row a word: each row's xor and bit count run over contiguous memory; 257 when there is none)."""
    if not hashes.shape[1]:
        return 64 * HASH_WORDS + 1
    distance = np.bitwise_count(np.bitwise_xor(hashes[0], value[0])).astype(np.uint16)
    for word in range(1, HASH_WORDS):
        distance += np.bitwise_count(np.bitwise_xor(hashes[word], value[word]))
    return int(distance.min())  # ~50 us for 10k hashes


def eval_image_hashes(registry: Registry, eval_sets: list[Manifest]) -> np.ndarray:
    """The difference hashes of the evaluation images (files of role `image`: the val/test images a downstream
    version keeps as files) of `eval_sets` (HASH_WORDS x n uint64: `nearest_distance`); an image that cannot be
    decoded is an error naming it."""
    from PIL import Image

    from pipelines.progress import StageProgress

    entries = [(manifest, entry.path) for manifest in eval_sets for entry in manifest.files if entry.role == "image"]
    hashes = np.zeros((HASH_WORDS, len(entries)), dtype=np.uint64)
    with StageProgress("hashing evaluation images", len(entries), "img", logger=log,
                       enabled=len(entries) >= 1000) as progress:  # fmt: skip
        for number, (manifest, path) in enumerate(entries):
            try:
                with registry.open(manifest, path) as handle, Image.open(io.BytesIO(handle.read())) as image:
                    hashes[:, number] = image_dhash(image)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise ValueError(f"evaluation image {manifest.ref}/{path} cannot be decoded: {error}") from error
            progress.update()
    return hashes


# ---------------------------------------------------------------------------------------------- stage


class EmptyInputError(ValueError):
    """The raw version gives no sample to shard."""


def run_shard(cfg: ShardConfig, dataset_ref: str | Manifest, *, name: str, registry: Registry,
              eval_sets: list[str | Manifest] | tuple[str | Manifest, ...] = ()) -> Manifest:
    """Turn a raw (download) version into training shards; publishes a new version of `name` (no-op if done).

    `eval_sets`: downstream versions whose evaluation images (their val/test images) must not be trained on: a
    web image that is a near copy of one (`image_dhash` within `cfg.eval_overlap_max_distance` bits) is dropped
    as `eval_overlap`; they are parents of the version (its lineage names what it was kept apart from)."""
    parent = registry.resolve(dataset_ref, "dataset")
    evals = [registry.resolve(ref, "dataset") for ref in eval_sets]
    no_images = [manifest.ref for manifest in evals if not any(entry.role == "image" for entry in manifest.files)]
    if no_images:
        raise ValueError(f"{', '.join(no_images)}: no evaluation images (files of role 'image') to keep out of "
                         "the training data; decontaminate against a downstream version with val/test images")
    from datasets_manifests.index import source_columns

    carried = source_columns(registry, parent)  # the source list's columns (`save_additional_columns`)
    check_source_bounds(cfg.source_bounds, carried, parent.ref)
    if parent.shards() and all(entry.num_samples == 0 for entry in parent.shards()):
        failures = ", ".join(f"{reason}: {count}" for reason, count in sorted(parent.drop_reasons.items())) or "none"
        raise EmptyInputError(f"{parent.ref} holds no image: its download got none (failures: {failures}); check "
                              f"the network and the source URLs, then `blip download --retry-failed {parent.ref} "
                              "--name NAME` tries them again")  # fmt: skip
    key = _stage_key(cfg, parent, evals, carried)
    cached = registry.find_cached("dataset", name, key)
    if cached is not None:
        registry.remove_work(key)  # what a run stopped between its publish and its clean-up left
        return cached
    started = now_utc()
    work = registry.note_work(key, stage=STAGE, name=name, parents=[parent, *evals], shared=True)
    stage = work / "stage"
    # The output shards (terabytes at 129M) go where the registry keeps them: its own disk for a local registry,
    # its store's work prefix for a remote one (the publish then copies them inside the store), never this
    # machine's temporary disk. The index is written in `stage` either way. A run of the same key that stopped
    # (crash, kill) left its work here: this one goes on from it (raw shards already checked, output shards
    # already written), which at 129M is hours of each pass.
    out = str(stage) if registry.is_local else registry.shared_work_url(key)
    stage.mkdir(parents=True, exist_ok=True)
    eval_hashes = eval_image_hashes(registry, evals) if evals else None
    input_counts, scanned_before = _scan(cfg, registry, parent, work, _kept_files(registry, key, work, SCAN_PARTS),
                                         eval_hashes, carried)  # fmt: skip
    records = read_spilled([work / RECORDS_FILE], record_schema(carried))
    with _phase("deciding duplicates", len(records)):  # minutes at 129M records, with no per-item progress
        decision = _decide(records, cfg)
    if not decision.kept.any():  # an empty training set is never what was asked for
        reasons = pc.value_counts(pc.fill_null(records.column("drop_reason"), "duplicate")).to_pylist()
        del records
        registry.remove_work(key)
        found = ", ".join(f"{i['values']}: {i['counts']}" for i in sorted(reasons, key=lambda i: i["values"])) or "none"
        raise EmptyInputError(f"{parent.ref}: no sample is left to shard (dropped: {found})")
    shard_entries, written, written_before = _write_shards(cfg, registry, parent, records, decision, out,
                                                           _kept_files(registry, key, work, WRITTEN_PARTS))
    resumed = {"raw_shards_checked_before": scanned_before, "output_shards_written_before": written_before}
    manifest = _publish(cfg, registry, parent, name, key, started, stage, out, records, decision, written,
                        shard_entries, input_counts, resumed, evals, carried)  # fmt: skip
    del records  # the memory map, before its file goes
    registry.remove_work(key)  # the records (~45 GB at 129M), and staged shards whose copies are the version's now
    return manifest


@contextlib.contextmanager
def _phase(what: str, records: int) -> Iterator[None]:
    """A long array computation said at its start and its end, with how long it took (a log line each: a bar of one
    step was a line with a carriage return in a worker's log)."""
    from pipelines.progress import format_duration

    if records < 1_000_000:
        yield
        return
    started = time.monotonic()
    log.info("shard: %s (%s records) ...", what, f"{records:,}")
    yield
    log.info("shard: %s (%s records) done in %s", what, f"{records:,}", format_duration(time.monotonic() - started))


# Pass 1's records, one row per raw sample, kept on disk (`datasets_manifests.spill`) so that the driver holds
# ~70 bytes per sample (sort order, decisions, offsets; `bench_shard_driver.py`), not the captions: 129M
# samples as Python dicts took ~300 GB. Rows are taken back through `spill.SpilledRows`: Arrow's own `take`
# copies every record's strings into memory at each call.
RECORDS_FILE = "records.arrow"
RECORD_SCHEMA = pa.schema([
    ("key", pa.string()), ("url", pa.string()), ("raw_caption", pa.string()), ("caption", pa.string()),
    ("split", pa.string()), ("source_shard", pa.string()), ("status", pa.string()), ("drop_reason", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("image_sha256", pa.string()), ("source_offset", pa.int64()),
    ("source_bytes", pa.int64()), ("reencode", pa.bool_()),
    # 128-bit digests the dedup groups by (null: no URL, or no image).
    ("url_hash", pa.binary(16)), ("image_hash", pa.binary(16)),
])  # fmt: skip


def record_schema(carried: list[pa.Field]) -> pa.Schema:
    """RECORD_SCHEMA and the source list's columns the raw version carries, after it."""
    return pa.schema([*RECORD_SCHEMA, *carried])


# Pass 1 decodes every image (~30-60 MB/s per core): a process of its own pays off from about this much input.
SCAN_BYTES_PER_PROCESS = 64 << 20


SCAN_PARTS, SCAN_SUMMARY = "scan", "scan.json"  # pass 1's records of each raw shard; its counts once complete
RESUME_PREFIX = "resume"  # under a remote registry's shared work prefix: the kept files' copies


class KeptFiles:
    """The files a rerun goes on from (pass 1's records of each raw shard, pass 2's record of each output shard):
    in a folder of the work dir and, for a remote registry, copied to its store under the run's shared work prefix
    (`mirror`), so that a rerun on another machine goes on from them too: at 129M each pass is hours, and a driver
    on a pod loses its temporary disk with the pod. Each copy is one upload (whole or absent), made in a
    background thread (`UPLOADS_IN_FLIGHT` at most: the driver's loop does not wait a store round trip per shard),
    inside `uploading()`, which waits for them at its end, also when the pass stops on an error (what was done
    stays kept). An upload a crash cut off costs only that shard's work again. The store's prefix goes with the
    rest of the run's work once its version is published."""

    UPLOADS_IN_FLIGHT = 16

    def __init__(self, folder: Path, mirror: str | None) -> None:
        self.folder, self.mirror = folder, mirror  # the folder is made by the first file kept or fetched
        self._uploader: ThreadPoolExecutor | None = None
        self._uploads: deque[Future] = deque()

    def path(self, name: str) -> Path:
        return self.folder / name

    @contextlib.contextmanager
    def keep(self, name: str) -> Iterator[Any]:
        """A binary handle whose bytes become the kept file `name` (here, then in the store), whole or not at all."""
        from pipelines.tasks.webdata import atomic_output

        with atomic_output(self.path(name)) as handle:
            yield handle
        if self.mirror is not None:
            from datasets_manifests.filesystems import url_to_fs

            fs, root = url_to_fs(self.mirror)
            if self._uploader is None:
                self._uploader = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kept-upload")
            while len(self._uploads) >= self.UPLOADS_IN_FLIGHT:
                self._uploads.popleft().result()
            self._uploads.append(self._uploader.submit(fs.put_file, str(self.path(name)), f"{root}/{name}"))

    @contextlib.contextmanager
    def uploading(self) -> Iterator[None]:
        """A pass's loop of `keep`s: its uploads are all done when it ends (the first failure raised); a pass that
        raises still waits for them, and its own error is the one raised."""
        try:
            yield
        except BaseException:
            self._wait_uploads(raise_failure=False)
            raise
        self._wait_uploads(raise_failure=True)

    def _wait_uploads(self, raise_failure: bool) -> None:
        failure: BaseException | None = None
        while self._uploads:
            try:
                self._uploads.popleft().result()
            except Exception as error:  # noqa: BLE001 - the store's own error type, raised below
                failure = failure or error
        if self._uploader is not None:
            self._uploader.shutdown(wait=True)
            self._uploader = None
        if failure is not None:
            if raise_failure:
                raise failure
            log.warning("shard: a kept file's upload to %s failed too: %s", self.mirror, failure)

    def restore(self) -> int:
        """Fetch the kept files of the store this machine lacks (one listing, then the downloads together);
        returns how many. A fetch stopped midway leaves nothing under a kept file's name."""
        if self.mirror is None:
            return 0
        from datasets_manifests.filesystems import url_to_fs

        fs, root = url_to_fs(self.mirror)
        root = root.rstrip("/")
        if not fs.exists(root):
            return 0
        missing = [path for path in fs.find(root) if not self.path(path.rsplit("/", 1)[-1]).exists()]
        if not missing:
            return 0
        landing = self.folder / ".fetching"
        shutil.rmtree(landing, ignore_errors=True)
        landing.mkdir(parents=True)
        names = [path.rsplit("/", 1)[-1] for path in missing]
        fs.get(missing, [str(landing / name) for name in names])  # concurrent on s3/gcs
        for name in names:
            os.replace(landing / name, self.path(name))
        landing.rmdir()
        log.info("shard: %d files of a stopped run fetched from %s", len(names), self.mirror)
        return len(names)


def _kept_files(registry: Registry, key: str, work: Path, folder: str) -> KeptFiles:
    mirror = None if registry.is_local else f"{registry.shared_work_url(key)}/{RESUME_PREFIX}/{folder}"
    return KeptFiles(work / folder, mirror)


def _scan(cfg: ShardConfig, registry: Registry, parent: Manifest, work: Path, parts: KeptFiles,
          eval_hashes: np.ndarray | None = None, carried: list[pa.Field] | None = None
          ) -> tuple[dict[str, int], int]:  # fmt: skip
    """Pass 1: one record per raw sample (no image bytes kept), with its first drop reason if any, into
    `work/records.arrow` in raw shard order. Returns the input counts and how many raw shards a stopped run of
    this key had already checked.

    The raw shards are independent: they are checked in worker processes (`pipelines.runtime.process_count`),
    records coming back in shard order. Each shard's records are kept in `parts` (`work/scan/`, and the store
    of a remote registry) as they come, so a rerun checks only the shards still missing; once all are there they
    are joined into the one file the rest of the stage reads (in large batches: `SpilledRows` takes rows chunk by
    chunk), the same bytes as one process's."""
    from datasets_manifests.index import INDEX_FILE
    from pipelines.progress import StageProgress
    from pipelines.runtime import map_in_processes, process_count
    from pipelines.tasks.webdata import atomic_output

    records_path, summary_path = work / RECORDS_FILE, work / SCAN_SUMMARY
    entries = parent.shards()
    carried = carried or []
    schema = record_schema(carried)
    if records_path.exists() and summary_path.exists():  # a stopped run got past pass 1
        log.info("shard: going on from a stopped run: its %d raw shards are checked", len(entries))
        return json.loads(summary_path.read_text()), len(entries)
    parts.restore()
    part_paths = [parts.path(f"{number:06d}.arrow") for number in range(len(entries))]
    todo = [number for number, path in enumerate(part_paths) if _read_part(path, schema) is None]
    if len(todo) < len(entries):
        log.info("shard: going on from a stopped run: %d of %d raw shards already checked", len(entries) - len(todo),
                 len(entries))  # fmt: skip
    index_url = registry.url_of(parent, INDEX_FILE) if any(e.path == INDEX_FILE for e in parent.files) else None
    jobs = [(cfg, registry.url_of(parent, entries[n].path), entries[n].path, index_url, eval_hashes, carried)
            for n in todo]  # fmt: skip
    workers = process_count(sum(entries[n].bytes for n in todo), SCAN_BYTES_PER_PROCESS, len(jobs))
    with StageProgress("checking raw shards", len(entries), "shards", initial=len(entries) - len(todo), logger=log,
                       enabled=len(entries) >= 4) as progress:  # fmt: skip
        with parts.uploading():
            for number, (table, was_truncated) in zip(todo, map_in_processes(scan_raw_shard, jobs, workers)):
                _write_part(parts, part_paths[number].name, table, was_truncated)
                progress.update()
    truncated = 0
    joining = records_path.with_name(records_path.name + ".partial")
    with spill_writer(joining, schema) as writer:
        for path in part_paths:
            table, was_truncated = _read_part(path, schema)  # type: ignore[misc]  # every part is there now
            writer.write_table(table)
            truncated += was_truncated
    os.replace(joining, records_path)
    counts = {"raw_shards": len(entries), "truncated_shards": truncated}
    with atomic_output(summary_path) as handle:
        handle.write(json.dumps(counts).encode())
    shutil.rmtree(parts.folder, ignore_errors=True)  # their copies in a remote registry's store stay until the version is published
    return counts, len(entries) - len(todo)


def _write_part(parts: KeptFiles, name: str, table: pa.Table, truncated: bool) -> None:
    """One raw shard's records, whole or not at all."""
    table = table.replace_schema_metadata({"truncated": "1" if truncated else "0"})
    with parts.keep(name) as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _read_part(path: Path, schema: pa.Schema) -> tuple[pa.Table, bool] | None:
    """A raw shard's records and whether it was truncated; None when missing, or not of `schema` (a run of
    another version of the stage left it: checked again)."""
    if not path.exists():
        return None
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()  # the map stays open while the table lives
    if not table.schema.remove_metadata().equals(schema):
        return None
    return table.replace_schema_metadata(None), (table.schema.metadata or {}).get(b"truncated") == b"1"


def scan_raw_shard(cfg: ShardConfig, url: str, path: str, index_url: str | None,
                   eval_hashes: np.ndarray | None = None, carried: list[pa.Field] | None = None
                   ) -> tuple[pa.Table, bool]:  # fmt: skip
    """Pass 1 over one raw shard (`url`, published as `path`): its records (`record_schema(carried)`), and whether
    it was truncated (then the samples the raw index at `index_url` lists in it that could not be read are dropped
    as `truncated_shard`). With `eval_hashes` (`eval_image_hashes`), near copies of evaluation images are dropped.
    The `carried` source columns are read from each sample's json (img2dataset writes its row's columns there)."""
    import fsspec

    from blip_models.processing import pre_caption
    from pipelines.tasks.webdata import iter_tar

    carried = carried or []
    names = [field.name for field in carried]
    records: list[dict[str, Any]] = []
    errors: Counter = Counter()
    with fsspec.open(url, "rb") as handle:
        for sample in iter_tar(handle, errors, path):
            records.append(_record(cfg, sample, path, pre_caption, eval_hashes, names))
    if errors and index_url is not None:
        seen = {record["key"] for record in records}
        for row in _expected_rows(index_url, path, names):
            if row["key"] not in seen:
                records.append({**row, "status": "dropped", "drop_reason": "truncated_shard", "source_shard": path})
    for record in records:
        record["split"] = split_of(record["key"], cfg.val_fraction)
        record["url_hash"] = None if record["url"] is None else digest16(record["url"])
        sha = record.get("image_sha256")
        record["image_hash"] = None if sha is None else bytes.fromhex(sha[:32])
    try:
        return pa.Table.from_pylist(records, schema=record_schema(carried)), bool(errors)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:  # a json value that is not of its index column's type
        raise ValueError(f"{path}: a sample's source column does not have its index type "
                         f"({', '.join(f'{field.name}: {field.type}' for field in carried)}): {error}") from error


def _record(cfg: ShardConfig, sample: Any, shard_path: str, pre_caption: Any,
            eval_hashes: np.ndarray | None = None, carried: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    data = sample.members.get("jpg")
    try:
        meta = json.loads(sample.members.get("json", b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    key = meta.get("source_key") or sample.key
    raw = sample.members.get("txt", b"").decode("utf-8", errors="replace")
    caption = pre_caption(raw, cfg.max_words)
    record = {"key": key, "url": meta.get("url"), "raw_caption": raw, "caption": caption, "source_shard": shard_path,
              "status": "ok", "drop_reason": None, "width": None, "height": None, "image_sha256": None,
              "source_offset": sample.offsets.get("jpg"), "source_bytes": len(data or b""), "reencode": False,
              **{name: meta.get(name) for name in carried}}
    if data is None:
        record.update(status="dropped", drop_reason="missing_image")
        return record
    out_of_bounds = source_bound_problem(record, cfg.source_bounds)
    if out_of_bounds:  # without decoding the image
        record.update(status="dropped", drop_reason=out_of_bounds, image_sha256=hashlib.sha256(data).hexdigest())
        return record
    problem, width, height, reencode = check_image(data, cfg, eval_hashes)
    record.update(width=width or None, height=height or None, reencode=reencode,
                  image_sha256=hashlib.sha256(data).hexdigest())
    problem = problem or caption_problem(raw, caption, cfg)
    if problem:
        record.update(status="dropped", drop_reason=problem)
    return record


def _expected_rows(index_url: str, shard_path: str, carried: list[str] | None = None) -> list[dict[str, Any]]:
    """The raw index's ok rows of one shard: what a truncated shard should have held."""
    import fsspec
    import pyarrow.parquet as pq

    columns = ["key", "url", "raw_caption", "caption", *(carried or [])]
    with fsspec.open(index_url, "rb") as handle:
        # Without pre-buffering, whose cache would hold the scanned columns of the whole index (apache/arrow#39808).
        table = pq.read_table(handle, columns=columns, filters=[("shard", "=", shard_path), ("status", "=", "ok")],
                              pre_buffer=False)
    return table.to_pylist()


# ----------------------------------------------------------------------------------------- decisions

# Why the driver drops an ok record of pass 1 (codes of `Decision.dropped_as`; 0: not dropped here).
DUPLICATE_REASONS = (None, "duplicate_key", "duplicate_url", "duplicate_image")


@dataclass
class Decision:
    """What pass 1's records become, as arrays over record rows (the order of the records file)."""

    order: np.ndarray  # record rows in key order (ties: source shard, then file order)
    dropped_as: np.ndarray  # int8 code into DUPLICATE_REASONS
    kept: np.ndarray  # bool: status ok after the dedup


def _decide(records: pa.Table, cfg: ShardConfig) -> Decision:
    """Exact dedup in key order: a repeated key is dropped; the first sample with a URL / image hash stays, later
    ones are dropped (URL checked first) - the result of visiting the samples one by one, computed on arrays.

    Only the samples that share a URL or image digest with another one can be dropped by the dedup, so the
    visiting is computed on those alone (`first_come_dedup`); the rest are kept without it."""
    order = _key_order(records)
    ok = pc.equal(records.column("status"), "ok").to_numpy(zero_copy_only=False)
    dropped_as = np.zeros(len(records), dtype=np.int8)
    visit = order[ok[order]]  # ok records in key order
    repeated = _repeats_previous(records.column("key"), visit)
    dropped_as[visit[repeated]] = DUPLICATE_REASONS.index("duplicate_key")
    visit = visit[~repeated]
    del repeated
    shared = [_shared_digests(records.column(column), visit) if enabled else (np.zeros(0, np.int64),) * 2
              for column, enabled in (("url_hash", cfg.dedup_url), ("image_hash", cfg.dedup_image))]  # fmt: skip
    items = np.unique(np.concatenate([positions for positions, _ in shared]))  # visit positions, in visit order
    groups = []
    for positions, ids in shared:  # a group id per item; an item that shares nothing here is a group of its own
        group = np.arange(len(items), dtype=np.int64) + (int(ids.max()) + 1 if len(ids) else 0)
        group[np.searchsorted(items, positions)] = ids
        groups.append(group)
    reasons = first_come_dedup(groups)
    for group_index, reason in enumerate(("duplicate_url", "duplicate_image")):
        dropped_as[visit[items[reasons == group_index]]] = DUPLICATE_REASONS.index(reason)
    return Decision(order=order, dropped_as=dropped_as, kept=ok & (dropped_as == 0))


# The dedup reads the records' keys and digests this many rows at a time (their copies stay this small).
DECIDE_BLOCK_ROWS = 1 << 20


def _key_order(records: pa.Table) -> np.ndarray:
    """Record rows in key order (ties: source shard, then file order).

    Pass 1 appends the records raw shard after raw shard, and img2dataset numbers its samples in shard order, so
    a download's records are usually in key order already (`spill.ascending_order` then answers the row numbers
    without sorting the strings)."""
    return ascending_order(records, ["key", "source_shard"], DECIDE_BLOCK_ROWS)


def _repeats_previous(keys: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """Per position of `rows`: does its key equal the key of the row before it? (`rows` in key order.)"""
    repeated = np.zeros(len(rows), dtype=bool)
    spilled = SpilledRows(pa.table({"key": keys}))
    for first in range(1, len(rows), DECIDE_BLOCK_ROWS):  # each block taken with the row before it
        block = spilled.take(rows[first - 1 : first + DECIDE_BLOCK_ROWS]).column(0)
        repeated[first : first + len(block) - 1] = pc.equal(block[1:], block[:-1]).to_numpy(zero_copy_only=False)
    return repeated


def _shared_digests(digests: pa.ChunkedArray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of the 16-byte digests at `rows` (null: no URL / image, shared with nobody): the positions whose digest
    another position also has, and a group id for each (equal digest, equal id).

    The first 8 bytes of each digest, sorted, name the few candidates (a repeated prefix); the candidates' whole
    digests decide. ~17 bytes a row at the peak, where `np.unique` over every whole digest took ~80."""
    spilled = SpilledRows(pa.table({"digest": digests}))
    prefixes = np.zeros(len(rows), dtype=np.uint64)
    present = np.zeros(len(rows), dtype=bool)
    for first in range(0, len(rows), DECIDE_BLOCK_ROWS):
        block = spilled.take(rows[first : first + DECIDE_BLOCK_ROWS]).column(0).combine_chunks()
        prefixes[first : first + len(block)] = _digest_words(block)[:, 0]
        present[first : first + len(block)] = block.is_valid().to_numpy(zero_copy_only=False)
    repeated_prefixes = repeated_values(prefixes[present])
    candidate = np.zeros(len(rows), dtype=bool)
    if len(repeated_prefixes):
        for first in range(0, len(rows), DECIDE_BLOCK_ROWS):
            candidate[first : first + DECIDE_BLOCK_ROWS] = np.isin(prefixes[first : first + DECIDE_BLOCK_ROWS],
                                                                   repeated_prefixes)  # fmt: skip
    candidates = np.flatnonzero(candidate & present)
    whole = _digest_words(spilled.take(rows[candidates]).column(0).combine_chunks())
    _, ids, counts = np.unique(whole.view("V16").reshape(-1), return_inverse=True, return_counts=True)
    ids = ids.reshape(-1)
    shared = counts[ids] > 1
    return candidates[shared], ids[shared].astype(np.int64)


def _digest_words(array: pa.Array) -> np.ndarray:
    """The 16-byte values of a fixed_size_binary(16) array as (n, 2) uint64 words (a view; nulls hold junk)."""
    data = array.buffers()[1]
    if data is None:  # every value null
        return np.zeros((len(array), 2), dtype=np.uint64)
    return np.frombuffer(data, dtype=np.uint64, count=2 * len(array), offset=array.offset * 16).reshape(-1, 2)


def first_come_dedup(groups: list[np.ndarray]) -> np.ndarray:
    """Visit items 0..n-1 in order: an item is dropped when an earlier *kept* item shares one of its groups (the
    reason is the first such group in `groups`' order), else kept. Returns -1 (kept) or that group's index.

    The loop is done in rounds over arrays (n is a dataset's size): an item is decided once what it depends on
    is - dropped as soon as an earlier kept item shares a group, provided no group checked before it can still
    gain one; kept when every earlier item sharing a group is dropped. The first undecided item always decides,
    so the rounds end; items that share no group with anyone (most of them) are kept without a round."""
    count = len(groups[0]) if groups else 0
    reason = np.full(count, -1, dtype=np.int8)
    shared = np.zeros(count, dtype=bool)
    for group in groups:
        sizes = np.bincount(group)
        shared |= sizes[group] > 1
    items = np.flatnonzero(shared)  # only these can be dropped; their visiting order is kept
    if len(items) == 0:
        return reason
    layouts = [_GroupLayout(group[items]) for group in groups]
    state = np.zeros(len(items), dtype=np.int8)  # 0 undecided, 1 kept, 2 dropped
    local_reason = np.full(len(items), -1, dtype=np.int8)
    while True:
        undecided = state == 0
        if not undecided.any():
            break
        kept = state == 1
        blocked = np.zeros(len(items), dtype=bool)  # a group checked earlier can still gain a kept item
        waiting = np.zeros(len(items), dtype=bool)
        for index, layout in enumerate(layouts):
            earlier_kept = layout.any_earlier(kept)
            earlier_undecided = layout.any_earlier(undecided)
            drop = undecided & earlier_kept & ~blocked & (local_reason < 0)
            local_reason[drop] = index
            blocked |= earlier_undecided
            waiting |= earlier_undecided | earlier_kept
        state[undecided & (local_reason >= 0)] = 2
        state[undecided & (local_reason < 0) & ~waiting] = 1
    reason[items] = local_reason
    return reason


class _GroupLayout:
    """Items sorted by group (stably), to ask per item 'does an earlier item of my group have this flag?'."""

    def __init__(self, group: np.ndarray) -> None:
        self.by_group = np.argsort(group, kind="stable")
        sorted_groups = group[self.by_group]
        starts = np.concatenate([[True], sorted_groups[1:] != sorted_groups[:-1]])
        self.start_of = np.flatnonzero(starts)[np.cumsum(starts) - 1]  # per sorted item: its group's first slot

    def any_earlier(self, flag: np.ndarray) -> np.ndarray:
        values = flag[self.by_group].astype(np.int64)
        before = np.cumsum(values) - values  # flagged items before this slot, all groups
        result = np.empty(len(flag), dtype=bool)
        result[self.by_group] = (before - before[self.start_of]) > 0
        return result


# Pass 2 reads each kept image back and writes it: a process of its own pays off from about this much output.
WRITE_BYTES_PER_PROCESS = 256 << 20
# Images read together in pass 2: from remote raw shards, one ranged request each, the batch's requests at once.
READ_BATCH = 256
_PASS2_COLUMNS = ["key", "url", "raw_caption", "caption", "image_sha256", "width", "height", "source_shard",
                  "source_offset", "source_bytes", "reencode"]  # fmt: skip


@dataclass
class Written:
    """Where pass 2 put each kept record (arrays over record rows)."""

    shard_paths: list[str]
    shard_of: np.ndarray  # int32 index into shard_paths, -1 when not written
    jpg_offset: np.ndarray
    jpg_bytes: np.ndarray
    # Record rows whose JPEG was re-encoded (greyscale, CMYK, alpha: a few % of web images), sorted, and the
    # sha256 of each re-encoded JPEG: arrays, not a dict (millions at 129M samples).
    reencoded_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reencoded_sha256: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))

    def sha256_of(self, rows: np.ndarray, recorded: pa.Array) -> pa.Array:
        """The image sha256 of each record row: the re-encoded JPEG's where there is one, else `recorded`."""
        if not len(self.reencoded_rows):
            return recorded
        at = np.minimum(np.searchsorted(self.reencoded_rows, rows), len(self.reencoded_rows) - 1)
        hit = self.reencoded_rows[at] == rows
        if not hit.any():
            return recorded
        return pc.if_else(pa.array(hit), self.reencoded_sha256.take(pa.array(at)), recorded)


WRITTEN_PARTS = "written"  # what pass 2's writer returned for each output shard, for a rerun


def _write_shards(cfg: ShardConfig, registry: Registry, parent: Manifest, records: pa.Table, decision: Decision,
                  out: str, kept: KeptFiles) -> tuple[list[dict[str, Any]], Written, int]:  # fmt: skip
    """Pass 2: split, shuffle by seed, read kept bytes back by offset, write gap-free shards. Returns the shard
    entries, where each record went, and how many shards a stopped run of this key had already written.

    Each output shard (a fixed slice of its split's shuffled order) is written by `write_output_shard`, in
    worker processes when there is enough data (`pipelines.runtime.process_count`); the same bytes either way.
    What each returned (offsets, sizes, digests) is kept in `kept` (`work/written/`, and the store of a remote
    registry): a rerun takes a shard whose record and tar are both there (the tar the size its record says)
    instead of writing it again."""
    from pipelines.progress import StageProgress
    from pipelines.runtime import map_in_processes, process_count

    slices = plan_output_shards(cfg, records, decision)
    urls = {entry.path: registry.url_of(parent, entry.path) for entry in parent.shards()}
    kept.restore()
    staged = _staged_sizes(out)
    done = {number for number, (split, index, rows) in enumerate(slices)
            if _can_take(kept.path(_written_name(split, index)), rows, staged)}  # fmt: skip
    if done:
        log.info("shard: going on from a stopped run: %d of %d output shards already written", len(done), len(slices))

    carried = records.column_names[len(RECORD_SCHEMA):]  # the source columns: into each sample's json
    pass2_columns = SpilledRows(records.select([*_PASS2_COLUMNS, *carried]))

    def jobs() -> Iterator[tuple[Any, ...]]:  # built as submitted: each carries its records' columns
        for number, (split, index, rows) in enumerate(slices):
            if number in done:
                continue
            chunk = pass2_columns.take(rows)
            sources = {path: urls[path] for path in pc.unique(chunk.column("source_shard")).to_pylist()}
            yield cfg, out, split, index, chunk, sources

    to_write = decision.kept.copy()
    for number in done:
        to_write[slices[number][2]] = False
    bytes_to_write = int(pc.sum(records.column("source_bytes").filter(to_write)).as_py() or 0)
    workers = process_count(bytes_to_write, WRITE_BYTES_PER_PROCESS, len(slices) - len(done))
    written = Written([], np.full(len(records), -1, dtype=np.int32), np.zeros(len(records), dtype=np.int64),
                      np.zeros(len(records), dtype=np.int64))  # fmt: skip
    entries: list[dict[str, Any]] = []
    reencoded_rows: list[np.ndarray] = []  # per output shard (Arrow and numpy arrays, not Python objects)
    reencoded_sha256: list[pa.Array] = []
    results = map_in_processes(write_output_shard, jobs(), workers)
    with kept.uploading(), StageProgress("writing shards", len(slices), "shards", initial=len(done), logger=log,
                                         enabled=len(slices) >= 4) as progress:  # fmt: skip
        for number, (split, index, rows) in enumerate(slices):
            if number in done:
                entry, offsets, sizes, reencoded = _read_written(kept.path(_written_name(split, index)))
            else:
                entry, offsets, sizes, reencoded = next(results)
                _keep_written(kept, _written_name(split, index), rows, (entry, offsets, sizes, reencoded))
            written.shard_of[rows] = len(written.shard_paths)
            written.shard_paths.append(entry["path"])
            written.jpg_offset[rows] = offsets
            written.jpg_bytes[rows] = sizes
            reencoded_rows.append(rows[np.fromiter(reencoded, dtype=np.int64, count=len(reencoded))])
            reencoded_sha256.append(pa.array(list(reencoded.values()), pa.string()))
            entries.append(entry)
            progress.update(number not in done)  # the shards a stopped run wrote are in `initial`
    every_row = np.concatenate(reencoded_rows) if reencoded_rows else np.zeros(0, dtype=np.int64)
    by_row = np.argsort(every_row)
    written.reencoded_rows = every_row[by_row]
    written.reencoded_sha256 = pa.concat_arrays([pa.array([], pa.string()), *reencoded_sha256]).take(pa.array(by_row))
    return entries, written, len(done)


def _staged_sizes(out: str) -> dict[str, int]:
    """The output shards already under `out` (a folder or a store's prefix), by path ('shards/...'): their sizes.
    One listing, not a stat a shard (13k shards at 129M)."""
    from datasets_manifests.filesystems import url_to_fs

    fs, root = url_to_fs(out)
    folder = f"{root.rstrip('/')}/shards"
    if not fs.exists(folder):
        return {}
    listed = fs.find(folder, detail=True)
    return {f"shards/{path.rsplit('/', 1)[-1]}": int(info["size"]) for path, info in listed.items()
            if path.endswith(".tar")}  # fmt: skip


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def _keep_written(kept: KeptFiles, name: str, rows: np.ndarray, outcome: tuple[Any, ...]) -> None:
    """What `write_output_shard` returned for one output shard, with the digest of the record rows it wrote."""
    entry, offsets, sizes, reencoded = outcome
    with kept.keep(name) as handle:
        np.savez(handle, rows_digest=np.array(_rows_digest(rows)), entry=np.array(json.dumps(entry)),
                 offsets=np.asarray(offsets, dtype=np.int64), sizes=np.asarray(sizes, dtype=np.int64),
                 reencoded_at=np.fromiter(reencoded, dtype=np.int64, count=len(reencoded)),
                 reencoded_sha256=np.array(list(reencoded.values()), dtype="U64"))  # fmt: skip


def _written_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.npz"


def _can_take(path: Path, rows: np.ndarray, staged: dict[str, int]) -> bool:
    """Whether a stopped run's record at `path` stands for this output shard: there, of these rows (not another
    plan's), and its tar there at the size it says. Reads only the record's small members (npz loads lazily)."""
    if not path.exists():
        return False
    with np.load(path, allow_pickle=False) as kept:
        entry = json.loads(str(kept["entry"]))
        return str(kept["rows_digest"]) == _rows_digest(rows) and staged.get(entry["path"]) == entry["bytes"]


def _read_written(path: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, dict[int, str]]:
    """What the writer returned for an output shard `_can_take` accepted: entry, offsets, sizes, re-encoded."""
    with np.load(path, allow_pickle=False) as kept:
        reencoded = dict(zip(kept["reencoded_at"].tolist(), kept["reencoded_sha256"].tolist()))
        return json.loads(str(kept["entry"])), kept["offsets"], kept["sizes"], reencoded


def plan_output_shards(cfg: ShardConfig, records: pa.Table, decision: Decision) -> list[tuple[str, int, np.ndarray]]:
    """(split, shard number, record rows in order) of every output shard: the kept records of each split, in key
    order shuffled by the seed, cut into `samples_per_shard` slices."""
    in_key_order = decision.order[decision.kept[decision.order]]
    names, codes = _split_codes(records.column("split"))
    codes = codes[in_key_order]
    slices = []
    for code, split in enumerate(names):
        rows = array.array("q", in_key_order[codes == code].tobytes())
        random.Random(f"{cfg.seed}:{split}").shuffle(rows)  # the same permutation as shuffling the records
        order = np.frombuffer(rows, dtype=np.int64)
        for first in range(0, len(order), cfg.samples_per_shard):
            slices.append((split, first // cfg.samples_per_shard, order[first : first + cfg.samples_per_shard]))
    return slices


def _split_codes(splits: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """The split names (sorted) and each record's index into them (int8; -1: none), chunk by chunk: a `take` of
    the string column would first copy all of it into memory (`SpilledRows`)."""
    names = sorted({name for chunk in splits.chunks for name in pc.unique(chunk).to_pylist() if name is not None})
    value_set = pa.array(names, pa.string())
    codes = np.empty(len(splits), dtype=np.int8)
    first = 0
    for chunk in splits.chunks:
        found = pc.index_in(chunk, value_set=value_set).fill_null(-1)
        codes[first : first + len(chunk)] = found.to_numpy(zero_copy_only=False)
        first += len(chunk)
    return names, codes


def write_output_shard(cfg: ShardConfig, out: str, split: str, index: int, chunk: pa.Table, sources: dict[str, str]
                       ) -> tuple[dict[str, Any], list[int], list[int], dict[int, str]]:  # fmt: skip
    """Write `{out}/shards/{split}-{index:06d}.tar` (`out` a folder or URL) from `chunk` (records of one output
    shard, in order), reading each image from its raw shard (`sources`: path -> URL). Returns its file entry
    (path, samples, and the sha256 and bytes hashed as written), each record's `.jpg` offset and size in it,
    and the sha256 of each re-encoded image (by position in `chunk`)."""
    from datasets_manifests.filesystems import url_to_fs
    from pipelines.tasks.webdata import shard_name, write_tar

    handles: dict[str, Any] = {}
    keys, reencoded = [], {}
    carried = chunk.column_names[len(_PASS2_COLUMNS):]

    def members() -> Iterator[tuple[str, bytes]]:  # one batch of images in memory at a time
        records = chunk.to_pylist()
        for first in range(0, len(records), READ_BATCH):
            batch = records[first : first + READ_BATCH]
            for position, record, jpg in zip(range(first, first + len(batch)), batch,
                                             _read_images(sources, batch, handles)):  # fmt: skip
                if record["reencode"]:
                    jpg = _reencode(jpg, cfg)
                    reencoded[position] = record["image_sha256"] = hashlib.sha256(jpg).hexdigest()
                if "." in record["key"] or "/" in record["key"]:  # webdataset splits member names at the first dot
                    raise ValueError(f"sample key {record['key']!r} must not contain '.' or '/'")
                keys.append(record["key"])
                for extension, data in _members(record, jpg, carried).items():
                    yield f"{record['key']}.{extension}", data

    path = shard_name(split, index)
    fs, root = url_to_fs(out)
    try:
        tar = write_tar(f"{root}/{path}", members(), fs, tar_format=tarfile.USTAR_FORMAT)
    finally:
        for handle in handles.values():
            handle.close()
    offsets, sizes = zip(*(tar.data_offsets[f"{key}.jpg"] for key in keys)) if keys else ((), ())
    entry = {"path": path, "role": "shard", "split": split, "num_samples": len(keys), "sha256": tar.sha256,
             "bytes": tar.bytes}  # fmt: skip
    return entry, list(offsets), list(sizes), reencoded


def _read_images(sources: dict[str, str], records: list[dict[str, Any]], handles: dict[str, Any]) -> list[bytes]:
    """The stored image bytes of `records`, in order. From a local raw shard: seek and read on its open handle.
    From a remote one (s3://, gs://, http://): one ranged request an image, the batch's requests at once
    (`cat_ranges`). Through an opened remote file each ~50 KB image at a shuffled offset fetched a read-ahead block
    of megabytes around it (50x the image bytes over HTTP, measured; s3fs reads ahead 50 MiB)."""
    import fsspec

    from datasets_manifests.filesystems import url_to_fs
    from pipelines.tasks.shard_cache import is_local

    images: list[bytes] = [b""] * len(records)
    remote: dict[int, tuple[Any, list[tuple[int, str]]]] = {}  # filesystem -> its (position, path) reads
    for position, record in enumerate(records):
        url = sources[record["source_shard"]]
        if is_local(url):
            if url not in handles:
                handles[url] = fsspec.open(url, "rb").open()
            handles[url].seek(record["source_offset"])
            images[position] = handles[url].read(record["source_bytes"])
        else:
            fs, path = url_to_fs(url)  # fsspec caches the filesystem instance: one per store
            remote.setdefault(id(fs), (fs, []))[1].append((position, path))
    for fs, reads in remote.values():
        starts = [records[position]["source_offset"] for position, _ in reads]
        ends = [start + records[position]["source_bytes"] for start, (position, _) in zip(starts, reads)]
        for (position, _), data in zip(reads, fs.cat_ranges([path for _, path in reads], starts, ends,
                                                            on_error="return")):  # fmt: skip
            if isinstance(data, BaseException):
                record = records[position]
                raise OSError(f"{record['source_shard']}: the image of {record['key']!r} could not be read at byte "
                              f"{record['source_offset']}: {data}") from data
            images[position] = data
    for record, data in zip(records, images):
        if len(data) != record["source_bytes"]:  # the raw shard changed since pass 1 read it
            raise ValueError(f"{record['source_shard']}: the image of {record['key']!r} is cut short "
                             f"({len(data)} of {record['source_bytes']} bytes at byte {record['source_offset']})")
    return images


def _reencode(data: bytes, cfg: ShardConfig) -> bytes:
    """A stored image re-encoded as an RGB JPEG (greyscale, CMYK, alpha, non-JPEG formats)."""
    from pipelines.tasks.webdata import decode_rgb

    buffer = io.BytesIO()
    decode_rgb(data).save(buffer, format="JPEG", quality=cfg.jpeg_quality)
    return buffer.getvalue()


def _members(record: dict[str, Any], jpg: bytes, carried: list[str] | tuple[str, ...] = ()) -> dict[str, bytes]:
    meta = {"key": record["key"], "url": record["url"], "raw_caption": record["raw_caption"],
            "caption": record["caption"], "image_sha256": record["image_sha256"], "width": record["width"],
            "height": record["height"], "source_key": record["key"], "caption_source": "web",
            **{name: finite_or_none(record[name]) for name in carried}}  # JSON has no NaN: a score without value
    return {"jpg": jpg, "txt": record["caption"].encode(), "json": json.dumps(meta, sort_keys=True).encode()}


# ----------------------------------------------------------------------------------------- publish

def _index_batches(records: pa.Table, decision: Decision, written: Written) -> Iterator[pa.Table]:
    """The new index in key order, a batch at a time: one row per key (a repeated key is counted, not given a
    second row); split, shard and offsets only on kept rows; the source columns the records carry after."""
    from datasets_manifests.index import INDEX_BATCH_ROWS, INDEX_SCHEMA

    rows = decision.order[decision.dropped_as[decision.order] != DUPLICATE_REASONS.index("duplicate_key")]
    reasons = pa.array(DUPLICATE_REASONS, pa.string())
    shard_paths = pa.array(written.shard_paths, pa.string())
    carried = records.column_names[len(RECORD_SCHEMA):]
    columns = ["key", "url", "image_sha256", "width", "height", "caption", "raw_caption", "split", "status",
               "drop_reason", *carried]  # fmt: skip
    index_columns = SpilledRows(records.select(columns))
    for first in range(0, len(rows), INDEX_BATCH_ROWS):
        batch = rows[first : first + INDEX_BATCH_ROWS]
        table = index_columns.take(batch)
        column = {name: table.column(name).combine_chunks() for name in columns}
        kept = pa.array(decision.kept[batch])

        def on_kept(values: pa.Array) -> pa.Array:
            return pc.if_else(kept, values, pa.scalar(None, values.type))

        sha = written.sha256_of(batch, column["image_sha256"])
        shard = shard_paths.take(pa.array(np.maximum(written.shard_of[batch], 0))) if len(shard_paths) else \
            pa.nulls(len(batch), pa.string())  # fmt: skip
        values = {
            **column, "image_sha256": sha, "caption_source": pa.array(["web"] * len(batch), pa.string()),
            "split": on_kept(column["split"]), "shard": on_kept(shard),
            "jpg_offset": on_kept(pa.array(written.jpg_offset[batch])),
            "jpg_bytes": on_kept(pa.array(written.jpg_bytes[batch])),
            "status": pc.if_else(kept, "ok", "dropped"),
            "drop_reason": pc.coalesce(reasons.take(pa.array(decision.dropped_as[batch])), column["drop_reason"]),
        }
        yield pa.table({name: values[name] for name in [*INDEX_SCHEMA.names, *carried]})


def _publish(cfg: ShardConfig, registry: Registry, parent: Manifest, name: str, key: str, started: str,
             stage: Path, out: str, records: pa.Table, decision: Decision, written: Written,
             shard_entries: list[dict[str, Any]], input_counts: dict[str, int],
             resumed: dict[str, int], evals: list[Manifest], carried: list[pa.Field]) -> Manifest:  # fmt: skip
    from datasets_manifests.index import INDEX_FILE, INDEX_SCHEMA, SOURCE_COLUMNS, write_index_batches

    summary = write_index_batches(_index_batches(records, decision, written), stage / INDEX_FILE,
                                  pa.schema([*INDEX_SCHEMA, *carried]))
    repeated = int((decision.dropped_as == DUPLICATE_REASONS.index("duplicate_key")).sum())
    if repeated:
        input_counts = {**input_counts, "duplicate_key": repeated}
    producer = Producer(stage=STAGE, config=to_dict(cfg), config_hash=_config_hash(cfg, bool(evals)), cache_key=key,
                        started_at=started)  # fmt: skip
    stats: dict[str, Any] = {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "max_words": cfg.max_words,
                             "resumed": resumed}  # fmt: skip
    if evals:
        stats["decontaminated"] = {"against": [manifest.ref for manifest in evals], "eval_images": sum(
            entry.role == "image" for manifest in evals for entry in manifest.files),
            "max_distance": cfg.eval_overlap_max_distance, "dropped": summary["drop_reasons"].get("eval_overlap", 0)}
    # The shards' digests were taken by the processes that wrote them: at 129M, ~7 TB that the publish would
    # otherwise read again in this one process (hours); `blip data verify` recomputes them.
    return registry.publish(
        kind="dataset", name=name, staging_dir=stage, producer=producer, parents=[parent, *evals],
        digests_from_writer=True,
        remote_staging=None if out == str(stage) else out,
        files=[*shard_entries, {"path": INDEX_FILE, "role": "index"}],
        splits=summary["splits"], counts={"input": summary["counts"]["total"], "kept": summary["counts"]["ok"],
                                          "dropped": summary["counts"]["dropped"], **input_counts},
        drop_reasons=summary["drop_reasons"],
        stats=stats,
        sample_schema={"jpg": "RGB JPEG bytes", "txt": "normalised caption (BLIP pre_caption)",
                       "json": "key, url, raw_caption, caption, image_sha256, width, height, source_key"
                               + "".join(f", {field.name}" for field in carried)},
        metadata={"layout": "webdataset", "shard_pattern": "shards/{split}-{i:06d}.tar",
                  **({SOURCE_COLUMNS: [field.name for field in carried]} if carried else {})},
    )


def _config_hash(cfg: ShardConfig, decontaminating: bool) -> str:
    return config_hash(cfg, leave_out=() if decontaminating else ("eval_overlap_max_distance",))


def _stage_key(cfg: ShardConfig, parent: Manifest, evals: list[Manifest], carried: list[pa.Field]) -> str:
    """The run's cache key. Without evaluation sets the distance plays no part: left out, so versions sharded
    before it existed are reused. The carried source columns are in it when there are any: a version the stage
    made before it carried them (from a list with `save_additional_columns`) lacks them, so it must not be reused;
    a raw version with none keeps its key."""
    config = _config_hash(cfg, bool(evals))
    if carried:
        config = f"{config}+carried:{','.join(field.name for field in carried)}"
    return cache_key(STAGE, [parent.id, *(manifest.id for manifest in evals)], config)


def summary(manifest: Manifest) -> dict[str, Any]:
    return {"ref": manifest.ref, "id": manifest.short_id, "counts": manifest.counts, "splits": manifest.splits,
            "drop_reasons": manifest.drop_reasons, "shards": len(manifest.shards())}
