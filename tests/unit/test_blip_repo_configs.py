"""salesforce/BLIP's configs/*.yaml read as ours: each recipe gives the config of our preset for it with BLIP's
values over it, every key accounted for, `pretrained:` as the model to start from; the commands take the files."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines.blip_repo_configs import read_if_blip
from pipelines.cli import main
from pipelines.config import CONFIG_DIR, ConfigError, load_config
from pipelines.tasks.evaluate import EvaluateConfig
from pipelines.tasks.finetune import FinetuneConfig
from pipelines.tasks.pretrain import PretrainConfig

URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
# The values of the files in salesforce/BLIP's configs/ (comments left out).
BLIP_CONFIGS = {
    "retrieval_coco": f"""
image_root: '/export/share/datasets/vision/coco/images/'
ann_root: 'annotation'
dataset: 'coco'
pretrained: '{URL}model_base_retrieval_coco.pth'
vit: 'base'
batch_size_train: 32
batch_size_test: 64
vit_grad_ckpt: True
vit_ckpt_layer: 4
init_lr: 1e-5
image_size: 384
queue_size: 57600
alpha: 0.4
k_test: 256
negative_all_rank: True
weight_decay: 0.05
min_lr: 0
max_epoch: 6
""",
    "retrieval_flickr": f"""
image_root: '/export/share/datasets/vision/flickr30k/'
ann_root: 'annotation'
dataset: 'flickr'
pretrained: '{URL}model_base_retrieval_flickr.pth'
vit: 'base'
batch_size_train: 32
batch_size_test: 64
vit_grad_ckpt: True
vit_ckpt_layer: 4
init_lr: 1e-5
image_size: 384
queue_size: 57600
alpha: 0.4
k_test: 128
negative_all_rank: False
weight_decay: 0.05
min_lr: 0
max_epoch: 6
""",
    "caption_coco": f"""
image_root: '/export/share/datasets/vision/coco/images/'
ann_root: 'annotation'
coco_gt_root: 'annotation/coco_gt'
pretrained: '{URL}model_base_caption_capfilt_large.pth'
vit: 'base'
vit_grad_ckpt: False
vit_ckpt_layer: 0
batch_size: 32
init_lr: 1e-5
image_size: 384
max_length: 20
min_length: 5
num_beams: 3
prompt: 'a picture of '
weight_decay: 0.05
min_lr: 0
max_epoch: 5
""",
    "nocaps": f"""
image_root: '/export/share/datasets/vision/nocaps/'
ann_root: 'annotation'
pretrained: '{URL}model_base_caption_capfilt_large.pth'
vit: 'base'
batch_size: 32
image_size: 384
max_length: 20
min_length: 5
num_beams: 3
prompt: 'a picture of '
""",
    "vqa": f"""
vqa_root: '/export/share/datasets/vision/VQA/Images/mscoco/'
vg_root: '/export/share/datasets/vision/visual-genome/'
train_files: ['vqa_train','vqa_val','vg_qa']
ann_root: 'annotation'
pretrained: '{URL}model_base_vqa_capfilt_large.pth'
vit: 'base'
batch_size_train: 16
batch_size_test: 32
vit_grad_ckpt: False
vit_ckpt_layer: 0
init_lr: 2e-5
image_size: 480
k_test: 128
inference: 'rank'
weight_decay: 0.05
min_lr: 0
max_epoch: 10
""",
    "nlvr": f"""
image_root: '/export/share/datasets/vision/NLVR2/'
ann_root: 'annotation'
pretrained: '{URL}model_base_nlvr.pth'
vit: 'base'
batch_size_train: 16
batch_size_test: 64
vit_grad_ckpt: False
vit_ckpt_layer: 0
max_epoch: 15
image_size: 384
weight_decay: 0.05
init_lr: 3e-5
min_lr: 0
""",
    "retrieval_msrvtt": f"""
video_root: '/export/share/dongxuli/data/msrvtt_retrieval/videos'
ann_root: 'annotation'
pretrained: '{URL}model_base_retrieval_coco.pth'
vit: 'base'
batch_size: 64
k_test: 128
image_size: 384
num_frm_test: 8
""",
    "pretrain": """
train_file: ['/export/share/junnan-li/VL_pretrain/annotation/coco_karpathy_train.json',
             '/export/share/junnan-li/VL_pretrain/annotation/vg_caption.json',
             ]
