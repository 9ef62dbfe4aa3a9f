"""img2dataset's logger process, started with Ctrl-C ignored as the download's workers are (`download_workers`).

A module of its own so that a spawned process finds the class by name when it unpickles it; it imports img2dataset,
which the download's processes import anyway.
"""

from __future__ import annotations

from img2dataset.logger import LoggerProcess

from pipelines.runtime import ctrl_c_ignored


class LoggerProcessIgnoringCtrlC(LoggerProcess):
    """A terminal's Ctrl-C reaches every process of its group; img2dataset's handler in the driver stops this one."""

    def start(self) -> None:
        with ctrl_c_ignored():
            super().start()
