"""Shard stage on a hand-built raw version: drop reasons, RGB conversion, dedup, offsets, truncation, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_manifests.manifest import Producer
from datasets_manifests.registry import Registry
from pipelines.tasks.shard import ShardConfig, run_shard, split_of
from pipelines.tasks.webdata import TarShardWriter, iter_samples, iter_tar, shard_urls


def _image(colour, mode="RGB", fmt="JPEG", size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _raw_samples():
    """(source_key, url, caption, jpg bytes) with the expected outcome."""
    samples = [(f"k{i:03d}", f"http://h/{i}.jpg", f"A Red square, number {i}!", _image((i * 9, 20, 30)), "ok")
               for i in range(20)]
    samples += [
        ("g000", "http://h/g.jpg", "greyscale cat", _image(128, mode="L"), "ok"),
        ("p000", "http://h/p.png", "alpha png", _image((1, 2, 3, 100), mode="RGBA", fmt="PNG"), "ok"),
        ("c000", "http://h/c.jpg", "corrupt", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt_image"),
        ("zu00", "http://h/0.jpg", "same url as k000", _image((9, 9, 9)), "duplicate_url"),
        ("zi00", "http://h/other.jpg", "same image as k001", _image((9, 20, 30)), "duplicate_image"),
        ("e000", "http://h/e.jpg", " ... !! ", _image((50, 60, 70)), "empty_caption"),
        ("a000", "http://h/a.jpg", "1234 5678", _image((50, 60, 71)), "absurd_caption"),
        ("a001", "http://h/a1.jpg", "word " * 400, _image((50, 61, 71)), "absurd_caption"),
    ]
    return samples


def _write_raw_tar(path: Path, samples, carried=None) -> dict[str, int]:
    """img2dataset's layout; `carried(key)`: the source columns img2dataset writes into each sample's json."""
    offsets = {}
    with tarfile.open(path, "w") as archive:
        for index, (key, url, caption, data, _) in enumerate(samples):
            raw_key = f"{index:09d}"
            meta = json.dumps({"source_key": key, "url": url, "caption": caption,
                               **(carried(key) if carried else {})}).encode()  # fmt: skip
            for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{raw_key}.{ext}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
                if ext == "jpg":
                    offsets[key] = archive.offset - (len(payload) + 511) // 512 * 512
    return offsets


@pytest.fixture
def raw_version(tmp_path):
    return _raw_version(tmp_path)


def _source_columns(key: str) -> dict:  # a DataComp-like id and a LAION-like CLIP score per sample
    return {"uid": f"u-{key}", "similarity": sum(map(ord, key)) / 1000}


def _raw_version(tmp_path, carried=None):
    """A raw version of 3 shards (the third truncated); with `carried` (`_source_columns`) a download's
    `save_additional_columns`: in each sample's json, its index (as typed there) and its manifest."""
    registry = Registry(tmp_path / "registry")
    stage = tmp_path / "stage"
    (stage / "raw").mkdir(parents=True)
    samples = _raw_samples()
    first, second = samples[:18], samples[18:]
    _write_raw_tar(stage / "raw/00000.tar", first, carried)
    _write_raw_tar(stage / "raw/00001.tar", second, carried)
    # A third shard cut short in the middle of its 3rd sample: 2 samples survive, 2 are lost.
    lost = [(f"t{i:03d}", f"http://h/t{i}.jpg", f"blue circle {i}", _image((200, i, 9)), "ok") for i in range(4)]
    offsets = _write_raw_tar(stage / "raw/00002.tar", lost, carried)
    data = (stage / "raw/00002.tar").read_bytes()
    (stage / "raw/00002.tar").write_bytes(data[: offsets["t002"] + 100])
    rows = []
    for shard, group in (("raw/00000.tar", first), ("raw/00001.tar", second), ("raw/00002.tar", lost)):
        for key, url, caption, _, _ in group:
            rows.append({"key": key, "url": url, "raw_caption": caption, "caption": caption, "caption_source": "web",
                         "shard": shard, "status": "ok", "drop_reason": None, "split": None, "image_sha256": None,
                         "width": None, "height": None, "jpg_offset": None, "jpg_bytes": None,
                         **(carried(key) if carried else {})})
    import pyarrow as pa

    from datasets_manifests.index import INDEX_SCHEMA, write_index

    table = pa.Table.from_pylist(rows)
    if carried:  # the score as a float32 column: its type must survive the json round trip
        table = table.set_column(table.schema.get_field_index("similarity"), "similarity",
                                 table.column("similarity").cast(pa.float32()))  # fmt: skip
    write_index(table.select([*INDEX_SCHEMA.names, *(["uid", "similarity"] if carried else [])]),
                stage / "index.parquet")  # fmt: skip
    files = [{"path": f"raw/0000{i}.tar", "role": "shard"} for i in range(3)] + [{"path": "index.parquet", "role": "index"}]
    manifest = registry.publish(kind="dataset", name="raw-test", staging_dir=stage, files=files,
                                producer=Producer(stage="handmade"),
                                metadata={"source_columns": ["uid", "similarity"]} if carried else {})  # fmt: skip
    return registry, manifest, samples, lost


def test_a_raw_version_without_any_sample_to_keep_is_an_error_naming_why(tmp_path):
    from pipelines.tasks.shard import EmptyInputError

    registry = Registry(tmp_path / "registry")
    stage = tmp_path / "nothing"
    (stage / "raw").mkdir(parents=True)
    _write_raw_tar(stage / "raw/00000.tar", [])
    nothing = registry.publish(kind="dataset", name="raw-nothing", staging_dir=stage, producer=Producer(stage="test"),
                               files=[{"path": "raw/00000.tar", "role": "shard", "num_samples": 0}],
                               drop_reasons={"connection_error": 20})  # a download that got no image
    with pytest.raises(EmptyInputError, match=r"raw-nothing@v1 holds no image: .*\(failures: connection_error: 20\).*"
                                              r"--retry-failed raw-nothing@v1"):
        run_shard(ShardConfig(), nothing, name="web-nothing", registry=registry)
    stage = tmp_path / "dropped"
    (stage / "raw").mkdir(parents=True)
    bad = [sample for sample in _raw_samples() if sample[4] in ("corrupt_image", "empty_caption")]
    _write_raw_tar(stage / "raw/00000.tar", bad)
    dropped = registry.publish(kind="dataset", name="raw-dropped", staging_dir=stage, producer=Producer(stage="test"),
                               files=[{"path": "raw/00000.tar", "role": "shard", "num_samples": len(bad)}])
    with pytest.raises(EmptyInputError, match="raw-dropped@v1: no sample is left to shard .*corrupt_image: 1.*"
                                              "empty_caption: 1"):
        run_shard(ShardConfig(), dropped, name="web-dropped", registry=registry)
    assert registry.versions("dataset", "web-dropped") == []
    assert not [p for p in (registry.work_dir("x").parent).iterdir() if p.name != "x"]  # no work left behind


