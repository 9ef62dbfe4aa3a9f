"""Per-sample rows kept out of the driver's memory at dataset scale (129M samples).

A stage's rows are appended to an Arrow IPC file a shard or a chunk at a time (`spill_writer`) and read back
through a memory map (`read_spilled`: zero-copy, pages are read when touched, and the kernel may drop them
again), so what stays in memory is what the stage computes on them. Duplicates are grouped by 128-bit digests
(`digest16`) instead of the strings themselves: ~n²/2¹²⁹ chance of one collision, nil at any dataset size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa


# Rows a spill file's record batches gather: a raw shard's 10k records make 13k batches at 129M samples, and
# taking rows again (`SpilledRows`) costs a call per batch that holds any of them.
SPILL_CHUNK_ROWS = 1 << 18


class ChunkingWriter:
    """`.write_table(table)` appends rows; they reach the file `chunk_rows` at a time, as one record batch."""

    def __init__(self, writer: pa.ipc.RecordBatchFileWriter, chunk_rows: int) -> None:
        self.writer, self.chunk_rows = writer, chunk_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def write_table(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending).combine_chunks())
        self.pending, self.pending_rows = [], 0


@contextmanager
def spill_writer(path: str | Path, schema: pa.Schema, chunk_rows: int = SPILL_CHUNK_ROWS) -> Iterator[ChunkingWriter]:
    """An Arrow IPC file writer at `path` (created anew): `.write_table(table)` for each part; the parts are
    written `chunk_rows` or more at a time (a batch per part when the parts are larger)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        chunking = ChunkingWriter(writer, chunk_rows)
        yield chunking
        chunking.flush()


