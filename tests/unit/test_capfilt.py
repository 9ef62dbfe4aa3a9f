"""Unit tests of the CapFilt pure functions (no Ray): config, seeds, keep_mask, decisions, stats, tar I/O."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest

from pipelines.config import ConfigError, config_hash, load_config
from pipelines.tasks import capfilt, capfilt_models, webdata
from pipelines.tasks.capfilt import CapFiltConfig, FilterConfig


def test_presets_load_and_typos_fail(tmp_path):
    for name in ("tiny", "default", "129m"):
        config = load_config(CapFiltConfig, capfilt_config_path(name))
        assert config.captioner.top_p == 0.9 and config.filter.threshold == 0.5
    big = load_config(CapFiltConfig, capfilt_config_path("129m"))
    assert big.compute.num_gpus_per_actor == 0.5 and big.compute.dtype == "bfloat16"
    # The node-local shard cache is on at scale and, like the rest of the compute layout, not in the cache key.
    assert big.compute.shard_cache_dir and big.compute.shard_cache_gb == 200
    uncached = load_config(CapFiltConfig, capfilt_config_path("129m"), ["compute.shard_cache_dir=null"])
    assert uncached.compute.shard_cache_dir is None
    assert config_hash(uncached.cache_relevant()) == config_hash(big.cache_relevant())
    with pytest.raises(ConfigError, match="captioner.top_pp"):
        load_config(CapFiltConfig, {"captioner": {"top_pp": 0.8}})
    with pytest.raises(ConfigError, match="thresholds.webb"):
        load_config(CapFiltConfig, {"filter": {"thresholds": {"webb": 0.3}}})
    with pytest.raises(ConfigError, match="threshold"):
        load_config(CapFiltConfig, {"filter": {"threshold": 1.5}})
    overridden = load_config(CapFiltConfig, capfilt_config_path("tiny"), ["filter.thresholds.web=0.7"])
    assert overridden.filter.threshold_for("web") == 0.7 and overridden.filter.threshold_for("synthetic") == 0.5
    # Beam search returns at most num_beams sequences: refused here, not inside the actors after Ray started.
    with pytest.raises(ConfigError, match="'num_captions' = 5 is more than 'num_beams' = 3"):
        load_config(CapFiltConfig, {"captioner": {"method": "beam", "num_captions": 5, "num_beams": 3}})
    with pytest.raises(ConfigError, match=r"--set captioner.num_captions=3 .*'num_beams' = 2"):
        load_config(CapFiltConfig, {"captioner": {"method": "beam", "num_beams": 2}}, ["captioner.num_captions=3"])
    assert load_config(CapFiltConfig, {"captioner": {"num_captions": 5, "num_beams": 3}}).captioner.num_captions == 5


def capfilt_config_path(name):
    from pipelines.commands.capfilt import resolve_config_path

    return resolve_config_path(name)


def test_cache_key_ignores_actor_layout_but_not_sampling():
    from pipelines.config import config_hash

    base = load_config(CapFiltConfig, {})
    more_actors = load_config(CapFiltConfig, {"compute": {"num_actors": 8, "colocate": False}})
    other_seed = load_config(CapFiltConfig, {"captioner": {"seed": 1}})
    other_batch = load_config(CapFiltConfig, {"compute": {"batch_size": 3}})
    assert config_hash(base.cache_relevant()) == config_hash(more_actors.cache_relevant())
    assert config_hash(base.cache_relevant()) != config_hash(other_seed.cache_relevant())
    assert config_hash(base.cache_relevant()) != config_hash(other_batch.cache_relevant())

    def key(compute):
        return config_hash(load_config(CapFiltConfig, {"compute": compute}).cache_relevant())

    # FP8 linears and compiled kernels change scores; "auto" is the device it resolves to.
    assert key({"fp8_vision": True}) != key({}) and key({"compile_vision": True}) != key({})
    assert key({"device": "auto"}) == key({"device": "cpu"}) != key({"device": "cuda"})
    assert key({"device": "auto", "num_gpus_per_actor": 0.5}) == key({"device": "cuda", "num_gpus_per_actor": 1.0})
    assert key({"device": "cpu", "num_gpus_per_actor": 1.0}) == key({"device": "cpu"})


def test_sample_seed_is_stable_and_distinct():
    seed = capfilt.sample_seed(0, "000012", 0)
    assert seed == capfilt.sample_seed(0, "000012", 0)
    assert 0 <= seed < 2**63
    others = {capfilt.sample_seed(0, "000012", 1), capfilt.sample_seed(1, "000012", 0), capfilt.sample_seed(0, "000013", 0)}
    assert seed not in others and len(others) == 3
    # Pinned value: a change of the hash would silently change every published caption.
    assert seed == int.from_bytes(__import__("hashlib").sha256(b"0\x00000012\x000").digest()[:8], "big") & (2**63 - 1)


def test_keep_mask_uses_per_source_thresholds():
    config = FilterConfig(threshold=0.5, thresholds={"web": 0.7})
    assert capfilt.keep_mask([0.6, 0.6, 0.5, 0.49], ["web", "synthetic", "synthetic", "synthetic"], config) == [
        False, True, True, False,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="2 scores for 1 sources"):
        capfilt.keep_mask([0.1, 0.2], ["web"], config)


def test_decide_texts_records_every_decision():
    config = load_config(CapFiltConfig, {"captioner": {"num_captions": 2}})
    seeds = [capfilt.sample_seed(0, "k", i) for i in range(2)]
    records = capfilt.decide_texts("k", "a red circle", ["a blue square", "a red circle"], [0.2, 0.9, 0.70000004],
                                   seeds, config, captioner="cap@v1", filter_ref="itm@v1")  # fmt: skip
    assert [r["source"] for r in records] == ["web", "synthetic", "synthetic"]
    assert [r["kept"] for r in records] == [False, True, True]
    assert records[0]["drop_reason"] == "itm_below_threshold" and records[0]["captioner"] is None
    assert records[1]["seed"] == seeds[0] and records[2]["sample_index"] == 1 and records[2]["captioner"] == "cap@v1"
    assert records[2]["itm_score"] == 0.7 and all(r["filter"] == "itm@v1" for r in records)
    assert capfilt.choose_caption(records)["text"] == "a blue square"

    edge = capfilt.decide_texts("e", "a red circle", ["x"], [0.4999996, 0.4999994], seeds[:1], config,
                                captioner="c", filter_ref="f")  # fmt: skip
    assert [(r["itm_score"], r["kept"]) for r in edge] == [(0.5, True), (0.499999, False)]  # the stored score decides
    missing = capfilt.decide_texts("m", None, ["x y"], [0.99, 0.1], seeds[:1], config, captioner="c", filter_ref="f")
    assert missing[0]["drop_reason"] == "missing_web_text" and not missing[0]["kept"]
    broken = capfilt.decide_texts("b", "web text", [], None, [], config, captioner="c", filter_ref="f",
                                  image_error="decode_error")  # fmt: skip
    assert broken == [dict(broken[0], kept=False, drop_reason="decode_error", itm_score=None)]
    assert capfilt.choose_caption(broken) is None
    with pytest.raises(ValueError, match="1 scores for 2 texts"):
        capfilt.decide_texts("k", "a", ["b"], [0.5], seeds[:1], config, captioner="c", filter_ref="f")


def test_a_sample_json_that_is_not_an_object_is_read_as_no_metadata():
    """Valid JSON that is not an object (a damaged input shard) crashed the shard's writer on every retry."""
    config = load_config(CapFiltConfig, {})
    shard = capfilt.ShardPlan(index=0, path="shards/train-000000.tar", url="unused", split="train", num_samples=1)
    result = {"key": "k", "web_text": "a red circle", "error": None, "synthetic": ["a red circle"],
              "scores": [0.9, 0.8], "seeds": [1]}  # fmt: skip
    for document in (b"[1]", b"not json"):
        records, row, files = capfilt.build_sample("k", {"jpg": b"jpeg", "json": document}, result, shard, config,
                                                   {"captioner": "c@v1", "filter": "f@v1"})  # fmt: skip
        assert row["url"] is None and row["status"] == "ok"
        assert [name for name, _ in files] == ["k.jpg", "k.json", "k.txt"]


