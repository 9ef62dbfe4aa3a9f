#!/usr/bin/env bash
# Re-resolve every dependency to the newest versions pyproject.toml allows, in a scratch venv, and pin them all
# in constraints.txt (what `make install` and the Docker image install with). Run it (`make lock`) to take newer
# packages on purpose, then run `make test` and `make demo` and update the README's demo figures: the figures
# move with transformers, timm, numpy and the other packages the models and metrics use.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$python" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --upgrade pip
"$scratch/venv/bin/python" -m pip install -q -e '.[dev]'
{
  echo "# Every package \`make install\` puts in .venv, pinned: a fresh clone installs what the README's figures came"
  echo "# from. Written by \`make lock\` (infra/lock_dependencies.sh) on $(date -u +%Y-%m-%d) with $("$python" --version)."
  echo "# The project itself and the local dataclasses stand-in (third_party/no-dataclasses) are left out."
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^dataclasses @'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
