"""The minimal tar reader agrees with `tarfile` on every kind of tar a webdataset shard can be, and fails the same way."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from pipelines.tasks.tar_reader import iter_tar_members

LONG = "a/" + "very-long-directory-name/" * 6 + "sample-0001.jpg"  # > 100 characters


def build(fmt: int, names: list[str], compress: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("a")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for index, name in enumerate(names):
            data = bytes([index % 251]) * (index * 700 + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "k0.jpg"
        tar.addfile(link)
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0) if compress == "gz" else raw


def reference(raw: bytes) -> list[tuple[str, int, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
        return [(m.name, m.offset_data, tar.extractfile(m).read()) for m in tar if m.isfile()]


NAMES = ["k0.jpg", "k0.txt", "k1.jpg", "k1.json", "dir/k2.jpg", LONG, "ünïcode.txt"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compress", ["", "gz"])
def test_members_names_offsets_and_data_equal_tarfiles(fmt: int, compress: str) -> None:
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if n != LONG]  # ustar: prefix field only
    raw = build(fmt, names, compress)
    ours = [(m.name, m.offset, m.read()) for m in iter_tar_members(io.BytesIO(raw))]
    assert ours == reference(raw)
    assert [m.name for m in iter_tar_members(io.BytesIO(raw))] == names  # data never read: seeked over


def test_ustar_prefix_field_joins_the_name() -> None:
    name = "p/" * 60 + "x.jpg"  # 125 characters: ustar splits it into prefix + name
    raw = build(tarfile.USTAR_FORMAT, [name])
    assert [m.name for m in iter_tar_members(io.BytesIO(raw))] == [name]


def test_truncated_and_corrupt_tars_raise_read_error() -> None:
    raw = build(tarfile.PAX_FORMAT, NAMES)
    cut = reference(raw)[2][1] + 100  # inside the third member's data
    members = iter_tar_members(io.BytesIO(raw[:cut]))
    assert [next(members).read() for _ in range(2)] == [d for _, _, d in reference(raw)[:2]]
    with pytest.raises(tarfile.ReadError, match="cut short"):
        next(members).read()
    with pytest.raises(tarfile.ReadError, match="ends before"):  # the cut member seeked over, not read
        list(iter_tar_members(io.BytesIO(raw[:cut])))
    padding_cut = reference(raw)[0][1] + len(reference(raw)[0][2]) + 1  # inside the first member's padding
    with pytest.raises(tarfile.ReadError, match="ends before"):
        list(iter_tar_members(io.BytesIO(raw[:padding_cut])))
    with pytest.raises(tarfile.ReadError, match="truncated header"):
        list(iter_tar_members(io.BytesIO(raw[: reference(raw)[1][1] - 300])))  # ends inside a header
    corrupt = bytearray(raw)
    corrupt[reference(raw)[1][1] - 512 + 10] ^= 0xFF  # a byte of the second member's header name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(corrupt))))
    assert list(iter_tar_members(io.BytesIO(b""))) == []  # like tarfile at the end of data: no members


def test_data_is_only_readable_at_its_member() -> None:
    raw = build(tarfile.USTAR_FORMAT, ["k0.jpg", "k0.txt"])
    members = iter_tar_members(io.BytesIO(raw))
    first = next(members)
    first.read()
    with pytest.raises(ValueError, match="already read"):
        first.read()
    second = next(members)
    next(members, None)
    with pytest.raises(ValueError, match="moved on"):  # its bytes were seeked over: never wrong data
        second.read()
