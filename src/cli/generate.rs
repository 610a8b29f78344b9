//! `sefi generate`: text to PNG images on the chosen device.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::shared::{self, ModelArgs};
use crate::app::memory::Work;
use crate::device::{DeviceChoice, Precision};
use crate::face::score::likeness;
use crate::identity::Identity;
use crate::pipeline::{self, Event, Flow, GenerateRequest, GivenNoise, HostLatents};
use crate::schedule::Sampler;
use crate::sd::StableDiffusion;
use crate::weights::{FileSource, SafetensorsFile};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale, 1 turns guidance off (default: 7.5, and 5.0 for SDXL
    /// as diffusers' SDXL pipeline).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim, euler, euler-a, dpmpp-2m or dpmpp-2m-karras.
    #[arg(long, default_value = "dpmpp-2m-karras", value_parser = parse_sampler)]
    pub scheduler: Sampler,
    /// Seed of the initial noise (random when not given; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Image width in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    #[arg(long, default_value = "auto", value_parser = shared::parse_device)]
    pub device: DeviceChoice,
    /// The frozen weights' precision: auto (f16 on a GPU that has it, else f32), f32, f16
    /// or bf16.
    #[arg(long = "dtype", default_value = "auto", value_parser = shared::parse_precision)]
    pub precision: Precision,
    /// Initial noise: a safetensors file with one tensor `latents` of shape
    /// [num_images, 4, height/8, width/8], used as diffusers uses its `latents=` argument.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Write the final latents (before the VAE) to this safetensors file, as tensor `latents`.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// A learned identity (`.safetensors` from `sefi train`); the prompt refers to it as
    /// `<TOKEN>`. Repeatable.
    #[arg(long = "identity")]
    pub identities: Vec<PathBuf>,
    /// The PNG to write; with several images, NAME-1.png, NAME-2.png, ...
    #[arg(long)]
    pub out: PathBuf,
    /// Print one JSON object (each image's file, seed, face scores and CLIP-T) instead of text.
    #[arg(long)]
    pub json: bool,
    /// A CLIP model folder (openai/clip-vit-large-patch14 from the Hub): score each image's
    /// prompt fidelity (CLIP-T), the prompt read with each `<name>` as its class word.
    #[arg(long)]
    pub clip: Option<PathBuf>,
}

fn parse_sampler(s: &str) -> Result<Sampler, String> {
    s.parse()
        .map_err(|e: crate::schedule::ScheduleError| e.to_string())
}

/// Reads the tensor `latents` of a safetensors file.
pub fn read_latents(path: &Path) -> Result<HostLatents, Box<dyn std::error::Error>> {
    let file = crate::block_on(SafetensorsFile::open(Box::new(FileSource::open(path)?)))?;
    if file.info("latents").is_none() {
        return Err(format!("{} has no tensor named `latents`", path.display()).into());
    }
    let t = crate::block_on(file.read("latents"))?;
    let shape: [usize; 4] = t.shape.clone().try_into().map_err(|_| {
        format!(
            "`latents` in {} has shape {:?}; it must have 4 dimensions",
            path.display(),
            t.shape
        )
    })?;
    Ok(HostLatents {
        shape,
        data: t.to_f32(),
    })
}

/// Writes `latents` as the one f32 tensor of a safetensors file.
pub fn write_latents(path: &Path, latents: &HostLatents) -> Result<(), Box<dyn std::error::Error>> {
    let bytes: Vec<u8> = latents.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        latents.shape.to_vec(),
        &bytes,
    )?;
    std::fs::write(path, safetensors::serialize([("latents", view)], None)?)?;
    Ok(())
}

/// NAME.png, or NAME-1.png, NAME-2.png, ... for several images.
fn out_path(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}-{}.png", i + 1))
}

