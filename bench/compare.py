"""Puts `sefi bench` and `bench/pytorch_bench.py` results side by side.

    python bench/compare.py sefi.jsonl torch.jsonl

Prints a Markdown table: per measurement, configuration and resolution, the median time of each
implementation, their ratio (SeFi / PyTorch: under 1 is faster) and the peak memory of each
(for SeFi with what its memory model, `src/app/memory.rs`, expected).
"""

import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def key(r):
    return (r["bench"], r["config"], r["resolution"], r["dtype"], r.get("gradient_checkpointing", False))


def build(r):
    """Which sefi build: plain, or with burn's fusion and autotune."""
    on = [f for f in ("fusion", "autotune") if r.get(f)]
    return " + ".join(on) if on else ""


def mem(r):
    """The device's figure where there is one (PyTorch's peak, sefi's allocator reserve), else
    the process's peak; for sefi also what its memory model expected."""
    b = r.get("peak_device_bytes") or r.get("pool_reserved_bytes") or r.get("peak_rss_bytes")
    text = "" if b is None else f"{b / 2**30:.2f} GiB"
    if r.get("memory_model_bytes"):
        text += f" (model {r['memory_model_bytes'] / 2**30:.2f})"
    return text


def fmt_s(s):
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ours = {(key(r), build(r)): r for r in load(sys.argv[1])}
    ref = {key(r): r for r in load(sys.argv[2])}
    rows = [k for k in ours if k[0] in ref]
    if not rows:
        sys.exit("no measurement appears in both files (same bench, config, resolution and dtype)")
    first = next(iter(ours.values()))
    print(f"SeFi {first['revision']} on {first['device']} ({first['backend']}) vs "
          f"{next(iter(ref.values()))['backend']}\n")
    print("| measurement | config | px | dtype | SeFi | PyTorch | ratio | SeFi memory | PyTorch memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in rows:
        a, b = ours[k], ref[k[0]]
        name = a["bench"] + (" (checkpointing)" if k[0][4] else "") + (f" ({k[1]})" if k[1] else "")
        if a.get("first_s") is not None:
            name += f", first call {fmt_s(a['first_s'])}"
        ratio = a["median_s"] / b["median_s"]
        print(f"| {name} | {a['config']} | {a['resolution']} | {a['dtype']} | {fmt_s(a['median_s'])} | "
              f"{fmt_s(b['median_s'])} | {ratio:.2f}x | {mem(a)} | {mem(b)} |")
    missing = sorted(set(k for k, _ in ours) ^ set(ref))
    for k in missing:
        print(f"\n(only in {'SeFi' if k in ours else 'PyTorch'}: {k[0]} {k[1]} {k[2]} px {k[3]})", file=sys.stderr)


if __name__ == "__main__":
    main()
