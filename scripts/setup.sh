#!/usr/bin/env bash
# Installs what building and testing SeFi Studio needs on a Debian machine, skipping what is
# already there in the right version. Usage: scripts/setup.sh serve|test|cuda|python
# (`test` includes `cuda`, whose LLVM the test suite needs to compile the `cuda` feature, and
# `python`, the reference packages that derive test fixtures and that the GPU script's dry run
# and the benchmarks compare with).
set -euo pipefail

purpose=${1:-test}
TRUNK_VERSION=0.21.14
# Must equal the wasm-bindgen version in Cargo.lock, or trunk tries to download its own.
WASM_BINDGEN_VERSION=0.2.130

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# burn's CUDA runtime compiles its kernels with LLVM (cubecl-llvm). Its build dependency
# tracel-llvm-bundler downloads a prebuilt LLVM from outside the package registries unless one is
# installed where it looks (`<data dir>/tracel/<TRACEL_LLVM>` with a `.tracel-llvm-installed`
# file); PyPI's relocatable LLVM static SDK serves as that one. TRACEL_LLVM must follow the
# tracel-llvm-bundler version in Cargo.lock.
TRACEL_LLVM=tracel-llvm-23.1.0-4
LLVM_WHEELS=(mlc-llvm-static==23.1.1.post0 mlc-llvm-static-extra-targets==23.1.1.post0)

install_llvm() {
  local dest="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/$TRACEL_LLVM"
  # llvm-config --system-libs asks for zstd.
  apt_install libzstd-dev python3-venv
  [ -f "$dest/.tracel-llvm-installed" ] && return
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/sefi/llvm-venv"
  say "LLVM for the cuda feature: ${LLVM_WHEELS[*]} into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${LLVM_WHEELS[@]}"
  local prefix
  prefix=$("$venv/bin/python" -c 'import mlc_llvm_static, os; print(os.path.join(os.path.dirname(mlc_llvm_static.__file__), "static"))')
  "$prefix/bin/llvm-config" --targets-built | grep -qw NVPTX || { echo "the LLVM in $prefix lacks NVPTX" >&2; exit 1; }
  mkdir -p "$(dirname "$dest")"
  rm -rf "$dest"
  ln -s "$prefix" "$dest"
  touch "$dest/.tracel-llvm-installed"
}

# diffusers, transformers and PyTorch, pinned, in their own environment: the benchmarks' and the
# GPU script's reference side (the tests themselves read committed fixtures, never Python).
VENV=${SEFI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sefi/venv}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
install_python() {
  "$VENV/bin/python" -c 'import diffusers, transformers, torch, numpy, safetensors' 2>/dev/null && return
  apt_install python3-venv
  say "Python reference packages (tests/fixtures/requirements.txt) into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/tests/fixtures/requirements.txt"
}

# The test models' fp16 variants, single files and 2022 layouts are derived from the committed
# folders, and the tiny SDXL weights from their seeds (checked against weights.sha256), not
# committed (seconds; byte for byte the same files every time).
derive_fixtures() {
  say "test fixtures derived from the tiny models (tests/fixtures/sd/{generate,sdxl}.py --derived)"
  local log script
  log=$(mktemp)
  for script in generate.py sdxl.py; do
    if ! HF_HUB_OFFLINE=1 "$VENV/bin/python" "$ROOT/tests/fixtures/sd/$script" --derived >"$log" 2>&1; then
      cat "$log" >&2
      exit 1
    fi
  done
  rm -f "$log"
}

if [ "$purpose" = python ]; then
  install_python
  exit 0
fi

command -v cargo >/dev/null || { echo "cargo not found: install Rust 1.95 with rustup (https://rustup.rs)" >&2; exit 1; }

if [ "$purpose" = test ]; then
  # Mesa's lavapipe gives wgpu a Vulkan device without a GPU; Chromium drives the browser tests.
  # QEMU's user-mode emulator runs the half-precision tests on an emulated AVX2-only CPU.
  apt_install mesa-vulkan-drivers libvulkan1 chromium chromium-driver qemu-user
  command -v npm >/dev/null || apt_install nodejs npm
fi

if [ "$purpose" = test ]; then
  install_python
  derive_fixtures
fi

if [ "$purpose" = test ] || [ "$purpose" = cuda ]; then
  install_llvm
  [ "$purpose" = cuda ] && exit 0
fi

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $WASM_BINDGEN_VERSION" ]; then
  say "cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION"
  # Not --locked: its lock file pins crates that no longer build with current rustc.
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --force
fi

if [ "$(trunk --version 2>/dev/null)" != "trunk $TRUNK_VERSION" ]; then
  say "cargo install trunk $TRUNK_VERSION"
  cargo install trunk --locked --version "$TRUNK_VERSION" --force
fi

if [ "$purpose" = test ]; then
  say "npm ci (end-to-end test driver)"
  (cd "$(dirname "$0")/../tests/e2e" && npm ci --no-audit --no-fund --silent)
fi
