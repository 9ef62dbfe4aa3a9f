"""A node-local cache of remote shards, shared by every loader process of every rank on the node (and by
CapFilt's decode and writer tasks); also the way a worker gets a remote model's files onto its node
(`local_copies`, `local_model_source`).

Each DataLoader worker reads only its own micro-batches' samples (train_data), but on object storage (s3://,
gs://, http://) opening a shard fetches it in read-ahead blocks that hold the skipped samples too: with the
presets' 10 loader workers a rank downloads each shard ~10 times, and ranks of one node that draw the same shard
(resampled) download it again. With a cache directory on the node's disk the first process that needs a shard
downloads it whole while the others wait for it, and every process reads the local file.

- A file is named after its URL (a hash and the shard's name), written to `<name>.partial` under the shard's lock
  and renamed when complete: a process killed mid-download leaves nothing that looks complete, and the kernel
  releases its lock.
- When the manifest's byte count is known, a download of another size is refused (the shard counts as
  unreadable, as an unreachable one does) and a cached file of another size is fetched again.
- The least recently opened shards are removed once the cache holds more than `max_bytes` (never the one just
  opened), and before each download, to make room for it (downloads in progress count as they are on the disk);
  a process that has a removed file open keeps reading it (POSIX unlink). A `max_bytes` beyond 90 % of
  what the disk can hold (free space plus the cache) is lowered to that, with a warning.
- `open_streaming` is for a single front-to-back reader (CapFilt's decode task): it reads the file while a thread
  downloads it, so the decoding overlaps the download; the copy is kept for the shard's writer task.
- Local paths (and `file://` URLs) are opened in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

log = logging.getLogger(__name__)
_WARNED_FULL: set[str] = set()  # cache directories whose budget this process has already warned about


def is_local(url: str) -> bool:
    from fsspec.core import split_protocol

    return split_protocol(url)[0] in (None, "file", "local")


@dataclass
class ShardCache:
    directory: str
    max_bytes: int
    section: str = "data"  # where the settings live in the stage's config, for messages: data.shard_cache_dir
    # What this process did (tests, benchmarks): shards downloaded and their bytes, cache hits.
    fetched: int = field(default=0, compare=False)
    fetched_bytes: int = field(default=0, compare=False)
    hits: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"shard cache: max_bytes must be > 0, got {self.max_bytes}")
        try:
            Path(self.directory, "locks").mkdir(parents=True, exist_ok=True)
        except OSError as error:  # raised on a training node: say which setting names the directory
            raise OSError(f"shard cache ({self.section}.shard_cache_dir): cannot create {self.directory} on this node: "
                          f"{error.strerror or error}") from error
        # A budget beyond what the disk can hold would end in failed downloads (counted as unreadable shards) once
        # the disk fills: keep it within 90 % of what the cache could grow to here.
        cached = sum(entry.stat().st_size for entry in os.scandir(self.directory) if entry.is_file())
        free = shutil.disk_usage(self.directory).free
        room = int(0.9 * (free + cached))
        if self.max_bytes > room:
            if self.directory not in _WARNED_FULL:  # once a process, not at every shard a task opens
                _WARNED_FULL.add(self.directory)
                log.warning("shard cache: %s.shard_cache_gb (%.1f GB) is more than %s can hold (%.1f GB free, %.1f "
                            "cached); using %.1f GB", self.section, self.max_bytes / 2**30, self.directory,
                            free / 2**30, cached / 2**30, room / 2**30)  # fmt: skip
            self.max_bytes = max(room, 1)

    @classmethod
    def from_setting(cls, setting: Sequence[Any] | None, section: str = "data") -> ShardCache | None:
        """The node's cache a stage's setting describes — (directory, bytes), as the driver hands it to the workers
        (`pretrain.shard_cache_setting`, `capfilt.cache_setting`) — or None when off. Built on the node that uses
        it: the directory is created there and the budget capped against that node's disk."""
        if not setting:
            return None
        return cls(os.path.expanduser(str(setting[0])), int(setting[1]), section=section)

    def path_of(self, url: str) -> Path:
        digest = hashlib.sha1(url.encode()).hexdigest()[:16]
        return Path(self.directory, f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}")

    def open(self, url: str, size: int | None = None) -> IO[bytes]:
        """A readable file with the shard's bytes: the node's cached copy, downloaded first if no process has."""
        if is_local(url):
            import fsspec

            return fsspec.open(url, "rb").open()
        path = self.path_of(url)
        handle = self._open_cached(path, size)
        if handle is None:
            with self._locked(path):
                handle = self._open_cached(path, size)  # another process may have fetched it while we waited
                if handle is None:
                    self.evict(incoming=size or 0)  # room first: the disk holds at most the budget, downloads included
                    handle = self._fetch(url, path, size)
        self.evict(keep=path)
        return handle

    @contextlib.contextmanager
    def open_streaming(self, url: str, size: int | None = None) -> Iterator[IO[bytes]]:
        """The shard for one front-to-back read that starts while it downloads (CapFilt's decode task): a
        background thread downloads it into the cache as `open` would, and the reader follows the file as it
        grows, so decoding overlaps the download instead of waiting for all of it (the task holds a CPU either
        way). The copy is kept (renamed complete, size checked) once the block ends and the download is done;
        if the block raises, the download is abandoned and nothing is kept. A cached copy is opened as `open`
        does. The shard's lock is held while it downloads: another process opening it waits for the copy."""
        if is_local(url):
            import fsspec

            with fsspec.open(url, "rb") as handle:
                yield handle
            return
        path = self.path_of(url)
        handle = self._open_cached(path, size)
        if handle is None:
            with self._locked(path):
                handle = self._open_cached(path, size)
                if handle is None:
                    self.evict(incoming=size or 0)
                    partial = path.with_name(path.name + ".partial")
                    partial.unlink(missing_ok=True)  # a dead process's: the follower must not read its bytes
                    download = _Download(url, partial, size)
                    try:
                        with io.BufferedReader(_Following(partial, download), 1 << 20) as following:
                            yield following
                        written = download.result()
                        os.replace(partial, path)
                    except BaseException:
                        download.abandon()
                        partial.unlink(missing_ok=True)
                        raise
                    self.fetched += 1
                    self.fetched_bytes += written
                    self.evict(keep=path)
                    return
        self.evict(keep=path)
        with handle:
            yield handle

    def discard(self, url: str) -> None:
        """Remove the node's copy of `url` (a process that has it open keeps reading it); under the shard's lock,
        so that a download of it in progress completes first."""
        if is_local(url):
            return
        path = self.path_of(url)
        with self._locked(path):
            path.unlink(missing_ok=True)

    def _open_cached(self, path: Path, size: int | None) -> IO[bytes] | None:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        if size is not None and os.fstat(handle.fileno()).st_size != size:
            handle.close()  # a copy from before a crash that lost its tail: fetched again under the lock
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # most recently opened: evicted last
        self.hits += 1
        return handle

    def _fetch(self, url: str, path: Path, size: int | None) -> IO[bytes]:
        """Download the shard into `path`; returns it open (opened before the rename, so that another process's
        eviction cannot remove it before this one reads it)."""
        partial, handle = path.with_name(path.name + ".partial"), None
        try:
            _get_whole(url, partial)
            handle = open(partial, "rb")
            written = os.fstat(handle.fileno()).st_size
            _check_size(url, written, size)
            os.replace(partial, path)
        except BaseException:
            if handle is not None:
                handle.close()
            partial.unlink(missing_ok=True)
            raise
        self.fetched += 1
        self.fetched_bytes += written
        return handle

    @contextlib.contextmanager
    def _locked(self, path: Path, blocking: bool = True) -> Iterator[bool]:
        """The shard's lock (one empty lock file a shard, never removed: removing it would let two processes
        hold "the" lock on two files). Yields whether it was taken (always, when blocking)."""
        with open(Path(self.directory, "locks", path.name + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def evict(self, keep: Path | None = None, incoming: int = 0) -> list[str]:
        """Remove the least recently opened shards until the cache holds at most `max_bytes` — counting the
        downloads in progress as they are now and `incoming` bytes about to be downloaded — and the downloads a
        killed process left; returns the removed names."""
        complete, removed, total = [], [], incoming
        for entry in os.scandir(self.directory):
            if not entry.is_file():
                continue
            if entry.name.endswith(".partial"):
                shard = Path(entry.path[: -len(".partial")])
                with self._locked(shard, blocking=False) as taken:
                    if taken:  # nobody is downloading it: its writer died
                        Path(entry.path).unlink(missing_ok=True)
                        removed.append(entry.name)
                    else:  # another process's download: not removable, but on the disk
                        with contextlib.suppress(FileNotFoundError):
                            total += entry.stat().st_size
                continue
            with contextlib.suppress(FileNotFoundError):  # another process may be evicting too
                stat = entry.stat()
                complete.append((stat.st_mtime, entry.path, stat.st_size))
                total += stat.st_size
        for _, name, size in sorted(complete):
            if total <= self.max_bytes:
                break
            if keep is not None and os.path.basename(name) == keep.name:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
                removed.append(Path(name).name)
            total -= size
        return removed


def _get_whole(url: str, partial: Path, callback: Any = None) -> None:
    """The object at `url` into the file `partial`: one streamed GET of all of it (a store's get_file). Reading it
    through an opened file would fetch in read-ahead blocks, some of them twice (fsspec's HTTP cache re-fetched
    ~40 % more, measured). `callback`: fsspec's, told the size and each chunk written."""
    import fsspec

    filesystem, remote_path = fsspec.core.url_to_fs(url)
    filesystem.get_file(remote_path, str(partial), **({"callback": callback} if callback is not None else {}))


def _check_size(url: str, got: int, size: int | None) -> None:
    """Refuse a download of another size than the manifest's (None: not known)."""
    if size is not None and got != size:
        raise OSError(f"shard cache: {url} gave {got} bytes, its manifest says {size}")


class _Download:
    """One shard's download into `partial` in a background thread (the store's streamed GET, as `_fetch`), with
    events a reader of the growing file waits on. A size other than the manifest's is refused as soon as the store
    announces it (and checked again at the end); `abandon` stops it at its next chunk."""

    def __init__(self, url: str, partial: Path, size: int | None) -> None:
        self.url, self.partial, self.size = url, partial, size
        self.progress = threading.Event()  # set after each chunk written, and at the end
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="shard-download")
        self._thread.start()

    def _run(self) -> None:
        from fsspec.callbacks import Callback

        download = self

        class Progress(Callback):  # called by get_file when the store announces the size, and after each chunk
            def call(self, hook_name: str | None = None, **kwargs: Any) -> None:
                if download._abandoned:
                    raise _Abandoned(download.url)
                if self.size is not None:
                    _check_size(download.url, self.size, download.size)
                download.progress.set()

        try:
            _get_whole(self.url, self.partial, Progress())
        except BaseException as error:  # noqa: BLE001 - handed to the reader and to result()
            self.error = error
        finally:
            self.finished.set()
            self.progress.set()

    def result(self) -> int:
        """Wait for the end of the download; its size, checked against the manifest's. Raises its error."""
        self.finished.wait()
        if self.error is not None:
            raise self.error
        written = os.path.getsize(self.partial)
        _check_size(self.url, written, self.size)
        return written

    def abandon(self) -> None:
        self._abandoned = True
        self._thread.join()


class _Abandoned(Exception):
    """Raised inside an abandoned download to stop it."""


class _Following(io.RawIOBase):
    """Reads a file that `download` is still writing: a read returns the bytes asked for, waiting for them,
    fewer only at the end of the complete file; a failed download raises its error."""

    def __init__(self, partial: Path, download: _Download) -> None:
        self._partial, self._download = partial, download
        self._file: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            done = self._download.finished.is_set()  # before the read: once done, every byte is in the file
            self._download.progress.clear()
            count = self._read(view[got:])
            got += count
            if count:
                continue
            if done:
                if self._download.error is not None:
                    raise self._download.error
                break
            self._download.progress.wait(0.5)
        return got

    def _read(self, view: memoryview) -> int:
        if self._file is None:
            try:
                self._file = open(self._partial, "rb", buffering=0)
            except FileNotFoundError:  # the download has not created it yet
                return 0
        return self._file.readinto(view) or 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


STAGING_PREFIX = "model-files-"
MODEL_FILES = ("config.json", "model.safetensors")  # a save_pretrained directory (blip_models.checkpoints)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


@contextlib.contextmanager
def local_copies(urls: dict[str, str], cache: ShardCache | None) -> Iterator[Path]:
    """A temporary directory holding each of `urls` under its name, removed on exit: hard links to the node's cached
    copies when there is a cache (one download a node, whatever the number of processes; inside the cache's
    directory, so an eviction meanwhile cannot take them away), otherwise this process's own downloads."""
    import tempfile

    import fsspec

    if cache is not None:
        _remove_stale_staging(Path(cache.directory))
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=cache.directory if cache is not None else None))
    try:
        for name, url in urls.items():
            if cache is None:
                with fsspec.open(url, "rb") as remote, open(staging / name, "wb") as local:
                    shutil.copyfileobj(remote, local, 16 << 20)
                continue
            with cache.open(url) as cached:
                try:
                    os.link(cache.path_of(url), staging / name)
                except FileNotFoundError:  # evicted since it was opened: the open file still reads
                    with open(staging / name, "wb") as local:
                        shutil.copyfileobj(cached, local, 16 << 20)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def local_model_source(source: str, cache: ShardCache | None) -> Iterator[str]:
    """A model source (a save_pretrained directory, a weights file) as a path on this node while the block runs.

    Local paths, and http(s) checkpoints (`read_official` downloads those into torch's hub cache), as they are. A
    model version in a remote registry (its directory's URL) or a weights file in a bucket is copied here: the
    training workers on other nodes cannot read the driver's disk."""
    from fsspec.core import split_protocol

    protocol = split_protocol(source)[0]
    if is_local(source) or (protocol in ("http", "https") and source.endswith(WEIGHT_SUFFIXES)):
        yield source
        return
    base = source.rstrip("/")
    if base.endswith(WEIGHT_SUFFIXES):
        with local_copies({base.rsplit("/", 1)[-1]: base}, cache) as directory:
            yield str(directory / base.rsplit("/", 1)[-1])
        return
    with local_copies({name: f"{base}/{name}" for name in MODEL_FILES}, cache) as directory:
        yield str(directory)


def _remove_stale_staging(directory: Path, older_than_s: float = 3600.0) -> None:
    """Staging dirs a process killed mid-load left in the cache's directory (a load takes seconds): their hard
    links would keep a model's bytes on the disk, unseen by the cache's budget."""
    import time

    for entry in directory.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if time.time() - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
