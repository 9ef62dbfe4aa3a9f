# The two commands of the README:
#   make demo   sets everything up (idempotent) and runs the pipeline on the embedded demo corpus
#   make test   sets everything up (idempotent) and runs the unit + integration tests
# Everything the project needs is installed by these targets; CI starts on a clean machine.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The stamp depends on pyproject.toml and constraints.txt: editing the dependencies reinstalls, a second `make` does
# not. constraints.txt pins every package (`make lock` re-resolves them), so fresh clones install the same versions.
STAMP := $(VENV)/.installed
# Two pytest-xdist workers: on 2 cores one computes while the other waits on a subprocess, a server or a Ray start
# (tests/conftest.py says which tests go together). TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2
PYTEST_ARGS ?= -n $(TEST_WORKERS) --durations=15  # the slowest tests, to keep `make test` within its ~20 minutes
# Commands run with the venv first on PATH, like an activated venv (Ray jobs and Prefect workers spawn `python`).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install lock demo test unit integration bench clean-artifacts

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt third_party/no-dataclasses/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	@bash infra/install_system_deps.sh
	@touch $(STAMP)

# Newer packages, on purpose: re-resolve pyproject.toml's ranges in a scratch venv and pin the result.
lock:
	PYTHON=$(PYTHON) bash infra/lock_dependencies.sh

demo: install
	$(PY) -m pipelines.demo $(DEMO_ARGS)

test integration: export BLIP_REQUIRE_BROWSER = 1
test: install
	$(PY) -m pytest tests/unit tests/integration $(PYTEST_ARGS)

unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# Every CPU benchmark (bench_gpu.py runs on a GPU machine: benchmarks/gpu_session.sh); a failure does not stop the rest.
bench: install
	@failed=""; for script in benchmarks/bench_*.py; do \
	  case $$script in */bench_gpu.py) echo "== $$script: GPU only, skipped (benchmarks/gpu_session.sh)"; continue;; esac; \
	  echo "== $$script"; $(PY) $$script || failed="$$failed $$script"; \
	done; if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

clean-artifacts:
	rm -rf artifacts