def test_beam_search_provenance_records_what_beam_search_uses(tmp_path):
    from datasets_manifests.index import write_texts

    config = load_config(CapFiltConfig, {"captioner": {"method": "beam", "num_beams": 3, "num_captions": 2}})
    beam = config.captioner
    assert capfilt._sampling(beam) == {"method": "beam", "prompt": "a picture of ", "min_length": 10, "max_length": 30,
                                       "num_captions": 2, "max_words": 30, "num_beams": 3, "repetition_penalty": 1.0}
    assert capfilt._base_seed(beam) is None and beam.caption_seeds("k") == [None, None]
    records = capfilt.decide_texts("k", "web", ["a b", "c d"], [0.9, 0.9, 0.1], beam.caption_seeds("k"), config,
                                   captioner="c", filter_ref="f")  # fmt: skip
    # All seeds null: the column keeps its int64 type (a null-typed part would differ from nucleus runs' parts).
    write_texts(capfilt.typed_table(records, "texts"), tmp_path / "texts.parquet")
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "texts.parquet")
    assert str(schema.field("seed").type) == "int64" and str(schema.field("sample_index").type) == "int64"
    with pytest.raises(ValueError, match="without a declared type: extra"):
        capfilt.typed_table([dict(records[0], extra=1)], "texts")


def test_histogram_and_stats_merge():
    assert capfilt.histogram([0.0, 0.04, 0.05, 0.5, 0.999, 1.0], bins=20) == [2, 1] + [0] * 8 + [1] + [0] * 8 + [2]
    config = load_config(CapFiltConfig, {})
    shard_a = capfilt.decide_texts("a", "good", ["syn"], [0.8, 0.3], [1], config, captioner="c", filter_ref="f")
    shard_b = capfilt.decide_texts("b", "bad", ["syn2"], [0.1, 0.6], [2], config, captioner="c", filter_ref="f")
    samples_a = [{"status": "ok", "drop_reason": None}]
    samples_b = [{"status": "ok", "drop_reason": None}, {"status": "dropped", "drop_reason": "decode_error"}]
    merged = capfilt.merge_stats([capfilt.shard_stats(shard_a, samples_a), capfilt.shard_stats(shard_b, samples_b)])
    assert merged["samples"] == 3 and merged["samples_kept"] == 2
    assert merged["texts"] == {"web": 2, "synthetic": 2} and merged["texts_kept"] == {"web": 1, "synthetic": 1}
    assert merged["kept_fraction"] == {"web": 0.5, "synthetic": 0.5}
    assert merged["sample_drop_reasons"] == {"decode_error": 1}
    assert merged["text_drop_reasons"] == {"itm_below_threshold": 2}
    assert sum(merged["histograms"]["web"]) == 2 and merged["histograms"]["web"][16] == 1
    assert {r["text"] for r in merged["rejects"]} == {"syn", "bad"}
    assert len(merged["histogram_edges"]) == 21


