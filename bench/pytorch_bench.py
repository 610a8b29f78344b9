"""The work `sefi bench` measures, done with diffusers and transformers on PyTorch, printed in the
same JSON form (one object per line) so that `bench/compare.py` can put the two side by side.

    python bench/pytorch_bench.py --config tiny --device cpu > torch.jsonl

Configurations: tiny, mid, sd15, tiny-sdxl, sdxl, or a folder with diffusers' unet/, text_encoder/
and vae/ config.json files (SDXL when it also has text_encoder_2/). Random weights: speed does not
depend on their values.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import diffusers
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The SeFi loss as the reference fixtures compute it: one definition for tests and benchmarks.
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures", "sefi"))
from generate import (SdxlText, SefiProcessor, attn2_names, encode_embeds, make_tokenizer,  # noqa: E402
                      splice, tokenize)

# The fixture script pins one thread and deterministic kernels for byte-identical goldens; a
# benchmark runs as users do, on every core (as burn's CPU backend does).
torch.set_num_threads(os.cpu_count())
torch.use_deterministic_algorithms(False)

WORK = ["text", "unet", "vae", "train", "generate"]
CONFIGS = {
    "tiny": "tests/fixtures/sd/tiny-sd1",
    "sd15": "tests/fixtures/sd/configs/sd15",
    "tiny-sdxl": "tests/fixtures/sd/tiny-sdxl",
    "sdxl": "tests/fixtures/sd/configs/sdxl",
    "mid": "bench/configs/mid",
}
LAMBDA = 0.003
# The prompts `sefi bench` encodes for SDXL (SD 1.x/2.x: random ids of the same length).
TEXT_PROMPTS = ["a photo of the face of person", ""]
GENERATE_PROMPT = "a photo of an astronaut riding a horse"
# `sefi train`'s default template for the class word person, as `sefi bench` trains it.
TRAIN_CASE = {"template": "a photo of the face of <id>", "placeholders": ["<id>"], "class_words": ["person"]}


def config_dir(name):
    return os.path.join(ROOT, CONFIGS[name]) if name in CONFIGS else name


def peak_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def revision():
    if "SEFI_REVISION" in os.environ:
        return os.environ["SEFI_REVISION"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(device, warmup, reps, fn):
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    out = dict(median_s=times[len(times) // 2], min_s=times[0], max_s=times[-1], peak_rss_bytes=peak_rss())
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main():
    diffusers.utils.logging.set_verbosity_error()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--only", default=",".join(WORK))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    args = ap.parse_args()
    only = args.only.split(",")
    for w in only:
        if w not in WORK:
            sys.exit(f"unknown measurement `{w}`: use {', '.join(WORK)}")

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    cdir = config_dir(args.config)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(cdir, "unet")))
    text = CLIPTextModel(CLIPTextConfig.from_json_file(os.path.join(cdir, "text_encoder", "config.json")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(cdir, "vae")))
    models = [unet, text, vae]
    # SDXL: a second text encoder (bigG with its projection). As in `sefi bench` (random weights),
    # every model, the VAE included, is in --dtype.
    xl = None
    if os.path.isdir(os.path.join(cdir, "text_encoder_2")):
        text_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_json_file(os.path.join(cdir, "text_encoder_2", "config.json")))
        models.append(text_2)
        # The CLIP vocabulary sefi bundles; the second tokenizer pads with "!" (id 0).
        xl = SdxlText(text, text_2, make_tokenizer("sd1"), make_tokenizer("sdxl"))
    for m in models:
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    res = args.resolution or unet.config.sample_size * 8
    lat = res // 8
    if device.type == "cpu":
        name = f"CPU ({torch.get_num_threads()} threads)"
    else:
        name = torch.cuda.get_device_name(device)
    base = dict(implementation="pytorch", config=args.config, resolution=res, device=name,
                backend=f"torch {torch.__version__} {device.type}", dtype=args.dtype, revision=revision(),
                warmup=args.warmup, reps=args.reps, gradient_checkpointing=False)

    def record(bench, batch, t, **extra):
        print(json.dumps(dict(base, bench=bench, batch=batch, **t, **extra)), flush=True)

    sched_config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    vocab = text.config.vocab_size
    ids = torch.randint(0, vocab - 2, (2, 77), generator=torch.Generator().manual_seed(0)).to(device)
    ids[:, 0] = vocab - 2
    ids[:, 8:] = vocab - 1
    hidden = unet.config.cross_attention_dim
    if xl is not None:
        # SDXL's micro-conditioning: original size, crop top-left, target size (pixels).
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype)

        def tokens(prompts):
            return (torch.cat([tokenize(xl.tok, p) for p in prompts]).to(device),
                    torch.cat([tokenize(xl.tok2, p) for p in prompts]).to(device))

        def encode_xl(ids_l, ids_g):
            """As diffusers' SDXL encode_prompt: both encoders' penultimate states side by side,
            and bigG's projected pooled output."""
            out_l = text(ids_l, output_hidden_states=True)
            out_g = xl.te2(ids_g, output_hidden_states=True)
            return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], -1), out_g.text_embeds

    with torch.no_grad():
        if "text" in only:
            if xl is None:
                fn = lambda: text(ids)  # noqa: E731
            else:
                ids_l, ids_g = tokens(TEXT_PROMPTS)
                fn = lambda: encode_xl(ids_l, ids_g)  # noqa: E731
            record("text_encoder_forward", 2, measure(device, args.warmup, args.reps, fn))
        if "unet" in only:
            sample = torch.randn(2, unet.config.in_channels, lat, lat, device=device, dtype=dtype)
            ctx = torch.randn(2, 77, hidden, device=device, dtype=dtype)
            t = torch.tensor([500.0, 500.0], device=device)
            added = None
            if xl is not None:
                added = {"text_embeds": torch.randn(2, xl.te2.config.projection_dim, device=device, dtype=dtype),
                         "time_ids": time_ids.expand(2, 6)}
            record("unet_forward", 2, measure(device, args.warmup, args.reps,
                                              lambda: unet(sample, t, ctx, added_cond_kwargs=added)))
        if "vae" in only:
            z = torch.randn(1, vae.config.latent_channels, lat, lat, device=device, dtype=dtype)
            record("vae_decode", 1, measure(device, args.warmup, args.reps, lambda: vae.decode(z)))
        if "generate" in only:
            sched = EulerDiscreteScheduler(**sched_config)

            def generate_xl(ids_l, ids_g):
                # SDXL with an empty negative prompt (force_zeros_for_empty_prompt): the prompt
                # alone is encoded, and zeros are the negative half of the context and pooled
                # embedding.
                c, pooled = encode_xl(ids_l, ids_g)
                ctx = torch.cat([torch.zeros_like(c), c])
                added = {"text_embeds": torch.cat([torch.zeros_like(pooled), pooled]),
                         "time_ids": time_ids.expand(2, 6)}
                sched.set_timesteps(args.steps, device=device)
                x = torch.randn(1, unet.config.in_channels, lat, lat, device=device, dtype=dtype)
                x = x * sched.init_noise_sigma
                for t in sched.timesteps:
                    inp = sched.scale_model_input(torch.cat([x, x]), t)
                    uncond, cond = unet(inp, t, ctx, added_cond_kwargs=added).sample.chunk(2)
                    x = sched.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
                img = vae.decode(x / vae.config.scaling_factor).sample
                return (img / 2 + 0.5).clamp(0, 1).cpu()

            def generate():
                # What a pipeline call does: encode both prompts, denoise with guidance, decode.
                ctx = text(ids).last_hidden_state
                sched.set_timesteps(args.steps, device=device)
                x = torch.randn(1, unet.config.in_channels, lat, lat, device=device, dtype=dtype)
                x = x * sched.init_noise_sigma
                for t in sched.timesteps:
                    inp = sched.scale_model_input(torch.cat([x, x]), t)
                    cond, uncond = unet(inp, t, ctx).sample.chunk(2)
                    x = sched.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
                img = vae.decode(x / vae.config.scaling_factor).sample
                return (img / 2 + 0.5).clamp(0, 1).cpu()

            fn = generate
            if xl is not None:
                gen_ids = tokens([GENERATE_PROMPT])
                fn = lambda: generate_xl(*gen_ids)  # noqa: E731
            t = measure(device, min(args.warmup, 1), min(args.reps, 3), fn)
            record(f"generate_{args.steps}_steps", 1, t)

    if "train" in only:
        record("train_step", 1, train_step(args, unet, text, vae, ids, device, dtype, res, xl))


