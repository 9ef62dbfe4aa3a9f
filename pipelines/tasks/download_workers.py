"""img2dataset's distributors, with the death of a worker process noticed and its shard redone.

img2dataset 1.47 runs its shards through `multiprocessing.Pool.imap_unordered`. When a worker process dies in the
middle of a shard (the kernel's out-of-memory killer, a crash in a native decoder, a `kill -9`), the pool starts
a new worker but that shard's result never comes: the download waits forever, silently (reproduced here: the
workers killed once the first shard was written; the run never ended). `concurrent.futures`' pool notices a death,
but in Python 3.11 its `max_tasks_per_child` (the recycling img2dataset relies on) hung too, twice in the same
test: a dead worker left unreaped, then a replacement pool that started no process.

So the processes here are plain ones, each with its own pipe (no lock shared between workers that a killed one
could keep): the parent hands a worker one shard at a time, a worker leaves after `TASKS_PER_CHILD` shards (as
img2dataset's `maxtasksperchild=5`, which gives its memory back) and is replaced. A worker that dies with a shard
in hand has that shard handed to another (img2dataset writes a shard whole again: nothing is lost or duplicated);
a shard whose worker dies `MAX_DEATHS` times stops the download with one line naming it and the signal, and a
rerun resumes from the finished shards (incremental mode).

img2dataset's Ray distributor (one Ray task a shard) had Ray retry a task whose worker died but never retried a
shard that reported a failure (`max_shard_retry` did nothing), and ended, after the retries Ray allows, with a
traceback that did not say which shard: `supervised_ray_distributor` retries failed shards as the multiprocessing
one does, lets Ray run a shard whose worker died `MAX_DEATHS` times in all, and then stops in the same one line.
img2dataset's also submitted every shard at once (13k tasks at 129M); this one keeps two a cluster CPU in flight.

A shard that fails on a full disk (img2dataset printed the traceback and went on to the next shard, which failed
the same way, and the download ended saying only that some shards did not finish) stops the download at once with
the disk's OSError, which the command says in one line.

`using_supervised_distributor` puts both in img2dataset's place for one `download` call.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import multiprocessing
import os
import sys
import traceback
from collections import Counter, deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator

from pipelines.runtime import WorkerProcessDied, ctrl_c_ignored, disk_full, exit_description, oom_hint
from pipelines.tasks._img2dataset import import_img2dataset

# A worker process (spawned, or a Ray worker) imports this module for its function before it unpickles the
# img2dataset Downloader it is given: img2dataset is imported here first, without wandb.
import_img2dataset()

log = logging.getLogger(__name__)
TASKS_PER_CHILD = 5  # as img2dataset's Pool(maxtasksperchild=5)
MAX_DEATHS = 3  # deaths of a worker holding the same shard before the download stops: not transient then

Downloader = Any  # img2dataset's Downloader: `download_shard(shard)` writes a shard, raises when it cannot
ShardResult = tuple[bool, Any, "str | None"]  # (done, shard, where the disk was full when that stopped it)


def supervised_distributor(processes_count: int, downloader: Downloader, reader: Iterable[Any], _: Any,
                           max_shard_retry: int) -> None:  # fmt: skip
    """img2dataset's `multiprocessing_distributor` (same arguments): every shard of `reader` through `downloader`
    in `processes_count` spawned processes; shards that report a failure are retried `max_shard_retry` times, as
    img2dataset does; a shard whose worker died goes to another worker."""
    from img2dataset.distributor import retrier

    from pipelines.progress import StageProgress

    def run(shards: Iterable[Any]) -> list[Any]:
        with StageProgress("downloading shards", shards_to_download(shards), "shards", logger=log) as progress:
            return run_shards(processes_count, downloader, shards, progress.update)

    # `reader` cuts the source list into shard files as it is iterated: taken a shard at a time, as workers free
    # up, so that the first downloads do not wait for the whole list (13k shards at 129M) to be cut. The failed
    # shards go through img2dataset's own `retrier`, as with its distributor.
    retrier(run, run(reader), max_shard_retry)


def supervised_ray_distributor(processes_count: int, downloader: Downloader, reader: Iterable[Any], _: Any,
                               max_shard_retry: int) -> None:  # fmt: skip
    """img2dataset's `ray_distributor` (same arguments): one 1-CPU Ray task a shard (`processes_count` is unused:
    the cluster's CPUs set the concurrency, as with img2dataset's), retried by Ray when its worker dies; shards
    that report a failure are retried `max_shard_retry` times through img2dataset's `retrier`."""
    import ray
    from img2dataset.distributor import retrier

    from pipelines.progress import StageProgress

    download_shard = ray.remote(num_cpus=1, max_retries=MAX_DEATHS - 1)(_download_shard)
    downloader_ref = ray.put(downloader)  # sent to the object store once, not with every task

    def run(shards: Iterable[Any]) -> list[Any]:
        # Taken from the reader as tasks finish, at most IN_FLIGHT_PER_CPU a cluster CPU in flight (img2dataset
        # submitted every shard at once: 13k tasks queued on the scheduler at 129M); collected as they finish.
        remaining = iter(shards)
        pending: dict[Any, Any] = {}
        failed: list[Any] = []
        with StageProgress("downloading shards", shards_to_download(shards), "shards", logger=log) as progress:
            while True:
                limit = _in_flight_limit(ray)  # read again each time: a cluster that scales up gets more
                while len(pending) < limit and (shard := next(remaining, _DONE)) is not _DONE:
                    pending[download_shard.remote(downloader_ref, shard)] = shard
                if not pending:
                    return failed
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    shard = pending.pop(ref)
                    status, row, _ = _shard_result(ray, ref, shard)
                    if status is False:
                        failed.append(row)
                    progress.update()

    retrier(run, run(reader), max_shard_retry)