def test_drop_reasons_dedup_and_truncation(raw_version):
    registry, raw, samples, lost = raw_version
    cfg = ShardConfig(samples_per_shard=7, val_fraction=0.2, seed=1)
    out = run_shard(cfg, raw.ref, name="train-test", registry=registry)
    expected = Counter(outcome for *_, outcome in samples if outcome != "ok")
    truncated_lost = 2
    assert out.drop_reasons == {**expected, "truncated_shard": truncated_lost}
    kept = sum(1 for *_, outcome in samples if outcome == "ok") + len(lost) - truncated_lost
    assert out.num_samples == kept == sum(out.splits.values())
    assert out.counts["truncated_shards"] == 1
    # Gap-free numbering per split, and every kept sample exactly once.
    for split in out.splits:
        names = [e.path for e in out.shards(split)]
        assert names == [f"shards/{split}-{i:06d}.tar" for i in range(len(names))]
    counts = Counter()
    seen = [(key, image, caption, meta) for key, image, caption, meta in iter_samples(registry, out, counts=counts)]
    assert counts == {"ok": kept}
    assert len({key for key, *_ in seen}) == kept
    for key, image, caption, meta in seen:
        assert image.mode == "RGB" and caption == caption.lower() and "!" not in caption
        assert meta["key"] == key and split_of(key, 0.2) in out.splits
    assert shard_urls(registry, out, "train")[0].endswith("shards/train-000000.tar")
    # No source column carried: the key is the one versions sharded before the stage carried them have.
    assert out.producer.cache_key == _key_without_carried_columns(cfg, raw)


def _key_without_carried_columns(cfg, raw) -> str:
    from datasets_manifests.manifest import cache_key
    from pipelines.tasks.shard import STAGE, _config_hash

    return cache_key(STAGE, [raw.id], _config_hash(cfg, False))


def test_the_source_lists_columns_are_carried_to_the_index_and_each_samples_json(tmp_path):
    import pyarrow as pa

    registry, raw, samples, lost = _raw_version(tmp_path, carried=_source_columns)
    cfg = ShardConfig(samples_per_shard=7, val_fraction=0.2, seed=1)
    out = run_shard(cfg, raw, name="web", registry=registry)
    assert out.metadata["source_columns"] == ["uid", "similarity"]
    # A version sharded from this raw version before the stage carried its columns lacks them: not reused.
    assert out.producer.cache_key != _key_without_carried_columns(cfg, raw)
    index = pq.read_table(registry.local_path(out, "index.parquet"))
    assert index.schema.field("uid").type == pa.string() and index.schema.field("similarity").type == pa.float32()
    rows = index.to_pylist()
    assert {row["status"] for row in rows} == {"ok", "dropped"}  # dropped samples (a truncated one too) keep theirs
    assert any(row["drop_reason"] == "truncated_shard" for row in rows)
    for row in rows:
        expected = _source_columns(row["key"])
        assert row["uid"] == expected["uid"]
        assert row["similarity"] == pytest.approx(expected["similarity"], rel=1e-6)
    metas = {key: meta for key, _, _, meta in iter_samples(registry, out, decode=False)}
    assert len(metas) == out.num_samples
    assert all(meta["uid"] == f"u-{key}" and meta["similarity"] == pytest.approx(_source_columns(key)["similarity"])
               for key, meta in metas.items())  # fmt: skip
    # A manifest naming a column its index lacks (not written by this code) is said to be one.
    import dataclasses

    from datasets_manifests.index import SampleIndexError, source_columns

    with pytest.raises(SampleIndexError, match=r"raw-test@v1: its index.parquet lacks the source column\(s\) punsafe"):
        source_columns(registry, dataclasses.replace(raw, metadata={"source_columns": ["uid", "punsafe"]}))


def test_a_nan_score_is_kept_in_the_index_and_written_as_null_in_the_samples_json(tmp_path):
    """A LAION list's score may be NaN: the index keeps it (Arrow has NaN), the sample's json says null (JSON has
    no NaN: Python's json wrote `NaN`, which strict readers refuse)."""
    import math

    registry, raw, samples, lost = _raw_version(
        tmp_path, carried=lambda key: {**_source_columns(key), "similarity": math.nan if key == "k003" else 0.3})
    out = run_shard(ShardConfig(samples_per_shard=7, val_fraction=0.2, seed=1), raw, name="web", registry=registry)
    rows = {row["key"]: row for row in pq.read_table(registry.local_path(out, "index.parquet")).to_pylist()}
    assert math.isnan(rows["k003"]["similarity"]) and rows["k004"]["similarity"] == pytest.approx(0.3)
    for split in out.splits:
        for entry in out.shards(split):
            with tarfile.open(registry.local_path(out, entry.path)) as archive:
                for member in archive.getmembers():
                    if member.name.endswith(".json"):
                        text = archive.extractfile(member).read().decode()
                        json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {member.name}"))
                        if member.name.startswith("k003"):
                            assert json.loads(text)["similarity"] is None


def test_source_bounds_drop_what_a_clip_score_filter_drops_without_decoding_it(tmp_path, monkeypatch):
    """DataComp's / LAION's CLIP-score filtering on the carried scores: a sample out of bounds is dropped with a
    reason naming the column, before its image is decoded; the rest is sharded as without bounds."""
    from pipelines.config import config_hash, load_config
    from pipelines.tasks import shard

    registry, raw, samples, lost = _raw_version(tmp_path, carried=_source_columns)
    cfg = ShardConfig(samples_per_shard=7, val_fraction=0.2, seed=1)
    everything = run_shard(cfg, raw, name="web", registry=registry)
    bounded = load_config(ShardConfig, {"samples_per_shard": 7, "val_fraction": 0.2, "seed": 1},
                          ["source_bounds.similarity.min=0.252", "source_bounds.similarity.max=0.259"])  # fmt: skip
    decoded = []
    check_image = shard.check_image
    monkeypatch.setattr(shard, "check_image", lambda data, *args: decoded.append(data) or check_image(data, *args))
    out = run_shard(bounded, raw, name="web-scored", registry=registry)
    before = {row["key"]: row for row in pq.read_table(registry.local_path(everything, "index.parquet")).to_pylist()}
    after = {row["key"]: row for row in pq.read_table(registry.local_path(out, "index.parquet")).to_pylist()}
    assert after.keys() == before.keys()
    read = {key for key, row in before.items() if row["drop_reason"] != "truncated_shard"}  # the others: no json
    low = {key for key in read if _source_columns(key)["similarity"] < 0.252}
    high = {key for key in read if _source_columns(key)["similarity"] > 0.259}
    assert low and high and len(low) + len(high) < len(read)
    for key, row in after.items():
        if key not in read:
            assert row["drop_reason"] == "truncated_shard"
        elif key in low | high:
            assert row["drop_reason"] == ("similarity_below_min" if key in low else "similarity_above_max")
            assert row["image_sha256"] == hashlib.sha256(_image_of(samples + lost, key)).hexdigest()
            assert row["width"] is None  # not decoded
        else:  # in bounds: as without them (the duplicate of a bounded-out sample may now be kept)
            was = before[key]["drop_reason"]
            assert row["drop_reason"] == was or (was or "").startswith("duplicate")
    assert len(decoded) == len(read - low - high)
    assert out.num_samples == sum(row["status"] == "ok" for row in after.values())
    assert config_hash(cfg) == config_hash(ShardConfig(samples_per_shard=7, val_fraction=0.2, seed=1,
                                                       source_bounds={}))  # fmt: skip
    assert out.producer.config["source_bounds"] == {"similarity": {"min": 0.252, "max": 0.259}}


