"""Finetuning TrainTasks (decode, collate, loss) without Ray, the downstream dataset version, typed configs, and
the evaluation stage in-process (num_workers=0) on tiny random models."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.tasks.train_loop import StepInfo

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _info(step: int = 1, steps_per_epoch: int = 4) -> StepInfo:
    return StepInfo(step=step, epoch=step // steps_per_epoch, step_in_epoch=step % steps_per_epoch,
                    steps_per_epoch=steps_per_epoch, total_steps=8)


def _jpeg(colour: tuple[int, int, int], size: int = 40) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream

    registry = Registry(tmp_path_factory.mktemp("registry"))
    manifest = publish_downstream(DownstreamConfig(num_train=6, num_val=2, num_test=3, image_size=32, samples_per_shard=16),
                                  name="coco-demo", registry=registry)
    return registry, manifest


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_pretrain import BlipPretrain

    torch.manual_seed(0)
    return str(save_pretrained(BlipPretrain(preset("tiny")), tmp_path_factory.mktemp("pretrained")))


def _task(name: str, init: str | None, **data):
    from pipelines.config import to_dict
    from pipelines.tasks.finetune import TASK_CLASSES, FinetuneConfig, FinetuneData, init_config_of, task_model_config

    cfg = FinetuneConfig(task=name, data=FinetuneData(**data))
    model_config = task_model_config(init_config_of(init), cfg)
    return TASK_CLASSES[name](model_config, to_dict(cfg.data), init)


# ------------------------------------------------------------------------------------------------ downstream


def test_vg_caption_version_trains_the_pretraining_task(tmp_path):
    """Human-annotated pretraining pairs: train shards only; the pretraining reader takes their caption and groups
    an image's captions under one image id (never each other's hard negatives)."""
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream
    from pipelines.tasks.pretrain import image_identity, kept_text
    from pipelines.tasks.train_data import iter_tar_samples, shards_of

    registry = Registry(tmp_path / "registry")
    config = DownstreamConfig(benchmark="vg_caption", num_train=5, captions_per_image=2, image_size=32)
    manifest = publish_downstream(config, name="vg-demo", registry=registry)
    assert manifest.splits == {"train": 10} and manifest.counts["train_images"] == 5
    assert manifest.metadata["benchmark"] == "vg_caption"
    assert not any(entry.path.startswith("images/") for entry in manifest.files)  # the images live in the shards
    samples = [s for shard in shards_of(registry, manifest) for s in iter_tar_samples(shard.url)]
    assert len(samples) == 10 and all("jpg" in s and "txt" not in s for s in samples)
    assert all(kept_text(s, 0) == json.loads(s["json"])["caption"] for s in samples)
    assert len({image_identity(s) for s in samples}) == 5
    assert publish_downstream(config, name="vg-demo", registry=registry).id == manifest.id  # idempotent


def test_downstream_version_is_karpathy_schema_and_idempotent(downstream):
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, layout_of, publish_downstream
    from pipelines.tasks.downstream_data import load_caption_eval, load_caption_train, load_coco_caption_gt
    from pipelines.tasks.train_data import iter_tar_samples

    registry, manifest = downstream
    layout = layout_of(manifest)
    assert manifest.splits == {"train": 30, "val": 2, "test": 3} and manifest.counts["train_images"] == 6
    pairs = load_caption_train(registry.local_path(manifest, layout.annotation("train")))
    assert len(pairs) == 30
    test = load_caption_eval(registry.local_path(manifest, layout.annotation("test")))
    assert len(load_coco_caption_gt(registry.local_path(manifest, layout.caption_gt("test"))).image_ids) == len(test)
    for item in test:
        assert registry.local_path(manifest, f"images/{item.image}").is_file()
    shards = manifest.shards("train")
    assert [s.num_samples for s in shards] == [16, 14]
    samples = [s for shard in shards for s in iter_tar_samples(registry.url_of(manifest, shard.path))]
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["caption"] for m in metas) == sorted(p.caption for p in pairs)
    # idx: one consecutive int per image_id, the same for all captions of an image
    by_image = {}
    for meta in metas:
        by_image.setdefault(meta["image_id"], set()).add(meta["idx"])
    assert all(len(v) == 1 for v in by_image.values()) and {v.pop() for v in by_image.values()} == set(range(6))
    assert metas[0]["idx"] != metas[1]["idx"] or metas[1]["idx"] != metas[2]["idx"]  # shuffled, not grouped
    again = publish_downstream(DownstreamConfig(num_train=6, num_val=2, num_test=3, image_size=32, samples_per_shard=16),
                               name="coco-demo", registry=Registry(registry.url))
    assert again.ref == manifest.ref


def test_downstream_files_kind_reads_real_layout_and_counts_missing_images(tmp_path):
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream
    from pipelines.tasks.downstream_data import AnnotationError
    from pipelines.tasks.downstream_synth import write_karpathy

    written = write_karpathy(tmp_path / "flickr", style="flickr", num_train=3, num_val=2, num_test=2, image_size=16)
    train = json.loads(written["flickr30k_train"].read_text())
    (tmp_path / "flickr" / train[0]["image"]).unlink()  # its 5 captions must be dropped and counted
    cfg = DownstreamConfig(kind="files", benchmark="flickr", annotation_dir=str(tmp_path / "flickr" / "annotation"),
                           image_root=str(tmp_path / "flickr"))
    manifest = publish_downstream(cfg, name="flickr", registry=Registry(tmp_path / "registry"))
    assert manifest.drop_reasons == {"missing_image": 5} and manifest.splits["train"] == 10
    assert manifest.metadata["benchmark"] == "flickr" and manifest.metadata["caption_gt"] == {}
    test = json.loads(written["flickr30k_test"].read_text())
    (tmp_path / "flickr" / test[0]["image"]).unlink()
    with pytest.raises(AnnotationError, match="images missing"):
        publish_downstream(DownstreamConfig(kind="files", benchmark="flickr", seed=1,
                                            annotation_dir=cfg.annotation_dir, image_root=cfg.image_root),
                           name="flickr2", registry=Registry(tmp_path / "registry"))
    with pytest.raises(ValueError, match="annotation_dir"):
        DownstreamConfig(kind="files")


def test_nocaps_files_kind_publishes_val_test_images_and_refuses_holes(tmp_path):
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream
    from pipelines.tasks.downstream_data import AnnotationError
    from pipelines.tasks.downstream_synth import write_nocaps

    written = write_nocaps(tmp_path / "nocaps", num_val=2, num_test=3, image_size=16)
    cfg = DownstreamConfig(kind="files", benchmark="nocaps", annotation_dir=str(tmp_path / "nocaps" / "annotation"),
                           image_root=str(tmp_path / "nocaps"))
    manifest = publish_downstream(cfg, name="nocaps", registry=Registry(tmp_path / "registry"))
    assert manifest.splits == {"val": 2, "test": 3} and manifest.metadata["format"] == "nocaps"
    assert {f.path for f in manifest.files if f.role == "annotation"} == {"annotation/nocaps_val.json",
                                                                          "annotation/nocaps_test.json"}
    assert sum(1 for f in manifest.files if f.role == "image") == 5
    val = json.loads(written["nocaps_val"].read_text())
    (tmp_path / "nocaps" / val[0]["image"]).unlink()
    with pytest.raises(AnnotationError, match="images missing"):
        publish_downstream(DownstreamConfig(kind="files", benchmark="nocaps", seed=1,
                                            annotation_dir=cfg.annotation_dir, image_root=cfg.image_root),
                           name="nocaps2", registry=Registry(tmp_path / "registry"))


# ------------------------------------------------------------------------------------------------ configs


def test_finetune_configs_resolve_blip_defaults_and_reject_typos():
    from pipelines.tasks.finetune import FinetuneConfig

    for task, lr, epochs, batch in (("retrieval", 1e-5, 6, 32), ("caption", 1e-5, 5, 32), ("vqa", 2e-5, 10, 16),
                                    ("nlvr", 3e-5, 15, 16)):  # fmt: skip
        cfg = FinetuneConfig(task=task)
        optim, loop = cfg.optim.resolve(task), cfg.loop.resolve(task)
        assert (optim.lr, optim.schedule, optim.weight_decay, optim.warmup_steps, optim.min_lr) == (lr, "cosine", 0.05, 0, 0.0)
        assert loop.epochs == epochs and cfg.batch_size == batch and cfg.data.min_scale == 0.5
    for path in sorted((CONFIGS / "finetune").glob("*.yaml")):
        assert load_config(FinetuneConfig, path).task in path.stem
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(FinetuneConfig, {"task": "caption", "optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match="task"):
        load_config(FinetuneConfig, {"task": "segmentation"})


def test_task_model_config_uses_task_image_size_for_base_and_keeps_tiny():
    from blip_models.checkpoints import config_to_dict
    from blip_models.configuration_blip import preset
    from pipelines.tasks.finetune import FinetuneConfig, task_model_config

    base, tiny = config_to_dict(preset("base")), config_to_dict(preset("tiny"))
    assert task_model_config(base, FinetuneConfig(task="vqa"))["vision"]["image_size"] == 480
    assert task_model_config(base, FinetuneConfig(task="caption"))["vision"]["image_size"] == 384
    assert task_model_config(tiny, FinetuneConfig(task="caption"))["vision"]["image_size"] == 32
    assert task_model_config(tiny, FinetuneConfig(task="caption", image_size=48))["vision"]["image_size"] == 48
    with pytest.raises(ValueError, match="patch size"):
        task_model_config(tiny, FinetuneConfig(task="caption", image_size=36))


def test_task_model_gradient_checkpointing_follows_the_finetune_switch_only():
    """An init model whose config still says grad_ckpt_layers (an older version) does not switch it on here."""
    from blip_models.checkpoints import config_to_dict
    from blip_models.configuration_blip import preset
    from pipelines.tasks.finetune import FinetuneConfig, FinetuneLoop, task_model_config

    checkpointed = config_to_dict(preset("tiny").replace(vision={"grad_ckpt_layers": 2}))
    assert task_model_config(checkpointed, FinetuneConfig(task="caption"))["vision"]["grad_ckpt_layers"] == 0
    switched = FinetuneConfig(task="caption", loop=FinetuneLoop(grad_checkpointing=True))
    assert task_model_config(config_to_dict(preset("tiny")), switched)["vision"]["grad_ckpt_layers"] == 2


# ------------------------------------------------------------------------------------------------ the tasks


def test_retrieval_task_loads_pretrain_weights_and_trains(downstream, pretrained):
    from pipelines.tasks.train_data import iter_tar_samples

    registry, manifest = downstream
    raws = list(iter_tar_samples(registry.url_of(manifest, manifest.shards("train")[0].path)))[:6]
    task = _task("retrieval", pretrained)
    model = task.build_model()
    report = task.init_report
    assert report["from"] == "pretrain" and report["missing"] == []
    assert any(k.startswith("text_decoder.") for k in report["unexpected"])  # the decoder has no place here
    assert {"idx_queue", "ptr_queue"} <= set(report["initialized"])
    batch = task.collate([task.decode(raw, seed) for seed, raw in enumerate(raws)])
    assert batch["input_ids"].shape == (6, 35) and batch["idx"].dtype == torch.long
    # alpha ramps over epoch 0 (BLIP: 0.4 * min(1, i / len(loader))), then stays 0.4
    assert task.loss(model, batch, _info(step=1))[1]["alpha"] == pytest.approx(0.1)
    loss, metrics = task.loss(model, batch, _info(step=6))
    assert metrics["alpha"] == pytest.approx(0.4) and metrics["loss"] == pytest.approx(metrics["loss_itc"] + metrics["loss_itm"])
    loss.backward()
    assert model.visual_encoder.patch_embed.proj.weight.grad is not None
    one_image = [dict(task.decode(raws[0], seed), idx=7) for seed in range(3)]
    with pytest.raises(ValueError, match=r"3 caption\(s\) shows only image id \[7\].*two distinct images"):
        task.collate(one_image)
    assert task.collate(one_image[:2] + [dict(one_image[2], idx=8)])["idx"].tolist() == [7, 7, 8]
    all_rank = _task("retrieval", pretrained, negative_all_rank=True)  # other workers' batches hold negatives
    assert all_rank.collate(one_image)["idx"].tolist() == [7, 7, 7]


def test_retrieval_negative_weights_mask_own_image_and_never_leave_a_row_empty():
    from blip_models.modeling_retrieval import negative_weights

    weights = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    ids = torch.tensor([[1], [1], [2]])
    masked = negative_weights(weights, ids == ids.T)
    assert torch.equal(masked, torch.tensor([[0.0, 0.0, 0.2], [0.0, 0.0, 0.3], [0.2, 0.2, 0.0]]))
    alone = negative_weights(weights, torch.ones(3, 3, dtype=torch.bool))  # one image: no negative anywhere
    assert torch.equal(alone, weights)
    assert torch.multinomial(masked, 1).squeeze(1)[:2].tolist() == [2, 2]


def test_caption_task_masks_the_prompt(downstream, pretrained):
    from pipelines.tasks.train_data import DropSample, iter_tar_samples

    registry, manifest = downstream
    raws = list(iter_tar_samples(registry.url_of(manifest, manifest.shards("train")[0].path)))[:4]
    task = _task("caption", pretrained, augment=False)
    model = task.build_model()
    assert task.init_report["missing"] == []
    batch = task.collate([task.decode(raw, seed) for seed, raw in enumerate(raws)])
    tokens = task.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens[:4] == ["[CLS]", "a", "picture", "of"] and model.prompt_length == 4
    loss, metrics = task.loss(model, batch, _info())
    assert torch.isfinite(loss) and metrics["loss_lm"] > 0
    # Loss over caption tokens only: changing the prompt tokens' labels cannot matter, the caption's does.
    same = model(batch["image"], batch["input_ids"], batch["attention_mask"], prompt_length=4).loss
    more = model(batch["image"], batch["input_ids"], batch["attention_mask"], prompt_length=1).loss
    assert float(same.detach()) == pytest.approx(float(loss.detach()))
    assert float(more.detach()) != pytest.approx(float(loss.detach()))
    with pytest.raises(DropSample, match="no_image"):
        task.decode({"json": raws[0]["json"]}, 0)


def test_vqa_task_collates_weighted_answers():
    from blip_models.checkpoints import config_to_dict
    from blip_models.configuration_blip import preset
    from pipelines.tasks.finetune import FinetuneData, VQATask
    from pipelines.config import to_dict

    task = VQATask(config_to_dict(preset("tiny")), to_dict(FinetuneData(augment=False)))
    model = task.build_model()
    raws = [{"jpg": _jpeg((200, 0, 0)), "json": json.dumps({"question": "What color is it?", "answers": ["red", "pink"],
                                                            "weights": [0.8, 0.2]}).encode()},
            {"jpg": _jpeg((0, 0, 200)), "json": json.dumps({"question": "Is it blue?", "answers": ["yes"],
                                                            "weights": [0.2]}).encode()}]  # fmt: skip
    batch = task.collate([task.decode(raw, 0) for raw in raws])
    assert batch["n_answers"].tolist() == [2, 1] and batch["weights"].tolist() == pytest.approx([0.8, 0.2, 0.2])
    assert (batch["answer_ids"][:, 0] == model.config.text.bos_token_id).all()
    loss, _ = task.loss(model, batch, _info())
    assert torch.isfinite(loss)


def test_nlvr_task_swaps_sides_with_the_words(pretrained):
    from pipelines.tasks.finetune import NLVRTask

    task = _task("nlvr", pretrained)
    model = task.build_model()
    assert any(k.startswith("cls_head.") for k in task.init_report["initialized"])
    assert any("crossattention" in line for line in task.init_report["adapted"])
    red, blue = _jpeg((200, 0, 0)), _jpeg((0, 0, 200))
    raw = {"left.jpg": red, "right.jpg": blue,
           "json": json.dumps({"sentence": "The left image is red.", "label": 1}).encode()}
    samples = [task.decode(raw, seed) for seed in range(12)]
    swapped = [s for s in samples if "right image is red" in s["sentence"]]
    kept = [s for s in samples if "left image is red" in s["sentence"]]
    assert swapped and kept and len(swapped) + len(kept) == 12
    # a swapped sentence comes with swapped images: the red image is then on the right
    assert all(s["right"][0].mean() > s["left"][0].mean() for s in swapped)
    batch = task.collate(samples[:4])
    loss, metrics = task.loss(model, batch, _info())
    assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
    assert isinstance(task, NLVRTask)


# ------------------------------------------------------------------------------------------------ evaluation


def test_evaluate_in_process_retrieval_and_caption(downstream, tmp_path):
    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_caption import BlipCaption
    from blip_models.modeling_retrieval import BlipRetrieval
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    registry, manifest = downstream
    torch.manual_seed(0)
    retrieval = save_pretrained(BlipRetrieval(preset("tiny")), tmp_path / "retrieval")
    caption = save_pretrained(BlipCaption(preset("tiny")), tmp_path / "caption")
    evaluation = run_evaluate(EvaluateConfig(task="retrieval", num_workers=0, k_test=4), model=str(retrieval),
                              dataset=manifest, name="eval-r", registry=registry)
    metrics = evaluation.metadata["metrics"]
    assert evaluation.metadata["details"]["num_texts"] == 15 and metrics["img_r5"] == 100.0  # 3 images < 5
    assert evaluation.parents == (manifest.ref,)
    lineage = json.loads(registry.local_path(evaluation, "metrics.json").read_text())["lineage"]
    assert lineage["dataset"] == {"ref": manifest.ref, "id": manifest.id}
    assert lineage["model"]["ref"] is None and lineage["model"]["directory"] == str(Path(retrieval).resolve())
    assert lineage["model"]["id"].startswith("sha256:") and len(lineage["model"]["id"]) == 7 + 64
    cfg = EvaluateConfig(task="caption", num_workers=0, max_length=8, caption_metrics=("Bleu", "CIDEr"), max_images=2)
    evaluation = run_evaluate(cfg, model=str(caption), dataset=manifest, name="eval-c", registry=registry)
    assert {"Bleu_4", "CIDEr"} <= set(evaluation.metadata["metrics"])
    results = json.loads(registry.local_path(evaluation, "caption_test_results.json").read_text())
    assert len(results) == 2
    with pytest.raises(ValueError, match="Karpathy"):
        from pipelines.tasks.downstream import layout_of

        layout_of(type("M", (), {"metadata": {}, "ref": "x@v1"})())


def test_evaluate_an_official_checkpoint_by_path_and_by_name(downstream, tmp_path, monkeypatch):
    """`blip eval retrieval --model model_base_retrieval_coco`: an official .pth (here a tiny one in the layout of
    the released files, 64-dim heads as theirs) is converted once into a save_pretrained directory in the
    checkpoint cache and scores as that model does; the lineage names the checkpoint and its sha256. A
    transformers directory is converted the same way."""
    import hashlib

    from blip_models import checkpoints as ck
    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_retrieval import BlipRetrieval
    from pipelines.commands.evaluate import _default_name
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    registry, manifest = downstream
    monkeypatch.setenv("BLIP_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = BlipRetrieval(preset("tiny").replace(vision={"width": 64, "heads": 1},
                                                 text={"hidden_size": 64, "num_attention_heads": 1,
                                                       "encoder_width": 64}))  # fmt: skip
    directory = save_pretrained(model, tmp_path / "retrieval")
    (tmp_path / "cache").mkdir()
    official = tmp_path / "cache" / "model_base_retrieval_coco.pth"  # where a download of the release is kept
    torch.save({"model": model.state_dict(), "epoch": 5}, official)
    cfg = EvaluateConfig(task="retrieval", num_workers=0, k_test=4)
    expected = run_evaluate(cfg, model=str(directory), dataset=manifest, name="eval-dir", registry=registry)
    url = ck.OFFICIAL_URL_PREFIX + official.name  # what the name stands for, recorded as such
    for source, recorded, name in ((str(official), str(official), "eval-path"),
                                   ("model_base_retrieval_coco", url, "eval-name")):  # fmt: skip
        evaluation = run_evaluate(cfg, model=source, dataset=manifest, name=name, registry=registry)
        assert evaluation.metadata["metrics"] == expected.metadata["metrics"]
        model_lineage = json.loads(registry.local_path(evaluation, "metrics.json").read_text())["lineage"]["model"]
        assert model_lineage["checkpoint"] == {"checkpoint": recorded,
                                               "sha256": hashlib.sha256(official.read_bytes()).hexdigest()}  # fmt: skip
    (converted,) = (tmp_path / "cache" / "converted").iterdir()  # converted once, for the 'retrieval' model
    assert converted.name.startswith("model_base_retrieval_coco-retrieval-") and (converted / "config.json").is_file()
    # A transformers directory (BlipForConditionalGeneration) captions as the model it was converted from.
    from blip_models.hf_convert import to_hf
    from blip_models.modeling_caption import BlipCaption

    caption = BlipCaption(preset("tiny"))
    to_hf(caption).save_pretrained(tmp_path / "hf-caption")
    cfg = EvaluateConfig(task="caption", num_workers=0, max_length=8, caption_metrics=("Bleu", "CIDEr"), max_images=2)
    expected = run_evaluate(cfg, model=str(save_pretrained(caption, tmp_path / "caption")), dataset=manifest,
                            name="eval-c-dir", registry=registry)  # fmt: skip
    evaluation = run_evaluate(cfg, model=str(tmp_path / "hf-caption"), dataset=manifest, name="eval-c-hf",
                              registry=registry)  # fmt: skip
    assert evaluation.metadata["metrics"] == expected.metadata["metrics"]
    # ... and by its hub name, read from huggingface_hub's cache (offline: nothing can be downloaded here).
    hub_name = "Salesforce/blip-image-captioning-base"
    _in_hub_cache(tmp_path / "hf-caption", hub_name, tmp_path / "hub", monkeypatch)
    evaluation = run_evaluate(cfg, model=hub_name, dataset=manifest, name="eval-c-hub", registry=registry)
    assert evaluation.metadata["metrics"] == expected.metadata["metrics"]
    model_lineage = json.loads(registry.local_path(evaluation, "metrics.json").read_text())["lineage"]["model"]
    assert model_lineage["checkpoint"]["checkpoint"] == hub_name and len(model_lineage["checkpoint"]["revision"]) > 0
    assert _default_name("blip_retrieval/coco", "eval-retrieval") == "blip_retrieval-coco-eval-retrieval"
    assert _default_name(str(official), "eval-retrieval") == "model_base_retrieval_coco-eval-retrieval"
    assert _default_name("https://x/y/model_base_14M.pth", "eval-caption") == "model_base_14m-eval-caption"


def _in_hub_cache(directory: Path, hub_name: str, hub: Path, monkeypatch) -> None:
    """A transformers directory put in huggingface_hub's cache layout as `hub_name`'s snapshot, the hub offline."""
    import shutil

    from huggingface_hub import constants

    revision = "0" * 40
    repo = hub / f"models--{hub_name.replace('/', '--')}"
    shutil.copytree(directory, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_transformers_checkpoint_initialises_finetuning(downstream, tmp_path, monkeypatch):
    """`blip finetune --init Salesforce/blip-itm-base-coco` (or a transformers directory): converted once into a
    save_pretrained directory the training workers load; its config and weights are the model's."""
    from blip_models.checkpoints import from_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.hf_convert import to_hf
    from blip_models.modeling_itm import BlipITM
    from blip_models.modeling_retrieval import BlipRetrieval
    from pipelines.tasks.finetune import init_config_of, resolve_model_source
    from pipelines.tasks.finetune_tasks import load_weights
    from pipelines.tasks.publish_model import training_init_source

    registry, _ = downstream
    torch.manual_seed(0)
    itm = BlipITM(preset("tiny"))
    to_hf(itm).save_pretrained(tmp_path / "hf-itm")
    hub_name = "Salesforce/blip-itm-base-coco"
    _in_hub_cache(tmp_path / "hf-itm", hub_name, tmp_path / "hub", monkeypatch)
    conversions = []
    for source in (str(tmp_path / "hf-itm"), hub_name):
        manifest, found = resolve_model_source(registry, source)
        assert manifest is None and found == source
        converted, origin = training_init_source(found)
        conversions.append(converted)
        assert origin["source"] == source and origin["converted"] == converted and len(origin["sha256"]) == 64
        assert ("revision" in origin) == (source == hub_name)  # a hub name: which snapshot was converted
        assert Path(converted).parent.name == "converted"
        assert init_config_of(converted)["vision"]["width"] == preset("tiny").vision.width
        report = load_weights(BlipRetrieval(preset("tiny")), converted, "retrieval")
        assert report["from"] == "itm"
        for key, value in from_pretrained(converted).state_dict().items():
            torch.testing.assert_close(value, itm.state_dict()[key], rtol=0, atol=0)
    assert training_init_source(str(tmp_path / "hf-itm"))[0] == conversions[0]  # converted once


