"""Thumbnails for the manifest browser, cut on demand from the webdataset shards of a version.

An image is found through the per-sample index (the shard's path in the version, the byte offset and size of
its `.jpg` member), read with one seek through `Registry.open` (which refuses any file the manifest does not
reference), decoded behind a pixel-count guard (decompression bombs), shrunk, and cached in memory (LRU) and
in a cache directory. An index without offsets falls back to scanning the tar for `{key}.jpg` (webdataset
naming). On a local registry, a referenced file that resolves (through symlinks) outside the registry root is
refused. Every failure is a `ThumbnailError` carrying an HTTP status and a message naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

from datasets_manifests.browser.jobs import LRU
from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import DataRemovedError, NotFoundError, OutsideRegistryError, Registry

MAX_IMAGE_BYTES = 32 << 20  # a web image above this is not worth a thumbnail (and may be hostile)
MAX_IMAGE_PIXELS = 64_000_000  # checked from the header, before any pixel is decoded
THUMB_SIZES = (64, 128, 256, 512)
DEFAULT_THUMB_SIZE = 256


class ThumbnailError(Exception):
    """An image that cannot be shown; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_relpath(relpath: str) -> str:
    """A file path as a manifest spells it: relative, forward slashes, no `..`, no NUL. Refuse anything else."""
    if not relpath or "\x00" in relpath or "\\" in relpath:
        raise ThumbnailError(f"refused path {relpath!r}: empty or contains NUL/backslash", 400)
    path = PurePosixPath(relpath)
    if path.is_absolute() or relpath.startswith("~") or (len(relpath) > 1 and relpath[1] == ":"):
        raise ThumbnailError(f"refused path {relpath!r}: absolute paths are never served", 400)
    if any(part in ("..", ".") for part in relpath.split("/")):
        raise ThumbnailError(f"refused path {relpath!r}: '..' and '.' segments are never served", 400)
    return relpath


def check_inside_registry(registry: Registry, manifest: Manifest, relpath: str) -> None:
    """Refuse a referenced file that is not in the manifest or (locally) resolves outside the registry."""
    check_relpath(relpath)
    if relpath not in {entry.path for entry in manifest.files}:
        raise ThumbnailError(f"refused: {manifest.ref} does not reference {relpath!r}", 404)
    try:
        registry.path_of(manifest, relpath)  # the registry's own realpath check refuses symlinks out
    except OutsideRegistryError as error:
        raise ThumbnailError(str(error), 403) from error
    except DataRemovedError as error:  # gone on purpose (`blip data rm --data-only`), not refused
        raise ThumbnailError(str(error), 410) from error
    except NotFoundError as error:
        raise ThumbnailError(f"refused: {error}", 404) from error


def default_cache_dir() -> Path:
    """Per-user thumbnail cache: `$XDG_CACHE_HOME/blip/thumbs` (default `~/.cache`). A shared, predictable
    /tmp directory would let another local user plant thumbnails that this user's browser then serves."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "blip" / "thumbs"


class ThumbnailCache:
    """In-memory LRU of thumbnail bytes, backed by a directory (names are hashes, never user strings)."""

    def __init__(self, cache_dir: str | Path | None = None, capacity: int = 4096) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._memory = LRU(capacity)  # key -> thumbnail bytes
        self._count_lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()

    def get(self, key: str) -> bytes | None:
        data = self._memory.get(key)
        path = self.cache_dir / key[:2] / f"{key}.jpg"
        if data is None and path.is_file():
            data = path.read_bytes()
            self._memory.put(key, data)
        with self._count_lock:
            if data is None:
                self.misses += 1
            else:
                self.hits += 1
        return data

    def drop(self, key: str) -> None:
        """Forget a thumbnail (an image taken out by a takedown, or whose data were removed)."""
        self._memory.pop(key)
        (self.cache_dir / key[:2] / f"{key}.jpg").unlink(missing_ok=True)

    def put(self, key: str, data: bytes) -> None:
        self._memory.put(key, data)
        path = self.cache_dir / key[:2] / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file


def make_thumbnail(data: bytes, size: int, what: str) -> bytes:
    """JPEG thumbnail of encoded image bytes; refuses bombs and undecodable data with a clear message."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # lazy: only the header is parsed here
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ThumbnailError(
                        f"{what}: {width}x{height} = {width * height} pixels is above the "
                        f"{MAX_IMAGE_PIXELS} pixel limit (possible decompression bomb); not decoded", 422)
                image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale directly
                image.thumbnail((size, size))
                rgb = image.convert("RGB")
    except ThumbnailError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ThumbnailError(f"{what}: cannot decode image ({type(error).__name__}: {error})", 422) from error
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=85)
    return out.getvalue()