def _image_of(samples, key):
    return next(data for sample_key, _, _, data, _ in samples if sample_key == key)


def test_source_bounds_are_checked_against_the_config_and_the_version(tmp_path):
    from pipelines.config import ConfigError, load_config

    for bounds, message in (({"similarity": {"mni": 0.2}}, "unknown key 'source_bounds.similarity.mni'; did you mean "
                                                           "'source_bounds.similarity.min'"),
                            ({"similarity": {}}, "a bound needs min, max or both"),
                            ({"similarity": {"min": 0.5, "max": 0.1}}, "min 0.5 is above max 0.1"),
                            ({"similarity": {"min": "high"}}, "source_bounds.similarity.min' expected float or null")):
        with pytest.raises(ConfigError, match=message):
            load_config(ShardConfig, {"source_bounds": bounds})
    registry, raw, *_ = _raw_version(tmp_path, carried=_source_columns)
    for bounds, message in (({"punsafe": {"max": 0.1}}, r"source_bounds.punsafe: raw-test@v1 carries no source "
                                                        r"column 'punsafe' \(it carries uid, similarity\)"),
                            ({"uid": {"min": 1}},
                             "source_bounds.uid: raw-test@v1's column 'uid' is string, not a number")):
        with pytest.raises(ValueError, match=message):
            run_shard(load_config(ShardConfig, {"source_bounds": bounds}), raw, name="web", registry=registry)
    assert not registry.versions("dataset", "web")


def test_a_source_value_not_of_its_index_type_names_the_shard_and_column(tmp_path):
    registry, raw, *_ = _raw_version(tmp_path, carried=lambda key: {"uid": "u", "similarity": "0.5"})
    with pytest.raises(ValueError, match=r"raw/00000\.tar: a sample's source column does not have its index type "
                                         r"\(uid: string, similarity: float\)"):
        run_shard(ShardConfig(), raw, name="web", registry=registry)


def test_index_points_into_tars(raw_version):
    registry, raw, *_ = raw_version
    out = run_shard(ShardConfig(samples_per_shard=5, val_fraction=0.0), raw, name="train-test", registry=registry)
    index = pq.read_table(registry.local_path(out, "index.parquet")).to_pylist()
    ok = [row for row in index if row["status"] == "ok"]
    assert len(ok) == out.num_samples and all(row["drop_reason"] for row in index if row["status"] == "dropped")
    for row in ok:
        with open(registry.local_path(out, row["shard"]), "rb") as handle:
            handle.seek(row["jpg_offset"])
            data = handle.read(row["jpg_bytes"])
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
        assert Image.open(io.BytesIO(data)).mode == "RGB"
    assert {row["caption_source"] for row in index} == {"web"}
    # The shards' digests come from the writer processes (not read again at publish): verify recomputes them.
    from datasets_manifests.ops import verify

    assert all(entry.sha256 and entry.bytes for entry in out.shards()) and verify(registry, out.ref) == []


def test_rerun_is_noop_and_output_deterministic(raw_version, tmp_path):
    registry, raw, *_ = raw_version
    cfg = ShardConfig(samples_per_shard=6, seed=5)
    first = run_shard(cfg, raw, name="train-test", registry=registry)
    again = run_shard(cfg, raw, name="train-test", registry=registry)
    assert again.ref == first.ref and again.id == first.id
    other = run_shard(ShardConfig(samples_per_shard=6, seed=6), raw, name="train-test", registry=registry)
    assert other.version != first.version and other.parents == (raw.ref,)
    order = lambda m: [s.key for s in iter_tar(open(registry.local_path(m, m.shards("train")[0].path), "rb"))]
    assert order(first) != order(other)  # the seed changes the order, not the content
    assert first.splits == other.splits


def test_raw_shards_checked_in_worker_processes_give_the_same_version(raw_version, monkeypatch):
    # At scale both passes run in worker processes; drops, truncation, index and bytes are the same.
    from pipelines import runtime
    from pipelines.tasks import shard

    registry, raw, *_ = raw_version
    cfg = ShardConfig(samples_per_shard=7, val_fraction=0.2, seed=1)
    serial = run_shard(cfg, raw, name="one-process", registry=registry)
    monkeypatch.setattr(shard, "SCAN_BYTES_PER_PROCESS", 1)  # one process per raw shard (up to the cores)
    monkeypatch.setattr(shard, "WRITE_BYTES_PER_PROCESS", 1)  # and per output shard
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    used, real_map = [], runtime.map_in_processes
    monkeypatch.setattr(runtime, "map_in_processes", lambda fn, jobs, workers: used.append(workers) or real_map(fn, jobs, workers))
    parallel = run_shard(cfg, raw, name="processes", registry=registry)
    assert used == [2, 2]  # pass 1 and pass 2
    assert [(e.path, e.sha256) for e in parallel.files] == [(e.path, e.sha256) for e in serial.files]
    assert parallel.drop_reasons == serial.drop_reasons and parallel.counts == serial.counts
    read = lambda m: pq.read_table(registry.local_path(m, "index.parquet"))  # noqa: E731
    assert read(parallel).equals(read(serial))


def _dedup_one_by_one(groups):
    """The dedup as a loop: the reference `first_come_dedup` computes on arrays."""
    seen = [set() for _ in groups]
    reasons = []
    for item in range(len(groups[0])):
        reason = next((index for index, group in enumerate(groups) if group[item] in seen[index]), -1)
        if reason < 0:
            for index, group in enumerate(groups):
                seen[index].add(group[item])
        reasons.append(reason)
    return reasons


