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
from typing import Any

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


def take_spilled(table: pa.Table, rows: Any) -> pa.Table:
    """`table.take(rows)` for a table read by `read_spilled`, holding only the rows taken in memory. Arrow's take
    on a chunked column of strings first concatenates the chunks (it would read the whole file into memory, at
    each call); here each chunk gives its own rows, which are then put back in the order asked for. `rows`:
    row numbers without nulls (an Arrow or numpy array)."""
    import numpy as np

    wanted = np.asarray(rows, dtype=np.int64)
    batches = table.to_batches()
    starts = np.cumsum([0] + [batch.num_rows for batch in batches])
    chunk = np.searchsorted(starts, wanted, side="right") - 1
    order = np.argsort(chunk, kind="stable")
    by_chunk, chunk_sorted = wanted[order], chunk[order]
    cuts = np.searchsorted(chunk_sorted, np.arange(len(batches) + 1))
    parts = [batches[c].take(pa.array(by_chunk[cuts[c]:cuts[c + 1]] - starts[c]))
             for c in range(len(batches)) if cuts[c + 1] > cuts[c]]  # fmt: skip
    gathered = pa.Table.from_batches(parts, schema=table.schema).combine_chunks()
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return gathered.take(pa.array(back))


def digest16(text: str) -> bytes:
    """The 128-bit digest dedup groups a string by."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
