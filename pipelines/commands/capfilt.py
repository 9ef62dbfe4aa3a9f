"""`blip capfilt CONFIG --dataset REF --captioner REF --filter REF`: run the CapFilt stage (pipelines/tasks/capfilt.py).

CONFIG is a YAML file or a preset name under configs/capfilt/ (tiny, default, 129m). Ray is the local instance
unless RAY_ADDRESS names a cluster; the same config sets the actor pools there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "capfilt",
        help="caption + filter a web dataset version into a bootstrapped dataset version",
        description="CapFilt (BLIP §3): the captioner writes synthetic captions, the filter's ITM head keeps texts "
        "with match probability >= threshold; publishes a new dataset version with per-sample provenance "
        "(texts.parquet) and stats. Resumable: re-run the same command after a crash.",
    )
    parser.add_argument("config", help="capfilt config YAML or preset name (tiny, default, 129m)")
    parser.add_argument("--dataset", required=True, help="input dataset version, e.g. web-demo@v1")
    parser.add_argument("--captioner", required=True,
                        help="captioner: a model version (kind caption), or a checkpoint (path, URL, name such as "
                        "model_base_caption_capfilt_large, directory) published first as <checkpoint>-captioner")
    parser.add_argument("--filter", required=True,
                        help="filter: a model version (kind itm or retrieval; its ITM head scores the texts), or a "
                        "checkpoint (e.g. model_base_retrieval_coco) published first as <checkpoint>-filter")
    parser.add_argument("--name", default=None, help="output dataset name (default: <dataset name>-capfilt)")
    parser.add_argument("--registry", default=None, help="registry URL (default: $BLIP_REGISTRY or ./artifacts/registry)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set filter.threshold=0.6; repeatable")
    parser.set_defaults(func=cmd_capfilt, on_interrupt="the same command goes on from the shards this run finished")


def resolve_config_path(value: str) -> Path:
    from pipelines.config import CONFIG_DIR

    path = Path(value)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return CONFIG_DIR / "capfilt" / f"{value}.yaml"


def cmd_capfilt(args: argparse.Namespace) -> int:
    from datasets_manifests.registry import Registry, parse_ref
    from pipelines.commands.evaluate import _default_name
    from pipelines.config import load_config
    from pipelines.tasks.capfilt import CapFiltConfig, run_capfilt
    from pipelines.tasks.publish_model import CAPFILT_ROLE_KINDS, publish_model, registry_version

    config = load_config(CapFiltConfig, resolve_config_path(args.config), args.overrides)
    name = args.name or f"{parse_ref(args.dataset)[0]}-capfilt"
    registry = Registry(args.registry)
    dataset = registry.resolve(args.dataset, kind="dataset")  # a missing input says so before any model is published
    models = {}
    for role, kind in CAPFILT_ROLE_KINDS.items():
        source = getattr(args, role)
        models[role] = registry_version(registry, source)
        if models[role] is None:  # a checkpoint: published first
            models[role] = publish_model(source, name=_default_name(source, role), registry=registry, kind=kind)
            print(f"{role}: {source} -> {models[role].ref}", file=sys.stderr)
    manifest = run_capfilt(config, dataset, captioner_ref=models["captioner"], filter_ref=models["filter"],
                           name=name, registry=registry)  # fmt: skip
    stats = manifest.stats.get("capfilt", {})
    print(json.dumps({"version": manifest.ref, "id": manifest.short_id, "counts": manifest.counts,
                      "kept_fraction": stats.get("kept_fraction"), "quality": stats.get("quality"),
                      "throughput": stats.get("throughput")}, indent=2))  # fmt: skip
    return 0
