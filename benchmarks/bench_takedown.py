"""Takedown: a version without a few samples, by rewriting only the shards that hold them vs every shard.

`run_takedown` on a version of `--shards` shards of `--per-shard` noise JPEGs (the shard stage's layout, with its
index), taking out `--samples` samples spread over two shards: the two shards are rewritten, the others hard-linked
into the new version. The obvious baseline, side by side on the same version: every shard read and written again
without the samples (what re-running a sharding with an exclusion list does). Both give the same bytes for the
rewritten shards (checked by sha256). Prints one JSON object. `python benchmarks/bench_takedown.py` (~30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_capfilt_writer import noise_jpegs  # noqa: E402  (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--side", type=int, default=384)
    parser.add_argument("--samples", type=int, default=3)
    return parser.parse_args(argv)


def publish_version(registry: Any, root: Path, args: argparse.Namespace) -> Any:
    """A dataset version as the shard stage writes it: shards/train-*.tar of <key>.jpg/.txt, and its index."""
    import hashlib

    from datasets_manifests.index import write_index
    from datasets_manifests.manifest import Producer
    from pipelines.tasks.webdata import write_tar

    jpegs = noise_jpegs(args.side, args.side * 3 // 4, count=8, quality=60)
    files, rows = [], []
    for shard in range(args.shards):
        path = f"shards/train-{shard:06d}.tar"
        members = []
        for position in range(args.per_shard):
            row = shard * args.per_shard + position
            base = jpegs[row % len(jpegs)]  # distinct bytes per sample: the JPEG comment differs
            jpg = base[:2] + b"\xff\xfe\x00\x0a" + row.to_bytes(8, "big") + base[2:]
            members += [(f"s{row:08d}.jpg", jpg), (f"s{row:08d}.txt", f"thing {row}".encode())]
        written = write_tar(root / path, members)
        for position in range(args.per_shard):
            row = shard * args.per_shard + position
            offset, size = written.data_offsets[f"s{row:08d}.jpg"]
            rows.append({"key": f"s{row:08d}", "url": f"http://127.0.0.1/{row}.jpg", "caption": f"thing {row}",
                         "raw_caption": f"thing {row}", "caption_source": "web", "split": "train", "shard": path,
                         "jpg_offset": offset, "jpg_bytes": size, "status": "ok", "drop_reason": None,
                         "image_sha256": hashlib.sha256(members[2 * position][1]).hexdigest(), "width": args.side,
                         "height": args.side * 3 // 4})  # fmt: skip
        files.append({"path": path, "role": "shard", "split": "train", "num_samples": args.per_shard})
    write_index(rows, root / "index.parquet")
    files.append({"path": "index.parquet", "role": "index"})
    return registry.publish(kind="dataset", name="web", staging_dir=root, files=files, producer=Producer(stage="bench"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from datasets_manifests.registry import Registry
    from pipelines.tasks import takedown

    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-takedown-"))
    try:
        registry = Registry(root / "registry")
        source = publish_version(registry, root / "staging", args)
        # Samples in the first and the last shard.
        picked = [f"s{n:08d}" for n in (1, 5, (args.shards - 1) * args.per_shard + 7)][: args.samples]
        began = time.perf_counter()
        new = takedown.run_takedown(registry, source, keys=picked)
        ours = time.perf_counter() - began
        assert new is not None

        taken = {entry.path for entry in new.shards() if entry.sha256 != source.file(entry.path).sha256}
        out = root / "baseline"
        began = time.perf_counter()
        baseline = {}
        for entry in source.shards():  # every shard read and written again without the samples
            written, _, _ = takedown._rewrite_shard(registry, source, entry.path, set(), set(picked), str(out))
            baseline[entry.path] = written.sha256
        full = time.perf_counter() - began
        same = all(baseline[entry.path] == entry.sha256 for entry in new.shards())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raw_mib = sum(entry.bytes for entry in source.shards()) / 2**20
    report = {
        "benchmark": "takedown", "host_cpus": os.cpu_count(), "shards": args.shards,
        "images": args.shards * args.per_shard, "mib": round(raw_mib, 1), "samples_taken_out": len(picked),
        "shards_rewritten": len(taken),
        "same_shards": same,
        "ours": {"wall_s": round(ours, 3)}, "rewrite_every_shard": {"wall_s": round(full, 3)},
        "ratio": round(full / ours, 1),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
