#!/usr/bin/env bash
# SeFi Studio on a GPU machine, in one call: for each device, `sefi device` with its checks and
# the tiny models against diffusers' outputs, a whole DDIM generation against diffusers', and
# `sefi bench` beside diffusers + PyTorch doing the same work, with peak GPU memory; then the
# table. Runs from the repository root, after bench/gpu/pack.sh has filled .gpu/:
#
#   GPU machine (the device tool): carry [".gpu"], command "bench/gpu/run.sh", timeout_s 560
#   here, on the CPU (the dry run):  bench/gpu/run.sh --devices cpu --config tiny
#
# Options (defaults): --devices cuda,wgpu  --config sd15  --resolution 512 (the config's own
# size for tiny)  --dtype f16 (f32 on cpu; training is also measured in f32)  --reps 2
# --budget 480 (seconds: steps that would run past it are skipped, most important first)
# --out DIR ($OUT when set, else bench/results/gpu). It writes run.log, checks.txt,
# sefi.jsonl, pytorch.jsonl and results.md there, and exits 1 if a check failed.
set -uo pipefail
cd "$(dirname "$0")/../.."

devices=cuda,wgpu config=sd15 resolution= dtype= reps=2 budget=480 out=${OUT:-bench/results/gpu}
while [ $# -gt 0 ]; do
  case $1 in
    --devices) devices=$2 ;;
    --config) config=$2 ;;
    --resolution) resolution=$2 ;;
    --dtype) dtype=$2 ;;
    --reps) reps=$2 ;;
    --budget) budget=$2 ;;
    --out) out=$2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
[ -n "$resolution" ] || { [ "$config" = tiny ] && resolution=64 || resolution=512; }
[ -n "$dtype" ] || { [ "$devices" = cpu ] && dtype=f32 || dtype=f16; }
IFS=, read -ra devices <<<"$devices"

mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/{run.log,checks.txt,sefi.jsonl,pytorch.jsonl,results.md}
exec > >(tee -a "$out/run.log") 2>&1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
say() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS"; }
# Seconds a step may take: its own cap, or what is left of the budget.
allow() { local left=$((budget - SECONDS)); echo $((left < $1 ? left : $1)); }
# Runs a step under a time limit, or says it is skipped when the budget is spent.
within() {
  local cap; cap=$(allow "$1"); shift
  if [ "$cap" -lt 20 ]; then echo "skipped (the ${budget}s budget is spent): $*"; return 124; fi
  timeout --kill-after=5 "$cap" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "timed out after ${cap}s: $*"
  return $rc
}

say "unpacking .gpu/ (revision $(cat .gpu/REVISION 2>/dev/null || echo unknown))"
[ -f .gpu/sefi.xz ] || { echo ".gpu/sefi.xz is missing: run bench/gpu/pack.sh first" >&2; exit 2; }
sefi=$work/sefi
xz -dc .gpu/sefi.xz >"$sefi" && chmod +x "$sefi"
export SEFI_REVISION
SEFI_REVISION=$(cat .gpu/REVISION)

# Vulkan for wgpu: this machine's image has the NVIDIA driver but no Vulkan loader; the packed
# Debian packages bring it (unpacked to / as root, as the GPU machine's notes say).
if [[ " ${devices[*]} " == *" wgpu "* ]] && ! ldconfig -p | grep -q 'libvulkan.so.1'; then
  if [ "$(id -u)" = 0 ] && compgen -G '.gpu/gl/*.deb' >/dev/null; then
    for f in .gpu/gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
  else
    echo "no Vulkan loader here and none can be unpacked (needs root and .gpu/gl/): wgpu will fail"
  fi
fi
nvidia=/usr/local/nvidia/share
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f $nvidia/vulkan/icd.d/nvidia_icd.json ] &&
  ! compgen -G '/usr/share/vulkan/icd.d/nvidia*' >/dev/null && ! compgen -G '/etc/vulkan/icd.d/nvidia*' >/dev/null; then
  export VK_DRIVER_FILES=$nvidia/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=$nvidia/glvnd/egl_vendor.d/10_nvidia.json
fi

# Python: the machine's own (with PyTorch); what it lacks comes from the packed wheels.
python=${PYTHON:-python3}
if ! "$python" -c 'import diffusers' 2>/dev/null && compgen -G '.gpu/wheels/*.whl' >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" .gpu/wheels/*.whl &&
    export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
torch=yes
"$python" -c 'import torch, diffusers, transformers' 2>/dev/null || torch=
"$python" -c 'import numpy, safetensors' 2>/dev/null || { echo "$python lacks numpy or safetensors" >&2; exit 2; }

