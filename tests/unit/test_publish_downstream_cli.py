"""`blip data publish-downstream`: a generated set in the public schemas, published through the real entry point
and resolved as the dataset version `blip finetune` / `blip eval` take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets_manifests.registry import Registry
from pipelines.cli import main
from pipelines.tasks.downstream_synth import write_karpathy, write_msrvtt, write_vqa


def _publish(capsys, registry: Registry, *args: str) -> tuple[int, str, str]:
    code = main(["data", "--registry", registry.url, "publish-downstream", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_publish_coco_resolves_and_is_idempotent(tmp_path: Path, capsys):
    write_karpathy(tmp_path / "coco", num_train=4, num_val=2, num_test=3, captions_per_image=2, image_size=32)
    registry = Registry(tmp_path / "registry")
    args = ("coco", "--annotations", str(tmp_path / "coco" / "annotation"), "--images", str(tmp_path / "coco"),
            "--name", "coco-files")
    code, out, _ = _publish(capsys, registry, *args)
    dataset = registry.resolve("coco-files", kind="dataset")
    assert code == 0 and out.startswith(f"{dataset.ref}  id {dataset.short_id}  coco (karpathy)")
    assert f"--dataset {dataset.ref}" in out
    assert dataset.metadata["format"] == "karpathy" and dataset.metadata["benchmark"] == "coco"
    assert dataset.splits == {"train": 8, "val": 2, "test": 3}  # train: pairs; val/test: images
    assert dataset.producer.config["kind"] == "files" and dataset.shards()
    gt = json.loads(registry.local_path(dataset, "annotation/coco_gt/coco_karpathy_test_gt.json").read_text())
    assert len(gt["images"]) == 3 and len(gt["annotations"]) == 6
    code, out, _ = _publish(capsys, registry, *args, "--json")  # the same files: the same version
    assert code == 0 and json.loads(out)["ref"] == dataset.ref and len(registry.versions("dataset", "coco-files")) == 1


def test_publish_vqa_held_out_and_msrvtt(tmp_path: Path, capsys):
    registry = Registry(tmp_path / "registry")
    write_vqa(tmp_path / "vqa", num_train_images=2, num_val_images=2, num_test_images=1, num_vg_images=1, image_size=32)
    code, out, _ = _publish(capsys, registry, "vqa", "--annotations", str(tmp_path / "vqa" / "annotation"), "--images",
                            str(tmp_path / "vqa"), "--name", "vqa-files", "--vqa-hold-out-val")
    dataset = registry.resolve("vqa-files@latest", kind="dataset")
    assert code == 0 and dataset.metadata["format"] == "vqa" and dataset.metadata["train_on_val"] is False
    write_msrvtt(tmp_path / "msrvtt", num_videos=2, num_frames=4, frame_size=32)
    code, out, _ = _publish(capsys, registry, "msrvtt", "--annotations", str(tmp_path / "msrvtt" / "annotation"),
                            "--images", str(tmp_path / "msrvtt" / "videos"), "--name", "msrvtt-files")
    dataset = registry.resolve("msrvtt-files", kind="dataset")
    assert code == 0 and dataset.splits == {"test": 2} and "blip eval video" in out


@pytest.mark.parametrize("benchmark", ["coco", "nlvr"])
def test_malformed_or_missing_files_are_one_line(tmp_path: Path, capsys, benchmark):
    registry = Registry(tmp_path / "registry")
    annotations = tmp_path / "annotation"
    annotations.mkdir()
    (annotations / "coco_karpathy_train.json").write_text(json.dumps([{"image": "a.jpg", "caption": "x"}]))
    code, _, err = _publish(capsys, registry, benchmark, "--annotations", str(annotations), "--images",
                            str(tmp_path), "--name", "broken")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    expected = "record 0: field 'image_id'" if benchmark == "coco" else "nlvr_train.json"
    assert f"publish-downstream {benchmark}" in err and expected in err
    assert registry.versions("dataset", "broken") == []
