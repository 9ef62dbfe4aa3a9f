"""`blip flow run|validate`: run the bootstrap flow in this process (on a temporary local Prefect server,
`pipelines.prefect_server`, unless PREFECT_API_URL points at one), or only check a preset."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "flow",
        help="run the bootstrap Prefect flow here, or validate a pipeline preset",
        description="Run the `bootstrap` flow in this process. Without PREFECT_API_URL a temporary local Prefect "
        "server is started for the run (+10-30 s) and stopped after it; with it, the run is recorded on that "
        "server.",
    )
    actions = parser.add_subparsers(dest="flow_command", metavar="ACTION")
    run = actions.add_parser("run", help="run the whole recipe for a preset (tiny | 14m | 129m | config.yaml)")
    run.add_argument("preset", help="tiny | 14m | 129m, or a pipeline config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted config override, e.g. --set capfilt.filter.threshold=0.6; repeatable")
    run.set_defaults(func=cmd_run, on_interrupt="the same command goes on from where this run stopped (published "
                     "stages are reused)")
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
    from pipelines.prefect_server import temporary_server

    with temporary_server():  # one that a terminal's Ctrl-C leaves running until the run has said how it ended
        state = bootstrap(preset=args.preset, overrides=args.overrides, return_state=True)
    if not state.is_completed():
        print(f"flow ended {state.name}: {state.message or ''}")
        return 1
    return 0
