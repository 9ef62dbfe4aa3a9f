"""Registry: publish / resolve / immutability / crash safety, on a local directory and on fsspec memory://."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from datasets_manifests.manifest import Manifest, Producer, cache_key
from datasets_manifests.registry import CLAIM_NAME, NotFoundError, Registry, RegistryError, VersionExistsError

from datasets_fixtures import memory_url, publish_dataset, sample_rows


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> Registry:
    return Registry(tmp_path / "registry" if request.param == "local" else memory_url())


def stage_files(directory: Path, contents: dict[str, bytes]) -> list[dict]:
    for relpath, payload in contents.items():
        (directory / relpath).parent.mkdir(parents=True, exist_ok=True)
        (directory / relpath).write_bytes(payload)
    return [{"path": relpath, "role": "other"} for relpath in contents]


def publish_files(registry: Registry, directory: Path, contents: dict[str, bytes], **kwargs) -> Manifest:
    files = stage_files(directory, contents)
    kwargs.setdefault("producer", Producer(stage="test"))
    return registry.publish(kind="dataset", name=kwargs.pop("name", "toy"), staging_dir=directory, files=files,
                            **kwargs)


def test_a_move_publish_removes_the_work_dirs_it_empties(tmp_path):
    registry = Registry(tmp_path / "registry")
    work = registry.work_dir("k1")
    published = publish_files(registry, work / "publish", {"x.bin": b"one", "sub/y.bin": b"two"})
    assert registry.local_path(published, "sub/y.bin").read_bytes() == b"two"
    assert not work.exists() and (tmp_path / "registry" / ".work").is_dir()
    kept = registry.work_dir("k2")
    (kept / "records.arrow").write_bytes(b"still used")  # a stage's other files: the dir stays
    publish_files(registry, kept / "publish", {"x.bin": b"three"})
    assert sorted(p.name for p in kept.iterdir()) == ["records.arrow"]
    publish_files(registry, tmp_path / "elsewhere", {"x.bin": b"four"})  # outside .work: left as it is
    assert (tmp_path / "elsewhere").is_dir()


def test_a_remote_registrys_listings_expire(tmp_path):
    """s3fs / gcsfs keep a directory listing forever by default (one filesystem object per bucket and process): a
    long-running browser or flow worker never saw another process's new versions. A remote registry's listings
    now expire after REMOTE_LISTINGS_TTL_S; a value the user gave the filesystem is kept."""
    from datasets_manifests import registry as registry_module

    remote = Registry(memory_url())
    assert remote.fs.dircache.listings_expiry_time == registry_module.REMOTE_LISTINGS_TTL_S
    remote.fs.dircache.listings_expiry_time = 300.0  # as set by the user's storage options
    assert Registry(memory_url()).fs.dircache.listings_expiry_time == 300.0
    remote.fs.dircache.listings_expiry_time = None
    assert Registry(tmp_path / "local").fs.dircache.listings_expiry_time is None  # a local listing is not cached


def test_publish_and_resolve_every_ref_form(registry, tmp_path):
    first = publish_files(registry, tmp_path / "a", {"x.bin": b"one"})
    second = publish_files(registry, tmp_path / "b", {"x.bin": b"two", "sub/y.bin": b"why"})
    assert (first.version, second.version) == ("v1", "v2")
    assert registry.resolve("toy@v1") == first
    assert registry.resolve("toy@latest") == second
    assert registry.resolve("toy") == second
    assert registry.resolve(f"toy@{first.id[:8]}") == first
    assert [m.version for m in registry.versions("dataset", "toy")] == ["v1", "v2"]
    registry.fs.pipe(f"{registry.root}/datasets/toy/notes.txt", b"a stray file beside the versions")
    registry.fs.makedirs(f"{registry.root}/datasets/toy/v3", exist_ok=True)  # being published: no manifest yet
    registry.fs.pipe(f"{registry.root}/datasets/toy/v3/x.bin", b"three")
    assert [m.version for m in registry.versions("dataset", "toy")] == ["v1", "v2"]
    with registry.open(second, "sub/y.bin") as handle:
        assert handle.read() == b"why"
    assert second.producer.code_version and second.producer.finished_at


def test_resolve_errors_name_the_problem(registry, tmp_path):
    publish_files(registry, tmp_path / "a", {"x.bin": b"one"})
    with pytest.raises(NotFoundError, match="known names: toy"):
        registry.resolve("nope@v1")
    with pytest.raises(NotFoundError, match="versions of toy: v1"):
        registry.resolve("toy@v9")
    with pytest.raises(RegistryError, match="invalid name"):
        registry.resolve("../etc@v1")


def test_manifest_round_trip_and_content_id(registry, tmp_path):
    manifest = publish_files(registry, tmp_path / "a", {"x.bin": b"one"}, counts={"total": 1})
    loaded = Manifest.from_json(manifest.to_json())
    assert loaded == manifest and loaded.id == manifest.id
    # The id ignores when/where it was produced, not what was produced.
    moved = Manifest.from_dict({**manifest.to_dict(), "producer": {**manifest.to_dict()["producer"], "host": "x"}})
    assert moved.id == manifest.id
    tampered = json.loads(manifest.to_json())
    tampered["counts"]["total"] = 2
    with pytest.raises(ValueError, match="stored id"):
        Manifest.from_dict(tampered)
    newer = {**manifest.to_dict(), "schema_version": 99}
    with pytest.raises(ValueError, match="newer"):
        Manifest.from_dict(newer)


def test_versions_are_immutable(registry, tmp_path):
    first = publish_files(registry, tmp_path / "a", {"x.bin": b"one"}, version="v1")
    again = publish_files(registry, tmp_path / "b", {"x.bin": b"one"}, version="v1")
    assert again.id == first.id  # same content under the same version: a no-op
    with pytest.raises(VersionExistsError, match="toy@v1 already exists"):
        publish_files(registry, tmp_path / "c", {"x.bin": b"different"}, version="v1")
    with registry.open(first, "x.bin") as handle:
        assert handle.read() == b"one"
    with pytest.raises(RegistryError, match="read-only"):
        registry.open(first, "x.bin", "wb")
    with pytest.raises(NotFoundError, match="does not reference"):
        registry.path_of(first, "other.bin")


def test_publish_rejects_bad_input(registry, tmp_path):
    with pytest.raises(RegistryError, match="invalid name"):
        publish_files(registry, tmp_path / "a", {"x.bin": b"1"}, name="Bad Name")
    with pytest.raises(RegistryError, match="staged file missing"):
        registry.publish(kind="dataset", name="toy", staging_dir=tmp_path, files=[{"path": "nothing.bin"}],
                         producer=Producer(stage="t"))
    stage_files(tmp_path / "b", {"x.bin": b"1"})
    with pytest.raises(RegistryError, match="changed"):
        registry.publish(kind="dataset", name="toy", staging_dir=tmp_path / "b", producer=Producer(stage="t"),
                         files=[{"path": "x.bin", "sha256": "0" * 64, "bytes": 1}])
    with pytest.raises(RegistryError, match="invalid file path"):
        registry.publish(kind="dataset", name="toy", staging_dir=tmp_path / "b", producer=Producer(stage="t"),
                         files=[{"path": "../x.bin"}])
    with pytest.raises(RegistryError, match="invalid version"):
        publish_files(registry, tmp_path / "c", {"x.bin": b"1"}, version="../v1")
    with pytest.raises(RegistryError, match="unexpected keyword argument 'colour'"):
        registry.publish(kind="dataset", name="toy", staging_dir=tmp_path / "b", producer=Producer(stage="t"),
                         files=[{"path": "x.bin", "colour": "red"}])
    assert registry.versions("dataset", "toy") == []


def test_verify_in_threads_reports_in_the_manifests_file_order(registry, tmp_path):
    from datasets_manifests.ops import verify

    payloads = {f"part-{number:02d}.bin": bytes([number]) * (1000 + number) for number in range(12)}
    manifest = publish_files(registry, tmp_path / "many", payloads)
    assert verify(registry, manifest, chunk=64, workers=4) == []
    registry.fs.rm(registry.path_of(manifest, "part-09.bin"))
    with registry.fs.open(registry.path_of(manifest, "part-02.bin"), "wb") as handle:
        handle.write(b"short")
    expected = ["part-02.bin: 5 bytes, manifest says 1002", "part-09.bin: missing"]
    assert verify(registry, manifest, chunk=64, workers=4) == expected == verify(registry, manifest, workers=1)


def test_digests_from_the_writer_are_checked_by_size_and_verify_recomputes_them(registry, tmp_path):
    import hashlib

    from datasets_manifests.ops import verify

    def publish(name: str, payload: bytes, entry: dict) -> Manifest:
        stage_files(tmp_path / name, {"x.bin": payload})
        return registry.publish(kind="dataset", name=name, staging_dir=tmp_path / name, producer=Producer(stage="t"),
                                files=[{"path": "x.bin", **entry}], digests_from_writer=True)

    good = publish("good", b"abc", {"sha256": hashlib.sha256(b"abc").hexdigest(), "bytes": 3})
    assert good.files[0].sha256 == hashlib.sha256(b"abc").hexdigest() and verify(registry, good) == []
    with pytest.raises(RegistryError, match="x.bin is 3 bytes; its writer recorded 4"):
        publish("short", b"abc", {"sha256": "0" * 64, "bytes": 4})
    if registry.is_local:  # the digest is taken as given (not read again): `verify` is what recomputes it
        lied = publish("lied", b"abc", {"sha256": "0" * 64, "bytes": 3})
        assert [problem.split(":")[0] for problem in verify(registry, lied)] == ["x.bin"]
    else:  # an upload is read back and checked against the entry anyway
        with pytest.raises(RegistryError, match="upload of x.bin reads back"):
            publish("lied", b"abc", {"sha256": "0" * 64, "bytes": 3})
    # Without a digest in the entry, the registry computes it as usual.
    assert publish("plain", b"abc", {}).files[0].sha256 == hashlib.sha256(b"abc").hexdigest()


def test_files_staged_inside_a_remote_registry_are_copied_there(tmp_path):
    import hashlib

    from datasets_manifests.ops import verify

    registry = Registry(memory_url())
    shared = registry.shared_work_url("k1")
    assert shared.startswith("memory://") and "/.work/k1" in shared
    registry.fs.pipe(f"{shared}/shards/a.tar", b"tar bytes")  # as a writer task on another node would
    stage_files(tmp_path / "local", {"stats.json": b"{}"})
    digest = hashlib.sha256(b"tar bytes").hexdigest()

    def publish(entry: dict) -> Manifest:
        return registry.publish(kind="dataset", name="toy", staging_dir=tmp_path / "local", remote_staging=shared,
                                producer=Producer(stage="t"),
                                files=[{"path": "shards/a.tar", "role": "shard", **entry}, {"path": "stats.json"}])

    with pytest.raises(RegistryError, match="shards/a.tar is staged in the store: its entry needs the writer's sha256"):
        publish({})
    with pytest.raises(RegistryError, match="shards/a.tar is 9 bytes; its writer recorded 10"):
        publish({"sha256": digest, "bytes": 10})
    manifest = publish({"sha256": digest, "bytes": 9})
    with registry.open(manifest, "shards/a.tar") as handle:
        assert handle.read() == b"tar bytes"
    assert verify(registry, manifest) == [] and manifest.files[0].sha256 == digest
    with pytest.raises(RegistryError, match="remote_staging is for remote registries"):
        Registry(tmp_path / "reg").publish(kind="dataset", name="toy", staging_dir=tmp_path / "local",
                                           remote_staging=shared, producer=Producer(stage="t"), files=[])


def test_crash_mid_publish_leaves_no_version_and_retry_works(registry, tmp_path, monkeypatch):
    """Fault injection: placing/uploading the second file raises, as a killed process or a full disk would."""
    staging = tmp_path / "staging"
    files = stage_files(staging, {"a.bin": b"a" * 100, "b.bin": b"b" * 100, "c.bin": b"c" * 100})
    calls = {"n": 0}
    lock = threading.Lock()  # a remote publish uploads in threads

    def fail_after_first(original):
        def wrapper(*args, **kwargs):
            with lock:
                calls["n"] += 1
                number = calls["n"]
            if number > 1:
                raise OSError("injected crash while publishing")
            return original(*args, **kwargs)
        return wrapper

    if registry.is_local:
        import datasets_manifests.registry as registry_module

        monkeypatch.setattr(registry_module, "place_file", fail_after_first(registry_module.place_file))
    else:
        monkeypatch.setattr(registry.fs, "put_file", fail_after_first(registry.fs.put_file))
    with pytest.raises(OSError, match="injected"):
        registry.publish(kind="dataset", name="toy", staging_dir=staging, files=files, producer=Producer(stage="t"))
    assert calls["n"] == 2 if registry.is_local else calls["n"] >= 2  # remote uploads run in threads
    assert registry.versions("dataset", "toy") == []
    assert registry.list() == []
    with pytest.raises(NotFoundError):
        registry.resolve("toy@latest")
    if registry.is_local:
        assert not list((Path(registry.root) / ".staging").iterdir())  # nothing half-staged left behind
    assert sorted(p.name for p in staging.iterdir()) == ["a.bin", "b.bin", "c.bin"]  # staged files untouched

    monkeypatch.undo()
    manifest = registry.publish(kind="dataset", name="toy", staging_dir=staging, files=files,
                                producer=Producer(stage="t"))
    assert manifest.version == "v1"
    if registry.is_local:
        assert not list(staging.iterdir())  # moved: staged originals removed after the commit
    assert [m.id for m in registry.versions("dataset", "toy")] == [manifest.id]
    with registry.open(manifest, "c.bin") as handle:
        assert handle.read() == b"c" * 100


def test_crash_while_writing_manifest_is_invisible(tmp_path, monkeypatch):
    """On an object store the manifest is the commit: fail writing it and the uploaded files stay invisible."""
    registry = Registry(memory_url())
    files = stage_files(tmp_path, {"a.bin": b"a"})
    original_open = registry.fs.open

    def open_failing_on_manifest(path, mode="rb", **kwargs):
        if str(path).endswith("manifest.json") and "w" in mode:
            raise OSError("injected crash before commit")
        return original_open(path, mode, **kwargs)

    monkeypatch.setattr(registry.fs, "open", open_failing_on_manifest)
    with pytest.raises(OSError, match="injected"):
        registry.publish(kind="dataset", name="toy", staging_dir=tmp_path, files=files, producer=Producer(stage="t"))
    monkeypatch.undo()
    assert registry.versions("dataset", "toy") == []
    assert registry.publish(kind="dataset", name="toy", staging_dir=tmp_path, files=files,
                            producer=Producer(stage="t")).version == "v1"


def test_lineage_helpers_cache_and_children(registry, tmp_path):
    raw = publish_dataset(registry, tmp_path / "raw", "raw", sample_rows(4))
    key = cache_key("capfilt", [raw.id], "cfg1")
    derived = publish_files(registry, tmp_path / "d", {"x.bin": b"d"}, name="derived", parents=[raw],
                            producer=Producer(stage="capfilt", cache_key=key))
    assert derived.parents == ("raw@v1",) and derived.parent_ids == (raw.id,)
    assert registry.children(raw) == [derived]
    assert registry.find_cached("dataset", "derived", key) == derived
    assert registry.find_cached("dataset", "derived", "other") is None
    assert registry.by_id(raw.id) == raw
    assert registry.next_version("dataset", "derived") == "v2"


def test_list_gives_every_version_by_kind_then_name_oldest_first(registry, tmp_path):
    from datasets_manifests.registry import KINDS

    for number, name in enumerate(["zeta", "alpha", "zeta", "mid", "alpha", "zeta"]):
        publish_files(registry, tmp_path / f"d{number}", {"x.bin": bytes([number])}, name=name)
    directory = tmp_path / "model"
    registry.publish(kind="model", name="beta", staging_dir=directory, producer=Producer(stage="test"),
                     files=stage_files(directory, {"model.bin": b"m"}))
    listed = [(m.kind, m.name, m.version) for m in registry.list()]
    ranks = {kind: rank for rank, kind in enumerate(KINDS)}
    assert listed == sorted(listed, key=lambda item: (ranks[item[0]], item[1], int(item[2][1:])))
    assert listed.count(("dataset", "zeta", "v3")) == 1 and len(listed) == 7
    assert [m.name for m in registry.list("model")] == ["beta"]


def test_absent_lists_missing_and_resized_files_from_one_listing(registry, tmp_path):
    version = publish_files(registry, tmp_path / "d", {"a.bin": b"aaaa", "sub/b.bin": b"bb", "c.bin": b"c"})
    assert registry.absent(version, version.files) == {}
    root = registry.version_path("dataset", version.name, version.version)
    registry.fs.rm(f"{root}/sub/b.bin")
    registry.fs.pipe(f"{root}/c.bin", b"cc")
    assert sorted(registry.absent(version, version.files).values()) == ["c.bin: 2 bytes, manifest says 1",
                                                                  "sub/b.bin: missing"]


def test_default_registry_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP_REGISTRY", str(tmp_path / "env-registry"))
    registry = Registry()
    assert registry.is_local and registry.root == str((tmp_path / "env-registry").resolve())


def test_local_registry_is_on_disk_and_work_dir_is_stable(tmp_path):
    registry = Registry(tmp_path / "r")
    manifest = publish_files(registry, tmp_path / "a", {"x.bin": b"one"}, move=False)
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"one"  # move=False copies and leaves staging alone
    assert registry.local_path(manifest, "x.bin").read_bytes() == b"one"
    assert (tmp_path / "r" / "datasets" / "toy" / "v1" / "manifest.json").is_file()
    assert registry.work_dir("k1") == registry.work_dir("k1")
    with pytest.raises(RegistryError, match="not a local registry"):
        Registry(memory_url()).local_path(manifest, "x.bin")


def test_remote_upload_is_checked_by_sha256_read_back(tmp_path, monkeypatch):
    """An upload with the right size but wrong bytes (a flipped bit in transit) is caught before the commit."""
    registry = Registry(memory_url())
    files = stage_files(tmp_path, {"a.bin": b"a" * 64, "b.bin": b"b" * 64})
    original_put = registry.fs.put_file

    def put_corrupted(local, remote, **kwargs):
        original_put(local, remote, **kwargs)
        if str(remote).endswith("b.bin"):
            with registry.fs.open(remote, "wb") as handle:
                handle.write(b"x" * 64)  # same size: a size check alone would pass

    monkeypatch.setattr(registry.fs, "put_file", put_corrupted)
    with pytest.raises(RegistryError, match=r"upload of b\.bin reads back as 64 bytes, sha256"):
        registry.publish(kind="dataset", name="toy", staging_dir=tmp_path, files=files, producer=Producer(stage="t"))
    monkeypatch.undo()
    assert registry.versions("dataset", "toy") == []  # nothing committed
    manifest = registry.publish(kind="dataset", name="toy", staging_dir=tmp_path, files=files,
                                producer=Producer(stage="t"))
    with registry.open(manifest, "b.bin") as handle:
        assert handle.read() == b"b" * 64


def test_readers_can_refuse_a_missing_local_registry(tmp_path):
    with pytest.raises(NotFoundError, match="no registry at .*does not exist"):
        Registry(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()
    assert Registry(tmp_path / "typo").root == str((tmp_path / "typo").resolve())  # writers create it


def test_local_paths_never_leave_the_registry_through_symlinks(tmp_path):
    from datasets_manifests.registry import OutsideRegistryError

    registry = Registry(tmp_path / "r")
    manifest = publish_files(registry, tmp_path / "a", {"x.bin": b"one", "y.bin": b"two"})
    (tmp_path / "secret").write_bytes(b"secret")
    version_dir = Path(registry.version_path("dataset", "toy", "v1"))
    (version_dir / "x.bin").unlink()
    (version_dir / "x.bin").symlink_to(tmp_path / "secret")
    (version_dir / "y.bin").unlink()
    (version_dir / "y.bin").symlink_to(version_dir / "manifest.json")  # a link inside the registry is fine
    with pytest.raises(OutsideRegistryError, match="toy@v1/x.bin resolves outside the registry"):
        registry.open(manifest, "x.bin")
    with pytest.raises(OutsideRegistryError):
        registry.url_of(manifest, "x.bin")
    assert registry.local_path(manifest, "y.bin").is_file()


def test_in_threads_keeps_the_order_and_stops_at_the_first_error():
    import time

    from datasets_manifests.registry import in_threads

    assert list(in_threads(lambda n: n * n, range(40), 8)) == [n * n for n in range(40)]
    assert list(in_threads(lambda n: n + 1, range(5), 1)) == [1, 2, 3, 4, 5]
    started, lock = [], threading.Lock()

    def work(n: int) -> int:
        with lock:
            started.append(n)
        time.sleep(0.02)
        if n == 1:
            raise RegistryError("item 1 failed")
        return n

    with pytest.raises(RegistryError, match="item 1 failed"):
        list(in_threads(work, range(50), 2))
    assert sorted(started) == [0, 1, 2]  # the calls after the failed one and the one running beside it never start


def test_read_range_is_one_request_of_the_bytes_on_a_store(registry, tmp_path, monkeypatch):
    """A sample's image by offset (the browser's thumbnails): on a store `cat_file` of exactly the range, never an
    opened file (its read-ahead block would be megabytes around a ~50 KB image); a range past the end is short."""
    data = bytes(range(256)) * 40
    manifest = publish_files(registry, tmp_path / "stage", {"shards/a.tar": data})
    if not registry.is_local:
        monkeypatch.setattr(registry.fs, "open", lambda *args, **kwargs: pytest.fail("opened a remote file"))
    assert registry.read_range(manifest, "shards/a.tar", 1000, 300) == data[1000:1300]
    assert registry.read_range(manifest, "shards/a.tar", len(data) - 10, 300) == data[-10:]


def test_fetch_keeps_a_local_copy_and_never_takes_a_cut_one_for_the_file(registry, tmp_path):
    """The driver's copies of a remote model's files (finetuning, evaluation): a download killed midway left a
    cut-short file that the next run loaded as the model; now it is a `.partial`, and a copy of the wrong size is
    fetched again."""
    data = bytes(range(256)) * 64
    manifest = publish_files(registry, tmp_path / "stage", {"model.safetensors": data})
    target = tmp_path / "copies" / "model.safetensors"
    assert registry.fetch(manifest, "model.safetensors", target).read_bytes() == data
    target.write_bytes(data[:1000])  # as a killed download into the file itself would have left it
    assert registry.fetch(manifest, "model.safetensors", target).read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]

    # Two fetches of one file at once (two evaluation workers of a machine): here the second runs whole while the
    # first is reading. They shared one `.partial`: the second emptied the first's and renamed it into place, and
    # the first wrote on into it past a gap of zeros (then failed to rename a file no longer there).
    if not registry.is_local:
        return  # memory:// hands both fetches one file object (one read position): no race to stage there
    target.unlink()
    opened = registry.open

    class SecondFetchMidway:  # the first fetch's source: the second fetch runs whole during its first read
        def __init__(self, handle) -> None:
            self.handle, self.raced = handle, False

        def __enter__(self) -> "SecondFetchMidway":
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def read(self, size: int = -1) -> bytes:
            if self.raced:
                return self.handle.read(size)
            self.raced, chunk = True, self.handle.read(100)
            registry.open = opened  # type: ignore[method-assign]
            assert registry.fetch(manifest, "model.safetensors", target).read_bytes() == data
            return chunk

    def open_racing(version, relpath, mode="rb"):
        return SecondFetchMidway(opened(version, relpath, mode))

    registry.open = open_racing  # type: ignore[method-assign]
    try:
        assert registry.fetch(manifest, "model.safetensors", target).read_bytes() == data
    finally:
        registry.open = opened  # type: ignore[method-assign]
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def publish_meanwhile(registry: Registry, method: str, monkeypatch, tmp_path: Path, contents: dict[str, bytes],
                      **kwargs) -> list[Manifest]:  # fmt: skip
    """Wrap the registry's commit step (`_publish_local` / `_publish_remote`) so that another publish of the same
    name commits first, after this one chose its version number: two runs publishing at the same time."""
    original, others = getattr(registry, method), []

    def commit_after_another(*args, **call_kwargs):
        if not others:
            monkeypatch.setattr(registry, method, original)
            others.append(publish_files(registry, tmp_path / "other", contents, **kwargs))
            monkeypatch.setattr(registry, method, commit_after_another)
        return original(*args, **call_kwargs)

    monkeypatch.setattr(registry, method, commit_after_another)
    return others


def test_a_publish_that_loses_its_version_to_another_takes_the_next(registry, tmp_path, monkeypatch):
    """Two runs publish the same name at once: both chose v2; the one that commits second gets v3, each version's
    files are its own (on a store the loser uploaded into the winner's folder, and failed on a local disk)."""
    publish_files(registry, tmp_path / "first", {"x.bin": b"v1"})
    method = "_publish_local" if registry.is_local else "_publish_remote"
    others = publish_meanwhile(registry, method, monkeypatch, tmp_path, {"x.bin": b"the other run's"})
    mine = publish_files(registry, tmp_path / "mine", {"x.bin": b"this run's"})
    assert [others[0].version, mine.version] == ["v2", "v3"]
    for manifest, payload in ((others[0], b"the other run's"), (mine, b"this run's")):
        with registry.open(registry.resolve(manifest.ref), "x.bin") as handle:
            assert handle.read() == payload
    monkeypatch.undo()
    with pytest.raises(VersionExistsError, match="toy@v4 was published by another run"):  # named: never moved
        publish_meanwhile(registry, method, monkeypatch, tmp_path, {"x.bin": b"another"}, version="v4")
        publish_files(registry, tmp_path / "named", {"x.bin": b"named"}, version="v4")


def test_a_store_publish_claims_its_version_folder_before_it_uploads(tmp_path, monkeypatch):
    """On an object store a version folder is claimed (a file created only if absent) before any upload: a publish
    still uploading holds its number; a retry of the same run (same cache key) takes its own stopped one over."""
    registry = Registry(memory_url())
    claim = f"{registry.version_path('dataset', 'toy', 'v1')}/{CLAIM_NAME}"
    registry.fs.pipe_file(claim, json.dumps({"host": "elsewhere", "cache_key": "another-run"}).encode())
    first = publish_files(registry, tmp_path / "a", {"x.bin": b"a"}, producer=Producer(stage="t", cache_key="k1"))
    assert first.version == "v2" and registry.fs.isfile(claim)  # v1 is being uploaded by another run: left alone
    assert not registry.fs.exists(f"{registry.version_path('dataset', 'toy', 'v2')}/{CLAIM_NAME}")  # released
    with pytest.raises(VersionExistsError, match="being published.*elsewhere"):
        publish_files(registry, tmp_path / "b", {"x.bin": b"b"}, version="v1")
    stopped = f"{registry.version_path('dataset', 'toy', 'v3')}/{CLAIM_NAME}"
    registry.fs.pipe_file(stopped, json.dumps({"host": "here", "cache_key": "k2"}).encode())
    registry.fs.pipe_file(stopped.replace(CLAIM_NAME, "x.bin"), b"half an upload")
    retried = publish_files(registry, tmp_path / "c", {"x.bin": b"c"}, producer=Producer(stage="t", cache_key="k2"))
    assert retried.version == "v3"
    with registry.open(retried, "x.bin") as handle:
        assert handle.read() == b"c"
    with pytest.raises(RegistryError, match="invalid file path"):
        publish_files(registry, tmp_path / "d", {CLAIM_NAME: b"{}"})


def test_publishes_from_threads_at_once_each_get_their_own_version(tmp_path):
    registry = Registry(tmp_path / "registry")
    results: list[tuple[int, Manifest]] = []
    errors: list[BaseException] = []

    def publish(number: int) -> None:
        try:
            staging = tmp_path / f"run{number}"
            results.append((number, publish_files(registry, staging, {"x.bin": f"run {number}".encode()})))
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=publish, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(int(manifest.version[1:]) for _, manifest in results) == [1, 2, 3, 4, 5, 6]
    for number, manifest in results:
        with registry.open(registry.resolve(manifest.ref), "x.bin") as handle:
            assert handle.read() == f"run {number}".encode()
