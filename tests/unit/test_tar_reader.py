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
    # Cut exactly between two members: tarfile reads it as a whole tar, its later members silently gone
    short = build(tarfile.USTAR_FORMAT, ["k0.jpg", "k0.txt", "k1.jpg", "k1.txt"])
    boundary = reference(short)[2][1] - 512  # where the third member's header starts
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(short[:boundary])) if m.isfile()] == ["k0.jpg", "k0.txt"]
    members = iter_tar_members(io.BytesIO(short[:boundary]))
    assert [next(members).name for _ in range(2)] == ["k0.jpg", "k0.txt"]
    with pytest.raises(tarfile.ReadError, match="ends at byte .* without its end-of-archive blocks"):
        next(members)


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


def _samples_tar(count: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in range(count):
            for extension in ("jpg", "json", "txt"):
                data = f"{sample}.{extension}".encode() * 50
                info = tarfile.TarInfo(f"{sample:04d}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _CountingReads(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_every_sample_reader_groups_the_same_way_and_keeps_its_contract_on_a_broken_tar(tmp_path) -> None:
    from collections import Counter

    from pipelines.tasks import train_data, webdata

    raw = _samples_tar(6)
    whole = list(webdata.group_tar(io.BytesIO(raw)))
    assert [(s.ordinal, s.key) for s in whole] == [(n, f"{n:04d}") for n in range(6)]
    assert whole[2].members == {e: f"2.{e}".encode() * 50 for e in ("jpg", "json", "txt")}
    assert all(raw[s.offsets["txt"]:s.offsets["txt"] + 5] == f"{s.ordinal}.txt".encode() for s in whole)
    # A window: samples before `start` are seeked over (their headers read, not their data).
    counting = _CountingReads(raw)
    window = list(webdata.group_tar(counting, start=4, stop=5))
    assert [(s.ordinal, s.key) for s in window] == [(4, "0004")] and window[0].members == whole[4].members
    assert counting.read_bytes < 512 * 16 + 3 * 512
    # Chosen samples: the others' headers are read, their data is not (a training loader worker's own samples).
    counting = _CountingReads(raw)
    chosen = list(webdata.group_tar(counting, wanted={1, 4}))
    assert [(s.ordinal, s.key) for s in chosen] == [(1, "0001"), (4, "0004")]
    assert [s.members for s in chosen] == [whole[1].members, whole[4].members]
    assert counting.read_bytes < 512 * 18 + 2 * 3 * 512 + 2 * 512  # every header, two samples' data, the end
    path = tmp_path / "six.tar"
    path.write_bytes(raw)
    assert [s["__key__"] for s in train_data.iter_tar_samples(str(path), 2, 4)] == ["0002", "0003"]
    assert [(o, k) for o, k, _ in webdata.iter_tar_samples(io.BytesIO(raw))] == [(s.ordinal, s.key) for s in whole]

    # Cut inside sample 3's .json data: samples 0-2 come out whole, sample 3 (incomplete) never does.
    cut = raw[:whole[3].offsets["json"] + 10]
    counts: Counter = Counter()
    assert [s.key for s in webdata.iter_tar(io.BytesIO(cut), counts)] == ["0000", "0001", "0002"]
    assert counts == {"truncated_shard": 1}  # counted, never raised
    # ... but the reading failing (a connection reset mid-shard) is raised: a rerun may read it whole
    class ResetMidway(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            if self.tell() > whole[3].offsets["json"]:
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(size)

    with pytest.raises(ConnectionResetError):
        list(webdata.iter_tar(ResetMidway(raw), counts))
    assert counts == {"truncated_shard": 1}
    broken_gzip = gzip.compress(raw)[:-100]  # a compressed shard cut short: damaged data, counted
    assert len(list(webdata.iter_tar(io.BytesIO(broken_gzip), counts))) < len(whole)
    assert counts == {"truncated_shard": 2}
    strict = webdata.iter_tar_samples(io.BytesIO(cut))
    assert [next(strict)[1] for _ in range(3)] == ["0000", "0001", "0002"]
    with pytest.raises(tarfile.ReadError):
        next(strict)
    path.write_bytes(cut)
    training = train_data.iter_tar_samples(str(path), 1)
    assert [next(training)["__key__"] for _ in range(2)] == ["0001", "0002"]
    with pytest.raises(tarfile.ReadError):
        next(training)
