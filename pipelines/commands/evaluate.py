"""`blip finetune TASK CONFIG --init REF --dataset REF` and `blip eval TASK --model REF --dataset REF`.

Thin faces over `pipelines.tasks.finetune.run_finetune` and `pipelines.tasks.evaluate.run_evaluate`: typed configs
(a path, or a preset in configs/finetune/ or configs/evaluate/), `--set key=value` overrides, the published
version printed as one line (eval also prints its metric table).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipelines.config import CONFIG_DIR

FINETUNE_TASKS = ("retrieval", "caption", "vqa", "nlvr")
EVAL_TASKS = ("retrieval", "caption", "vqa", "nlvr", "video")


def register(subparsers: Any) -> None:
    finetune = subparsers.add_parser(
        "finetune", help="finetune a model version on a downstream dataset version (Ray Train)",
        description="Finetune a pretrained model for retrieval, captioning, VQA or NLVR2 (BLIP recipes) and publish "
        "the task model as a model version with lineage to the init model and the dataset.",
    )  # fmt: skip
    finetune.add_argument("task", choices=FINETUNE_TASKS)
    finetune.add_argument("config", nargs="?", default=None,
                          help="config file or preset in configs/finetune/ (default: the task's BLIP defaults)")
    finetune.add_argument("--init", required=True, help="model version, save_pretrained directory or official .pth")
    finetune.add_argument("--dataset", required=True, help="downstream dataset version")
    finetune.add_argument("--name", default=None, help="output model name (default: <init name>-<task>)")
    finetune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    finetune.add_argument("--registry", default=None, help="registry URL (default BLIP_REGISTRY or ./artifacts/registry)")
    finetune.set_defaults(func=cmd_finetune)

    evaluate = subparsers.add_parser(
        "eval", help="evaluate a task model version on a downstream dataset version",
        description="Retrieval recall@K (ITC top-k + ITM re-rank over Ray workers) or captioning (beam search + "
        "pycocoevalcap); publishes an evaluation version with the metrics and result files.",
    )  # fmt: skip
    evaluate.add_argument("task", choices=EVAL_TASKS)
    evaluate.add_argument("config", nargs="?", default=None,
                          help="config file or preset in configs/evaluate/ (default: the task's BLIP defaults)")
    evaluate.add_argument("--model", required=True, help="model version or save_pretrained directory")
    evaluate.add_argument("--dataset", required=True, help="downstream dataset version")
    evaluate.add_argument("--name", default=None, help="evaluation name (default: <model name>-eval-<task>)")
    evaluate.add_argument("--out", default=None, help="also write the metrics JSON to this file")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--registry", default=None, help="registry URL (default BLIP_REGISTRY or ./artifacts/registry)")
    evaluate.set_defaults(func=cmd_eval)


def config_source(group: str, task: str, value: str | None) -> Path | dict[str, Any]:
    """A config path: the given file, a preset name in configs/<group>/, or just the task with defaults."""
    if value is None:
        return {"task": task}
    path = Path(value)
    if path.exists():
        return path
    preset = CONFIG_DIR / group / (value if value.endswith(".yaml") else f"{value}.yaml")
    if preset.exists():
        return preset
    known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
    raise FileNotFoundError(f"config {value!r} is neither a file nor a preset in configs/{group} ({known})")


def _load(cls: Any, group: str, args: argparse.Namespace) -> Any:
    from pipelines.cli import CommandError
    from pipelines.config import load_config

    cfg = load_config(cls, config_source(group, args.task, args.config), args.overrides)
    if cfg.task != args.task:
        raise CommandError(f"the config is for task '{cfg.task}', not '{args.task}'")
    return cfg


def _default_name(ref: str, suffix: str) -> str:
    base = Path(ref).name if Path(ref).exists() else ref.split("@", 1)[0]
    return f"{base}-{suffix}"


def cmd_finetune(args: argparse.Namespace) -> int:
    from datasets_manifests.registry import Registry
    from pipelines.tasks.finetune import FinetuneConfig, run_finetune

    cfg = _load(FinetuneConfig, "finetune", args)
    registry = Registry(args.registry)
    name = args.name or _default_name(args.init, args.task)
    manifest = run_finetune(cfg, init=args.init, dataset=args.dataset, name=name, registry=registry)
    meta = manifest.metadata
    print(f"{manifest.ref}  id {manifest.short_id}  {meta.get('kind')}  step {meta.get('final_step')}/"
          f"{meta.get('planned_steps')}  parents {', '.join(manifest.parents)}")  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from datasets_manifests.registry import Registry
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    cfg = _load(EvaluateConfig, "evaluate", args)
    registry = Registry(args.registry)
    name = args.name or _default_name(args.model, f"eval-{args.task}")
    manifest = run_evaluate(cfg, model=args.model, dataset=args.dataset, name=name, registry=registry, out=args.out)
    print(f"{manifest.ref}  id {manifest.short_id}")
    return 0
