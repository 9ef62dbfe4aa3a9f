"""The bookkeeping round trips of a run on object storage, on a store that waits on every request: CapFilt finding
the shards left to do (`capfilt.pending_shards`: one listing of its work prefix, vs two `exists` a shard, the loop
before), the publish of a version whose shards are staged in the store (`Registry.publish`: `REMOTE_THREADS`
copies and checks at a time, vs one after the other, the publish before), and resolving a name with many versions
(`Registry.versions`: their manifests read `REMOTE_THREADS` at a time, vs an `exists` and a read each, one after
the other) and listing every version of a registry of many names (`Registry.list`, behind the browser's list,
`by_id` and `children`: names read several at a time, vs one after the other), and the shard stage's resume files
copied to the store as they are kept (`shard.KeptFiles`: uploads in background threads, vs one after the other in
the driver's loop, the stage before), side by side on the same files.

No object store can be reached here: the store is fsspec's memory filesystem with `--latency-ms` added to every
request (a stat, a listing of up to 1,000 keys, a copy, a read, a write; S3's first-byte latency is ~10-30 ms).
This counts how many waits each design makes one after the other, not a store's bandwidth; the files are a few
bytes (a real copy of a 600 MB shard inside S3 takes seconds, which the threads overlap the same way). Both sides
must find the same shards and publish the same files. Prints one JSON object.
`python benchmarks/bench_store_roundtrips.py` (~15 s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402


class SlowMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem, each request waiting `latency_s` as an object store's round trip would."""

    protocol = ("slowmem",)
    latency_s = 0.0
    _listing = threading.local()  # inside `find`: its own stats and listings are part of the one listing

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        return super()._strip_protocol(path[len("slowmem://"):] if path.startswith("slowmem://") else path)

    def _wait(self, requests: int = 1) -> None:
        if not getattr(self._listing, "active", False):
            time.sleep(self.latency_s * requests)

    def info(self, path: str, **kwargs: Any) -> Any:
        self._wait()
        return super().info(path, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self._wait()
        return super().ls(path, detail=detail, **kwargs)

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._listing.active = True
        try:
            found = super().find(path, *args, **kwargs)
        finally:
            self._listing.active = False
        self._wait(max(1, math.ceil(len(found) / 1000)))  # S3's listing: up to 1,000 keys a request
        return found

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> Any:
        self._wait()
        return super().cp_file(path1, path2, **kwargs)

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> Any:
        self._wait()
        return super().cat_file(path, start, end, **kwargs)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        self._wait()
        return super()._open(path, mode, *args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=300, help="shards staged in the store (13k at 129M)")
    parser.add_argument("--latency-ms", type=float, default=10.0, help="wait added to every request")
    parser.add_argument("--versions", type=int, default=40, help="versions of the name resolved")
    parser.add_argument("--names", type=int, default=30, help="further names (2 versions each) in the registry listed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import fsspec

    from datasets_manifests import registry as registry_module
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry
    from pipelines.tasks.capfilt import ShardPlan, marker_relpath, pending_shards

    args = parse_args(argv)
    fsspec.register_implementation("slowmem", SlowMemoryFileSystem, clobber=True)
    registry = Registry(f"slowmem://bench-{uuid.uuid4().hex[:8]}/registry")
    shared = registry.shared_work_url("run")
    fs, root = registry.fs, registry.fs._strip_protocol(shared)
    shards, files = [], []
    for number in range(args.shards):  # staged before the latency is on: as the writer tasks would have
        path = f"shards/train-{number:06d}.tar"
        data = f"shard {number}".encode()
        shards.append(ShardPlan(number, path, f"{shared}/{path}", "train", 1))
        fs.pipe(f"{root}/{path}", data)
        fs.pipe(f"{root}/{marker_relpath(shards[-1])}", b"{}")
        files.append({"path": path, "role": "shard", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    for number in range(args.versions):  # a name published many times (one small file each)
        with tempfile.TemporaryDirectory(prefix="bench-store-") as version_dir:
            (Path(version_dir) / "stats.json").write_text(json.dumps({"run": number}))
            registry.publish(kind="dataset", name="many", staging_dir=version_dir, files=[{"path": "stats.json"}],
                             producer=Producer(stage="bench"))  # fmt: skip
    for number in range(args.names * 2):
        with tempfile.TemporaryDirectory(prefix="bench-store-") as version_dir:
            (Path(version_dir) / "stats.json").write_text(json.dumps({"run": number}))
            registry.publish(kind="model" if number // 2 % 3 else "dataset", name=f"name-{number // 2:03d}",
                             staging_dir=version_dir, files=[{"path": "stats.json"}], producer=Producer(stage="bench"))
    pending_shards(shared, shards)  # its imports, outside the timing
    SlowMemoryFileSystem.latency_s = args.latency_ms / 1000

    def timed(work: Any) -> tuple[float, Any]:
        began = time.perf_counter()
        result = work()
        return time.perf_counter() - began, result

    stat_loop_s, stat_loop = timed(lambda: [s for s in shards if not (
        fs.exists(f"{root}/{marker_relpath(s)}") and fs.exists(f"{root}/{s.path}"))])  # fmt: skip
    listing_s, listing = timed(lambda: pending_shards(shared, shards))

    def versions_one_by_one() -> list[Any]:  # Registry.versions before
        base, found = f"{registry.root}/datasets/many", []
        for path in fs.ls(base, detail=False):
            manifest_path = f"{path.rstrip('/')}/manifest.json"
            if fs.exists(manifest_path):
                found.append(registry._read_manifest(manifest_path))
        return sorted(found, key=registry_module._version_sort_key)

    versions_loop_s, versions_loop = timed(versions_one_by_one)
    versions_threads_s, versions_threads = timed(lambda: registry.versions("dataset", "many"))
    list_loop_s, list_loop = timed(lambda: [m for k in registry_module.KINDS for name in registry.names(k)
                                            for m in registry.versions(k, name)])  # Registry.list before
    list_threads_s, list_threads = timed(registry.list)

    with tempfile.TemporaryDirectory(prefix="bench-store-") as staging:
        def publish(name: str) -> Any:
            return registry.publish(kind="dataset", name=name, staging_dir=staging, files=files, remote_staging=shared,
                                    digests_from_writer=True, producer=Producer(stage="bench"))  # fmt: skip

        threads = registry_module.REMOTE_THREADS
        registry_module.REMOTE_THREADS = 1  # the publish before: one file after the other
        try:
            sequential_s, sequential = timed(lambda: publish("one-by-one"))
        finally:
            registry_module.REMOTE_THREADS = threads
        threaded_s, threaded = timed(lambda: publish("threads"))
    same_files = [(f.path, f.sha256) for f in sequential.files] == [(f.path, f.sha256) for f in threaded.files]
    kept_loop_s, kept_threads_s, same_kept = kept_files_uploads(fs, f"{shared}/resume", args.shards, timed)
    per_shard = {"stat_loop": stat_loop_s / args.shards, "listing": listing_s / args.shards,
                 "publish_one_by_one": sequential_s / args.shards, "publish_threads": threaded_s / args.shards,
                 "kept_files_one_by_one": kept_loop_s / args.shards, "kept_files_threads": kept_threads_s / args.shards}
    report = {
        "benchmark": "store_roundtrips", "shards": args.shards, "latency_ms": args.latency_ms,
        "remote_threads": threads, "same_pending": stat_loop == listing == [], "same_files": same_files,
        "pending": {"stat_loop_s": round(stat_loop_s, 3), "listing_s": round(listing_s, 3),
                    "ratio": round(stat_loop_s / listing_s, 1)},
        "publish": {"one_by_one_s": round(sequential_s, 2), "threads_s": round(threaded_s, 2),
                    "ratio": round(sequential_s / threaded_s, 1)},
        "versions": {"count": args.versions, "same": [m.id for m in versions_loop] == [m.id for m in versions_threads],
                     "one_by_one_s": round(versions_loop_s, 3), "threads_s": round(versions_threads_s, 3),
                     "ratio": round(versions_loop_s / versions_threads_s, 1)},
        "list": {"names": len({(m.kind, m.name) for m in list_threads}), "versions": len(list_threads),
                 "same": [m.id for m in list_loop] == [m.id for m in list_threads],
                 "one_by_one_s": round(list_loop_s, 3), "threads_s": round(list_threads_s, 3),
                 "ratio": round(list_loop_s / list_threads_s, 1)},
        "kept_files": {"files": args.shards, "same": same_kept, "one_by_one_s": round(kept_loop_s, 2),
                       "threads_s": round(kept_threads_s, 2), "ratio": round(kept_loop_s / kept_threads_s, 1)},
        "at_13k_shards_min": {name: round(seconds * 12_900 / 60, 1) for name, seconds in per_shard.items()},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


def kept_files_uploads(fs: Any, prefix: str, count: int, timed: Any) -> tuple[float, float, bool]:
    """The shard stage keeping `count` small files (a raw shard's records each) and copying them to the store:
    each copy made in the loop, one after the other (the stage before), vs `KeptFiles` (background uploads)."""
    from pipelines.tasks.shard import KeptFiles
    from pipelines.tasks.webdata import atomic_output

    payloads = [f"records of raw shard {number}".encode() * 20 for number in range(count)]
    with tempfile.TemporaryDirectory(prefix="bench-kept-") as scratch:
        def one_by_one() -> None:
            store = fs._strip_protocol(f"{prefix}/one-by-one")
            for number, data in enumerate(payloads):
                local = Path(scratch, "loop", f"{number:06d}.arrow")
                with atomic_output(local) as handle:
                    handle.write(data)
                fs.put_file(str(local), f"{store}/{local.name}")

        def background() -> None:
            kept = KeptFiles(Path(scratch, "kept"), f"{prefix}/threads")
            with kept.uploading():
                for number, data in enumerate(payloads):
                    with kept.keep(f"{number:06d}.arrow") as handle:
                        handle.write(data)

        loop_s, _ = timed(one_by_one)
        threads_s, _ = timed(background)

    def stored(name: str) -> list[tuple[str, bytes]]:
        root = fs._strip_protocol(f"{prefix}/{name}")
        return [(path.rsplit("/", 1)[-1], fs.cat_file(path)) for path in sorted(fs.find(root))]

    return loop_s, threads_s, stored("one-by-one") == stored("threads") and len(stored("threads")) == count


if __name__ == "__main__":
    main()
