"""Where the project's own log lines go.

The stages log what a user needs to know as INFO (a stage going on from a stopped run, a checkpoint converted, a
`ray start` cluster left alone): Python's default shows WARNING and above only, so without this none of those
lines reached the terminal, a Prefect worker's output or the Prefect UI.
"""

from __future__ import annotations

import logging
import sys

PROJECT_LOGGERS = ("pipelines", "datasets_manifests", "blip_models")
# Prefect's console format: a flow's lines and ours read alike.
FORMAT = "%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _ConsoleUnlessRootPrints(logging.StreamHandler):
    """Prints a project record on stderr only where nothing else would: once a program has put a handler on the
    root logger (Prefect's console in a flow, pytest's capture, a user's `logging.basicConfig`), records reach it
    by propagation, and printing here as well would show each line twice. The leading underscore keeps Prefect
    from taking it for a user's handler (it then leaves the root logger unconfigured)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # the current one: tqdm and wandb may have wrapped it since
        super().emit(record)


def show_project_logs(level: int = logging.INFO) -> None:
    """Let the project's INFO lines through, on stderr or to whatever the root logger prints with. Idempotent; a
    level a program set on one of our loggers first is kept."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
        if not any(isinstance(handler, _ConsoleUnlessRootPrints) for handler in logger.handlers):
            handler = _ConsoleUnlessRootPrints()
            handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
            logger.addHandler(handler)