def _tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def test_iter_tar_samples_groups_members_and_rejects_split_keys():
    members = [(f"{k:03d}.{ext}", f"{k}{ext}".encode()) for k in range(5) for ext in ("jpg", "json", "txt")]
    assert webdata.count_tar_samples(_tar_bytes(members)) == 5
    samples = list(webdata.iter_tar_samples(_tar_bytes(members)))
    assert [(o, k) for o, k, _ in samples] == [(0, "000"), (1, "001"), (2, "002"), (3, "003"), (4, "004")]
    assert samples[1][2] == {"jpg": b"1jpg", "json": b"1json", "txt": b"1txt"}
    assert samples[4][2] == {"jpg": b"4jpg", "json": b"4json", "txt": b"4txt"}
    split = members[:2] + members[3:6] + members[2:3]  # 000.txt after 001.*: not contiguous
    with pytest.raises(ValueError, match="not contiguous"):
        list(webdata.iter_tar_samples(_tar_bytes(split)))


def test_write_tar_is_deterministic(tmp_path):
    members = [("a.jpg", b"\xff\xd8x"), ("a.json", capfilt.dumps({"b": 1, "a": [0.5]})), ("a.txt", b"hi")]
    written = webdata.write_tar(tmp_path / "one.tar", members)
    webdata.write_tar(tmp_path / "two.tar", members)
    data = (tmp_path / "one.tar").read_bytes()
    assert data == (tmp_path / "two.tar").read_bytes()
    # Digest, size and data offsets are taken while writing; they describe the file on disk.
    assert (written.sha256, written.bytes) == (hashlib.sha256(data).hexdigest(), len(data))
    with tarfile.open(tmp_path / "one.tar") as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == ["a.jpg", "a.json", "a.txt"]
        assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
        assert written.data_offsets == {i.name: (i.offset_data, i.size) for i in infos}
        assert json.loads(tar.extractfile("a.json").read()) == {"a": [0.5], "b": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_write_tar_into_an_object_store_is_one_upload_removed_on_error():
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/tar-{uuid.uuid4().hex[:8]}"
    members = [("a.jpg", b"\xff\xd8x"), ("a.txt", b"hi")]
    written = webdata.write_tar(f"{root}/s.tar", members, fs)
    data = fs.cat_file(f"{root}/s.tar")
    assert (written.sha256, written.bytes) == (hashlib.sha256(data).hexdigest(), len(data))

    def failing():
        yield members[0]
        raise ValueError("sample 'b' has no result")

    with pytest.raises(ValueError, match="no result"):
        webdata.write_tar(f"{root}/t.tar", failing(), fs)
    assert not fs.exists(f"{root}/t.tar")


def test_decode_items_are_whole_shards():
    shard = capfilt.ShardPlan(0, "shards/train-000000.tar", "/x.tar", "train", 11)
    empty = capfilt.ShardPlan(1, "shards/train-000001.tar", "/y.tar", "train", 0)
    items = capfilt.decode_items([shard, empty])
    assert items == [{"shard_index": 0, "path": "shards/train-000000.tar", "url": "/x.tar", "expected": 11,
                      "bytes": -1}]  # fmt: skip


def test_decode_shard_streams_fixed_batches_and_checks_the_count(tmp_path):
    """One read of the shard, rows of `batch_size` consecutive samples (the last one short), in order; a shard
    holding more or fewer samples than its manifest lists is an error naming it."""
    import numpy as np
    from PIL import Image

    from pipelines.tasks import _ray_capfilt

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(jpeg, "JPEG")
    members = [(f"k{i}.{ext}", data) for i in range(5) for ext, data in (("jpg", jpeg.getvalue()), ("txt", b"t"))]
    webdata.write_tar(tmp_path / "s.tar", members)

    def rows(expected: int) -> list[dict]:
        item = {"shard_index": 3, "path": "s.tar", "url": str(tmp_path / "s.tar"), "expected": expected}
        batch = {name: np.array([value]) for name, value in item.items()}
        return list(_ray_capfilt.decode_shard(batch, image_size=4, batch_size=2))

    out = rows(5)
    assert [(r["shard_index"][0], r["start"][0]) for r in out] == [(3, 0), (3, 2), (3, 4)]
    assert [json.loads(r["meta"][0])["keys"] for r in out] == [["k0", "k1"], ["k2", "k3"], ["k4"]]
    assert [len(r["pixels"][0]) for r in out] == [2 * 48, 2 * 48, 48] and all(r["decode_s"][0] >= 0 for r in out)
    with pytest.raises(ValueError, match="s.tar: more samples than the 4"):
        rows(4)
    with pytest.raises(ValueError, match="s.tar: 6 samples expected .*found 5"):
        rows(6)


def test_cli_reports_unknown_inputs_in_one_line(tmp_path, capsys):
    from pipelines.cli import main

    code = main(["capfilt", "tiny", "--dataset", "web-nothing", "--captioner", "c", "--filter", "f",
                 "--registry", str(tmp_path)])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "blip capfilt: error:" in error and "web-nothing" in error
    code = main(["capfilt", "tiny", "--dataset", "x", "--captioner", "c", "--filter", "f", "--registry", str(tmp_path),
                 "--set", "captioner.topp=0.5"])  # fmt: skip
    assert code == 2 and "captioner.topp" in capsys.readouterr().err


def _fake_model(registry, tmp_path, name, kind, image_size=32):
    from datasets_manifests.manifest import Producer

    directory = tmp_path / name
    directory.mkdir()
    # Only config.json is read before the actors start; the weights are not touched here.
    (directory / "config.json").write_text(json.dumps({"kind": kind, "config": {"vision": {"image_size": image_size}}}))
    (directory / "model.safetensors").write_bytes(b"")
    return registry.publish(kind="model", name=name, staging_dir=directory, producer=Producer(stage="test"),
                            files=[{"path": "model.safetensors"}, {"path": "config.json"}], move=False)  # fmt: skip


@pytest.fixture
def models_without_ray(tmp_path, monkeypatch):
    """A registry holding an "itm" and a "cap" model, where starting the Ray pipeline fails the test: inputs that
    cannot be used must be refused before it."""
    from datasets_manifests.registry import Registry
    from pipelines.tasks import _ray_capfilt

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for inputs that cannot be used")

    monkeypatch.setattr(_ray_capfilt, "run_pipeline", no_ray)
    registry = Registry(tmp_path / "registry")
    _fake_model(registry, tmp_path, "itm", "itm")
    _fake_model(registry, tmp_path, "cap", "caption")
    return registry


def test_cli_wrong_model_kind_and_empty_dataset_fail_before_ray_in_one_line(models_without_ray, tmp_path, capsys):
    from datasets_manifests.manifest import Producer
    from pipelines.cli import main

    registry = models_without_ray
    (tmp_path / "empty").mkdir()
    registry.publish(kind="dataset", name="web", staging_dir=tmp_path / "empty", files=[], producer=Producer(stage="t"))
    base = ["capfilt", "tiny", "--dataset", "web", "--registry", str(registry.url)]
    for refs, expected in ((["--captioner", "itm", "--filter", "itm"], "is a 'itm' model; expected caption"),
                           (["--captioner", "cap", "--filter", "cap"], "expected itm or retrieval"),
                           (["--captioner", "cap", "--filter", "itm"], "has no shards to caption")):  # fmt: skip
        assert main([*base, *refs]) == 2
        error = capsys.readouterr().err
        assert expected in error and error.startswith("blip capfilt: error:") and error.count("\n") == 1
    assert str(capfilt.CapFiltError("shard a\nb:  c")) == "shard a b: c"


def test_damaged_input_shards_fail_before_ray_in_one_line(models_without_ray, tmp_path, capsys):
    from datasets_manifests.manifest import Producer
    from pipelines.cli import main
    from pipelines.tasks.train_data import write_scene_shards

    registry = models_without_ray
    shards = write_scene_shards(tmp_path / "web", num_shards=5, per_shard=4, image_size=16)
    web = registry.publish(kind="dataset", name="web", staging_dir=tmp_path / "web", producer=Producer(stage="t"),
                           files=[{"path": p, "role": "shard", "split": "train", "num_samples": n} for p, n in shards])
    for number, entry in enumerate(web.shards()):
        if number:  # four of five: one deleted, three cut short
            path = registry.local_path(web, entry.path)
            path.unlink() if number == 1 else path.write_bytes(path.read_bytes()[:100])
    command = ["capfilt", "tiny", "--dataset", "web", "--captioner", "cap", "--filter", "itm",
               "--registry", str(registry.url)]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert error.startswith("blip capfilt: error: web@v1: 4 of its 5 shards are damaged") and error.count("\n") == 1
    assert "shards/train-000001.tar: missing; shards/train-000002.tar: 100 bytes, manifest says" in error
    assert "and 1 more" in error and "blip data verify web@v1" in error
    # A configured ground-truth file that is not there: refused before the run, not at its publish
    missing = tmp_path / "nowhere" / "ground_truth.parquet"
    assert main([*command, "--set", f"ground_truth={missing}"]) == 2
    error = capsys.readouterr().err
    assert error == f"blip capfilt: error: capfilt ground_truth {missing}: no such file\n"


def test_filter_at_another_image_size_is_reported(tmp_path, caplog):
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry

    registry = Registry(tmp_path / "registry")
    _fake_model(registry, tmp_path, "cap", "caption", image_size=32)
    _fake_model(registry, tmp_path, "itm", "itm", image_size=64)
    (tmp_path / "empty").mkdir()
    registry.publish(kind="dataset", name="web", staging_dir=tmp_path / "empty", files=[], producer=Producer(stage="t"))
    with pytest.raises(capfilt.CapFiltError, match="no shards"):  # stops before Ray, after the check
        capfilt.run_capfilt(CapFiltConfig(), "web", captioner_ref="cap", filter_ref="itm", name="out",
                            registry=registry)  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.name == capfilt.__name__]
    assert warnings == ["capfilt: the filter itm@v1 was trained at 64 px and runs at 32 px: its position embeddings "
                        "are interpolated"]  # fmt: skip


