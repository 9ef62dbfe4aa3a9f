"""The download's worker processes (pipelines.tasks.download_workers): a worker that dies with a shard in hand has
the shard done by another, exactly once; one that dies on the same shard every time stops the download in one line
naming it. Real spawned processes, killed by a real SIGKILL."""

from __future__ import annotations

import os
import signal
import traceback
from collections import Counter
from pathlib import Path

import pytest

from pipelines.runtime import WorkerProcessDied
from pipelines.tasks import download_workers


class FullDiskWriter:
    """A sample writer on a full disk: every write gets the kernel's ENOSPC (/dev/full)."""

    def write(self, sample: int) -> None:
        with open("/dev/full", "wb", buffering=0) as full:
            full.write(b"sample %d" % sample)

    def close(self) -> None:
        pass


class RecordingDownloader:
    """img2dataset's Downloader contract (`download_shard` writes a shard or raises). Appends 'pid shard' for each
    shard it finishes; SIGKILLs its own process on `dies_on` (once, or always), or just after its `exits_after`-th
    result; raises once on `fails_once`; writes `full_on` to a full disk (/dev/full: the kernel's ENOSPC)."""

    def __init__(self, log: Path, dies_on: int | None = None, always: bool = False, fails_once: int | None = None,
                 exits_after: int | None = None, full_on: int | None = None):
        self.log, self.dies_on, self.always, self.fails_once = log, dies_on, always, fails_once
        self.exits_after = exits_after  # the process kills itself just after this many results, while idle
        self.full_on = full_on
        self.output_folder = str(log.parent / "shards")
        self.sample_writer_class = FullDiskWriter
        self.results = 0

    def download_shard(self, shard: tuple[int, str]) -> None:
        number = shard[0]
        if number == self.full_on:  # as img2dataset: each sample in its own try, its failure printed, the next one
            writer = self.sample_writer_class()
            for sample in range(5):
                try:
                    writer.write(sample)
                except Exception:  # noqa: BLE001 - img2dataset's `except Exception` around each sample
                    traceback.print_exc()
                    print(f"Sample {sample} failed to download")
            writer.close()
        if number == self.dies_on:
            marker = self.log.with_suffix(f".died-{number}")
            if self.always or not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        if number == self.fails_once:
            marker = self.log.with_suffix(f".failed-{number}")
            if not marker.exists():
                marker.touch()
                raise RuntimeError(f"shard {number}: a transient failure")
        with open(self.log, "a") as out:
            out.write(f"{os.getpid()} {number}\n")
        self.results += 1
        if self.results == self.exits_after:  # dies once the parent has its result: an idle worker's death
            import threading

            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()


def _finished(log: Path) -> tuple[Counter, Counter]:
    lines = [line.split() for line in log.read_text().splitlines()]
    return Counter(int(shard) for _, shard in lines), Counter(pid for pid, _ in lines)


def test_a_shard_whose_worker_is_killed_is_done_by_another_exactly_once(tmp_path, caplog):
    shards = [(number, f"part-{number}") for number in range(12)]
    with caplog.at_level("WARNING", logger=download_workers.__name__):
        failed = download_workers.run_shards(2, RecordingDownloader(tmp_path / "log", dies_on=3), shards, lambda: None)
    by_shard, by_process = _finished(tmp_path / "log")
    assert failed == [] and by_shard == Counter(range(12))  # every shard once, shard 3 included
    assert max(by_process.values()) <= download_workers.TASKS_PER_CHILD  # workers are replaced after 5 shards
    assert "worker downloading shard 3 was killed by SIGKILL; the shard goes to another worker" in caplog.text


def test_a_shard_that_kills_its_worker_every_time_stops_the_download_naming_it(tmp_path):
    shards = [(number, f"part-{number}") for number in range(6)]
    downloader = RecordingDownloader(tmp_path / "log", dies_on=2, always=True)
    expected = r"downloading shard 2 was killed by SIGKILL \(the kernel's out-of-memory killer .*\), 3 times; the shards"
    with pytest.raises(WorkerProcessDied, match=expected + " finished so far are kept"):
        download_workers.run_shards(2, downloader, shards, lambda: None)


def test_shards_that_report_a_failure_are_retried_as_img2dataset_does(tmp_path):
    shards = [(number, f"part-{number}") for number in range(4)]
    download_workers.supervised_distributor(2, RecordingDownloader(tmp_path / "log", fails_once=1), iter(shards),
                                            None, max_shard_retry=1)  # fmt: skip
    assert _finished(tmp_path / "log")[0] == Counter(range(4))


