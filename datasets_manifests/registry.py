"""The registry: versions of datasets, models and evaluations on any fsspec URL.

Layout under the registry root (local directory by default, `s3://`, `gs://`, `memory://` by URL):

    <root>/<kind>s/<name>/<version>/manifest.json     # written last: its presence *is* the commit
    <root>/<kind>s/<name>/<version>/<files...>
    <root>/.work/<cache_key>/                          # local working dirs of running stages (resumable)
    <root>/.removed/<kind>s/<name>/<version>.json      # what `blip data rm` removed (datasets_manifests.removal)
    <root>/.tags/<kind>s/<name>/<tag>.json              # a tag: the version it names now, and before (tags.py)

Publishing is atomic: files are staged and their checksums verified, and the manifest is written last (on a
local disk the whole version directory is renamed into place in one step). Versions are immutable:
publishing different content under an existing name@version raises `VersionExistsError`.
References: `name@v3`, `name@latest`, `name` (= latest), `name@<tag>` (`blip data tag`), `name@<content-id prefix>`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, NoReturn, TypeVar

from datasets_manifests.filesystems import sha256_file, url_to_fs
from datasets_manifests.manifest import KINDS, FileEntry, Manifest, Producer

log = logging.getLogger(__name__)
DEFAULT_REGISTRY = "./artifacts/registry"
MANIFEST_NAME = "manifest.json"
# A store publish creates this file in its version folder only if absent before it uploads (the store's exclusive
# create: S3's If-None-Match, GCS's generation 0): two runs publishing one name at once never share a folder.
CLAIM_NAME = ".publishing.json"
_CLAIM_ATTEMPTS = 1000  # version numbers tried past those other publishes hold before giving up
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_VERSION_RE = re.compile(r"^v(\d+)$")
_VERSION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TAKEDOWN_STAGE = "takedown"  # `blip data takedown`'s versions: the same data without some samples (find_cached)
TAKEDOWN_REASON = "takedown"  # the drop reason of a sample a takedown took out (its image is shown nowhere)
REMOVED_DIR = ".removed"  # a removed version's record: its name is never given again, and asking for it says why
TAGS_DIR = ".tags"  # movable names of versions (`name@prod`): the only mutable records of a registry
REMOTE_THREADS = 16  # object-store requests in flight while publishing: each one waits on the network
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message names the version or file."""


class VersionExistsError(RegistryError):
    pass


class NotFoundError(RegistryError):
    pass


class WorkInProgressError(RegistryError):
    """A stage run on the same inputs with the same config is running in another process: on this machine (its
    lock), or, with a remote registry, on another one whose note in the store still beats."""


class _VersionTaken(Exception):
    """The version number this publish chose was committed or claimed by another publish meanwhile."""


class DataRemovedError(NotFoundError):
    """A file of a version whose data files `blip data rm --data-only` removed (its record and index stay)."""


class OutsideRegistryError(RegistryError):
    """A local path that resolves (through symlinks) outside the registry root: never read."""


