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
# --wheels DIR when given, else from the package registry where one is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

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

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PYTHON has no torch; install the CUDA build for this machine's driver first (docs/gpu.md, Installing for a GPU)" >&2
    exit 2
fi
# import name -> requirement (pins from requirements.txt where it has them)
missing=()
while read -r module requirement; do
    "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$requirement")
done < <("$PYTHON" - <<'PY'
import re
pins = {}
for line in open("requirements.txt"):
    match = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
    if match:
        pins[match[1].lower()] = f"{match[1]}=={match[2]}"
needed = {"transformers": "transformers", "peft": "peft", "bitsandbytes": "bitsandbytes", "datasets": "datasets",
          "pandas": "pandas", "tabulate": "tabulate", "safetensors": "safetensors", "tokenizers": "tokenizers",
          "jsonschema": "jsonschema", "yaml": "pyyaml", "psutil": "psutil", "pynvml": "nvidia-ml-py",
          "scipy": "scipy"}
for module, name in needed.items():
    print(module, pins.get(name, name))
PY
)
if ((${#missing[@]})); then
    echo "gpu_check: installing ${missing[*]}" >&2
    if [[ -n "$wheels" ]]; then
        "$PYTHON" -m pip install --no-index --find-links "$wheels" "${missing[@]}"
    else
        "$PYTHON" -m pip install "${missing[@]}"
    fi
fi
exec "$PYTHON" bench/gpu_check.py "${args[@]}"
