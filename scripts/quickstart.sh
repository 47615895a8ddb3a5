#!/usr/bin/env bash
# Install autofit into ./.venv (CPU torch first) and tune the CPU quickstart config.
# Usage: bash scripts/quickstart.sh [extra autofit tune args, e.g. --force]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${AUTOFIT_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[plot]'
exec .venv/bin/autofit tune configs/quickstart_cpu.yaml --out tuned/quickstart "$@"
