"""NoCaps end to end: publish a generated NoCaps set, caption its val split with a tiny random captioner (a model
version), and check the published `nocaps_val_results.json` is the official server file (one caption per image,
the annotation's img_ids) while no metric is computed locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_nocaps_eval_writes_the_server_result_file(tmp_path, capsys):
    import torch

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_caption import BlipCaption
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry
    from pipelines.config import load_config
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    registry = Registry(tmp_path / "registry")
    dataset = publish_downstream(DownstreamConfig(benchmark="nocaps", num_val=3, num_test=2, image_size=32),
                                 name="nocaps-demo", registry=registry)
    assert dataset.metadata["format"] == "nocaps" and dataset.splits == {"val": 3, "test": 2}
    assert sum(1 for f in dataset.files if f.role == "image") == 5
    torch.manual_seed(0)
    directory = save_pretrained(BlipCaption(preset("tiny")), tmp_path / "captioner")
    model = registry.publish(kind="model", name="tiny-caption", staging_dir=directory, producer=Producer(stage="test"),
                             files=[{"path": p.name} for p in sorted(directory.iterdir())])  # fmt: skip

    cfg = load_config(EvaluateConfig, CONFIGS / "evaluate" / "caption_nocaps.yaml",
                      ["num_workers=0", "max_length=8", "caption_batch_size=2"])
    assert cfg.repetition_penalty == 1.1 and cfg.split == "val"
    evaluation = run_evaluate(cfg, model=model.ref, dataset=dataset.ref, name="tiny-eval-nocaps", registry=registry)
    assert evaluation.metadata["metrics"] == {} and evaluation.metadata["benchmark"] == "nocaps"
    assert "EvalAI" in evaluation.metadata["notes"]["NoCaps"] and "nocaps_val_results.json" in capsys.readouterr().out
    assert set(evaluation.parents) == {model.ref, dataset.ref}
    results = json.loads(registry.local_path(evaluation, "nocaps_val_results.json").read_text())
    annotation = json.loads(registry.local_path(dataset, "annotation/nocaps_val.json").read_text())
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    assert sorted(r["image_id"] for r in results) == sorted(a["img_id"] for a in annotation)  # one per image
    # The same inputs return the published evaluation; a Karpathy-only task on NoCaps is refused by name.
    again = run_evaluate(cfg, model=model, dataset=dataset, name="tiny-eval-nocaps", registry=registry)
    assert again.ref == evaluation.ref
    with pytest.raises(ValueError, match="needs a karpathy set"):
        run_evaluate(EvaluateConfig(task="retrieval", num_workers=0), model=model, dataset=dataset, name="bad",
                     registry=registry)  # fmt: skip
