#!/usr/bin/env bash
# Runs SeFi Studio's CUDA build beside PyTorch on this NVIDIA machine and prints the table.
# Made by bench/cuda/pack.sh; needs the NVIDIA driver, python3 and PyTorch with CUDA, nothing
# from the internet. Arguments go to both benchmarks (defaults: --device cuda --dtype f16):
#
#   ./run.sh --config mid --resolution 512
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
args=("$@")
[[ " $* " == *" --device "* ]] || args+=(--device cuda)
[[ " $* " == *" --dtype "* ]] || args+=(--dtype f16)

if [[ " ${args[*]} " == *" --device cuda "* ]]; then
  "$python" -c "import torch; assert torch.cuda.is_available(), 'PyTorch sees no CUDA device'" || exit 1
fi
"$python" -c "import numpy" 2>/dev/null || { echo "numpy is missing: pack with WITH_NUMPY=1" >&2; exit 1; }
venv=$here/venv
if ! "$venv/bin/python" -c "import diffusers, transformers" 2>/dev/null; then
  # The system's PyTorch stays; only what it lacks comes from the packed wheels.
  "$python" -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q --no-index --find-links "$here/wheels" -r "$here/wheels/requirements.txt"
fi

export SEFI_REVISION=$(cat "$here/REVISION")
out=$here/results
mkdir -p "$out"
name=$(printf '%s' "${args[*]}" | tr -s ' -' '_' | tr -cd 'A-Za-z0-9_.' | sed 's/^_//')
cd "$here/repo"
"$here/bin/sefi" bench "${args[@]}" | tee "$out/$name.sefi.jsonl"
"$venv/bin/python" bench/pytorch_bench.py "${args[@]}" | tee "$out/$name.pytorch.jsonl"
echo
"$venv/bin/python" bench/compare.py "$out/$name.sefi.jsonl" "$out/$name.pytorch.jsonl" | tee "$out/$name.md"
