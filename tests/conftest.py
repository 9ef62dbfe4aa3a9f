"""Session-wide test setup.

The environment is fixed before anything imports prefect or ray: an isolated PREFECT_HOME (cache records
live there, so a shared home would leak caches between runs), loopback-only Ray, no telemetry.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="blip-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # after the session's server stopped
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("BLIP_REGISTRY", None)
# Checkpoint downloads, conversions and remembered digests go to a scratch cache, never the user's torch hub dir.
os.environ["BLIP_CHECKPOINT_CACHE"] = tempfile.mkdtemp(prefix="blip-test-checkpoints-")
atexit.register(shutil.rmtree, os.environ["BLIP_CHECKPOINT_CACHE"], ignore_errors=True)
# A remote registry's work on this machine ($BLIP_WORK_DIR, default <tmp>/blip-work, and its -locks beside) goes
# to a scratch folder too: tests on memory:// registries would otherwise leave their work in the real one.
_machine_work = Path(tempfile.mkdtemp(prefix="blip-test-machine-"))
os.environ["BLIP_WORK_DIR"] = str(_machine_work / "blip-work")
atexit.register(shutil.rmtree, _machine_work, ignore_errors=True)

from pipelines.runtime import apply_environment  # noqa: E402

apply_environment()

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def test_output_dir() -> Path:
    """Where tests leave files worth looking at (screenshots, reports)."""
    path = ROOT / "test-output"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (2 CPUs, no dashboard)."""
    from pipelines.runtime import ensure_ray

    ray = ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def stages_without_prefect(monkeypatch):
    """`pipelines.flows.stages.run_stage` with Prefect's calls stubbed out, for tests of a flow's wiring (what it
    runs and passes on), not of Prefect: returns the log lines, artifacts and asset metadata it recorded."""
    from pipelines.flows import stages

    logged, artifacts, metadata = [], [], {}

    class Logger:
        def info(self, message: str, *args) -> None:
            logged.append(message % args)

    monkeypatch.setattr(stages, "get_run_logger", Logger)
    monkeypatch.setattr(stages, "create_table_artifact", lambda **kwargs: artifacts.append(kwargs))
    monkeypatch.setattr(stages, "add_asset_metadata", lambda key, data: metadata.update(data))
    class Task:  # the stage function, run where it is called; `submit` runs it at once too
        def __init__(self, function):
            self.function = function

        def __call__(self):
            return self.function()

        def submit(self):
            return Done(self.function)

    class Done:
        def __init__(self, function):
            try:
                self.value, self.error = function(), None
            except Exception as error:  # noqa: BLE001 - raised by result(), as a Prefect future does
                self.value, self.error = None, error

        def wait(self):
            pass

        def result(self):
            if self.error is not None:
                raise self.error
            return self.value

    monkeypatch.setattr(stages, "materialize", lambda *args, **kwargs: Task)
    return logged, artifacts, metadata


# --- `make test` runs on two pytest-xdist workers (`-n 2`): this is how the tests are shared between them ---------
# A test module is one unit of work (its tests share module fixtures and some read what an earlier one published);
# the flow registry's tests, in two modules, are one unit (a session fixture is built in each worker that asks for
# it: together, the bootstrap flow's two runs happen once).
# The longest unit goes first so that it is not the last one running: on 2 cores, while one worker waits on a
# subprocess or a Ray start, the other computes.
PIPELINE_REGISTRY_UNIT = "pipeline_registry"


def _work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: its module, or the flow registry's unit."""
    module = nodeid.split("::", 1)[0]
    if module.endswith("test_bootstrap_flow.py") or (module.endswith("test_browser_chromium.py")
                                                     and nodeid.endswith("[pipeline]")):
        return PIPELINE_REGISTRY_UNIT
    return module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the flow registry's unit, then integration modules, then unit tests
        items.sort(key=lambda item: (_work_unit(item.nodeid) != PIPELINE_REGISTRY_UNIT,
                                     "/integration/" not in item.nodeid))  # fmt: skip


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order above (by default: the units with most tests first)
    return ModuleScheduling(config, log)
