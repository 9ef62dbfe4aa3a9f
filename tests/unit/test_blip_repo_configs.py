"""salesforce/BLIP's configs/*.yaml read as ours: each recipe gives the config of our preset for it with BLIP's
values over it, every key accounted for, `pretrained:` as the model to start from; the commands take the files."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from pipelines.blip_repo_configs import read_if_blip
from pipelines.cli import main
from pipelines.config import CONFIG_DIR, ConfigError, load_config
from pipelines.tasks.evaluate import EvaluateConfig
from pipelines.tasks.finetune import FinetuneConfig
from pipelines.tasks.pretrain import PretrainConfig

URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
# The files as salesforce/BLIP's configs/ and LAVIS's projects/blip/ have them (comments left out).
DATA = Path(__file__).resolve().parents[1] / "data" / "blip_repo_configs"


@pytest.fixture
def blip_configs(tmp_path):
    folder = tmp_path / "BLIP" / "configs"
    shutil.copytree(DATA, folder)
    return folder


def _read(path, cls, group, task):
    translated = read_if_blip(path, group, task)
    assert translated is not None
    return load_config(cls, translated.config, origin=str(path)), translated


def _ours(cls, group, preset):
    return load_config(cls, CONFIG_DIR / group / f"{preset}.yaml")


def test_finetuning_recipes_are_our_presets_with_blips_values(blip_configs):
    config, translated = _read(blip_configs / "retrieval_coco.yaml", FinetuneConfig, "finetune", "retrieval")
    preset = _ours(FinetuneConfig, "finetune", "retrieval_coco")
    # BLIP checkpoints the ViT while finetuning retrieval (vit_grad_ckpt); otherwise our preset is its recipe.
    assert config == dataclasses.replace(preset, loop=dataclasses.replace(preset.loop, grad_checkpointing=True))
    assert translated.pretrained == f"{URL}model_base_retrieval_coco.pth"
    notes = "\n".join(translated.notes)
    for said in ("init_lr: 1e-05 -> optim.lr", "max_epoch: 6 -> loop.epochs", "batch_size_train: 32 -> data.batch_size",
                 "the last 4", "image_root, ann_root, dataset: not used", "k_test: not used",
                 "vit: not used", "queue_size, alpha: not used"):  # fmt: skip
        assert said in notes, said
    flickr, _ = _read(blip_configs / "retrieval_flickr.yaml", FinetuneConfig, "finetune", "retrieval")
    preset = _ours(FinetuneConfig, "finetune", "retrieval_flickr")
    assert flickr == dataclasses.replace(preset, loop=dataclasses.replace(preset.loop, grad_checkpointing=True))
    assert not flickr.data.negative_all_rank
    for name, task, values in (("caption_coco", "caption", (384, 32, 1e-5, 5)), ("vqa", "vqa", (480, 16, 2e-5, 10)),
                               ("nlvr", "nlvr", (384, 16, 3e-5, 15))):  # fmt: skip
        config, translated = _read(blip_configs / f"{name}.yaml", FinetuneConfig, "finetune", task)
        assert (config.image_size, config.batch_size, config.optim.lr, config.loop.epochs) == values
        assert config.optim.min_lr == 0.0 and config.optim.weight_decay == 0.05
        assert config.scaling == _ours(FinetuneConfig, "finetune", FINETUNE_PRESET[task]).scaling
        assert translated.pretrained.startswith(URL)


FINETUNE_PRESET = {"caption": "caption_coco", "vqa": "vqa", "nlvr": "nlvr"}


def test_evaluation_reads_the_same_files(blip_configs):
    """BLIP's `--evaluate` of a recipe: its test batch, k_test, beams and lengths; `pretrained:` is the model."""
    config, translated = _read(blip_configs / "retrieval_coco.yaml", EvaluateConfig, "evaluate", "retrieval")
    assert config == _ours(EvaluateConfig, "evaluate", "retrieval_coco")  # k_test 256, batch 64
    assert (config.k_test, config.image_batch_size) == (256, 64)
    assert "init_lr, min_lr, weight_decay, max_epoch" in "\n".join(translated.notes)
    config, _ = _read(blip_configs / "retrieval_flickr.yaml", EvaluateConfig, "evaluate", "retrieval")
    assert config.k_test == 128
    config, translated = _read(blip_configs / "caption_coco.yaml", EvaluateConfig, "evaluate", "caption")
    assert (config.num_beams, config.max_length, config.min_length, config.caption_batch_size) == (3, 20, 5, 32)
    assert "prompt: 'a picture of ': not used" in "\n".join(translated.notes)
    nocaps, _ = _read(blip_configs / "nocaps.yaml", EvaluateConfig, "evaluate", "caption")
    assert nocaps.repetition_penalty == _ours(EvaluateConfig, "evaluate", "caption_nocaps").repetition_penalty
    config, _ = _read(blip_configs / "vqa.yaml", EvaluateConfig, "evaluate", "vqa")
    assert (config.vqa_k_test, config.vqa_inference, config.vqa_batch_size) == (128, "rank", 32)
    config, _ = _read(blip_configs / "retrieval_msrvtt.yaml", EvaluateConfig, "evaluate", "video")
    assert (config.k_test, config.image_batch_size, config.num_frames) == (128, 64, 8)


def test_pretraining_recipe(blip_configs):
    config, translated = _read(blip_configs / "pretrain.yaml", PretrainConfig, "train", None)
    preset = _ours(PretrainConfig, "train", "pretrain_base")
    assert config.optim == preset.optim and config.loop == preset.loop and config.data == preset.data
    assert config.model == "base" and config.blip_config().vision.image_size == 224
    assert config.blip_config().queue_size == 57600 and translated.pretrained is None
    assert "train_file, laion_path: not used" in "\n".join(translated.notes)


