"""Prefect wrappers around the stage functions: one materialising task per stage run.

The registry is the source of truth for caching: every stage function returns the already-published version
when one exists for the same inputs + config (its cache key), and resumes inside its own work directory
after a crash. So these tasks use no Prefect result cache (a Prefect cache hit would not notice a deleted
version — orchestration pitfall 12), only retries with back-off for transient failures.

Each published version shows up in the Prefect UI as an Asset (one per version *name*, materialised once per
run, with the version, content id and counts as metadata; upstream assets give the lineage) and as a table
artifact with counts, drop reasons, the registry and the browser URL; the run log prints
`browse: blip data serve --registry R  ->  URL` for it. Asset events expire (7 days by default); the
registry's manifests do not.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE

from datasets_manifests.browser import browse_line, version_url
from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import Registry

# Retry these (network blips, a preempted Ray worker); never bad input (ConfigError, ValueError, ...).
TRANSIENT_ERROR_NAMES = {
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "TimeoutError", "BrokenPipeError",
    "RayActorError", "ActorDiedError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
    "RaySystemError", "GetTimeoutError", "OutOfMemoryError", "HTTPError", "URLError",
}
RETRY_DELAYS = [10, 60]


def is_transient(error: BaseException | None) -> bool:
    """Whether a stage's error may not happen again (retried). Of the names above, an HTTP error that is the
    server's answer about the request (404, 401, 403: a missing file, no access) and CUDA running out of memory
    (the same batch on the same GPU runs out again) are not: their retries only waited 70 s to fail the same way."""
    names = {cls.__name__ for cls in type(error).__mro__} if error is not None else set()
    if not names & TRANSIENT_ERROR_NAMES:
        return False
    if "OutOfMemoryError" in names and type(error).__module__.split(".")[0] == "torch":
        return False
    status = _http_status(error)
    return not ("HTTPError" in names and status is not None and 400 <= status < 500 and status not in (408, 429))


def _http_status(error: BaseException | None) -> int | None:
    """The status of an HTTP error: urllib's `code`, requests' (and huggingface_hub's) `response.status_code`."""
    for value in (getattr(error, "code", None), getattr(error, "status", None),
                  getattr(getattr(error, "response", None), "status_code", None)):  # fmt: skip
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _retry_only_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - the failed state re-raises the stage's exception
        return is_transient(error)
    return False


def asset_key(registry: Registry, kind: str, name: str) -> str:
    registry_id = hashlib.sha256(registry.url.encode()).hexdigest()[:8]
    return f"blip://registry-{registry_id}/{kind}/{name}"


def stage_table(manifest: Manifest, registry: Registry, seconds: float | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"field": "version", "value": manifest.ref}, {"field": "id", "value": manifest.short_id}]
    rows += [{"field": f"count.{key}", "value": value} for key, value in sorted(manifest.counts.items())]
    rows += [{"field": f"dropped.{key}", "value": value} for key, value in sorted(manifest.drop_reasons.items())]
    rows += [{"field": f"split.{key}", "value": value} for key, value in sorted(manifest.splits.items())]
    metrics = manifest.metadata.get("metrics") or manifest.stats.get("metrics") or {}
    rows += [{"field": f"metric.{key}", "value": value} for key, value in sorted(metrics.items())
             if isinstance(value, (int, float))]
    throughput = manifest.stats.get("throughput") or {}
    rows += [{"field": f"throughput.{key}", "value": value} for key, value in sorted(throughput.items())
             if isinstance(value, (int, float))]
    # The URL is only useful with the command that serves this registry, so the table carries both.
    rows.append({"field": "registry", "value": registry.url})
    rows.append({"field": "browse", "value": version_url(manifest)})
    return rows


def run_stage(
    label: str,
    stage_fn: Callable[..., Manifest],
    *args: Any,
    registry: Registry,
    output_kind: str,
    output_name: str,
    upstream: list[Manifest] = (),  # type: ignore[assignment]
    retries: int = 2,
    submit: bool = False,
    **kwargs: Any,
) -> Any:
    """Run one stage as a Prefect task materialising the asset of `output_name`: its version; with `submit`, a
    future of it (the stage runs in the flow's task runner beside others: `results`)."""
    key = asset_key(registry, output_kind, output_name)
    deps = [asset_key(registry, parent.kind, parent.name) for parent in upstream]

    def call() -> Manifest:
        import time

        started = time.monotonic()
        manifest = stage_fn(*args, registry=registry, **kwargs)
        seconds = time.monotonic() - started
        add_asset_metadata(key, {"version": manifest.version, "id": manifest.id, "counts": manifest.counts,
                                 "parents": list(manifest.parents), "registry": registry.url,
                                 "browse": version_url(manifest)})
        create_table_artifact(
            key=re.sub(r"[^a-z0-9-]+", "-", f"{output_kind}-{output_name}".lower()).strip("-"),
            table=stage_table(manifest, registry, seconds),
            description=f"{label}: {manifest.ref} ({seconds:.1f} s) - {browse_line(manifest, registry.url)}",
        )
        logger = get_run_logger()
        logger.info("%s -> %s (id %s) in %.1f s", label, manifest.ref, manifest.short_id, seconds)
        logger.info("%s", browse_line(manifest, registry.url))
        return manifest

    task = materialize(
        Asset(key=key, properties=AssetProperties(name=output_name, description=f"{output_kind} {output_name}")),
        asset_deps=deps, name=label, cache_policy=NO_CACHE, retries=retries, retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=_retry_only_transient,
    )(call)
    return task.submit() if submit else task()


def results(futures: list[Any]) -> list[Manifest]:
    """The versions of stages run with `submit`, once every one has ended (none is left running when one fails;
    then its error is raised)."""
    for future in futures:
        future.wait()
    return [future.result() for future in futures]
