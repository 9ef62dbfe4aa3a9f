"""`blip run` (trigger a Prefect deployment by its short name and follow it) and `blip submit` (Ray job).

Prefect 3.8.8 wants `prefect deployment run <flow>/<deployment>`; the bare `bootstrap-129m` is rejected with
`Invalid deployment name format`. `blip run bootstrap-129m` adds the flow name, triggers the run on the
configured server (PREFECT_API_URL), follows it to the end and exits with its state (0 = Completed).

`blip submit` sends the whole flow (or any one `blip` command) to a Ray cluster as a Ray job with the
project as its working directory, streams the job's logs and exits with its status.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from pipelines.cli import CommandError

FLOW_NAME = "bootstrap"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never uploaded with a job: local outputs, environments and caches.
JOB_EXCLUDES = [".venv/", "artifacts/", "test-output/", ".prefect/", "**/__pycache__/", ".pytest_cache/", "*.tar"]


def register(subparsers: Any) -> None:
    run = subparsers.add_parser(
        "run",
        help="trigger a Prefect deployment by short name and follow it to the end",
        description="Trigger a deployment of the `bootstrap` flow on the Prefect server in PREFECT_API_URL "
        "(e.g. `blip run bootstrap-129m`, same as `prefect deployment run 'bootstrap/bootstrap-129m' --watch`) "
        "and follow the run. The exit code is the run's final state: 0 Completed, 1 Failed/Crashed/Cancelled.",
    )
    run.add_argument("deployment", help="deployment name: bootstrap-tiny | bootstrap-14m | bootstrap-129m (or flow/deployment)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="flow parameter (value parsed as JSON, else a string); repeatable")
    run.add_argument("--no-follow", action="store_true", help="trigger and return at once, printing the run id")
    run.add_argument("--timeout", type=float, default=None, help="stop following after this many seconds (exit 1)")
    run.set_defaults(func=cmd_run)

    submit = subparsers.add_parser(
        "submit",
        help="submit the flow (or one blip command) to a Ray cluster as a Ray job",
        description="Submit to the Ray job server at --address (default RAY_ADDRESS or http://127.0.0.1:8265). "
        "TARGET is a pipeline preset (tiny, 14m, 129m) or a pipeline config file: the job runs "
        "`blip flow run TARGET`. With --command, the job runs that blip command instead "
        "(e.g. --command 'blip shard raw-demo --name demo'). Logs are streamed; the exit code is the job status.",
    )
    submit.add_argument("target", nargs="?", help="pipeline preset or config file (omit with --command)")
    submit.add_argument("--address", default=None, help="Ray dashboard/job address, e.g. http://HEAD:8265")
    submit.add_argument("--command", default=None, help="a `blip ...` command line to run as the job")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to the flow; repeatable")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job env var")
    submit.add_argument("--no-wait", action="store_true", help="submit and return the job id at once")
    submit.set_defaults(func=cmd_submit)


# ----------------------------------------------------------------------------------------------- blip run


def deployment_full_name(name: str) -> str:
    return name if "/" in name else f"{FLOW_NAME}/{name}"


def parse_params(pairs: list[str]) -> dict[str, Any]:
    import json

    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise CommandError(f"parameter {pair!r} must look like KEY=VALUE")
        key, text = pair.split("=", 1)
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def cmd_run(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()  # the environment's, else the active Prefect profile's
    if not api_url:
        raise CommandError(
            "PREFECT_API_URL is not set: point it at your Prefect server, e.g. "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api, or `prefect config set PREFECT_API_URL=...` "
            "(see README, 'Prefect deployments')"
        )
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = deployment_full_name(args.deployment)
    try:
        flow_run = run_deployment(name=name, parameters=parse_params(args.param), timeout=0)
    except ObjectNotFound as error:
        raise CommandError(f"deployment {name!r} not found on {api_url} "
                           "(run `prefect --no-prompt deploy --all` from infra/ first)") from error
    print(f"started flow run {flow_run.name} ({flow_run.id}) of {name}", flush=True)
    if args.no_follow:
        return 0
    return follow_flow_run(flow_run.id, timeout=args.timeout)


def follow_flow_run(flow_run_id: Any, timeout: float | None = None, poll_seconds: float = 2.0) -> int:
    from prefect.client.orchestration import get_client

    started = time.monotonic()
    last_state = None
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            state = flow_run.state
            if state is not None and state.name != last_state:
                print(f"[{time.strftime('%H:%M:%S')}] {flow_run.name}: {state.name}", flush=True)
                last_state = state.name
            if state is not None and state.is_final():
                if not state.is_completed() and state.message:
                    print(f"{flow_run.name}: {state.message}", flush=True)  # why: the failed stage's error
                return 0 if state.is_completed() else 1
            if timeout is not None and time.monotonic() - started > timeout:
                print(f"still {last_state} after {timeout:.0f} s; the run goes on (flow run id {flow_run_id})")
                return 1
            time.sleep(poll_seconds)


# -------------------------------------------------------------------------------------------- blip submit


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def job_entrypoint(target: str | None, command: str | None, overrides: list[str]) -> str:
    if command:
        words = shlex.split(command)
        if words and words[0] == "blip":
            words = ["python", "-m", "pipelines.cli", *words[1:]]
        return shlex.join(words)
    if not target:
        raise CommandError("give a TARGET (preset or config file) or --command")
    words = ["python", "-m", "pipelines.cli", "flow", "run", target]
    for override in overrides:
        words += ["--set", override]
    return shlex.join(words)


def job_runtime_env(extra_env: list[str]) -> dict[str, Any]:
    from pipelines.runtime import ENVIRONMENT

    # The loopback switch is for single-machine Ray only; a cluster's nodes bring their own environment.
    env_vars = {k: v for k, v in ENVIRONMENT.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    if registry := os.environ.get("BLIP_REGISTRY"):  # this shell's (the job would use the uploaded folder's)
        env_vars["BLIP_REGISTRY"] = registry if "://" in registry else os.path.abspath(registry)  # not the job's cwd
    for pair in extra_env:
        key, equals, value = pair.partition("=")
        if not equals:
            raise CommandError(f"--env {pair!r} must look like KEY=VALUE")
        env_vars[key] = value
    # The project is uploaded as the job's working directory; `python -m pipelines.cli` imports it from there.
    return {"working_dir": str(PROJECT_ROOT), "excludes": JOB_EXCLUDES, "env_vars": env_vars}


def submit_with_retry(client: Any, entrypoint: str, runtime_env: dict[str, Any], wait_seconds: float = 120.0) -> str:
    """Submit; right after `ray start` the job agent may not be up yet ("No available agent"): wait for it."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise CommandError(f"Ray job submission failed: {error}") from error
            time.sleep(2.0)


