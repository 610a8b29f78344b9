#!/usr/bin/env bash
# Packs the CUDA benchmark for an NVIDIA machine that has the driver and PyTorch but no Rust,
# no diffusers and no internet. Run here (a CPU machine with internet); copy the archive there:
#
#   bench/cuda/pack.sh                      # -> sefi-bench-cuda.tar.xz
#   scp sefi-bench-cuda.tar.xz gpu: && ssh gpu 'tar xf sefi-bench-cuda.tar.xz && sefi-bench-cuda/run.sh --config mid'
#
# The archive holds the `sefi` binary built with the `cuda` feature, the benchmark scripts with
# the configurations they read, and the wheels of diffusers and transformers with their
# dependencies for the GPU machine's Python (PYTHON_VERSION, default 3.12; numpy is expected
# there beside PyTorch, WITH_NUMPY=1 packs it too). SEFI_BINARY packs an already built binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
archive=${1:-$root/sefi-bench-cuda.tar.xz}
py=${PYTHON_VERSION:-3.12}
pip=${PIP:-pip3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sefi/target}

binary=${SEFI_BINARY:-}
if [ -z "$binary" ]; then
  echo "==> cargo build --release --features cli,cuda" >&2
  # burn's CUDA backend (cubecl-cuda) fetches a prebuilt LLVM in its build script: this step
  # needs the internet.
  cargo build --release --no-default-features --features cli,cuda --bin sefi >&2
  binary=$CARGO_TARGET_DIR/release/sefi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/sefi-bench-cuda
mkdir -p "$stage/bin" "$stage/wheels"
cp "$binary" "$stage/bin/sefi"
strip "$stage/bin/sefi" 2>/dev/null || true
git rev-parse --short=12 HEAD > "$stage/REVISION" 2>/dev/null || echo unknown > "$stage/REVISION"

# The scripts and configurations, in the repository's layout (the scripts find them by it).
for f in bench/pytorch_bench.py bench/compare.py bench/configs tests/fixtures/sefi/generate.py \
  tests/fixtures/sd/configs/sd15 tests/fixtures/sd/tiny-sd1/unet/config.json \
  tests/fixtures/sd/tiny-sd1/text_encoder/config.json tests/fixtures/sd/tiny-sd1/vae/config.json; do
  mkdir -p "$stage/repo/$(dirname "$f")"
  cp -r "$f" "$stage/repo/$f"
done
cp bench/cuda/run.sh "$stage/run.sh"

echo "==> wheels for Python $py" >&2
reqs=(diffusers==0.39.0 transformers==4.57.6 safetensors==0.8.0 huggingface_hub==0.36.2)
"$pip" download -q -d "$stage/wheels" --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${reqs[@]}" >&2
[ "${WITH_NUMPY:-0}" = 1 ] || rm -f "$stage"/wheels/numpy-*.whl
printf '%s\n' "${reqs[@]}" > "$stage/wheels/requirements.txt"

tar -C "$work" -cJf "$archive" sefi-bench-cuda
du -h "$archive"
