"""Webdataset shards: reading a version's samples and writing gap-free numbered shards atomically.

Format (webdataset convention, github.com/webdataset/webdataset README): a sample is the tar members sharing a
basename, here `{key}.jpg` (RGB JPEG), `{key}.txt` (normalised caption) and `{key}.json` (metadata). Shards are
`shards/{split}-{i:06d}.tar` with no gaps in the numbering (webdataset issue #174: gaps break brace expansion).
Writers follow img2dataset/webdataset's TarWriter but write to a temporary name and rename when the shard is
complete, and return the byte offset of every `.jpg` member's data so the index can point into the tar.
Reading goes through `tar_reader` (a small header parser, ~30x faster than `tarfile`; no torch needed); a
truncated or corrupt shard ends that shard's stream and is counted, never a crash. Caption cleaning is BLIP's
`pre_caption` from blip_models.processing.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Container, Iterable, Iterator

from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import Registry
from pipelines.runtime import DISK_FULL_ERRNOS
from pipelines.tasks.tar_reader import iter_tar_members

SAMPLE_SCHEMA = {
    "jpg": "RGB JPEG bytes",
    "txt": "normalised caption (BLIP pre_caption)",
    "json": "key, url, raw_caption, caption, image_sha256, width, height, source_key",
}


def shard_name(split: str, index: int) -> str:
    return f"shards/{split}-{index:06d}.tar"


def split_key(key: str) -> tuple[str, str]:
    """'abc.def.jpg' -> ('abc', 'def.jpg'): webdataset splits a member name at the first dot of the basename."""
    directory, _, base = key.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


@dataclass
class TarSample:
    key: str
    members: dict[str, bytes]  # extension -> bytes
    offsets: dict[str, int]  # extension -> byte offset of the member data in the tar
    ordinal: int = 0  # the sample's number in its tar, from 0


def group_tar(fileobj: IO[bytes], start: int = 0, stop: int | None = None,
              wanted: Container[int] | None = None) -> Iterator[TarSample]:
    """The samples of a tar stream, in order: runs of members sharing a key (webdataset's rule), numbered from 0.

    Samples before `start`, and those whose number is not in `wanted` (when given), are walked over without
    reading their data (seeked past where the file can seek); the stream ends before sample `stop`. A broken tar
    raises where it breaks (`tarfile.TarError`, `EOFError`, `OSError`): the sample being read then is never
    yielded, the ones before it were. Every reader of samples goes through here and decides what a broken tar
    means for it (`iter_tar`, `iter_tar_samples`, `train_data.iter_tar_samples`, which `read_positions` reads)."""
    current_key, sample, ordinal = None, None, -1
    for member in iter_tar_members(fileobj):
        key, extension = split_key(member.name)
        if key != current_key:
            if sample is not None:
                yield sample  # complete: the next member's data (maybe the broken one) is not read yet
            current_key, ordinal = key, ordinal + 1
            if stop is not None and ordinal >= stop:
                return
            chosen = ordinal >= start and (wanted is None or ordinal in wanted)
            sample = TarSample(key, {}, {}, ordinal) if chosen else None
        if sample is not None:
            sample.members[extension] = member.read()
            sample.offsets[extension] = member.offset
    if sample is not None:
        yield sample


# What a damaged file raises while it is read (a cut or corrupt tar, a broken compressed stream): the data are
# bad, and reading again changes nothing. Any other OSError is the reading failing (a connection reset, an I/O
# error of the disk), which a rerun may not meet.
DAMAGED_TAR_ERRORS = (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError)


def iter_tar(fileobj: IO[bytes], errors: Counter | None = None, name: str = "") -> Iterator[TarSample]:
    """The samples of a tar; a truncated/corrupt tar ends the stream and is counted (`truncated_shard`), never
    raised: the partial sample being read is dropped, the ones before survive. An I/O error raises: counted, a
    transient network error while a stage read a shard from a store dropped the rest of it for good (the stage's
    results are kept for its rerun), where the run's failing lets the rerun read it again."""
    try:
        yield from group_tar(fileobj)
    except DAMAGED_TAR_ERRORS:
        if errors is not None:
            errors["truncated_shard"] += 1


def iter_tar_samples(fileobj: Any) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (ordinal, key, {extension: bytes}) for the samples of a tar, in order; a broken tar raises.

    Members of one sample must be contiguous (webdataset's rule); a key seen again later is an error rather
    than the silent duplicate ray#44068 describes.
    """
    seen: set[str] = set()
    for sample in group_tar(fileobj):
        if sample.key in seen:
            raise ValueError(f"tar sample {sample.key!r} appears twice: its members are not contiguous (a duplicate)")
        seen.add(sample.key)
        yield sample.ordinal, sample.key, sample.members


def count_tar_samples(fileobj: Any) -> int:
    """Number of samples (contiguous key groups) in a tar, reading headers only."""
    keys = []
    for member in iter_tar_members(fileobj):
        key = split_key(member.name)[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    return len(keys)


@dataclass(frozen=True)
class WrittenTar:
    sha256: str  # of the whole file, computed from the bytes as they were written
    bytes: int
    data_offsets: dict[str, tuple[int, int]]  # member name -> (byte offset of its data, size)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it (tarfile needs write + tell)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


@contextlib.contextmanager
def atomic_output(path: str | Path, fs: Any = None) -> Iterator[IO[bytes]]:
    """A binary handle whose bytes appear at `path` whole or not at all.

    On a local disk (`fs` None or local) they go to a temp name, renamed into place on success; in an object
    store (`fs` an fsspec filesystem) they are one upload, which appears when it completes and is removed on an
    error.
    """
    from fsspec.implementations.local import LocalFileSystem

    if fs is not None and not isinstance(fs, LocalFileSystem):
        try:
            with fs.open(str(path), "wb") as handle:
                yield handle
        except BaseException as error:
            if fs.exists(str(path)):
                fs.rm(str(path))
            _raise_naming(error, path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the name appears: a published version survives a power cut
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)  # a partial file: on a full disk, the space the rerun needs
        _raise_naming(error, path)


def _raise_naming(error: BaseException, path: str | Path) -> None:
    """Raise `error`; a full disk's error that names no file (a write to an open handle) names `path`: the
    user's line says which disk to free."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS and not error.filename:
        raise OSError(error.errno, error.strerror, str(path)) from error
    raise error


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]], fs: Any = None,
              tar_format: int = tarfile.PAX_FORMAT) -> WrittenTar:
    """A deterministic tar: fixed order, mtime 0, uid/gid 0, no user names, put in place by `atomic_output`.

    `members` may be a generator (streamed: one member in memory at a time). Returns the file's sha256 and size
    and every member's data offset, taken while writing: the caller records them (registry entry, index
    offsets) without reading the file back. `tar_format`: names that fit a ustar header give the same bytes in
    both formats; USTAR refuses the others (the shard stage's format).
    """
    with atomic_output(path, fs) as handle:
        return _write_tar_stream(handle, members, tar_format)


