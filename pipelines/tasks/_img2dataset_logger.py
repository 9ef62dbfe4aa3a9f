"""img2dataset's logger process, started with Ctrl-C ignored as the download's workers are (`download_workers`).

A module of its own so that a spawned process finds the class by name when it unpickles it; it imports img2dataset,
which the download's processes import anyway.
"""

from __future__ import annotations

from multiprocessing.process import BaseProcess

from pipelines.runtime import ctrl_c_ignored
from pipelines.tasks._img2dataset import import_img2dataset

import_img2dataset()  # without wandb: before img2dataset's modules below
from img2dataset.logger import LoggerProcess  # noqa: E402


class LoggerProcessIgnoringCtrlC(LoggerProcess):
    """A terminal's Ctrl-C reaches every process of its group; img2dataset's handler in the driver stops this one.

    img2dataset joins its logger only after the distributor returns, and the logger runs until every shard's stats
    file exists: a download whose distributor raised (a full disk, a shard that kills its worker every time) left
    it running, and the command hung at exit joining it. `stop_started` stops those."""

    started: list[LoggerProcess] = []

    def start(self) -> None:
        with ctrl_c_ignored():
            super().start()
        LoggerProcessIgnoringCtrlC.started.append(self)

    @classmethod
    def stop_started(cls) -> None:
        """Stop the loggers started so far that still run (none after a download that ended normally)."""
        while cls.started:
            logger = cls.started.pop()
            if logger.is_alive():
                logger.terminate()
                BaseProcess.join(logger)  # img2dataset's own `join` first asks the stopped process to stop