def default_registry_url() -> str:
    return os.environ.get("BLIP_REGISTRY") or DEFAULT_REGISTRY


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def code_version() -> str:
    """git describe of this checkout, or the package version outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "blip-bootstrap " + version("blip-bootstrap")
    except PackageNotFoundError:
        return "unknown"


def first_few(problems: list[str], shown: int = 3) -> str:
    """`a; b; c; and N more`: the first problems of a long list (`Registry.absent`'s), for one error line."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def parse_ref(ref: str) -> tuple[str, str]:
    """'name@selector' -> (name, selector); a bare name means latest."""
    name, _, selector = ref.partition("@")
    return name, selector or "latest"


WORK_NOTE = "run.json"  # in a stage run's work dir: what the run is (`Registry.note_work`)
# Stage runs this process holds (`Registry._work_lock`, flock'ed until the publish or the process's end, whichever
# comes first: a killed run holds nothing).
_HELD_WORK: dict[str, IO[Any]] = {}
# A run that shares its note in a store (`note_work(shared=True)` on a remote registry) rewrites the note's
# `alive_at` this often while it runs: a driver on another machine starting the same run is refused while the note
# is younger than WORK_STALE_S, and takes over the work of one that stopped (no beat for that long).
WORK_ALIVE_S = 60.0
WORK_STALE_S = 180.0
# A run taking over another run's note (it stopped) reads it back this long after writing its own: of two machines
# that found the same stopped note and wrote theirs, the later write goes on and the other is refused.
WORK_TAKEOVER_SETTLE_S = 3.0
REMOTE_LISTINGS_TTL_S = 10.0  # how long a remote registry's listing (of versions, tags, removals) is taken as it is
_HEARTBEATS: dict[str, tuple[threading.Event, threading.Thread]] = {}  # store note URL -> its beat


@dataclass(frozen=True)
class WorkArea:
    """A stage run's work left in a registry's work dirs (`Registry.work_areas`)."""

    key: str  # the run's cache key (or the name of a shared folder: train-runs, a fetched copy)
    places: tuple[str, ...]  # its local folder and / or its prefix in a remote registry's store
    bytes: int
    files: int
    modified: float | None  # the latest file's modification time (POSIX seconds), where known
    note: dict[str, Any] | None  # what the run is: stage, name, parents, started_at, host (Registry.note_work)
    published: str | None  # the version a run of this key published: the work is a leftover


def listed_mtime(info: dict[str, Any]) -> float | None:
    """A file's modification time from an fsspec listing (its key differs between stores)."""
    for field in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def listed_totals(infos: Iterable[dict[str, Any]]) -> tuple[int, int, float | None]:
    """(bytes, files, latest modification) of the files of an fsspec listing (`find(detail=True)`'s values)."""
    infos = list(infos)
    times = [t for t in map(listed_mtime, infos) if t is not None]
    return sum(int(info.get("size") or 0) for info in infos), len(infos), max(times, default=None)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise RegistryError(f"invalid name {name!r}: use lowercase letters, digits, '.', '_' and '-'")
    return name


class Registry:
    """Versions on an fsspec URL. Cheap to construct; reads manifests lazily.

    `create=False` is for readers (the browser): a local root that does not exist is an error, not a new
    empty directory made by a typo.
    """

    def __init__(self, url: str | os.PathLike[str] | None = None, *, create: bool = True) -> None:
        self.url = str(url) if url is not None else default_registry_url()
        self.fs, self.root = url_to_fs(self.url)  # a missing s3fs/gcsfs is one line with the install hint
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        self.is_local = "file" in protocols or "local" in protocols
        self.root = self.root.rstrip("/") or "/"
        dircache = getattr(self.fs, "dircache", None)
        if not self.is_local and dircache is not None and dircache.listings_expiry_time is None:
            # s3fs / gcsfs keep a listing forever by default, in one filesystem object per bucket and process: a
            # long-running process (the browser, a flow worker) never saw the versions, tags and removals others
            # made (`@latest` stayed old). A command's repeated listings still come from the cache.
            dircache.listings_expiry_time = REMOTE_LISTINGS_TTL_S
        # id -> (record, removed paths) of versions whose data files were removed, read once per version (`path_of`)
        self._removed_files: dict[str, tuple[dict[str, Any], frozenset[str]] | None] = {}
        if self.is_local:
            self.root = str(Path(self.root).resolve())
            if create:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            elif not Path(self.root).is_dir():
                raise NotFoundError(f"no registry at {self.root}: the directory does not exist")

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    # ------------------------------------------------------------------ paths
    def version_path(self, kind: str, name: str, version: str) -> str:
        """Filesystem path (in `self.fs`) of a version directory."""
        if kind not in KINDS:
            raise RegistryError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        return f"{self.root}/{kind}s/{name}/{version}"

    def path_of(self, manifest: Manifest, relpath: str) -> str:
        """Path (in `self.fs`) of a file the manifest references; refuses anything else, and (locally) any
        file that a symlink in the version takes outside the registry."""
        entry_paths = {entry.path for entry in manifest.files}
        if relpath not in entry_paths and relpath != MANIFEST_NAME:
            raise NotFoundError(f"{manifest.ref} does not reference {relpath!r}")
        path = f"{self.version_path(manifest.kind, manifest.name, manifest.version)}/{relpath}"
        self.check_inside(path, f"{manifest.ref}/{relpath}")
        if relpath != MANIFEST_NAME:
            if manifest.id not in self._removed_files:  # one read a version: a stage reads thousands of shards
                self.removal(manifest)
            removed = self._removed_files[manifest.id]
            if removed is not None and relpath in removed[1]:
                raise DataRemovedError(f"{manifest.ref}: {relpath} was removed on {removed[0].get('removed_at', '?')} "
                                       "(`blip data rm --data-only`); to read its data, make it again under another "
                                       "name (a stage's rerun reuses the record)")  # fmt: skip
        return path

    def check_inside(self, path: str, what: str) -> None:
        """Refuse a local path that resolves (symlinked file, version or name directory) outside the root."""
        if not self.is_local:
            return  # object stores have no symlinks
        real = os.path.realpath(path)
        if os.path.commonpath([self.root, real]) != self.root:
            raise OutsideRegistryError(f"refused: {what} resolves outside the registry ({self.root})")

    def absent(self, manifest: Manifest, entries: Iterable[FileEntry]) -> dict[str, str]:
        """The entries whose file is missing or not the manifest's size: {path: "path: what"} in the entries'
        order (empty: all there).

        One listing of the version (a walk of its directory locally; on an object store a few paginated
        requests, not one per file), so that a stage can refuse damaged inputs before it starts; `blip data
        verify` also checks the contents."""
        root = self.version_path(manifest.kind, manifest.name, manifest.version)
        try:
            found = {path: info.get("size") for path, info in self.fs.find(root, detail=True).items()}
        except FileNotFoundError:
            found = {}
        stripped = {self.fs._strip_protocol(path): size for path, size in found.items()}
        problems = {}
        for entry in entries:
            size = stripped.get(self.fs._strip_protocol(f"{root}/{entry.path}"))
            if size is None:
                problems[entry.path] = f"{entry.path}: missing"
            elif size != entry.bytes:
                problems[entry.path] = f"{entry.path}: {size} bytes, manifest says {entry.bytes}"
        removal = self.removal(manifest) if problems else None  # said as what it is: not damage, a removal
        if removal is not None:
            for path in set(problems) & set(removal.get("files", ())):
                problems[path] = f"{path}: removed by `blip data rm` on {removal.get('removed_at', '?')}"
            for path, digests in self.accepted_digests(manifest, removal).items():  # written again by a scrub
                size = stripped.get(self.fs._strip_protocol(f"{root}/{path}"))
                if path in problems and size in {scrubbed_size for _, scrubbed_size in digests}:
                    del problems[path]
                elif path in problems and size is not None:
                    problems[path] = f"{path}: {size} bytes, neither the manifest's nor what `blip data rm " \
                        "--data-only` wrote again after a takedown (its removal record)"  # fmt: skip
        return problems

    def accepted_digests(self, manifest: Manifest, removal: dict[str, Any] | None) -> dict[str, set[tuple[str, int]]]:
        """The files of a version that `blip data rm --data-only` wrote again after a takedown replaced it
        (`datasets_manifests.scrub`, told by its removal record) -> the (sha256, bytes) each may have: the scrub's,
        or also the manifest's and an earlier scrub's while the scrub is not done (it replaces one file after
        another)."""
        scrubbed = (removal or {}).get("scrubbed") or {}
        accepted, published = {}, {entry.path: entry for entry in manifest.files}
        for path, digest in scrubbed.get("files", {}).items():
            accepted[path] = {(digest["sha256"], digest["bytes"])}
            if not scrubbed.get("done") and (entry := published.get(path)) is not None:
                accepted[path].add((entry.sha256, entry.bytes))
                # a further scrub (after a further takedown) stopped half-way: a file may be as the one before
                accepted[path].update((d["sha256"], d["bytes"]) for d in scrubbed.get("before", {}).get(path, ()))
        return accepted

    def url_of(self, manifest: Manifest, relpath: str) -> str:
        """Full URL of a referenced file (local path for a local registry), usable by webdataset/pyarrow."""
        path = self.path_of(manifest, relpath)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def local_path(self, manifest: Manifest, relpath: str) -> Path:
        if not self.is_local:
            raise RegistryError(f"{self.url} is not a local registry; use open() or url_of()")
        return Path(self.path_of(manifest, relpath))

    def open(self, manifest: Manifest, relpath: str, mode: str = "rb") -> IO[Any]:
        if "w" in mode or "a" in mode:
            raise RegistryError("versions are immutable: the registry opens files read-only")
        return self.fs.open(self.path_of(manifest, relpath), mode)

    def read_range(self, manifest: Manifest, relpath: str, offset: int, size: int) -> bytes:
        """`size` bytes of a version's file from byte `offset` (fewer if the file ends first). On a store, one ranged
        request of exactly those bytes: an opened remote file fetches a read-ahead block of megabytes around them
        (s3fs: 50 MiB for a ~50 KB image)."""
        path = self.path_of(manifest, relpath)
        if self.is_local:
            with self.fs.open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read(size)
        return self.fs.cat_file(path, start=offset, end=offset + size)

    def fetch(self, manifest: Manifest, relpath: str, target: Path) -> Path:
        """A local copy of a version's file at `target`, kept for the next call: downloaded into a `.partial` file
        of this call and renamed when complete, so a process killed mid-download leaves nothing that is taken for
        the file (a cut-short model looked complete to the next run); a copy of another size than the manifest's
        is fetched again."""
        size = manifest.file(relpath).bytes
        if target.exists() and (size is None or target.stat().st_size == size):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Named for this call: two fetches of the same file (two evaluation workers of one machine) wrote one
        # `.partial`, each truncating the other's, and the first renamed a torn copy into place.
        partial = target.with_name(f"{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        try:
            with self.open(manifest, relpath) as remote, open(partial, "wb") as local:
                shutil.copyfileobj(remote, local, 16 << 20)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def work_base(self) -> Path:
        """The local folder of every stage run's `work_dir`: the registry's `.work` for a local registry (on the
        same disk, so publishing is a rename, not a copy), else $BLIP_WORK_DIR (default <tmp>/blip-work)."""
        if self.is_local:
            return Path(self.root) / ".work"
        return Path(os.environ.get("BLIP_WORK_DIR", Path(tempfile.gettempdir()) / "blip-work"))

    def work_dir(self, key: str) -> Path:
        """A local, deterministic working directory for a stage run (resumable across crashes)."""
        path = self.work_base() / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def note_work(self, key: str, *, stage: str, name: str, parents: Iterable[Manifest] = (),
                  shared: bool = False, **details: Any) -> Path:  # fmt: skip
        """A stage run's `work_dir`, with a note of what the run is (`WORK_NOTE`: stage, the version it publishes,
        its parents, when and where it last started, and `details`, e.g. the Ray Train run a training stage
        keeps its checkpoints in) for `blip data work`; with `shared`, a remote registry's
        `shared_work_url` gets the note too (what fills a bucket's `.work/` is named there), its `alive_at`
        rewritten every WORK_ALIVE_S until the publish: a driver on another machine is refused the same run while
        it beats (`alive_elsewhere`); a first note is created only if absent, so of two started at once one goes
        on. The publish removes the local note; `remove_work` removes both. Raises `WorkInProgressError` when
        another process runs the same."""
        work = self.work_dir(key)
        self._hold_work(key, stage, name)
        note = {"stage": stage, "name": name, "parents": [parent.ref for parent in parents], "started_at": now_utc(),
                "host": socket.gethostname(), "pid": os.getpid(), **details}  # fmt: skip
        shared = shared and not self.is_local
        held = self._work_note(key, store_only=True) if shared else None
        if held and self.alive_elsewhere(held):
            self._refuse_running_elsewhere(key, held, stage, name)
        (work / WORK_NOTE).write_text(json.dumps(note))
        if shared:
            url = self._store_note_url(key)
            note["alive_at"], note["claim"] = now_utc(), uuid.uuid4().hex
            created = held is None and self._create_only_if_absent(url, json.dumps(note).encode())
            if held is None and not created:  # another machine noted the same run since this one looked
                held = self._work_note(key, store_only=True)
                if held and self.alive_elsewhere(held):
                    self._refuse_running_elsewhere(key, held, stage, name)
            taken = not created and held is not None and not _noted_by_this_process(held)
            if taken:  # a stopped run's note (its work is this run's to go on from)
                self._take_over_note(key, url, note, stage, name)
            self._keep_alive(url, note, written=created or taken)
        return work

    def _take_over_note(self, key: str, url: str, note: dict[str, Any], stage: str, name: str) -> None:
        """Write this run's note over a stopped run's, then read it back after WORK_TAKEOVER_SETTLE_S: two
        machines that found the same stopped note would both overwrite it (a store's write cannot be made
        conditional on the file it replaces), so the one whose note is not there then is refused; the other, whose
        write came last, goes on. The beat starts after the check, or it would overwrite the other's note."""
        self.fs.pipe_file(url, json.dumps(note).encode())
        time.sleep(WORK_TAKEOVER_SETTLE_S)
        there = self._work_note(key, store_only=True)
        if there is not None and there.get("claim") != note["claim"]:
            self._refuse_running_elsewhere(key, there, stage, name)

    def _refuse_running_elsewhere(self, key: str, held: dict[str, Any], stage: str, name: str) -> NoReturn:
        self._release_work(key)
        raise WorkInProgressError(
            f"{stage} → {name} on these inputs with this config is running already on {held.get('host')} "
            f"(pid {held.get('pid', '?')}, started {held.get('started_at', '?')}, alive at "
            f"{held.get('alive_at')}): wait for it to publish, or stop it (its note is stale "
            f"{WORK_STALE_S:.0f} s after its last beat; a rerun then goes on from its work)"
        )  # fmt: skip

    def _create_only_if_absent(self, url: str, data: bytes) -> bool:
        """Write `url` only if no file is there (fsspec's exclusive create: S3's `If-None-Match`); False when
        one is. A store without an exclusive create is written anyway, with a warning (True)."""
        try:
            with self.fs.open(url, "xb") as handle:
                handle.write(data)
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError) as error:
            log.warning("%s cannot create a file only if absent (%s): two runs starting at the same time could "
                        "both write %s", self.root, error, url.rsplit("/", 1)[-1])  # fmt: skip
            self.fs.pipe_file(url, data)
        return True

    def _store_note_url(self, key: str) -> str:
        """Where a remote registry's store keeps a shared run's note (`note_work(shared=True)`)."""
        return f"{self.root}/.work/{key}/{WORK_NOTE}"

    def alive_elsewhere(self, note: dict[str, Any]) -> bool:
        """Whether a store note is another machine's run that beat within WORK_STALE_S (this machine's runs: the
        lock, `running_elsewhere`, says)."""
        if note.get("host") == socket.gethostname() or not note.get("alive_at"):
            return False
        try:
            beat = datetime.fromisoformat(str(note["alive_at"]).replace("Z", "+00:00"))
        except ValueError:
            return False
        return (datetime.now(timezone.utc) - beat).total_seconds() < WORK_STALE_S

    def _keep_alive(self, url: str, note: dict[str, Any], written: bool) -> None:
        """Write the store note now (unless it was just `written`) and again every WORK_ALIVE_S with its
        `alive_at`, until the run lets go of its work (`_release_work`) or its process ends."""
        _stop_beat(url)  # this process noted the run again (a retry): one beat, with the new note
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(WORK_ALIVE_S):
                note["alive_at"] = now_utc()
                with contextlib.suppress(OSError):  # a store hiccup: the next beat tries again
                    self.fs.pipe_file(url, json.dumps(note).encode())

        if not written:
            note["alive_at"] = now_utc()
            self.fs.pipe_file(url, json.dumps(note).encode())  # the first one before the run starts: errors surface
        thread = threading.Thread(target=beat, name="blip-work-alive", daemon=True)
        _HEARTBEATS[url] = (stop, thread)
        thread.start()

    def _hold_work(self, key: str, stage: str, name: str) -> None:
        """Take the run's lock (`_work_lock`), or say which process runs it: two processes on the
        same inputs would write one work dir (two img2dataset into one output folder, two Ray Train runs into one
        checkpoint folder). A process that holds it already (a retry in the same worker) keeps it."""
        path = self._work_lock(key)
        held = _HELD_WORK.get(str(path))
        if held is not None and not held.closed:
            return
        while True:
            handle = open(path, "a+")
            if not _locked(handle):
                handle.close()
                note = self._work_note(key) or {}
                who = f"pid {note.get('pid', '?')} on {note.get('host', '?')}, started {note.get('started_at', '?')}"
                raise WorkInProgressError(
                    f"{stage} → {name} on these inputs with this config is running already ({who}): wait for it to "
                    f"publish (running it again then reuses that version), or stop it; its work: "
                    f"{self.work_base() / key}"
                ) from None
            try:  # the holder before may have released and removed the file between our open and our lock
                same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                _HELD_WORK[str(path)] = handle
                return
            handle.close()

    def _work_lock(self, key: str) -> Path:
        """A run's lock file: beside the work dirs (`.work-locks` of a local registry, `blip-work-locks` beside
        $BLIP_WORK_DIR), not in them, whose listings say what runs left."""
        base = self.work_base()
        folder = base.with_name(f"{base.name}-locks")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}.lock"

    def running_elsewhere(self, key: str) -> bool:
        """Whether another process on this machine runs the stage run `key` now (holds its lock)."""
        path = self._work_lock(key)
        if str(path) in _HELD_WORK or not path.is_file():
            return False
        with open(path, "a+") as handle:
            return not _locked(handle)  # closing the file lets go of a lock it got

    def _release_work(self, key: str) -> None:
        if not self.is_local:
            _stop_beat(self._store_note_url(key))
        path = str(self._work_lock(key))
        handle = _HELD_WORK.pop(path, None)
        if handle is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a waiting process then sees another file and retries
            handle.close()

    def work_areas(self) -> list[WorkArea]:
        """Every stage run's work left here (this machine's work dirs, and a remote registry's `.work/` prefix in
        its store): what it holds, what it is (its note) and the version its key published, if any."""
        from fsspec.implementations.local import LocalFileSystem

        published = {m.producer.cache_key: m.ref for m in self.list() if m.producer.cache_key}
        listed: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # key -> (place, file info) of each file
        places: dict[str, list[str]] = {}
        base = self.work_base()
        for folder in sorted(base.iterdir()) if base.is_dir() else ():
            if folder.is_dir():
                places.setdefault(folder.name, []).append(str(folder))
                listed.setdefault(folder.name, []).extend(LocalFileSystem().find(str(folder), detail=True).values())
        prefix = f"{self.root}/.work"
        if not self.is_local and self.fs.exists(prefix):
            for path, info in self.fs.find(prefix, detail=True).items():  # one listing for every key
                key = path[len(prefix) + 1 :].split("/", 1)[0]
                place = self.fs.unstrip_protocol(f"{prefix}/{key}")
                if place not in places.setdefault(key, []):
                    places[key].append(place)
                listed.setdefault(key, []).append(info)
        areas = []
        for key in sorted(places):
            size, files, modified = listed_totals(listed.get(key, []))
            areas.append(WorkArea(key=key, places=tuple(places[key]), bytes=size, files=files, modified=modified,
                                  note=self._work_note(key), published=published.get(key)))  # fmt: skip
        return areas

    def uncommitted_publishes(self) -> list[tuple[str, str]]:
        """(label, path or URL) of each publish that stopped before its commit (or is writing now: they look the
        same): a local registry's `.staging/<name>-<id>` (hard links, mostly), a remote one's version folder without
        its manifest (copies, at 129M terabytes of shards; its claim, `claim_of`, names the run). A retry of the same
        run writes the same folder; another publish of the name takes the next number."""
        if self.is_local:
            staging = Path(self.root) / ".staging"
            folders = sorted(staging.iterdir()) if staging.is_dir() else []
            return [(f".staging/{folder.name}", str(folder)) for folder in folders if folder.is_dir()]
        found = []
        for kind in KINDS:
            for name in self.names(kind):
                for entry in self.fs.ls(f"{self.root}/{kind}s/{name}", detail=True):
                    folder = entry["name"].rstrip("/")
                    if entry.get("type") == "directory" and not self.fs.exists(f"{folder}/{MANIFEST_NAME}"):
                        found.append((f"{kind}s/{name}/{folder.rsplit('/', 1)[-1]}", self.fs.unstrip_protocol(folder)))
        return found

    def _work_note(self, key: str, store_only: bool = False) -> dict[str, Any] | None:
        local = self.work_base() / key / WORK_NOTE
        try:
            if local.is_file() and not store_only:
                return json.loads(local.read_text())
            if not self.is_local and self.fs.isfile(self._store_note_url(key)):
                return json.loads(self.fs.cat_file(self._store_note_url(key)))
        except (OSError, ValueError):  # a note half written by a killed run: the area is still listed
            return None
        return None

    def _drop_work_note(self, key: str) -> None:
        """A published run's local note, and its work dir if nothing else is left in it."""
        work = self.work_base() / key
        (work / WORK_NOTE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            work.rmdir()
        self._release_work(key)

    def shared_work_url(self, key: str) -> str:
        """Where workers on any node write a stage run's large outputs: the local work dir for a local registry
        (on the registry's own disk, which a multi-node cluster must mount everywhere), `<root>/.work/<key>`
        inside a remote one (never listed as a version). Publish them with `publish(remote_staging=...)`."""
        if self.is_local:
            return str(self.work_dir(key))
        return self.fs.unstrip_protocol(f"{self.root}/.work/{key}")

    def remove_work(self, key: str) -> list[str]:
        """Remove a stage run's `work_dir` and, for a remote registry, its `shared_work_url` prefix in the store
        (terabytes of staged shards at scale), once its version is published; returns those that held something."""
        stored = self._work_note(key, store_only=True) if not self.is_local else None
        if self.running_elsewhere(key) or (stored and self.alive_elsewhere(stored)):
            note = stored or self._work_note(key) or {}
            who = f"pid {note.get('pid', '?')} on {note.get('host', '?')}"
            raise WorkInProgressError(f"{self.work_base() / key} is the work of a run going on ({who}): stop it first")
        work, removed = self.work_dir(key), []
        if any(work.iterdir()):
            removed.append(str(work))
        shutil.rmtree(work, ignore_errors=True)
        if not self.is_local:
            prefix = f"{self.root}/.work/{key}"
            if self.fs.exists(prefix):
                self.fs.rm(prefix, recursive=True)
                removed.append(self.fs.unstrip_protocol(prefix))
        self._release_work(key)
        with contextlib.suppress(OSError):
            self._work_lock(key).unlink()  # a killed run's, held by no one
        return removed

    # ------------------------------------------------------------------ removed versions
    def removal_path(self, kind: str, name: str, version: str) -> str:
        return f"{self.root}/{REMOVED_DIR}/{kind}s/{name}/{version}.json"

    def removal(self, manifest: Manifest) -> dict[str, Any] | None:
        """The record `blip data rm` left for this version (`what`: "data" when only its data files were removed),
        or None."""
        record = self._removal_record(manifest.kind, manifest.name, manifest.version)
        self._removed_files[manifest.id] = None if record is None else (record, frozenset(record.get("files", ())))
        return record

    def _removal_record(self, kind: str, name: str, version: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.removal_path(kind, name, version)))
        except (FileNotFoundError, PermissionError):  # S3 answers 403 for a missing key without ListBucket rights
            return None

    def write_removal(self, manifest: Manifest, record: dict[str, Any]) -> None:
        """Record a removal (`datasets_manifests.removal`) before anything is deleted: whole or absent."""
        # a record cut short would hide why the version's files are gone
        self.write_record(self.removal_path(manifest.kind, manifest.name, manifest.version), record)
        self._removed_files[manifest.id] = (record, frozenset(record.get("files", ())))

    def write_record(self, path: str, record: dict[str, Any]) -> None:
        """A small JSON record (a removal, a tag), whole or absent: renamed into place locally, one put on a store."""
        data = json.dumps(record, indent=1).encode()
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            partial = Path(f"{path}.{uuid.uuid4().hex[:8]}.partial")
            partial.write_bytes(data)
            os.replace(partial, path)
        else:
            self.fs.pipe_file(path, data)  # an object store's put is whole or absent

    def removed_of(self, kind: str, name: str) -> list[str]:
        """The versions of a name that have a removal record (one listing; empty when none was removed)."""
        try:
            paths = self.fs.ls(f"{self.root}/{REMOVED_DIR}/{kind}s/{name}", detail=False)
        except FileNotFoundError:
            return []
        return [path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") for path in paths if path.endswith(".json")]

    def removed_versions(self) -> set[tuple[str, str, str]]:
        """(kind, name, version) of every removal record: one listing of the registry's `.removed/`."""
        return set(self.removal_stamps())

    def removal_stamps(self) -> dict[tuple[str, str, str], str]:
        """(kind, name, version) -> a stamp of its removal record (size and time as the listing gives them) that
        changes when the record is written again, as a scrub does (`datasets_manifests.scrub`): one listing."""
        base = f"{self.root}/{REMOVED_DIR}"
        try:
            listing = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        found = {}
        for path, info in listing.items():
            parts = self.fs._strip_protocol(path)[len(self.fs._strip_protocol(base)) + 1 :].split("/")
            if len(parts) == 3 and parts[0].endswith("s") and parts[2].endswith(".json"):
                when = next((info[k] for k in ("mtime", "LastModified", "updated", "created", "ETag") if k in info), "")
                found[(parts[0][:-1], parts[1], parts[2].removesuffix(".json"))] = f"{info.get('size')}/{when}"
        return found

    def tag_path(self, kind: str, name: str, tag: str) -> str:
        return f"{self.root}/{TAGS_DIR}/{kind}s/{name}/{tag}.json"

    def tag_record(self, kind: str, name: str, tag: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.tag_path(kind, name, tag)))
        except (FileNotFoundError, PermissionError):  # S3 answers 403 for a missing key without ListBucket rights
            return None

    def tags_of(self, kind: str, name: str) -> dict[str, dict[str, Any]]:
        """tag -> its record ({"version", "id", "tagged_at", "by", "history"}) of a name's tags (one listing)."""
        try:
            paths = self.fs.ls(f"{self.root}/{TAGS_DIR}/{kind}s/{name}", detail=False)
        except FileNotFoundError:
            return {}
        tags = {}
        for path in sorted(p for p in paths if p.endswith(".json")):
            with contextlib.suppress(FileNotFoundError):  # moved away between the listing and the read
                tags[path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")] = json.loads(self.fs.cat_file(path))
        return tags

    # ------------------------------------------------------------------ reading
    def names(self, kind: str) -> list[str]:
        base = f"{self.root}/{kind}s"
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    def versions(self, kind: str, name: str) -> list[Manifest]:
        """Published versions of one name, oldest first (only those whose manifest exists)."""
        base = f"{self.root}/{kind}s/{name}"
        if not self.fs.exists(base):
            return []
        paths = []
        for entry in self.fs.ls(base, detail=True):
            if entry.get("type") == "file":  # a stray file beside the versions (a symlink is checked below)
                continue
            manifest_path = f"{entry['name'].rstrip('/')}/{MANIFEST_NAME}"
            try:
                self.check_inside(manifest_path, manifest_path)
            except OutsideRegistryError as error:  # one bad symlink must not hide the other versions
                log.warning("%s; skipped", error)
                continue
            paths.append(manifest_path)

        def read(manifest_path: str) -> Manifest | None:
            try:
                return self._read_manifest(manifest_path)
            except (FileNotFoundError, NotADirectoryError):  # a version being published (invisible until its
                return None  # manifest is written), or a symlink to a file

        # On an object store each read waits on the network (and `resolve` reads every version of a name).
        found = in_threads(read, paths, 1 if self.is_local else REMOTE_THREADS)
        return sorted((manifest for manifest in found if manifest is not None), key=_version_sort_key)

    def list(self, kind: str | None = None) -> list[Manifest]:
        """Every version (of one kind), by kind and name, each name's oldest first."""
        pairs = [(k, name) for k in ([kind] if kind else list(KINDS)) for name in self.names(k)]
        # On an object store the names are read several at a time (the browser's list, `by_id`, `children`).
        found = in_threads(lambda pair: self.versions(*pair), pairs, 1 if self.is_local else REMOTE_THREADS)
        return [manifest for versions in found for manifest in versions]

    def resolve(self, ref: str | Manifest, kind: str | None = None) -> Manifest:
        """Find the manifest of 'name@version', 'name@latest', 'name' or 'name@<id prefix>'."""
        if isinstance(ref, Manifest):
            return ref
        name, selector = parse_ref(ref)
        check_name(name)
        kinds = [kind] if kind else list(KINDS)
        candidates = [m for k in kinds for m in self.versions(k, name)]
        if len({m.kind for m in candidates}) > 1:
            found = ", ".join(sorted({m.kind for m in candidates}))
            raise NotFoundError(f"{name!r} names versions of several kinds ({found}); pass the kind")
        if not candidates:
            self._raise_if_removed(kinds, name, None if selector == "latest" else selector)
            known = ", ".join(n for k in kinds for n in self.names(k)) or "none"
            raise NotFoundError(f"no version of {name!r} in {self.url} (known names: {known})")
        if selector == "latest":
            return candidates[-1]
        exact = [m for m in candidates if m.version == selector]
        if exact:
            return exact[0]
        if not reads_as_version_or_id(selector):  # a tag
            record = self.tag_record(candidates[0].kind, name, selector) or {}
            tagged = [m for m in candidates if m.id == record.get("id")]
            if tagged:
                return tagged[0]
        # An id prefix must be hex and long enough not to match by accident ("v1" is never an id).
        is_prefix = len(selector) >= 4 and _is_hex(selector)
        by_id = [m for m in candidates if is_prefix and m.id.startswith(selector.lower())]
        if len(by_id) == 1:
            return by_id[0]
        if len(by_id) > 1:
            raise NotFoundError(f"{ref!r} is ambiguous: {', '.join(m.ref for m in by_id)}")
        self._raise_if_removed(kinds, name, selector)
        versions = ", ".join(m.version for m in candidates)
        tags = ", ".join(self.tags_of(candidates[0].kind, name))
        raise NotFoundError(f"{ref!r} not found (versions of {name}: {versions}{f'; tags: {tags}' if tags else ''})")

    def _raise_if_removed(self, kinds: list[str], name: str, version: str | None) -> None:
        """A version asked for that `blip data rm` removed is said to be removed, and when (any of the name's
        versions when `version` is None)."""
        for kind in kinds:
            removed = self.removed_of(kind, name)
            looked_up = version if version is not None else next(iter(removed), None)
            record = self._removal_record(kind, name, looked_up) if looked_up in removed else None
            if record is not None and record.get("what") == "all":
                shown = f"{name}@{version}" if version is not None else f"every version of {name!r}"
                raise NotFoundError(f"{shown} was removed from {self.url} on {record.get('removed_at', '?')} "
                                    f"(`blip data rm`, on {record.get('host', '?')})")  # fmt: skip

    def by_id(self, manifest_id: str) -> Manifest | None:
        """The version with this exact content id, if this registry holds it."""
        for manifest in self.list():
            if manifest.id == manifest_id:
                return manifest
        return None

    def find_cached(self, kind: str, name: str, key: str, follow_takedowns: bool = True) -> Manifest | None:
        """The version of `name` produced by a run with this cache key, if one was published; with
        `follow_takedowns`, the last version samples were taken out of it into (`blip data takedown`), so that a
        rerun goes on from the data as it is now (what was made from the old version is made again)."""
        versions = self.versions(kind, name)
        for manifest in reversed(versions):
            # Also a version whose data files `blip data rm --data-only` removed: what was made from it stays cached
            # (a flow rerun after freeing a download whose shards exist downloads nothing); a stage that has to
            # read its data refuses, naming the removal (`path_of`).
            if manifest.producer.cache_key == key:
                return (follow_takedowns and self.replaced_by(manifest, versions)) or manifest
        return None

    def replaced_by(self, manifest: Manifest, versions: list[Manifest] | None = None) -> Manifest | None:
        """The last version of the line of takedowns from `manifest` (each made from the one before by `blip data
        takedown`), or None when no takedown replaced it. `versions`: its name's versions, when already listed."""
        versions = self.versions(manifest.kind, manifest.name) if versions is None else versions
        newest = None
        while (successor := next((m for m in versions if m.producer.stage == TAKEDOWN_STAGE
                                  and m.parent_ids == ((newest or manifest).id,)), None)) is not None:  # fmt: skip
            newest = successor
        return newest

    def children(self, manifest: Manifest) -> list[Manifest]:
        """Versions that name `manifest` as a parent (datasets made from it, models trained on it)."""
        return [m for m in self.list() if manifest.id in m.parent_ids]

    def next_version(self, kind: str, name: str) -> str:
        taken = [m.version for m in self.versions(kind, name)] + self.removed_of(kind, name)
        numbers = [int(match.group(1)) for version in taken if (match := _VERSION_RE.match(version))]
        return f"v{max(numbers, default=0) + 1}"  # a removed version's name is never given again

    # ------------------------------------------------------------------ writing
    def publish(
        self,
        *,
        kind: str,
        name: str,
        staging_dir: str | Path,
        files: Iterable[FileEntry | dict[str, Any]],
        producer: Producer,
        parents: Iterable[Manifest] = (),
        version: str | None = None,
        move: bool = True,
        digests_from_writer: bool = False,
        remote_staging: str | None = None,
        **fields: Any,
    ) -> Manifest:
        """Publish the files of a local `staging_dir` as a new immutable version.

        `files` lists what to publish (paths relative to `staging_dir`; sha256/bytes are computed here when
        missing). `fields` are the other Manifest fields (counts, drop_reasons, stats, splits, ...).
        On a local registry `move=True` hard-links the staged files into place (no copy) and removes them from
        `staging_dir` after the commit; `move=False` copies them and leaves `staging_dir` alone.
        `digests_from_writer=True`: entries that carry sha256 and bytes got them from the process that wrote or
        read the file whole, hashing its bytes as they passed (CapFilt's writer tasks, the download's indexer);
        they are checked by size here, not read again, which would pass every byte of a large dataset through this
        one process. `blip data verify REF` recomputes every digest of a published version.
        `remote_staging` (a remote registry's `shared_work_url`): files missing from `staging_dir` are taken from
        there, copied inside the store (s3/gcs: server-side), never through this machine; their entries must
        carry the sha256 and bytes their writer recorded, and the copies are checked by size.
        """
        check_name(name)
        if version is not None and not _VERSION_NAME_RE.match(version):
            raise RegistryError(f"invalid version {version!r}: use letters, digits, '.', '_' and '-' (e.g. v3)")
        staging = Path(staging_dir)
        parents = list(parents)
        if remote_staging is not None and self.is_local:
            raise RegistryError("remote_staging is for remote registries: a local one stages on its own disk")
        remote = self.fs._strip_protocol(remote_staging).rstrip("/") if remote_staging else None
        # Each entry is a stat or two on an object store (or a hash of a file without its writer's digest):
        # thousands of shards at 129M, so they are taken in threads.
        from tqdm import tqdm

        files = list(files)
        entries = []
        with tqdm(total=len(files), unit="file", desc=f"checking {name}'s files",
                  disable=None if len(files) >= 1000 else True) as bar:  # hashing 123k COCO images: a minute or two
            for entry in in_threads(lambda item: self._entry(staging, item, digests_from_writer, remote), files,
                                    REMOTE_THREADS if not self.is_local else (os.cpu_count() or 1)):  # fmt: skip
                entries.append(entry)
                bar.update(1)
        paths = [entry.path for entry in entries]
        if len(set(paths)) != len(paths):
            raise RegistryError(f"{name}: duplicate file paths in publish list")
        producer = replace(
            producer,
            code_version=producer.code_version or code_version(),
            finished_at=now_utc(),
            host=producer.host or socket.gethostname(),
        )
        # Two runs may publish the same name at once (two flows, two CapFilt configs into one dataset name): a
        # number chosen here can be committed, or claimed on a store, by the other before this one commits. A
        # number this publish chose moves on to the next free one; one asked for by name is never moved.
        chosen = version or self.next_version(kind, name)
        for _ in range(_CLAIM_ATTEMPTS):
            manifest = Manifest(
                kind=kind, name=name, version=chosen, producer=producer, files=tuple(entries),
                parents=tuple(p.ref for p in parents), parent_ids=tuple(p.id for p in parents), **fields,
            )  # fmt: skip
            target = self.version_path(kind, name, manifest.version)
            try:
                existing = self._committed_or_none(manifest, target, named=version is not None)
                if existing is not None:
                    return existing
                if self.is_local:
                    self._publish_local(manifest, staging, target, move)
                else:
                    self._publish_remote(manifest, staging, target, remote)
                break
            except _VersionTaken as taken:
                if version is not None:
                    raise VersionExistsError(f"{manifest.ref} {taken}: publish under another version") from None
                chosen = self._version_after(kind, name, chosen)
        else:
            raise RegistryError(f"{name}: no free version number up to {chosen}: other publishes hold them all")
        if producer.cache_key:
            self._drop_work_note(producer.cache_key)
        return manifest

    def _committed_or_none(self, manifest: Manifest, target: str, named: bool) -> Manifest | None:
        """The version committed as `manifest` already (the same publish run again), or None when its number is
        free; raises when the number was removed or holds other content (`_VersionTaken` for a number the publish
        chose itself: it moves on)."""
        if (self._removal_record(manifest.kind, manifest.name, manifest.version) or {}).get("what") == "all":
            if not named:
                raise _VersionTaken("was removed")
            raise VersionExistsError(f"{manifest.ref} was removed (`blip data rm`) and its name is not given again: "
                                     "publish under a new version")  # fmt: skip
        if not self.fs.exists(f"{target}/{MANIFEST_NAME}"):
            return None
        existing = self._read_manifest(f"{target}/{MANIFEST_NAME}")
        if existing.id == manifest.id and self.removal(existing) is None:
            return existing
        if existing.id == manifest.id:
            raise VersionExistsError(f"{manifest.ref} exists, but its data files were removed (`blip data rm`): "
                                     "publish under a new version")  # fmt: skip
        if not named:
            raise _VersionTaken("was published by another run meanwhile")
        raise VersionExistsError(
            f"{manifest.ref} already exists with different content (id {existing.short_id} != {manifest.short_id});"
            " versions are immutable: publish under a new version"
        )

    def _version_after(self, kind: str, name: str, taken: str) -> str:
        """The next number to try after `taken`: past it, and past every committed or removed one."""
        match = _VERSION_RE.match(taken)
        after = int(match.group(1)) + 1 if match else 1
        return f"v{max(after, int(self.next_version(kind, name)[1:]))}"

    def _entry(self, staging: Path, item: FileEntry | dict[str, Any], digests_from_writer: bool = False,
               remote: str | None = None) -> FileEntry:  # fmt: skip
        entry = item if isinstance(item, FileEntry) else None
        data = dict(item) if isinstance(item, dict) else {}
        relpath = entry.path if entry else data.get("path")
        if not isinstance(relpath, str) or not relpath:
            raise RegistryError(f"file entry without a 'path': {item!r}")
        if relpath.startswith("/") or ".." in Path(relpath).parts or relpath in (MANIFEST_NAME, CLAIM_NAME):
            raise RegistryError(f"invalid file path in a version: {relpath!r}")
        local = staging / relpath
        given = (entry.sha256, entry.bytes) if entry else (data.get("sha256"), data.get("bytes"))
        has_digest = bool(given[0]) and given[1] is not None
        in_store = not local.is_file() and remote is not None and self.fs.isfile(f"{remote}/{relpath}")
        if not local.is_file() and not in_store:
            raise RegistryError(f"staged file missing: {local}")
        if in_store and not has_digest:
            raise RegistryError(f"{relpath} is staged in the store: its entry needs the writer's sha256 and bytes")
        if in_store or (digests_from_writer and has_digest):  # a size check (a stat), not a second read
            digest, size = str(given[0]), self.fs.size(f"{remote}/{relpath}") if in_store else local.stat().st_size
            if size != given[1]:
                raise RegistryError(f"staged file {relpath} is {size} bytes; its writer recorded {given[1]}")
        else:
            digest, size = sha256_file(local)
        if entry is None:
            data.setdefault("sha256", digest)
            data.setdefault("bytes", size)
            try:
                entry = FileEntry(**data)
            except TypeError as error:
                raise RegistryError(f"file entry {relpath!r}: {error}") from error
        if entry.sha256 != digest or entry.bytes != size:
            raise RegistryError(f"staged file {relpath} changed: checksum or size differs from its entry")
        return entry

    def _publish_local(self, manifest: Manifest, staging: Path, target: str, move: bool) -> None:
        # Files are hard-linked (or copied) into a private staging dir; the staged originals are removed
        # only after the commit, so a crash at any point leaves the work dir intact for a retry.
        stage_root = Path(self.root) / ".staging" / f"{manifest.name}-{uuid.uuid4().hex[:8]}"
        stage_root.mkdir(parents=True)
        try:
            for entry in manifest.files:
                source, dest = staging / entry.path, stage_root / entry.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                linked = place_file(source, dest, link=move)
                if dest.stat().st_size != entry.bytes or (not linked and sha256_file(dest)[0] != entry.sha256):
                    raise RegistryError(f"{manifest.ref}: {entry.path} changed while publishing")
            (stage_root / MANIFEST_NAME).write_text(manifest.to_json())
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(stage_root, target)  # the commit: one atomic rename (fails onto a folder with files)
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise _VersionTaken("was published by another run meanwhile") from error
                raise RegistryError(f"{manifest.ref}: cannot create {target} ({error})") from error
        except BaseException:
            shutil.rmtree(stage_root, ignore_errors=True)
            raise
        if move:
            for entry in manifest.files:
                (staging / entry.path).unlink(missing_ok=True)
            self._remove_emptied_work_dirs({staging, *((staging / entry.path).parent for entry in manifest.files)})

    def _remove_emptied_work_dirs(self, folders: set[Path]) -> None:
        """The folders a move left empty, up to the stage's work dir, when they are inside this registry's
        `.work` (never a staging dir elsewhere): without this, every stage run left an empty work dir behind."""
        work_base = (Path(self.root) / ".work").resolve()
        for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):  # deepest first
            current = folder.resolve()
            while work_base in current.parents:
                try:
                    current.rmdir()
                except OSError:  # not empty (the stage still keeps something there), or already gone
                    break
                current = current.parent

    def _publish_remote(self, manifest: Manifest, staging: Path, target: str, remote_staging: str | None) -> None:
        # Object stores have no rename: upload everything, read each file back and check its sha256, then
        # write the manifest last. Until the manifest exists the version is invisible (versions() lists only
        # committed ones). The read-back doubles the traffic; a size check alone misses corrupted bytes.
        # Files staged in the store itself are copied there and checked by size (their writer hashed them).
        # Files go REMOTE_THREADS at a time: one after the other, the ~13k shards of ~600 MB of a 129M-sample
        # version, at several seconds a copy inside the store, would take most of a day (each waits on the store).
        from tqdm import tqdm

        def place(entry: FileEntry) -> None:
            remote = f"{target}/{entry.path}"
            if remote_staging is not None and not (staging / entry.path).is_file():
                self.fs.copy(f"{remote_staging}/{entry.path}", remote)
                if self.fs.size(remote) != entry.bytes:
                    raise RegistryError(f"{manifest.ref}: copy of {entry.path} is not {entry.bytes} bytes")
            else:
                self.fs.put_file(str(staging / entry.path), remote)
                digest, size = sha256_file(remote, self.fs)
                if size != entry.bytes or digest != entry.sha256:
                    raise RegistryError(
                        f"{manifest.ref}: upload of {entry.path} reads back as {size} bytes, sha256 {digest[:12]}; "
                        f"expected {entry.bytes} bytes, sha256 {entry.sha256[:12]}"
                    )

        self._claim(manifest, target)  # before the try: a folder another publish holds is never cleaned up here
        try:
            for folder in sorted({f"{target}/{entry.path}".rsplit("/", 1)[0] for entry in manifest.files}):
                self.fs.makedirs(folder, exist_ok=True)
            with tqdm(total=len(manifest.files), unit="file", desc=f"publishing {manifest.ref}",
                      disable=None if len(manifest.files) > 1 else True) as bar:  # fmt: skip
                for _ in in_threads(place, manifest.files, REMOTE_THREADS):
                    bar.update(1)
            with self.fs.open(f"{target}/{MANIFEST_NAME}", "w") as handle:
                handle.write(manifest.to_json())
        except BaseException:
            # Best effort: a crash that skips this leaves invisible files (and the claim) that a retry of the same
            # run overwrites; `blip data work` lists them.
            if not self.fs.exists(f"{target}/{MANIFEST_NAME}"):
                try:
                    self.fs.rm(target, recursive=True)
                except (OSError, FileNotFoundError):
                    pass
            raise
        with contextlib.suppress(OSError):
            self.fs.rm_file(f"{target}/{CLAIM_NAME}")  # the manifest holds the number now

    def _claim(self, manifest: Manifest, target: str) -> None:
        """Create the version folder's claim, only if absent (raises `_VersionTaken` when another publish holds
        it). A publish stopped before its commit leaves its claim: a retry of the same run (its cache key) takes it
        over and writes the same folder again; another run moves on to the next number."""
        path = f"{target}/{CLAIM_NAME}"
        claim = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now_utc(),
                 "cache_key": manifest.producer.cache_key, "stage": manifest.producer.stage}  # fmt: skip
        self.fs.makedirs(target, exist_ok=True)
        if not self._create_only_if_absent(path, json.dumps(claim).encode()):
            held = self.claim_of(target) or {}
            if not manifest.producer.cache_key or held.get("cache_key") != manifest.producer.cache_key:
                raise _VersionTaken(f"is being published by another run (since {held.get('started_at', '?')} on "
                                    f"{held.get('host', '?')}) or was left by one stopped before its commit")
            self.fs.pipe_file(path, json.dumps(claim).encode())  # this run's own stopped publish: taken over
        if self.fs.exists(f"{target}/{MANIFEST_NAME}"):  # committed (and its claim released) since our check
            self.fs.rm_file(path)
            raise _VersionTaken("was published by another run meanwhile")

    def claim_of(self, folder: str) -> dict[str, Any] | None:
        """The claim of a store's version folder being published (or left by a publish stopped before its
        commit): who started it, when, for which run; None when there is none or it cannot be read."""
        try:
            return json.loads(self.fs.cat_file(f"{folder.rstrip('/')}/{CLAIM_NAME}"))
        except (OSError, ValueError):
            return None

    def _read_manifest(self, path: str) -> Manifest:
        with self.fs.open(path, "r") as handle:
            text = handle.read()
        try:
            return Manifest.from_json(text)
        except (ValueError, TypeError, KeyError) as error:
            raise RegistryError(f"corrupt manifest {path}: {error}") from error