laion_path: ''
vit: 'base'
vit_grad_ckpt: False
vit_ckpt_layer: 0
image_size: 224
batch_size: 75
queue_size: 57600
alpha: 0.4
weight_decay: 0.05
init_lr: 3e-4
min_lr: 1e-6
warmup_lr: 1e-6
lr_decay_rate: 0.9
max_epoch: 20
warmup_steps: 3000
""",
}


@pytest.fixture
def blip_configs(tmp_path):
    folder = tmp_path / "BLIP" / "configs"
    folder.mkdir(parents=True)
    for name, text in BLIP_CONFIGS.items():
        (folder / f"{name}.yaml").write_text(text)
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
    odd.write_text(BLIP_CONFIGS["nlvr"] + "warmup_epochs: 2\nlabel_smoothing: 0.1\n")
    with pytest.raises(ConfigError, match="keys this project does not know: label_smoothing, warmup_epochs"):
        read_if_blip(odd, "finetune", "nlvr")
    with pytest.raises(ConfigError, match="a salesforce/BLIP pretraining config: `blip train FILE` reads it"):
        read_if_blip(blip_configs / "pretrain.yaml", "finetune", "retrieval")
    with pytest.raises(ConfigError, match="a salesforce/BLIP finetuning config: `blip finetune TASK FILE"):
        read_if_blip(blip_configs / "retrieval_coco.yaml", "train", None)
    bad_vit = blip_configs / "bad_vit.yaml"
    bad_vit.write_text(BLIP_CONFIGS["pretrain"].replace("vit: 'base'", "vit: 'huge'"))
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


# LAVIS's project configs (lavis/projects/blip/...), as they are there (comments left out).
LAVIS_RETRIEVAL_COCO_FT = """
model:
  arch: blip_retrieval
  model_type: coco
  load_finetuned: False
  queue_size: 57600
  alpha: 0.4
  negative_all_rank: True
datasets:
  coco_retrieval:
    vis_processor:
        train:
          name: "blip_image_train"
          image_size: 384
        eval:
          name: "blip_image_eval"
          image_size: 384
    text_processor:
        train:
          name: "blip_caption"
        eval:
          name: "blip_caption"
run:
  task: retrieval
  lr_sched: "linear_warmup_cosine_lr"
  init_lr: 2e-5
  min_lr: 0
  weight_decay: 0.04
  max_epoch: 6
  num_workers: 4
  batch_size_train: 32
  batch_size_eval: 128
  train_splits: ["train"]
  valid_splits: ["val", "test"]
  test_splits: ["test"]
  device: "cuda"
  world_size: 1
  dist_url: "env://"
  distributed: True
  use_dist_eval_sampler: False
  k_test: 256
  seed: 42
  output_dir: "output/BLIP/Retrieval_COCO"
  amp: False
  resume_ckpt_path: null
  evaluate: False
"""
LAVIS_VQAV2_EVAL = """
model:
  arch: blip_vqa
  model_type: vqav2
  image_size: 480
datasets:
  coco_vqa:
    type: eval
    vis_processor:
        eval:
          name: "blip_image_eval"
          image_size: 480
    text_processor:
        eval:
          name: "blip_question"
run:
  task: vqa
  num_workers: 4
  max_len: 10
  min_len: 1
  num_beams: 3
  num_ans_candidates: 128
  inference_method: "rank"
  seed: 42
  output_dir: "output/BLIP/VQA"
  evaluate: True
  test_splits: ["val"]
  device: "cuda"
  world_size: 1
  dist_url: "env://"
  distributed: True
"""
LAVIS_PRETRAIN_14M_RUN = """
model:
  arch: blip_pretrain
  model_type: base
  load_pretrained: False
  queue_size: 57600
  alpha: 0.4
datasets:
  coco_caption:
    vis_processor:
        train:
          name: "blip_image_train"
          image_size: 224
  sbu_caption:
    vis_processor:
        train:
          name: "blip_image_train"
          image_size: 224
run:
  task: image_text_pretrain
  lr_sched: "linear_warmup_step_lr"
  init_lr: 3e-4
  min_lr: 1e-6
  warmup_lr: 1e-6
  lr_decay_rate: 0.9
  weight_decay: 0.05
  max_epoch: 20
  batch_size_train: 75
  batch_size_eval: 75
  num_workers: 4
  warmup_steps: 3000
  seed: 42
  output_dir: "output/BLIP/Pretrain"
  amp: False
  resume_ckpt_path: null
  evaluate: False
  train_splits: ["train"]
  device: "cuda"
  world_size: 1
  dist_url: "env://"
  distributed: True
"""


def test_lavis_project_configs_are_read_too(tmp_path):
    """LAVIS's model / datasets / run files: run settings as BLIP's, the starting checkpoint from `model:`
    (load_finetuned: False -> the model's pretrained weights, else its finetuned ones by name), the image size from
    the dataset builders' processors, a config of another task refused."""
    path = tmp_path / "retrieval_coco_ft.yaml"
    path.write_text(LAVIS_RETRIEVAL_COCO_FT)
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

    path = tmp_path / "vqav2_eval.yaml"
    path.write_text(LAVIS_VQAV2_EVAL)
    evaluation, translated = _read(path, EvaluateConfig, "evaluate", "vqa")
    assert (evaluation.vqa_k_test, evaluation.vqa_inference, evaluation.split) == (128, "rank", "val")
    assert translated.pretrained == "blip_vqa/vqav2"  # the finetuned model, by its checkpoint name

    path = tmp_path / "pretrain_14m.yaml"
    path.write_text(LAVIS_PRETRAIN_14M_RUN)
    config, translated = _read(path, PretrainConfig, "train", None)
    preset = _ours(PretrainConfig, "train", "pretrain_base")
    assert config.optim == preset.optim and config.loop.epochs == 20 and config.data.batch_size == 75
    assert config.blip_config().vision.image_size == 224 and translated.pretrained is None
    assert "datasets: coco_caption, sbu_caption: not used" in "\n".join(translated.notes)
