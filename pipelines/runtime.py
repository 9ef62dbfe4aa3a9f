"""Process environment every entry point applies before touching Ray or Prefect.

Each setting was reproduced on our machines (shared/docs/orchestration.md):
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray listener on 127.0.0.1; without it a client rewrites
  127.0.0.1 into the network card's address and hangs. It must be set in *every* process that uses Ray.
- RAY_AUTH_MODE=token: Ray 2.60 turns token auth on; the jobs CLI/SDK only send the token with this set.
- Telemetry off (Ray usage stats, Prefect analytics, DO_NOT_TRACK); Ray Train's print patch off (see below).
Values already set by the user win (setdefault). On a real multi-node cluster set BLIP_RAY_MULTINODE=1
(the infra/ images do): the loopback switch would stop extra nodes from joining.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The ephemeral Prefect server's 20 s default start-up timeout is too tight on 2 cores (15-17 s seen).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train 2.60 routes a worker's print() to its logger and, when sys.stdout is wrapped (img2dataset pulls in
    # wandb, whose console capture wraps it), also to the stream: every training log line reached us twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Ray Train's controller polls its workers every 2 s, and a run's start and end each wait out polls: 0.5 s
    # took ~5 s off every training run here (23.5 -> 17.3 s for 4 tiny steps on 2 workers: the flow runs 7, the
    # demo more) and notices a dead worker sooner. A few small RPCs a second per worker cost nothing at scale.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # The project's log lines in a flow run's log on the Prefect server too (read when Prefect sets up logging),
    # and no warning for a line logged outside a run (a thread a stage started): it is still printed.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipelines,datasets_manifests,blip_models",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def apply_environment() -> None:
    multinode = os.environ.get("BLIP_RAY_MULTINODE") == "1"
    for key, value in ENVIRONMENT.items():
        if multinode and key == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":
            continue
        os.environ.setdefault(key, value)


def ensure_ray(address: str | None = None, num_cpus: float | None = None, **init_kwargs: Any) -> Any:
    """Connect to the cluster in `address`/RAY_ADDRESS, or start a private local Ray (no dashboard).

    `auto` (Ray's word) joins the local cluster that `ray start` left running; without an address a running one is
    not joined (`ray.init()` would): the run gets its own instance, the same on every machine, with `num_cpus`.
    Returns the `ray` module. Safe to call twice, and from several threads at once (the flow's concurrent stages).
    """
    apply_environment()
    import ray

    with _RAY_INIT_LOCK:
        if not ray.is_initialized():
            _init_ray(ray, address, num_cpus, init_kwargs)
    return ray


_RAY_INIT_LOCK = threading.Lock()
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# A private instance without a dashboard: a driver that started it in a thread (the flow's concurrent stages run in
# Prefect's task threads) waited ~15 s at its exit (measured: 1 s when started on the main thread) for two flushes,
# its OpenTelemetry metrics (~10 s; no dashboard, nothing reads them) and its task events (~5 s; for the state API
# of an instance going away).
PRIVATE_RAY_ENVIRONMENT = {"RAY_enable_metrics_collection": "0", "RAY_task_events_shutdown_flush_timeout_ms": "1000"}
logger = logging.getLogger(__name__)


def _init_ray(ray: Any, address: str | None, num_cpus: float | None, init_kwargs: dict[str, Any]) -> None:
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, log_to_driver=init_kwargs.pop("log_to_driver", True), **init_kwargs)
        return
    running = _cluster_left_by_ray_start()
    if running:
        logger.info("`ray start` left the address of a local Ray cluster (%s) for ray.init() to join; this run "
                    "starts its own (RAY_ADDRESS=auto joins that one)", running)
    init_kwargs.setdefault("include_dashboard", False)
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    if not init_kwargs["include_dashboard"]:
        runtime_env.setdefault("worker_process_setup_hook", "pipelines.runtime.quiet_state_api_warnings")
        for name, value in PRIVATE_RAY_ENVIRONMENT.items():  # read by this driver and every process Ray starts
            os.environ.setdefault(name, value)  # a user's setting wins
    if PREEMPTION_WATCHER_ENV not in os.environ:
        # One node, which no cloud takes back: Ray Train's preemption watcher (an actor process per training run,
        # polling for node drains, that also logs an error line at its start) has nothing to watch.
        runtime_env["env_vars"] = {PREEMPTION_WATCHER_ENV: "0", **(runtime_env.get("env_vars") or {})}
    init_kwargs["runtime_env"] = runtime_env
    ray.init(address="local", num_cpus=num_cpus, **init_kwargs)  # "local": a new instance even beside a running one


def _cluster_left_by_ray_start() -> str | None:
    """The address `ray start --head` wrote for `ray.init()` to find (/tmp/ray/ray_current_cluster), or None."""
    try:
        from ray._private.utils import read_ray_address  # private: the file's place is Ray's to choose

        return read_ray_address() or None
    except (ImportError, OSError):
        return None


SHARED_FILESYSTEM_ENV = "BLIP_SHARED_FILESYSTEM"  # "1": local paths are mounted at the same place on every node


def unreachable_local_inputs(nodes: list[dict[str, Any]], urls: list[str]) -> str | None:
    """Why a multi-node Ray cluster cannot use `urls` (paths that may exist only on this machine), or None.

    `nodes` is `ray.nodes()`; `urls` are what the workers open (shards, model directories). A filesystem mounted at
    the same path on every node is declared with BLIP_SHARED_FILESYSTEM=1."""
    alive = [node for node in nodes if node.get("Alive")]
    local = [url for url in urls if "://" not in url or url.startswith(("file://", "local://"))]
    if len(alive) > 1 and local and os.environ.get(SHARED_FILESYSTEM_ENV) != "1":
        return (f"the Ray cluster has {len(alive)} nodes but the inputs are local paths ({local[0]}), which the other "
                f"nodes cannot read: use a registry on s3:// or gs://, or one on a filesystem mounted at the same path "
                f"on every node and set {SHARED_FILESYSTEM_ENV}=1")  # fmt: skip
    return None


def check_gpus_available(ray: Any, gpus_per_worker: float, setting: str) -> None:
    """Fail at once, naming `setting`, when work asks for GPUs that a private local Ray cannot have.

    Ray would otherwise wait forever for the resource ("no available node types can fulfil the request").
    On a cluster (`RAY_ADDRESS`) GPU nodes may still be added by the autoscaler, so there nothing is checked.
    """
    if gpus_per_worker <= 0 or os.environ.get("RAY_ADDRESS"):
        return
    available = float(ray.cluster_resources().get("GPU", 0))
    if available < gpus_per_worker:
        from pipelines.config import ConfigError  # here: the runtime module stays import-light

        raise ConfigError(f"'{setting}' asks for {gpus_per_worker:g} GPU per worker but this machine's Ray has "
                         f"{available:g}: use --set {setting}=0 to run on the CPU, or run on a GPU machine or "
                         "cluster (RAY_ADDRESS)")


def quiet_state_api_warnings() -> None:
    """Worker setup hook of a private local Ray (no dashboard, so no state API).

    Ray Train's placement-group cleaner asks the state API every second whether the train controller is alive and
    logs a warning each time it cannot (dozens per minute in every training log). Its job, removing a dead run's
    placement group, does not arise here: a private Ray ends with the process that started it.
    The state API finds its cluster by RAY_ADDRESS, else by looking for Ray processes on the machine: beside another
    instance (a `ray start` cluster, a second run) it finds two, and the cleaner's thread died printing "Found
    multiple active Ray instances". Workers are told their own cluster's address.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


MAX_PROCESSES_ENV = "BLIP_MAX_PROCESSES"  # caps the worker processes of the download and shard stages


def process_count(work_bytes: int, bytes_per_process: int, items: int) -> int:
    """Worker processes for `work_bytes` of input: one per CPU core, at most one per `bytes_per_process` (starting
    a process costs about a second, worth it only with that much work for it) and per item, at least one; at most
    BLIP_MAX_PROCESSES when set (fewer processes hold less memory at once)."""
    cores = os.cpu_count() or 1
    setting = os.environ.get(MAX_PROCESSES_ENV)
    if setting:
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"{MAX_PROCESSES_ENV}={setting!r}: expected a whole number of processes, at least 1")
        cores = min(cores, int(setting))
    return max(1, min(cores, 1 + work_bytes // bytes_per_process, items))


def map_in_processes(function: Callable[..., Any], jobs: Iterable[tuple[Any, ...]], workers: int) -> Iterator[Any]:
    """`function(*job)` for each job, in order, in `workers` spawned processes (in this one when `workers` is 1).
    `jobs` may be a generator: a job is built only when it is submitted.

    Spawned, not forked: the caller may hold Ray or Prefect threads, whose locks a fork would copy held.
    `function` must be importable (a module-level function) and its arguments picklable. At most two jobs per
    worker are submitted ahead (`Executor.map` would pickle every job's arguments at once).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from datasets_manifests.registry import in_order

    if workers <= 1:
        yield from (function(*job) for job in jobs)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            yield from in_order(lambda job: pool.submit(function, *job), jobs, 2 * workers)
        except BrokenProcessPool as error:
            code = dead_worker_exit(pool)
            raise WorkerProcessDied(f"a worker process running {function.__module__}.{function.__qualname__} "
                                    f"{exit_description(code)}{oom_hint(code, f'{MAX_PROCESSES_ENV}=N runs fewer')}; "
                                    "nothing was published: run the command again") from error


def process_temp_dir(prefix: str) -> Path:
    """A new local folder `<prefix><pid>-<random>` for this process's scratch files, after removing the folders
    of processes that are gone.

    A worker killed with SIGKILL (Ray restarting it, a test, the OOM killer) runs no `finally`; at base scale a
    checkpoint left in /tmp is ~2.7 GB a kill. The pid in the name lets the next process with the same prefix on
    this node remove it."""
    remove_orphaned_temp_dirs(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def remove_orphaned_temp_dirs(prefix: str, directory: str | None = None) -> int:
    """Remove the `<prefix><pid>-*` folders whose process no longer runs; returns how many were removed.

    Only folders named with a pid are touched, and a live process with that pid (even an unrelated one, or
    another user's) keeps its folder."""
    removed = 0
    for path in Path(directory or tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        except PermissionError:  # another user's live process
            continue
    return removed


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device, or over the disk quota


def disk_full(error: BaseException) -> OSError | None:
    """The disk-full (or over-quota) OSError an error is, or was raised from: a worker process's re-raised, a Ray
    task's (`RayTaskError.cause`), a Ray Train worker's (`WorkerGroupError.worker_failures`)."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        linked = [current.__cause__, current.__context__, getattr(current, "cause", None),
                  *(getattr(current, "worker_failures", None) or {}).values()]  # fmt: skip
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return None


class WorkerProcessDied(RuntimeError):
    """A worker process ended abruptly: killed (the kernel's out-of-memory killer sends SIGKILL), or a crash in
    native code. Reported in one line (pipelines.cli) rather than concurrent.futures' traceback, which names
    neither the stage nor the signal."""


def dead_worker_exit(pool: Any) -> int | None:
    """The exit code of the worker whose death broke `pool` (a ProcessPoolExecutor): negative for a signal."""
    from multiprocessing.connection import wait

    # The futures fail as soon as the executor sees a worker gone, maybe before that process is reaped: wait for
    # the ended ones (their sentinels are ready) to have an exit code. The executor's own thread reaps them too;
    # when it wins, this thread's waitpid gets nothing (ECHILD) and the code appears once that thread has stored
    # it: so the code is polled, not joined once (a join lost the race in ~1 run of 6). The executor terminates
    # the survivors (SIGTERM) once one has died: the dead one's code comes first.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    ended = wait([process.sentinel for process in processes], timeout=5) if processes else []
    deadline = time.monotonic() + 5
    for process in processes:
        while process.sentinel in ended and process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.01)
    codes = sorted((process.exitcode for process in processes if process.exitcode),
                   key=lambda code: code == -signal.SIGTERM)  # fmt: skip
    return codes[0] if codes else None


def oom_hint(code: int | None, remedy: str = "") -> str:
    """For a worker killed by SIGKILL, what most often sent it (and `remedy`); '' for any other end."""
    if code != -signal.SIGKILL:
        return ""
    return f" (the kernel's out-of-memory killer sends it: see `dmesg`{'; ' + remedy if remedy else ''})"


def exit_description(code: int | None) -> str:
    """'was killed by SIGKILL', 'exited with code 3', or 'ended abruptly' (unknown)."""
    if code is None:
        return "ended abruptly"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name if -code in signal.valid_signals() else -code}"
    return f"exited with code {code}"


# ---------------------------------------------------------------------------------------------- Ctrl-C


@contextlib.contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored while a worker process starts, which keeps it so: a terminal's Ctrl-C goes to every process of
    the group, and each worker printed its own KeyboardInterrupt traceback (often mid-import, interleaved); the
    process that started it stops it instead."""
    if threading.current_thread() is not threading.main_thread():  # only there can a handler be set
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def ctrl_c_of_a_library(interrupted: Callable[[], KeyboardInterrupt]) -> Iterator[None]:
    """Around a call into a library that sets its own Ctrl-C handler, ending the call in SystemExit, and leaves the
    handler set (img2dataset's download: `sys.exit(0)`, read as a success; Ray Train's `fit`: exit 1, saying
    nothing). In the main thread, where such a handler can be set, that exit becomes `interrupted()` (exit 130 and
    a line saying how to go on, `pipelines.cli`), and the handler set before is set again afterwards (a later
    Ctrl-C in the same process went through the library's)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        yield
    except SystemExit as stopped:
        if not in_main_thread:
            raise
        raise interrupted() from stopped
    finally:
        if previous is not None:  # None: not set from Python, nothing to set again
            signal.signal(signal.SIGINT, previous)
