//! Parity of the text encoder, UNet and VAE with diffusers/transformers on the tiny fixture
//! models (goldens from `tests/fixtures/sd/generate.py`), and loading every file format.
#![cfg(not(target_family = "wasm"))]

use std::path::Path;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use sefi::block_on;
use sefi::config::SdConfig;
use sefi::sd::StableDiffusion;
use sefi::unet::{AttentionCapture, Context};
use sefi::weights::open::Variant;
use sefi::weights::{Checkpoint, Family, Format};

/// f32 on the CPU: what the goldens are compared with.
const TOL_CPU: f32 = 1e-4;

mod common;
use common::{Goldens, assert_close, sd_fixture as fixture};

fn open(path: &Path, variant: Variant, config: Option<SdConfig>) -> Checkpoint {
    block_on(Checkpoint::open_path(path, variant, config))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(ckpt: &Checkpoint, device: &Device) -> StableDiffusion {
    load_in(ckpt, device, DType::F32)
}

fn load_in(ckpt: &Checkpoint, device: &Device, dtype: DType) -> StableDiffusion {
    let sd = block_on(StableDiffusion::load(ckpt, device, dtype, &mut |_| {})).unwrap();
    assert_eq!(
        [sd.text_encoder.dtype(), sd.unet.dtype(), sd.vae.dtype()],
        [dtype; 3]
    );
    sd
}

/// Every golden of one tiny model against the loaded model.
fn check_parity(model: &str, sd: &StableDiffusion, device: &Device, tol: f32) {
    let g = Goldens::open(&format!("sd/{model}/goldens.safetensors"));
    let what = |s: &str| format!("{model} {s}");

    // Text encoder, from ids and from spliced embeddings.
    let ids = g.ids("text.input_ids", device);
    let out = sd.text_encoder.forward(ids.clone());
    assert_close(
        out.last_hidden_state,
        g.f32("text.last_hidden_state"),
        tol,
        &what("text last_hidden_state"),
    );
    assert_close(
        out.penultimate,
        g.f32("text.penultimate"),
        tol,
        &what("text penultimate"),
    );
    assert_close(out.pooled, g.f32("text.pooled"), tol, &what("text pooled"));
    let mut embeds = sd.text_encoder.embed_tokens(ids.clone());
    let d = embeds.dims()[2];
    let vector: Tensor<1> = g.tensor("text.from_embeds.vector", device);
    embeds = embeds.slice_assign([0..1, 4..5, 0..d], vector.reshape([1, 1, d]));
    let eos = ids.argmax(1).reshape([2]);
    let spliced = sd.text_encoder.forward_embeds(embeds, eos);
    assert_close(
        spliced.last_hidden_state,
        g.f32("text.from_embeds.last_hidden_state"),
        tol,
        &what("text from embeds"),
    );

    // UNet at several timesteps, with split key/value contexts, and its attention maps.
    let sample: Tensor<4> = g.tensor("unet.sample", device);
    let context = Context::new(g.tensor("unet.context", device));
    let t: Tensor<1> = g.tensor("unet.timesteps", device);
    let out = sd.unet.forward(sample.clone(), t.clone(), &context, None);
    assert_close(out, g.f32("unet.out"), tol, &what("unet out (t=999,1)"));
    let t500: Tensor<1> = g.tensor("unet.timesteps_t500", device);
    assert_close(
        sd.unet.forward(sample.clone(), t500, &context, None),
        g.f32("unet.out_t500"),
        tol,
        &what("unet out (t=500,250)"),
    );
    let kv = Context::split(context.key.clone(), g.tensor("unet.value_context", device));
    assert_close(
        sd.unet.forward(sample.clone(), t.clone(), &kv, None),
        g.f32("unet.out_kv"),
        tol,
        &what("unet out, split K/V"),
    );
    let positions = Tensor::<1, Int>::from_data(TensorData::new(vec![2i64, 5], [2]), device);
    let mut capture = AttentionCapture::new(positions);
    let captured = sd.unet.forward(sample, t, &context, Some(&mut capture));
    assert_close(
        captured,
        g.f32("unet.out"),
        tol,
        &what("unet out while capturing"),
    );
    assert_eq!(capture.maps.len(), 16, "one map per cross-attention layer");
    for (i, map) in capture.maps.into_iter().enumerate() {
        assert_close(
            map,
            g.f32(&format!("attn.{i}")),
            tol,
            &what(&format!("attention probabilities {i}")),
        );
    }

    // VAE.
    let posterior = sd.vae.encode(g.tensor("vae.image", device));
    assert_close(
        posterior.mean,
        g.f32("vae.posterior_mean"),
        tol,
        &what("vae posterior mean"),
    );
    assert_close(
        posterior.logvar,
        g.f32("vae.posterior_logvar"),
        tol,
        &what("vae posterior logvar"),
    );
    assert_close(
        sd.vae.decode(g.tensor("vae.latents", device)),
        g.f32("vae.decoded"),
        tol,
        &what("vae decode"),
    );
}

#[test]
fn tiny_sd1_matches_diffusers_on_the_cpu() {
    let device = Device::flex();
    let ckpt = open(&fixture("tiny-sd1"), Variant::Auto, None);
    assert_eq!((ckpt.family, ckpt.format), (Family::Sd1, Format::Diffusers));
    check_parity("tiny-sd1", &load(&ckpt, &device), &device, TOL_CPU);
}

#[test]
fn tiny_sd2_matches_diffusers_on_the_cpu() {
    let device = Device::flex();
    let ckpt = open(&fixture("tiny-sd2"), Variant::Auto, None);
    assert_eq!(
        (ckpt.family, ckpt.format),
        (Family::Sd2V, Format::Diffusers)
    );
    check_parity("tiny-sd2", &load(&ckpt, &device), &device, TOL_CPU);
}

#[test]
fn fp16_variant_and_single_files_give_the_same_outputs() {
    let device = Device::flex();
    for model in ["tiny-sd1", "tiny-sd2"] {
        let folder = open(&fixture(model), Variant::Auto, None);
        let mut variants = vec![(
            format!("{model}.safetensors"),
            open(
                &fixture(&format!("{model}.safetensors")),
                Variant::Auto,
                Some(folder.config.clone()),
            ),
        )];
        if model == "tiny-sd1" {
            variants.push((
                "fp16 variant".into(),
                open(&fixture(model), Variant::Fp16, None),
            ));
        }
        for (name, ckpt) in variants {
            assert_eq!(ckpt.family.base(), folder.family.base(), "{name}");
            check_parity(model, &load(&ckpt, &device), &device, TOL_CPU);
        }
    }
}

/// The diffusers folders as the published SD 1.5 and SD 2.1 repositories hold them (written
/// by `tests/fixtures/sd/published.py`): the tensor names, buffers, configs and tokenizer files
/// of 2022-2023, and the same weights, so the goldens of today's layout apply unchanged.
#[test]
fn published_layouts_give_the_same_outputs() {
    let device = Device::flex();
    for (published, model, variants) in [
        (
            "tiny-sd1-2022",
            "tiny-sd1",
            &[Variant::Auto, Variant::Fp16][..],
        ),
        ("tiny-sd2-2022", "tiny-sd2", &[Variant::Auto][..]),
    ] {
        let today = open(&fixture(model), Variant::Auto, None);
        for &variant in variants {
            let ckpt = open(&fixture(published), variant, None);
            let what = format!("{published} ({variant:?})");
            assert_eq!(ckpt.family, today.family, "{what}");
            assert_eq!(ckpt.format, Format::Diffusers, "{what}");
            assert_eq!(
                ckpt.config, today.config,
                "{what}: configs of old diffusers read alike"
            );
            // The scheduler of that time, with diffusers' defaults for what it lacks.
            let s = &ckpt.scheduler;
            assert_eq!(
                (
                    s.prediction_type,
                    s.steps_offset,
                    s.timestep_spacing,
                    s.set_alpha_to_one
                ),
                (ckpt.config.prediction, 1, None, Some(false)),
                "{what}"
            );
            // The tokenizer files of that time name the same pad token as today's.
            let ids = |c: &Checkpoint| {
                sefi::sd::tokenizer(&c.tokenizer)
                    .unwrap()
                    .tokenize("a photo of sks person")
            };
            assert_eq!(ids(&ckpt), ids(&today), "{what}: tokens");
            let renamed = ckpt.adaptations.iter().filter(|a| a.loaded_as.is_some());
            assert_eq!(renamed.count(), 16, "{what}: the VAE's old attention names");
            check_parity(model, &load(&ckpt, &device), &device, TOL_CPU);
        }
    }
}

/// Half-precision weights: activations in F16/BF16 (norms in F32), so errors scale with the
/// format's epsilon (F16 2^-11, BF16 2^-8) times the values' size (up to 8 here). Forward passes
/// do not cancel, so the errors hardly depend on where the kernels round: the largest measured,
/// on an AVX-512 host and on an emulated AVX2-only one (`scripts/test.sh` runs this test on
/// both), are F16 7.5e-3 and 8.8e-3, BF16 6.6e-2 on both (BF16 products go through F32 kernels).
const TOL_F16: f32 = 2e-2;
const TOL_BF16: f32 = 1e-1;
/// burn's wgpu kernels also accumulate F16 products in F16 (the CPU backend and cuBLAS in
/// F32): about four times the CPU's F16 error.
const TOL_F16_WGPU: f32 = 8e-2;

#[test]
fn half_precision_weights_stay_close_to_diffusers_on_the_cpu() {
    let device = Device::flex();
    for model in ["tiny-sd1", "tiny-sd2"] {
        let ckpt = open(&fixture(model), Variant::Auto, None);
        for (dtype, tol) in [(DType::F16, TOL_F16), (DType::BF16, TOL_BF16)] {
            eprintln!("{model} in {dtype:?}");
            check_parity(model, &load_in(&ckpt, &device, dtype), &device, tol);
        }
    }
}

/// Software Vulkan (lavapipe) or a real GPU, in f32.
const TOL_WGPU: f32 = 1e-3;

#[test]
fn tiny_models_match_diffusers_on_wgpu() {
    let gpu = block_on(sefi::device::DeviceChoice::Wgpu.open()).expect(
        "no wgpu adapter: install Mesa's Vulkan driver (`apt-get install mesa-vulkan-drivers libvulkan1`) or run ./scripts/setup.sh test",
    );
    for (model, single) in [("tiny-sd1", false), ("tiny-sd2", true)] {
        let folder = open(&fixture(model), Variant::Auto, None);
        let ckpt = if single {
            open(
                &fixture(&format!("{model}.safetensors")),
                Variant::Auto,
                Some(folder.config.clone()),
            )
        } else {
            folder
        };
        check_parity(model, &load(&ckpt, &gpu.device), &gpu.device, TOL_WGPU);
        if gpu.info.f16 {
            eprintln!("{model} in F16");
            let sd = load_in(&ckpt, &gpu.device, DType::F16);
            check_parity(model, &sd, &gpu.device, TOL_F16_WGPU);
        }
    }
}
