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

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _jpeg(image, quality=90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def build_inputs(registry, *, shards=3, per_shard=6, image_size=48, corrupt=(), seed=0, name="web-tiny"):
    """Publish a web dataset version (+ ground_truth.parquet) and tiny captioner/filter model versions.

    `corrupt`: keys whose .jpg is replaced by garbage bytes. Returns (dataset, captioner, filter) manifests.
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
    staging = Path(tempfile.mkdtemp(prefix="capfilt-inputs-"))
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
                        "image_sha256": hashlib.sha256(jpg).hexdigest(), "width": image_size, "height": image_size}
                for ext, data in (("jpg", jpg), ("txt", meta["caption"].encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index_rows.append({**meta, "caption_source": "web", "split": "train", "shard": path,
                                   "jpg_offset": None, "jpg_bytes": len(jpg), "status": "ok", "drop_reason": None})
                truth_rows.append({"row": row, "path": f"images/{row:06d}.jpg", "caption": raw,
                                   "true_caption": demo_corpus.true_caption(scene), "shape": scene.shape,
                                   "colour": scene.colour, "is_noisy": noisy, "bad_kind": None})
        files.append({"path": path, "role": "shard", "num_samples": per_shard, "split": "train"})
    write_index(index_rows, staging / "index.parquet")
    pq.write_table(pa.Table.from_pylist(truth_rows), staging / "ground_truth.parquet")
    files += [{"path": "index.parquet", "role": "index"}, {"path": "ground_truth.parquet", "role": "annotation"}]
    dataset = registry.publish(kind="dataset", name=name, staging_dir=staging, files=files,
                               producer=Producer(stage="test-fixture"), splits={"train": shards * per_shard})
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


def _shard_bytes(registry, manifest):
    return {entry.path: registry.local_path(manifest, entry.path).read_bytes() for entry in manifest.shards()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from datasets_manifests.registry import Registry

    registry = Registry(tmp_path_factory.mktemp("registry"))
    dataset, captioner, filter_model = build_inputs(registry, shards=3, per_shard=6, corrupt=("000000007",))
    return registry, dataset, captioner, filter_model


@pytest.mark.integration
def test_capfilt_full_run_provenance(ray_session, inputs):
    import pyarrow.parquet as pq

    from datasets_manifests.index import read_index, read_texts
    from pipelines.config import load_config
    from pipelines.tasks.capfilt import CapFiltConfig, run_capfilt

    registry, dataset, captioner, filter_model = inputs
    # Thresholds chosen so the tiny random filter keeps some texts and drops others.
    config = load_config(CapFiltConfig, ROOT / "configs/capfilt/tiny.yaml")
    manifest = run_capfilt(config, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                           name="web-tiny-capfilt", registry=registry)
    assert manifest.parents == (dataset.ref, captioner.ref, filter_model.ref)
    assert manifest.producer.stage == "capfilt" and manifest.metadata["sampling"]["top_p"] == 0.9
    texts = read_texts(registry, manifest).to_pylist()
    index = read_index(registry, manifest).to_pylist()
    assert len(index) == 18 and len(texts) == 17 * 3 + 1  # web + 2 synthetic per decoded sample
    broken = [row for row in index if row["key"] == "000000007"][0]
    assert broken["status"] == "dropped" and broken["drop_reason"] == "decode_error"
    assert "decode_error" in broken["error_detail"]
    assert manifest.drop_reasons.get("decode_error") == 1
    assert all(t["drop_reason"] == "decode_error" for t in texts if t["key"] == "000000007")
    # Every other sample of the broken sample's shard was captioned and scored.
    same_shard = [t for t in texts if "000000006" <= t["key"] <= "000000011" and t["key"] != "000000007"]
    assert len(same_shard) == 15 and all(t["itm_score"] is not None for t in same_shard)
    for text in texts:
        assert text["kept"] == (text["drop_reason"] is None)
        if text["source"] == "synthetic" and text["itm_score"] is not None:
            from pipelines.tasks.capfilt import sample_seed

            assert text["seed"] == sample_seed(0, text["key"], text["sample_index"])
            assert text["captioner"] == captioner.ref and text["filter"] == filter_model.ref
            assert text["kept"] == (text["itm_score"] >= 0.5)
    # Shards: exactly the kept samples, each json carrying every text and the provenance.
    kept_keys = {row["key"] for row in index if row["status"] == "ok"}
    seen = set()
    for entry in manifest.shards():
        with tarfile.open(registry.local_path(manifest, entry.path)) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".json"):
                    document = json.loads(tar.extractfile(name).read())
                    key = document["key"]
                    seen.add(key)
                    assert document["capfilt"]["captioner"] == captioner.ref
                    assert len(document["texts"]) == 3 and document["captions"]
                    assert tar.extractfile(f"{key}.txt").read().decode() in document["captions"]
                    row = [r for r in index if r["key"] == key][0]
                    assert row["shard"] == entry.path and row["jpg_offset"] is not None
    assert seen == kept_keys
    stats = manifest.stats["capfilt"]
    assert stats["texts"] == {"web": 18, "synthetic": 34}
    assert set(stats["kept_fraction"]) == {"web", "synthetic"}
    quality = stats["quality"]
    assert quality["samples_matched"] == 17 and quality["synthetic"]["total"] == 34
    assert 0 <= stats["throughput"]["actor_busy_fraction"] <= 1
    assert pq.read_table(registry.local_path(manifest, "texts.parquet")).num_rows == len(texts)
    # Separate caption and filter pools compute exactly what the colocated actor computes.
    separate = run_capfilt(load_config(CapFiltConfig, ROOT / "configs/capfilt/tiny.yaml",
                                       ["compute.colocate=false", "compute.num_actors=1", "compute.filter_actors=1"]),
                           dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                           name="web-tiny-capfilt-pools", registry=registry)
    assert _shard_bytes(registry, separate) == _shard_bytes(registry, manifest)
    assert 0 <= separate.stats["capfilt"]["throughput"]["caption_actor_busy_fraction"] <= 1
    # Same inputs + config: the published version comes back, no work.
    again = run_capfilt(config, dataset.ref, captioner_ref=captioner.ref, filter_ref=filter_model.ref,
                        name="web-tiny-capfilt", registry=registry)
    assert again.id == manifest.id


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
