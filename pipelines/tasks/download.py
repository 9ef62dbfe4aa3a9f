"""Download stage: a source list of (url, caption) -> raw webdataset shards, published as a dataset version.

Runs img2dataset (rom1504/img2dataset, `img2dataset.download`) with the multiprocessing distributor locally or
the Ray distributor on a Ray cluster, each supervised (`download_workers`: a worker killed mid-shard has its shard
redone, where img2dataset's pool waited forever; failed shards are retried on Ray too). Resumable: img2dataset's
`incremental_mode` skips every shard whose `_stats.json` exists (a shard's stats are written after its tar and
parquet are closed) and redoes partial ones, in a working directory derived from (source checksum, hash of the
settings that change the output), so a relaunch after a crash finishes the job with no gaps and no duplicates,
even with other processes/threads/distributor.
img2dataset writes to `output_folder` (any fsspec URL): on a multi-node Ray cluster it must be storage every node
and the driver see (s3://...), since each shard is written by whichever node ran its task. The version holds the
raw shards, their parquet + `_stats.json` sidecars and `index.parquet` (one row per source row: ok, or dropped
with an error class). Failed samples inside finished shards are never retried by img2dataset (issues #358, #452);
`run_retry_failed` re-downloads exactly those URLs and publishes a new version, with the earlier one as its
parent.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from datasets_manifests.index import INDEX_BATCH_ROWS, INDEX_SCHEMA, open_parquet
from datasets_manifests.manifest import Manifest, Producer, cache_key
from datasets_manifests.registry import Registry, RegistryError, now_utc
from datasets_manifests.spill import SpilledRows, ascending_order, first_repeated_key, read_spilled, spill_writer
from datasets_manifests.sources import HASH_COLUMN  # the normalised list's expected image hash (verify_hash)
from pipelines.config import check_range, config_hash, to_dict

log = logging.getLogger(__name__)

STAGE = "download"
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # img2dataset's default X-Robots-Tag opt-outs
RETRY_STAGE = "download-retry"
SHARD_DIGITS = 5  # img2dataset's oom_shard_count: names 00000.tar ...


@dataclass(frozen=True, kw_only=True)
class DownloadConfig:
    """img2dataset settings of the download stage (names follow img2dataset's options)."""

    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"  # "ray": on the cluster in ray_address
    ray_address: str | None = None  # None: RAY_ADDRESS or a private local Ray; auto: `ray start`'s
    # multiprocessing only: img2dataset 1.47's ray distributor ignores it and runs one 1-CPU Ray task per shard,
    # so the cluster's CPU slots set the concurrency.
    processes: int = 2
    threads: int = 32  # download threads per process (multiprocessing) or per shard task (ray)
    # Where img2dataset writes raw shards (any fsspec URL); a run writes under <output_folder>/<cache key>/.
    # None: the registry's work dir (local registry) or $BLIP_WORK_DIR (remote registry) -- one machine only.
    output_folder: str | None = None
    samples_per_shard: int = 10000
    image_size: int = 384  # BLIP pretrains at 224 and finetunes at 384; keep the larger
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_quality: int = 95
    timeout: int = 10  # seconds per request
    retries: int = 0  # per-URL retries inside img2dataset
    min_image_size: int = 0
    max_image_area: float = 20_000_000.0  # pixels: larger images (decompression bombs) are dropped as too_large
    max_aspect_ratio: float = 10.0
    url_col: str | None = None  # source column names; None: detect url/URL/image, caption/TEXT
    caption_col: str | None = None
    max_shard_retry: int = 1  # retries of a shard that failed (a worker that died: its shard is redone anyway)
    user_agent_token: str | None = None
    # Opt-outs honoured: an image whose response carries `X-Robots-Tag: <one of these>` (or `<user_agent_token>:
    # <one of these>`) is not stored and is counted as disallowed_by_robots. img2dataset's defaults; () honours none.
    disallowed_header_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES
    # The source list's column (a JSON record's field) with the sha256 of each image's original bytes, e.g.
    # DataComp's `sha256`: img2dataset checks every download against it (verify_hash) and an image that changed
    # since the list was made is not stored (hash_mismatch). None: nothing checked.
    verify_hash_col: str | None = None
    # The source list's column (a JSON record's field) with its own id of each row, e.g. DataComp's `uid`: the
    # samples' key in every version (`blip data find --key`, exports), so results join back to the list's metadata.
    # None: a `source_key` column if the list has one, else a hash of the url and caption.
    key_col: str | None = None
    # Other columns of a table source list carried into the raw version's index beside each sample (img2dataset's
    # save_additional_columns), e.g. LAION's `similarity`, `punsafe`, and on into the shard stage's and CapFilt's
    # versions (their index and each sample's json).
    save_additional_columns: tuple[str, ...] = ()
    ADDED_LATER = ("disallowed_header_directives", "verify_hash_col", "key_col",  # out of the hash at their defaults
                   "save_additional_columns")

    def __post_init__(self) -> None:
        check_range("DownloadConfig", "processes", self.processes, 1)
        check_range("DownloadConfig", "threads", self.threads, 1, 4096)
        check_range("DownloadConfig", "samples_per_shard", self.samples_per_shard, 1, 1_000_000)
        check_range("DownloadConfig", "image_size", self.image_size, 8, 8192)
        check_range("DownloadConfig", "encode_quality", self.encode_quality, 1, 100)
        check_range("DownloadConfig", "timeout", self.timeout, 1)
        check_range("DownloadConfig", "retries", self.retries, 0, 10)
        check_range("DownloadConfig", "max_image_area", self.max_image_area, 1.0)
        check_range("DownloadConfig", "max_aspect_ratio", self.max_aspect_ratio, 1.0)
        check_range("DownloadConfig", "max_shard_retry", self.max_shard_retry, 0, 10)
        if self.verify_hash_col is not None and not self.verify_hash_col.strip():
            raise ValueError("verify_hash_col: empty; name the source list's sha256 column, or leave it null")
        if self.key_col is not None and not self.key_col.strip():
            raise ValueError("key_col: empty; name the source list's id column (e.g. uid), or leave it null")
        for column in self.save_additional_columns:
            if not isinstance(column, str) or not column.strip() or column in RESERVED_COLUMNS:
                raise ValueError(f"save_additional_columns: {column!r} is "
                                 + ("a column the index has already" if column in RESERVED_COLUMNS else "not a name"))
        for directive in self.disallowed_header_directives:  # img2dataset compares them lowercased and stripped
            if not isinstance(directive, str) or not directive or directive != directive.strip().lower():
                raise ValueError(f"disallowed_header_directives: {directive!r} is not a lowercase "
                                 "X-Robots-Tag directive (e.g. noai)")  # fmt: skip

    def cache_relevant(self) -> DownloadConfig:
        """The settings that decide the published shards; how and where the work runs is reset to the defaults,
        so a relaunch with other processes/threads/distributor/output folder resumes the same work."""
        defaults = DownloadConfig()
        return replace(self, **{name: getattr(defaults, name) for name in RUN_ONLY_FIELDS})


# Settings that change how fast or where the download runs, not what it produces (timeout and retries only
# change which flaky URLs succeed; `--retry-failed` is the tool for those).
RUN_ONLY_FIELDS = ("distributor", "ray_address", "processes", "threads", "output_folder", "timeout", "retries",
                   "max_shard_retry")


# img2dataset reports errors as free text (urllib, OpenCV, its own checks); the classes a report can count.
_ERROR_CLASSES: tuple[tuple[str, str], ...] = (
    (r"HTTP Error (\d{3})", "http_{0}"),
    (r"timed out|timeout", "timeout"),
    (r"image area too large|DecompressionBomb", "too_large"),
    (r"image too small", "too_small"),
    (r"aspect ratio too large", "bad_aspect_ratio"),
    (r"!buf\.empty\(\)|buf\.empty", "empty_body"),
    (r"Image decoding error|imdecode|cannot identify image|decod", "decode_error"),
    (r"X-Robots-Tag", "disallowed_by_robots"),
    (r"hash mismatch", "hash_mismatch"),
    (r"Name or service not known|getaddrinfo|nodename nor servname", "dns_error"),
    (r"Connection refused|Connection reset|Remote end closed|urlopen error|RemoteDisconnected", "connection_error"),
    (r"certificate|SSL", "ssl_error"),
)


def classify_error(message: str | None) -> str:
    """Normalise an img2dataset error message into a class (http_404, decode_error, timeout, too_large, ...)."""
    if not message:
        return "unknown_error"
    for pattern, label in _ERROR_CLASSES:
        match = re.search(pattern, message, flags=re.IGNORECASE)
        if match:
            return label.format(*match.groups())
    return "other_error"


def download_key(cfg: DownloadConfig, source_id: str) -> str:
    """Cache key (and work directory name) of a download: the source and the output-affecting settings."""
    return cache_key(STAGE, [source_id], config_hash(cfg.cache_relevant()))


# ---------------------------------------------------------------------------------------------- stage


def run_download(cfg: DownloadConfig, source: str | Path, *, name: str, registry: Registry,
                 source_id: str | None = None, extra_files: dict[str, Path] | None = None) -> Manifest:
    """Download the source list and publish the raw shards as a new version of `name` (no-op if done).

    `source_id` names the source for the cache key when its bytes are not a stable identity (the demo
    corpus's URLs carry the ephemeral port of its server); default: the sha256 of the list.
    `extra_files` ({path in version: local file}) are published with the shards (e.g. ground truth).
    """
    from datasets_manifests.sources import detect_format, normalise_source_list, source_list_sha256

    source = str(source)  # a local path or an fsspec URL (s3://..., gs://...)
    detect_format(source)  # a list of no known format is refused before a run is noted (`blip data work`)
    key = download_key(cfg, source_id or f"source:{source_list_sha256(source)}")
    cached = registry.find_cached("dataset", name, key)
    if cached is not None:
        _remove_work(registry, cfg, key)  # what a run stopped between its publish and its clean-up left
        return cached
    started = now_utc()
    # shared: a remote registry's store holds the note (with an output folder, the shards too), so the same download
    # from another machine is refused instead of fetching every image twice into two versions.
    work = registry.note_work(key, stage=STAGE, name=name, shared=True, outside=_outside_work(cfg, key))
    stage = work / "stage"
    source_table = stage / "source.parquet"
    report = normalise_source_list(source, source_table, cfg.url_col, cfg.caption_col, cfg.verify_hash_col,
                                   cfg.key_col, tuple(cfg.save_additional_columns))
    extra = carried_fields(source_table)
    raw_output = _raw_output(cfg, key, stage / "raw")
    _run_img2dataset(cfg, source_table, raw_output, work / "tmp", extra)
    # Shards written to storage inside a remote registry's store are indexed there and published by a copy
    # inside the store; shards on other shared storage are copied into the local staging dir publish reads.
    in_store = raw_output != str(stage / "raw") and _in_registry_store(registry, raw_output)
    copy_to = None if raw_output == str(stage / "raw") or in_store else stage / "raw"
    rows_file = work / ROWS_FILE
    files = collect_shards(raw_output, "raw", rows_file, copy_to=copy_to, extra=extra)
    _check_complete(read_rows([rows_file], extra), report.rows, raw_output)
    producer = Producer(stage=STAGE, config=to_dict(cfg), config_hash=config_hash(cfg), cache_key=key,
                        started_at=started)
    extra_counts = {"source_records": report.records, "source_duplicates": report.duplicates}
    stats = {"source": report.to_dict()}
    for relpath, local in (extra_files or {}).items():
        (stage / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, stage / relpath)
        files.append({"path": relpath, "role": "other"})
    manifest = _publish(registry, name, stage, [rows_file], files + [{"path": "source.parquet", "role": "other"}],
                        producer, parents=[], extra_counts=extra_counts, stats=stats,
                        remote_staging=raw_output.rsplit("/", 1)[0] if in_store else None, extra=extra)
    _remove_work(registry, cfg, key)
    return manifest


def run_retry_failed(cfg: DownloadConfig, previous: str | Manifest, *, name: str, registry: Registry) -> Manifest:
    """Re-download only the URLs that failed in `previous`; publish a complete new version whose parent it is."""
    parent = registry.resolve(previous, "dataset")
    key = cache_key(RETRY_STAGE, [parent.id], config_hash(cfg.cache_relevant()))
    cached = registry.find_cached("dataset", name, key)
    if cached is not None:
        _remove_work(registry, cfg, key)
        return cached
    started = now_utc()
    work = registry.note_work(key, stage=RETRY_STAGE, name=name, parents=[parent], shared=True,
                              outside=_outside_work(cfg, key))  # fmt: skip
    stage = work / "stage"
    stage.mkdir(parents=True, exist_ok=True)
    source_table = work / "retry_source.parquet"
    kept_file = work / "kept_rows.arrow"
    failed = _split_parent_index(registry, parent, kept_file, source_table, verify_hashes=bool(cfg.verify_hash_col))
    extra = carried_fields(source_table)  # the parent's own extra columns, whatever this config says
    retry_output = _raw_output(cfg, key, work / "retry")
    if failed:
        _run_img2dataset(cfg, source_table, retry_output, work / "tmp", extra)
    # The parent's shards and sidecars come along unchanged; retried shards are numbered after them. A local
    # registry hard-links them into the staging dir; a remote one copies them inside its store at publish.
    parent_files = [e for e in parent.files if e.path.startswith("raw/")]
    remote_staging = None if registry.is_local else registry.version_path("dataset", parent.name, parent.version)
    for entry in parent_files if registry.is_local else ():
        _link_or_copy(registry, parent, entry.path, stage / entry.path)
    first_id = 1 + max((int(Path(e.path).stem) for e in parent_files if e.path.endswith(".tar")), default=-1)
    rows_file = work / ROWS_FILE
    files = collect_shards(retry_output, "raw", rows_file, id_offset=first_id, copy_to=stage / "raw",
                           extra=extra) if failed else []  # fmt: skip
    rows = read_rows([rows_file] if failed else [], extra)
    _check_complete(rows, failed, retry_output)
    retried = len(rows)
    recovered = int(pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0)
    files = [{"path": e.path, "role": e.role, "num_samples": e.num_samples, "sha256": e.sha256, "bytes": e.bytes}
             for e in parent_files] + files  # fmt: skip
    producer = Producer(stage=RETRY_STAGE, config=to_dict(cfg), config_hash=config_hash(cfg), cache_key=key,
                        started_at=started)
    manifest = _publish(registry, name, stage, [kept_file, *([rows_file] if failed else [])], files, producer,
                        parents=[parent], extra_counts={"retried": retried, "recovered": recovered},
                        stats={"retry_of": parent.ref}, remote_staging=remote_staging, extra=extra)
    _remove_work(registry, cfg, key)
    return manifest


# ---------------------------------------------------------------------------------------------- parts


def _outside_work(cfg: DownloadConfig, key: str) -> list[str]:
    """A download's work beyond the registry's work dirs, for its note: with `output_folder`, the run's folder there
    (terabytes of raw shards at 129M; the note then goes to a remote registry's store too, where `blip data work`
    finds it)."""
    return [] if cfg.output_folder is None else [f"{cfg.output_folder.rstrip('/')}/{key}"]


def _remove_work(registry: Registry, cfg: DownloadConfig, key: str) -> None:
    """A published download's leftovers: its work dir (the normalised list, a retry's shards, which the publish
    copied into the version; a remote registry's note of it) and, with `output_folder`, the run's folder there,
    which the publish copied too (at 129M: terabytes of shards, on object storage, a second time)."""
    registry.remove_work(key)
    if cfg.output_folder is not None:
        from datasets_manifests.sources import url_to_fs

        fs, path = url_to_fs(f"{cfg.output_folder.rstrip('/')}/{key}")
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _in_registry_store(registry: Registry, url: str) -> bool:
    """Whether `url` is in a remote registry's own store (same filesystem: s3 -> s3), so that its files can be
    published by a copy inside the store instead of through this machine."""
    from datasets_manifests.sources import url_to_fs

    return not registry.is_local and type(url_to_fs(url)[0]) is type(registry.fs)


def _raw_output(cfg: DownloadConfig, key: str, local_dir: Path) -> str:
    """Where img2dataset writes a run's shards: `local_dir`, or <output_folder>/<key>/<its name> when set."""
    if cfg.output_folder is None:
        return str(local_dir)
    return f"{cfg.output_folder.rstrip('/')}/{key}/{local_dir.name}"


def _run_img2dataset(cfg: DownloadConfig, source_table: Path, output_folder: str, temp_dir: Path,
                     extra: list[pa.Field]) -> None:  # fmt: skip
    """img2dataset into `output_folder` (path or fsspec URL), keeping the list's `extra` columns beside each sample
    (`carried_fields`); finished shards (with _stats.json) are skipped on a relaunch. The driver reads
    `source_table` (in parts, under `temp_dir`) and writes its input splits under `output_folder`/_tmp, so with
    the ray distributor only `output_folder` has to be shared between nodes. `temp_dir` also holds the
    multiprocessing workers' TMPDIR; what this puts there is removed afterwards."""
    # albumentations (imported by img2dataset) checks PyPI for updates at import: no network on workers.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from pipelines.tasks._img2dataset import import_img2dataset

    img2dataset = import_img2dataset()

    if cfg.distributor == "ray":
        from pipelines.runtime import ensure_ray

        # Ray workers do not inherit the variable set above once the cluster runs: hand it to this job's workers.
        ensure_ray(cfg.ray_address, runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    from datasets_manifests.sources import url_to_fs

    fs, path = url_to_fs(output_folder)  # fails early, with an install hint, when s3fs/gcsfs is missing
    fs.makedirs(posixpath.dirname(path.rstrip("/")), exist_ok=True)
    parts = split_source_table(source_table, temp_dir / "source-parts", cfg.samples_per_shard)
    with _workers_temp_dir(temp_dir / "workers" if cfg.distributor == "multiprocessing" else None):
        _img2dataset_download(img2dataset, cfg, parts, output_folder, [field.name for field in extra])
    shutil.rmtree(temp_dir, ignore_errors=True)


# Rows per part of the source list handed to img2dataset (rounded down to whole shards): its reader loads each
# input file whole (`pq.read_table`) before cutting it into shards: one file of 129M rows needs ~25 GB there
# (benchmarks/bench_source_parts.py).
SOURCE_PART_ROWS = 1 << 20


def split_source_table(source_table: Path, directory: Path, samples_per_shard: int) -> Path:
    """`source_table` as a folder of Parquet parts of whole shards, in order (img2dataset reads a folder's
    `*.parquet` sorted by name and numbers the shards on across its files, so the shards hold the same rows as
    from the one file). An empty list gives one empty part (img2dataset refuses a folder without one)."""
    import pyarrow.parquet as pq

    rows_per_part = samples_per_shard * max(1, SOURCE_PART_ROWS // samples_per_shard)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    source = open_parquet(source_table)
    writer, in_part, parts = None, 0, 0
    for batch in source.iter_batches(batch_size=min(rows_per_part, 1 << 16)):
        while batch.num_rows:
            if writer is None:
                writer = pq.ParquetWriter(str(directory / f"part-{parts:06d}.parquet"), source.schema_arrow)
                parts += 1
            taken = min(batch.num_rows, rows_per_part - in_part)
            writer.write_batch(batch.slice(0, taken))
            batch, in_part = batch.slice(taken), in_part + taken
            if in_part == rows_per_part:
                writer.close()
                writer, in_part = None, 0
    if writer is not None:
        writer.close()
    if parts == 0:
        pq.write_table(source.schema_arrow.empty_table(), directory / "part-000000.parquet")
    return directory


def _img2dataset_download(img2dataset: Any, cfg: DownloadConfig, source_parts: Path, output_folder: str,
                          extra: list[str]) -> None:  # fmt: skip
    import importlib

    from pipelines.runtime import ctrl_c_of_a_library
    from pipelines.tasks.download_workers import using_supervised_distributor

    # img2dataset's own multiprocessing pool waits forever for a shard whose worker died, and its Ray distributor
    # never retries a failed shard (download_workers).
    main_module = importlib.import_module("img2dataset.main")  # `img2dataset.main` is the function, not the module
    with using_supervised_distributor(main_module), ctrl_c_of_a_library(_download_stopped):
        _call_img2dataset(img2dataset, cfg, source_parts, output_folder, extra)


def _download_stopped() -> KeyboardInterrupt:
    # img2dataset's Ctrl-C handler removes its `_tmp` folder and exits 0; the finished shards stay for a rerun.
    return KeyboardInterrupt("the download stopped; the shards it finished are kept: the same command goes on from "
                             "them")  # fmt: skip


def _call_img2dataset(img2dataset: Any, cfg: DownloadConfig, source_parts: Path, output_folder: str,
                      extra: list[str]) -> None:  # fmt: skip
    img2dataset.download(
        url_list=str(source_parts), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=["source_key", *extra], output_folder=output_folder, output_format="webdataset",
        processes_count=cfg.processes, thread_count=cfg.threads, number_sample_per_shard=cfg.samples_per_shard,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality, encode_format="jpg", timeout=cfg.timeout, retries=cfg.retries,
        min_image_size=cfg.min_image_size, max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio,
        distributor=cfg.distributor, incremental_mode="incremental", enable_wandb=False, compute_hash="sha256",
        oom_shard_count=SHARD_DIGITS, max_shard_retry=cfg.max_shard_retry, user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=list(cfg.disallowed_header_directives), extract_exif=False,
        verify_hash=[HASH_COLUMN, "sha256"] if cfg.verify_hash_col else None,  # the normalised list's column
    )


@contextmanager
def _workers_temp_dir(directory: Path | None) -> Iterator[None]:
    """TMPDIR of the processes started inside, removed afterwards: what a worker stopped before its normal exit
    leaves in its temporary folder goes with it (wandb's two import-time folders did, before img2dataset was
    imported without it: `_img2dataset`)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    tempfile.gettempdir()  # fixes this process's own temporary folder before TMPDIR changes
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(directory)  # spawned workers read it; this process's tempfile.tempdir is cached
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(directory, ignore_errors=True)


# Index shards in parallel processes only when there is this much tar data per process: starting one costs
# about a second, in which one process indexes ~0.5 GB.
BYTES_PER_INDEX_WORKER = 1 << 30


def collect_shards(raw_output: str | Path, prefix: str, rows_file: Path, id_offset: int = 0,
                   copy_to: Path | None = None, workers: int | None = None,
                   extra: list[pa.Field] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Index img2dataset's finished shards in `raw_output` (a path or fsspec URL): their index rows go to
    `rows_file` (ROWS_SCHEMA, an Arrow file: `read_rows`), their file entries are returned.

    Only shards with a `_stats.json` count (finished). With `copy_to` (a local dir), shard files are copied there
    as `id + id_offset` (to append retried shards after the parent's, or to fetch them from shared storage);
    without it its files are indexed where they are (a remote registry then publishes them by a copy inside its
    store). Indexing reads every image (its sha256) and hashes every file as it reads it (the entries carry
    sha256 and bytes): the shards are spread over `workers` processes (None: one per CPU core, at most one per
    BYTES_PER_INDEX_WORKER of tars), so at 129M images it is not one core reading terabytes.
    """
    from datasets_manifests.sources import url_to_fs
    from pipelines.progress import StageProgress
    from pipelines.runtime import map_in_processes, process_count

    fs, root = url_to_fs(raw_output)
    root = root.rstrip("/")
    is_local = isinstance(fs, LocalFileSystem)
    jobs: list[tuple[dict[str, str], str]] = []
    tar_bytes = 0
    listed = {info["name"].rstrip("/"): info.get("size") for info in fs.ls(root, detail=True)}  # one listing
    # Shard numbers are padded to SHARD_DIGITS and grow past them (100000_stats.json after 99999_stats.json).
    numbered = [(int(path.rsplit("/", 1)[-1].split("_", 1)[0]), path) for path in fs.glob(f"{root}/*_stats.json")
                if path.rsplit("/", 1)[-1].split("_", 1)[0].isdigit()]  # fmt: skip
    for shard_id, stats_path in sorted(numbered):
        new_id = f"{shard_id + id_offset:0{SHARD_DIGITS}d}"
        sources = {ext: f"{root}/{shard_id:0{SHARD_DIGITS}d}{ext}" for ext in (".tar", ".parquet", "_stats.json")}
        names = {ext: fs.unstrip_protocol(path) for ext, path in sources.items()}  # URLs, for index_raw_shard
        if copy_to is not None:
            copy_to.mkdir(parents=True, exist_ok=True)
            for ext, path in sources.items():
                target = copy_to / f"{new_id}{ext}"
                if is_local:
                    shutil.copy2(path, target)
                else:
                    fs.get_file(path, str(target))
                names[ext] = str(target)
        jobs.append((names, f"{prefix}/{new_id}", extra or []))
        tar_bytes += listed.get(sources[".tar"]) or fs.size(sources[".tar"])
    if workers is None:
        workers = process_count(tar_bytes, BYTES_PER_INDEX_WORKER, len(jobs))
    files: list[dict[str, Any]] = []
    with (StageProgress("indexing raw shards", len(jobs), "shards", logger=log, enabled=len(jobs) >= 4) as progress,
          spill_writer(rows_file, rows_schema(extra)) as writer):  # fmt: skip
        for shard_rows, shard_files in map_in_processes(index_raw_shard, jobs, workers):
            writer.write_table(shard_rows)
            files.extend(shard_files)
            progress.update()
    return files


# A run's index rows wait on disk (an Arrow file per source, read through a memory map) until the publish
# writes them in key order: at 129M samples, rows held as Python dicts would need hundreds of GB.
ROWS_FILE = "rows.arrow"
ROWS_SCHEMA = pa.schema([field.with_nullable(True) for field in INDEX_SCHEMA] +
                        [pa.field("error_message", pa.string()), pa.field("raw_key", pa.string())])  # fmt: skip
# Names an extra column may not have: the index's own, the normalised list's, img2dataset's (it refuses them), and
# those CapFilt adds to the index and to each sample's json (the column is carried into both).
RESERVED_COLUMNS = frozenset([*ROWS_SCHEMA.names, "source_key", "sha256", "original_width", "original_height",
                              "exif", "md5", "sha512", "error_detail", "texts_count", "texts_kept", "texts_row",
                              "captions", "texts", "capfilt"])  # fmt: skip


def read_rows(paths: list[Path], extra: list[pa.Field] | None = None) -> pa.Table:
    """The rows of `collect_shards` files, memory-mapped."""
    return read_spilled(paths, rows_schema(extra))


def rows_schema(extra: list[pa.Field] | None = None) -> pa.Schema:
    """ROWS_SCHEMA and the source list's extra columns after it (`save_additional_columns`)."""
    return pa.schema([*ROWS_SCHEMA, *(field.with_nullable(True) for field in extra or [])])


def carried_fields(source_table: Path) -> list[pa.Field]:
    """The extra columns a normalised source list carries (after url, caption, source_key and sha256)."""
    import pyarrow.parquet as pq

    from datasets_manifests.sources import HASHED_SOURCE_SCHEMA

    return [field for field in pq.read_schema(source_table) if field.name not in HASHED_SOURCE_SCHEMA.names]


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read from `handle` (not seekable: a tar reader on
    it reads what it would skip, so the digest covers the whole file)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.handle.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def index_raw_shard(names: dict[str, str], stem: str,
                    extra: list[pa.Field] | None = None) -> tuple[pa.Table, list[dict[str, Any]]]:  # fmt: skip
    """Index rows and file entries of one finished img2dataset shard (`.tar`, `.parquet`, `_stats.json`: local
    paths or URLs), published as `{stem}.tar` etc. Every stored JPEG is hashed (image_sha256: the shard stage
    dedups by it), and every file as a whole (the entries' sha256 and bytes: the registry need not re-read them)."""
    import fsspec
    import pyarrow.parquet as pq

    from blip_models.processing import pre_caption
    from pipelines.tasks.webdata import iter_tar

    tar_rel = f"{stem}.tar"
    located: dict[str, tuple[int, int, str]] = {}  # img2dataset key -> (jpg offset, bytes, sha256)
    with fsspec.open(names[".tar"], "rb") as handle:
        hashing = _HashingReader(handle)
        reader = io.BufferedReader(hashing, 1 << 20)
        for sample in iter_tar(reader):
            data = sample.members.get("jpg")
            if data is not None:
                located[sample.key] = (sample.offsets["jpg"], len(data), hashlib.sha256(data).hexdigest())
        while reader.read(1 << 20):  # the end-of-archive blocks (or what follows a truncation): hashed too
            pass
    digests = {".tar": (hashing.digest.hexdigest(), hashing.size)}
    sidecars = {}
    for ext in (".parquet", "_stats.json"):
        with fsspec.open(names[ext], "rb") as handle:
            sidecars[ext] = handle.read()
        digests[ext] = (hashlib.sha256(sidecars[ext]).hexdigest(), len(sidecars[ext]))
    table = pq.read_table(io.BytesIO(sidecars[".parquet"]))
    rows = []
    successes = 0
    for record in table.to_pylist():
        raw_caption = record.get("caption") or ""
        row = {
            "key": record["source_key"], "url": record["url"], "raw_caption": raw_caption,
            "caption": pre_caption(raw_caption, 50), "caption_source": "web", "split": None,
            "width": record.get("width"), "height": record.get("height"), "image_sha256": None,
            "shard": None, "jpg_offset": None, "jpg_bytes": None, "raw_key": record["key"],
            "error_message": record.get("error_message"),
        }
        if record["status"] == "success" and record["key"] in located:
            offset, size, digest = located[record["key"]]
            row.update(status="ok", drop_reason=None, shard=tar_rel, jpg_offset=offset, jpg_bytes=size,
                       image_sha256=digest)
            successes += 1
        else:
            reason = classify_error(record.get("error_message")) if record["status"] != "success" else "missing_in_tar"
            row.update(status="dropped", drop_reason=reason)
        rows.append(row)
    files: list[dict[str, Any]] = []
    for ext, role in ((".tar", "shard"), (".parquet", "other"), ("_stats.json", "stats")):
        entry: dict[str, Any] = {"path": f"{stem}{ext}", "role": role, "sha256": digests[ext][0],
                                 "bytes": digests[ext][1]}
        if role == "shard":
            entry["num_samples"] = successes
        files.append(entry)
    rows_table = pa.Table.from_pylist(rows, schema=ROWS_SCHEMA)
    for field in extra or []:  # img2dataset's table, row for row, keeps the source list's extra columns
        values = table.column(field.name).cast(field.type) if field.name in table.column_names else \
            pa.nulls(len(table), field.type)  # fmt: skip
        rows_table = rows_table.append_column(field.with_nullable(True), values)
    return rows_table, files


def _check_complete(rows: pa.Table, expected: int, raw_dir: str) -> None:
    # On hashes of the keys, a memory-mapped chunk at a time: 8 bytes a row (Arrow's hash of the strings: ~65).
    repeated = first_repeated_key(lambda: rows.column("key").chunks)
    if repeated is not None:
        raise RegistryError(f"{raw_dir}: sample {repeated[0]} appears in {repeated[1]} shards")
    if len(rows) != expected:
        raise RegistryError(
            f"{raw_dir}: {len(rows)} of {expected} source rows accounted for: some shards did not finish "
            "(img2dataset gave up on them); run the same command again to resume")


def _split_parent_index(registry: Registry, parent: Manifest, kept_file: Path, source_table: Path,
                        verify_hashes: bool = False) -> int:  # fmt: skip
    """Stream the parent's index once: its ok rows to `kept_file` (ROWS_SCHEMA), its failed ones to the retry's
    source list `source_table` (url, caption, source_key; with `verify_hashes`, the sha256 each image must have,
    from the download's normalised list). Returns the number of failed rows."""
    import pyarrow.parquet as pq

    from datasets_manifests.index import INDEX_FILE, scan_index
    from datasets_manifests.sources import SOURCE_SCHEMA

    failed = 0
    failed_rows = source_table.with_name(f"{source_table.name}.unhashed") if verify_hashes else source_table
    with registry.open(parent, INDEX_FILE) as handle:  # the source list's extra columns, carried to the retry
        extra = [field for field in pq.read_schema(handle) if field.name not in ROWS_SCHEMA.names]
    retry_schema = pa.schema([*SOURCE_SCHEMA, *extra])
    with spill_writer(kept_file, rows_schema(extra)) as kept, \
            pq.ParquetWriter(str(failed_rows), retry_schema) as retry:  # fmt: skip
        for batch in scan_index(registry, parent):
            ok = pc.equal(batch.column("status"), "ok")
            kept.write_table(_as_rows(pa.Table.from_batches([batch.filter(ok)]), rows_schema(extra)))
            dropped = batch.filter(pc.invert(ok))
            failed += len(dropped)
            retry.write_table(pa.table([dropped.column("url"), dropped.column("raw_caption"), dropped.column("key"),
                                        *(dropped.column(field.name) for field in extra)], schema=retry_schema))
    if verify_hashes:  # the failures only (a few percent of a download), with the hash each image must have
        rows = pq.read_table(failed_rows)
        failed_rows.unlink()
        expected = _expected_hashes(registry, parent, rows.column("source_key"))
        hashes = pa.array([expected[key] for key in rows.column("source_key").to_pylist()], pa.string())
        pq.write_table(rows.append_column(pa.field(HASH_COLUMN, pa.string()), hashes), source_table)
    return failed


def _expected_hashes(registry: Registry, version: Manifest, keys: pa.ChunkedArray) -> dict[str, str]:
    """source_key -> the sha256 the download's normalised list expects, for `keys`: from the `source.parquet` of
    the download that began `version`'s line of retries."""
    from datasets_manifests.index import iter_registry_parquet

    download = version
    while download.producer.stage == RETRY_STAGE and download.parents:
        download = registry.resolve(download.parents[0], "dataset")
    if not any(entry.path == "source.parquet" for entry in download.files):
        raise ValueError(f"{download.ref} keeps no source.parquet: the images' expected sha256 are unknown")
    wanted = pa.array(sorted(set(keys.to_pylist())), pa.string())
    expected: dict[str, str] = {}
    try:
        path = registry.path_of(download, "source.parquet")
        for batch in iter_registry_parquet(registry, path, ["source_key", HASH_COLUMN]):
            hit = batch.filter(pc.is_in(batch.column("source_key"), value_set=wanted))
            expected.update(zip(hit.column("source_key").to_pylist(), hit.column(HASH_COLUMN).to_pylist()))
    except (KeyError, pa.ArrowInvalid) as error:
        raise ValueError(f"{download.ref}: its source.parquet has no {HASH_COLUMN} column (downloaded without "
                         f"verify_hash_col): {error}") from None
    missing = [key for key in wanted.to_pylist() if key not in expected]
    if missing:
        raise ValueError(f"{download.ref}: no expected sha256 for {len(missing)} failed samples (e.g. {missing[0]!r})")
    return expected


def _as_rows(table: pa.Table, schema: pa.Schema = ROWS_SCHEMA) -> pa.Table:
    """An index table as `schema` (a column it lacks is null; others are dropped)."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]  # fmt: skip
    return pa.table(columns, schema=schema)


def _publish(registry: Registry, name: str, stage: Path, row_files: list[Path], files: list[dict[str, Any]],
             producer: Producer, *, parents: list[Manifest], extra_counts: dict[str, int],
             stats: dict[str, Any], remote_staging: str | None = None,
             extra: list[pa.Field] | None = None) -> Manifest:  # fmt: skip
    from datasets_manifests.index import INDEX_FILE, SOURCE_COLUMNS, write_index_batches

    rows = read_rows(row_files, extra)
    order = ascending_order(rows, ["key"])
    spilled = SpilledRows(rows)  # (Arrow's own take would copy all the rows' strings into memory at each batch)
    batches = (spilled.take(order[first : first + INDEX_BATCH_ROWS])
               for first in range(0, len(order), INDEX_BATCH_ROWS))  # fmt: skip
    summary = write_index_batches(batches, stage / INDEX_FILE, schema=rows_schema(extra))
    counts = {"input": summary["counts"]["total"], "ok": summary["counts"]["ok"],
              "dropped": summary["counts"]["dropped"], **extra_counts}  # fmt: skip
    manifest = registry.publish(
        kind="dataset", name=name, staging_dir=stage, producer=producer, parents=parents,
        files=[*files, {"path": INDEX_FILE, "role": "index"}], counts=counts,
        digests_from_writer=True, remote_staging=remote_staging,  # the shard entries' digests: index_raw_shard
        drop_reasons=summary["drop_reasons"], stats=stats,
        sample_schema={"jpg": "JPEG bytes (img2dataset re-encoded)", "txt": "raw web caption",
                       "json": "img2dataset metadata + source_key"},
        metadata={"layout": "img2dataset-webdataset", "raw": True,
                  **({SOURCE_COLUMNS: [field.name for field in extra]} if extra else {})},
    )
    del rows  # the memory maps, before their files go
    for path in row_files:
        path.unlink()
    return manifest


def _link_or_copy(registry: Registry, manifest: Manifest, relpath: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.unlink()
    if registry.is_local:
        source = registry.local_path(manifest, relpath)
        try:
            os.link(source, dest)  # same disk: no copy; the published file is immutable anyway
            return
        except OSError:
            pass
    with registry.open(manifest, relpath) as handle, open(dest, "wb") as out:
        shutil.copyfileobj(handle, out)


def summary(manifest: Manifest) -> dict[str, Any]:
    """A JSON-able summary of a download version, for the CLI and the demo."""
    return {"ref": manifest.ref, "id": manifest.short_id, "counts": manifest.counts,
            "failures": manifest.drop_reasons, "shards": len(manifest.shards())}

