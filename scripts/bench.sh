#!/usr/bin/env bash
# SeFi Studio beside PyTorch on this machine: runs `sefi bench` (release build) and
# bench/pytorch_bench.py (diffusers) with the same arguments, then prints the comparison table.
#
#   scripts/bench.sh --config tiny
#   scripts/bench.sh --config mid --resolution 256 --only unet,train --reps 3
#
# Arguments go to both (see `sefi bench --help`); defaults: --device cpu --dtype f32. The
# JSON lines are kept in $BENCH_OUT (default bench/results). The Python packages come from
# tests/fixtures/requirements.txt, installed once into $SEFI_VENV (default ~/.cache/sefi/venv).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sefi/target}
venv=${SEFI_VENV:-$HOME/.cache/sefi/venv}
out=${BENCH_OUT:-bench/results}
args=("$@")
[[ " $* " == *" --device "* ]] || args+=(--device cpu)
[[ " $* " == *" --dtype "* ]] || args+=(--dtype f32)

SEFI_VENV=$venv scripts/setup.sh python >&2
cargo build --release --bin sefi >&2

# A name for the result files from the arguments that decide the work.
name=$(printf '%s' "${args[*]}" | tr -s ' -' '_' | tr -cd 'A-Za-z0-9_.' | sed 's/^_//')
mkdir -p "$out"
"$CARGO_TARGET_DIR/release/sefi" bench "${args[@]}" | tee "$out/$name.sefi.jsonl"
"$venv/bin/python" bench/pytorch_bench.py "${args[@]}" | tee "$out/$name.pytorch.jsonl"
echo
"$venv/bin/python" bench/compare.py "$out/$name.sefi.jsonl" "$out/$name.pytorch.jsonl" | tee "$out/$name.md"
