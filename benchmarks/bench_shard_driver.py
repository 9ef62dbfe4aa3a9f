"""The shard stage's driver at dataset scale: records on disk + array decisions vs Python dicts + a loop.

Between its two passes over the images, the shard stage's driver holds one record per raw sample, decides the
exact dedup (repeated key, URL, image sha256: the first in key order stays), cuts each split's seeded shuffle
into output shards, and writes the index. It did that on a list of Python dicts (the stage before; rebuilt
here as the baseline): several hundred bytes to a kilobyte per sample, so 129M samples needed well over 100 GB
on one machine. Now pass 1's records go to an Arrow file that the driver memory-maps, and the decisions are
array operations (`shard._decide`, `shard.plan_output_shards`, the index written a batch at a time).

Both sides run in fresh processes on the same `--records` generated records (~1 % repeated URLs, ~1 % repeated
images, ~2 % dropped by pass 1); the images are not written (offsets are made up, the same on both sides).
Reports wall time and peak anonymous memory above the process's start (RssAnon, sampled), and checks that both write the same
index.parquet and plan the same shards. Prints one JSON object. `python benchmarks/bench_shard_driver.py` (~1
min on 2 cores at 1M records).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peak_memory import AnonymousMemoryPeak, benchmark_main, run_side  # noqa: E402  (the script's directory)

PER_RAW_SHARD = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--sorted-keys", action="store_true",
                        help="keys in raw shard order, as img2dataset numbers them (the decision skips its sort)")
    parser.add_argument("--side", choices=["arrays", "dicts"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def generated_records(first: int, count: int, sorted_keys: bool = False) -> list[dict[str, Any]]:
    """Records as pass 1 makes them (`shard._record`), deterministic in the row number; keys random, or in row
    order (`sorted_keys`: img2dataset's numbering, a download's records come in key order)."""
    records = []
    for row in range(first, first + count):
        rng = random.Random(row)
        url_of = rng.randrange(row + 1) if rng.random() < 0.01 else row  # ~1 % repeat an earlier URL
        image_of = rng.randrange(row + 1) if rng.random() < 0.01 else row
        sha = hashlib.sha256(image_of.to_bytes(8, "big")).hexdigest()
        caption = " ".join(rng.choice(("a", "red", "square", "photo", "of", "the", "blue", "circle", "on", "grass"))
                           for _ in range(12))  # fmt: skip
        status, reason = ("dropped", "corrupt_image") if rng.random() < 0.02 else ("ok", None)
        records.append({
            "key": f"{0 if sorted_keys else rng.randrange(10**9):09d}{row:09d}",
            "url": f"http://images.example.com/p/{url_of}/photo.jpg",
            "raw_caption": caption.title() + "!", "caption": caption, "source_shard": f"raw/{row // PER_RAW_SHARD:05d}.tar",
            "status": status, "drop_reason": reason, "width": 384, "height": 288, "image_sha256": sha,
            "source_offset": 512 + (row % PER_RAW_SHARD) * 50_000, "source_bytes": 48_000, "reencode": False,
        })  # fmt: skip
    return records


def made_up_offsets(row: int) -> tuple[int, int]:
    return 1024 * row, 48_000


def run_arrays(count: int, out: Path, sorted_keys: bool) -> dict[str, Any]:
    """The stage now: records appended to an Arrow file shard by shard, memory-mapped, decided on arrays."""
    import numpy as np
    import pyarrow as pa

    from datasets_manifests.index import write_index_batches
    from datasets_manifests.spill import digest16, read_spilled, spill_writer
    from pipelines.tasks import shard

    cfg = shard.ShardConfig(samples_per_shard=10_000, val_fraction=0.01)
    path = out / shard.RECORDS_FILE
    with spill_writer(path, shard.RECORD_SCHEMA) as writer:
        for first in range(0, count, PER_RAW_SHARD):  # what pass 1's workers send back, one raw shard at a time
            records = generated_records(first, min(PER_RAW_SHARD, count - first), sorted_keys)
            for record in records:
                record["split"] = shard.split_of(record["key"], cfg.val_fraction)
                record["url_hash"] = digest16(record["url"])
                record["image_hash"] = bytes.fromhex(record["image_sha256"][:32])
            writer.write_table(pa.Table.from_pylist(records, schema=shard.RECORD_SCHEMA))
    memory = AnonymousMemoryPeak()
    start = memory.peak
    began = time.perf_counter()
    records = read_spilled([path], shard.RECORD_SCHEMA)
    decision = shard._decide(records, cfg)
    slices = shard.plan_output_shards(cfg, records, decision)
    written = shard.Written([], np.full(len(records), -1, dtype=np.int32), np.zeros(len(records), dtype=np.int64),
                            np.zeros(len(records), dtype=np.int64))  # fmt: skip
    for split, index, rows in slices:
        written.shard_of[rows] = len(written.shard_paths)
        written.shard_paths.append(f"shards/{split}-{index:06d}.tar")
        written.jpg_offset[rows], written.jpg_bytes[rows] = made_up_offsets(rows)
    decisions_peak = max(memory.peak, memory.now())  # what grows with the records; the index batches do not
    write_index_batches(shard._index_batches(records, decision, written), out / "index.parquet")
    wall_s = time.perf_counter() - began
    peak = memory.stop()  # the stage's work; the comparison of takes below is not part of it
    plan = [(split, index, [records.column("key")[int(row)].as_py() for row in rows[:3]]) for split, index, rows in slices]
    return {"wall_s": wall_s, "start": start, "memory": memory, "peak": peak, "plan": plan,
            "decisions_peak_mib": round((decisions_peak - start) / 2**20, 1),
            "pass2_take": pass2_takes(records, slices[:3])}


def pass2_takes(records: Any, slices: list[Any]) -> dict[str, Any]:
    """Pass 2 gathers each output shard's records (`shard._PASS2_COLUMNS`) before writing it: seconds per shard
    with `SpilledRows` (the chunks that hold its rows) and with Arrow's `take` (the stage before, which copied
    every record's strings at each call: grows with the records, not the shard), and the same rows both ways."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from datasets_manifests.spill import SpilledRows
    from pipelines.tasks import shard

    columns = records.select(shard._PASS2_COLUMNS)
    spilled = SpilledRows(columns)
    began = time.perf_counter()
    ours = [spilled.take(rows) for _, _, rows in slices]
    ours_s = (time.perf_counter() - began) / max(len(slices), 1)
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # counts what Arrow's take allocates, peak included
    began = time.perf_counter()
    arrows = [pc.take(columns, pa.array(rows), memory_pool=pool) for _, _, rows in slices]
    arrow_s = (time.perf_counter() - began) / max(len(slices), 1)
    same = all(a.equals(b) for a, b in zip(ours, arrows))
    del arrows  # before their pool
    return {"rows_per_shard": len(slices[0][2]) if slices else 0, "spilled_rows_s": round(ours_s, 4),
            "arrow_take_s": round(arrow_s, 4), "arrow_take_peak_mib": round(pool.max_memory() / 2**20),
            "same_rows": same}  # fmt: skip