@pytest.mark.parametrize("seed", range(40))
def test_array_dedup_equals_the_loop(seed):
    # Few distinct values, so that URL and image duplicates chain (a dropped item frees its other group).
    import numpy as np

    from pipelines.tasks.shard import first_come_dedup

    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 300))
    groups = [rng.integers(0, max(1, count // int(rng.integers(1, 6))), count) for _ in range(2)]
    assert first_come_dedup(groups).tolist() == _dedup_one_by_one(groups)


def test_dedup_decisions_on_records():
    import pyarrow as pa

    from pipelines.tasks.shard import DUPLICATE_REASONS, RECORD_SCHEMA, _decide

    def record(key, url, sha, status="ok", shard="raw/0.tar"):
        return {"key": key, "url": url, "image_sha256": sha, "status": status, "source_shard": shard,
                "url_hash": None if url is None else hashlib.blake2b(url.encode(), digest_size=16).digest(),
                "image_hash": None if sha is None else bytes.fromhex(sha[:32])}

    sha = lambda n: hashlib.sha256(bytes([n])).hexdigest()  # noqa: E731
    rows = [record("d", "u1", sha(1)), record("a", "u1", sha(2)), record("b", None, sha(3)), record("c", None, sha(4)),
            record("e", "u5", sha(2)), record("f", "u6", sha(6), status="dropped"), record("g", "u7", sha(2)),
            record("a", "u8", sha(8), shard="raw/1.tar"), record("h", "u6", sha(9))]
    decision = _decide(pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), ShardConfig())
    reasons = {rows[row]["key"] + rows[row]["source_shard"]: DUPLICATE_REASONS[code]
               for row, code in enumerate(decision.dropped_as) if code}
    # The first of a repeated key stays; URL-less samples are not URL duplicates of each other; a dropped
    # record (f) blocks nothing; the URL is checked before the image.
    assert reasons == {"draw/0.tar": "duplicate_url", "araw/1.tar": "duplicate_key", "eraw/0.tar": "duplicate_image",
                       "graw/0.tar": "duplicate_image"}
    assert [rows[row]["key"] for row in decision.order][:3] == ["a", "a", "b"]
    assert decision.kept.tolist() == [False, True, True, True, False, False, False, False, True]


def test_index_written_in_batches_is_the_same(raw_version, monkeypatch):
    # At scale the index is built and written a batch at a time (it does not fit in memory as one table).
    from datasets_manifests import index
    from pipelines.tasks import shard

    registry, raw, *_ = raw_version
    cfg = ShardConfig(samples_per_shard=7, val_fraction=0.2, seed=1)
    whole = run_shard(cfg, raw, name="one-batch", registry=registry)
    monkeypatch.setattr(index, "ROW_GROUP_SIZE", 2)
    monkeypatch.setattr(index, "INDEX_BATCH_ROWS", 4)
    batched = run_shard(cfg, raw, name="batches", registry=registry)
    read = lambda m: pq.read_table(registry.local_path(m, "index.parquet"))  # noqa: E731
    assert pq.ParquetFile(registry.local_path(batched, "index.parquet")).metadata.num_row_groups == len(read(whole)) // 2
    assert read(batched).equals(read(whole))
    assert batched.counts == whole.counts and batched.drop_reasons == whole.drop_reasons
    assert batched.splits == whole.splits
    assert not (registry.work_dir(batched.producer.cache_key) / shard.RECORDS_FILE).exists()


def test_writer_offsets_and_atomic_names(tmp_path):
    with TarShardWriter(tmp_path, "train", 2) as writer:
        places = [writer.write(f"s{i}", {"jpg": bytes([i]) * (100 + i), "txt": b"x"}) for i in range(5)]
        assert list(tmp_path.glob("shards/.train-000002.tar.tmp"))  # the open shard is not visible yet
    assert [p for p, _ in writer.shards] == [f"shards/train-{i:06d}.tar" for i in range(3)]
    assert not list(tmp_path.glob("shards/.*"))
    for i, (path, offset, size) in enumerate(places):
        with open(tmp_path / path, "rb") as handle:
            handle.seek(offset)
            assert handle.read(size) == bytes([i]) * (100 + i)
    with pytest.raises(ValueError, match="must not contain"):
        TarShardWriter(tmp_path, "val", 2).write("a.b", {"jpg": b""})


def test_shard_configs_load():
    from pipelines.config import CONFIG_DIR, ConfigError, load_config
    from pipelines.tasks.demo_corpus import DemoCorpusConfig

    for name in ("default", "demo"):
        load_config(ShardConfig, CONFIG_DIR / "shard" / f"{name}.yaml")
    load_config(DemoCorpusConfig, CONFIG_DIR / "demo_corpus.yaml")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(ShardConfig, {"val_fraction": 0.9})


def test_shard_command_through_the_cli(raw_version, capsys):
    from pipelines.cli import main

    registry, raw, samples, lost = raw_version
    # A preset name for --config (configs/shard/demo.yaml), overridden by --set.
    args = ["shard", raw.ref, "--name", "train-cli", "--registry", registry.url, "--json", "--config", "demo",
            "--set", "samples_per_shard=4", "--set", "val_fraction=0.0"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = registry.resolve(result["ref"], "dataset")
    assert result["ref"] == "train-cli@v1" and out.parents == (raw.ref,)
    assert out.producer.config["samples_per_shard"] == 4 and out.producer.config["max_words"] == 30
    assert out.num_samples == sum(result["splits"].values()) == sum(1 for *_, o in samples if o == "ok") + len(lost) - 2
    assert all(entry.num_samples <= 4 for entry in out.shards("train"))
    assert main(args) == 0  # the same command again: the existing version, nothing new
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["id"] == result["id"]
    assert [m.version for m in registry.versions("dataset", "train-cli")] == ["v1"]
    assert main(["shard", "missing@v1", "--name", "x", "--registry", registry.url]) == 2
    assert "missing" in capsys.readouterr().err


def _records_table(rows, chunk_rows):
    import pyarrow as pa

    from pipelines.tasks.shard import RECORD_SCHEMA

    chunks = [pa.Table.from_pylist(rows[first : first + chunk_rows], schema=RECORD_SCHEMA)
              for first in range(0, len(rows), chunk_rows)] or [RECORD_SCHEMA.empty_table()]  # fmt: skip
    return pa.concat_tables(chunks)


def _decide_one_by_one(rows):
    """`_decide` as a loop over the records in (key, source shard, file) order with three sets of seen values."""
    order = sorted(range(len(rows)), key=lambda row: (rows[row]["key"].encode(), rows[row]["source_shard"], row))
    seen_keys, seen_urls, seen_images, reasons = set(), set(), set(), [None] * len(rows)
    for row in order:
        record = rows[row]
        if record["status"] != "ok":
            continue
        if record["key"] in seen_keys:
            reasons[row] = "duplicate_key"
        elif record["url_hash"] is not None and record["url_hash"] in seen_urls:
            reasons[row] = "duplicate_url"
        elif record["image_hash"] is not None and record["image_hash"] in seen_images:
            reasons[row] = "duplicate_image"
        seen_keys.add(record["key"])
        if reasons[row] is None:
            seen_urls.add(record["url_hash"])
            seen_images.add(record["image_hash"])
    return order, reasons


@pytest.mark.parametrize("seed", range(12))
def test_decide_equals_the_loop_in_blocks_sorted_or_not_with_colliding_prefixes(seed, monkeypatch):
    # Digests are built to share their first 8 bytes without being equal (the prefix only names candidates),
    # keys repeat across raw shards, some records are dropped already, nulls are never duplicates; the records
    # come sorted (the row-number fast path) or not, in chunks, read in blocks of 1-4 rows or all at once.
    import random as random_module

    from pipelines.tasks import shard

    rng = random_module.Random(seed)
    count = rng.randrange(0, 60)

    def digest(alphabet):
        if rng.random() < 0.15:
            return None
        return bytes([rng.randrange(2)]) * 8 + bytes([rng.randrange(alphabet)]) * 8

    rows = [{"key": f"k{rng.randrange(max(1, count // 2)):03d}", "source_shard": f"raw/{rng.randrange(3)}.tar",
             "status": "ok" if rng.random() < 0.9 else "dropped", "url_hash": digest(4), "image_hash": digest(3)}
            for _ in range(count)]  # fmt: skip
    if seed % 2:
        rows.sort(key=lambda record: (record["key"], record["source_shard"]))
    monkeypatch.setattr(shard, "DECIDE_BLOCK_ROWS", [1, 2, 4, 1 << 20][seed % 4])
    decision = shard._decide(_records_table(rows, rng.randrange(1, 8)), ShardConfig())
    order, reasons = _decide_one_by_one(rows)
    assert decision.order.tolist() == order
    assert [shard.DUPLICATE_REASONS[code] if code else None for code in decision.dropped_as] == reasons
    assert decision.kept.tolist() == [row["status"] == "ok" and reason is None for row, reason in zip(rows, reasons)]


def test_key_order_uses_the_row_numbers_only_when_the_records_are_in_order(monkeypatch):
    from pipelines.tasks import shard

    monkeypatch.setattr(shard, "DECIDE_BLOCK_ROWS", 2)
    rows = [{"key": key, "source_shard": source, "status": "ok"}
            for key, source in (("a", "raw/0.tar"), ("b", "raw/0.tar"), ("b", "raw/1.tar"), ("c", "raw/0.tar"))]
    sorts = []
    real_sort = shard.pc.sort_indices
    monkeypatch.setattr(shard.pc, "sort_indices", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    assert shard._key_order(_records_table(rows, 3)).tolist() == [0, 1, 2, 3] and not sorts
    swapped = [rows[0], rows[2], rows[1], rows[3]]  # out of order by source shard, across the block boundary
    assert shard._key_order(_records_table(swapped, 3)).tolist() == [0, 2, 1, 3] and sorts == [1]
    across = [rows[0], rows[3], rows[1], rows[2]]  # each block in order, the second starting below the first's end
    assert shard._key_order(_records_table(across, 2)).tolist() == [0, 2, 3, 1] and sorts == [1, 1]


def test_a_remote_registry_gets_its_shards_written_in_its_store(raw_version, tmp_path, monkeypatch):
    """fsspec memory:// standing in for s3://: the output shards are written under the registry's work prefix, not
    on this machine's disk, copied inside the store at the publish, and the prefix is removed; the files are the
    same bytes as a local registry's."""
    import uuid

    from datasets_manifests.ops import verify

    registry, raw, *_ = raw_version
    remote = Registry(f"memory://shard-remote-{uuid.uuid4().hex[:8]}")
    version_dir = Path(registry.local_path(raw, "index.parquet")).parent
    remote_raw = remote.publish(kind="dataset", name="raw-test", staging_dir=version_dir, move=False,
                                files=list(raw.files), producer=raw.producer)
    monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / "machine-work"))
    cfg = ShardConfig(samples_per_shard=5, val_fraction=0.2, seed=3)
    local = run_shard(cfg, raw, name="train-test", registry=registry)
    out = run_shard(cfg, remote_raw, name="train-test", registry=remote)
    assert {e.path: (e.sha256, e.bytes) for e in out.files} == {e.path: (e.sha256, e.bytes) for e in local.files}
    assert len(out.shards()) == len(local.shards()) >= 3 and verify(remote, out) == []
    prefix = remote.fs._strip_protocol(remote.shared_work_url(out.producer.cache_key))
    assert not remote.fs.exists(prefix) and not list((tmp_path / "machine-work").rglob("*"))
    # A run stopped between its publish and its clean-up: the rerun finds the version and removes what is left.
    remote.fs.pipe(f"{prefix}/shards/train-000000.tar", b"staged")
    (remote.work_dir(out.producer.cache_key) / "records.arrow").write_bytes(b"records")
    assert run_shard(cfg, remote_raw, name="train-test", registry=remote).id == out.id
    assert not remote.fs.exists(prefix) and not list((tmp_path / "machine-work").rglob("*"))


def test_pass_two_reads_remote_images_with_one_ranged_request_each(tmp_path):
    """Pass 2 on raw shards in a store (served over HTTP here): each image is one ranged request of exactly its
    bytes — an opened remote file fetched a read-ahead block of megabytes around each shuffled image — and the
    output shard is the same file as from local raw shards, re-encoded images included; a raw shard cut short
    since pass 1, or gone, names the sample."""
    import random

    import pyarrow as pa
    from http_files import serve_files

    from pipelines.tasks import shard as stage
    from pipelines.tasks.webdata import write_tar

    (tmp_path / "store/raw").mkdir(parents=True)
    records = []
    for number in range(3):
        path = f"raw/{number:05d}.tar"
        images = {f"{number}{i:03d}": _image((number * 40, i * 9, 30), size=(64, 48)) for i in range(40)}
        images[f"{number}png"] = _image((1, 2, 3, 100), mode="RGBA", fmt="PNG")  # re-encoded in pass 2
        written = write_tar(tmp_path / "store" / path, [(f"{key}.jpg", data) for key, data in images.items()])
        for key, data in images.items():
            offset, size = written.data_offsets[f"{key}.jpg"]
            records.append({"key": key, "url": f"http://h/{key}.jpg", "raw_caption": "a cat", "caption": "a cat",
                            "image_sha256": hashlib.sha256(data).hexdigest(), "width": 64, "height": 48,
                            "source_shard": path, "source_offset": offset, "source_bytes": size,
                            "reencode": key.endswith("png")})  # fmt: skip
    random.Random(0).shuffle(records)  # the split's shuffled order: each output shard draws from every raw shard
    chunk = pa.Table.from_pylist(records)
    cfg = ShardConfig()
    paths = sorted({record["source_shard"] for record in records})
    local = stage.write_output_shard(cfg, str(tmp_path / "local"), "train", 0, chunk,
                                     {path: str(tmp_path / "store" / path) for path in paths})  # fmt: skip
    with serve_files(tmp_path / "store") as served:
        sources = {path: f"{served.url}/{path}" for path in paths}
        remote = stage.write_output_shard(cfg, str(tmp_path / "remote"), "train", 0, chunk, sources)
        assert served.totals() == (sum(record["source_bytes"] for record in records), len(records))
        assert remote == local and len(remote[3]) == 3  # same file, offsets, and re-encoded images' sha256
        data = (tmp_path / "store" / paths[1]).read_bytes()
        (tmp_path / "store" / paths[1]).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=r"raw/00001.tar: the image of '1\w+' is cut short"):
            stage.write_output_shard(cfg, str(tmp_path / "cut"), "train", 0, chunk, sources)
        (tmp_path / "store" / paths[2]).unlink()
        with pytest.raises(OSError, match=r"raw/00002.tar: the image of '2\w+' could not be read at byte \d+: "):
            stage.write_output_shard(cfg, str(tmp_path / "gone"), "train", 0, chunk, sources)


def _assert_same_version(resumed, reference) -> None:
    """The same files (paths, sha256, sizes), counts, drop reasons and splits."""
    assert [(e.path, e.sha256, e.bytes) for e in resumed.files] == [(e.path, e.sha256, e.bytes) for e in reference.files]
    assert (resumed.counts, resumed.drop_reasons, resumed.splits) == (reference.counts, reference.drop_reasons,
                                                                      reference.splits)


def _counting(calls: Counter):
    """`counted(name, real, fail_at)`: `real`, counting its calls in `calls[name]`, raising at call `fail_at`."""

    def counted(name, real, fail_at=None):
        def wrapper(*args):
            calls[name] += 1
            if calls[name] == fail_at:
                raise RuntimeError(f"stopped at {name} {fail_at}")
            return real(*args)
        return wrapper

    return counted


def test_blip_shard_stopped_with_ctrl_c_says_the_same_command_goes_on(raw_version, monkeypatch, capsys, caplog):
    from pipelines import cli
    from pipelines.tasks import shard

    registry, raw, *_ = raw_version
    real_plan = shard.plan_output_shards

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the operator's ^C, after the raw shards were checked

    monkeypatch.setattr(shard, "plan_output_shards", interrupted)
    command = ["shard", raw.ref, "--name", "stopped", "--registry", registry.url]
    assert cli.main(command) == 130
    assert capsys.readouterr().err.endswith("blip shard: interrupted: the same command goes on from where this run "
                                            "stopped\n")  # fmt: skip
    monkeypatch.setattr(shard, "plan_output_shards", real_plan)
    with caplog.at_level("INFO", logger="pipelines.tasks.shard"):
        assert cli.main(command) == 0
    assert "going on from a stopped run: its 3 raw shards are checked" in caplog.text


def test_blip_shard_on_a_full_disk_says_so_and_goes_on_once_there_is_space(raw_version, monkeypatch, capsys,
                                                                             caplog):  # fmt: skip
    """A full disk under an output shard (its temp file a link to /dev/full: the kernel's ENOSPC at the real
    write) ends the command with one line naming the shard, not a traceback, and leaves no partial file; the
    rerun goes on from the raw shards the first run checked."""
    from pipelines import cli
    from pipelines.tasks import shard
    from pipelines.tasks.webdata import shard_name

    registry, raw, *_ = raw_version
    real_staged_sizes = shard._staged_sizes
    full_shard: list[Path] = []

    def staged_sizes_on_a_full_disk(out: str) -> dict[str, int]:
        target = Path(out) / shard_name("train", 0)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_name(target.name + ".tmp").symlink_to("/dev/full")
        full_shard.append(target)
        return real_staged_sizes(out)

    monkeypatch.setattr(shard, "_staged_sizes", staged_sizes_on_a_full_disk)
    command = ["shard", raw.ref, "--name", "full", "--registry", registry.url]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"blip shard: error: no space left on the device ({full_shard[0]}): free space (`blip data "
                        "work` lists what runs left; `--remove-leftovers` frees what no rerun needs), then the same "
                        "command goes on from where this run stopped\n"), err  # fmt: skip
    assert "Traceback" not in err
    assert not full_shard[0].exists() and not full_shard[0].with_name(full_shard[0].name + ".tmp").is_symlink()
    monkeypatch.setattr(shard, "_staged_sizes", real_staged_sizes)
    with caplog.at_level("INFO", logger="pipelines.tasks.shard"):
        assert cli.main(command) == 0
    assert "going on from a stopped run: its 3 raw shards are checked" in caplog.text