def train_step(args, unet, text, vae, ids, device, dtype, res, xl=None):
    """One SeFi step as `sefi train` takes it: key and value contexts from spliced embeddings,
    the reference context without gradient, the UNet with the face-wise attention loss on every
    cross-attention layer, backward to the two vectors, AdamW.

    SDXL (`xl`, the fixtures' SdxlText): the vectors are [CLIP-L | bigG] token-embedding rows,
    the contexts both encoders' penultimate states side by side, and the UNet also gets the
    value-spliced prompt's pooled embedding and the time ids (res, res, 0, 0, res, res)."""
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    alphas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - alphas, 0)
    with torch.no_grad():
        photo = torch.rand(1, 3, res, res, device=device, dtype=dtype) * 2 - 1
        z0 = vae.encode(photo).latent_dist.mean * vae.config.scaling_factor
    if xl is None:
        emb_table = text.text_model.embeddings.token_embedding
        positions = [5]
        row = emb_table.weight[ids[0, 5]].detach().float()
    else:
        _, xl_ids, positions = xl.prompt(TRAIN_CASE)
        xl_ids = {k: v.to(device) for k, v in xl_ids.items()}
        row = xl.class_rows(xl_ids, positions)[0].float()
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype)
    key = row.clone()[None].requires_grad_(True)
    value = row.clone()[None].requires_grad_(True)
    opt = torch.optim.AdamW([key, value], lr=5e-3)
    ids1 = ids[:1]
    names = attn2_names(unet)
    gen = torch.Generator().manual_seed(0)

    def encode():
        if xl is not None:
            enc = xl.encode(xl_ids, positions, key.to(dtype), value.to(dtype))
            return enc["c_k"], enc["c_v"], enc["c_r"], {"text_embeds": enc["pooled"], "time_ids": time_ids}
        emb = emb_table(ids1)
        c_k = encode_embeds(text, splice(emb, positions, key.to(dtype)))
        c_v = encode_embeds(text, splice(emb, positions, value.to(dtype)))
        with torch.no_grad():
            c_r = text(ids1).last_hidden_state
        return c_k, c_v, c_r, None

    def step():
        t = int(torch.randint(0, 1000, (1,), generator=gen))
        noise = torch.randn(z0.shape, generator=gen).to(device=device, dtype=dtype)
        c_k, c_v, c_r, added = encode()
        a = alphas_cumprod[t].item()
        z_t = a ** 0.5 * z0 + (1 - a) ** 0.5 * noise
        store = {n: [] for n in names}
        procs = {}
        for name in unet.attn_processors:
            mod = name[: -len(".processor")]
            procs[name] = SefiProcessor(c_k, c_v, c_r, positions, store[mod]) if mod.endswith("attn2") \
                else AttnProcessor2_0()
        unet.set_attn_processor(procs)
        out = unet(z_t, torch.tensor([float(t)], device=device), c_k, added_cond_kwargs=added).sample
        attn = torch.stack([store[n][0][0] for n in names]).float().mean()
        loss = ((noise.float() - out.float()) ** 2).mean() + LAMBDA * attn
        opt.zero_grad()
        loss.backward()
        opt.step()

    return measure(device, args.warmup, args.reps, step)


if __name__ == "__main__":
    main()
