#!/usr/bin/env python3
"""Fits the memory model's constants (src/app/memory.rs, mod fitted) to the measured peaks in
peaks.csv and prints them with each peak's error. The features mirror memory.rs; a row whose
`use` is not `fit` is only checked.

    ~/.cache/sefi/venv/bin/python bench/memory/fit.py    # numpy: scripts/setup.sh python

Rows come from `sefi bench` (peak_rss_bytes on the CPU, pool_reserved_bytes on a GPU); after a
refit, copy the printed constants into memory.rs and run its tests.
"""
import csv
import json
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
GIB = 2.0**30
CONFIGS = {
    "sd15": "tests/fixtures/sd/configs/sd15",
    "sdxl": "tests/fixtures/sd/configs/sdxl",
    "mid": "bench/configs/mid",
}


def config(name):
    d = os.path.join(ROOT, CONFIGS[name])
    with open(os.path.join(d, "unet", "config.json")) as f:
        unet = json.load(f)
    with open(os.path.join(d, "vae", "config.json")) as f:
        vae = json.load(f)
    return unet, vae


def per_level(x, n):
    return x if isinstance(x, list) else [x] * n


def unet_elements(unet, scale, w, h, batch):
    """memory.rs's unet_elements: (activations, scores) of one pass, summed over layers."""
    channels = unet["block_out_channels"]
    n = len(channels)
    lpb = unet["layers_per_block"]
    heads = per_level(unet.get("num_attention_heads") or unet["attention_head_dim"], n)
    depth = per_level(unet.get("transformer_layers_per_block") or 1, n)
    act = scores = 0.0
    for level, c in enumerate(channels):
        tokens = ((w // scale) >> level) * ((h // scale) >> level)
        resnets = 2 * lpb + 1
        tf = depth[level] * (2 * lpb + 1) if "Attn" in unet["down_block_types"][level] else 0
        if level == n - 1:
            resnets += 2
            tf += depth[level]
        act += c * tokens * (resnets + 2.5 * tf)
        scores += heads[level] * tokens * tokens * tf
    return act * batch, scores * batch


def transformer_weights(unet, text_width):
    """memory.rs's transformer_weights: elements of the UNet's transformer layers' weights
    (self-attention 4 C^2, cross-attention 2 C^2 + 2 C x context, GEGLU feed-forward 12 C^2)."""
    channels = unet["block_out_channels"]
    n = len(channels)
    lpb = unet["layers_per_block"]
    depth = per_level(unet.get("transformer_layers_per_block") or 1, n)
    ctx = unet.get("cross_attention_dim") or text_width
    total = 0
    for level, c in enumerate(channels):
        layers = depth[level] * (2 * lpb + 1) if "Attn" in unet["down_block_types"][level] else 0
        if level == n - 1:
            layers += depth[level]
        total += layers * (18 * c * c + 2 * c * ctx)
    return total


def first_layer_scores(unet, scale, w, h, batch):
    n = len(unet["block_out_channels"])
    heads = per_level(unet.get("num_attention_heads") or unet["attention_head_dim"], n)
    level = next((i for i, t in enumerate(unet["down_block_types"]) if "Attn" in t), None)
    if level is None:
        return 0.0
    tokens = ((w // scale) >> level) * ((h // scale) >> level)
    return batch * heads[level] * tokens * tokens


MIN_DECODE_TILE = 8


def decode_elements(vae, scale, images, side, limit):
    """config.rs's decode_plan: the decoder's widest activation, in elements, for `images`
    square images of `side` pixels decoded whole, one at a time or in tiles under `limit`."""
    channels = max(vae["block_out_channels"][:2])
    size = lambda n, s: n * s * s * channels
    if limit is None or size(images, side) * 4 <= limit:
        return size(images, side)
    if size(1, side) * 4 <= limit:
        return size(1, side)
    tile = MIN_DECODE_TILE
    while tile < vae["sample_size"] // scale and size(1, (tile + 1) * scale) * 4 <= limit:
        tile += 1
    return size(1, tile * scale)


WEIGHT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def terms(row):
    """The model's terms for one row, in GiB: weights, and for the work's kind the
    coefficients of its constants and the fixed part (memory.rs's `need`)."""
    unet, vae = config(row["config"])
    scale = 1 << (len(vae["block_out_channels"]) - 1)
    wb = WEIGHT_BYTES[row["dtype"]]
    act = min(wb, 4) / 4.0
    side = int(row["resolution"])
    g = lambda e: e * 4.0 / GIB
    weights = int(row["params"]) * wb / GIB
    if row["work"] == "generate":
        images = int(row["images"])
        scores = g(first_layer_scores(unet, scale, side, side, 2 * images))
        limit = int(row["binding_limit_bytes"]) if row["binding_limit_bytes"] else None
        if limit:
            scores = min(scores, limit / GIB)
        widest = decode_elements(vae, scale, images, side, limit)
        return "generate", weights, {"BASE": act, "VAE": g(widest) * act}, scores
    acts, scores = unet_elements(unet, scale, side, side, 1)
    # Only the CPU backend's steps hold the weight copies (lavapipe's did not).
    copies = g(transformer_weights(unet, 768)) * act if row["backend"] == "cpu" else 0.0
    if row["checkpointing"] == "true":
        return "checkpointed", weights, {"UNET": g(acts) * act, "COPIES": copies}, 0.0
    return "train", weights, {"UNET": g(acts) * act, "COPIES": copies}, g(scores)


NAMES = {
    "generate": {"BASE": "GENERATE_BASE", "VAE": "GENERATE_VAE"},
    "checkpointed": {"UNET": "TRAIN_UNET_CHECKPOINTED", "COPIES": "TRAIN_CPU_WEIGHT_COPIES"},
    "train": {"UNET": "TRAIN_UNET", "COPIES": "TRAIN_CPU_WEIGHT_COPIES"},
}


def predict(kind, weights, coef, fixed, c):
    if kind == "generate":
        # Base, then the larger of the UNet's scores and the VAE's widest layer.
        return weights + c["BASE"] * coef["BASE"] + max(fixed, c["VAE"] * coef["VAE"])
    return weights + fixed + sum(c[k] * v for k, v in coef.items())


def fit(kind, rows, known):
    """Least squares on relative errors, with the constants in `known` fixed (the weight
    copies, fitted on the checkpointed runs where SDXL was measured, are shared). For
    generation the VAE term is fitted on the rows where it, not the UNet's scores, is the
    peak (decided again until it settles)."""
    keys = [k for k in NAMES[kind] if NAMES[kind][k] not in known]
    c = {k: 0.0 for k in keys}
    for _ in range(10):
        a, b = [], []
        for r in rows:
            _, weights, coef, fixed = r["_terms"]
            peak = r["_peak"]
            if kind == "generate" and fixed > c["VAE"] * coef["VAE"] and c["VAE"] > 0:
                a.append([coef["BASE"] / peak, 0.0])
                b.append((peak - weights - fixed) / peak)
            elif kind == "generate":
                a.append([coef["BASE"] / peak, coef["VAE"] / peak])
                b.append((peak - weights) / peak)
            else:
                a.append([coef[k] / peak for k in keys])
                fixed_known = sum(known[NAMES[kind][k]] * v for k, v in coef.items() if k not in keys)
                b.append((peak - weights - fixed - fixed_known) / peak)
        x, *_ = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)
        c = dict(zip(keys, x))
    return c


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "peaks.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["_terms"] = terms(r)
        r["_peak"] = int(r["peak_bytes"]) / GIB
    constants = {}
    for kind in NAMES:
        c = fit(kind, [r for r in rows if r["use"] == "fit" and r["_terms"][0] == kind], constants)
        for k, name in NAMES[kind].items():
            constants.setdefault(name, c.get(k))
    for name, value in constants.items():
        print(f"    pub const {name}: f64 = {value:.4f};")
    print()
    print(f"{'config':6} {'work':8} {'px':>5} {'dtype':5} {'ckpt':5} {'measured':>9} {'model':>9} {'error':>7}  use")
    for r in rows:
        kind, weights, coef, fixed = r["_terms"]
        c = {k: constants[name] for k, name in NAMES[kind].items()}
        model = predict(kind, weights, coef, fixed, c)
        err = model / r["_peak"] - 1
        print(f"{r['config']:6} {r['work']:8} {r['resolution']:>5} {r['dtype']:5} {r['checkpointing']:5} "
              f"{r['_peak']:8.2f}G {model:8.2f}G {err:+7.1%}  {r['use']} ({r['backend']})")


if __name__ == "__main__":
    main()
