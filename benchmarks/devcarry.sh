#!/usr/bin/env bash
# What a device session carries (`carry: [".devcarry"]`, then `bash benchmarks/gpu_session.sh`), built here where
# pip works: the offline vocab.txt, and Ray for the lent GPU machines, which have neither Ray nor a package index:
#   bash benchmarks/devcarry.sh            # -> .devcarry/vocab.txt, .devcarry/ray/ (~32 MB, for Python 3.12)
# Ray's wheel (79 MB) is over the 64 MiB a device call may carry. Stripped of what a local Ray Train / Ray Data
# run never loads (Java jars, RLlib, Serve, LLM, the dashboard's web client) and xz-compressed it is ~25 MB.
# Beside it: the wheels of Ray's import-time needs that the device image lacks (its package list:
# ../.library/device/KINDS.md). gpu_session.sh unpacks both into /tmp/site when .devcarry/ray/ is there.
# PY_VERSION=3.11 DEST=DIR builds the same for this machine's Python (a rehearsal in a venv without Ray).
set -euo pipefail
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-.devcarry/ray}
RAY_VERSION=2.60.0  # pyproject.toml's pin
# Imported by `import ray, ray.train.torch, ray.data` and a local cluster's processes, absent from the device image.
MISSING=(jsonschema jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types
         typing-inspection colorful jsonpointer rfc3339-validator)
ABI=cp${PY_VERSION/./}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
download() {
  PIP_CONSTRAINT= python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$1" "${@:2}"
}
PYTHON=${PYTHON:-.venv/bin/python}  # the project's venv (`make install`): it has the offline vocab package
mkdir -p .devcarry
"$PYTHON" -c "import shutil; from blip_models.tokenizer import default_vocab_path as p; shutil.copy(p(), '.devcarry')"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/ray-min.tar.xz
download "$work" "ray==$RAY_VERSION"
download "$DEST" "${MISSING[@]}"
mkdir "$work/site"
unzip -q "$work"/ray-*.whl -d "$work/site"  # unzip keeps the executable bits of gcs_server and raylet
rm -rf "$work"/site/ray/{jars,rllib,serve,llm} "$work"/site/ray/dashboard/client
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -6 -T0 >"$DEST/ray-min.tar.xz"
du -sh "$DEST"
ls "$DEST"
