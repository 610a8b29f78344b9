#!/usr/bin/env bash
# Packs, into .gpu/ (ignored by git), what bench/gpu/run.sh needs on a GPU machine that has the
# NVIDIA driver and Python with PyTorch but no Rust, no internet and no Vulkan loader:
#
#   .gpu/sefi.xz     the `sefi` binary with every backend (cuda, wgpu, cpu), stripped, xz'd
#   .gpu/sefi-fused.xz  the same with burn's fusion and autotune (release packs only)
#   .gpu/REVISION    the commit it was built from
#   .gpu/wheels/     diffusers and importlib_metadata for Python 3.12 (the machine has the rest)
#   .gpu/gl/         Debian's Vulkan/GL loader packages (libvulkan1, libglvnd, ...)
#
#   bench/gpu/pack.sh          # release build (what the numbers are measured with)
#   bench/gpu/pack.sh --dev    # the dev-profile build the test suite already made (dry runs)
#
# The device tool sends the whole working tree plus the carried .gpu/, 64 MiB at most; this
# prints both sizes and fails when they do not fit.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release dir=release
if [ "${1:-}" = --dev ]; then profile=dev dir=debug; fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sefi/target}
LIMIT=$((64 << 20))
WHEELS=(diffusers==0.39.0 importlib_metadata==10.2.0)
GL=(libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

scripts/setup.sh cuda
say "cargo build --profile $profile --features cuda --bin sefi"
cargo build --profile "$profile" --features cuda --bin sefi

rm -rf .gpu
mkdir -p .gpu/wheels .gpu/gl
say "strip and xz the binary"
strip -o .gpu/sefi "$CARGO_TARGET_DIR/$dir/sefi"
xz -9 -T0 .gpu/sefi
# The fused and autotuned build, measured beside the plain one (a second build of the crate
# and of burn's cubecl crates: the dry run skips it).
if [ "$profile" = release ]; then
  say "cargo build --profile $profile --features cuda,fusion,autotune --bin sefi"
  cargo build --profile "$profile" --features cuda,fusion,autotune --bin sefi
  strip -o .gpu/sefi-fused "$CARGO_TARGET_DIR/$dir/sefi"
  xz -9 -T0 .gpu/sefi-fused
fi
rev=$(git rev-parse --short=12 HEAD)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock || rev="$rev-modified"
echo "$rev" >.gpu/REVISION

say "wheels for Python 3.12: ${WHEELS[*]}"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d .gpu/wheels "${WHEELS[@]}"

say "Debian's Vulkan loader: ${GL[*]}"
apt_tmp=$(mktemp -d)
# Lists and caches in a temporary folder: nothing of the system's apt changes, and no root needed.
apt=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$apt_tmp/lists"
  "-oDir::Cache=$apt_tmp/cache" -oAPT::Sandbox::User=root)
mkdir -p "$apt_tmp/lists/partial" "$apt_tmp/cache/archives/partial"
apt-get "${apt[@]}" update -qq
(cd .gpu/gl && apt-get "${apt[@]}" download -qq "${GL[@]}")
rm -rf "$apt_tmp"

# What the device tool sends: tracked and untracked-but-not-ignored files (links as links).
tree=$(git ls-files -z --cached --others --exclude-standard |
  xargs -0 stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
packed=$(du -sb .gpu | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "working tree $(mib "$tree") + .gpu $(mib "$packed") = $(mib $((tree + packed))) of $(mib $LIMIT)"
du -ab .gpu | sort -n | tail -4 | while read -r b f; do echo "  $(mib "$b")  $f"; done
if [ $((tree + packed)) -gt $LIMIT ]; then
  # The dev build is several times larger; only the release pack has to fit.
  [ "$profile" = dev ] && { echo "(too large to travel: fine for a dry run here)"; exit 0; }
  echo "too large for the device tool: trim the working tree or the pack" >&2
  exit 1
fi
