//! `sefi bench`: the time and memory of the model's main pieces of work, one JSON object per
//! measurement on stdout, in the same form as `bench/pytorch_bench.py` prints for diffusers, so
//! that `bench/compare.py` can put them side by side. Random weights: speed does not depend on
//! their values.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use clap::Args;
use serde::Serialize;

use super::shared;
use crate::app::memory::{self, Target, Work};
use crate::config::{Prediction, SdConfig, TextConfig, UNetConfig, VaeConfig, from_json};
use crate::device::{DeviceChoice, Precision};
use crate::identity::train::{Photo, TrainConfig, Trainer};
use crate::nn::read_f32;
use crate::pipeline::{self, Flow, GenerateRequest, GivenNoise, RgbImage};
use crate::schedule::{Sampler, SchedulerConfig};
use crate::sd::StableDiffusion;
use crate::unet::{AddedCond, Context};
use crate::weights::Family;

/// The pieces of work, in the order they run.
const WORK: [&str; 5] = ["text", "unet", "vae", "train", "generate"];

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A model configuration: `tiny`, `mid` or `sd15` (looked up under the repository's
    /// `tests/fixtures/sd` and `bench/configs`), or a folder with diffusers' `unet/`,
    /// `text_encoder/` and `vae/` config.json files.
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// Image size in pixels (default: the configuration's native size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Which measurements, comma separated: text, unet, vae, train, generate.
    #[arg(long, value_delimiter = ',', default_values_t = WORK.map(String::from))]
    pub only: Vec<String>,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs of each measurement.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Denoising steps of the whole-generation measurement.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Train with burn's gradient checkpointing.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[arg(long, default_value = "auto", value_parser = shared::parse_device)]
    pub device: DeviceChoice,
    /// The weights' precision: auto, f32, f16 or bf16.
    #[arg(long = "dtype", default_value = "auto", value_parser = shared::parse_precision)]
    pub precision: Precision,
}

/// One measurement, as `bench/compare.py` reads it.
#[derive(Debug, Serialize)]
struct Record<'a> {
    implementation: &'static str,
    bench: &'a str,
    config: &'a str,
    resolution: usize,
    batch: usize,
    device: String,
    backend: String,
    dtype: String,
    revision: String,
    warmup: usize,
    reps: usize,
    median_s: f64,
    min_s: f64,
    max_s: f64,
    /// The first (warm-up) call alone: shader compilation, and tuning where autotune is on.
    first_s: Option<f64>,
    /// burn's kernel fusion and autotune in this build (the `fusion` and `autotune` features).
    fusion: bool,
    autotune: bool,
    /// The device allocator's reserved bytes after the measurement (its pools keep their
    /// high-water pages): `None` on the CPU backend.
    pool_reserved_bytes: Option<u64>,
    /// Process peak resident memory during the measurement (weights included); on a GPU this
    /// is host memory only.
    peak_rss_bytes: Option<u64>,
    /// What the memory model (`app::memory`) expects the work to need, for a generation or a
    /// training step: beside `pool_reserved_bytes` on a GPU, `peak_rss_bytes` on the CPU.
    memory_model_bytes: Option<u64>,
    /// Resident memory when the measurement started: the weights, and whatever building them
    /// left resident (the peak minus this is what the work itself added).
    start_rss_bytes: Option<u64>,
    gradient_checkpointing: bool,
}

/// Where a configuration name points, relative to the repository root.
fn config_dir(name: &str) -> PathBuf {
    match name {
        "tiny" => "tests/fixtures/sd/tiny-sd1".into(),
        "sd15" => "tests/fixtures/sd/configs/sd15".into(),
        "tiny-sdxl" => "tests/fixtures/sd/tiny-sdxl".into(),
        "sdxl" => "tests/fixtures/sd/configs/sdxl".into(),
        "mid" => "bench/configs/mid".into(),
        dir => dir.into(),
    }
}

