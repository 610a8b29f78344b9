#!/usr/bin/env bash
# Kernel launches and kernel compilations per measurement of `sefi bench` on a cubecl device
# (wgpu or cuda), counted from cubecl's own logs: profiling at level "minimal" writes one
# "Executing <kernel>" line per launch without serialising the queue, compilation at "basic"
# one line per kernel compiled. Each measurement runs twice, with one and with two timed
# repetitions: the difference is one repetition's launches; the first run's compilations are
# the distinct kernels that one needs (tuning included).
#
#   bench/dispatches.sh [--sefi PATH] [--device wgpu] [--config tiny] [--resolution N]
#                       [--dtype f32] [--only unet,train,generate] [--steps 25]
#
# Prints a Markdown table. Needs a built `sefi` (default: $CARGO_TARGET_DIR/release/sefi).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
sefi=${CARGO_TARGET_DIR:-$HOME/.cache/sefi/target}/release/sefi
device=wgpu config=tiny resolution= dtype=f32 only=unet,train,generate steps=25
while [ $# -gt 0 ]; do
  case $1 in
    --sefi) sefi=$2 ;;
    --device) device=$2 ;;
    --config) config=$2 ;;
    --resolution) resolution=$2 ;;
    --dtype) dtype=$2 ;;
    --only) only=$2 ;;
    --steps) steps=$2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
[ -x "$sefi" ] || { echo "no sefi at $sefi: build it (cargo build --release) or pass --sefi" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# cubecl reads cubecl.toml from the working directory.
cat >"$work/cubecl.toml" <<'TOML'
[profiling.logger]
level = "minimal"
stdout = true

[compilation.logger]
level = "basic"
stdout = true
TOML
# sefi runs from $work: configuration names as `sefi bench` resolves them, made absolute.
case $config in
  tiny) config_path=$root/tests/fixtures/sd/tiny-sd1 ;;
  tiny-sdxl) config_path=$root/tests/fixtures/sd/tiny-sdxl ;;
  sd15 | sdxl) config_path=$root/tests/fixtures/sd/configs/$config ;;
  mid) config_path=$root/bench/configs/mid ;;
  *) config_path=$(cd "$config" && pwd) ;;
esac

run() { # measurement reps -> "launches compilations seconds"
  local log="$work/$1-$2.log" start end
  start=$(date +%s.%N)
  (cd "$work" && "$sefi" bench --device "$device" --config "$config_path" ${resolution:+--resolution "$resolution"} \
    --dtype "$dtype" --only "$1" --steps "$steps" --warmup 0 --reps "$2" >"$log" 2>&1) ||
    { echo "sefi bench failed:" >&2; tail -20 "$log" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$(grep -c '^Executing' "$log" || true) $(grep -ci 'compil' "$log" || true) $(echo "$end - $start" | bc)"
}

echo "| measurement | launches per run | kernels compiled (first run) | launches, first run (with set-up) | wall, 1 run / 2 runs |"
echo "|---|---|---|---|---|"
IFS=, read -ra work_items <<<"$only"
for m in "${work_items[@]}"; do
  read -r l1 c1 t1 <<<"$(run "$m" 1)"
  read -r l2 _ t2 <<<"$(run "$m" 2)"
  printf '| %s | %d | %d | %d | %.1f s / %.1f s |\n' "$m" $((l2 - l1)) "$c1" "$l1" "$t1" "$t2"
done