def test_a_full_disk_stops_the_download_at_once_instead_of_failing_every_shard_after_it(tmp_path, capfd):
    """img2dataset printed each shard's ENOSPC traceback, went on to fail the next, and the download ended saying
    only that some shards did not finish; now the first full-disk failure stops it with the disk's OSError."""
    import errno

    shards = [(number, f"part-{number}") for number in range(12)]
    downloader = RecordingDownloader(tmp_path / "log", full_on=4)
    with pytest.raises(OSError) as raised:
        download_workers.supervised_distributor(1, downloader, iter(shards), None, max_shard_retry=2)
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "shards"))
    assert _finished(tmp_path / "log")[0] == Counter(range(4))  # nothing after it was tried
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err and "failed" not in printed.out  # not a traceback for every sample


def test_a_shard_that_fails_otherwise_is_printed_as_img2dataset_prints_it(tmp_path, capfd):
    shards = [(number, f"part-{number}") for number in range(3)]
    failed = download_workers.run_shards(1, RecordingDownloader(tmp_path / "log", fails_once=1), shards, lambda: None)
    assert failed == [(1, "part-1")]
    out = capfd.readouterr()
    assert "RuntimeError: shard 1: a transient failure" in out.err
    assert "shard 1 failed with error shard 1: a transient failure" in out.out


def test_img2dataset_gets_the_supervised_distributors_for_one_call_only():
    import importlib

    main_module = importlib.import_module("img2dataset.main")
    originals = main_module.multiprocessing_distributor, main_module.ray_distributor
    with download_workers.using_supervised_distributor(main_module):
        assert main_module.multiprocessing_distributor is download_workers.supervised_distributor
        assert main_module.ray_distributor is download_workers.supervised_ray_distributor
    assert (main_module.multiprocessing_distributor, main_module.ray_distributor) == originals


@pytest.fixture
def ray_downloads(ray_session):
    """The session's local Ray, with this module's downloader sent to its workers by value (tests/ is not on their
    path)."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_on_ray_a_killed_worker_s_shard_runs_again_and_a_failed_shard_is_retried(ray_downloads, tmp_path):
    """img2dataset's Ray distributor never retried a shard that reported a failure; Ray itself runs again a task
    whose worker died. Every shard is done exactly once."""
    shards = [(number, f"part-{number}") for number in range(6)]
    downloader = RecordingDownloader(tmp_path / "log", dies_on=3, fails_once=1)
    download_workers.supervised_ray_distributor(2, downloader, iter(shards), None, max_shard_retry=1)
    assert _finished(tmp_path / "log")[0] == Counter(range(6))
    assert (tmp_path / "log.died-3").exists() and (tmp_path / "log.failed-1").exists()


def test_on_ray_a_shard_that_kills_its_worker_every_time_stops_the_download_naming_it(ray_downloads, tmp_path):
    shards = [(number, f"part-{number}") for number in range(3)]
    downloader = RecordingDownloader(tmp_path / "log", dies_on=2, always=True)
    with pytest.raises(WorkerProcessDied, match=r"the Ray worker downloading shard 2 died 3 times \(WorkerCrashedError: "
                                                r".*\); the shards finished so far are kept"):  # fmt: skip
        download_workers.supervised_ray_distributor(2, downloader, iter(shards), None, max_shard_retry=1)
    assert _finished(tmp_path / "log")[0] == Counter([0, 1])


def test_on_ray_shards_are_taken_from_the_reader_as_tasks_finish(ray_downloads, tmp_path, monkeypatch):
    """img2dataset's Ray distributor submitted every shard at once (13k tasks at 129M); at most
    IN_FLIGHT_PER_CPU tasks a cluster CPU are in flight now, and every shard is still done once."""
    import ray

    monkeypatch.setattr(download_workers, "IN_FLIGHT_PER_CPU", 1)
    limit = int(ray.cluster_resources()["CPU"])
    log = tmp_path / "log"
    in_flight: list[int] = []

    def reader():  # as img2dataset's reader: cuts the next shard when asked for it
        for number in range(4 * limit + 3):
            finished = len(log.read_text().splitlines()) if log.exists() else 0
            in_flight.append(number - finished)  # taken before this one and not finished yet
            yield number, f"part-{number}"

    download_workers.supervised_ray_distributor(2, RecordingDownloader(log), reader(), None, max_shard_retry=1)
    assert _finished(log)[0] == Counter(range(4 * limit + 3))
    assert max(in_flight) <= limit - 1 < 4 * limit + 2  # the reader was not drained up front


def test_a_worker_that_dies_between_shards_is_replaced_and_no_shard_is_charged_or_lost(tmp_path, caplog):
    """A worker killed while idle (after its result, before its next shard): the next shard sent to it cannot
    arrive; it goes to a new worker, without counting as a death of that shard."""
    import time

    def shards():  # the third shard comes late (the reader cutting the next part): the worker waits idle
        for number in range(8):
            if number == 2:
                time.sleep(1.0)
            yield number, f"part-{number}"

    downloader = RecordingDownloader(tmp_path / "log", exits_after=2)
    with caplog.at_level("WARNING", logger=download_workers.__name__):
        failed = download_workers.run_shards(1, downloader, shards(), lambda: None)
    assert failed == [] and _finished(tmp_path / "log")[0] == Counter(range(8))
    assert "between shards" in caplog.text and "goes to another worker" not in caplog.text


def test_the_bar_knows_how_many_shards_img2dataset_s_reader_will_give(tmp_path):
    """img2dataset's Reader cuts its files into shards only as it is iterated, so its bar had no total: the total
    comes from the parquet footers, less the shards a resumed run had finished."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset.reader import Reader

    parts = tmp_path / "parts"
    parts.mkdir()
    (tmp_path / "tmp").mkdir()
    for name, rows in (("part-000000.parquet", 250), ("part-000001.parquet", 40)):
        pq.write_table(pa.table({"url": [f"http://x/{i}.jpg" for i in range(rows)], "caption": ["c"] * rows}),
                       parts / name)  # fmt: skip

    def reader(done: set[int]) -> Reader:
        return Reader(str(parts), "parquet", "url", "caption", None, None, None, 100, done, str(tmp_path / "tmp"))

    assert download_workers.shards_to_download(reader(set())) == 3 + 1  # 100 + 100 + 50, then 40
    assert download_workers.shards_to_download(reader({0, 3})) == 2  # a resumed run: shards 1 and 2 are left
    assert len(list(reader({0, 3}))) == 2  # what the reader really gives
    assert download_workers.shards_to_download([("shard", 1), ("shard", 2)]) == 2  # a retry pass: a list
    assert download_workers.shards_to_download(iter(())) is None  # anything else: a bar without a total