def _write_tar_stream(handle: IO[bytes], members: Iterable[tuple[str, bytes]],
                      tar_format: int = tarfile.PAX_FORMAT) -> WrittenTar:  # fmt: skip
    offsets: dict[str, tuple[int, int]] = {}
    hashing = _HashingWriter(handle)
    with tarfile.open(fileobj=hashing, mode="w", format=tar_format) as tar:  # type: ignore[arg-type]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
            offsets[name] = (tar.offset - _padded(len(data)), len(data))  # addfile ends after the padded data
    return WrittenTar(hashing.digest.hexdigest(), hashing.size, offsets)


def shard_urls(registry: Registry, manifest: Manifest, split: str | None = None) -> list[str]:
    """URLs (local paths for a local registry) of a version's shards, in order, optionally one split."""
    return [registry.url_of(manifest, entry.path) for entry in manifest.shards(split)]


def decode_rgb(data: bytes) -> Any:
    """Decode image bytes into an RGB PIL image (greyscale/CMYK/alpha converted); raises on corrupt data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Alpha over white, as img2dataset does.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def iter_samples(registry: Registry, manifest: Manifest, split: str | None = None, decode: bool = True,
                 counts: Counter | None = None) -> Iterator[tuple[str, Any, str, dict[str, Any]]]:
    """Stream (key, PIL image | jpg bytes, caption, meta) over a version's shards.

    Samples that cannot be used (missing .jpg, undecodable image, unreadable json) are skipped and counted in
    `counts` (reason -> n), as is a truncated shard.
    """
    counts = counts if counts is not None else Counter()
    for entry in manifest.shards(split):
        with registry.open(manifest, entry.path) as handle:
            for sample in iter_tar(handle, counts, entry.path):
                if "jpg" not in sample.members:
                    counts["missing_jpg"] += 1
                    continue
                try:
                    meta = json.loads(sample.members["json"]) if "json" in sample.members else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    counts["bad_json"] += 1
                    continue
                caption = sample.members.get("txt", b"").decode("utf-8", errors="replace")
                image: Any = sample.members["jpg"]
                if decode:
                    try:
                        image = decode_rgb(image)
                    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
                        counts["corrupt_image"] += 1
                        continue
                counts["ok"] += 1
                yield sample.key, image, caption, meta


class TarShardWriter:
    """Write samples into `{root}/shards/{split}-{i:06d}.tar`, `samples_per_shard` each, gap-free and atomic.

    A shard is written under a temporary name and renamed when full (or on close), so a reader never sees a
    half-written shard. `write` returns (shard path relative to root, jpg data offset, jpg bytes). Each shard is
    hashed as it is written (`entries`: publish them with `digests_from_writer=True`, not read again).
    """

    def __init__(self, root: str | Path, split: str, samples_per_shard: int, first_index: int = 0) -> None:
        self.root = Path(root)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.shards: list[tuple[str, int]] = []  # (relative path, samples), in order
        self._index = first_index  # > 0: one of several writers, each writing its own numbered shards
        self._count = 0
        self.digests: dict[str, tuple[str, int]] = {}  # relative path -> (sha256, bytes) of each finished shard
        self._archive: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._file: IO[bytes] | None = None
        self._hashing: _HashingWriter | None = None

    def _open(self) -> None:
        final = self.root / shard_name(self.split, self._index)
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._file = open(self._tmp, "wb")
        self._hashing = _HashingWriter(self._file)
        self._archive = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def write(self, key: str, members: dict[str, bytes]) -> tuple[str, int, int]:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._archive is None:
            self._open()
        assert self._archive is not None
        jpg_offset = -1
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uname = info.gname = ""
            self._archive.addfile(info, io.BytesIO(data))
            if ext == "jpg":
                # addfile leaves the stream at the end of the padded data block.
                jpg_offset = self._archive.offset - _padded(len(data))
        relpath = shard_name(self.split, self._index)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()
        return relpath, jpg_offset, len(members.get("jpg", b""))

    def _finish(self) -> None:
        if self._archive is None or self._tmp is None or self._file is None or self._hashing is None:
            return
        self._archive.close()  # the end-of-archive blocks, through the hash; the file stays open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        relpath = shard_name(self.split, self._index)
        os.replace(self._tmp, self.root / relpath)
        self.shards.append((relpath, self._count))
        self.digests[relpath] = (self._hashing.digest.hexdigest(), self._hashing.size)
        self._archive, self._tmp, self._file, self._hashing = None, None, None, None
        self._index += 1

    def close(self) -> list[tuple[str, int]]:
        """Finish the last shard; returns [(relative path, samples)] of every shard written."""
        self._finish()
        return self.shards

    def entries(self, **fields: Any) -> list[dict[str, Any]]:
        """The publish entries of the shards written: path, num_samples, sha256, bytes and `fields`."""
        return [{"path": path, "num_samples": count, "sha256": self.digests[path][0], "bytes": self.digests[path][1],
                 **fields} for path, count in self.shards]  # fmt: skip

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        elif self._archive is not None and self._tmp is not None and self._file is not None:
            self._archive.close()
            self._file.close()
            self._tmp.unlink(missing_ok=True)


def _padded(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
