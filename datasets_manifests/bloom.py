"""Parquet's split-block Bloom filters, probed: which row groups of an index may hold a value.

The index writes one per row group for the columns a sample is looked up by (`BLOOM_COLUMNS`: key, url,
image_sha256), ~1 % false positives at 64 Ki distinct values: ~128 KiB a row group, against ~0.5-4 MiB for the
column chunk itself (URLs, hashes and CapFilt's shuffled hex keys do not compress; a key in a version sorted by
key is found by the row groups' min/max statistics too). pyarrow writes them but neither its dataset scanner nor
its Python API reads them, so this does, after the format's specification (parquet-format, BloomFilter.md): a
Thrift header (numBytes, and the algorithm, hash and compression, each of which has one value: split-block,
xxHash64, uncompressed), then numBytes of 32-byte blocks. A value (a BYTE_ARRAY's bytes, no length prefix) is
hashed with xxHash64 (seed 0); the top 32 bits pick a block, the low 32 bits, times 8 salts, one bit in each of
its 8 words. A filter says "maybe" or "surely not": a row group whose filters all say "surely not" is not read.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

BLOOM_COLUMNS = ("key", "url", "image_sha256")
BLOOM_FPP = 0.01

_SALTS = (0x47B6137B, 0x44974D91, 0x8824AD5B, 0xA2B7289D, 0x705495C7, 0x2DF1424B, 0x9EFC4947, 0x5C6BFB31)
_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                           0x27D4EB2F165667C5)  # fmt: skip
_MASK = (1 << 64) - 1


def bloom_filter_options(row_group_rows: int, columns: Iterable[str]) -> dict[str, dict[str, Any]]:
    """pyarrow's `bloom_filter_options` for the `columns` an index has (a row group's values are at most its rows)."""
    return {column: {"ndv": row_group_rows, "fpp": BLOOM_FPP} for column in BLOOM_COLUMNS if column in columns}


def xxhash64(data: bytes, seed: int = 0) -> int:
    """xxHash64 (Yann Collet's), in Python: a takedown hashes a few values, once each."""

    def rotl(value: int, bits: int) -> int:
        return ((value << bits) | (value >> (64 - bits))) & _MASK

    def step(acc: int, lane: int) -> int:
        return rotl((acc + lane * _P2) & _MASK, 31) * _P1 & _MASK

    size, at = len(data), 0
    if size >= 32:
        accs = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed & _MASK, (seed - _P1) & _MASK]
        while at + 32 <= size:
            lanes = struct.unpack_from("<4Q", data, at)
            accs = [step(acc, lane) for acc, lane in zip(accs, lanes)]
            at += 32
        digest = (rotl(accs[0], 1) + rotl(accs[1], 7) + rotl(accs[2], 12) + rotl(accs[3], 18)) & _MASK
        for acc in accs:
            digest = ((digest ^ step(0, acc)) * _P1 + _P4) & _MASK
    else:
        digest = (seed + _P5) & _MASK
    digest = (digest + size) & _MASK
    while at + 8 <= size:
        digest = (rotl(digest ^ step(0, struct.unpack_from("<Q", data, at)[0]), 27) * _P1 + _P4) & _MASK
        at += 8
    if at + 4 <= size:
        digest = (rotl(digest ^ (struct.unpack_from("<I", data, at)[0] * _P1 & _MASK), 23) * _P2 + _P3) & _MASK
        at += 4
    while at < size:
        digest = rotl(digest ^ (data[at] * _P5 & _MASK), 11) * _P1 & _MASK
        at += 1
    digest = (digest ^ (digest >> 33)) * _P2 & _MASK
    digest = (digest ^ (digest >> 29)) * _P3 & _MASK
    return digest ^ (digest >> 32)


def value_hashes(values: Iterable[str]) -> list[int]:
    return [xxhash64(value.encode()) for value in values]


def filter_bitset(blob: bytes) -> bytes:
    """The blocks of a filter as written (header + bitset); ValueError for anything but the format's one kind."""
    if not blob or blob[0] != 0x15:  # Thrift compact: field 1 (numBytes), type i32
        raise ValueError("not a Parquet Bloom filter header")
    shift = num_bytes = 0
    at = 1
    while True:  # a zigzag varint
        byte = blob[at]
        num_bytes |= (byte & 0x7F) << shift
        at += 1
        shift += 7
        if not byte & 0x80:
            break
    num_bytes = (num_bytes >> 1) ^ -(num_bytes & 1)
    if num_bytes <= 0 or num_bytes % 32 or num_bytes > len(blob) - at:
        raise ValueError(f"a Parquet Bloom filter of {num_bytes} bytes in {len(blob)}")
    # The rest of the header is three unions, each holding an empty struct: their bytes end where the bitset starts.
    return blob[len(blob) - num_bytes:]


def may_contain(bitset: bytes, hashes: Iterable[int]) -> bool:
    """Whether the filter may hold any of the values hashed to `hashes` (False: surely none of them)."""
    blocks = len(bitset) // 32
    for digest in hashes:
        start = ((digest >> 32) * blocks >> 32) * 32
        words = struct.unpack_from("<8I", bitset, start)
        key = digest & 0xFFFFFFFF
        if all(words[i] >> ((key * salt & 0xFFFFFFFF) >> 27) & 1 for i, salt in enumerate(_SALTS)):
            return True
    return False


def row_groups_to_read(metadata: Any, handle: Any, wanted: dict[str, list[int]]) -> list[int]:
    """The row groups of a Parquet file (its `metadata`) that may hold a value of `wanted` (column -> value hashes):
    those where one of the columns has no filter or its filter says maybe. `handle` is the file, open for reading
    (one small read per filter)."""
    names = metadata.schema.to_arrow_schema().names
    groups = []
    for group in range(metadata.num_row_groups):
        for column, hashes in wanted.items():
            chunk = metadata.row_group(group).column(names.index(column))
            offset, length = chunk.bloom_filter_offset, chunk.bloom_filter_length
            if offset is None or not length or may_contain(filter_bitset(_read_at(handle, offset, length)), hashes):
                groups.append(group)
                break
    return groups


def _read_at(handle: Any, offset: int, length: int) -> bytes:
    handle.seek(offset)
    return handle.read(length)
