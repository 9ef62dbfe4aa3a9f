"""CapFilt end to end on a real local Ray (2 CPUs, fractional-CPU actors) with tiny random BLIP models.

Inputs are built here in the shard stage's exact format (webdataset tars of {key}.jpg/.txt/.json plus
index.parquet) and published to a temporary registry, with tiny BlipCaption/BlipITM saved by save_pretrained and
published as model versions. `build_inputs` is reused by benchmarks/bench_capfilt.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(image, quality=90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_inputs(registry, *, shards=3, per_shard=6, image_size=48, corrupt=(), no_text=(), seed=0,
                 name="web-tiny"):  # fmt: skip
    """Publish a web dataset version (+ ground_truth.parquet) and tiny captioner/filter model versions. The web
    version carries two source-list columns (the download's save_additional_columns): a string `uid` and a float32
    `similarity`, in each sample's json and in its index.

    `corrupt`: keys whose .jpg is replaced by garbage bytes; `no_text`: keys without a .txt member.
    Returns (dataset, captioner, filter) manifests.
    """
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_caption import BlipCaption
    from blip_models.modeling_itm import BlipITM
    from blip_models.processing import pre_caption
    from datasets_manifests.index import write_index
    from datasets_manifests.manifest import Producer
    from pipelines.tasks import demo_corpus

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="capfilt-inputs-") as temporary:  # the registry keeps copies
        staging = Path(temporary)
        (staging / "shards").mkdir()
        files, index_rows, truth_rows = [], [], []
        for shard in range(shards):
            path = f"shards/train-{shard:06d}.tar"
            with tarfile.open(staging / path, "w") as tar:
                for position in range(per_shard):
                    row = shard * per_shard + position
                    key = f"{row:09d}"
                    scene = demo_corpus.random_scene(rng)
                    noisy = rng.random() < 0.4
                    raw = demo_corpus.noise_text("unrelated", rng) if noisy else demo_corpus.web_caption(scene, rng)
                    jpg = b"\xff\xd8\xff\xe0 not a jpeg" if key in corrupt else _jpeg(demo_corpus.render(scene, image_size))
                    url = f"http://127.0.0.1:1/images/{row:06d}.jpg"
                    meta = {"key": key, "url": url, "raw_caption": raw, "caption": pre_caption(raw, 30),
                            "image_sha256": hashlib.sha256(jpg).hexdigest(), "width": image_size, "height": image_size,
                            **source_columns_of(key)}  # fmt: skip
                    for ext, data in (("jpg", jpg), ("txt", meta["caption"].encode()), ("json", json.dumps(meta).encode())):
                        if ext == "txt" and key in no_text:
                            continue
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    index_rows.append({**meta, "caption_source": "web", "split": "train", "shard": path,
                                       "jpg_offset": None, "jpg_bytes": len(jpg), "status": "ok", "drop_reason": None})
                    truth_rows.append({"row": row, "path": f"images/{row:06d}.jpg", "caption": raw,
                                       "true_caption": demo_corpus.true_caption(scene), "shape": scene.shape,
                                       "colour": scene.colour, "is_noisy": noisy, "bad_kind": None})
            files.append({"path": path, "role": "shard", "num_samples": per_shard, "split": "train"})
        index = pa.Table.from_pylist(index_rows)
        write_index(index.set_column(index.schema.get_field_index("similarity"), "similarity",
                                     index.column("similarity").cast(pa.float32())), staging / "index.parquet")
        pq.write_table(pa.Table.from_pylist(truth_rows), staging / "ground_truth.parquet")
        files += [{"path": "index.parquet", "role": "index"}, {"path": "ground_truth.parquet", "role": "annotation"}]
        dataset = registry.publish(kind="dataset", name=name, staging_dir=staging, files=files,
                                   producer=Producer(stage="test-fixture"), splits={"train": shards * per_shard},
                                   metadata={"source_columns": ["uid", "similarity"]})  # fmt: skip
        torch.manual_seed(seed)
        config = preset("tiny")
        models = []
        for model_name, model in (("captioner-tiny", BlipCaption(config)), ("filter-tiny", BlipITM(config))):
            directory = save_pretrained(model.eval(), staging / model_name)
            found = registry.find_cached("model", model_name, f"seed{seed}")
            models.append(found or registry.publish(
                kind="model", name=model_name, staging_dir=directory, producer=Producer(stage="test-fixture", cache_key=f"seed{seed}"),
                files=[{"path": "model.safetensors", "role": "weights"}, {"path": "config.json", "role": "config"}]))
        return dataset, models[0], models[1]


def source_columns_of(key: str) -> dict:
    return {"uid": f"u{key[-4:]}", "similarity": int(key) / 100}


def _shard_bytes(registry, manifest):
    return {entry.path: registry.local_path(manifest, entry.path).read_bytes() for entry in manifest.shards()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from datasets_manifests.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("registry"))
    dataset, captioner, filter_model = build_inputs(registry, shards=3, per_shard=6, corrupt=("000000007",),
                                                    no_text=("000000012",))  # fmt: skip
    return registry, dataset, captioner, filter_model


def _splitting_thresholds(texts):
    """(threshold, thresholds.web) between observed ITM scores, so that a run with them drops texts of both
    sources, keeps some, drops every text of some sample, and decides some web text differently than the
    default threshold would (the tiny random filter scores everything ~0.53: the fixed 0.5 drops nothing).

    Cuts lie halfway in gaps >= 1e-5 between stored scores: far from any score, whatever its rounding.
    """
    scored = [t for t in texts if t["itm_score"] is not None and t["drop_reason"] != "missing_web_text"]

    def cuts(source):
        values = sorted({t["itm_score"] for t in scored if t["source"] == source})
        middle = [(a + b) / 2 for a, b in zip(values, values[1:]) if b - a >= 1e-5]
        return sorted(middle, key=lambda cut: abs(middle.index(cut) - len(middle) / 2))  # balanced cuts first

    by_key = {}
    for text in scored:
        by_key.setdefault(text["key"], []).append(text)
    for default in cuts("synthetic"):
        for web in cuts("web"):
            limit = {"web": web, "synthetic": default}
            nothing_kept = any(all(t["itm_score"] < limit[t["source"]] for t in group) for group in by_key.values())
            per_source = any(min(web, default) <= t["itm_score"] < max(web, default)
                             for t in scored if t["source"] == "web")  # fmt: skip
            if nothing_kept and per_source:
                return default, web
    raise AssertionError("no thresholds split the observed scores")


def _check_provenance(registry, manifest, config, captioner, filter_model):
    """Index, texts.parquet, shard members and manifest metadata tell one consistent story."""
    import pyarrow as pa

    from datasets_manifests.index import read_index, read_texts
    from pipelines.tasks.capfilt import sample_seed

    texts = read_texts(registry, manifest).to_pylist()
    index = {row["key"]: row for row in read_index(registry, manifest).to_pylist()}
    metadata = manifest.metadata
    # Each sample's texts are together, in the index's order, where the index says (texts_row, texts_count).
    placed = [(row["texts_row"], row["texts_count"], key) for key, row in index.items()]
    assert [first for first, _, _ in placed] == list(np.cumsum([0] + [n for _, n, _ in placed])[:-1])
    assert [text["key"] for text in texts] == [key for _, count, key in placed for _ in range(count)]
    thresholds = {source: config.filter.threshold_for(source) for source in ("web", "synthetic")}
    assert metadata["thresholds"] == thresholds and metadata["seed"] == config.captioner.seed
    # The source list's columns, on every row (dropped ones too), as typed in the input's index.
    assert metadata["source_columns"] == ["uid", "similarity"]
    assert read_index(registry, manifest, ["similarity"]).schema.field("similarity").type == pa.float32()
    for key, row in index.items():
        assert row["uid"] == source_columns_of(key)["uid"]
        assert row["similarity"] == pytest.approx(source_columns_of(key)["similarity"], rel=1e-6)
    assert metadata["sampling"]["repetition_penalty"] == config.captioner.repetition_penalty
    by_key = {}
    for text in texts:
        by_key.setdefault(text["key"], []).append(text)
        assert text["kept"] == (text["drop_reason"] is None)
        if text["itm_score"] is None:
            continue
        assert text["filter"] == filter_model.ref
        if text["source"] == "synthetic":
            assert text["seed"] == sample_seed(config.captioner.seed, text["key"], text["sample_index"])
            assert text["captioner"] == captioner.ref
        nonblank = bool(text["text"].strip())
        # Every decision, web texts included, follows its source's threshold.
        assert text["kept"] == (nonblank and text["itm_score"] >= thresholds[text["source"]]), text
    seen = set()
    for entry in manifest.shards():
        with tarfile.open(registry.local_path(manifest, entry.path)) as tar:
            for name in tar.getnames():
                if not name.endswith(".json"):
                    continue
                document = json.loads(tar.extractfile(name).read())
                key = document["key"]
                seen.add(key)
                row = index[key]
                assert row["shard"] == entry.path and row["jpg_offset"] is not None and row["status"] == "ok"
                assert document["uid"] == row["uid"] and document["similarity"] == pytest.approx(row["similarity"])
                assert document["capfilt"] == {"captioner": captioner.ref, "filter": filter_model.ref,
                                               "seed": metadata["seed"], "sampling": metadata["sampling"],
                                               "thresholds": metadata["thresholds"]}  # fmt: skip
                # The json's texts are the texts.parquet rows of its key, in order.
                fields = ("text", "source", "kept", "drop_reason", "seed", "sample_index")
                assert [{f: t[f] for f in fields} for t in document["texts"]] == \
                    [{f: t[f] for f in fields} for t in by_key[key]]  # fmt: skip
                assert [t["itm_score"] for t in document["texts"]] == \
                    pytest.approx([t["itm_score"] for t in by_key[key]], abs=1e-6)  # fmt: skip
                assert document["captions"] == [t["text"] for t in by_key[key] if t["kept"]]
                assert tar.extractfile(f"{key}.txt").read().decode() == document["caption"] == row["caption"]
                assert row["texts_kept"] == len(document["captions"])
    assert seen == {key for key, row in index.items() if row["status"] == "ok"}
    return texts, index


def _regenerate(registry, manifest, captioner):
    """One published caption, regenerated on the CPU from its shard's json (recorded seed + sampling) alone."""
    import numpy as np
    from PIL import Image

    from blip_models.tokenizer import load_tokenizer
    from pipelines.tasks import capfilt_models
    from pipelines.tasks.capfilt import CaptionerConfig

    directory = registry.local_path(captioner, "config.json").parent
    size = json.loads((directory / "config.json").read_text())["config"]["vision"]["image_size"]
    model = capfilt_models.load_model({"dir": str(directory)}, "cpu", "float32")
    entry = manifest.shards()[0]
    with tarfile.open(registry.local_path(manifest, entry.path)) as tar:
        name = next(n for n in tar.getnames() if n.endswith(".json"))
        document = json.loads(tar.extractfile(name).read())
        jpg = tar.extractfile(name.replace(".json", ".jpg")).read()
    with Image.open(io.BytesIO(jpg)) as image:  # eval_transform's bicubic resize, as the decode tasks do it
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    pixel_values = capfilt_models.normalize_pixels(pixels[None], "cpu", "float32")
    sampling = CaptionerConfig(**document["capfilt"]["sampling"])
    tokenizer = load_tokenizer()
    for text in document["texts"]:
        if text["source"] == "synthetic":
            regenerated = capfilt_models.regenerate_caption(model, tokenizer, pixel_values, text["seed"], sampling)
            assert regenerated == text["text"]


@pytest.mark.integration
def test_capfilt_full_run_provenance(ray_session, inputs, tmp_path):
    import pyarrow.parquet as pq

    from pipelines.config import load_config
    from pipelines.tasks.capfilt import CapFiltConfig, run_capfilt

    registry, dataset, captioner, filter_model = inputs
    # With the shard cache on (local shards are read in place), the writer tasks go to the nodes that decoded
    # their shards: the placement goes through Ray here (the cache's own effect is tested with remote shards in
    # test_shard_writer_tasks_write_each_shard_and_name_a_failed_one)
    config = load_config(CapFiltConfig, ROOT / "configs/capfilt/tiny.yaml",
                         [f"compute.shard_cache_dir={tmp_path / 'shard-cache'}"])  # fmt: skip
    manifest = run_capfilt(config, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                           name="web-tiny-capfilt", registry=registry)
    assert manifest.parents == (dataset.ref, captioner.ref, filter_model.ref)
    assert manifest.producer.stage == "capfilt" and manifest.metadata["sampling"]["top_p"] == 0.9
    texts, index = _check_provenance(registry, manifest, config, captioner, filter_model)
    assert len(index) == 18 and len(texts) == 17 * 3 + 1  # web + 2 synthetic per decoded sample
    broken = index["000000007"]
    assert broken["status"] == "dropped" and broken["drop_reason"] == "decode_error"
    assert broken["error_detail"].startswith("decode_error: ") and " at 0x" not in broken["error_detail"]
    assert manifest.drop_reasons.get("decode_error") == 1
    assert all(t["drop_reason"] == "decode_error" for t in texts if t["key"] == "000000007")
    # Every other sample of the broken sample's shard was captioned and scored.
    same_shard = [t for t in texts if "000000006" <= t["key"] <= "000000011" and t["key"] != "000000007"]
    assert len(same_shard) == 15 and all(t["itm_score"] is not None for t in same_shard)
    no_text = [t for t in texts if t["key"] == "000000012"]
    assert no_text[0]["source"] == "web" and no_text[0]["drop_reason"] == "missing_web_text"
    stats = manifest.stats["capfilt"]
    assert stats["texts"] == {"web": 18, "synthetic": 34}
    assert set(stats["kept_fraction"]) == {"web", "synthetic"}
    quality = stats["quality"]
    assert quality["samples_matched"] == 17 and quality["synthetic"]["total"] == 34
    # CapFilt's decisions along the carried score: each sample in its bin (deciles of the samples), once.
    by_score = stats["by_source_column"]["similarity"]
    edges, web_kept = by_score["edges"], {t["key"] for t in texts if t["source"] == "web" and t["kept"]}
    bins = len(edges) - 1
    assert by_score["missing"] == 0 and bins == 10 and set(by_score["samples"]) == {1, 2}  # 18 samples, ~1.8 each
    assert (edges[0], edges[-1]) == pytest.approx((0.0, 0.17))  # the 18 samples' scores: 0.00 ... 0.17
    bin_of = {key: min(int(np.searchsorted(edges, row["similarity"], side="right")) - 1, bins - 1)
              for key, row in index.items()}  # fmt: skip
    for kind, counted in (("samples", set(index)), ("web_text_kept", web_kept),
                          ("samples_kept", {key for key, row in index.items() if row["status"] == "ok"})):
        assert by_score[kind] == [sum(bin_of[key] == b for key in counted) for b in range(bins)], kind
    assert sum(by_score["web_text_kept"]) == stats["texts_kept"]["web"]
    assert json.loads(registry.local_path(manifest, "stats.json").read_text())["by_source_column"] == \
        {"similarity": by_score}  # fmt: skip
    assert 0 <= stats["throughput"]["actor_busy_fraction"] <= 1
    assert stats["throughput"]["writes_on_decode_node"] == 3  # each shard's decode node reached the driver
    assert pq.read_table(registry.local_path(manifest, "texts.parquet")).num_rows == len(texts)
    # The shard digests the writer tasks recorded while writing (the publish did not re-read) are the files'.
    from datasets_manifests.ops import verify

    assert verify(registry, manifest) == []
    _regenerate(registry, manifest, captioner)
    # BLIP's released form of the kept texts (`blip data export`): one item per kept text, with its sample's URL.
    from datasets_manifests.export import export_texts

    counts = export_texts(registry, manifest, tmp_path / "boot.jsonl", "jsonl")
    exported = [json.loads(line) for line in (tmp_path / "boot.jsonl").read_text().splitlines()]
    kept = [t for t in texts if t["kept"]]
    assert [(e["key"], e["caption"]) for e in exported] == [(t["key"], t["text"]) for t in kept]
    assert all(e["url"] == index[e["key"]]["url"] for e in exported) and sum(counts.values()) == len(kept)

    # Separate caption and filter pools, with thresholds cut between this run's scores (a default and a
    # different web one): the same captions and scores, and now the filter drops texts and whole samples.
    default, web = _splitting_thresholds(texts)
    split = load_config(CapFiltConfig, ROOT / "configs/capfilt/tiny.yaml",
                        ["compute.colocate=false", "compute.num_actors=1", "compute.filter_actors=1",
                         f"filter.threshold={default!r}", f"filter.thresholds.web={web!r}"])  # fmt: skip
    separate = run_capfilt(split, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                           name="web-tiny-capfilt-pools", registry=registry)
    assert 0 <= separate.stats["capfilt"]["throughput"]["caption_actor_busy_fraction"] <= 1
    split_texts, split_index = _check_provenance(registry, separate, split, captioner, filter_model)
    computed = ("key", "text", "source", "itm_score", "seed", "sample_index", "captioner", "filter")
    assert [{c: t[c] for c in computed} for t in split_texts] == [{c: t[c] for c in computed} for t in texts]
    assert separate.metadata["thresholds"] == {"web": web, "synthetic": default} and web != default
    reasons = {(t["source"], t["drop_reason"]) for t in split_texts}
    assert {("web", "itm_below_threshold"), ("synthetic", "itm_below_threshold")} <= reasons
    assert any(t["kept"] for t in split_texts if t["source"] == "web")
    assert any(t["kept"] for t in split_texts if t["source"] == "synthetic")
    # The per-source threshold decided some web text that the default threshold would have decided otherwise.
    assert any((t["itm_score"] >= web) != (t["itm_score"] >= default) for t in split_texts
               if t["source"] == "web" and t["itm_score"] is not None and t["drop_reason"] != "missing_web_text")
    # A sample none of whose texts is kept: in the index with its reason, not in the shards.
    nothing_kept = [row for row in split_index.values() if row["drop_reason"] == "no_text_kept"]
    assert nothing_kept and all(row["status"] == "dropped" and row["shard"] is None for row in nothing_kept)
    assert separate.drop_reasons["no_text_kept"] == len(nothing_kept) and separate.drop_reasons["decode_error"] == 1
    assert separate.counts["kept"] == sum(row["status"] == "ok" for row in split_index.values())
    # Same inputs + config: the published version comes back, no work.
    again = run_capfilt(config, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                        name="web-tiny-capfilt", registry=registry)
    assert again.id == manifest.id


def _fake_results(keys: list[str]) -> list[dict]:
    """What the model actors would send for `keys`: web text + one caption, scored (no model needed)."""
    return [{"key": key, "web_text": "a red circle", "error": None, "synthetic": ["a red circle"],
             "scores": [0.9, 0.8], "seeds": [1]} for key in keys]  # fmt: skip


def _shard_keys(shard_index: int, per_shard: int = 3) -> list[str]:
    return [f"{shard_index * per_shard + i:09d}" for i in range(per_shard)]


@pytest.mark.integration
def test_shard_writer_tasks_write_each_shard_and_name_a_failed_one(ray_session, tmp_path):
    """Writer tasks write every shard (bytes hashed as written, marker last); a write that fails names its
    shard in the driver's error and leaves no marker."""
    from datasets_manifests.registry import Registry
    from pipelines.tasks import _ray_capfilt
    from pipelines.tasks.capfilt import CapFiltConfig, CapFiltError, marker_relpath, plan_shards

    registry = Registry(tmp_path / "registry")
    dataset, captioner, filter_model = build_inputs(registry, shards=2, per_shard=3, seed=2)
    config = CapFiltConfig()
    shards = plan_shards(registry, dataset, config)
    refs = {"captioner": captioner.ref, "filter": filter_model.ref}
    writers = _ray_capfilt.ShardWriters(config, str(tmp_path / "work"), refs)
    for shard in shards:
        writers.submit(shard, _fake_results(_shard_keys(shard.index)))
    markers = sorted(writers.finish(), key=lambda marker: marker["path"])
    assert [m["path"] for m in markers] == [s.path for s in shards]
    assert all((tmp_path / "work" / marker_relpath(s)).exists() for s in shards)
    for marker in markers:
        data = (tmp_path / "work" / marker["path"]).read_bytes()
        assert (marker["sha256"], marker["bytes"], marker["num_samples"]) == (hashlib.sha256(data).hexdigest(), len(data), 3)

    writers = _ray_capfilt.ShardWriters(config, str(tmp_path / "work-bad"), refs)
    writers.submit(shards[1], _fake_results(_shard_keys(0)))  # shard 1's samples, shard 0's results
    with pytest.raises(CapFiltError, match="shards/train-000001.tar: sample '000000003' has no CapFilt result"):
        writers.finish()
    assert not (tmp_path / "work-bad" / marker_relpath(shards[1])).exists()

    # A writer whose worker died (not an error of its own: WorkerCrashedError) stops the run too, after the writes
    # still in flight have finished: it escaped at once before, and a rerun in the same process (the flow retries
    # such errors) could write a shard beside a write of it still running.
    def write_or_crash(work: str, shard: str, results: list, *args: object) -> dict:
        import os
        import time
        from pathlib import Path

        if shard == "crash":
            os._exit(1)
        time.sleep(3)
        Path(work, "slow-done").write_text("written")
        return {"path": shard}

    slow_work = tmp_path / "work-crash"
    slow_work.mkdir()
    writers = _ray_capfilt.ShardWriters(config, str(slow_work), refs)
    writers.write, writers.options["max_retries"] = ray_session.remote(write_or_crash), 0
    writers.submit("crash", [])
    ray_session.wait(writers.pending, timeout=60)  # its worker is gone
    with pytest.raises(ray_session.exceptions.WorkerCrashedError):
        writers.submit("slow", [])
    assert (slow_work / "slow-done").read_text() == "written" and writers.pending == []

    # Remote shards through the node's shard cache: the writer task, placed on the node that "decoded" the shard
    # (here: this process filled the cache, as a decode task on that node does), reads the node's copy; the store
    # sends each shard once, and the copy is removed once written.
    import dataclasses

    from http_files import serve_files

    from pipelines.config import load_config
    from pipelines.tasks.shard_cache import ShardCache

    cache_dir = tmp_path / "shard-cache"
    cached_config = load_config(CapFiltConfig, {"compute": {"shard_cache_dir": str(cache_dir)}})
    node = ray_session.get_runtime_context().get_node_id()
    with serve_files(registry.local_path(dataset, "index.parquet").parent) as served:
        remote = [dataclasses.replace(shard, url=f"{served.url}/{shard.path}") for shard in shards]
        for shard in remote:
            ShardCache(str(cache_dir), 2**30).open(shard.url, shard.bytes).close()
        writers = _ray_capfilt.ShardWriters(cached_config, str(tmp_path / "work-cached"), refs)
        for shard in remote:
            writers.submit(shard, _fake_results(_shard_keys(shard.index)), node=node)
        cached_markers = sorted(writers.finish(), key=lambda marker: marker["path"])
        assert dict(served.bytes_sent) == {shard.path: shard.bytes for shard in shards}  # once each, by the fill
    assert [m["sha256"] for m in cached_markers] == [m["sha256"] for m in markers]
    assert [p.name for p in cache_dir.iterdir()] == ["locks"]


@pytest.mark.integration
def test_remote_registry_stages_shards_in_its_store_and_publishes_them_there(tmp_path):
    """A remote registry (fsspec memory://, standing in for s3://): writers put shards, parts and markers under
    the registry's shared work prefix; the publish copies the shards inside the store and removes the prefix.
    In-process (no Ray: memory:// is per process); the writer tasks run this same function on the cluster."""
    from datasets_manifests.index import read_index
    from datasets_manifests.ops import verify
    from datasets_manifests.registry import Registry
    from pipelines.tasks import capfilt
    from pipelines.tasks.capfilt import CapFiltConfig, finish_shard, marker_relpath, plan_shards

    registry = Registry(f"memory://capfilt-remote-{os.getpid()}-{time.time_ns()}")
    dataset, captioner, filter_model = build_inputs(registry, shards=2, per_shard=3, seed=3)
    config = CapFiltConfig()
    shards = plan_shards(registry, dataset, config)
    refs = {"captioner": captioner.ref, "filter": filter_model.ref}
    shared = registry.shared_work_url("k-remote")
    assert shared.startswith("memory://")
    for shard in shards:
        finish_shard(shared, shard, _fake_results(_shard_keys(shard.index)), config, refs)
    fs, root = registry.fs, registry.fs._strip_protocol(shared)
    assert all(fs.exists(f"{root}/{marker_relpath(s)}") and fs.exists(f"{root}/{s.path}") for s in shards)
    assert capfilt.pending_shards(shared, shards) == []  # found by one listing of the work prefix
    tar = fs.cat_file(f"{root}/{shards[1].path}")
    fs.rm(f"{root}/{shards[1].path}")  # a marker without its tar (a publish killed mid-move): redone
    assert capfilt.pending_shards(shared, shards) == [shards[1]]
    fs.pipe(f"{root}/{shards[1].path}", tar)
    assert capfilt.pending_shards(f"{shared}/nothing-yet", shards) == shards
    manifest = capfilt._publish(registry, config, "k-remote", shared, shards, "remote-capfilt", "t0",
                                {"images": 6}, [dataset, captioner, filter_model])  # fmt: skip
    assert [e.path for e in manifest.shards()] == [s.path for s in shards]
    assert verify(registry, manifest) == []  # the writers' digests are the published files'
    assert len(read_index(registry, manifest)) == 6 and manifest.counts["kept"] == 6
    assert not fs.exists(root)  # the shared work prefix is gone after the publish
    # A run stopped between its publish and that clean-up: the rerun that finds the version removes what is left.
    fs.pipe(f"{root}/shards/train-000000.tar", b"staged")
    (registry.work_dir("k-remote") / "index.parquet").write_bytes(b"merged")
    capfilt._remove_leftover_work(registry, "k-remote")
    assert not fs.exists(root) and not list(registry.work_dir("k-remote").iterdir())


_DRIVER = """
import sys
from datasets_manifests.registry import Registry
from pipelines.config import load_config
from pipelines.tasks.capfilt import CapFiltConfig, run_capfilt
registry = Registry(sys.argv[1])
config = load_config(CapFiltConfig, sys.argv[2], sys.argv[3:])
manifest = run_capfilt(config, "web-tiny", captioner_ref="captioner-tiny", filter_ref="filter-tiny",
                       name="resumed", registry=registry)
print(manifest.ref)
"""


@pytest.mark.integration
def test_capfilt_kill_and_rerun_is_byte_identical(ray_session, tmp_path):
    """SIGKILL the driver after some shards are committed; the rerun's shards equal an uninterrupted run's bytes."""
    from datasets_manifests.registry import Registry
    from pipelines.config import load_config
    from pipelines.tasks.capfilt import CapFiltConfig, run_capfilt

    registry = Registry(tmp_path / "registry")
    dataset, captioner, filter_model = build_inputs(registry, shards=5, per_shard=6, seed=1)
    overrides = ["compute.num_actors=1", "captioner.num_captions=1"]
    config = load_config(CapFiltConfig, ROOT / "configs/capfilt/tiny.yaml", overrides)
    reference = run_capfilt(config, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                            name="uninterrupted", registry=registry)
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-c", _DRIVER, str(registry.url), str(ROOT / "configs/capfilt/tiny.yaml"), *overrides]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    markers = registry.root and Path(registry.root) / ".work"
    deadline = time.time() + 240
    done: list[Path] = []
    while time.time() < deadline and driver.poll() is None:
        done = list(markers.glob("*/done/*.json"))
        if len(done) >= 2:
            break
        time.sleep(0.02)
    assert driver.poll() is None, f"driver ended before it could be killed: {driver.communicate()}"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    done = list(markers.glob("*/done/*.json"))
    assert 2 <= len(done) <= 5, f"{len(done)} shards committed when killed"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = registry.resolve("resumed")
    assert resumed.stats["capfilt"]["throughput"]["shards_resumed"] == len(done)
    assert _shard_bytes(registry, resumed) == _shard_bytes(registry, reference)
    for name in ("index.parquet", "texts.parquet"):
        import pyarrow.parquet as pq

        assert pq.read_table(registry.local_path(resumed, name)).equals(pq.read_table(registry.local_path(reference, name)))


@pytest.mark.integration
def test_a_model_actor_killed_mid_run_loses_and_duplicates_nothing(ray_session, tmp_path):
    """SIGKILL the CapFilt actor process once the first shard is committed: Ray Data restarts it and retries the
    batches it had; the run completes with the same shards, index and texts as an uninterrupted run."""
    import threading

    import pyarrow.parquet as pq
    from process_table import processes  # Ray sets a worker's title: ray::<actor or task>

    from datasets_manifests.registry import Registry
    from pipelines.config import load_config
    from pipelines.tasks.capfilt import CapFiltConfig, run_capfilt

    registry = Registry(tmp_path / "registry")
    dataset, captioner, filter_model = build_inputs(registry, shards=8, per_shard=8, seed=3)
    # One actor, small batches and full-length captions: the actor is still busy when the first shard is written.
    overrides = ["compute.num_actors=1", "compute.batch_size=2", "captioner.num_captions=1", "captioner.max_length=30"]
    config = load_config(CapFiltConfig, ROOT / "configs/capfilt/tiny.yaml", overrides)
    reference = run_capfilt(config, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                            name="uninterrupted", registry=registry)
    killed: list[int] = []
    markers = Path(registry.root) / ".work"

    def kill_the_actor_after_the_first_shard() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if list(markers.glob("*/done/*.json")):
                for pid in [pid for pid, _, title in processes() if "MapBatches(CapFiltActor)" in title]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_actor_after_the_first_shard, daemon=True)
    killer.start()
    survived = run_capfilt(config, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                           name="actor-killed", registry=registry)
    killer.join(timeout=5)
    assert killed, "the run ended before its actor could be killed"
    assert survived.stats["capfilt"]["throughput"]["shards_resumed"] == 0  # recovered inside the run, by Ray
    assert survived.counts == reference.counts and survived.drop_reasons == reference.drop_reasons
    assert _shard_bytes(registry, survived) == _shard_bytes(registry, reference)
    for name in ("index.parquet", "texts.parquet"):
        table = pq.read_table(registry.local_path(survived, name))
        assert table.equals(pq.read_table(registry.local_path(reference, name)))
