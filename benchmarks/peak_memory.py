"""What the driver-memory benchmarks share: each side runs in a fresh process (`run_side`, `run_sides`), which
samples its own peak anonymous memory (`AnonymousMemoryPeak`, `measure_side`), so one side's heap never counts
against the other's; `benchmark_main` is their `main`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


class AnonymousMemoryPeak:
    """Peak of the process's anonymous resident memory (RssAnon: heap, Arrow and numpy buffers), sampled every
    5 ms. Not ru_maxrss: that counts the pages of memory-mapped files too, which the kernel can drop and read
    again (page cache, not memory the process needs)."""

    def __init__(self) -> None:
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def run_side(script: str, side: str, *arguments: str) -> None:
    """`python script --side side arguments...` in a fresh process, with the project importable."""
    subprocess.run([sys.executable, script, "--side", side, *arguments], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip


def measure_side(directory: Path, side: str, work: Callable[[], dict[str, Any]]) -> None:
    """`work()` in this (fresh) process, with its wall time and peak anonymous memory above the start: writes
    {"wall_s", "peak_mib", **what `work` returned} to `directory`/<side>.json, which `run_sides` reads."""
    start = AnonymousMemoryPeak.now()
    memory = AnonymousMemoryPeak()
    began = time.perf_counter()
    result = work()
    wall = time.perf_counter() - began
    peak = memory.stop()
    (directory / f"{side}.json").write_text(json.dumps({"wall_s": wall, "peak_mib": (peak - start) / 2**20, **result}))


def run_sides(script: str, sides: tuple[str, ...], directory: Path, *arguments: str) -> dict[str, dict[str, Any]]:
    """Each side in a fresh process (`script --side SIDE --dir directory arguments...`): its `measure_side` results."""
    results = {}
    for side in sides:
        run_side(script, side, "--dir", str(directory), *arguments)
        results[side] = json.loads((directory / f"{side}.json").read_text())
    return results


def benchmark_main(parse_args: Callable[[list[str] | None], Any], child: Callable[[Any], None],
                   report: Callable[[Any], dict[str, Any]]) -> Callable[[list[str] | None], dict[str, Any]]:
    """A side-by-side benchmark's `main(argv)`: in a side's fresh process (`--side`, started by `run_side`) it
    runs `child(args)`; in the parent, `report(args)`, which runs the sides and prints the comparison."""

    def main(argv: list[str] | None = None) -> dict[str, Any]:
        args = parse_args(argv)
        if args.side:
            child(args)
            return {}
        return report(args)

    return main