def test_ours_are_read_as_they_are_and_unknown_blip_keys_are_named(blip_configs):
    assert read_if_blip(CONFIG_DIR / "finetune" / "retrieval_coco.yaml", "finetune", "retrieval") is None
    assert read_if_blip({"task": "retrieval"}, "finetune", "retrieval") is None
    odd = blip_configs / "odd.yaml"
    odd.write_text((DATA / "nlvr.yaml").read_text() + "warmup_epochs: 2\nlabel_smoothing: 0.1\n")
    with pytest.raises(ConfigError, match="keys this project does not know: label_smoothing, warmup_epochs"):
        read_if_blip(odd, "finetune", "nlvr")
    with pytest.raises(ConfigError, match="a salesforce/BLIP pretraining config: `blip train FILE` reads it"):
        read_if_blip(blip_configs / "pretrain.yaml", "finetune", "retrieval")
    with pytest.raises(ConfigError, match="a salesforce/BLIP finetuning config: `blip finetune TASK FILE"):
        read_if_blip(blip_configs / "retrieval_coco.yaml", "train", None)
    bad_lr = blip_configs / "bad_lr.yaml"
    bad_lr.write_text((DATA / "nlvr.yaml").read_text().replace("init_lr: 3e-5", "init_lr: fast"))
    with pytest.raises(ConfigError, match="bad_lr.yaml: init_lr: 'fast' is not a number"):
        read_if_blip(bad_lr, "finetune", "nlvr")
    bad_vit = blip_configs / "bad_vit.yaml"
    bad_vit.write_text((DATA / "pretrain.yaml").read_text().replace("vit: 'base'", "vit: 'huge'"))
    with pytest.raises(ConfigError, match="vit: 'huge' is not a BLIP ViT"):
        read_if_blip(bad_vit, "train", None)


def test_the_commands_take_blip_files(blip_configs, tmp_path, capsys):
    """`blip finetune retrieval BLIP/configs/retrieval_coco.yaml --dataset coco`: the translation on stderr, the
    model from `pretrained:` (so the first missing thing is the dataset); ours without --model is a one-line error."""
    registry = str(tmp_path / "registry")
    assert main(["finetune", "retrieval", str(blip_configs / "retrieval_coco.yaml"), "--dataset", "coco",
                 "--registry", registry]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "retrieval_coco.yaml: a salesforce/BLIP config, read as ours:" in err
    assert f"pretrained: {URL}model_base_retrieval_coco.pth -> --init" in err and "coco" in err.splitlines()[-1]
    assert main(["eval", "retrieval", "retrieval_tiny", "--dataset", "coco", "--registry", registry]) == 2
    assert capsys.readouterr().err.strip().endswith("--model is required: the model to start from (a model version "
                                                    "or a checkpoint)")  # fmt: skip
    assert main(["finetune", "nlvr", str(blip_configs / "nlvr.yaml"), "--init", "x", "--dataset", "d",
                 "--registry", registry, "--set", "optim.lr=-1"]) == 2  # fmt: skip
    assert "--set optim.lr=-1 (applied to " in capsys.readouterr().err


def test_lavis_project_configs_are_read_too(blip_configs):
    """LAVIS's model / datasets / run files: run settings as BLIP's, the starting checkpoint from `model:`
    (load_finetuned: False -> the model's pretrained weights, else its finetuned ones by name), the image size from
    the dataset builders' processors, a config of another task refused."""
    path = blip_configs / "lavis_retrieval_coco_ft.yaml"
    config, translated = _read(path, FinetuneConfig, "finetune", "retrieval")
    assert translated.report(path).startswith(f"{path}: a LAVIS config, read as ours:")
    assert (config.optim.lr, config.optim.weight_decay, config.loop.epochs, config.batch_size) == (2e-5, 0.04, 6, 32)
    assert (config.image_size, config.data.negative_all_rank, config.data.loader_workers) == (384, True, 4)
    assert config.loop.precision == "fp32" and config.loop.seed == 42  # amp: False
    assert translated.pretrained == f"{URL}model_base_capfilt_large.pth"  # LAVIS's blip_retrieval pretrained
    evaluation, translated = _read(path, EvaluateConfig, "evaluate", "retrieval")
    assert (evaluation.k_test, evaluation.image_batch_size, evaluation.split) == (256, 128, "test")
    with pytest.raises(ConfigError, match="a LAVIS 'retrieval' config .*not one for 'caption'"):
        read_if_blip(path, "finetune", "caption")

    path = blip_configs / "lavis_vqav2_eval.yaml"
    evaluation, translated = _read(path, EvaluateConfig, "evaluate", "vqa")
    assert (evaluation.vqa_k_test, evaluation.vqa_inference, evaluation.split) == (128, "rank", "val")
    assert translated.pretrained == "blip_vqa/vqav2"  # the finetuned model, by its checkpoint name

    path = blip_configs / "lavis_pretrain_14m.yaml"
    config, translated = _read(path, PretrainConfig, "train", None)
    preset = _ours(PretrainConfig, "train", "pretrain_base")
    assert config.optim == preset.optim and config.loop.epochs == 20 and config.data.batch_size == 75
    assert config.blip_config().vision.image_size == 224 and translated.pretrained is None
    assert "datasets: coco_caption, sbu_caption: not used" in "\n".join(translated.notes)