def test_multi_node_cluster_refuses_local_paths():
    two = [{"Alive": True, "NodeID": "a"}, {"Alive": True, "NodeID": "b"}]
    with pytest.raises(capfilt.CapFiltError, match="2 nodes .*/reg/shards/a.tar.*s3:// or gs://") as raised:
        capfilt.check_storage_reachable(two, ["s3://bucket/x.tar", "/reg/shards/a.tar"])
    assert "\n" not in str(raised.value)
    with pytest.raises(capfilt.CapFiltError):
        capfilt.check_storage_reachable(two, ["file:///reg/a.tar"])
    capfilt.check_storage_reachable(two, ["s3://bucket/x.tar", "gs://bucket/model"])
    capfilt.check_storage_reachable(two, ["/nfs/reg/a.tar"], shared_filesystem=True)
    capfilt.check_storage_reachable([two[0], {"Alive": False, "NodeID": "c"}], ["/reg/a.tar"])  # one node alive


def test_remote_shard_is_downloaded_once_for_decode_and_write_with_the_shard_cache(tmp_path):
    """A remote input shard (served over HTTP, as a store serves it) is read by its decode task and again by its
    writer task: with `compute.shard_cache_dir` the store sends it once and the written shard's copy is removed;
    without, twice. A download of another size than the manifest's is refused, naming the shard."""
    import numpy as np
    from PIL import Image

    from pipelines.tasks import _ray_capfilt
    from http_files import serve_files

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(jpeg, "JPEG")
    keys = [f"{i:09d}" for i in range(6)]
    members = [(f"{key}.{ext}", data) for key in keys for ext, data in (("jpg", jpeg.getvalue()), ("txt", b"a cat"))]
    (tmp_path / "store/shards").mkdir(parents=True)
    size = webdata.write_tar(tmp_path / "store/shards/train-000000.tar", members).bytes
    results = [{"key": key, "web_text": "a cat", "error": None, "synthetic": ["a cat"], "scores": [0.9, 0.8],
                "seeds": [1]} for key in keys]  # fmt: skip
    refs = {"captioner": "captioner-tiny:v1", "filter": "filter-tiny:v1"}

    def decode_and_write(served, cache_dir, manifest_bytes=size):
        config = load_config(CapFiltConfig, {"compute": {"shard_cache_dir": cache_dir, "shard_cache_gb": 1}})
        url = f"{served.url}/shards/train-000000.tar"
        shard = capfilt.ShardPlan(0, "shards/train-000000.tar", url, "train", len(keys), manifest_bytes)
        [item] = capfilt.decode_items([shard])
        batch = {name: np.array([value]) for name, value in item.items()}
        rows = list(_ray_capfilt.decode_shard(batch, image_size=4, batch_size=4,
                                              cache=capfilt.cache_setting(config.compute)))  # fmt: skip
        assert [json.loads(r["meta"][0])["keys"] for r in rows] == [keys[:4], keys[4:]]
        node = _ray_capfilt._node_id()  # '' outside Ray (no node to place the writer on); a session's node in it
        assert [r["node"] for r in rows] == [[node], [node]]
        return capfilt.finish_shard(str(tmp_path / f"work-{cache_dir is None}"), shard, results, config, refs)

    with serve_files(tmp_path / "store") as served:
        cache = tmp_path / "cache"
        cached = decode_and_write(served, str(cache))
        assert served.bytes_sent["shards/train-000000.tar"] == size
        assert [p.name for p in cache.iterdir()] == ["locks"]  # the written shard's copy is gone
        served.bytes_sent.clear()
        direct = decode_and_write(served, None)
        assert served.bytes_sent["shards/train-000000.tar"] >= 2 * size
        assert (cached["sha256"], cached["num_samples"]) == (direct["sha256"], len(keys))
        with pytest.raises(OSError, match=f"train-000000.tar gave {size} bytes, its manifest says {size + 1}"):
            decode_and_write(served, str(cache), manifest_bytes=size + 1)


