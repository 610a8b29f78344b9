#!/usr/bin/env bash
# The whole test suite: native tests (CPU and wgpu on lavapipe), the cuda build, in-browser tests
# in headless Chromium with WebGPU, and end-to-end tests of the release site. Installs what it
# needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sefi/target}
# Mesa wants a private runtime directory; without one it warns on every start.
XDG_RUNTIME_DIR=$(mktemp -d)
export XDG_RUNTIME_DIR
chmod 700 "$XDG_RUNTIME_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work" "$XDG_RUNTIME_DIR"' EXIT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "native tests (cpu, wgpu on lavapipe)"
cargo test

step "the cuda feature: every target compiles; the CLI links and, without a driver, says what is missing"
cargo check --features cuda --all-targets
cargo test --features cuda --test device

step "the GPU script, packed and run on the CPU: pack, unpack, checks, parity, benchmark"
bench/gpu/pack.sh --dev
PYTHON="${SEFI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sefi/venv}/bin/python" \
  bench/gpu/run.sh --devices cpu,wgpu --config tiny --dtype f32 --reps 1 --out "$work/gpu"

step "in-browser tests (wasm, WebGPU in headless Chromium)"
CHROMEDRIVER=/usr/bin/chromedriver WASM_BINDGEN_TEST_TIMEOUT=300 \
  cargo test --release --target wasm32-unknown-unknown --no-default-features --features web,wgpu --test browser

step "end-to-end tests (trunk build --release, Chromium)"
trunk build --release --dist "$work/dist"
ls -l "$work/dist"
(cd tests/e2e && SEFI_DIST="$work/dist" npm test)
