"""The node-local shard cache: remote shards (a real HTTP server answering range requests, as a store does) are
downloaded once a node whatever the number of loader processes, and the micro-batches are those of local reads."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from http_files import serve_files
from test_train_loop import KeyTask, keys_of

from pipelines.tasks.shard_cache import ShardCache
from pipelines.tasks.train_data import DataPlan, ShardRef, epoch_loader, write_scene_shards


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote-shards")
    write_scene_shards(root, num_shards=4, per_shard=24, image_size=32, seed=2)
    return root


def shard_files(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("train-*.tar"))


def plan_of(shards: tuple[ShardRef, ...]) -> DataPlan:
    return DataPlan(shards=shards, world_size=1, batch_size=4, seed=5, shuffle_buffer=20)


def test_loader_workers_download_each_shard_once_through_the_cache(shard_root: Path, tmp_path: Path) -> None:
    files = shard_files(shard_root)
    local = tuple(ShardRef(str(path), 24) for path in files)
    expected = keys_of(epoch_loader(plan_of(local), KeyTask(), 0, epoch=0, skip=0, num_workers=0))
    with serve_files(shard_root) as served:
        remote = tuple(ShardRef(f"{served.url}/shards/{p.name}", 24, p.stat().st_size) for p in files)
        uncached = keys_of(epoch_loader(plan_of(remote), KeyTask(), 0, epoch=0, skip=0, num_workers=2))
        without = sum(served.bytes_sent.values())
        served.bytes_sent.clear()
        cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
        cached = keys_of(epoch_loader(plan_of(remote), KeyTask(), 0, epoch=0, skip=0, num_workers=2, cache=cache))
        assert cached == uncached == expected
        # every shard sent exactly once to the 2 worker processes together; each worker fetched it without the cache
        assert served.bytes_sent == {f"shards/{p.name}": p.stat().st_size for p in files}
        total = sum(p.stat().st_size for p in files)
        assert without >= 1.8 * total
        # another epoch on the node: read from the cache, nothing downloaded
        served.bytes_sent.clear()
        assert keys_of(epoch_loader(plan_of(remote), KeyTask(), 0, epoch=1, skip=0, num_workers=2, cache=cache))
        assert not served.bytes_sent


def _open_and_read(directory: str, url: str, size: int, out: str) -> None:
    with ShardCache(directory, 1 << 30).open(url, size) as handle:
        Path(out).write_bytes(handle.read())


def test_processes_asking_at_once_share_one_download(shard_root: Path, tmp_path: Path) -> None:
    path = shard_files(shard_root)[0]
    with serve_files(shard_root, delay=0.2) as served:
        url = f"{served.url}/shards/{path.name}"
        context = multiprocessing.get_context("fork")
        readers = [context.Process(target=_open_and_read, args=(str(tmp_path / "cache"), url, path.stat().st_size,
                                                                 str(tmp_path / f"read{i}")))  # fmt: skip
                   for i in range(4)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=120)
            assert reader.exitcode == 0
        assert served.bytes_sent[f"shards/{path.name}"] == path.stat().st_size
    for i in range(4):
        assert (tmp_path / f"read{i}").read_bytes() == path.read_bytes()


def test_a_download_of_the_wrong_size_is_refused_and_a_cut_copy_fetched_again(shard_root: Path, tmp_path: Path) -> None:
    path = shard_files(shard_root)[1]
    size = path.stat().st_size
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
    with serve_files(shard_root) as served:
        url = f"{served.url}/shards/{path.name}"
        with pytest.raises(OSError, match=f"{path.name} gave {size} bytes, its manifest says {size + 512}"):
            cache.open(url, size + 512)
        assert not [p for p in (tmp_path / "cache").iterdir() if p.is_file()]  # neither the copy nor a .partial
        cache.path_of(url).write_bytes(path.read_bytes()[: size // 2])  # a copy that lost its tail
        with cache.open(url, size) as handle:
            assert handle.read() == path.read_bytes()
        assert (cache.fetched, cache.hits) == (1, 0)
        with cache.open(url, size) as handle:
            assert handle.read() == path.read_bytes()
        assert (cache.fetched, cache.hits) == (1, 1)


def test_least_recently_opened_shards_are_evicted_and_open_ones_stay_readable(shard_root: Path, tmp_path: Path) -> None:
    files = shard_files(shard_root)
    biggest = max(p.stat().st_size for p in files)
    cache = ShardCache(str(tmp_path / "cache"), 2 * biggest)  # room for two shards
    with serve_files(shard_root) as served:
        urls = [f"{served.url}/shards/{p.name}" for p in files]
        first = cache.open(urls[0])
        cache.open(urls[1]).close()
        time.sleep(0.01)
        cache.open(urls[0]).close()  # reopened: now the most recent of the two
        time.sleep(0.01)
        cache.open(urls[2]).close()  # over budget: shard 1, the least recently opened, goes
        assert [cache.path_of(u).exists() for u in urls[:3]] == [True, False, True]
        time.sleep(0.01)
        cache.open(urls[3]).close()  # shard 0 goes now, while `first` still has it open
        assert not cache.path_of(urls[0]).exists()
        assert first.read() == files[0].read_bytes()
        first.close()
        assert cache.fetched == 4
        # Room is made before a download: with the size to come, the least recent of the two goes first.
        assert cache.evict(incoming=biggest) == [cache.path_of(urls[2]).name]
        assert cache.evict(incoming=biggest) == []
        # Another process's download in progress (its lock held, here by this test) is on the disk: it counts.
        downloading = cache.path_of(f"{served.url}/shards/elsewhere.tar")
        partial = downloading.with_name(downloading.name + ".partial")
        with cache._locked(downloading):
            partial.write_bytes(b"x" * (2 * biggest))
            assert cache.evict() == [cache.path_of(urls[3]).name] and partial.exists()
        assert cache.evict() == [partial.name]  # its lock is free: a leftover


def _download_slowly(directory: str, url: str) -> None:
    ShardCache(directory, 1 << 30).open(url)


def test_a_download_killed_midway_leaves_nothing_complete_and_is_redone(shard_root: Path, tmp_path: Path) -> None:
    path = shard_files(shard_root)[2]
    directory = str(tmp_path / "cache")
    with serve_files(shard_root, bytes_per_s=40_000) as served:  # ~2 s a shard: the window to kill the download
        url = f"{served.url}/shards/{path.name}"
        cache = ShardCache(directory, 1 << 30)
        partial = cache.path_of(url).with_name(cache.path_of(url).name + ".partial")
        process = multiprocessing.get_context("fork").Process(target=_download_slowly, args=(directory, url))
        process.start()
        deadline = time.monotonic() + 60
        while not partial.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert partial.exists(), "the download never started"
        with cache._locked(cache.path_of(url), blocking=False) as taken:
            assert not taken  # the downloader holds the shard's lock
        assert cache.evict() == []  # a download in progress is not a leftover
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        assert not cache.path_of(url).exists() and partial.exists()
        with cache.open(url, path.stat().st_size) as handle:  # the kernel released the dead process's lock
            assert handle.read() == path.read_bytes()
    partial.write_bytes(b"left by a killed process")
    assert cache.evict() == [partial.name]


def test_a_streamed_open_reads_while_the_shard_downloads_and_keeps_the_copy(shard_root: Path, tmp_path: Path) -> None:
    """CapFilt's decode task reads its shard as it downloads (`open_streaming`): the first bytes arrive before the
    download ends, the bytes are the shard's, the store sends it once and the cache keeps the complete copy, which
    the writer task's open then finds."""
    path = shard_files(shard_root)[0]
    size = path.stat().st_size
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
    with serve_files(shard_root, bytes_per_s=size / 2) as served:  # ~2 s for the whole shard
        url = f"{served.url}/shards/{path.name}"
        partial = cache.path_of(url).with_name(cache.path_of(url).name + ".partial")
        with cache.open_streaming(url, size) as handle:
            head = handle.read(512)
            assert partial.exists() and not cache.path_of(url).exists()  # reading before the download ended
            rest = handle.read()
        assert head + rest == path.read_bytes()
        assert cache.path_of(url).read_bytes() == path.read_bytes() and not partial.exists()
        assert served.bytes_sent == {f"shards/{path.name}": size} and (cache.fetched, cache.fetched_bytes) == (1, size)
        with cache.open_streaming(url, size) as handle:  # now a cache hit
            assert handle.read() == path.read_bytes()
        assert served.bytes_sent == {f"shards/{path.name}": size} and cache.hits == 1


