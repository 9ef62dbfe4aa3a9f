"""Progress of a long stage: a bar on a terminal, a log line every minute anywhere else.

A Prefect worker's output, a Ray job's log or a file has no terminal: a redrawn bar there is one endless line (or
thousands of them), so off a terminal the same figures go to the stage's logger at an interval instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

_Item = TypeVar("_Item")


def format_duration(seconds: float) -> str:
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

    def __init__(self, desc: str, total: int | None, unit: str, *, initial: int = 0,
                 logger: logging.Logger | None = None, log_every_s: float = 60.0, stream: TextIO | None = None,
                 enabled: bool = True) -> None:  # fmt: skip
        self.desc, self.total, self.unit, self.initial = desc, total, unit, initial
        self.done = initial
        self.postfix: dict[str, Any] = {}
        self.logger = logger or logging.getLogger(__name__)
        self.log_every_s = log_every_s
        self.started = self.last_logged = time.monotonic()
        self.enabled = enabled  # False: nothing shown (a stage's bar for a few shards)
        stream = stream or sys.stderr
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                            unit_scale=(total or 0) >= 100_000)  # fmt: skip

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_logged >= self.log_every_s:
            self.last_logged = time.monotonic()
            self.logger.info("%s", self.line())

    def each(self, items: Iterable[_Item], counts: Callable[[_Item], int] = lambda item: 1) -> Iterator[_Item]:
        """`items`, each counted on the bar (`counts(item)`, default 1) once the loop's body is done with it."""
        for item in items:
            yield item
            self.update(counts(item))

    def line(self) -> str:
        """`capfilt: 1,234 / 5,678 img (21.7 %), 45.6 img/s, about 1 min 37 s left; shards 3/9 written`."""
        if self.total is None:  # not known beforehand: what is done so far
            text = f"{self.desc}: {self.done:,} {self.unit}"
        else:
            share = f" ({100 * self.done / self.total:.1f} %)" if self.total else ""
            text = f"{self.desc}: {self.done:,} / {self.total:,} {self.unit}{share}"
        elapsed, ran = time.monotonic() - self.started, self.done - self.initial
        if ran > 0 and elapsed > 0:
            rate = ran / elapsed
            text += f", {rate:,.1f} {self.unit}/s" if rate >= 1 else f", {rate:.2g} {self.unit}/s"  # 0.033 shards/s
            if self.total is not None and self.done < self.total:
                text += f", about {format_duration((self.total - self.done) / rate)} left"
        if self.postfix:
            text += "; " + ", ".join(f"{key} {value}" for key, value in self.postfix.items())
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.close()
            self.bar = None
        elif self.enabled:
            self.logger.info("%s", self.line())
            self.enabled = False  # closed: a second close logs nothing

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TrainingBar:
    """The progress of `blip train` / `blip finetune` and of the flow's training stages, fed by rank 0's
    `progress.json` (the `on_progress` of the training stages): steps done of the planned total, the latest losses
    and learning rate. A bar on a terminal; elsewhere (a Prefect worker's log, a file) a log line a minute and one
    at the end, as `StageProgress`: a pretraining runs for days, and a log that shows only Ray's checkpoint reports
    says nothing about how far it is."""

    def __init__(self, desc: str, enabled: bool = True, *, stream: TextIO | None = None,
                 logger: logging.Logger | None = None, log_every_s: float = 60.0) -> None:  # fmt: skip
        self.desc, self.enabled, self.log_every_s = desc, enabled, log_every_s
        self.stream = stream or sys.stderr
        self.logger = logger or logging.getLogger(__name__)
        self.bar = None
        self.lines: StageProgress | None = None  # off a terminal, from the first record (a resumed run's step)
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="step", desc=desc, dynamic_ncols=True, file=self.stream)

    def __call__(self, progress: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step, total = int(progress.get("step", 0)), progress.get("total")
        shown = {key: f"{value:.3g}" for key, value in progress.items()
                 if (key.startswith("loss") or key == "lr") and isinstance(value, (int, float))}  # fmt: skip
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = step
            self.bar.set_postfix(shown, refresh=False)
            self.bar.refresh()
            return
        if self.lines is None:
            self.lines = StageProgress(self.desc, total, "steps", initial=step, logger=self.logger,
                                       log_every_s=self.log_every_s, stream=self.stream)  # fmt: skip
        self.lines.total = total
        self.lines.update(step - self.lines.done, **shown)  # back to a checkpoint's step after a restart: negative

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.lines is not None:
            self.lines.close()
            self.lines = None

    def __enter__(self) -> TrainingBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