def read_spilled(paths: list[Path], schema: pa.Schema) -> pa.Table:
    """The rows of `spill_writer` files, one table over all of them, memory-mapped."""
    tables = [pa.ipc.open_file(pa.memory_map(str(path))).read_all() for path in paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


class SpilledRows:
    """Rows of a table read by `read_spilled` taken again and again (`take`), holding only the rows taken.

    Arrow's `take` on a chunked column of strings first concatenates all its chunks: on a memory-mapped spill
    file that reads the whole file into memory at every call (at 129M records, GBs and seconds per call, for a
    stage that takes a batch of rows hundreds of times). Here each chunk gives its own rows, which are then put
    back in the order asked for; the chunks and where they start are listed once."""

    def __init__(self, table: pa.Table) -> None:
        self.schema = table.schema
        self.batches = table.to_batches()
        self.starts = np.cumsum([0] + [batch.num_rows for batch in self.batches])

    def take(self, rows: Any) -> pa.Table:
        """`table.take(rows)`; `rows`: row numbers without nulls (an Arrow or numpy array)."""
        wanted = np.asarray(rows, dtype=np.int64)
        chunk = np.searchsorted(self.starts, wanted, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        by_chunk, chunk_sorted = wanted[order], chunk[order]
        touched = np.unique(chunk_sorted)
        cuts = np.searchsorted(chunk_sorted, np.append(touched, len(self.batches)))
        parts = [self.batches[c].take(pa.array(by_chunk[cuts[i] : cuts[i + 1]] - self.starts[c]))
                 for i, c in enumerate(touched)]  # fmt: skip
        gathered = pa.Table.from_batches(parts, schema=self.schema).combine_chunks()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return gathered.take(pa.array(back))


def ascending_order(table: pa.Table, columns: list[str], block_rows: int = 1 << 20) -> np.ndarray:
    """The row numbers of `table` in ascending order of `columns` (lexicographic; ties in row order), int64.

    Rows that are in that order already (a download's, whose keys img2dataset numbers in shard order) are
    checked a block at a time, ~1 byte a row, and answered by `arange` (no sort: ~1 s per million string rows);
    otherwise Arrow sorts the columns (its indices and a merge buffer, 16 bytes a row; also where a column has
    nulls, which it sorts last)."""
    import pyarrow.compute as pc

    selected = table.select(columns)

    def sorted_rows() -> np.ndarray:
        order = pc.sort_indices(selected, sort_keys=[(name, "ascending") for name in columns])
        return order.to_numpy().astype(np.int64)

    last: tuple[Any, ...] | None = None
    for batch in selected.to_batches(max_chunksize=block_rows):
        if not batch.num_rows:
            continue
        if any(column.null_count for column in batch.columns):
            return sorted_rows()
        first = tuple(batch.column(i)[0].as_py() for i in range(len(columns)))
        backwards, tied = None, None  # pairs of neighbours out of order / equal on the columns so far
        for column in batch.columns:
            later, earlier = column[1:], column[:-1]
            less = pc.less(later, earlier)
            step = less if tied is None else pc.and_(tied, less)
            backwards = step if backwards is None else pc.or_(backwards, step)
            equal = pc.equal(later, earlier)
            tied = equal if tied is None else pc.and_(tied, equal)
        if (last is not None and first < last) or pc.any(backwards).as_py():
            return sorted_rows()
        last = tuple(batch.column(i)[-1].as_py() for i in range(len(columns)))
    return np.arange(table.num_rows, dtype=np.int64)


def digest16(text: str) -> bytes:
    """The 128-bit digest dedup groups a string by."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


# ------------------------------------------------------------------ keys by 64-bit hashes
# Checking that 129M keys are distinct, or finding each key of one index in another, with Arrow's hash kernels
# builds a hash table of the strings themselves: ~65 bytes a key (8 GB at 129M) and ~1 µs a key. Here each key
# becomes a 64-bit tabulation hash (computed on the string bytes in numpy: 8 bytes a key, ~0.1 µs), the hashes
# are sorted, and every match of hashes is confirmed on the keys themselves, so a collision costs a comparison,
# never a wrong answer.
_HASH_POSITIONS = 64  # a key's byte i uses row i % 64 of the table (keys are short; longer ones still hash)
_HASH_TABLE = (np.random.default_rng(20220128).integers(0, 2**63, size=_HASH_POSITIONS * 256, dtype=np.uint64)
               * np.uint64(2) + np.uint64(1))  # fmt: skip
_LENGTH_MIX = np.uint64(0x9E3779B97F4A7C15)


def key_hashes(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash (uint64) of each string of `keys`: the XOR of a random word per (position, byte), mixed with
    the length (simple tabulation hashing; equal strings always hash alike, in any string type or slice)."""
    if isinstance(keys, pa.ChunkedArray):
        return np.concatenate([key_hashes(chunk) for chunk in keys.chunks]) if keys.num_chunks else \
            np.zeros(0, dtype=np.uint64)  # fmt: skip
    keys = keys.cast(pa.large_string())  # int64 offsets whatever the input type
    count = len(keys)
    _, offsets_buffer, data_buffer = keys.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64, count=count + 1, offset=keys.offset * 8)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    if data_buffer is None or not lengths.any():
        return lengths.astype(np.uint64) * _LENGTH_MIX
    data = np.frombuffer(data_buffer, dtype=np.uint8, count=int(offsets[-1] - offsets[0]), offset=int(offsets[0]))
    position = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)
    words = _HASH_TABLE[(position % _HASH_POSITIONS) * 256 + data]
    hashes = np.zeros(count, dtype=np.uint64)
    filled = lengths > 0  # (reduceat would give an empty string the next string's first word)
    hashes[filled] = np.bitwise_xor.reduceat(words, starts[filled])
    return hashes ^ (lengths.astype(np.uint64) * _LENGTH_MIX)


def repeated_values(values: np.ndarray) -> np.ndarray:
    """The values that occur more than once in `values` (each once, ascending); sorts `values` in place."""
    values.sort()
    return np.unique(values[1:][values[1:] == values[:-1]])


