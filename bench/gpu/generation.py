"""A whole DDIM generation by `sefi generate` on one device, beside diffusers' run of the same
request (the goldens of tests/fixtures/pipeline): the tiny SD 1 and SD 2 models, the same
prompts, the same starting latents, 10 steps with guidance 7.5, compared on the final latents.

    python3 bench/gpu/generation.py --sefi target/release/sefi --device cuda

Prints one line per model and exits with 1 when one is off by more than the tolerance (the
largest absolute difference over the largest reference value). Needs numpy and safetensors.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 1e-3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sefi", required=True, help="the sefi binary")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    with open(os.path.join(ROOT, "tests/fixtures/pipeline/pipeline.json")) as f:
        spec = json.load(f)
    inputs = spec["inputs"]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for family, model in spec["models"].items():
            name = os.path.basename(model["folder"])
            goldens = load_file(os.path.join(ROOT, "tests/fixtures/pipeline", f"{name}.safetensors"))
            init, final = os.path.join(tmp, f"{name}.init.safetensors"), os.path.join(tmp, f"{name}.final.safetensors")
            save_file({"latents": goldens["latents.init"]}, init)
            cmd = [
                args.sefi, "generate", "--model", os.path.join(ROOT, model["folder"]),
                "--prompt", inputs["prompt"], "--negative-prompt", inputs["negative_prompt"],
                "--steps", str(inputs["num_inference_steps"]), "--guidance", str(inputs["guidance_scale"]),
                "--scheduler", "ddim", "--width", str(inputs["width"]), "--height", str(inputs["height"]),
                "--device", args.device, "--latents", init, "--save-latents", final,
                "--out", os.path.join(tmp, f"{name}.png"),
            ]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                print(f"generation {name} ({family}) on {args.device}: sefi failed\n{run.stderr}")
                failed = True
                continue
            got, want = load_file(final)["latents"], goldens["final.ddim"]
            err = float(np.abs(got - want).max() / np.abs(want).max())
            ok = got.shape == want.shape and np.isfinite(got).all() and err <= TOLERANCE
            failed |= not ok
            print(f"generation {name} ({family}) on {args.device}: DDIM {inputs['num_inference_steps']} steps, "
                  f"final latents relative error {err:.1e} (tolerance {TOLERANCE:.0e}): {'ok' if ok else 'WRONG RESULTS'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