def test_remote_input_without_a_shard_cache_is_warned_of(caplog):
    remote = [capfilt.ShardPlan(0, "shards/a.tar", "s3://bucket/web/shards/a.tar", "train", 5, 100)]
    local = [capfilt.ShardPlan(0, "shards/a.tar", "/registry/web/shards/a.tar", "train", 5, 100)]
    with caplog.at_level("WARNING", logger="pipelines.tasks.capfilt"):
        capfilt.warn_uncached_remote(local, capfilt.ComputeConfig())
        capfilt.warn_uncached_remote(remote, capfilt.ComputeConfig(shard_cache_dir="/tmp/cache"))
        assert not caplog.records
        capfilt.warn_uncached_remote(remote, capfilt.ComputeConfig())
    assert "s3://bucket/web/shards ...) and compute.shard_cache_dir is not set" in caplog.text


def test_undecodable_image_detail_is_reproducible(tmp_path):
    """PIL's message names the BytesIO object's address; index.parquet must not change from run to run."""
    import numpy as np
    from PIL import Image

    from pipelines.tasks import _ray_capfilt

    good = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good, "JPEG")
    members = [("a.jpg", b"<html>not an image</html>"), ("a.txt", b"web a"), ("b.jpg", good.getvalue()),
               ("c.jpg", good.getvalue()[:40])]  # fmt: skip
    webdata.write_tar(tmp_path / "s.tar", members)
    item = {"shard_index": 0, "path": "s.tar", "url": str(tmp_path / "s.tar"), "expected": 3}
    batch = {name: np.array([value]) for name, value in item.items()}
    runs = [next(_ray_capfilt.decode_shard(batch, image_size=4, batch_size=4)) for _ in range(2)]
    errors = [json.loads(rows["meta"][0])["errors"] for rows in runs]
    assert errors[0] == errors[1] and errors[0][1] is None
    unidentified = "decode_error: UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x..>"
    assert errors[0][0] == unidentified
    assert errors[0][2].startswith("decode_error: OSError: ")  # a truncated JPEG
    assert len(runs[0]["pixels"][0]) == 4 * 4 * 3  # the decodable image only