def shards_to_download(shards: Iterable[Any]) -> int | None:
    """How many shards `shards` will give, for the bar's total: a list's length (a retry pass), or for
    img2dataset's `Reader` (which cuts its files into shards only as it is iterated) the shards its parquet files
    make, from their footers, less those a resumed run had finished; None when that cannot be told."""
    if isinstance(shards, (list, tuple)):
        return len(shards)
    try:
        per_shard, start, done = shards.number_sample_per_shard, shards.start_shard_id, set(shards.done_shards)
        import pyarrow.parquet as pq

        total = 0
        for path in shards.input_files:
            with shards.fs.open(path, "rb") as handle:
                count = -(-pq.ParquetFile(handle).metadata.num_rows // per_shard)
            total += sum(1 for shard_id in range(start, start + count) if shard_id not in done)
            start += count
        return total
    except Exception:  # noqa: BLE001 - another input format or reader: a bar without a total, as before
        return None


IN_FLIGHT_PER_CPU = 2  # shard tasks in flight per cluster CPU: every CPU busy, one queued behind it, and an
# autoscaler sees the demand for more
_DONE = object()


def _in_flight_limit(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1))) * IN_FLIGHT_PER_CPU


class _DiskFull(BaseException):
    """A shard's writer hit a full disk. Not an Exception: img2dataset catches every Exception around a sample,
    prints its traceback and goes on to the next sample, which fails the same way (a traceback a sample, 10,000
    samples a shard); this one passes through to `_download_shard`."""


def _stopping_on_a_full_disk(writer_class: type) -> type:
    """img2dataset's sample writer class, telling a full disk apart: the first write that meets one is noted and the
    shard's later writes are skipped, then `close` raises `_DiskFull`. Raising at the write itself would leave
    img2dataset's download loop, whose thread pool then waits forever on a semaphore that only the loop releases."""
    if getattr(writer_class, "stops_on_a_full_disk", False):
        return writer_class

    class Writer(writer_class):  # type: ignore[misc, valid-type]
        stops_on_a_full_disk = True
        disk_was_full = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:  # before img2dataset's loop starts: raising here leaves nothing waiting
                super().__init__(*args, **kwargs)
            except OSError as error:
                if disk_full(error) is None:
                    raise
                raise _DiskFull() from error

        def write(self, *args: Any, **kwargs: Any) -> Any:
            if self.disk_was_full:
                return None
            try:
                return super().write(*args, **kwargs)
            except OSError as error:
                if disk_full(error) is None:
                    raise
                self.disk_was_full = True
                return None

        def close(self) -> Any:
            try:
                result = super().close()
            except OSError as error:
                if disk_full(error) is None:
                    raise
                raise _DiskFull() from error
            if self.disk_was_full:  # some samples were not written: the shard is not done
                raise _DiskFull()
            return result

    Writer.__name__ = Writer.__qualname__ = writer_class.__name__
    return Writer


