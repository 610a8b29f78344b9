//! `sefi train`: learn an identity from photos.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::shared::{self, ModelArgs};
use crate::app::memory::Work;
use crate::device::{DeviceChoice, Precision};
use crate::face::score::FaceModels;
use crate::face::{Descriptor, FaceError};
use crate::identity::Identity;
use crate::identity::session::{self, Due, Finished, Previews, Schedule, TrainEvent};
use crate::identity::settings;
use crate::identity::train::{Photo, TrainConfig, Trainer};
use crate::sd::StableDiffusion;

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A photo of the subject (PNG or JPEG). Repeatable.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// The name prompts will use, as `<NAME>`.
    #[arg(long)]
    pub token: String,
    /// What the subject is: person, dog, cat, car, ...
    #[arg(long, default_value = settings::DEFAULT_CLASS_WORD)]
    pub class_word: String,
    #[arg(long, default_value_t = settings::DEFAULT_STEPS)]
    pub steps: usize,
    #[arg(long, default_value_t = settings::DEFAULT_LR)]
    pub lr: f64,
    /// Weight of the face-wise attention loss.
    #[arg(long, default_value_t = settings::DEFAULT_ATTN_WEIGHT)]
    pub attn_weight: f64,
    /// Timestep stages, each with its own key and value vectors.
    #[arg(long, default_value_t = crate::identity::STAGES)]
    pub stages: usize,
    /// Training resolution in pixels (default: the model's native size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// The square to train on in every photo, `X,Y,SIZE` in pixels (default: the centre).
    #[arg(long, value_parser = parse_crop)]
    pub crop: Option<(u32, u32, u32)>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint (NAME.checkpoint.safetensors beside --out) every N steps.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue from the checkpoint beside --out.
    #[arg(long)]
    pub resume: bool,
    /// Every --save-every steps (or every 50), write the identity token's attention map beside
    /// the class word's into this folder as PNG.
    #[arg(long)]
    pub attention_maps: Option<PathBuf>,
    /// Every --save-every steps (or every 100) and at the end, draw "a photo of <TOKEN>" with
    /// the identity so far (20 steps, the same seed each time) into this folder as PNG, and
    /// score its face against the photos' faces: the likeness curve, printed and in --log-json.
    #[arg(long)]
    pub previews: Option<PathBuf>,
    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (burn's gradient checkpointing): less memory, more time.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Write one JSON object per step to this file.
    #[arg(long)]
    pub log_json: Option<PathBuf>,
    #[arg(long, default_value = "auto", value_parser = shared::parse_device)]
    pub device: DeviceChoice,
    /// The frozen weights' precision: auto (f16 on a GPU that has it, else f32), f32, f16
    /// or bf16.
    #[arg(long = "dtype", default_value = "auto", value_parser = shared::parse_precision)]
    pub precision: Precision,
    /// The identity file to write (`.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_crop(s: &str) -> Result<(u32, u32, u32), String> {
    let v: Vec<u32> = s
        .split(',')
        .map(|x| x.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{s}`: {e}"))?;
    match v[..] {
        [x, y, size] if size > 0 => Ok((x, y, size)),
        _ => Err(format!("`{s}`: expected X,Y,SIZE, e.g. 120,40,512")),
    }
}

/// NAME.safetensors -> NAME.checkpoint.safetensors.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}.checkpoint.safetensors"))
}

pub fn run(args: TrainArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let photos = args
        .images
        .iter()
        .map(|p| {
            shared::read_photo(p).map(|image| Photo {
                image,
                crop: args.crop,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ckpt = args.model.open()?;
    let dev = crate::block_on(args.device.open())?;
    let precision = dev.info.resolve(args.precision)?;
    eprintln!(
        "device: {} ({}), weights in {precision}",
        dev.info.adapter, dev.info.backend
    );
    let native = ckpt.config.unet.sample_size * ckpt.config.vae.latent_scale();
    let resolution = args.resolution.unwrap_or(native);
    let checkpointing = fitting_checkpointing(
        &ckpt,
        &dev,
        precision.dtype(),
        resolution,
        args.gradient_checkpointing,
    )?;
    // A preview is a generation at the training size between two steps.
    if args.previews.is_some() {
        let preview = Work::Generate {
            width: resolution,
            height: resolution,
            images: 1,
        };
        shared::check_fit(&ckpt, &dev, precision.dtype(), preview)
            .map_err(|e| format!("--previews: {e}; or train without --previews"))?;
    }
    let device = dev.device.clone().autodiff();
    let device = if checkpointing {
        device.gradient_checkpointing()
    } else {
        device
    };
    let sd = crate::block_on(StableDiffusion::load(
        &ckpt,
        &device,
        precision.dtype(),
        &mut |_| {},
    ))?;

    let mut tc = TrainConfig::new(&args.token, &args.class_word, resolution);
    tc.steps = args.steps;
    tc.lr = args.lr;
    tc.attn_weight = args.attn_weight;
    tc.stages = args.stages;
    tc.seed = args.seed;
    let trainer = crate::block_on(Trainer::new(&sd, &ckpt.scheduler, &photos, tc, &device))?;
    // The photos' faces travel with the identity (what generated images are scored against)
    // and score the previews. Without the face models the identity is kept without them.
    let face_models = super::score::face_models(&dev.device)
        .inspect_err(|e| eprintln!("faces not recorded, images will not be scored: {e}"))
        .ok();
    let faces = match &face_models {
        Some(models) => photo_faces(models, &photos, &args.images)?,
        None => Vec::new(),
    };
    let previews = args.previews.as_ref().map(|_| Previews {
        due: Due {
            every: if args.save_every > 0 {
                args.save_every
            } else {
                100
            },
            last_step: true,
            ..Due::default()
        },
        request: Previews::request(
            &args.token,
            resolution,
            sd.family.default_guidance(),
            args.seed,
        ),
        scheduler: &ckpt.scheduler,
        faces: face_models.as_ref().map(|m| (m, faces.clone())),
    });
    let checkpoint = checkpoint_path(&args.out);
    let mut state = if args.resume {
        let bytes = std::fs::read(&checkpoint)
            .map_err(|e| format!("cannot resume: {}: {e}", checkpoint.display()))?;
        let saved = crate::block_on(Identity::from_bytes(
            &checkpoint.display().to_string(),
            bytes,
        ))?;
        trainer.resume_state(&saved)?
    } else {
        trainer.initial_state()
    };
    let mut log = args
        .log_json
        .as_ref()
        .map(std::fs::File::create)
        .transpose()?;

    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}, eta {eta}, {per_sec}]",
        )
        .expect("template"),
    );
    bar.set_position(state.step as u64);
    let schedule = Schedule {
        checkpoint: Due {
            every: args.save_every,
            last_step: args.save_every > 0,
            ..Due::default()
        },
        // Maps cost a forward pass each: only when asked for.
        maps: match &args.attention_maps {
            Some(_) => Due {
                every: if args.save_every > 0 {
                    args.save_every
                } else {
                    50
                },
                last_step: true,
                ..Due::default()
            },
            None => Due::default(),
        },
        maps_before_training: false,
        read_every: session::READ_EVERY,
    };
    let mut on_event = |event: TrainEvent| -> Result<(), Box<dyn std::error::Error>> {
        match event {
            TrainEvent::Step(r) => {
                bar.set_position(r.step as u64);
                bar.set_message(format!(
                    "loss {:.4} (noise {:.4}, attention {:.2e}) t={} stage {}",
                    r.loss, r.noise_loss, r.attn_loss, r.timestep, r.stage
                ));
                if let Some(f) = log.as_mut() {
                    writeln!(f, "{}", serde_json::to_string(&r)?)?;
                }
            }
            TrainEvent::Checkpoint { bytes, .. } => std::fs::write(&checkpoint, bytes)?,
            TrainEvent::PreviewStep { step, total } => {
                bar.set_message(format!("drawing a preview: step {step}/{total}"))
            }
            TrainEvent::Preview {
                step,
                image,
                likeness,
            } => {
                let Some(dir) = &args.previews else {
                    return Ok(());
                };
                std::fs::create_dir_all(dir)?;
                let file = dir.join(format!("step-{step:06}.png"));
                let mut text = format!("a photo of <{}>, step {step}", args.token);
                if let Some(l) = likeness {
                    text.push_str(&format!(", likeness {l:.3}"));
                }
                std::fs::write(&file, crate::pipeline::png::encode(&image, &text)?)?;
                bar.println(match likeness {
                    Some(l) => format!("step {step}: likeness {l:.3} ({})", file.display()),
                    None => format!("step {step}: no face to score ({})", file.display()),
                });
                if let Some(f) = log.as_mut() {
                    let line = serde_json::json!({
                        "step": step,
                        "preview": file.display().to_string(),
                        "likeness": likeness,
                    });
                    writeln!(f, "{line}")?;
                }
            }
            TrainEvent::Maps {
                step,
                timestep,
                maps,
            } => {
                let Some(dir) = &args.attention_maps else {
                    return Ok(());
                };
                std::fs::create_dir_all(dir)?;
                let text = format!(
                    "<{}> (left) and \"{}\" (right), step {step}, t={timestep}",
                    args.token, args.class_word
                );
                std::fs::write(
                    dir.join(format!("step-{step:06}.png")),
                    crate::pipeline::png::encode(&maps, &text)?,
                )?;
            }
        }
        Ok(())
    };
    let finished = crate::block_on(session::run(
        &trainer,
        &mut state,
        &schedule,
        previews.as_ref(),
        &mut || None,
        &mut on_event,
    ))?;
    bar.finish();
    let Finished::Done(mut identity) = finished else {
        unreachable!("nothing stops a command-line run")
    };
    identity.faces = faces.into_iter().map(|d| d.0).collect();
    std::fs::write(&args.out, identity.to_bytes()?)?;
    println!(
        "{} (<{}>, class word {})",
        args.out.display(),
        args.token,
        args.class_word
    );
    Ok(ExitCode::SUCCESS)
}

/// The descriptors of the photos' faces (inside their crops), saying which photo shows none.
fn photo_faces(
    models: &FaceModels,
    photos: &[Photo],
    paths: &[PathBuf],
) -> Result<Vec<Descriptor>, FaceError> {
    let mut faces = Vec::new();
    for (photo, path) in photos.iter().zip(paths) {
        match crate::block_on(models.photo_face(&photo.image, photo.crop))? {
            Some(face) => faces.push(face),
            None => eprintln!(
                "no face found in {}{}: images will not be scored against it",
                path.display(),
                if photo.crop.is_some() {
                    " inside --crop"
                } else {
                    ""
                }
            ),
        }
    }
    Ok(faces)
}

/// The run's verdict before loading (`check_fit`), and whether it trains checkpointed: as
/// asked, or turned on (and said so) where the run fits the GPU's memory (known on CUDA) only
/// with it. The error is the one without checkpointing, which names it among the ways out.
fn fitting_checkpointing(
    ckpt: &crate::weights::Checkpoint,
    dev: &crate::device::ComputeDevice,
    dtype: burn::tensor::DType,
    resolution: usize,
    asked: bool,
) -> Result<bool, String> {
    let work = |checkpointing| Work::Train {
        resolution,
        checkpointing,
    };
    match shared::check_fit(ckpt, dev, dtype, work(asked)) {
        Ok(_) => Ok(asked),
        Err(without) if !asked => {
            shared::check_fit(ckpt, dev, dtype, work(true)).map_err(|_| without.clone())?;
            eprintln!("gradient checkpointing on: {without}");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}
