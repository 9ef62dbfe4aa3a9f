"""`blip train CONFIG --dataset REF [--dataset REF ...] [--init REF] [--resume] [--name NAME] [--set k=v]`: pretrain on Ray Train.

A thin face over `pipelines.tasks.pretrain.run_pretrain`: loads the typed config (a path, or a preset name from
configs/train/), connects to Ray (RAY_ADDRESS or a local instance), shows a progress bar fed by rank 0, and
prints the published model version.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipelines.config import CONFIG_DIR


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pretrain BLIP on a dataset version with Ray Train and publish a model version",
        description="Pretrain on the shards of a dataset version (TorchTrainer: DDP workers from the config's "
        "scaling section, checkpoints every loop.checkpoint_every steps, automatic restarts after a worker "
        "failure) and publish the result as a model version with lineage to the dataset and initial weights.",
    )
    parser.add_argument("config", help="config file, or a preset in configs/train/ (pretrain_tiny, pretrain_base, "
                        "...); salesforce/BLIP's configs/pretrain.yaml or LAVIS's pretrain_14m.yaml is read as ours, "
                        "each key said on stderr")
    parser.add_argument("--dataset", required=True, action="append",
                        help="dataset version: name, name@vN or name@<id prefix>; repeatable: the train shards of "
                        "every version given are trained on together (BLIP: web pairs + COCO/VG human pairs)")
    parser.add_argument("--init", default=None,
                        help="initial weights: a model version, a save_pretrained directory, an official .pth (path "
                        "or URL), a checkpoint name (`blip infer models`: model_base_capfilt_large, ...) or a "
                        "transformers directory or hub name (converted once in the checkpoint cache)")
    parser.add_argument("--resume", action="store_true", help="continue the run of this name from its last checkpoint")
    parser.add_argument("--name", default=None, help="Ray Train run name (default: derived from inputs + config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set loop.max_steps=100; repeatable")
    parser.add_argument("--registry", default=None, help="registry URL (default BLIP_REGISTRY or ./artifacts/registry)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_train)


def resolve_config_path(value: str) -> Path:
    path = Path(value)
    if path.exists():
        return path
    preset = CONFIG_DIR / "train" / (value if value.endswith(".yaml") else f"{value}.yaml")
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "train").glob("*.yaml")))
    raise FileNotFoundError(f"config {value!r} is neither a file nor a preset in configs/train ({known})")


def cmd_train(args: argparse.Namespace) -> int:
    from datasets_manifests.registry import Registry
    from pipelines.blip_repo_configs import load_recipe_config
    from pipelines.tasks.pretrain import PretrainConfig, run_pretrain

    cfg, _ = load_recipe_config(PretrainConfig, resolve_config_path(args.config), "train", None, args.overrides)
    registry = Registry(args.registry)
    from pipelines.progress import TrainingBar
    from pipelines.tasks._ray_train import TrainingDiskFull, TrainingInterrupted

    try:
        with TrainingBar("train", enabled=not args.no_progress) as bar:
            manifest = run_pretrain(cfg, args.dataset[0], extra_datasets=args.dataset[1:], registry=registry,
                                    init=args.init, resume=args.resume, run_name=args.name, on_progress=bar)
    except (TrainingInterrupted, TrainingDiskFull) as stopped:
        resume = "" if args.resume and args.name else f" with `--resume --name {stopped.run_name}`"
        args.on_interrupt = f"the same command{resume} goes on from it"  # the CLI's line after a full disk
        if isinstance(stopped, TrainingDiskFull):
            raise
        raise KeyboardInterrupt(str(stopped)) from None  # the CLI adds how to go on (`args.on_interrupt`)
    meta = manifest.metadata
    print(f"{manifest.ref}  id {manifest.short_id}  step {meta.get('final_step')}/{meta.get('planned_steps')}  "
          f"restarts {meta.get('restarts')}  parents {', '.join(manifest.parents)}")  # fmt: skip
    return 0