def _let_go_quietly(stop: _DiskFull) -> None:
    """Free the shard's writer, which the exception's frames hold: its tar stream's `__del__` flushes onto the full
    disk, and Python would print that as an "Exception ignored" traceback (the line the command ends with says it)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if disk_full(unraisable.exc_value) else hook(unraisable)
    try:
        for error in (stop, stop.__cause__):
            if error is not None and error.__traceback__ is not None:
                traceback.clear_frames(error.__traceback__)
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _download_shard(downloader: Downloader, shard: Any) -> ShardResult:
    """img2dataset's `Downloader.__call__` (a failed shard printed with its traceback, reported, not raised), but a
    full disk is told apart: it fails every shard after it, so the download stops (`_stop_on_a_full_disk`)."""
    if (writer_class := getattr(downloader, "sample_writer_class", None)) is not None:
        downloader.sample_writer_class = _stopping_on_a_full_disk(writer_class)  # this process's copy
    full = str(getattr(downloader, "output_folder", "") or "")
    try:
        downloader.download_shard(shard)
        return True, shard, None
    except _DiskFull as stop:
        _let_go_quietly(stop)
        return False, shard, full
    except Exception as error:  # noqa: BLE001 - as img2dataset: one shard's failure is reported, not raised
        if disk_full(error) is not None:  # outside the writer: the shard's stats file, say
            return False, shard, full
        traceback.print_exc()
        print(f"shard {shard[0]} failed with error {error}")
        return False, shard, None


def _stop_on_a_full_disk(result: ShardResult) -> ShardResult:
    if result[2] is not None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), result[2] or None)  # the output folder
    return result


def _shard_result(ray: Any, ref: Any, shard: Any) -> ShardResult:
    """A shard task's result; a task whose worker died every time Ray ran it stops the download."""
    try:
        return _stop_on_a_full_disk(ray.get(ref))
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WorkerProcessDied(
            f"the Ray worker downloading shard {shard[0]} died {MAX_DEATHS} times ({type(error).__name__}: {cause}); "
            "the shards finished so far are kept: run the same command again to go on from them (lower `threads` "
            "in the download config, or give the cluster's workers more memory, if they ran out of it)") from error