def test_a_disk_full_raised_from_by_another_error_is_found_too():
    from pipelines.runtime import disk_full as _disk_full

    try:
        try:
            with open("/dev/full", "wb", buffering=0) as full:
                full.write(b"x")
        except OSError as error:
            raise RuntimeError("a worker process failed") from error
    except RuntimeError as wrapped:
        assert _disk_full(wrapped) is wrapped.__cause__
        full = wrapped.__cause__
    assert _disk_full(OSError(13, "Permission denied")) is None and _disk_full(ValueError()) is None

    class RayTaskErrorLike(RuntimeError):  # Ray's: the task's own error as `.cause`, not chained
        def __init__(self, cause: BaseException) -> None:
            super().__init__("task failed")
            self.cause = cause

    class WorkerGroupErrorLike(RuntimeError):  # Ray Train's: each failed worker's error by rank
        def __init__(self, worker_failures: dict) -> None:
            super().__init__("workers failed")
            self.worker_failures = worker_failures

    assert _disk_full(RayTaskErrorLike(full)) is full
    assert _disk_full(WorkerGroupErrorLike({0: ValueError("peer"), 1: RayTaskErrorLike(full)})) is full


def test_a_stopped_run_goes_on_from_the_raw_shards_it_checked_and_the_shards_it_wrote(raw_version, monkeypatch,
                                                                                      caplog):
    """A run that stops in pass 1 (an error at the third raw shard) keeps the records of the shards it checked; one
    that stops in pass 2 keeps the output shards it wrote. Each rerun checks / writes only what is missing (a kept
    shard cut short since is written again), and the version is the one an uninterrupted run publishes."""
    from pipelines.tasks import shard

    registry, raw, *_ = raw_version
    cfg = ShardConfig(samples_per_shard=3, seed=2)
    reference = run_shard(cfg, raw, name="uninterrupted", registry=registry)
    assert reference.stats["resumed"] == {"raw_shards_checked_before": 0, "output_shards_written_before": 0}
    calls: Counter = Counter()
    counted = _counting(calls)

    real_scan, real_write = shard.scan_raw_shard, shard.write_output_shard
    monkeypatch.setattr(shard, "scan_raw_shard", counted("scan", real_scan, fail_at=3))
    with pytest.raises(RuntimeError, match="stopped at scan 3"):
        run_shard(cfg, raw, name="resumed", registry=registry)
    [work] = (Path(registry.root) / ".work").iterdir()
    assert sorted(p.name for p in (work / "scan").iterdir()) == ["000000.arrow", "000001.arrow"]
    calls.clear()
    monkeypatch.setattr(shard, "scan_raw_shard", counted("scan", real_scan))
    monkeypatch.setattr(shard, "write_output_shard", counted("write", real_write, fail_at=4))
    with pytest.raises(RuntimeError, match="stopped at write 4"):
        run_shard(cfg, raw, name="resumed", registry=registry)
    assert calls["scan"] == 1 and not (work / "scan").exists()  # the third raw shard only; the records joined
    written = sorted((work / "written").glob("*.npz"))
    assert len(written) == 3
    tar = work / "stage" / "shards" / written[0].name.replace(".npz", ".tar")
    tar.write_bytes(tar.read_bytes()[:1024])  # cut short since: its record no longer matches, written again
    calls.clear()
    monkeypatch.setattr(shard, "write_output_shard", counted("write", real_write))
    with caplog.at_level("INFO", logger="pipelines.tasks.shard"):
        resumed = run_shard(cfg, raw, name="resumed", registry=registry)
    assert f"going on from a stopped run: 2 of {len(reference.shards())} output shards already written" in caplog.text
    assert calls["scan"] == 0 and calls["write"] == len(reference.shards()) - 2
    assert resumed.stats["resumed"] == {"raw_shards_checked_before": 3, "output_shards_written_before": 2}
    _assert_same_version(resumed, reference)
    read = lambda m: pq.read_table(registry.local_path(m, "index.parquet"))  # noqa: E731
    assert read(resumed).equals(read(reference))
    assert not work.exists()  # the published version's work is cleared