def test_a_streamed_open_stopped_midway_or_failed_keeps_nothing(shard_root: Path, tmp_path: Path) -> None:
    """A reader that raises mid-shard abandons the download (no copy, no .partial, the lock free again: the next
    open downloads it whole); a shard of another size than the manifest's, or missing, raises naming it."""
    path = shard_files(shard_root)[1]
    size = path.stat().st_size
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
    with serve_files(shard_root, bytes_per_s=size / 2) as served:
        url = f"{served.url}/shards/{path.name}"
        with pytest.raises(RuntimeError, match="decode failed"):
            with cache.open_streaming(url, size) as handle:
                handle.read(1024)
                raise RuntimeError("decode failed")
        assert [p.name for p in (tmp_path / "cache").iterdir()] == ["locks"]
        assert not [t for t in threading.enumerate() if t.name == "shard-download"]  # the download stopped
        with pytest.raises(OSError, match=f"{path.name} gave {size} bytes, its manifest says {size + 512}"):
            with cache.open_streaming(url, size + 512) as handle:
                handle.read()
        with pytest.raises(FileNotFoundError, match="no-such.tar"):
            with cache.open_streaming(f"{served.url}/shards/no-such.tar") as handle:
                handle.read()
        assert [p.name for p in (tmp_path / "cache").iterdir()] == ["locks"]
        with cache.open_streaming(url, size) as handle:  # the lock was released: downloaded whole this time
            assert handle.read() == path.read_bytes()
        assert cache.path_of(url).stat().st_size == size


