"""`spill.ascending_order`: rows already in order answered without a sort, every other case as Arrow's sort."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from datasets_manifests import spill


def _table(rows: list[tuple], chunk_rows: int) -> pa.Table:
    schema = pa.schema([("key", pa.string()), ("shard", pa.string())])
    chunks = [pa.Table.from_pylist([{"key": k, "shard": s} for k, s in rows[i : i + chunk_rows]], schema=schema)
              for i in range(0, len(rows), chunk_rows)]  # fmt: skip
    return pa.concat_tables(chunks) if chunks else schema.empty_table()


@pytest.mark.parametrize("seed", range(30))
def test_ascending_order_equals_a_stable_sort(seed, monkeypatch):
    rng = random.Random(seed)
    count = rng.randrange(0, 40)
    rows = [(rng.choice(["a", "b", "bb", "é", "z", None if seed % 7 == 0 else "c"]), rng.choice(["0", "1"]))
            for _ in range(count)]  # fmt: skip
    if seed % 3:  # in order already: the fast path must answer it, and answer it right
        rows.sort(key=lambda row: (row[0] is None, (row[0] or "").encode(), row[1]))
    sorts = []
    import pyarrow.compute as pc

    real_sort = pc.sort_indices
    monkeypatch.setattr(pc, "sort_indices", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    table = _table(rows, rng.randrange(1, 9))
    got = spill.ascending_order(table, ["key", "shard"], block_rows=rng.choice([1, 2, 5, 1 << 20]))
    expected = sorted(range(count), key=lambda row: (rows[row][0] is None, (rows[row][0] or "").encode(),
                                                     rows[row][1], row))  # fmt: skip
    assert got.dtype == np.int64 and got.tolist() == expected
    in_order = expected == list(range(count)) and all(key is not None for key, _ in rows)
    assert sorts == ([] if in_order else [1])  # sorted only when it had to


def test_ascending_order_sees_a_step_back_between_blocks_and_on_the_second_column():
    in_blocks = _table([("a", "0"), ("c", "0"), ("b", "0"), ("d", "0")], 2)  # each block of 2 in order
    assert spill.ascending_order(in_blocks, ["key", "shard"], block_rows=2).tolist() == [0, 2, 1, 3]
    ties = _table([("a", "1"), ("a", "0")], 2)
    assert spill.ascending_order(ties, ["key", "shard"]).tolist() == [1, 0]
    assert spill.ascending_order(ties, ["key"]).tolist() == [0, 1]  # equal keys keep their row order