def test_model_kind_is_checked(tmp_path):
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry

    registry = Registry(tmp_path / "registry")
    directory = tmp_path / "itm"
    directory.mkdir()
    # Only config.json is read before the actors start; the weights are not touched here.
    (directory / "config.json").write_text(json.dumps({"kind": "itm", "config": {"vision": {"image_size": 32}}}))
    (directory / "model.safetensors").write_bytes(b"")
    model = registry.publish(kind="model", name="itm", staging_dir=directory, producer=Producer(stage="test"),
                             files=[{"path": "model.safetensors"}, {"path": "config.json"}], move=False)  # fmt: skip
    assert capfilt._model_source(registry, model, ("itm",))["image_size"] == 32
    with pytest.raises(capfilt.CapFiltError, match="is a 'itm' model; expected caption"):
        capfilt._model_source(registry, model, ("caption",))
    with pytest.raises(capfilt.CapFiltError, match="not a model version"):
        capfilt._model_source(registry, registry.publish(
            kind="model", name="empty", staging_dir=directory, producer=Producer(stage="test"),
            files=[{"path": "config.json"}]), ("itm",))  # fmt: skip


def test_nucleus_sampling_is_per_row_and_matches_the_reference_nucleus():
    import torch

    from blip_models.generation import top_k_top_p_filter

    generator = torch.Generator().manual_seed(0)
    for scale in (0.5, 8.0):  # flat (sorted fallback) and peaked (top-k probe) distributions
        scores = torch.randn(6, 3000, generator=generator) * scale
        reference = torch.isfinite(top_k_top_p_filter(scores, 0, 0.9))
        assert torch.equal(capfilt_models.nucleus_mask(scores.softmax(-1), 0.9), reference)
    uniforms = capfilt_models.row_uniforms([11, 12, 13], 4, "cpu")
    assert uniforms.shape == (3, 4) and bool((uniforms > 0).all()) and bool((uniforms <= 1).all())
    again = capfilt_models.row_uniforms([13], 4, "cpu")
    assert torch.equal(again[0], uniforms[2])  # a row's draws depend only on its own seed
    tokens = capfilt_models.nucleus_draw(scores[:3], 0.9, uniforms[:, 0])
    alone = capfilt_models.nucleus_draw(scores[2:3], 0.9, uniforms[2:3, 0])
    assert tokens[2] == alone[0] and bool(reference[torch.arange(3), tokens].all())


def test_top_k_nucleus_draw_walks_the_reference_nucleus_in_vocabulary_order():
    import torch

    from blip_models.generation import top_k_top_p_filter

    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 3000, generator=generator) * 2.0
    filtered = top_k_top_p_filter(scores, 50, 0.9)  # BLIP's sampling: top-k 50, then the 0.9 nucleus
    probs = filtered.softmax(dim=-1)  # (4, V), zero outside
    cdf = probs.cumsum(dim=-1)
    for u in (1e-6, 0.1, 0.37, 0.5, 0.81, 1.0):
        uniforms = torch.full((4,), u)
        tokens = capfilt_models.nucleus_draw(scores, 0.9, uniforms, top_k=50)
        # inverse CDF in vocabulary order over the same renormalised nucleus
        expected = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous()).squeeze(1)
        assert torch.equal(tokens, expected) and bool(torch.isfinite(filtered[torch.arange(4), tokens]).all())
    alone = capfilt_models.nucleus_draw(scores[1:2], 0.9, torch.tensor([0.37]), top_k=50)
    assert alone[0] == capfilt_models.nucleus_draw(scores, 0.9, torch.full((4,), 0.37), top_k=50)[1]


def test_captions_do_not_depend_on_batch_company():
    import torch

    from blip_models.configuration_blip import preset
    from blip_models.modeling_caption import BlipCaption
    from blip_models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = BlipCaption(preset("tiny")).eval(), load_tokenizer()
    config = capfilt.CaptionerConfig(num_captions=2, min_length=5, max_length=9)
    pixels = torch.randn(3, 3, 32, 32)
    together = capfilt_models.caption_images(model, tokenizer, pixels, ["a", "b", "c"], config)
    alone = capfilt_models.caption_images(model, tokenizer, pixels[1:2], ["b"], config)
    assert together[1] == alone[0] and len(together) == 3 and all(len(c) == 2 for c in together)
    assert together[1][0] != together[1][1]
    reseeded = capfilt_models.caption_images(model, tokenizer, pixels[1:2], ["b"], capfilt.CaptionerConfig(
        num_captions=2, min_length=5, max_length=9, seed=1))  # fmt: skip
    assert reseeded[0] != alone[0]
    beams = capfilt_models.caption_images(model, tokenizer, pixels[:2], ["a", "b"], capfilt.CaptionerConfig(
        method="beam", num_beams=2, num_captions=1, min_length=5, max_length=9))  # fmt: skip
    reference = model.generate(pixels[:2], tokenizer, num_beams=2, max_length=9, min_length=5)
    assert [c[0] for c in beams] == [capfilt_pre(r) for r in reference]
    # Several beams per image: the best num_captions hypotheses, as the reference returns them; no seeds.
    beam = capfilt.CaptionerConfig(method="beam", num_beams=3, num_captions=2, min_length=5, max_length=9)
    beams = capfilt_models.caption_images(model, tokenizer, pixels[:2], ["a", "b"], beam)
    reference = model.generate(pixels[:2], tokenizer, num_beams=3, num_return_sequences=2, max_length=9, min_length=5)
    assert beams == [[capfilt_pre(r) for r in reference[i : i + 2]] for i in (0, 2)]
    assert beam.caption_seeds("a") == [None, None]
    assert capfilt._sampling(beam)["repetition_penalty"] == 1.0 and "top_p" not in capfilt._sampling(beam)
    # A caption comes back from its recorded seed and the version's recorded sampling settings alone.
    records = capfilt.decide_texts("b", "web", together[1], [0.9, 0.9, 0.9], config.caption_seeds("b"), load_config(
        CapFiltConfig, {}), captioner="c", filter_ref="f")  # fmt: skip
    recorded = capfilt.CaptionerConfig(**capfilt._sampling(config))
    regenerated = capfilt_models.regenerate_caption(model, tokenizer, pixels[1:2], records[2]["seed"], recorded)
    assert regenerated == together[1][1]