def run_dicts(count: int, out: Path, sorted_keys: bool) -> dict[str, Any]:
    """The stage before: one dict per record in a list, the dedup a loop with three sets, the index from rows."""
    from datasets_manifests.index import validate_index, write_index
    from pipelines.tasks.shard import ShardConfig, split_of

    cfg = ShardConfig(samples_per_shard=10_000, val_fraction=0.01)
    memory = AnonymousMemoryPeak()
    start = memory.peak
    began = time.perf_counter()
    records: list[dict[str, Any]] = []
    for first in range(0, count, PER_RAW_SHARD):
        records.extend(generated_records(first, min(PER_RAW_SHARD, count - first), sorted_keys))
    generated_s = time.perf_counter() - began  # not counted: pass 1's workers made these
    began = time.perf_counter()
    records.sort(key=lambda record: (record["key"], record["source_shard"]))
    seen_keys, seen_urls, seen_images = set(), set(), set()
    for record in records:
        if record["status"] != "ok":
            continue
        if record["key"] in seen_keys:
            record.update(status="dropped", drop_reason="duplicate_key")
        elif record["url"] in seen_urls:
            record.update(status="dropped", drop_reason="duplicate_url")
        elif record["image_sha256"] in seen_images:
            record.update(status="dropped", drop_reason="duplicate_image")
        seen_keys.add(record["key"])
        if record["status"] == "ok":
            seen_urls.add(record["url"])
            seen_images.add(record["image_sha256"])
    by_split: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["status"] == "ok":
            record["split"] = split_of(record["key"], cfg.val_fraction)
            by_split.setdefault(record["split"], []).append(record)
    plan = []
    row_of = {id(record): row for row, record in enumerate(_rows_in_file_order(records))}
    for split in sorted(by_split):
        order = by_split[split]
        random.Random(f"{cfg.seed}:{split}").shuffle(order)
        for first in range(0, len(order), cfg.samples_per_shard):
            chunk = order[first : first + cfg.samples_per_shard]
            index = first // cfg.samples_per_shard
            for record in chunk:
                record["shard"] = f"shards/{split}-{index:06d}.tar"
                record["jpg_offset"], record["jpg_bytes"] = made_up_offsets(row_of[id(record)])
            plan.append((split, index, [record["key"] for record in chunk[:3]]))
    columns = ("key", "url", "image_sha256", "width", "height", "caption", "raw_caption", "split", "shard",
               "jpg_offset", "jpg_bytes", "status", "drop_reason")  # fmt: skip
    rows = [{**{c: r.get(c) for c in columns}, "caption_source": "web",
             **({"split": None, "shard": None, "jpg_offset": None, "jpg_bytes": None} if r["status"] != "ok" else {})}
            for r in records if r["drop_reason"] != "duplicate_key"]  # fmt: skip
    write_index(validate_index(rows), out / "index.parquet")
    return {"wall_s": time.perf_counter() - began, "start": start, "memory": memory, "plan": plan,
            "generated_s": generated_s}


