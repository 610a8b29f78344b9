//! Parity of the text encoder, UNet and VAE with diffusers/transformers on the tiny fixture
//! models (goldens from `tests/fixtures/sd/generate.py`), and loading every file format.
#![cfg(not(target_family = "wasm"))]

use std::path::Path;

use burn::tensor::{DType, Device};
use sefi::block_on;
use sefi::config::SdConfig;
use sefi::sd::StableDiffusion;
use sefi::weights::open::Variant;
use sefi::weights::{Checkpoint, Family, Format};

/// f32 on the CPU: what the goldens are compared with.
const TOL_CPU: f32 = 1e-4;

mod common;
use common::{Goldens, check_parity, sd_fixture as fixture, values};

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

#[test]
fn tiny_sd1_matches_diffusers_on_the_cpu() {
    let device = Device::flex();
    let ckpt = open(&fixture("tiny-sd1"), Variant::Auto, None);
    assert_eq!((ckpt.family, ckpt.format), (Family::Sd1, Format::Diffusers));
    let sd = load(&ckpt, &device);
    check_parity("tiny-sd1", &sd, &device, TOL_CPU);

    // The tiled decode's parity means something: its seams differ from a whole decode's.
    let g = Goldens::open("sd/tiny-sd1/goldens.safetensors");
    let (whole, _) = values(sd.vae.decode(g.tensor("vae.tiled_latents", &device)));
    let (tiled, _) = g.f32("vae.tiled_decoded");
    let seams = whole
        .iter()
        .zip(&tiled)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        seams > 0.5,
        "tiles and a whole decode differ by {seams} only"
    );
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
                sefi::clip::ClipTokenizer::from_source(&c.tokenizer)
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
