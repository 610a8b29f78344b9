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

# The CPU backend's float16 and bfloat16 kernels round differently on AVX2 and AVX-512 hosts
# (gemm and the element-wise kernels pick their code by CPU). On an AVX-512 host, the tests
# whose results depend on that run again on an emulated AVX2-only AMD EPYC (QEMU's EPYC-Milan),
# the kind of host where a bound set on one CPU was once exceeded. Features QEMU cannot emulate
# are turned off so that it does not warn about them.
if grep -qw avx512f /proc/cpuinfo; then
  step "half-precision tests again on an emulated AVX2-only CPU (qemu-x86_64 -cpu EPYC-Milan)"
  milan="EPYC-Milan,-pcid,-invpcid,-rdseed,-sha-ni,-rdpid,-fsrm,-fxsr-opt,-misalignsse,-3dnowprefetch"
  milan+=",-osvw,-topoext,-perfctr-core,-clzero,-xsaveerptr,-wbnoinvd,-ibpb,-ibrs,-amd-stibp,-amd-ssbd"
  milan+=",-nrip-save,-xsavec,-xsaves"
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="qemu-x86_64 -cpu $milan" \
    cargo test --test sefi_loss --test models half_precision
fi

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