def test_an_evaluation_worker_killed_mid_run_is_rebuilt_and_gives_the_same_features(ray_session, tmp_path, caplog,
                                                                                    capfd):  # fmt: skip
    """An evaluation actor the OOM killer takes (BLIP's retrieval evaluation is known for it) is restarted and loads
    the model files from the object store again: they were freed once the actors had started, so its restart failed
    (ReferenceCountingAssertionError) and the evaluation with it. The files reach an actor in its first call, not
    as a constructor argument, which made Ray core log an error line for every actor (ray#53727)."""
    import gc
    import os
    import signal
    import time

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_retrieval import BlipRetrieval
    from pipelines.tasks.evaluate import EvaluateConfig, ModelWorkers, encode_text_rows, work_parts

    torch.manual_seed(0)
    model_dir = save_pretrained(BlipRetrieval(preset("tiny")), tmp_path / "retrieval")
    cfg = EvaluateConfig(task="retrieval", num_workers=1, cpus_per_worker=0.5, text_batch_size=4, device="cpu")
    texts = ["a red circle", "a blue square on a green background", "two yellow stars", "a photo"] * 2
    with ModelWorkers(str(model_dir), "retrieval", cfg) as workers:
        before = workers.map(encode_text_rows, (texts, 4), [range(0, 8)])[0]
        gc.collect()  # nothing but the workers themselves may keep the files alive
        actor = workers.actors[0]
        pid = ray_session.get(actor.run.remote(lambda model, rows: os.getpid(), range(0)))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while ray_session.get(actor.run.remote(lambda model, rows: os.getpid(), range(0))) == pid:
            assert time.monotonic() < deadline  # the call above waits for the restarted actor
        with caplog.at_level(logging.INFO, logger="pipelines.tasks.evaluate"):
            parts = work_parts(len(texts), 4, cfg.num_workers)  # 2 batches: 2 parts (4 a worker asked)
            after = workers.map(encode_text_rows, (texts, 4), parts, progress=("eval retrieval: texts", "texts"))
    assert parts == [range(0, 4), range(4, 8)]
    assert all(torch.equal(a, torch.cat(b)) for a, b in zip(before, zip(*after)))
    assert caplog.records[-1].getMessage().startswith("eval retrieval: texts: 8 / 8 texts (100.0 %), ")
    assert "constructor arguments in the object store" not in capfd.readouterr().err


