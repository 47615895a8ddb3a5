#!/usr/bin/env bash
# One-shot GPU check (about 5-8 minutes on an H100): predicted vs measured peak, autofit vs
# Lightning's BatchSizeFinder, emulated 40 GB / 16 GB targets, and the GPU tests.
# Tables go to $OUT if set, else ./gpu_check_out/. Optional wheels (optuna and its needs) in
# ./.whl are installed to /tmp/site first when the machine cannot reach a package index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"; export OUT; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import optuna" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
python3 scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
