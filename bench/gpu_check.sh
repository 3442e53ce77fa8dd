#!/usr/bin/env bash
# GPU check (see bench/gpu_check.py): the reference grid on a random-weight Phi-2, then the GPU-path checks
# (with two or more GPUs, the first configuration also sharded over two: training.gpus: 2).
#
# One shot on a fresh GPU machine with a CUDA torch already installed:
#   bash bench/gpu_check.sh --configs 4 --steps 6 --out /tmp/gpu_check.md     # a first pass, ~5 min on an H100
#   bash bench/gpu_check.sh --wheels /path/to/wheels ...                      # no registry: install from wheels
#   bash bench/gpu_check.sh                                                   # the whole grid -> bench/results/
# CPU smoke run:
#   bash bench/gpu_check.sh --tiny --steps 2 --out /tmp/gpu_check.md
#
# Installs only what the Python it runs with lacks (never torch: the machine's CUDA build stays), from
# --wheels DIR when given, else from the package registry where one is reachable (bench/with_stack.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

wheels=""
args=()
while (($#)); do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
if [[ " ${args[*]-} " != *" --out "* ]]; then
    args+=(--out bench/results/gpu_check.md)
fi

exec bash bench/with_stack.sh ${wheels:+--wheels "$wheels"} bench/gpu_check.py "${args[@]}"
