"""datasets_manifests.bloom: the Bloom filters pyarrow writes into an index, probed here."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets_manifests.bloom import filter_bitset, may_contain, row_groups_to_read, value_hashes, xxhash64


def test_xxhash64_gives_the_reference_values():
    # xxHash's published values for "" and "abc"; the others from the reference implementation (python-xxhash),
    # one per branch: under 4 bytes, 8-byte lanes with a 4-byte and 1-byte tail, one and several 32-byte stripes.
    assert xxhash64(b"") == 0xEF46DB3751D8E999
    assert xxhash64(b"abc") == 0x44BC2CF5AD770999
    assert xxhash64(b"http://h/1.jpg") == 0x7911605EFBDA41D9
    assert xxhash64(b"a" * 32) == 0x856E843298F99AD7
    assert xxhash64(bytes(range(100))) == 0x6AC1E58032166597


def test_the_filters_pyarrow_writes_hold_every_value_and_few_others(tmp_path):
    urls = [f"https://cdn.example.org/{n:x}/{n * 7919 % 100003}.jpg" for n in range(6000)]
    path = tmp_path / "index.parquet"
    pq.write_table(pa.table({"url": urls}), path, row_group_size=2000,
                   bloom_filter_options={"url": {"ndv": 2000, "fpp": 0.01}})  # fmt: skip
    metadata = pq.read_metadata(path)
    blob = path.read_bytes()
    for group in range(3):
        chunk = metadata.row_group(group).column(0)
        bitset = filter_bitset(blob[chunk.bloom_filter_offset:chunk.bloom_filter_offset + chunk.bloom_filter_length])
        assert all(may_contain(bitset, [digest]) for digest in value_hashes(urls[group * 2000:(group + 1) * 2000]))
        others = value_hashes(f"http://elsewhere.example.com/{n}.jpg" for n in range(4000))
        assert sum(may_contain(bitset, [digest]) for digest in others) < 4000 * 0.03  # ~1 % asked
    with open(path, "rb") as handle:
        assert row_groups_to_read(metadata, handle, {"url": value_hashes([urls[10], urls[4500]])}) == [0, 2]
        assert row_groups_to_read(metadata, handle, {"url": value_hashes(["http://elsewhere.example.com/x"])}) == []
    with pytest.raises(ValueError, match="not a Parquet Bloom filter header"):
        filter_bitset(b"\x00\x01")


def test_a_file_without_filters_has_every_row_group_read(tmp_path):
    path = tmp_path / "old.parquet"
    pq.write_table(pa.table({"url": [f"u{n}" for n in range(10)]}), path, row_group_size=4)
    metadata = pq.read_metadata(path)
    assert row_groups_to_read(metadata, None, {"url": value_hashes(["u1"])}) == [0, 1, 2]  # nothing to read
