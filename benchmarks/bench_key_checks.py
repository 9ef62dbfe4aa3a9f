"""Are 129M keys distinct? `spill.first_repeated_key` (64-bit hashes of the keys, sorted; equal hashes confirmed
on the keys) vs Arrow's `count_distinct` over the key strings (the check before), each side in a fresh process.

`blip data verify` asks it of an index whose keys are not in increasing order (a CapFilt version's, listed in
shard order), and the download asks it of its rows before publishing. The keys (`--rows`, 12-digit strings plus a
suffix, shuffled) sit in a memory-mapped Arrow file as those rows do, in chunks of 262,144; one key is repeated at
the far end, and both sides must name it. Reports wall time and peak anonymous memory above the process's start.
Prints one JSON object. `python benchmarks/bench_key_checks.py` (~1 min on 2 cores at 10M keys).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peak_memory import benchmark_main, measure_side, run_sides  # noqa: E402  (benchmarks/ is the script's directory)

CHUNK = 1 << 18


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="keys to check")
    parser.add_argument("--side", choices=["hashes", "arrow"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_keys(path: Path, rows: int) -> str:
    """`rows` shuffled distinct keys and, last, a repeat of one of them; returns the repeated key."""
    import numpy as np
    import pyarrow as pa

    from datasets_manifests.spill import spill_writer

    order = np.random.default_rng(0).permutation(rows)
    schema = pa.schema([("key", pa.string())])
    with spill_writer(path, schema) as writer:
        for start in range(0, rows, CHUNK):
            numbers = order[start:start + CHUNK]
            keys = np.char.add(np.char.zfill(numbers.astype(str), 12), "-web")
            writer.write_table(pa.table({"key": pa.array(keys.tolist(), pa.string())}))
        repeated = f"{int(order[rows // 3]):012d}-web"
        writer.write_table(pa.table({"key": pa.array([repeated], pa.string())}))
    return repeated


def child(args: argparse.Namespace) -> None:
    import pyarrow as pa

    from datasets_manifests.index import first_repeated
    from datasets_manifests.spill import first_repeated_key, read_spilled

    directory = Path(args.dir)
    keys = read_spilled([directory / "keys.arrow"], pa.schema([("key", pa.string())])).column("key")

    def work() -> dict[str, Any]:
        found = first_repeated_key(lambda: keys.chunks) if args.side == "hashes" else first_repeated(keys)
        return {"found": list(found) if found else None}

    measure_side(directory, args.side, work)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sides in fresh processes and print the comparison."""
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as tmp:
        directory = Path(tmp)
        repeated = write_keys(directory / "keys.arrow", args.rows)
        results = run_sides(__file__, ("arrow", "hashes"), directory, "--rows", str(args.rows))
    keys = args.rows + 1
    report = {
        "benchmark": "key_checks", "host_cpus": os.cpu_count(), "keys": keys,
        "both_name_the_repeat": all(results[side]["found"] == [repeated, 2] for side in results),
        **{side: {"wall_s": round(results[side]["wall_s"], 2), "peak_mib": round(results[side]["peak_mib"], 1),
                  "bytes_per_key": round(results[side]["peak_mib"] * 2**20 / keys, 1)} for side in results},
        "memory_ratio": round(results["arrow"]["peak_mib"] / max(results["hashes"]["peak_mib"], 1e-9), 1),
        "time_ratio": round(results["arrow"]["wall_s"] / results["hashes"]["wall_s"], 2),
        "at_129m_gib": {side: round(results[side]["peak_mib"] * 2**20 / keys * 129e6 / 2**30, 1) for side in results},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


main = benchmark_main(parse_args, child, report)

if __name__ == "__main__":
    main()