def test_kept_files_upload_in_the_background_and_a_pass_waits_for_them(tmp_path, monkeypatch):
    """The kept files' copies to the store are made off the driver's loop; at the end of a pass every one is in
    the store, a failed upload is raised, and a pass stopped by its own error still keeps what it finished."""
    import threading
    import uuid

    from datasets_manifests.filesystems import url_to_fs
    from pipelines.tasks.shard import KeptFiles

    mirror = f"memory://kept-{uuid.uuid4().hex[:8]}/resume/scan"
    fs, root = url_to_fs(mirror)
    uploaded_by: set[str] = set()
    real_put = type(fs).put_file

    def put_file(self, local, remote, *args, **kwargs):
        uploaded_by.add(threading.current_thread().name)
        if remote.endswith("bad.arrow"):
            raise PermissionError(f"access denied: {remote}")
        return real_put(self, local, remote, *args, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", put_file)
    kept = KeptFiles(tmp_path / "scan", mirror)
    with kept.uploading():
        for number in range(40):
            with kept.keep(f"{number:06d}.arrow") as handle:
                handle.write(b"part %d" % number)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) == [f"{n:06d}.arrow" for n in range(40)]
    assert fs.cat(f"{root}/000007.arrow") == b"part 7" and threading.current_thread().name not in uploaded_by
    with pytest.raises(PermissionError, match="bad.arrow"):
        with kept.uploading():
            with kept.keep("bad.arrow") as handle:
                handle.write(b"x")
    with pytest.raises(RuntimeError, match="the pass's own error"):
        with kept.uploading():
            with kept.keep("000040.arrow") as handle:
                handle.write(b"part 40")
            raise RuntimeError("the pass's own error")
    assert fs.cat(f"{root}/000040.arrow") == b"part 40"


