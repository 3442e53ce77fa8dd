#!/usr/bin/env bash
# GPU check (see bench/gpu_check.py): the reference grid on a random-weight Phi-2.
# On a CUDA machine:   bash bench/gpu_check.sh            -> bench/results/gpu_check.{md,csv}
# CPU smoke run:       bash bench/gpu_check.sh --tiny --steps 2 --out /tmp/gpu_check.md
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if [[ " $* " != *" --out "* ]]; then
    set -- "$@" --out bench/results/gpu_check.md
fi
exec "$PYTHON" bench/gpu_check.py "$@"
