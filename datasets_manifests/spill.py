"""Per-sample rows kept out of the driver's memory at dataset scale (129M samples).

A stage's rows are appended to an Arrow IPC file a shard or a chunk at a time (`spill_writer`) and read back
through a memory map (`read_spilled`: zero-copy, pages are read when touched, and the kernel may drop them
again), so what stays in memory is what the stage computes on them. Duplicates are grouped by 128-bit digests
(`digest16`) instead of the strings themselves: ~n²/2¹²⁹ chance of one collision, nil at any dataset size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa


@contextmanager
def spill_writer(path: str | Path, schema: pa.Schema) -> Iterator[pa.ipc.RecordBatchFileWriter]:
    """An Arrow IPC file writer at `path` (created anew): `.write_table(table)` for each part."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        yield writer


def read_spilled(paths: list[Path], schema: pa.Schema) -> pa.Table:
    """The rows of `spill_writer` files, one table over all of them, memory-mapped."""
    tables = [pa.ipc.open_file(pa.memory_map(str(path))).read_all() for path in paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def digest16(text: str) -> bytes:
    """The 128-bit digest dedup groups a string by."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
