"""`blip`: the command line of the pipeline. A thin face over the stage functions.

Each command group lives in its own module exposing `register(subparsers)`; handlers return an exit code.
Modules import their heavy dependencies inside the handlers, so `blip data ls` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipelines.logs import show_project_logs
from pipelines.runtime import apply_environment, disk_full

# One module per command group, in the order they appear in `blip --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "datasets_manifests.cli",  # blip data ls|show|lineage|diff|verify|samples|serve
    "pipelines.commands.stages",  # blip demo-corpus, download, shard
    "pipelines.commands.flow",  # blip flow run|validate (the bootstrap flow in this process)
    "pipelines.commands.orchestrate",  # blip run (Prefect deployment), blip submit (Ray job)
    "pipelines.commands.capfilt",  # blip capfilt
    "pipelines.commands.train",  # blip train (pretraining on Ray Train)
    "pipelines.commands.infer",  # blip infer caption|itm|vqa|features
    "pipelines.commands.evaluate",  # blip finetune, blip eval (downstream tasks)
)


class CommandError(Exception):
    """An error for the user: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip",
        description="BLIP data bootstrapping: download -> shard -> pretrain -> CapFilt -> finetune -> evaluate, "
        "with every dataset and model a versioned artifact in a registry.",
    )
    # dest "verb": `blip submit --command` has a `command` of its own, which made its errors "blip None: error"
    subparsers = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_environment()
    show_project_logs()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as error:  # Ctrl-C; a stage that can go on says how (`TrainingInterrupted`, ...)
        how = "; ".join(part for part in (str(error), getattr(args, "on_interrupt", "")) if part)
        print(f"blip {args.verb}: interrupted{f': {how}' if how else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `blip data ls | head`: the reader left; not an error to print a traceback for
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would raise again
        return 141  # 128 + SIGPIPE, as a shell reports it
    except Exception as error:  # noqa: BLE001 - user-facing errors become one line
        if getattr(args, "traceback", False):
            raise
        if _is_user_error(error):
            print(f"blip {args.verb}: error: {error}", file=sys.stderr)
            return 2
        if (full := disk_full(error)) is not None:  # at 129M (~6 TB a version) the most likely end of a long run
            where = f" ({full.filename})" if full.filename else ""
            stopped = f"; {full.stopped}" if getattr(full, "stopped", None) else ""  # `TrainingDiskFull`
            then = getattr(args, "on_interrupt", "") or "run the same command again (a stage goes on from its work)"
            print(f"blip {args.verb}: error: no space left on the device{where}{stopped}: free space (`blip data "
                  f"work` lists what runs left; `--remove-leftovers` frees what no rerun needs), then {then}",
                  file=sys.stderr)  # fmt: skip
            return 2
        raise


def _is_user_error(error: Exception) -> bool:
    from pipelines.config import ConfigError

    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, (CommandError, ConfigError, FileNotFoundError)) or bool(
        # MissingFilesystemError: an s3:// URL without s3fs; CapFiltError: a wrong model kind or an empty dataset;
        # EmptyInputError: a shard stage given a download that got no image; WorkerProcessDied: a stage's worker
        # process was killed (out of memory) - its traceback would be concurrent.futures' internals; SourceListError:
        # a source list that cannot be read as one (its format, a missing url column)
        names & {"RegistryError", "UserError", "MissingFilesystemError", "CapFiltError", "EmptyInputError",
                 "WorkerProcessDied", "SourceListError"}
    )


if __name__ == "__main__":
    # Under `python -m pipelines.cli` this file runs as `__main__`, while command modules import `pipelines.cli`:
    # two copies, two `CommandError` classes. Run the imported copy's main, whose class the commands raise.
    from pipelines.cli import main as imported_main

    sys.exit(imported_main())