def read_sample_image(registry: Registry, manifest: Manifest, location: dict[str, Any], key: str) -> bytes:
    """The encoded `.jpg` bytes of one sample: one seek when the index has offsets, a tar scan otherwise."""
    shard = str(location.get("shard") or "")
    check_inside_registry(registry, manifest, shard)
    offset, size = location.get("jpg_offset"), location.get("jpg_bytes")
    what = f"{manifest.ref}/{shard} member {key}.jpg"
    if size is not None and size > MAX_IMAGE_BYTES:
        raise ThumbnailError(f"{what}: {size} bytes is above the {MAX_IMAGE_BYTES} byte limit", 413)
    try:
        if offset is not None and size is not None and offset >= 0 and size >= 0:
            data = registry.read_range(manifest, shard, offset, size)  # on a store: one request of the image's bytes
            if len(data) != size:
                raise ThumbnailError(f"{what}: shard is truncated ({len(data)} of {size} bytes at {offset})", 502)
            return data
        with registry.open(manifest, shard) as handle:
            return _scan_tar(handle, key, what)
    except FileNotFoundError as error:
        registry.removal(manifest)  # read again: removed since this long-lived registry first read the version?
        check_inside_registry(registry, manifest, shard)  # then the 410 naming the removal, as for any read
        raise ThumbnailError(f"shard {shard} of {manifest.ref} is missing from the registry", 404) from error
    except (tarfile.TarError, EOFError) as error:
        raise ThumbnailError(f"shard {shard} of {manifest.ref} is corrupt: {error}", 502) from error


def _scan_tar(handle: Any, key: str, what: str) -> bytes:
    wanted = f"{key}.jpg"
    with tarfile.open(fileobj=handle, mode="r:") as tar:
        for member in tar:
            if member.isfile() and (member.name == wanted or member.name.rsplit("/", 1)[-1] == wanted):
                if member.size > MAX_IMAGE_BYTES:
                    raise ThumbnailError(f"{what}: {member.size} bytes is above the {MAX_IMAGE_BYTES} byte limit", 413)
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file always extracts
                return extracted.read()
    raise ThumbnailError(f"{what}: not found in the shard", 404)


def read_referenced_image(registry: Registry, manifest: Manifest, relpath: str) -> bytes:
    """Bytes of an image file the manifest lists (role "image" or an image extension); nothing else."""
    check_inside_registry(registry, manifest, relpath)
    entry = manifest.file(relpath)
    if entry.role != "image" and not relpath.lower().endswith((".jpg", ".jpeg", ".png", ".webp")):
        raise ThumbnailError(f"refused: {manifest.ref}/{relpath} is a {entry.role!r} file, not an image", 403)
    if entry.bytes > MAX_IMAGE_BYTES:
        raise ThumbnailError(f"{manifest.ref}/{relpath}: {entry.bytes} bytes is above the image size limit", 413)
    try:
        with registry.open(manifest, relpath) as handle:
            return handle.read(MAX_IMAGE_BYTES + 1)
    except FileNotFoundError as error:
        raise ThumbnailError(f"{relpath} of {manifest.ref} is missing from the registry", 404) from error
