"""The shard stage's pass 2 on raw shards in a store: one ranged request an image, a batch at once, vs opened files.

Pass 2 writes each output shard from its records in the split's shuffled order, so one output shard takes images
from (nearly) every raw shard, each at its own offset. On object storage (the 14M / 129M presets' registry) the
stage before opened each raw shard as a remote file and did seek + read an image: fsspec then fetches a read-ahead
block of megabytes around each ~50 KB image (s3fs: 50 MiB). Ours (`shard._read_images`) asks the store for each
image's bytes only, with the batch's requests in flight together (`cat_ranges`). Both sides write the same output
shards with `shard.write_output_shard` (checked by sha256); only the reading differs.

The raw shards (`--shards` x `--per-shard` noise JPEGs of ~`--jpeg-kib` KiB, in the download's tar layout) are
served by an HTTP server on 127.0.0.1 that answers range requests as a store does, adds `--latency-ms` to every
request and sends at most `--link-mib-s` MiB/s over all connections. `--outputs` output shards of `--per-output`
records in a shuffled order are written by each side in this process (the stage runs one such job a core). The
figures: bytes the server sent, requests, wall time. Prints one JSON object.
`python benchmarks/bench_shard_remote_reads.py` (~1 min on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="raw shards")
    parser.add_argument("--per-shard", type=int, default=250, help="images per raw shard")
    parser.add_argument("--jpeg-kib", type=int, default=52, help="approximate size of each stored JPEG")
    parser.add_argument("--outputs", type=int, default=2, help="output shards written by each side")
    parser.add_argument("--per-output", type=int, default=500, help="records per output shard")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every request")
    parser.add_argument("--link-mib-s", type=float, default=300.0, help="the store's bandwidth, MiB/s")
    return parser.parse_args(argv)


def opened_files_read(sources: dict[str, str], records: list[dict[str, Any]], handles: dict[str, Any]) -> list[bytes]:
    """The reading before: each raw shard opened as a (remote) file, seek + read an image at a time."""
    import fsspec

    images = []
    for record in records:
        url = sources[record["source_shard"]]
        if url not in handles:
            handles[url] = fsspec.open(url, "rb").open()
        handles[url].seek(record["source_offset"])
        images.append(handles[url].read(record["source_bytes"]))
    return images


def build_raw(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Raw tars of noise JPEGs and the pass-2 record of each image, in a shuffled order."""
    from bench_capfilt_writer import noise_jpegs, side_for_kib  # benchmarks/ is the script's directory

    from pipelines.tasks.webdata import write_tar

    side = side_for_kib(args.jpeg_kib)
    jpegs = noise_jpegs(side, side)
    records = []
    for number in range(args.shards):
        path = f"raw/{number:05d}.tar"
        keys = [f"{number:05d}{i:05d}" for i in range(args.per_shard)]
        members = [(f"{key}.{ext}", data) for i, key in enumerate(keys)
                   for ext, data in (("jpg", jpegs[i % len(jpegs)]), ("txt", b"a red circle"))]  # fmt: skip
        written = write_tar(root / path, members)
        for i, key in enumerate(keys):
            offset, size = written.data_offsets[f"{key}.jpg"]
            digest = hashlib.sha256(jpegs[i % len(jpegs)]).hexdigest()
            records.append({"key": key, "url": f"http://127.0.0.1/{key}.jpg", "raw_caption": "a red circle",
                            "caption": "a red circle", "image_sha256": digest, "width": side, "height": side,
                            "source_shard": path, "source_offset": offset, "source_bytes": size,
                            "reencode": False})  # fmt: skip
    random.Random(0).shuffle(records)
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import pyarrow as pa

    from pipelines.tasks import shard as stage
    from tests.http_files import serve_files

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-shard-remote-") as tmp:
        directory = Path(tmp)
        (directory / "store/raw").mkdir(parents=True)
        records = build_raw(directory / "store", args)
        chunks = [pa.Table.from_pylist(records[n * args.per_output : (n + 1) * args.per_output])
                  for n in range(args.outputs)]  # fmt: skip
        image_bytes = sum(chunk.column("source_bytes").to_numpy().sum() for chunk in chunks)
        sides: dict[str, dict[str, Any]] = {}
        with serve_files(directory / "store", args.latency_ms / 1000, args.link_mib_s * 2**20) as served:
            sources = {f"raw/{n:05d}.tar": f"{served.url}/raw/{n:05d}.tar" for n in range(args.shards)}
            stage.write_output_shard(stage.ShardConfig(), str(directory / "warm-up"), "train", 0, chunks[0][:4],
                                     sources)  # fmt: skip  (fsspec's HTTP client and its event loop started)
            for side in ("opened_files", "ranged_batches"):
                served.clear()
                reader = opened_files_read if side == "opened_files" else stage._read_images
                began = time.perf_counter()
                with mock.patch.object(stage, "_read_images", reader):
                    entries = [stage.write_output_shard(stage.ShardConfig(), str(directory / side), "train", n, chunk,
                                                        sources)[0] for n, chunk in enumerate(chunks)]  # fmt: skip
                wall = time.perf_counter() - began
                sent, requests = served.totals()
                sides[side] = {"wall_s": round(wall, 2),
                               "images_per_s": round(args.outputs * args.per_output / wall, 1),
                               "store_sent_mib": round(sent / 2**20, 1),
                               "requests": requests,
                               "sha256": [entry["sha256"] for entry in entries]}  # fmt: skip
    old, new = sides["opened_files"], sides["ranged_batches"]
    report = {
        "benchmark": "shard_remote_reads", "host_cpus": os.cpu_count(), "images": args.outputs * args.per_output,
        "image_mib": round(image_bytes / 2**20, 1), "raw_shards": args.shards,
        "raw_shard_mib": round(image_bytes / 2**20 / args.outputs / args.per_output * args.per_shard, 1),
        "latency_ms": args.latency_ms, "link_mib_s": args.link_mib_s, "read_batch": stage.READ_BATCH,
        "same_output_shards": old.pop("sha256") == new.pop("sha256"),
        "opened_files": old, "ranged_batches": new,
        "store_bytes_ratio": round(old["store_sent_mib"] / max(new["store_sent_mib"], 0.1), 1),
        "wall_ratio": round(old["wall_s"] / new["wall_s"], 1),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
