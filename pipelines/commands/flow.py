"""`blip flow run|validate`: run the bootstrap flow in this process (Prefect ephemeral mode unless
PREFECT_API_URL points at a server), or only check a preset."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "flow",
        help="run the bootstrap Prefect flow here, or validate a pipeline preset",
        description="Run the `bootstrap` flow in this process. Without PREFECT_API_URL Prefect starts a "
        "temporary local server (ephemeral mode, +10-20 s); with it, the run is recorded on that server.",
    )
    actions = parser.add_subparsers(dest="flow_command", metavar="ACTION")
    run = actions.add_parser("run", help="run the whole recipe for a preset (tiny | 14m | 129m | config.yaml)")
    run.add_argument("preset", help="tiny | 14m | 129m, or a pipeline config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted config override, e.g. --set capfilt.filter.threshold=0.6; repeatable")
    run.set_defaults(func=cmd_run)
    validate = actions.add_parser("validate", help="load and check a preset (every key, type and range)")
    validate.add_argument("preset")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.config import config_hash
    from pipelines.pipeline_config import load_pipeline, preset_path

    cfg = load_pipeline(args.preset, args.overrides)
    print(f"{preset_path(args.preset)}: ok (pipeline {cfg.name!r}, config hash {config_hash(cfg)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.pipeline_config import load_pipeline

    load_pipeline(args.preset, args.overrides)  # fail on a bad preset before Prefect starts
    from pipelines.flows.bootstrap import bootstrap

    state = bootstrap(preset=args.preset, overrides=args.overrides, return_state=True)
    if not state.is_completed():
        print(f"flow ended {state.name}: {state.message or ''}")
        return 1
    return 0