def test_local_shards_are_read_in_place(shard_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = shard_files(shard_root)[0]
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30)
    for url in (str(path), f"file://{path}"):
        with cache.open(url) as handle:
            assert handle.read() == path.read_bytes()
    assert cache.fetched == 0 and not cache.path_of(str(path)).exists()
    assert cache.path_of("s3://a/x/train-000000.tar") != cache.path_of("s3://a/y/train-000000.tar")
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        ShardCache(str(tmp_path / "c2"), 0)
    free = shutil.disk_usage(tmp_path).free
    with caplog.at_level("WARNING"):
        huge = ShardCache(str(tmp_path / "c3"), 1 << 62)  # more than any disk here
    assert huge.max_bytes <= 0.9 * free + (1 << 30) and "is more than" in caplog.text and "using" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a task opening shard after shard: warned once a process, still capped
        again = ShardCache(str(tmp_path / "c3"), 1 << 62, section="compute")
    assert again.max_bytes <= 0.9 * free + (1 << 30) and not caplog.records
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match=r"data.shard_cache_dir\): cannot create .*a-file/cache on this node"):
        ShardCache(str(tmp_path / "a-file" / "cache"), 1 << 30)
    with pytest.raises(OSError, match=r"\(compute.shard_cache_dir\): cannot create"):  # CapFilt's setting
        ShardCache(str(tmp_path / "a-file" / "cache"), 1 << 30, section="compute")


def test_the_cache_settings_reach_the_workers_and_leave_the_cache_key_alone(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.config import config_hash, to_dict
    from pipelines.tasks import _ray_train
    from pipelines.tasks.pretrain import RUN_ONLY_KEYS, PretrainConfig, worker_config

    cfg = PretrainConfig(model="tiny")
    cached = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shard_cache_dir="~/cache", shard_cache_gb=2))
    assert config_hash(cached, RUN_ONLY_KEYS) == config_hash(cfg, RUN_ONLY_KEYS) != config_hash(cached)
    plain: dict[str, Any] = to_dict(cfg)
    del plain["data"]["shard_cache_dir"], plain["data"]["shard_cache_gb"]
    assert config_hash(plain) == config_hash(cfg, RUN_ONLY_KEYS)  # the keys of runs made before these settings
    shards = (ShardRef("s3://bucket/train-000000.tar", 10, 4096),)
    config = worker_config(cached, shards)
    assert config["shards"] == [("s3://bucket/train-000000.tar", 10, 4096)]
    monkeypatch.setenv("HOME", str(tmp_path))
    cache = _ray_train.shard_cache(config["data"])
    assert cache.directory == str(tmp_path / "cache") and cache.max_bytes == 2 << 30
    assert _ray_train.shard_cache(worker_config(cfg, shards)["data"]) is None


def test_remote_shards_without_a_cache_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from pipelines.tasks.pretrain import DataConfig, warn_uncached_remote

    remote, local = (ShardRef("s3://bucket/web/train-000000.tar", 10),), (ShardRef("/data/train-000000.tar", 10),)
    with caplog.at_level("WARNING"):
        warn_uncached_remote(DataConfig(loader_workers=10), remote)
    assert "shards are remote (s3://bucket/web/...) and data.shard_cache_dir is not set: each of the 10" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_uncached_remote(DataConfig(loader_workers=10, shard_cache_dir="/tmp/cache"), remote)
        warn_uncached_remote(DataConfig(loader_workers=10), local)
        warn_uncached_remote(DataConfig(loader_workers=1), remote)  # one reader: nothing is fetched twice
    assert not caplog.text

