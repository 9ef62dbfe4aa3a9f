"""`blip finetune TASK CONFIG --init REF --dataset REF` and `blip eval TASK --model REF --dataset REF`.

Thin faces over `pipelines.tasks.finetune.run_finetune` and `pipelines.tasks.evaluate.run_evaluate`: typed configs
(a path, or a preset in configs/finetune/ or configs/evaluate/), `--set key=value` overrides, the published
version printed as a small table (finetune: steps, final losses, init report; eval: the metrics) and its id line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipelines.config import CONFIG_DIR

FINETUNE_TASKS = ("retrieval", "caption", "vqa", "nlvr")
EVAL_TASKS = ("retrieval", "caption", "vqa", "nlvr", "video")
EVAL_TASKS_HELP = """\
tasks (BLIP's protocols; dataset format in brackets):
  retrieval  image-text retrieval [coco / flickr Karpathy]: ITC top-k_test (256 COCO, 128 Flickr30k), re-ranked
             with ITM logit + ITC cosine; TR/IR recall@1/5/10 (txt_r*, img_r*) and r_mean
  caption    captioning [coco Karpathy, flickr, nocaps]: beam 3, max 20, min 5; BLEU-1..4, METEOR, ROUGE-L,
             CIDEr (SPICE when its models are present) with pycocoevalcap; writes caption_<split>_results.json.
             NoCaps: writes nocaps_<split>_results.json for the EvalAI server, no local score
  vqa        VQAv2 [vqa]: rank over answer_list.json (default) or generate (--set vqa_inference=generate); val:
             VQA accuracy (overall and per answer type); test: vqa_result.json for the server
  nlvr       NLVR2 [nlvr]: two-image classification accuracy on dev (split val) or test
  video      zero-shot text-video retrieval [msrvtt]: 8 uniform frames per clip, the retrieval metrics plus
             median rank
presets: configs/evaluate/ (retrieval_coco, retrieval_flickr, caption_coco, caption_nocaps, *_tiny)"""


def register(subparsers: Any) -> None:
    finetune = subparsers.add_parser(
        "finetune", help="finetune a model version on a downstream dataset version (Ray Train)",
        description="Finetune a pretrained model for retrieval, captioning, VQA or NLVR2 (BLIP recipes) and publish "
        "the task model as a model version with lineage to the init model and the dataset (publish a downstream set "
        "with `blip data publish-downstream`). Presets: configs/finetune/ (retrieval_coco, retrieval_flickr, "
        "caption_coco, vqa, nlvr, *_tiny).",
    )  # fmt: skip
    finetune.add_argument("task", choices=FINETUNE_TASKS)
    finetune.add_argument("config", nargs="?", default=None,
                          help="config file or preset in configs/finetune/ (default: the task's BLIP defaults); "
                          "a salesforce/BLIP configs/*.yaml or LAVIS projects/blip/*.yaml is read as ours, each "
                          "key said on stderr")
    finetune.add_argument("--init", default=None, help="model version, save_pretrained directory, official .pth "
                          "(path or URL), checkpoint name (`blip infer models`: model_base_capfilt_large, ...) or "
                          "transformers directory or hub name (Salesforce/blip-itm-base-coco; converted once); "
                          "required unless a BLIP config names it (pretrained:)")
    finetune.add_argument("--dataset", required=True, help="downstream dataset version")
    finetune.add_argument("--name", default=None, help="output model name (default: <init name>-<task>)")
    finetune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    finetune.add_argument("--registry", default=None, help="registry URL (default BLIP_REGISTRY or ./artifacts/registry)")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bar")
    finetune.set_defaults(func=cmd_finetune)

    evaluate = subparsers.add_parser(
        "eval", help="evaluate a task model version on a downstream dataset version",
        description="Evaluate a task model on a downstream dataset version (publish one with `blip data "
        "publish-downstream`) and publish an evaluation version: metrics.json (metrics + lineage to the model and "
        "dataset) and the result files. The rows are split over Ray workers that each hold the model on their "
        "device (--set num_workers=N --set gpus_per_worker=G --set precision=bf16; num_workers=0: this process).",
        epilog=EVAL_TASKS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    evaluate.add_argument("task", choices=EVAL_TASKS)
    evaluate.add_argument("config", nargs="?", default=None,
                          help="config file or preset in configs/evaluate/ (default: the task's BLIP defaults); "
                          "a salesforce/BLIP configs/*.yaml or LAVIS projects/blip/*.yaml is read as ours, each "
                          "key said on stderr")
    evaluate.add_argument("--model", default=None,
                          help="model version, save_pretrained directory, official .pth (path or URL), checkpoint "
                          "name (`blip infer models`) or transformers directory or hub name: `--model "
                          "model_base_retrieval_coco` evaluates BLIP's release; required unless a BLIP config names "
                          "it (pretrained:, as BLIP's --evaluate)")
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


def _load(cls: Any, group: str, args: argparse.Namespace) -> tuple[Any, str | None]:
    """The config, and the checkpoint a salesforce/BLIP config names (`pretrained:`; None for ours)."""
    from pipelines.blip_repo_configs import load_recipe_config
    from pipelines.cli import CommandError

    cfg, pretrained = load_recipe_config(cls, config_source(group, args.task, args.config), group, args.task,
                                         args.overrides)  # fmt: skip
    if cfg.task != args.task:
        raise CommandError(f"the config is for task '{cfg.task}', not '{args.task}'")
    return cfg, pretrained


def _model_argument(given: str | None, pretrained: str | None, option: str) -> str:
    from pipelines.cli import CommandError

    if given is None and pretrained is None:
        raise CommandError(f"{option} is required: the model to start from (a model version or a checkpoint)")
    return given or pretrained  # type: ignore[return-value]


def _default_name(ref: str, suffix: str) -> str:
    """`<model>-<suffix>` in a version name's characters: a directory's name, a file's or URL's stem, a version's
    name, a checkpoint name with '-' for '/' (blip_caption/base_coco -> blip_caption-base_coco)."""
    if Path(ref).exists():
        base = Path(ref).stem if Path(ref).is_file() else Path(ref).name
    elif "://" in ref:
        base = ref.rstrip("/").rsplit("/", 1)[-1].removesuffix(".pth")
    else:
        base = ref.split("@", 1)[0].replace("/", "-")
    return f"{base.lower()}-{suffix}"


def cmd_finetune(args: argparse.Namespace) -> int:
    from datasets_manifests.registry import Registry
    from pipelines.tasks.finetune import FinetuneConfig, run_finetune

    cfg, pretrained = _load(FinetuneConfig, "finetune", args)
    init = _model_argument(args.init, pretrained, "--init")
    registry = Registry(args.registry)
    name = args.name or _default_name(init, args.task)
    from pipelines.progress import TrainingBar
    from pipelines.tasks._ray_train import TrainingInterrupted

    args.on_interrupt = "the same command goes on from it"  # finetuning goes on from a run of the same inputs
    try:
        with TrainingBar(f"finetune {args.task}", enabled=not args.no_progress) as bar:
            manifest = run_finetune(cfg, init=init, dataset=args.dataset, name=name, registry=registry,
                                    on_progress=bar)  # fmt: skip
    except TrainingInterrupted as stopped:
        raise KeyboardInterrupt(str(stopped)) from None  # the CLI adds how to go on (`args.on_interrupt`)
    print(render_finetune_table(manifest))
    print(f"{manifest.ref}  id {manifest.short_id}")
    return 0


def render_finetune_table(manifest: Any) -> str:
    """A finetuned model version as a small table: task, steps, the last logged losses/metrics (and the first, to
    see the trend), what the init checkpoint provided, lineage."""
    meta, stats = manifest.metadata, manifest.stats or {}
    last, first = stats.get("last", {}), stats.get("first", {})
    init = meta.get("init") or {}
    rows = [("task", f"{meta.get('task')} ({meta.get('kind')} model, image {meta.get('image_size')})"),
            ("steps", f"{meta.get('final_step')}/{meta.get('planned_steps')}  ({meta.get('epochs')} epochs, global "
                      f"batch {meta.get('global_batch')}, {meta.get('world_size')} workers)")]  # fmt: skip
    for key in sorted(k for k in last if k != "step"):
        value = last[key]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        if isinstance(first.get(key), float) and key not in ("lr",):
            shown += f"  (first {first[key]:.4g})"
        rows.append((key, shown))
    counts = {k: len(init.get(k) or ()) for k in ("missing", "unexpected", "initialized")}
    rows.append(("init", f"from {init.get('from', '?')}: " + ", ".join(f"{n} {k}" for k, n in counts.items())))
    rows.append(("parents", ", ".join(manifest.parents) or "-"))
    width = max(len(key) for key, _ in rows)
    return "\n".join([f"{manifest.ref}: finetuned {meta.get('task')}"] + [f"  {k:<{width}}  {v}" for k, v in rows])


def cmd_eval(args: argparse.Namespace) -> int:
    from datasets_manifests.registry import Registry
    from pipelines.tasks.evaluate import EvaluateConfig, run_evaluate

    cfg, pretrained = _load(EvaluateConfig, "evaluate", args)
    model = _model_argument(args.model, pretrained, "--model")
    registry = Registry(args.registry)
    name = args.name or _default_name(model, f"eval-{args.task}")
    manifest = run_evaluate(cfg, model=model, dataset=args.dataset, name=name, registry=registry, out=args.out)
    print(f"{manifest.ref}  id {manifest.short_id}")
    return 0
