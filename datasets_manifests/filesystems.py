"""Opening registry, source-list and output URLs with fsspec: a missing optional backend (s3fs, gcsfs) becomes one
line naming the extra of this package that brings it. Kept free of heavy imports: `Registry` uses it, and
`blip data ls` must start fast."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import fsspec

DISTRIBUTION = "blip-bootstrap"  # pyproject.toml [project] name, for install hints
# fsspec backends that are optional extras of this package (pyproject.toml), so that CI and laptops skip them:
# URL protocol -> extra.
FILESYSTEM_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class MissingFilesystemError(ImportError):
    """A URL whose fsspec backend (s3fs, gcsfs) is not installed; the message names the extra to install."""


def missing_filesystem_message(url: str, error: ImportError) -> str:
    """One line for fsspec's "Install s3fs to access S3": which extra of this package brings the backend."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    extra = FILESYSTEM_EXTRAS.get(protocol)
    hint = f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"install the fsspec backend for {protocol}://"
    return f"{url}: cannot open {protocol}:// URLs ({error}); {hint}"


def url_to_fs(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's url_to_fs, with a missing backend reported as MissingFilesystemError (install hint included)."""
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as error:
        raise MissingFilesystemError(missing_filesystem_message(str(url), error)) from error


def sha256_file(path: str | Path, fs: fsspec.AbstractFileSystem | None = None, chunk: int = 1 << 20,
                on_read: Callable[[int], object] | None = None) -> tuple[str, int]:  # fmt: skip
    """(sha256 hex, bytes) of a file, read in chunks: a local path, or a path in `fs` (uploads read back,
    remote source lists, `blip data verify` on any registry). `on_read(n)` after each chunk (progress)."""
    digest, size = hashlib.sha256(), 0
    with (fs.open(str(path), "rb") if fs is not None else open(path, "rb")) as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
            if on_read is not None:
                on_read(len(block))
    return digest.hexdigest(), size
