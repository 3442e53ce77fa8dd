#!/usr/bin/env bash
# Runs a bench script with the Python that holds a CUDA torch, after installing only the packages it lacks (never
# torch: the machine's CUDA build stays), from --wheels DIR when given, else from the package registry.
#
#   bash bench/with_stack.sh [--wheels DIR] bench/trainer_vs_loop.py --kit bench/kit --steps 16
#
# It runs from the repository's root: relative paths in the arguments are read from there. The installed torch is
# a constraint of the install, so a package that wants another torch fails to install instead of replacing it.
# bench/gpu_check.sh runs its check through it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

wheels=""
if [[ "${1-}" == "--wheels" ]]; then
    wheels="$2"
    shift 2
fi
if (($# == 0)); then
    echo "usage: bash bench/with_stack.sh [--wheels DIR] SCRIPT [ARGS...]" >&2
    exit 2
fi
name="$(basename "$1" .py)"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "$name: $PYTHON has no torch; install the CUDA build for this machine's driver first (docs/gpu.md, Installing for a GPU)" >&2
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
    echo "$name: installing ${missing[*]}" >&2
    keep_torch="$(mktemp)"
    trap 'rm -f "$keep_torch"' EXIT
    "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch"
    if [[ -n "$wheels" ]]; then
        "$PYTHON" -m pip install --constraint "$keep_torch" --no-index --find-links "$wheels" "${missing[@]}"
    else
        "$PYTHON" -m pip install --constraint "$keep_torch" "${missing[@]}"
    fi
    rm -f "$keep_torch"
fi
exec "$PYTHON" "$@"