pub fn run(args: GenerateArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let ckpt = args.model.open()?;
    let native = ckpt.config.unet.sample_size * ckpt.config.vae.latent_scale();
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        (nanos as u64) % 4_294_967_296
    });
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args
            .guidance
            .unwrap_or_else(|| ckpt.family.default_guidance()),
        sampler: args.scheduler,
        seed,
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
        num_images: args.num_images,
        preview_every: 0,
    };
    req.validate()?;
    let given = GivenNoise {
        initial: args.latents.as_deref().map(read_latents).transpose()?,
        steps: None,
    };

    let dev = crate::block_on(args.device.open())?;
    let precision = dev.info.resolve(args.precision)?;
    eprintln!(
        "device: {} ({}), weights in {precision}",
        dev.info.adapter, dev.info.backend
    );
    let work = Work::Generate {
        width: req.width,
        height: req.height,
        images: req.num_images,
    };
    shared::check_fit(&ckpt, &dev, precision.dtype(), work)?;
    let load_bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg:12} [{bar:30}] {pos}/{len}").expect("template"),
    );
    let sd = crate::block_on(StableDiffusion::load(
        &ckpt,
        &dev.device,
        precision.dtype(),
        &mut |p| {
            load_bar.set_message(p.component.to_string());
            load_bar.set_length(p.tensors_total as u64);
            load_bar.set_position(p.tensors_done as u64);
        },
    ))?;
    load_bar.finish_and_clear();

    let fingerprint = crate::block_on(crate::identity::condition::fingerprint(&sd))?;
    let mut identities = Vec::new();
    for path in &args.identities {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let identity = crate::block_on(Identity::from_bytes(&path.display().to_string(), bytes))?;
        identity.check_model(sd.family, &fingerprint)?;
        identities.push(identity);
    }

    let bar = ProgressBar::new(req.steps as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} eta {eta} ({per_sec})",
        )
        .expect("template"),
    );
    let generated = crate::block_on(pipeline::generate(
        &sd,
        &ckpt.scheduler,
        &req,
        &identities,
        &given,
        &dev.device,
        &mut |e| {
            match e {
                Event::Encoded { warnings } => warnings
                    .iter()
                    .for_each(|w| bar.println(format!("warning: {w}"))),
                Event::Step { step, .. } => bar.set_position(step as u64),
            }
            Flow::Continue
        },
    ))?;
    bar.finish_and_clear();

    if let Some(path) = &args.save_latents {
        let shape: [usize; 4] = generated.latents.dims();
        let data = crate::block_on(pipeline::read_f32(generated.latents.clone()))?;
        write_latents(path, &HostLatents { shape, data })?;
    }
    let model = args
        .model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Faces are scored against the identities the prompt names that keep their photos' faces.
    let references = Identity::named_in(&req.prompt, &identities);
    let faces = match references.is_empty() {
        true => None,
        false => match super::score::face_models(&dev.device) {
            Ok(models) => Some(models),
            Err(e) => {
                eprintln!("faces not scored: {e}");
                None
            }
        },
    };
    let clip_t = match &args.clip {
        Some(dir) => {
            let clip = super::score::prompt_fidelity(dir, &dev)?;
            let prompt = Identity::plain_prompt(&req.prompt, &identities);
            crate::block_on(clip.scores(&prompt, &generated.images))?
                .into_iter()
                .map(Some)
                .collect()
        }
        None => vec![None; generated.images.len()],
    };
    let mut written = Vec::new();
    for ((i, image), clip_t) in generated.images.iter().enumerate().zip(clip_t) {
        let seed = req.seed.wrapping_add(i as u64);
        let scores = match &faces {
            Some(models) => crate::block_on(models.score(image, &references))?,
            None => Vec::new(),
        };
        let parameters = pipeline::png::with_clip_t(
            pipeline::png::with_likeness(
                pipeline::png::parameters_text(&req, seed, &model),
                &likeness(&scores),
            ),
            clip_t,
        );
        let png = pipeline::png::encode(image, &parameters)?;
        let path = out_path(&args.out, i, generated.images.len());
        std::fs::write(&path, png).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        if !args.json {
            println!("{} (seed {seed})", path.display());
            if faces.is_some() {
                super::score::print_scores(&path.display().to_string(), &scores);
            }
            if let Some(c) = clip_t {
                super::score::print_clip_t(&path.display().to_string(), c);
            }
        }
        written.push(serde_json::json!({
            "file": path.display().to_string(),
            "seed": seed,
            "faces": scores,
            "clip_t": clip_t,
        }));
    }
    if args.json {
        println!("{}", serde_json::json!({ "images": written }));
    }
    Ok(ExitCode::SUCCESS)
}