fn read_config(dir: &Path) -> Result<SdConfig, Box<dyn std::error::Error>> {
    let read = |part: &str| {
        let path = dir.join(part).join("config.json");
        std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{}: {e} (run from the repository root, or pass a folder with unet/, text_encoder/ and vae/ config.json files)",
                path.display()
            )
        })
    };
    let text_encoder_2 = dir
        .join("text_encoder_2")
        .is_dir()
        .then(|| read("text_encoder_2"))
        .transpose()?
        .map(|t| from_json::<TextConfig>("text_encoder_2/config.json", &t))
        .transpose()?;
    Ok(SdConfig {
        unet: from_json::<UNetConfig>("unet/config.json", &read("unet")?)?,
        text_encoder: from_json::<TextConfig>("text_encoder/config.json", &read("text_encoder")?)?,
        force_zeros_for_empty_prompt: text_encoder_2.is_some(),
        text_encoder_2,
        vae: from_json::<VaeConfig>("vae/config.json", &read("vae")?)?,
        // The measured work is the same for both; the configurations benchmarked predict noise.
        prediction: Prediction::Epsilon,
    })
}

/// The short git revision of the working directory, or `SEFI_REVISION` where there is no git
/// (the packaged GPU benchmark).
fn revision() -> String {
    if let Ok(r) = std::env::var("SEFI_REVISION") {
        return r;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Peak resident memory since the last [`reset_peak_rss`] (Linux), bytes.
fn peak_rss() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident memory now (Linux), bytes.
fn rss() -> Option<u64> {
    status_bytes("VmRSS:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn reset_peak_rss() {
    // "5" resets the peak to the current resident size (Linux 4.0+).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Timing {
    first: Option<f64>,
    median: f64,
    min: f64,
    max: f64,
    peak_rss: Option<u64>,
    start_rss: Option<u64>,
}

fn time(
    warmup: usize,
    reps: usize,
    mut run: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<Timing, Box<dyn std::error::Error>> {
    reset_peak_rss();
    let start_rss = rss();
    let mut first = None;
    for _ in 0..warmup {
        let t = Instant::now();
        run()?;
        first.get_or_insert(t.elapsed().as_secs_f64());
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        first,
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
        peak_rss: peak_rss(),
        start_rss,
    })
}

/// Waits for `t`: reading it back is the only portable way to wait for a GPU.
fn sync<const D: usize>(t: Tensor<D>) -> Result<(), Box<dyn std::error::Error>> {
    crate::block_on(read_f32(
        t.slice_dim(0, 0..1).flatten::<1>(0, D - 1).slice(0..1),
    ))?;
    Ok(())
}

/// A photo of noise: training cost does not depend on the picture.
fn noise_photo(size: usize) -> Photo {
    let mut x = 0x2545_f491_u32;
    let data = (0..size * size * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect();
    Photo {
        image: RgbImage {
            width: size,
            height: size,
            data,
        },
        crop: None,
    }
}

pub fn run(args: BenchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    for w in &args.only {
        if !WORK.contains(&w.as_str()) {
            return Err(format!("unknown measurement `{w}`: use {}", WORK.join(", ")).into());
        }
    }
    let config = read_config(&config_dir(&args.config))?;
    let scale = config.vae.latent_scale();
    let res = args.resolution.unwrap_or(config.unet.sample_size * scale);
    if res == 0 || !res.is_multiple_of(8) {
        return Err(format!("--resolution {res} is not a positive multiple of 8").into());
    }
    let dev = crate::block_on(args.device.open())?;
    let precision = dev.info.resolve(args.precision)?;
    let revision = revision();
    let wants = |w: &str| args.only.iter().any(|o| o == w);
    let params: u64 = crate::sd::param_counts(&config, &dev.device)?.iter().sum();
    let target = Target {
        binding: crate::device::binding_limit(&dev.device),
        cpu: dev.info.backend == crate::device::Backend::Cpu,
    };
    let modelled = |bench: &str| {
        let work = if bench == "train_step" {
            Work::Train {
                resolution: res,
                checkpointing: args.gradient_checkpointing,
            }
        } else if bench.starts_with("generate") {
            Work::Generate {
                width: res,
                height: res,
                images: 1,
            }
        } else {
            return None;
        };
        let bytes = precision.dtype().size() as u64;
        Some(memory::need(&config, params, bytes, work, target).total())
    };
    let record = |bench: &str, batch: usize, t: Timing| {
        let r = Record {
            implementation: "sefi",
            bench,
            config: &args.config,
            resolution: res,
            batch,
            device: dev.info.adapter.clone(),
            backend: dev.info.backend.to_string(),
            dtype: precision.to_string(),
            revision: revision.clone(),
            warmup: args.warmup,
            reps: args.reps,
            median_s: t.median,
            min_s: t.min,
            max_s: t.max,
            first_s: t.first,
            fusion: cfg!(feature = "fusion"),
            autotune: cfg!(feature = "autotune"),
            pool_reserved_bytes: dev.device.memory_pool_usage().map(|u| u.bytes_reserved),
            peak_rss_bytes: t.peak_rss,
            start_rss_bytes: t.start_rss,
            memory_model_bytes: modelled(bench),
            gradient_checkpointing: bench == "train_step" && args.gradient_checkpointing,
        };
        println!("{}", serde_json::to_string(&r).expect("plain data"));
    };
    let (warmup, reps) = (args.warmup, args.reps);
    let latent = res / scale;
    let scheduler = SchedulerConfig::for_prediction(config.prediction);

    let family = if config.text_encoder_2.is_some() {
        Family::Sdxl
    } else {
        Family::Sd1
    };
    if ["text", "unet", "vae", "generate"].iter().any(|w| wants(w)) {
        let device: &Device = &dev.device;
        let sd = StableDiffusion::random(&config, family, device, precision.dtype())?;
        if wants("text") {
            let windows = [
                sd.tokenizer.tokenize("a photo of the face of person").ids,
                sd.tokenizer.tokenize("").ids,
            ];
            let t = time(warmup, reps, || {
                sync(pipeline::encode_windows(&sd, &windows, device).states)
            })?;
            record("text_encoder_forward", 2, t);
        }
        if wants("unet") {
            let c = &config.unet;
            let sample = Tensor::<4>::random(
                [2, c.in_channels, latent, latent],
                Distribution::Normal(0.0, 1.0),
                device,
            );
            let context = Context::new(Tensor::<3>::random(
                [2, 77, c.cross_attention_dim],
                Distribution::Normal(0.0, 1.0),
                device,
            ))
            .with_added(config.text_encoder_2.as_ref().map(|t2| AddedCond {
                text_embeds: Tensor::<2>::random(
                    [2, t2.projection_dim],
                    Distribution::Normal(0.0, 1.0),
                    device,
                ),
                time_ids: Tensor::<2>::from_floats(
                    [[res as f32, res as f32, 0.0, 0.0, res as f32, res as f32]; 2],
                    device,
                ),
            }));
            let t500 = Tensor::<1>::from_floats([500.0, 500.0], device);
            let t = time(warmup, reps, || {
                sync(
                    sd.unet
                        .forward(sample.clone(), t500.clone(), &context, None),
                )
            })?;
            record("unet_forward", 2, t);
        }
        if wants("vae") {
            let z = Tensor::<4>::random(
                [1, config.vae.latent_channels, latent, latent],
                Distribution::Normal(0.0, 1.0),
                device,
            );
            let t = time(warmup, reps, || sync(sd.vae.decode(z.clone())))?;
            record("vae_decode", 1, t);
        }
        if wants("generate") {
            let req = GenerateRequest {
                prompt: "a photo of an astronaut riding a horse".into(),
                negative_prompt: String::new(),
                steps: args.steps,
                guidance: GenerateRequest::default().guidance,
                sampler: Sampler::Euler,
                seed: 0,
                width: res,
                height: res,
                num_images: 1,
                preview_every: 0,
            };
            // Fewer repetitions: a generation is tens of UNet passes.
            let t = time(warmup.min(1), reps.min(3), || {
                crate::block_on(pipeline::generate(
                    &sd,
                    &scheduler,
                    &req,
                    &[],
                    &GivenNoise::default(),
                    device,
                    &mut |_| Flow::Continue,
                ))?;
                Ok(())
            })?;
            record(&format!("generate_{}_steps", args.steps), 1, t);
        }
    }

    if wants("train") {
        let device = dev.device.clone().autodiff();
        let device = if args.gradient_checkpointing {
            device.gradient_checkpointing()
        } else {
            device
        };
        let sd = StableDiffusion::random(&config, family, &device, precision.dtype())?;
        let mut tc = TrainConfig::new("alice", "person", res);
        tc.steps = warmup + reps;
        let trainer = crate::block_on(Trainer::new(
            &sd,
            &scheduler,
            &[noise_photo(res)],
            tc,
            &device,
        ))?;
        let mut state = trainer.initial_state();
        let t = time(warmup, reps, || {
            crate::block_on(trainer.step(&mut state))?;
            Ok(())
        })?;
        record("train_step", 1, t);
    }
    Ok(ExitCode::SUCCESS)
}