def tiny_retrieval_and_test_set(downstream: Any, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A tiny random retrieval model's directory, and the image paths and texts of the demo set's test split."""
    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_retrieval import BlipRetrieval

    registry, manifest = downstream
    torch.manual_seed(0)
    model_dir = save_pretrained(BlipRetrieval(preset("tiny")), tmp_path / "retrieval")
    annotation = json.loads(registry.local_path(manifest, "annotation/coco_karpathy_test.json").read_text())
    urls = [str(registry.local_path(manifest, f"images/{item['image']}")) for item in annotation]
    return model_dir, urls, [caption for item in annotation for caption in item["caption"]]


def test_the_re_ranking_bar_moves_within_a_part_as_its_pairs_are_scored(downstream, tmp_path):
    """The ITM re-ranking is one part a worker (minutes to an hour each at COCO's size): its bar moved only when a
    whole part returned, so a one-worker evaluation showed 0 % until the end. Now the scorer's batches say how far
    the part is, and the bar (a log line off a terminal) moves within it; the scores are those of the split run."""
    from pipelines.progress import StageProgress
    from pipelines.tasks.evaluate import EvaluateConfig, ModelWorkers, encode_retrieval, rerank_rows
    from pipelines.tasks.retrieval_eval import similarity_matrix

    model_dir, urls, texts = tiny_retrieval_and_test_set(downstream, tmp_path)
    cfg = EvaluateConfig(task="retrieval", num_workers=0, device="cpu")
    lines: list[str] = []
    logger = logging.getLogger("test.rerank.progress")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with ModelWorkers(str(model_dir), "retrieval", cfg) as workers:
            features = encode_retrieval(workers, urls, texts, cfg)
            sims = similarity_matrix(features["image_feats"], features["text_feats"])
            shared = {key: features[key] for key in ("image_embeds", "text_ids", "text_mask")}
            whole = (range(len(urls)), range(len(texts)))  # one part: 3 image rows + 15 text rows
            bar = StageProgress("rerank", 18, "rows", logger=logger, log_every_s=0, stream=io.StringIO())
            (i2t, t2i, pairs), = workers.map(rerank_rows, (shared, sims, 2, 4), [whole], progress=bar)
            halves = workers.map(rerank_rows, (shared, sims, 2, 4), [(range(0, 2), range(0, 8)),
                                                                      (range(2, 3), range(8, 15))])
    finally:
        logger.removeHandler(handler)
    done = [int(line.split(": ", 1)[1].split(" / ")[0]) for line in lines]
    assert done[-1] == 18 and lines[-1].startswith("rerank: 18 / 18 rows (100.0 %)")
    within = [count for count in done if 0 < count < 18]
    assert len(within) >= 3 and within == sorted(within), lines  # a step of the bar a scorer call (4 pairs each)
    assert pairs <= sum(part[2] for part in halves)  # a pair both directions rank: scored once within a part
    # The same scores (to float rounding: the pairs are batched differently in one part and in two)
    torch.testing.assert_close(i2t, torch.cat([halves[0][0], halves[1][0]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(t2i, torch.cat([halves[0][1], halves[1][1]]), rtol=0, atol=1e-5)


def test_a_ray_worker_tells_the_bar_how_far_its_running_part_is(ray_session, tmp_path):
    """On Ray actors the driver asks each actor how far its running part is (a concurrency group of its own, beside
    the running call) every PROGRESS_POLL_S: the bar shows half a part while that part is still running."""
    import time

    from blip_models.checkpoints import save_pretrained
    from blip_models.configuration_blip import preset
    from blip_models.modeling_retrieval import BlipRetrieval
    from pipelines.progress import StageProgress
    from pipelines.tasks.evaluate import EvaluateConfig, ModelWorkers

    torch.manual_seed(0)
    model_dir = save_pretrained(BlipRetrieval(preset("tiny")), tmp_path / "retrieval")
    cfg = EvaluateConfig(task="retrieval", num_workers=1, cpus_per_worker=0.5, device="cpu")
    release = tmp_path / "release"

    def half_then_wait(model, release, rows):  # runs on the actor; returns when the driver saw the half
        import time
        from pathlib import Path

        from pipelines.tasks.evaluate import report_part_done

        report_part_done(0.5)
        deadline = time.monotonic() + 120
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return Path(release).exists()

    lines: list[str] = []

    class Lines(logging.Handler):  # the driver's log: the half shown releases the running part
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            if lines[-1].startswith("parts: 4 / 8 rows"):
                release.touch()

    logger = logging.getLogger("test.parts.progress")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with ModelWorkers(str(model_dir), "retrieval", cfg) as workers:
            bar = StageProgress("parts", 8, "rows", logger=logger, log_every_s=0, stream=io.StringIO())
            started = time.monotonic()
            results = workers.map(half_then_wait, (str(release),), [range(0, 8)], progress=bar)
    finally:
        logger.removeHandler(handler)
    assert results == [True], f"the bar never showed the running part's half in {time.monotonic() - started:.0f} s"
    assert lines[0].startswith("parts: 4 / 8 rows (50.0 %)") and lines[-1].startswith("parts: 8 / 8 rows")


def test_split_encoding_matches_one_serial_pass(downstream, tmp_path):
    """The retrieval encoding split over workers (row ranges on batch boundaries) gives bit-identical features to
    one serial loop, as the evaluation computed them before it was split; the worker runs from shipped bytes."""
    from blip_models.tokenizer import load_tokenizer, tokenize
    from pipelines.tasks.evaluate import (EvaluateConfig, ModelWorker, ModelWorkers, batch_rows, encode_image_rows,
                                          encode_retrieval, encode_text_rows, load_images, read_model_files,
                                          work_parts)

    model_dir, urls, texts = tiny_retrieval_and_test_set(downstream, tmp_path)
    assert batch_rows(15, 4, 3) == [range(0, 8), range(8, 15)]  # BLIP's split of 4 batches: 2, 2, 0
    assert batch_rows(30, 4, 3) == [range(0, 12), range(12, 24), range(24, 30)]
    assert batch_rows(3, 64, 2) == [range(0, 3)]  # one batch: one part, never an empty one
    assert work_parts(15, 4, 3) == [range(0, 4), range(4, 8), range(8, 12), range(12, 15)]  # a batch a part at most
    assert work_parts(15, 4, 0) == [range(0, 8), range(8, 15)]  # BLIP's split of 4 batches in 4 parts: 2, 2, 0, 0
    assert len(work_parts(1000, 4, 2)) == 8  # 4 parts a worker: progress as they finish, a fast worker takes more

    cfg = EvaluateConfig(task="retrieval", num_workers=0, text_batch_size=4, image_batch_size=2, device="cpu")
    with ModelWorkers(str(model_dir), "retrieval", cfg) as workers:
        features = encode_retrieval(workers, urls, texts, cfg)
        model = workers.local.model
        assert workers.local.device == "cpu" and not workers.local.autocast
        with torch.no_grad():  # the reference: one loop over all rows in this process
            ids, mask = zip(*(tokenize(load_tokenizer(), texts[i:i + 4], 35, "max_length") for i in range(0, 15, 4)))
            text_feats = torch.cat([model.text_features(i, m) for i, m in zip(ids, mask)])
            image_embeds, image_feats = zip(*(model.image_features(load_images(urls[i:i + 2], 32)) for i in (0, 2)))
        assert torch.equal(features["text_ids"], torch.cat(ids)) and torch.equal(features["text_feats"], text_feats)
        assert torch.equal(features["image_embeds"], torch.cat(image_embeds))
        assert torch.equal(features["image_feats"], torch.cat(image_feats))
        split = workers.map(encode_text_rows, (texts, 4), batch_rows(15, 4, 3))
        assert torch.equal(torch.cat([part[2] for part in split]), text_feats)
        split = workers.map(encode_image_rows, (urls, 2), batch_rows(3, 2, 2))
        assert torch.equal(torch.cat([part[0] for part in split]), features["image_embeds"])
        seen: list[float] = []  # each batch tells the bar how far its part is
        workers.local.listener = seen.append
        workers.local.run(encode_text_rows, texts, 4, range(3, 15))
        assert seen == [4 / 12, 8 / 12, 1.0]
    shipped = ModelWorker(read_model_files(model_dir), "retrieval", "auto", "bf16")  # bytes, no path
    assert shipped.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if shipped.device == "cpu":  # bf16 autocast is a CUDA-only setting
        assert not shipped.autocast
        assert torch.equal(shipped.run(encode_text_rows, texts, 4, range(15))[2], text_feats)


def test_finetune_table_shows_steps_losses_and_init():
    from types import SimpleNamespace

    from pipelines.commands.evaluate import render_finetune_table

    manifest = SimpleNamespace(
        ref="tiny-caption@v1", parents=("pretrained@v2", "coco-demo@v1"),
        metadata={"task": "caption", "kind": "caption", "image_size": 32, "final_step": 3, "planned_steps": 3,
                  "epochs": 1, "global_batch": 8, "world_size": 2,
                  "init": {"from": "pretrain", "missing": [], "unexpected": ["itm_head.weight"], "initialized": []}},
        stats={"last": {"loss_lm": 5.25, "lr": 1e-4}, "first": {"loss_lm": 7.5, "lr": 1e-4}})  # fmt: skip
    lines = render_finetune_table(manifest).splitlines()
    assert lines[0] == "tiny-caption@v1: finetuned caption"
    assert lines[1].split() == ["task", "caption", "(caption", "model,", "image", "32)"]
    assert "3/3" in lines[2] and "global batch 8" in lines[2]
    assert lines[3].split() == ["loss_lm", "5.25", "(first", "7.5)"] and lines[4].split() == ["lr", "0.0001"]
    assert lines[5].split() == ["init", "from", "pretrain:", "0", "missing,", "1", "unexpected,", "0", "initialized"]
    assert lines[6].split() == ["parents", "pretrained@v2,", "coco-demo@v1"]


def test_evaluate_config_device_checks():
    from pipelines.tasks.evaluate import EvaluateConfig, pick_device

    assert pick_device("auto", False) == "cpu" and pick_device("auto", True) == "cuda"
    with pytest.raises(RuntimeError, match="no GPU"):
        pick_device("cuda", False)
    with pytest.raises(ValueError, match="gpus_per_worker"):
        EvaluateConfig(task="retrieval", device="cuda", num_workers=2)
    with pytest.raises(ValueError, match="precision"):
        EvaluateConfig(task="retrieval", precision="fp16")  # type: ignore[arg-type]
    assert EvaluateConfig(task="caption", device="cuda", gpus_per_worker=0.5, precision="bf16").gpus_per_worker == 0.5


@pytest.mark.parametrize("benchmark,task,kind,split,inference", [("vqa", "vqa", "vqa", "val", "rank"),
                                                                 ("vqa", "vqa", "vqa", "val", "generate"),
                                                                 ("vqa", "vqa", "vqa", "test", "rank"),
                                                                 ("nlvr", "nlvr", "nlvr", "test", "rank"),
                                                                 ("msrvtt", "video", "retrieval", "test", "rank")])
def test_vqa_nlvr_video_sets_and_evaluation_in_process(tmp_path, benchmark, task, kind, split, inference):
    from blip_models.checkpoints import build_model, save_pretrained
    from blip_models.configuration_blip import preset
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    registry = Registry(tmp_path / "registry")
    dataset = publish_downstream(DownstreamConfig(benchmark=benchmark, num_train=3, num_val=2, num_test=3, image_size=32),
                                 name=f"demo-{benchmark}", registry=registry)
    assert dataset.metadata["format"] == benchmark and (benchmark == "msrvtt") == (not dataset.shards())
    torch.manual_seed(0)
    model = save_pretrained(build_model(kind, preset("tiny")), tmp_path / "model")
    cfg = EvaluateConfig(task=task, split=split, num_workers=0, k_test=2, vqa_k_test=8, vqa_inference=inference)
    evaluation = run_evaluate(cfg, model=str(model), dataset=dataset, name=f"eval-{task}", registry=registry)
    metrics = evaluation.metadata["metrics"]
    if task == "vqa":
        results = json.loads(registry.local_path(evaluation, "vqa_result.json").read_text())
        assert results and all(set(r) == {"question_id", "answer"} for r in results)
        assert evaluation.metadata["details"]["inference"] == inference
        if inference == "rank":  # rank answers come from the answer list; generate may say anything
            answer_list = json.loads(registry.local_path(dataset, "annotation/answer_list.json").read_text())
            assert {r["answer"] for r in results} <= set(answer_list)
        if split == "val":
            assert 0.0 <= metrics["vqa_accuracy"] <= 100.0 and "vqa_accuracy_yes_no" in metrics
        else:
            assert metrics == {} and "server" in evaluation.metadata["notes"]["vqa"]
    elif task == "nlvr":
        assert metrics["accuracy"] in (0.0, 100 / 3, 200 / 3, 100.0)
    else:
        assert metrics["txt_r5"] == 100.0 and metrics["img_r_median"] >= 1.0  # 3 clips, one caption each
        with pytest.raises(ValueError, match="has no val split for video retrieval"):  # ran on test, said val
            run_evaluate(EvaluateConfig(task="video", split="val", num_workers=0), model=str(model), dataset=dataset,
                         name="eval-video-val", registry=registry)  # fmt: skip
    with pytest.raises(ValueError, match="needs a"):
        run_evaluate(EvaluateConfig(task="caption", num_workers=0), model=str(model), dataset=dataset, name="bad",
                     registry=registry)


def test_training_workers_copy_a_remote_init_model_to_their_node(pretrained, tmp_path):
    """On a cluster the driver's disk is not the workers': a model version of a remote registry reaches the
    training workers as its directory's URL (`worker_source`, pretraining's `_resolve_init`), and each worker copies
    it to its node for the load (through the node's shard cache when set: one download a node), then removes the
    copy. Served over HTTP here; local paths and http(s) official checkpoints are used as they are."""
    import dataclasses
    import shutil

    from datasets_fixtures import memory_url
    from http_files import serve_files

    from blip_models.checkpoints import config_to_dict
    from blip_models.configuration_blip import preset
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import Registry
    from pipelines.config import to_dict
    from pipelines.tasks.finetune import (TASK_CLASSES, FinetuneConfig, FinetuneData, init_config_of, task_model_config,
                                          worker_source)
    from pipelines.tasks.pretrain import DataConfig, PretrainTask, _resolve_init
    from pipelines.tasks.shard_cache import local_model_source

    shutil.copytree(pretrained, tmp_path / "store" / "pretrained")
    sizes = {name: (tmp_path / "store/pretrained" / name).stat().st_size
             for name in ("config.json", "model.safetensors")}  # fmt: skip
    local = _task("retrieval", pretrained)
    local.build_model()
    with serve_files(tmp_path / "store") as served:
        url = f"{served.url}/pretrained"
        cfg = FinetuneConfig(task="retrieval", data=FinetuneData(shard_cache_dir=str(tmp_path / "cache")))
        # The driver reads the architecture from its own copy; the workers get the URL.
        remote = TASK_CLASSES["retrieval"](task_model_config(init_config_of(pretrained), cfg), to_dict(cfg.data), url)
        model = remote.build_model()
        assert remote.init_report == {**local.init_report, "source": url}
        data = dataclasses.asdict(DataConfig(shard_cache_dir=str(tmp_path / "cache")))
        pretrain = PretrainTask(config_to_dict(preset("tiny")), data, {"checkpoint": url})
        reference = PretrainTask(config_to_dict(preset("tiny")), data, {"checkpoint": pretrained}).build_model()
        loaded = pretrain.build_model().state_dict()
        for (name, tensor), expected in zip(loaded.items(), reference.state_dict().values()):
            assert torch.equal(tensor, expected), name
        assert pretrain.init_report["source"] == url
        # Two workers of the node, one download; the cache keeps the files, the staging dirs are gone.
        assert dict(served.bytes_sent) == {f"pretrained/{name}": size for name, size in sizes.items()}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == ["locks"]
    assert model is not None
    for source in (pretrained, "https://example.org/model_base.pth"):
        with local_model_source(source, None) as path:
            assert path == source
    # Which source the workers get: a remote registry's version by URL, a local one by path.
    version_dir = Path(pretrained)
    for registry in (Registry(tmp_path / "registry"), Registry(memory_url())):
        manifest = registry.publish(kind="model", name="pre", staging_dir=version_dir, move=False,
                                    producer=Producer(stage="test"),
                                    files=[{"path": "model.safetensors", "role": "weights"},
                                           {"path": "config.json", "role": "config"}])  # fmt: skip
        resolved = _resolve_init(registry, "pre")[1]
        expected = "/driver/copy" if registry.is_local else resolved
        assert worker_source(registry, manifest, "/driver/copy") == expected
        assert resolved.startswith("memory://") if not registry.is_local else Path(resolved, "config.json").exists()