def _locked(handle: IO[Any]) -> bool:
    """Take an exclusive lock of an open file without waiting; False when another process holds one."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _noted_by_this_process(note: dict[str, Any]) -> bool:
    """Whether a store note is this process's own (a retry of a run it noted before)."""
    return note.get("host") == socket.gethostname() and note.get("pid") == os.getpid()


def _stop_beat(url: str) -> None:
    """Stop a run's beat (`Registry._keep_alive`) and wait for a write it is making: the stage's clean-up may
    remove the note's folder next."""
    if (beating := _HEARTBEATS.pop(url, None)) is not None:
        stop, thread = beating
        stop.set()
        thread.join(timeout=30)


def place_file(source: Path, dest: Path, link: bool) -> bool:
    """Put a file in a staging dir: a hard link when allowed (no copy, same inode), else a copy (another
    filesystem, or links not allowed). Returns True when linked (the bytes are then the ones already hashed)."""
    if link:
        try:
            os.link(source, dest)
            return True
        except OSError:  # another filesystem, or links not supported: copy instead
            pass
    shutil.copy2(source, dest)
    return False


def reads_as_version_or_id(selector: str) -> bool:
    """`latest`, a version number (v3) or a content-id prefix (hex): what a tag may never be, so they never meet."""
    return selector == "latest" or bool(_VERSION_RE.match(selector)) or _is_hex(selector)


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text.lower())


def _version_sort_key(manifest: Manifest) -> tuple[int, str, str]:
    match = _VERSION_RE.match(manifest.version)
    return (int(match.group(1)) if match else 1 << 30, manifest.producer.finished_at, manifest.version)


def in_threads(work: Callable[[_Item], _Result], items: Iterable[_Item], threads: int) -> Iterator[_Result]:
    """`work(item)` for every item, up to `threads` calls running at once, the results yielded in the items'
    order (at most `threads` wait to be taken: a slow consumer holds little). The first error is raised where
    its result would come, once the calls already running have finished; the items after them never start."""
    if threads <= 1:
        yield from (work(item) for item in items)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from in_order(lambda item: pool.submit(work, item), items, threads)


def in_order(submit: Callable[[_Item], Future[_Result]], items: Iterable[_Item], ahead: int) -> Iterator[_Result]:
    """The results of `submit(item)` (an executor's future) for every item, in the items' order, with at most
    `ahead` submitted and not yet taken: items are submitted only as results are taken (`Executor.map` submits
    them all at once). `in_threads` and `pipelines.runtime.map_in_processes` run on it."""
    window: deque[Future[_Result]] = deque()
    for item in items:
        window.append(submit(item))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()