def test_img2dataset_s_logger_is_stopped_when_the_download_raises(tmp_path, monkeypatch):
    """img2dataset joins its logger process only after the distributor returns; the logger runs until every shard
    has its stats file. A download whose distributor raised (a full disk, a shard killing its worker every time)
    left it running, and the command hung at exit, where multiprocessing joins its children."""
    import importlib
    import multiprocessing

    import img2dataset
    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset.logger import LoggerProcess

    def dies(*args, **kwargs):
        raise WorkerProcessDied("the worker downloading shard 0 was killed by SIGKILL, 3 times")

    monkeypatch.setattr(download_workers, "run_shards", dies)
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/0.jpg"], "caption": ["c"]}), tmp_path / "list.parquet")
    with pytest.raises(WorkerProcessDied):
        with download_workers.using_supervised_distributor(importlib.import_module("img2dataset.main")):
            img2dataset.download(url_list=str(tmp_path / "list.parquet"), input_format="parquet", url_col="url",
                                 caption_col="caption", output_folder=str(tmp_path / "out"), processes_count=1,
                                 thread_count=1, enable_wandb=False)  # fmt: skip
    assert not [child for child in multiprocessing.active_children() if isinstance(child, LoggerProcess)]


def test_img2dataset_is_imported_without_wandb_and_wandb_still_imports_after(tmp_path):
    """img2dataset imports wandb, which leaves two folders in the temporary directory of every killed process that
    imported it (a Ray worker when its cluster stops): the download's modules import img2dataset with a stand-in,
    in the driver and in a worker unpickling its function and Downloader (the order a spawned process or a Ray
    worker loads them), and a later `import wandb` still finds the real one."""
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    from img2dataset.downloader import Downloader

    from pipelines.tasks import download_workers

    root = Path(__file__).resolve().parents[2]
    driver = ("import sys, os\n"
              "import pipelines.tasks.download_workers, pipelines.tasks._img2dataset_logger\n"
              "from img2dataset.downloader import Downloader\n"
              "print('wandb' in sys.modules, type(sys.modules['img2dataset.logger'].wandb).__name__)\n"
              "print(os.listdir(os.environ['TMPDIR']))\n"
              "import wandb; print(hasattr(wandb, 'init'))\n")  # fmt: skip
    payload = pickle.dumps((download_workers._serve, Downloader)).hex()
    worker = f"import pickle, sys; pickle.loads(bytes.fromhex('{payload}')); print('wandb' in sys.modules)"
    outputs = []
    for code in (driver, worker):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=root,
                                env={**os.environ, "TMPDIR": str(tmp_path)})  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        outputs += result.stdout.split()
    assert outputs == ["False", "module", "[]", "True", "False"], outputs
