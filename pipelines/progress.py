"""Progress of a long stage: a bar on a terminal, a log line every minute anywhere else.

A Prefect worker's output, a Ray job's log or a file has no terminal: a redrawn bar there is one endless line (or
thousands of them), so off a terminal the same figures go to the stage's logger at an interval instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class StageProgress:
    """`update(n, **postfix)` as the work goes, `close()` at the end (or use it as a context manager).

    `initial` counts work a resumed run found done; the rate and the time left count only this run's work.
    """

    def __init__(self, desc: str, total: int, unit: str, *, initial: int = 0, logger: logging.Logger | None = None,
                 log_every_s: float = 60.0, stream: TextIO | None = None) -> None:  # fmt: skip
        self.desc, self.total, self.unit, self.initial = desc, total, unit, initial
        self.done = initial
        self.postfix: dict[str, Any] = {}
        self.logger = logger or logging.getLogger(__name__)
        self.log_every_s = log_every_s
        self.started = self.last_logged = time.monotonic()
        stream = stream or sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                            unit_scale=total >= 100_000)  # fmt: skip

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
        elif time.monotonic() - self.last_logged >= self.log_every_s:
            self.last_logged = time.monotonic()
            self.logger.info("%s", self.line())

    def line(self) -> str:
        """`capfilt: 1,234 / 5,678 img (21.7 %), 45.6 img/s, about 1 min 37 s left; shards 3/9 written`."""
        share = f" ({100 * self.done / self.total:.1f} %)" if self.total else ""
        text = f"{self.desc}: {self.done:,} / {self.total:,} {self.unit}{share}"
        elapsed, ran = time.monotonic() - self.started, self.done - self.initial
        if ran > 0 and elapsed > 0:
            rate = ran / elapsed
            text += f", {rate:,.1f} {self.unit}/s"
            if self.done < self.total:
                text += f", about {_duration((self.total - self.done) / rate)} left"
        if self.postfix:
            text += "; " + ", ".join(f"{key} {value}" for key, value in self.postfix.items())
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.close()
            self.bar = None
        else:
            self.logger.info("%s", self.line())

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TrainingBar:
    """The bar of `blip train` / `blip finetune`, fed by rank 0's `progress.json` (the `on_progress` of the training
    stages): steps done of the planned total, the latest losses and learning rate."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="step", desc=desc, dynamic_ncols=True)

    def __call__(self, progress: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.total = progress.get("total")
        self.bar.n = progress.get("step", 0)
        shown = {key: f"{value:.3g}" for key, value in progress.items()
                 if (key.startswith("loss") or key == "lr") and isinstance(value, (int, float))}  # fmt: skip
        self.bar.set_postfix(shown, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> TrainingBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