def check_job_target(target: str | None, command: str | None, overrides: list[str]) -> None:
    """What the job would fail on, said here: a flow TARGET and its overrides are validated (a typo uploaded the
    project and failed on the cluster); a config file must be inside the project (the job runs in its uploaded
    copy); --command takes no TARGET or --set."""
    from pipelines.pipeline_config import load_pipeline

    if command:
        if target or overrides:
            raise CommandError("--command runs that command alone: give TARGET and --set without it, or put them in "
                               "the command")  # fmt: skip
        return
    if target is None:
        return
    path = Path(target).resolve()
    if path.is_file() and not path.is_relative_to(PROJECT_ROOT):
        raise CommandError(f"{target}: the job runs in the uploaded project ({PROJECT_ROOT}), where this file is "
                           "not: put the config under the project (configs/pipeline/) and name it from there")
    config = load_pipeline(target, overrides)  # ConfigError: one line, naming the key
    if config.registry is None and not os.environ.get("BLIP_REGISTRY"):
        print("blip submit: note: no registry is set (the config's `registry`, BLIP_REGISTRY): the job publishes "
              "into ./artifacts/registry of its uploaded copy of the project, on the cluster, gone with the job's "
              "folder; set BLIP_REGISTRY (s3://...) to keep its versions", file=sys.stderr)  # fmt: skip


def cmd_submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if not address.startswith("http"):
        address = f"http://{address}"
    check_job_target(args.target, args.command, args.overrides)
    entrypoint = job_entrypoint(args.target, args.command, args.overrides)
    try:
        # Ray's client takes RAY_ADDRESS over the address it is given: --address went to the local cluster.
        with _without_env("RAY_ADDRESS") if args.address else contextlib.nullcontext():
            client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as error:
        raise CommandError(f"cannot reach the Ray job server at {address}: {error}") from error
    job_id = submit_with_retry(client, entrypoint, job_runtime_env(args.env))
    print(f"submitted Ray job {job_id} to {address}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    final = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in final:
            print(f"Ray job {job_id}: {status.value}", flush=True)
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(1.0)