# Peak GPU memory of one command, sampled with nvidia-smi (the runtimes' own allocators differ;
# this sees them all): the peak used during the command minus what was used before it.
gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; }
measure() {
  local jsonl=$1; shift
  local before sampler=
  before=$(gpu_mem)
  if [ -n "$before" ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$work/mem" 2>/dev/null &
    sampler=$!
  fi
  within 150 "$@" >"$work/lines"
  local rc=$?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
  cat "$work/lines"
  local peak=
  [ -n "$before" ] && peak=$(sort -n "$work/mem" | tail -1)
  "$python" - "$work/lines" "$before" "$peak" >>"$jsonl" <<'EOF'
import json, sys
lines, before, peak = sys.argv[1], sys.argv[2], sys.argv[3]
for line in open(lines):
    if line.startswith("{"):
        r = json.loads(line)
        if peak and "peak_device_bytes" not in r:
            r["peak_device_bytes"] = (int(peak) - int(before)) * 2**20
            r["peak_device_source"] = "nvidia-smi"
        print(json.dumps(r))
EOF
  return $rc
}

# The tiny SDXL model's weights are derived from seeds (git ignores them): made here when
# missing, checked against their committed hashes.
xl=tests/fixtures/sd/tiny-sdxl
if [ ! -f $xl/unet/diffusion_pytorch_model.safetensors ] && [ -n "$torch" ]; then
  say "deriving the tiny SDXL model's weights (tests/fixtures/sd/sdxl.py --derived)"
  within 120 env HF_HUB_OFFLINE=1 "$python" tests/fixtures/sd/sdxl.py --derived >"$work/sdxl.log" 2>&1 ||
    { tail -5 "$work/sdxl.log"; echo "the tiny SDXL weights could not be derived: SDXL is not checked"; }
fi
references=(--reference tests/fixtures/sd/tiny-sd1 --reference tests/fixtures/sd/tiny-sd2)
[ -f $xl/unet/diffusion_pytorch_model.safetensors ] && references+=(--reference $xl)

check() {
  local d=$1
  say "$d: the device and its checks; the tiny models against diffusers' outputs"
  within 150 "$sefi" device --device "$d" "${references[@]}" | tee -a "$out/checks.txt" || failed=1
  say "$d: a whole generation against diffusers'"
  within 90 "$python" bench/gpu/generation.py --sefi "$sefi" --device "$d" | tee -a "$out/checks.txt" || failed=1
}

bench() {
  local d=$1
  say "$d: sefi bench --config $config --resolution $resolution"
  local args=(--device "$d" --config "$config" --resolution "$resolution" --reps "$reps" --warmup 1)
  measure "$out/sefi.jsonl" "$sefi" bench "${args[@]}" --only generate --dtype "$dtype"
  measure "$out/sefi.jsonl" "$sefi" bench "${args[@]}" --only train --dtype "$dtype"
  [ "$dtype" = f32 ] || measure "$out/sefi.jsonl" "$sefi" bench "${args[@]}" --only train --dtype f32
}

bench_pytorch() {
  local d=cpu
  [[ " ${devices[*]} " == *" cpu "* ]] || d=cuda
  if [ -z "$torch" ]; then
    echo "PyTorch, diffusers or transformers missing for $python: the PyTorch side is skipped" | tee -a "$out/checks.txt"
    return
  fi
  say "PyTorch + diffusers ($d): the same work"
  local args=(--device "$d" --config "$config" --resolution "$resolution" --reps "$reps" --warmup 1)
  measure "$out/pytorch.jsonl" "$python" bench/pytorch_bench.py "${args[@]}" --only generate --dtype "$dtype"
  measure "$out/pytorch.jsonl" "$python" bench/pytorch_bench.py "${args[@]}" --only train --dtype "$dtype"
  [ "$dtype" = f32 ] || measure "$out/pytorch.jsonl" "$python" bench/pytorch_bench.py "${args[@]}" --only train --dtype f32
}

# The same benchmark with burn's fusion and autotune (its first call, `first_s`, holds the
# tuning), and its parity: the build that decides whether they go on by default.
bench_fused() {
  local d=$1 fused=$work/sefi-fused
  [ -f .gpu/sefi-fused.xz ] || { echo "no .gpu/sefi-fused.xz (a --dev pack): the fused build is not measured"; return; }
  xz -dc .gpu/sefi-fused.xz >"$fused" && chmod +x "$fused"
  say "$d: the fused and autotuned build: checks and sefi bench"
  within 150 "$fused" device --device "$d" "${references[@]}" | sed 's/^/fused: /' | tee -a "$out/checks.txt" || failed=1
  local args=(--device "$d" --config "$config" --resolution "$resolution" --reps "$reps" --warmup 1)
  measure "$work/fused.jsonl" "$fused" bench "${args[@]}" --only generate --dtype "$dtype"
  measure "$work/fused.jsonl" "$fused" bench "${args[@]}" --only train --dtype "$dtype"
  if grep -q '"fusion": *false\|"autotune": *false' "$work/fused.jsonl"; then
    echo "the fused build runs without fusion or autotune" | tee -a "$out/checks.txt"
    failed=1
  fi
  cat "$work/fused.jsonl" >>"$out/sefi.jsonl"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
# Most important first: the first device whole, PyTorch beside it, the fused build, then the
# others.
check "${devices[0]}"
bench "${devices[0]}"
bench_pytorch
bench_fused "${devices[0]}"
for d in "${devices[@]:1}"; do
  check "$d"
  bench "$d"
done
# Full-size SDXL (random weights) at its 1024 px, when time is left: generation and training.
if [ "$config" != tiny ]; then
  say "${devices[0]}: sefi bench --config sdxl --resolution 1024"
  xl_args=(--device "${devices[0]}" --config sdxl --resolution 1024 --reps 1 --warmup 1 --dtype "$dtype")
  measure "$out/sefi.jsonl" "$sefi" bench "${xl_args[@]}" --only generate
  measure "$out/sefi.jsonl" "$sefi" bench "${xl_args[@]}" --only train
fi

say "results"
{
  echo "# $(date -u +%Y-%m-%d) revision $SEFI_REVISION: --config $config --resolution $resolution --dtype $dtype"
  echo
  echo '```'
  grep -E '^(backend|adapter|driver|autodiff|reference|generation|  |PyTorch)' "$out/checks.txt"
  echo '```'
  for d in "${devices[@]}"; do
    echo
    if [ -s "$out/pytorch.jsonl" ] && grep -q "\"backend\": \"$d\"" "$out/sefi.jsonl"; then
      grep "\"backend\": \"$d\"" "$out/sefi.jsonl" >"$work/$d.jsonl"
      "$python" bench/compare.py "$work/$d.jsonl" "$out/pytorch.jsonl"
    else
      echo "(no comparison for $d)"
    fi
  done
} >"$out/results.md"
cat "$out/results.md"
exit $failed