def _rows_in_file_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records in the order pass 1 produced them (the row numbers the array side's offsets are made from)."""
    return sorted(records, key=lambda record: int(record["key"][9:]))


def child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    result = (run_arrays if args.side == "arrays" else run_dicts)(args.records, out, args.sorted_keys)
    stopped = result.pop("memory").stop()
    result["peak_mib_above_start"] = round((result.pop("peak", stopped) - result.pop("start")) / 2**20, 1)
    (out / "result.json").write_text(json.dumps(result))


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sides in fresh processes and print the comparison."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-shard-driver-") as tmp:
        for side in ("dicts", "arrays"):
            out = Path(tmp) / side
            out.mkdir()
            run_side(__file__, side, "--records", str(args.records), "--out", str(out),
                     *(["--sorted-keys"] if args.sorted_keys else []))  # fmt: skip
            results[side] = json.loads((out / "result.json").read_text())
        same_index = (Path(tmp) / "dicts/index.parquet").read_bytes() == (Path(tmp) / "arrays/index.parquet").read_bytes()
    same_plan = results["dicts"].pop("plan") == results["arrays"].pop("plan")
    per_sample = {"dicts": round(results["dicts"]["peak_mib_above_start"] * 2**20 / args.records),
                  "arrays": round(results["arrays"]["decisions_peak_mib"] * 2**20 / args.records)}
    batch_mib = results["arrays"]["peak_mib_above_start"] - results["arrays"]["decisions_peak_mib"]
    report = {
        "benchmark": "shard_driver", "host_cpus": os.cpu_count(), "records": args.records,
        "sorted_keys": args.sorted_keys, "pass2_take_per_output_shard": results["arrays"]["pass2_take"],
        "same_index": same_index, "same_plan": same_plan,
        "arrays": {"wall_s": round(results["arrays"]["wall_s"], 2), "peak_mib": results["arrays"]["peak_mib_above_start"],
                   "decisions_peak_mib": results["arrays"]["decisions_peak_mib"],
                   "decisions_bytes_per_record": per_sample["arrays"]},
        "dicts": {"wall_s": round(results["dicts"]["wall_s"], 2), "peak_mib": results["dicts"]["peak_mib_above_start"],
                  "bytes_per_record": per_sample["dicts"]},
        "memory_ratio": round(results["dicts"]["peak_mib_above_start"] / results["arrays"]["peak_mib_above_start"], 1),
        "time_ratio": round(results["dicts"]["wall_s"] / results["arrays"]["wall_s"], 2),
        # Extrapolated: the dicts grow with the records; on the array side only the decisions do (an index batch
        # is INDEX_BATCH_ROWS rows whatever the size).
        "at_129m_gib": {"dicts": round(per_sample["dicts"] * 129e6 / 2**30),
                        "arrays": round((per_sample["arrays"] * 129e6 + max(batch_mib, 0) * 2**20) / 2**30)},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


main = benchmark_main(parse_args, child, report)

if __name__ == "__main__":
    main()
