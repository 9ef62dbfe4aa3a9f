"""Downstream end to end on real Ray: publish a generated COCO-Karpathy set, finetune a tiny pretrained model for
captioning and retrieval on 2 Ray Train workers, evaluate both (re-ranking / generation split over Ray tasks),
and check versions, lineage, metrics, idempotence and that CapFilt accepts the finetuned pair."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.config import load_config

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session):
    import torch

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_pretrain import BlipPretrain
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream

    root = tmp_path_factory.mktemp("finetune-eval")
    registry = Registry(root / "registry")
    dataset = publish_downstream(DownstreamConfig(num_train=8, num_val=3, num_test=4, image_size=32), name="coco-demo",
                                 registry=registry)
    torch.manual_seed(0)
    init = save_pretrained(BlipPretrain(preset("tiny")), root / "pretrained")
    return registry, dataset, str(init)


def test_finetune_and_evaluate_caption_and_retrieval(setup, tmp_path):
    from pipelines.tasks.capfilt import _model_source
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate
    from pipelines.tasks.finetune import FinetuneConfig, run_finetune

    registry, dataset, init = setup
    models = {}
    for task in ("caption", "retrieval"):
        cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / f"{task}_tiny.yaml")
        model = run_finetune(cfg, init=init, dataset=dataset, name=f"tiny-{task}", registry=registry)
        assert model.kind == "model" and model.parents == (dataset.ref,)
        assert model.metadata["kind"] == task and model.metadata["final_step"] == 3
        assert model.metadata["init"]["from"] == "pretrain" and model.metadata["init"]["missing"] == []
        assert model.counts["samples_trained"] == 3 * 2 * 4
        assert {"model.safetensors", "config.json", "metrics.json"} <= {f.path for f in model.files}
        assert run_finetune(cfg, init=init, dataset=dataset, name=f"tiny-{task}", registry=registry).ref == model.ref
        models[task] = model
    # The finetuned pair is exactly what CapFilt loads as captioner and filter.
    assert _model_source(registry, models["caption"], ("caption",))["kind"] == "caption"
    assert _model_source(registry, models["retrieval"], ("itm", "retrieval"))["kind"] == "retrieval"

    retrieval_cfg = load_config(EvaluateConfig, CONFIGS / "evaluate" / "retrieval_tiny.yaml")
    evaluation = run_evaluate(retrieval_cfg, model=models["retrieval"], dataset=dataset, name="tiny-eval-retrieval",
                              registry=registry, out=tmp_path / "retrieval.json")
    metrics = evaluation.metadata["metrics"]
    assert evaluation.kind == "evaluation" and set(evaluation.parents) == {models["retrieval"].ref, dataset.ref}
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["img_r10"] == 100.0  # 4 test images: every text finds its image within 10
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)
    assert evaluation.metadata["details"]["num_texts"] == 20
    assert json.loads((tmp_path / "retrieval.json").read_text())["metrics"] == metrics

    caption_cfg = load_config(EvaluateConfig, CONFIGS / "evaluate" / "caption_tiny.yaml",
                              ["caption_metrics=[Bleu, ROUGE_L, CIDEr, SPICE]"])
    evaluation = run_evaluate(caption_cfg, model=models["caption"].ref, dataset=dataset.ref,
                              name="tiny-eval-caption", registry=registry)
    metrics = evaluation.metadata["metrics"]
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"} <= set(metrics) and metrics["CIDEr"] >= 0.0
    assert metrics["SPICE"] is None and "SPICE" in evaluation.metadata["notes"]
    results_path = registry.local_path(evaluation, "caption_test_results.json")
    results = json.loads(results_path.read_text())
    annotation = json.loads(registry.local_path(dataset, "annotation/coco_karpathy_test.json").read_text())
    expected = sorted(int(item["image"].rsplit("_", 1)[1].split(".")[0]) for item in annotation)
    assert sorted(r["image_id"] for r in results) == expected  # COCO ids parsed from the file names
    assert all(isinstance(r["caption"], str) for r in results)


def test_cli_eval_reuses_the_published_evaluation(setup, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    registry, dataset, _ = setup
    model = registry.versions("model", "tiny-retrieval")[-1]
    cfg = load_config(EvaluateConfig, CONFIGS / "evaluate" / "retrieval_tiny.yaml")
    first = run_evaluate(cfg, model=model, dataset=dataset, name="tiny-eval-retrieval", registry=registry)
    capsys.readouterr()
    code = main(["eval", "retrieval", "retrieval_tiny", "--model", model.ref, "--dataset", dataset.ref, "--name",
                 "tiny-eval-retrieval", "--registry", registry.url, "--out", str(tmp_path / "m.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert f"{first.ref}  id {first.short_id}" in out
    assert f"{first.ref}: retrieval on coco test" in out and "r_mean" in out  # the table, also when reused
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["metrics"]["r_mean"] == first.metadata["metrics"]["r_mean"]
    assert written["lineage"] == {"model": {"ref": model.ref, "id": model.id},
                                  "dataset": {"ref": dataset.ref, "id": dataset.id}}

    # The finetuned model again through `blip finetune` (reused): its table and id line.
    code = main(["finetune", "retrieval", "retrieval_tiny", "--init", setup[2], "--dataset", dataset.ref, "--name",
                 "tiny-retrieval", "--registry", registry.url])
    out = capsys.readouterr().out
    assert code == 0 and f"{model.ref}  id {model.short_id}" in out
    table = out.splitlines()
    assert table[0] == f"{model.ref}: finetuned retrieval" and table[2].split()[:2] == ["steps", "3/3"]
    assert any(line.split()[0] == "loss_itc" for line in table[3:]) and "from pretrain" in out


def test_blip_finetune_runs_a_salesforce_blip_config(setup, tmp_path, capsys):
    """`blip finetune caption BLIP/configs/caption_coco.yaml`: the file as BLIP ships it (its `pretrained:` here
    the tiny model; no --init), shrunk to this machine with --set, trains and publishes; stderr says how it was
    read."""
    from pipelines.cli import main

    registry, dataset, init = setup
    shipped = (CONFIGS.parent / "tests" / "data" / "blip_repo_configs" / "caption_coco.yaml").read_text()
    blip_config = tmp_path / "caption_coco.yaml"
    blip_config.write_text(re.sub(r"(?m)^pretrained: .*$", f"pretrained: '{init}'", shipped))
    small = ["image_size=32", "data.batch_size=4", "data.loader_workers=0", "loop.max_steps=2", "scaling.num_workers=1",
             "scaling.use_gpu=false", "scaling.cpus_per_worker=0.5", "scaling.max_failures=0"]  # fmt: skip
    args = ["finetune", "caption", str(blip_config), "--dataset", dataset.ref, "--name", "blip-config-caption",
            "--registry", registry.url]  # fmt: skip
    assert main([*args, *[item for value in small for item in ("--set", value)]]) == 0
    captured = capsys.readouterr()
    assert "a salesforce/BLIP config, read as ours:" in captured.err and f"pretrained: {init} -> --init" in captured.err
    model = registry.resolve("blip-config-caption")
    assert model.metadata["final_step"] == 2 and model.metadata["init"]["from"] == "pretrain"
    assert model.producer.config["optim"]["lr"] == 1e-5 and model.producer.config["loop"]["epochs"] == 5


@pytest.mark.parametrize("task", ["vqa", "nlvr"])
def test_finetune_and_evaluate_vqa_nlvr(setup, task):
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate
    from pipelines.tasks.finetune import FinetuneConfig, run_finetune

    registry, _, init = setup
    dataset = publish_downstream(DownstreamConfig(benchmark=task, num_train=10, num_val=2, num_test=2, image_size=32),
                                 name=f"{task}-demo", registry=registry)
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / f"{task}_tiny.yaml", ["loop.max_steps=2", "loop.epochs=2"])
    model = run_finetune(cfg, init=init, dataset=dataset, name=f"tiny-{task}", registry=registry)
    assert model.metadata["kind"] == task and model.metadata["final_step"] == 2
    if task == "nlvr":  # the classifier head is new: initialised fresh, reported
        assert any(k.startswith("cls_head.") for k in model.metadata["init"]["initialized"])
    evaluation = run_evaluate(EvaluateConfig(task=task, split="val", num_workers=2, cpus_per_worker=0.5,
                                             vqa_k_test=16), model=model, dataset=dataset, name=f"tiny-eval-{task}",
                              registry=registry)  # fmt: skip
    metric = "vqa_accuracy" if task == "vqa" else "accuracy"
    assert 0.0 <= evaluation.metadata["metrics"][metric] <= 100.0
    assert set(evaluation.parents) == {model.ref, dataset.ref}


def test_gpu_workers_on_a_machine_without_gpus_fail_at_once(setup, tmp_path, monkeypatch):
    """Ray would wait forever for a GPU this machine lacks; the evaluation names the setting to change instead."""
    from pipelines.config import ConfigError
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    registry, dataset, init = setup
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a private local Ray: no autoscaler can add GPU nodes
    cfg = EvaluateConfig(task="retrieval", num_workers=1, gpus_per_worker=1, cpus_per_worker=0.5)
    with pytest.raises(ConfigError, match=r"'gpus_per_worker' asks for 1 GPU per worker but this machine's Ray has 0"):
        run_evaluate(cfg, model=init, dataset=dataset, name="gpu-eval", registry=registry)