def test_a_stopped_run_on_a_remote_registry_goes_on_from_its_store_on_another_machine(raw_version, tmp_path,
                                                                                      monkeypatch, caplog):
    """With a remote registry (memory:// for s3://) what a rerun needs is kept in the store too: a run stopped in
    pass 1 on one machine, then one stopped in pass 2 on a second, each machine's work dir gone with it (a pod
    replaced), and a third machine checks no raw shard again, writes only the missing output shards, and publishes
    the version an uninterrupted run publishes; the store's work prefix goes once it is published."""
    import uuid

    from datasets_manifests.ops import work_entries
    from pipelines.tasks import shard

    registry, raw, *_ = raw_version
    remote = Registry(f"memory://shard-resume-{uuid.uuid4().hex[:8]}")
    version_dir = Path(registry.local_path(raw, "index.parquet")).parent
    remote_raw = remote.publish(kind="dataset", name="raw-test", staging_dir=version_dir, move=False,
                                files=list(raw.files), producer=raw.producer)
    cfg = ShardConfig(samples_per_shard=3, seed=2)
    reference = run_shard(cfg, raw, name="uninterrupted", registry=registry)
    calls: Counter = Counter()
    counted = _counting(calls)

    def on_machine(name: str) -> Path:  # a fresh work dir: the previous machine's is gone
        monkeypatch.setenv("BLIP_WORK_DIR", str(tmp_path / name))
        return tmp_path / name

    real_scan, real_write = shard.scan_raw_shard, shard.write_output_shard
    on_machine("first")
    monkeypatch.setattr(shard, "scan_raw_shard", counted("scan", real_scan, fail_at=3))
    with pytest.raises(RuntimeError, match="stopped at scan 3"):
        run_shard(cfg, remote_raw, name="resumed", registry=remote)
    calls.clear()
    shutil.rmtree(tmp_path / "first")
    [stopped] = work_entries(remote)  # `blip data work` names it from the store alone
    assert (stopped.state, stopped.what, stopped.files) == ("unfinished", "shard → resumed", 3)  # note + 2 parts
    on_machine("second")
    monkeypatch.setattr(shard, "scan_raw_shard", counted("scan", real_scan))
    monkeypatch.setattr(shard, "write_output_shard", counted("write", real_write, fail_at=4))
    with pytest.raises(RuntimeError, match="stopped at write 4"):
        run_shard(cfg, remote_raw, name="resumed", registry=remote)
    assert calls["scan"] == 1  # the two raw shards checked on the first machine were fetched from the store
    calls.clear()
    shutil.rmtree(tmp_path / "second")
    third = on_machine("third")
    monkeypatch.setattr(shard, "write_output_shard", counted("write", real_write))
    with caplog.at_level("INFO", logger="pipelines.tasks.shard"):
        resumed = run_shard(cfg, remote_raw, name="resumed", registry=remote)
    assert "3 files of a stopped run fetched from memory://" in caplog.text  # each pass's kept files
    assert calls["scan"] == 0 and calls["write"] == len(reference.shards()) - 3
    assert resumed.stats["resumed"] == {"raw_shards_checked_before": 3, "output_shards_written_before": 3}
    _assert_same_version(resumed, reference)
    prefix = remote.fs._strip_protocol(remote.shared_work_url(resumed.producer.cache_key))
    assert not remote.fs.exists(prefix) and not list(third.rglob("*"))