def first_repeated_key(key_batches: Callable[[], Iterable[pa.Array | pa.ChunkedArray]],
                       hashes: list[np.ndarray] | None = None) -> tuple[Any, int] | None:  # fmt: skip
    """(a key that occurs more than once, how many times), or None, over keys too many to hold (8 bytes a key).

    `key_batches()` yields the keys a batch at a time; it is called a second time, only when two hashes are equal,
    to collect the keys with those hashes and find the repeat among them (`index.first_repeated`). `hashes`: the
    `key_hashes` of all those keys, in any order, where the caller has them already (they are then read only to
    confirm; the list is emptied, so that its arrays go once joined)."""
    from datasets_manifests.index import first_repeated

    def arrays() -> Iterator[pa.Array]:
        for keys in key_batches():
            yield from keys.chunks if isinstance(keys, pa.ChunkedArray) else [keys]

    if hashes is None:
        hashes = [key_hashes(keys) for keys in arrays()]
    every = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    hashes.clear()
    suspects = repeated_values(every)
    del every
    if not len(suspects):
        return None
    candidates = [keys.filter(pa.array(np.isin(key_hashes(keys), suspects))) for keys in arrays()]
    return first_repeated(pa.chunked_array(candidates, type=candidates[0].type))  # None: equal hashes, other keys


class KeyLookup:
    """The row of each asked key in a large column of distinct keys (a memory-mapped index's), 16 bytes a key.

    Each asked key whose hash is found is compared with the key in that row (read from the column: only those
    rows), so the answer is exact; keys of the column that share a hash are all tried. `rows`: the whole rows of
    the keys' table, when the caller wants them too (`find`): the rows read to confirm are the answer."""

    def __init__(self, keys: pa.ChunkedArray, rows: SpilledRows | None = None) -> None:
        self.source = rows or SpilledRows(pa.table({"key": keys}))  # (where the confirming keys are read from)
        hashes = key_hashes(keys)
        self.order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[self.order]
        self.shared_hashes = bool((self.hashes[1:] == self.hashes[:-1]).any())  # two keys, one hash (rare)

    def rows_of(self, asked: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int64 row of each key of `asked` in the column, -1 where it has none."""
        return self.find(asked)[0]

    def find(self, asked: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Table]:
        """`rows_of(asked)`, and the rows found (of the `rows` table, else the keys alone), in `asked`'s order."""
        import pyarrow.compute as pc

        wanted = key_hashes(asked)
        low, high = self._ranges(wanted)
        rows = np.full(len(wanted), -1, dtype=np.int64)
        asked = asked.combine_chunks() if isinstance(asked, pa.ChunkedArray) else asked
        found: list[tuple[np.ndarray, pa.Table]] = []  # (positions in asked, their rows) per round
        for tried in range(int((high - low).max(initial=0))):  # almost always one round: a hash's first row
            open_ = (rows < 0) & (low + tried < high)
            if not open_.any():
                break
            which = np.flatnonzero(open_)
            candidate = self.order[low[which] + tried]
            stored = self.source.take(candidate)
            same = pc.equal(stored.column("key"), asked.take(pa.array(which))).to_numpy(zero_copy_only=False)
            rows[which[same]] = candidate[same]
            found.append((which[same], stored.filter(pa.array(same))))
        if len(found) == 1:  # positions already in asked order
            return rows, found[0][1]
        positions = np.concatenate([where for where, _ in found]) if found else np.zeros(0, dtype=np.int64)
        table = pa.concat_tables([table for _, table in found]) if found else self.source.schema.empty_table()
        return rows, table.take(pa.array(np.argsort(positions, kind="stable")))

    def _ranges(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each wanted hash's run of equal hashes starts and ends in the sorted hashes (empty: not there)."""
        # Searched in sorted order: numpy starts each search where the previous one ended, which keeps the
        # lookups in cache (3-6x faster than random order on millions of hashes).
        order = np.argsort(wanted)
        low = np.empty(len(wanted), dtype=np.int64)
        low[order] = np.searchsorted(self.hashes, wanted[order], side="left")
        if self.shared_hashes:
            high = np.empty(len(wanted), dtype=np.int64)
            high[order] = np.searchsorted(self.hashes, wanted[order], side="right")
            return low, high
        found = self.hashes[np.minimum(low, len(self.hashes) - 1)] == wanted if len(self.hashes) else \
            np.zeros(len(wanted), dtype=bool)  # fmt: skip
        return low, low + found
