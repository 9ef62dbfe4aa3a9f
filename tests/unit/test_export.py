"""`blip data export`: a version's kept texts as BLIP's released files (a JSON list of {url, caption}) or JSON
lines; a CapFilt version's kept web and synthetic texts joined with their samples' URLs, dropped ones left out."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from datasets_manifests.index import TEXTS_SCHEMA
from datasets_manifests.registry import Registry, RegistryError
from pipelines.cli import main
from datasets_fixtures import memory_url, publish_dataset, sample_rows


def _texts(rows):
    """Two texts a sample, web then synthetic, in the index's order; odd samples' web text dropped."""
    texts = []
    for i, row in enumerate(rows):
        texts.append({"key": row["key"], "text": f"web text {i}", "source": "web", "itm_score": 0.9 - i / 100,
                      "kept": i % 2 == 0, "drop_reason": None if i % 2 == 0 else "itm_below_threshold"})
        texts.append({"key": row["key"], "text": f"a synthetic caption {i}", "source": "synthetic",
                      "itm_score": 0.75, "kept": True, "drop_reason": None})
    return pa.Table.from_pylist(texts, schema=TEXTS_SCHEMA)


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path):
    """A local registry and one on a filesystem (fsspec's memory://, as a bucket) whose files are streamed."""
    registry = Registry(str(tmp_path / "registry") if request.param == "local" else memory_url())
    rows = sample_rows(5, dropped={3: "broken_image"})
    publish_dataset(registry, tmp_path / "web", "web", [dict(r) for r in rows])
    publish_dataset(registry, tmp_path / "boot", "boot", [dict(r) for r in rows], stage="capfilt", texts=_texts(rows))
    return registry


def test_a_capfilt_version_as_blips_released_files(registry, tmp_path, capsys):
    out = tmp_path / "boot.json"
    assert main(["data", "--registry", registry.url, "export", "boot", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"boot@v1: 5 synthetic, 3 web -> {out}"
    items = json.loads(out.read_text())
    assert items[:3] == [{"url": "http://127.0.0.1/img/0.jpg", "caption": "web text 0"},
                         {"url": "http://127.0.0.1/img/0.jpg", "caption": "a synthetic caption 0"},
                         {"url": "http://127.0.0.1/img/1.jpg", "caption": "a synthetic caption 1"}]  # fmt: skip
    web = tmp_path / "ccs_filtered.json"
    assert main(["data", "--registry", registry.url, "export", "boot", "--out", str(web), "--source", "web"]) == 0
    assert [item["caption"] for item in json.loads(web.read_text())] == ["web text 0", "web text 2", "web text 4"]
    capsys.readouterr()
    lines = tmp_path / "boot.jsonl"
    assert main(["data", "--registry", registry.url, "export", "boot", "--out", str(lines), "--format", "jsonl",
                 "--source", "synthetic", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["texts"] == {"synthetic": 5}
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(rows) == 5 and rows[0] == {"key": "s000000", "url": "http://127.0.0.1/img/0.jpg",
                                          "caption": "a synthetic caption 0", "source": "synthetic",
                                          "itm_score": 0.75}  # fmt: skip
    assert not list(tmp_path.glob("*.partial-*"))


def test_a_version_without_texts_exports_its_kept_captions(registry, tmp_path):
    from datasets_manifests.export import export_texts

    out = tmp_path / "web.json"
    counts = export_texts(registry, registry.resolve("web"), out)
    assert counts == {"web": 4}  # the dropped sample is not there
    assert [item["url"] for item in json.loads(out.read_text())][-1] == "http://127.0.0.1/img/4.jpg"


def test_texts_out_of_the_index_order_are_refused(registry, tmp_path):
    from datasets_manifests.export import export_texts

    rows = sample_rows(3)
    shuffled = _texts(rows).take([4, 5, 0, 1, 2, 3])
    manifest = publish_dataset(registry, tmp_path / "odd", "odd", [dict(r) for r in rows], texts=shuffled)
    with pytest.raises(RegistryError, match="not in the same order"):
        export_texts(registry, manifest, tmp_path / "odd.json")
    assert not (tmp_path / "odd.json").exists() and not list(tmp_path.glob("odd.json.partial-*"))


def test_images_out_of_the_shards_for_blips_own_pretraining_code(registry, tmp_path, capsys, monkeypatch):
    """`--images DIR`: every image of the version's shards as a file, the entries {image, caption} (BLIP's
    pretrain_dataset annotation) naming the very bytes the shard holds; a rerun skips the shards done, a shard
    stopped midway is written again, and a broken shard is one line naming it."""
    import hashlib

    from datasets_manifests import export as export_module
    from datasets_manifests.index import read_index

    boot = registry.resolve("boot")
    folder, out = tmp_path / "images", tmp_path / "boot.json"
    args = ["data", "--registry", registry.url, "export", "boot", "--out", str(out), "--images", str(folder)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "images: 4 written from 1 shards into" in printed
    assert "4 synthetic, 3 web (1 texts of samples without an image left out)" in printed  # s000003: dropped
    items = json.loads(out.read_text())
    assert len(items) == 7 and set(items[0]) == {"image", "caption"} and items[0]["caption"] == "web text 0"
    index = {row["key"]: row for row in read_index(registry, boot).to_pylist()}
    for item in items:
        key = item["image"].rsplit("/", 1)[-1].removesuffix(".jpg")
        data = open(item["image"], "rb").read()
        assert hashlib.sha256(data).hexdigest() == index[key]["image_sha256"]  # the shard's bytes, whole
    assert main(args) == 0  # done: the shard is not read again
    assert "(1 shards written by an earlier run)" in capsys.readouterr().out

    (folder / "train-000000" / ".complete").unlink()  # a run stopped inside the shard: written again
    (folder / "train-000000" / "s000000.jpg").write_bytes(b"cut")
    assert export_module.export_images(registry, boot, folder) == {"shards": 1, "shards_already": 0, "images": 4}
    assert (folder / "train-000000" / "s000000.jpg").read_bytes() != b"cut"
    assert not list(folder.rglob("*.partial"))

    class Broken:  # a shard that ends inside a member
        def __init__(self, real):
            self.real = real

        def __call__(self, manifest, path, mode="rb"):
            import io

            data = self.real(manifest, path, mode).read()
            return io.BytesIO(data[:1800])  # inside its second sample (tars end padded: not half)

    monkeypatch.setattr(registry, "open", Broken(registry.open))
    with pytest.raises(RegistryError, match="shard shards/train-000000.tar cannot be read to its end"):
        export_module.export_images(registry, boot, tmp_path / "other")


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 5, 64])
def test_texts_join_their_samples_across_any_batch_boundaries(registry, tmp_path, monkeypatch, batch_rows):
    """Batches of texts and of index rows that end anywhere (a sample's texts split between two batches, samples
    without texts between them) give the row-by-row join."""
    from datasets_manifests import export as export_module

    rows = sample_rows(9, dropped={0: "broken_image", 4: "broken_image", 8: "broken_image"})
    texts = [text for i, row in enumerate(rows) if row["status"] == "ok"
             for text in [{"key": row["key"], "text": f"t{i}.{n}", "source": "synthetic", "itm_score": 0.5 + n / 10,
                           "kept": n != 1, "drop_reason": None if n != 1 else "itm_below_threshold"}
                          for n in range(i % 3 + 1)]]  # fmt: skip
    manifest = publish_dataset(registry, tmp_path / "gaps", "gaps", [dict(r) for r in rows], texts=texts)
    real = export_module.iter_registry_parquet
    monkeypatch.setattr(export_module, "iter_registry_parquet",
                        lambda registry, path, columns: real(registry, path, columns, batch_rows=batch_rows))
    out = tmp_path / "gaps.jsonl"
    counts = export_module.export_texts(registry, manifest, out, "jsonl")
    url = {row["key"]: row["url"] for row in rows}
    expected = [{"key": t["key"], "url": url[t["key"]], "caption": t["text"], "source": "synthetic",
                 "itm_score": round(t["itm_score"], 6)} for t in texts if t["kept"]]  # fmt: skip
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{**item, "itm_score": round(item["itm_score"], 6)} for item in got] == [
        {**item, "itm_score": pytest.approx(item["itm_score"], abs=1e-6)} for item in expected]
    assert counts == {"synthetic": len(expected)}