def test_the_set_examples_in_the_data_commands_help_are_keys_of_their_configs():
    from pipelines.commands.stages import OVERRIDE_EXAMPLES, stage_config_path
    from pipelines.config import load_config
    from pipelines.tasks.download import DownloadConfig

    for stage, config_class in (("download", DownloadConfig), ("shard", ShardConfig)):
        load_config(config_class, stage_config_path(stage, "default"), [OVERRIDE_EXAMPLES[stage]])


def _pattern(seed: int, size: int = 64) -> Image.Image:
    """A smooth random image (a 4 x 4 grid of random colours, upsampled): what a difference hash sees in a photo."""
    grid = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _web_with_copies_of_eval_images(tmp_path):
    """A registry with coco-eval@v1 (3 val/test images) and raw-web@v1 (3 near copies of them, 12 other images)."""
    from PIL import ImageEnhance

    registry = Registry(tmp_path / "registry")
    evals = tmp_path / "evals"
    (evals / "images").mkdir(parents=True)
    for number in range(3):
        _pattern(100 + number).save(evals / "images" / f"test_{number}.png")
    eval_set = registry.publish(kind="dataset", name="coco-eval", staging_dir=evals,
                                producer=Producer(stage="handmade"),
                                files=[{"path": f"images/test_{n}.png", "role": "image"} for n in range(3)])
    copies = [("c000", _jpeg(_pattern(100).resize((48, 48)), 75)),  # resized and re-encoded
              ("c001", _jpeg(_pattern(101), 60)),  # re-encoded harder
              ("c002", _jpeg(ImageEnhance.Brightness(_pattern(102)).enhance(1.15)))]  # brighter
    samples = [(key, f"http://h/{key}.jpg", f"a copy {key}", data, "eval_overlap") for key, data in copies]
    samples += [(f"w{n:03d}", f"http://h/w{n}.jpg", f"a web photo {n}", _jpeg(_pattern(n)), "ok") for n in range(12)]
    stage = tmp_path / "stage"
    (stage / "raw").mkdir(parents=True)
    _write_raw_tar(stage / "raw/00000.tar", samples)
    raw = registry.publish(kind="dataset", name="raw-web", staging_dir=stage, producer=Producer(stage="handmade"),
                           files=[{"path": "raw/00000.tar", "role": "shard"}])  # fmt: skip
    return registry, raw, eval_set, copies


def test_near_copies_of_evaluation_images_are_dropped_as_eval_overlap(tmp_path):
    from pipelines.tasks.shard import image_dhash, nearest_distance

    registry, raw, eval_set, copies = _web_with_copies_of_eval_images(tmp_path)
    for key, data in copies:  # the hash itself: a few bits from the original, about half from the others
        with Image.open(io.BytesIO(data)) as image:
            original = image_dhash(_pattern(100 + int(key[-1])))[:, None]  # one hash: HASH_WORDS x 1
            assert nearest_distance(image_dhash(image), original) <= ShardConfig().eval_overlap_max_distance

    cfg = ShardConfig(samples_per_shard=100, val_fraction=0.0)
    plain = run_shard(cfg, raw, name="web", registry=registry)
    assert "eval_overlap" not in plain.drop_reasons and plain.counts["kept"] == 15
    from pipelines.tasks.shard import _config_hash

    assert _config_hash(ShardConfig(), False) == "330745246901690e"  # as before the option: no version sharded anew

    kept_apart = run_shard(cfg, raw, name="web", registry=registry, eval_sets=["coco-eval"])
    assert kept_apart.drop_reasons == {"eval_overlap": 3} and kept_apart.counts["kept"] == 12
    assert kept_apart.parents == (raw.ref, eval_set.ref)
    assert kept_apart.stats["decontaminated"] == {"against": ["coco-eval@v1"], "eval_images": 3, "max_distance": 10,
                                                  "dropped": 3}  # fmt: skip
    index = pq.read_table(registry.local_path(kept_apart, "index.parquet")).to_pylist()
    assert {row["key"] for row in index if row["drop_reason"] == "eval_overlap"} == {"c000", "c001", "c002"}
    assert run_shard(cfg, raw, name="web", registry=registry, eval_sets=["coco-eval"]) == kept_apart  # reused

    with pytest.raises(ValueError, match="raw-web@v1: no evaluation images"):
        run_shard(cfg, raw, name="web", registry=registry, eval_sets=[raw])

    from pipelines.cli import main

    assert main(["shard", raw.ref, "--name", "web-cli", "--decontaminate", "coco-eval@v1", "--registry", registry.url,
                 "--set", "val_fraction=0.0", "--set", "eval_overlap_max_distance=4"]) == 0  # fmt: skip
    by_cli = registry.resolve("web-cli@v1")
    assert by_cli.drop_reasons == {"eval_overlap": 2}  # the copy re-encoded at quality 60 is 5 bits away


def test_the_flow_keeps_the_downstream_sets_evaluation_images_out_of_the_web_shards(tmp_path, monkeypatch,
                                                                                   stages_without_prefect):
    from pipelines.flows import bootstrap
    from pipelines.pipeline_config import load_pipeline

    registry, raw, eval_set, _ = _web_with_copies_of_eval_images(tmp_path)
    monkeypatch.setattr(bootstrap.demo_source, "download_demo_corpus", lambda *args, **kwargs: raw)
    cfg = load_pipeline("tiny", [f"registry={registry.url}", "decontaminate=true", "shard.val_fraction=0"])
    web = bootstrap.web_data(cfg, registry, eval_sets=(eval_set,))
    assert web.name == "tiny-web" and web.drop_reasons == {"eval_overlap": 3}
    assert web.parents == (raw.ref, eval_set.ref)
