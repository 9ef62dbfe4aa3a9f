"""The project's INFO lines reach the user once (`pipelines.logs`), and a long stage shows its progress: a bar on a
terminal, a log line at an interval elsewhere (`pipelines.progress`)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.progress import StageProgress, format_duration

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})  # fmt: skip


def test_project_info_lines_are_printed_once_and_other_loggers_are_left_alone():
    result = _python("""
        import logging
        from pipelines.logs import show_project_logs

        logging.getLogger("pipelines.tasks.shard").info("before: not shown")
        show_project_logs()
        show_project_logs()  # twice: still one handler
        logging.getLogger("pipelines.tasks.shard").info("shard: going on from a stopped run")
        logging.getLogger("datasets_manifests.registry").warning("a warning of ours")
        logging.getLogger("some.library").info("a library's info: not shown")
        logging.getLogger("some.library").warning("a library's warning, as Python prints it")
        logging.basicConfig(format="root: %(message)s")  # a program (Prefect, pytest) configures the root logger
        logging.getLogger("blip_models.checkpoints").info("printed by the root's handler alone")
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not any("before" in line or "a library's info" in line for line in lines)
    assert [line.split(" | ", 1)[1] for line in lines[:2]] == [
        "INFO    | pipelines.tasks.shard - shard: going on from a stopped run",
        "WARNING | datasets_manifests.registry - a warning of ours"]
    assert lines[2:] == ["a library's warning, as Python prints it", "root: printed by the root's handler alone"]


def test_a_level_set_before_is_kept():
    logger = logging.getLogger("blip_models")
    previous = logger.level
    try:
        logger.setLevel(logging.ERROR)
        from pipelines.logs import show_project_logs

        show_project_logs()
        assert logger.level == logging.ERROR
        assert logging.getLogger("pipelines").level <= logging.INFO
    finally:
        logger.setLevel(previous)


def test_the_cli_shows_the_project_s_info_lines():
    """Every `blip` command turns them on (the flow's own lines: tests/integration/conftest.py)."""
    result = _python("""
        import logging
        from pipelines import cli

        assert cli.main(["flow", "validate", "tiny"]) == 0
        logging.getLogger("pipelines.tasks.capfilt").info("capfilt: 154 / 154 img")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.rstrip().endswith("| INFO    | pipelines.tasks.capfilt - capfilt: 154 / 154 img")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_a_log_line_at_an_interval(caplog):
    stream = io.StringIO()
    logger = logging.getLogger("pipelines.tasks.capfilt")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with StageProgress("capfilt", 1_000, "img", initial=400, logger=logger, log_every_s=3600, stream=stream) as bar:
            bar.update(100, shards="5/10 written")  # within the interval: nothing logged yet
            assert not caplog.records
            bar.log_every_s = 0
            bar.update(100, shards="6/10 written")
            assert caplog.records[-1].getMessage().startswith("capfilt: 600 / 1,000 img (60.0 %), ")
            assert "img/s, about " in caplog.records[-1].getMessage()
            assert caplog.records[-1].getMessage().endswith(" left; shards 6/10 written")
            bar.update(400, shards="10/10 written")
        final = caplog.records[-1].getMessage()  # closing logs where it ended
    assert final.startswith("capfilt: 1,000 / 1,000 img (100.0 %), ") and "left" not in final
    assert final.endswith("; shards 10/10 written")
    assert stream.getvalue() == ""  # no bar drawn into a log


def test_on_a_terminal_progress_is_a_bar(caplog):
    stream = _Terminal()
    with caplog.at_level(logging.INFO):
        with StageProgress("capfilt", 50, "img", initial=10, stream=stream) as bar:
            bar.update(40, shards="3/3 written")
    drawn = stream.getvalue()
    assert "capfilt: 100%" in drawn and "50/50" in drawn and "shards=3/3 written" in drawn
    assert not caplog.records  # the bar, not log lines


@pytest.mark.parametrize(("seconds", "text"), [(4.6, "5 s"), (97, "1 min 37 s"), (7_380, "2 h 03 min")])
def test_durations_read_as_time_left(seconds, text):
    assert format_duration(seconds) == text


def test_the_training_bar_shows_steps_losses_and_the_learning_rate(caplog):
    from pipelines.progress import TrainingBar

    stream = _Terminal()
    with caplog.at_level(logging.INFO):
        with TrainingBar("finetune caption", stream=stream) as bar:
            bar({"step": 3, "total": 6, "loss_lm": 2.345678, "lr": 0.001, "samples_per_s": 5.0})
    drawn = stream.getvalue()
    assert "finetune caption" in drawn and "3/6" in drawn and "loss_lm=2.35" in drawn and "lr=0.001" in drawn
    assert "samples_per_s" not in drawn
    assert not caplog.records
    stream = _Terminal()
    with TrainingBar("train", enabled=False, stream=stream) as bar:  # --no-progress
        bar({"step": 1, "total": 2})
    assert stream.getvalue() == ""


def test_off_a_terminal_training_progress_is_a_log_line_at_an_interval(caplog):
    """A flow's pretraining in a Prefect worker's log, or `blip train > file`: lines, not a redrawn bar."""
    from pipelines.progress import TrainingBar

    stream = io.StringIO()
    logger = logging.getLogger("pipelines.progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with TrainingBar("pretrain-web", stream=stream, log_every_s=3600) as bar:
            bar({"step": 200, "total": 500, "loss_itc": 3.9, "lr": 0.00135})  # a resumed run's first record
            bar({"step": 250, "total": 500, "loss_itc": 3.5, "lr": 0.0012})
            assert not caplog.records  # within the interval
            bar.lines.log_every_s = 0
            bar({"step": 300, "total": 500, "loss_itc": 3.1, "lr": 0.001})
            line = caplog.records[-1].getMessage()
            assert line.startswith("pretrain-web: 300 / 500 steps (60.0 %), ")
            assert line.endswith(" left; loss_itc 3.1, lr 0.001")
            bar({"step": 200, "total": 500, "loss_itc": 3.9, "lr": 0.00135})  # restarted from a checkpoint
            bar({"step": 500, "total": 500, "loss_itc": 2.0, "lr": 1e-05})
        final = caplog.records[-1].getMessage()
    assert final.startswith("pretrain-web: 500 / 500 steps (100.0 %), ") and "left" not in final
    assert final.endswith("; loss_itc 2, lr 1e-05")
    assert stream.getvalue() == ""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=logger.name):
        with TrainingBar("pretrain-web", stream=stream, log_every_s=0):  # a stage found published: no record
            pass
    assert not caplog.records


def test_a_bar_turned_off_shows_nothing_and_an_unknown_total_shows_what_is_done(caplog):
    stream = io.StringIO()
    logger = logging.getLogger("pipelines.tasks.shard")
    with caplog.at_level(logging.INFO, logger=logger.name):
        with StageProgress("writing shards", 3, "shards", logger=logger, log_every_s=0, stream=stream,
                           enabled=False) as bar:  # a stage's bar for a few shards
            bar.update(3)
        assert not caplog.records
        with StageProgress("downloading shards", None, "shards", logger=logger, log_every_s=3600,
                           stream=stream) as bar:  # img2dataset's reader of another format: no total
            bar.update(2)
    assert caplog.records[-1].getMessage().startswith("downloading shards: 2 shards, ")
    assert "left" not in caplog.records[-1].getMessage() and "%" not in caplog.records[-1].getMessage()