class _Worker:
    """One spawned process serving shards over its own pipe."""

    def __init__(self, context: Any, downloader: Downloader) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, downloader), daemon=True)
        with ctrl_c_ignored():  # inherited: Ctrl-C stops the driver, which stops its workers (`run_shards`)
            self.process.start()
        child.close()
        self.shard: tuple[int, Any] | None = None  # (number, shard) in hand
        self.done = 0

    def give(self, item: tuple[int, Any]) -> bool:
        """Send a shard; False when the worker has died since its last result (its death shows at the next wait)."""
        try:
            self.connection.send(item)
        except OSError:
            return False
        self.shard = item
        return True

    def retire(self) -> None:
        """Tell the worker to exit once done (its memory goes back); not waited for: an exit runs img2dataset's
        imports' clean-ups for a second or more."""
        with contextlib.suppress(OSError):
            self.connection.send(None)
        self.connection.close()

    def stop(self) -> None:
        """End the process now (an idle or retired worker: nothing in hand), as img2dataset's pool terminates."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        with contextlib.suppress(OSError):
            self.connection.close()


def _serve(connection: Connection, downloader: Downloader) -> None:
    """A worker's loop: a (number, shard) in, (number, its `_download_shard` result) out, until told to leave
    (None)."""
    while (item := connection.recv()) is not None:
        number, shard = item
        connection.send((number, _download_shard(downloader, shard)))


def run_shards(processes: int, downloader: Downloader, shards: Iterable[Any], done: Callable[[], Any]) -> list[Any]:
    """Run every shard once (again when its worker died), taking them from `shards` as workers free up; returns
    those that reported a failure. `done` is called after each shard."""
    context = multiprocessing.get_context("spawn")
    numbered = enumerate(shards)
    returned: deque[tuple[int, Any]] = deque()  # shards of workers that died, handed out first
    deaths: Counter[int] = Counter()
    failed: list[Any] = []
    workers: list[_Worker] = []
    retired: list[_Worker] = []

    def next_shard() -> tuple[int, Any] | None:
        return returned.popleft() if returned else next(numbered, None)

    try:
        while True:
            for worker in workers:
                if worker.shard is None and (item := next_shard()) is not None and not worker.give(item):
                    returned.appendleft(item)
            while len(workers) < processes and (item := next_shard()) is not None:
                workers.append(_Worker(context, downloader))
                if not workers[-1].give(item):
                    returned.appendleft(item)
            if all(worker.shard is None for worker in workers) and not returned:
                break
            ready = set(wait([worker.connection for worker in workers] + [w.process.sentinel for w in workers]))
            retired = [worker for worker in retired if worker.process.is_alive()]  # is_alive reaps the exited
            for worker in list(workers):
                result = None
                if worker.connection in ready:
                    with contextlib.suppress(EOFError, OSError):  # the pipe closed: the worker died
                        result = worker.connection.recv()
                if result is not None:
                    status, row, _ = _stop_on_a_full_disk(result[1])
                    worker.shard, worker.done = None, worker.done + 1
                    if status is False:
                        failed.append(row)
                    done()
                    if worker.done >= TASKS_PER_CHILD:
                        workers.remove(worker)
                        worker.retire()
                        retired.append(worker)
                elif worker.connection in ready or worker.process.sentinel in ready:
                    workers.remove(worker)
                    _bury(worker, deaths, returned)
    finally:  # every shard done (the workers are idle), or stopped by an error
        for worker in workers + retired:
            worker.stop()
    return failed


def _bury(worker: _Worker, deaths: Counter[int], queue: deque[tuple[int, Any]]) -> None:
    """A worker ended without a result: its shard goes back at the front of the queue, or the download stops."""
    worker.process.join(timeout=30)
    code = worker.process.exitcode
    worker.connection.close()
    if worker.shard is None:  # died between shards: nothing to redo
        log.warning("download: an img2dataset worker process %s between shards", exit_description(code))
        return
    number, shard = worker.shard
    deaths[number] += 1
    if deaths[number] >= MAX_DEATHS:
        raise WorkerProcessDied(
            f"the img2dataset worker downloading shard {shard[0]} {exit_description(code)}{oom_hint(code)}, "
            f"{deaths[number]} times; the shards finished so far are kept: run the same command again to go on from "
            "them (lower `processes` or `threads` in the download config if the workers ran out of memory)")
    log.warning("download: the img2dataset worker downloading shard %s %s; the shard goes to another worker",
                shard[0], exit_description(code))  # fmt: skip
    queue.appendleft((number, shard))


SUPERVISED = {"multiprocessing_distributor": supervised_distributor, "ray_distributor": supervised_ray_distributor}


@contextlib.contextmanager
def using_supervised_distributor(img2dataset_main: Any) -> Iterator[None]:
    """`img2dataset.download` runs `supervised_distributor` (distributor="multiprocessing") or
    `supervised_ray_distributor` ("ray") inside the block, and its logger process ignores a terminal's Ctrl-C, as
    the workers do (img2dataset's own handler in the driver stops it), and is stopped after a download that
    raised (img2dataset never joins it then: the command hung at exit). img2dataset picks these from module
    globals of `img2dataset.main`; an img2dataset without them (a version other than the pinned 1.47) is refused
    rather than left to hang."""
    from pipelines.tasks._img2dataset_logger import LoggerProcessIgnoringCtrlC

    replacements = {**SUPERVISED, "LoggerProcess": LoggerProcessIgnoringCtrlC}
    missing = [name for name in replacements if not hasattr(img2dataset_main, name)]
    if missing:
        raise RuntimeError(f"img2dataset.main has no {missing[0]}: this img2dataset is not the pinned 1.47.0 "
                           "(pyproject.toml)")  # fmt: skip
    originals = {name: getattr(img2dataset_main, name) for name in replacements}
    for name, replacement in replacements.items():
        setattr(img2dataset_main, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(img2dataset_main, name, original)
        LoggerProcessIgnoringCtrlC.stop_started()  # the logger of a download that raised: never joined