def capfilt_pre(text):
    from blip_models.processing import pre_caption

    return pre_caption(text, 30)


def test_filter_scores_equal_per_pair_itm():
    """Grouped scoring (image keys/values shared by its texts) gives each pair's own ITM probability."""
    import torch

    from blip_models.configuration_blip import preset
    from blip_models.modeling_itm import BlipITM
    from blip_models.processing import pre_caption
    from blip_models.tokenizer import load_tokenizer, tokenize

    torch.manual_seed(0)
    model, tokenizer = BlipITM(preset("tiny")).eval(), load_tokenizer()
    pixels = torch.randn(3, 3, 32, 32)
    web = ["a red square on the left", None, "two blue circles and a very long caption " * 4]
    captions = [["a square", "red"], ["a circle", "blue thing"], ["x", ""]]
    config = FilterConfig()
    scores = capfilt_models.score_texts(model, tokenizer, pixels, web, captions, config)
    assert [len(row) for row in scores] == [3, 3, 3]
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixels)
        for image in range(3):
            texts = [pre_caption(t, 30) for t in [web[image] or "", *captions[image]]]
            ids, mask = tokenize(tokenizer, texts, config.max_text_tokens, padding="longest")
            logits = model.itm_logits(image_embeds[image : image + 1].expand(len(texts), -1, -1), ids, mask)
            expected = logits.softmax(-1)[:, 1].tolist()
            assert scores[image] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="caption counts"):
        capfilt_models.score_texts(model, tokenizer, pixels[:2], web[:2], [["a"], []], config)
    assert capfilt_models.score_texts(model, tokenizer, pixels[:0], [], [], config) == []


def test_sampling_checks_for_the_end_every_few_steps_with_the_same_output(monkeypatch):
    import torch

    from blip_models.generation import GenerationConfig

    eos, pad, vocab = 2, 0, 60
    ends = torch.tensor([3, 6, 1])  # row i emits eos at its ends[i]-th decoding step

    def step(new_tokens, past):
        count = 0 if past is None else past
        logits = torch.full((3, vocab), -20.0)
        logits[:, 10 + count] = 20.0  # a different token each step: the repetition penalty never matters
        logits[ends == count + 1, eos] = 40.0
        return logits, count + 1

    generation = GenerationConfig(max_length=20, min_length=0, do_sample=True, top_p=0.9, top_k=50,
                                  eos_token_id=eos, pad_token_id=pad, repetition_penalty=1.1)  # fmt: skip
    prompt = torch.tensor([[30, 31]]).repeat(3, 1)
    uniforms = torch.full((3, 20), 0.5)
    outputs = {}
    for every in (1, 4, 5):
        monkeypatch.setattr(capfilt_models, "CHECK_DONE_EVERY", every)
        outputs[every] = capfilt_models.sample_rows(step, prompt, generation, uniforms)
    assert outputs[1].shape == (3, 2 + 6)  # stops right after the last row's eos
    assert torch.equal(outputs[4], outputs[1]) and torch.equal(outputs[5], outputs[1])
    assert outputs[1][2].tolist() == [30, 31, eos, pad, pad, pad, pad, pad]


def test_finished_rows_leave_the_decoding_batch_with_the_same_captions(monkeypatch):
    """Compacting the cache (finished rows dropped at the done-checks) changes no token of any row."""
    import torch

    from blip_models import med
    from blip_models.configuration_blip import preset
    from blip_models.modeling_caption import BlipCaption
    from blip_models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = BlipCaption(preset("tiny")).eval(), load_tokenizer()
    with torch.no_grad():  # a trained captioner's habit: [SEP] becomes likely once past a few words
        model.text_decoder.cls.predictions.bias[tokenizer.sep_token_id] = 2.0
    config = capfilt.CaptionerConfig(num_captions=1, min_length=6, max_length=24)
    pixels, keys = torch.randn(16, 3, 32, 32), [f"k{i}" for i in range(16)]
    compactions, reorder_cache = {}, med.reorder_cache

    def counting_reorder(past, index):
        compactions[share].append(index.numel())  # rows kept
        return reorder_cache(past, index)

    monkeypatch.setattr(med, "reorder_cache", counting_reorder)
    monkeypatch.setattr(capfilt_models, "CHECK_DONE_EVERY", 1)
    captions = {}
    for share in (0.0, 0.5, 1.0):  # 0.0: never compact; 1.0: at every check with a finished row
        monkeypatch.setattr(capfilt_models, "COMPACT_AT", share)
        compactions[share] = []
        captions[share] = capfilt_models.caption_images(model, tokenizer, pixels, keys, config)
    assert compactions[0.0] == [] and 1 <= len(compactions[0.5]) < len(compactions[1.0])
    assert all(kept < 16 for kept in compactions[1.0]) and compactions[1.0] == sorted(compactions[1.0], reverse=True)
    assert captions[0.5] == captions[0.0] and captions[1.0] == captions[0.0]
    lengths = {len(caption[0].split()) for caption in captions[0.0]}
    assert len(lengths) >= 3  # rows really ended at different steps


