"""Keys by 64-bit hashes (`spill.key_hashes`, `first_repeated_key`, `KeyLookup`): what verify, the download's
completeness check and the diff use instead of Arrow hash tables of the key strings. Each answer is compared with
Arrow's own, and with a hash that collides on purpose (every match must be confirmed on the keys)."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from datasets_manifests import spill
from datasets_manifests.index import first_repeated
from datasets_manifests.spill import KeyLookup, SpilledRows, first_repeated_key, key_hashes


def _keys(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.randrange(10**12):012d}-{'x' * rng.randrange(4)}" for _ in range(count)]


def test_equal_strings_hash_alike_in_any_type_and_slice() -> None:
    words = ["", "a", "ab", "ba", "abc", "é", "x" * 200, "0" * 64 + "1", "0" * 64 + "2"]
    hashes = key_hashes(pa.array(words))
    assert len(set(hashes.tolist())) == len(words)  # short distinct strings, long ones past the 64-byte table
    assert np.array_equal(key_hashes(pa.array(words, pa.large_string())), hashes)
    assert np.array_equal(key_hashes(pa.array(words).slice(3, 4)), hashes[3:7])
    chunked = pa.chunked_array([pa.array(words[:4]), pa.array(words[4:])])
    assert np.array_equal(key_hashes(chunked), hashes)
    assert np.array_equal(key_hashes(pa.array(["", ""])), np.zeros(2, dtype=np.uint64))
    assert len(set(key_hashes(pa.array(_keys(100_000))).tolist())) == len(set(_keys(100_000)))


def _weak_hashes(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A hash with many collisions (the last character): every answer must still be exact."""
    values = keys.to_pylist()
    return np.array([ord(v[-1]) if v else 0 for v in values], dtype=np.uint64)


@pytest.mark.parametrize("weak", [False, True])
def test_first_repeated_key_equals_arrow(weak: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if weak:
        monkeypatch.setattr(spill, "key_hashes", _weak_hashes)
    distinct = _keys(5_000)
    distinct = list(dict.fromkeys(distinct))
    batches = [pa.array(distinct[start:start + 700]) for start in range(0, len(distinct), 700)]
    assert first_repeated_key(lambda: batches) is None
    repeated = distinct + [distinct[1234], distinct[1234]]  # three times, two of them in another batch
    found = first_repeated_key(lambda: [pa.array(repeated[:3000]), pa.chunked_array([pa.array(repeated[3000:])])])
    assert found == (distinct[1234], 3) == first_repeated(pa.array(repeated))
    assert first_repeated_key(lambda: []) is None


@pytest.mark.parametrize("weak", [False, True])
def test_key_lookup_gives_each_row_exactly(weak: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if weak:
        monkeypatch.setattr(spill, "key_hashes", _weak_hashes)
    column = list(dict.fromkeys(_keys(3_000, seed=1)))
    chunks = pa.chunked_array([pa.array(column[start:start + 500]) for start in range(0, len(column), 500)])
    lookup = KeyLookup(chunks)
    asked = random.Random(2).sample(column, 400) + _keys(300, seed=3) + [""]
    expected = {key: row for row, key in enumerate(column)}
    rows = lookup.rows_of(pa.array(asked))
    assert rows.tolist() == [expected.get(key, -1) for key in asked]
    assert lookup.rows_of(pa.array([], pa.string())).tolist() == []
    # With the whole rows (the diff): the rows read to confirm are handed back, in the asked order, also when
    # a shared hash takes several rounds (weak hashes).
    table = pa.table({"key": chunks, "row": pa.chunked_array([pa.array(range(len(column)))])})
    whole = KeyLookup(chunks, rows=SpilledRows(table))
    rows, found = whole.find(pa.array(asked))
    assert rows.tolist() == [expected.get(key, -1) for key in asked]
    assert found.to_pylist() == [{"key": key, "row": expected[key]} for key in asked if key in expected]
    assert whole.find(pa.array(["nowhere"]))[1].num_rows == 0
