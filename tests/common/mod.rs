//! Helpers shared by the native integration tests: fixture paths, golden files, models.
#![allow(dead_code)] // each test crate uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use sefi::block_on;
use sefi::identity::Identity;
use sefi::pipeline::{self, Flow, GenerateRequest, Generated, GivenNoise, PipelineError};
use sefi::schedule::SchedulerConfig;
use sefi::sd::StableDiffusion;
use sefi::unet::{AttentionCapture, Context};
use sefi::weights::open::Variant;
use sefi::weights::{Checkpoint, FileSource, SafetensorsFile};

/// A path under `tests/fixtures`. Panics with what to run when it is one of the derived files
/// (fp16 variants, single files, 2022 layouts) and has not been derived yet.
pub fn fixture(path: &str) -> PathBuf {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path);
    assert!(
        full.exists(),
        "{} is missing: the test fixtures derived from the tiny models are made by \
         `scripts/setup.sh test` (tests/fixtures/sd/generate.py --derived)",
        full.display()
    );
    full
}

/// A path under `tests/fixtures/sd` (the tiny models).
pub fn sd_fixture(name: &str) -> PathBuf {
    fixture("sd").join(name)
}

/// A tiny model from `tests/fixtures/sd`, loaded in f32.
pub fn load_model(model: &str, device: &Device) -> (Checkpoint, StableDiffusion) {
    load_model_in(model, device, DType::F32)
}

/// A fixture model with its weights in `dtype`.
pub fn load_model_in(model: &str, device: &Device, dtype: DType) -> (Checkpoint, StableDiffusion) {
    let ckpt = block_on(Checkpoint::open_path(
        &sd_fixture(model),
        Variant::Auto,
        None,
    ))
    .unwrap();
    let sd = block_on(StableDiffusion::load(&ckpt, device, dtype, &mut |_| {})).unwrap();
    (ckpt, sd)
}

/// A safetensors file of reference outputs.
pub struct Goldens(pub SafetensorsFile);

impl Goldens {
    /// `path` under `tests/fixtures`.
    pub fn open(path: &str) -> Self {
        let src = FileSource::open(&fixture(path)).unwrap();
        Self(block_on(SafetensorsFile::open(Box::new(src))).unwrap())
    }

    /// A float tensor's values (any float dtype) and shape.
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = block_on(self.0.read(name)).unwrap_or_else(|e| panic!("golden {name}: {e}"));
        (t.to_f32(), t.shape)
    }

    /// An int64 tensor's values.
    pub fn ints(&self, name: &str) -> Vec<i64> {
        let b = block_on(self.0.read_bytes(name)).unwrap();
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// A uint8 tensor's bytes.
    pub fn u8(&self, name: &str) -> Vec<u8> {
        block_on(self.0.read_bytes(name)).unwrap()
    }

    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let (v, shape) = self.f32(name);
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    /// Token ids (int64) as a tensor.
    pub fn ids(&self, name: &str, device: &Device) -> Tensor<2, Int> {
        let shape = self.0.info(name).unwrap().shape.clone();
        Tensor::from_data(TensorData::new(self.ints(name), shape), device)
    }
}

/// A tensor's values (as f32) and shape, read back asynchronously.
pub fn values<const D: usize>(t: Tensor<D>) -> (Vec<f32>, Vec<usize>) {
    let shape = t.dims().to_vec();
    let data = block_on(t.into_data_async()).unwrap();
    (data.convert::<f32>().try_to_vec::<f32>().unwrap(), shape)
}

/// Largest absolute difference from `expected` (values and shape); panics with `what` when
/// the shapes differ, a value is not finite, or the difference exceeds `tol`.
pub fn assert_close<const D: usize>(
    actual: Tensor<D>,
    expected: (Vec<f32>, Vec<usize>),
    tol: f32,
    what: &str,
) -> f32 {
    let (a, shape) = values(actual);
    assert_eq!(shape, expected.1, "{what}: shape");
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite values");
    let scale = expected.0.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(&expected.0)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= tol,
        "{what}: max abs error {err:e} > {tol:e} (values up to {scale})"
    );
    eprintln!("{what}: max abs error {err:e} (values up to {scale:.3})");
    err
}

/// A whole generation on `device` with the given identities and starting noise, never
/// cancelled.
pub fn generate(
    sd: &StableDiffusion,
    scheduler: &SchedulerConfig,
    req: &GenerateRequest,
    identities: &[Identity],
    given: &GivenNoise,
    device: &Device,
) -> Result<Generated, PipelineError> {
    block_on(pipeline::generate(
        sd,
        scheduler,
        req,
        identities,
        given,
        device,
        &mut |_| Flow::Continue,
    ))
}

/// Runs the `sefi` command line.
pub fn sefi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sefi"))
        .args(args)
        .output()
        .expect("run the sefi binary")
}

/// Runs `sefi` and panics with its error output unless it succeeds.
pub fn sefi_ok(args: &[&str]) -> Output {
    let o = sefi(args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Every golden of one tiny model against the loaded model.
pub fn check_parity(model: &str, sd: &StableDiffusion, device: &Device, tol: f32) {
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
    // Decoding in tiles as diffusers' `enable_tiling()` does on this VAE (tiles of 4 latent
    // positions, blended where they overlap).
    assert_close(
        sd.vae
            .decode_tiled(g.tensor("vae.tiled_latents", device), 4),
        g.f32("vae.tiled_decoded"),
        tol,
        &what("vae tiled decode"),
    );
}

/// The face models as the site serves them (`www/models/`).
pub fn face_models(device: &Device) -> sefi::face::score::FaceModels {
    let read = |name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("www/models")
                .join(name),
        )
        .unwrap()
    };
    let manifest = read("face_recognition_model-weights_manifest.json");
    sefi::face::score::FaceModels {
        detector: sefi::face::FaceDetector::from_safetensors(
            &read("face_detection_short_range.safetensors"),
            device,
        )
        .unwrap(),
        recognizer: sefi::face::FaceRecognizer::from_tfjs(
            std::str::from_utf8(&manifest).unwrap(),
            &read("face_recognition_model.bin"),
            device,
        )
        .unwrap(),
    }
}