def test_remote_model_files_are_loaded_without_leaving_a_copy_and_once_a_node_with_the_cache(tmp_path, monkeypatch):
    """A remote registry's model version (served over HTTP): each actor's download is removed once the model is
    loaded (it used to stay in /tmp, ~1 GB an actor); with the node's shard cache the second actor reads the
    first one's copy and the store sends each file once."""
    import tempfile

    import torch
    from http_files import serve_files

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_itm import BlipITM

    torch.manual_seed(0)
    saved = save_pretrained(BlipITM(preset("tiny")).eval(), tmp_path / "store" / "filter")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    sizes = {name: (saved / name).stat().st_size for name in ("model.safetensors", "config.json")}
    with serve_files(tmp_path / "store") as served:
        source = {name: f"{served.url}/filter/{name}" for name in sizes}
        direct = capfilt_models.load_model(source, "cpu", "float32")
        assert not list((tmp_path / "tmp").iterdir())  # the download is gone
        assert dict(served.bytes_sent) == {f"filter/{name}": size for name, size in sizes.items()}
        served.bytes_sent.clear()
        cache = (str(tmp_path / "cache"), 1 << 30)
        stale, fresh = tmp_path / "cache/model-files-killed", tmp_path / "cache/model-files-loading"
        for directory in (stale, fresh):  # left by an actor killed mid-load / another actor loading now
            directory.mkdir(parents=True)
        os.utime(stale, (0, 0))
        first, second = (capfilt_models.load_model(source, "cpu", "float32", cache) for _ in range(2))
        assert not stale.exists() and fresh.exists()
        fresh.rmdir()
        assert dict(served.bytes_sent) == {f"filter/{name}": size for name, size in sizes.items()}  # once for both
    assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache").iterdir() if p.is_file()) == sorted(sizes)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "locks"]
    for model in (first, second):
        for (name, tensor), reference in zip(model.state_dict().items(), direct.state_dict().values()):
            assert torch.equal(tensor, reference), name


def _scored_version(tmp_path, values, name="similarity", kind=None):
    """An index (a score per sample, each sample's web text first of its two texts) and texts.parquet whose web
    text is kept above 0.3, as CapFilt writes them; `values` None: no score."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = kind or pa.float32()
    kept = [value is not None and value > 0.3 for value in values]
    index = pa.table({name: pa.array(values, kind), "texts_row": pa.array([2 * i for i in range(len(values))]),
                      "status": ["ok" if web or i % 3 == 0 else "dropped" for i, web in enumerate(kept)]})
    pq.write_table(index, tmp_path / "index.parquet", row_group_size=128)
    pq.write_table(pa.table({"kept": [flag for web in kept for flag in (web, True)]}), tmp_path / "texts.parquet")
    return [pa.field(name, kind), pa.field("uid", pa.string())], index.to_pylist(), kept


def _has_value(value) -> bool:
    import math

    return value is not None and math.isfinite(value)  # null, NaN or infinite: no value


def test_source_column_stats_bins_hold_about_a_tenth_of_the_samples_each_despite_an_outlier(tmp_path):
    import random

    import numpy as np

    rng = random.Random(3)
    values = [rng.uniform(0.2, 0.4) for _ in range(990)] + [5.0] * 10
    values += [None] * 15 + [float("nan")] * 5 + [float("inf")] * 2  # no value
    rng.shuffle(values)
    carried, rows, web_kept = _scored_version(tmp_path, values)
    stats = capfilt.source_column_stats(tmp_path / "index.parquet", tmp_path / "texts.parquet", carried)
    assert list(stats) == ["similarity"]  # a string column has no bins
    score = stats["similarity"]
    edges = score["edges"]
    assert len(edges) == 11 and edges == sorted(edges) and score["missing"] == 22  # 15 nulls, 5 NaNs, 2 infinite
    scored = [row["similarity"] for row in rows if _has_value(row["similarity"])]
    assert edges[0] == min(scored) and edges[-1] == 5.0
    assert sum(score["samples"]) == 1000 and max(score["samples"]) - min(score["samples"]) <= 20  # ~100 each
    # Each sample in the bin its edges say, once (equal-width bins would hold 990 of them in the first).
    bin_of = [min(int(np.searchsorted(edges, row["similarity"], side="right")) - 1, 9) if _has_value(row["similarity"])
              else None for row in rows]  # fmt: skip
    for kind, flags in (("samples", [True] * len(rows)), ("web_text_kept", web_kept),
                        ("samples_kept", [row["status"] == "ok" for row in rows])):
        assert score[kind] == [sum(1 for b, flag in zip(bin_of, flags) if b == i and flag) for i in range(10)], kind
    assert score["web_text_kept"][0] == 0 and score["web_text_kept"][-1] == score["samples"][-1]  # the filter's cut


def test_source_column_stats_with_equal_or_integer_values(tmp_path):
    import pyarrow as pa

    (tmp_path / "same").mkdir()
    carried, *_ = _scored_version(tmp_path / "same", [0.5] * 30 + [None])
    same = capfilt.source_column_stats(tmp_path / "same/index.parquet", tmp_path / "same/texts.parquet", carried)
    assert same["similarity"] == {"edges": [0.5, 0.5], "bins": "deciles", "missing": 1, "samples": [30],
                                  "web_text_kept": [30], "samples_kept": [30]}  # fmt: skip
    (tmp_path / "ints").mkdir()
    carried, *_ = _scored_version(tmp_path / "ints", [i % 4 for i in range(40)], name="votes", kind=pa.int64())
    votes = capfilt.source_column_stats(tmp_path / "ints/index.parquet", tmp_path / "ints/texts.parquet", carried)
    # Four values, ten per value: a bin per value (a value is never split between bins).
    assert votes["votes"]["samples"] == [10, 10, 10, 10] and votes["votes"]["edges"][0] == 0.0
    assert votes["votes"]["edges"][-1] == 3.0
