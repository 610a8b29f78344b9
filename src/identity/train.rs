//! The SeFi trainer: photos to VAE latents once, then AdamW on the identity's 2 x S vectors
//! (everything else frozen) with the noise-prediction and face-wise attention losses. The
//! vectors and AdamW's moments stay on the device for a batch of steps ([`Trainer::steps`]);
//! [`TrainState`] is their copy on the host, read back once a batch.
//!
//! Every step draws its randomness (photo, flip, timestep, noise) from a generator seeded by
//! (seed, step), so a run resumed from a checkpoint continues exactly as the uninterrupted run.

use std::cell::Cell;

use burn::tensor::{DType, Device, Tensor, TensorData};
use image::{RgbImage as Image, imageops::FilterType};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use super::condition::fingerprint;
use super::loss::{Loss, LossInputs, Objective, TrainPrompt, loss_scale, sefi_loss};
use super::prompt::tokenize_prompt;
pub use super::settings::{StepReport, TrainConfig, TrainState, TrainingRecord};
use super::{Fingerprint, Identity, stage_of};
use crate::rgb::RgbImage;
use crate::schedule::{SchedulerConfig, TrainSchedule};
use crate::sd::StableDiffusion;

/// A photo and the square to train on (`None`: the centred square).
#[derive(Clone, Debug, PartialEq)]
pub struct Photo {
    /// The photo, of any size (see [`decode_photo`]).
    pub image: RgbImage,
    /// `(x, y, size)` in pixels.
    pub crop: Option<(u32, u32, u32)>,
}

/// Decodes a photo (PNG or JPEG) to 8-bit RGB.
pub fn decode_photo(bytes: &[u8]) -> Result<RgbImage, String> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| format!("{e}; use a PNG or JPEG file"))?
        .to_rgb8();
    Ok(RgbImage {
        width: img.width() as usize,
        height: img.height() as usize,
        data: img.into_raw(),
    })
}

/// Why training cannot start or go on; each message says what to change.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// No photo was given.
    #[error("give at least one photo")]
    NoPhotos,
    /// Steps, stages or the resolution are out of range.
    #[error("steps and stages must be at least 1, and the resolution a positive multiple of 8")]
    Settings,
    /// The token cannot be written as `<token>` in prompts.
    #[error("the token `{0}` cannot be written as a placeholder in prompts: use {rule}", rule = crate::clip::tokenizer::PLACEHOLDER_NAME_RULE)]
    Token(String),
    /// The class word is not one token of the text encoder's vocabulary.
    #[error(
        "the class word `{0}` is not a single token of CLIP's vocabulary; pick a common word such as person, dog, cat or car"
    )]
    ClassWord(String),
    /// The training template does not hold `<id>` exactly once.
    #[error("the template `{0}` must contain <id> once")]
    TemplateId(String),
    /// The training template names another identity.
    #[error("the template: {0}")]
    TemplatePlaceholder(#[from] super::prompt::UnknownPlaceholder),
    /// The training template does not fit the text encoder's window.
    #[error("the template is longer than the text encoder's window")]
    TemplateTooLong,
    /// A photo's pixels do not match its width and height.
    #[error("a photo's pixel data does not match its size")]
    PhotoSize,
    /// A crop reaches outside its photo.
    #[error("the crop {x},{y},{size} does not fit in the {width}x{height} photo")]
    Crop {
        /// Left edge, in pixels.
        x: u32,
        /// Top edge.
        y: u32,
        /// Side of the square.
        size: u32,
        /// The photo's width.
        width: u32,
        /// The photo's height.
        height: u32,
    },
    /// The model has no square cross-attention maps to draw.
    #[error("no square attention maps to draw")]
    NoAttentionMaps,
    /// A checkpoint to resume from holds no training record.
    #[error("the checkpoint holds no training settings")]
    CheckpointSettings,
    /// A checkpoint was made with other settings than the run's.
    #[error(
        "the checkpoint was made with other settings (token, class word, seed, learning rate, ...); start a new run or use the same settings"
    )]
    CheckpointMismatch,
    /// A checkpoint's record holds no optimizer state (it is a finished identity).
    #[error("the checkpoint holds no optimizer state")]
    CheckpointState,
    /// A preview image could not be made.
    #[error("the preview image: {0}")]
    Preview(crate::pipeline::PipelineError),
    /// Reading a tensor back from the device failed, or no gradient reached the vectors.
    #[error("reading from the device failed: {0}")]
    Read(String),
    /// Training was cancelled; the number is the step it stopped at.
    #[error("cancelled at step {0}")]
    Cancelled(usize),
    /// The gradients were not finite even without loss scaling: the loss diverged.
    #[error(
        "the gradients are not finite (the loss diverged); lower the learning rate, or train with f32 weights"
    )]
    NonFinite,
}

/// One step's randomness: which photo, mirrored or not, the timestep and the noise.
#[derive(Clone, Debug, PartialEq)]
pub struct Draw {
    /// Index of the photo among the run's photos.
    pub photo: usize,
    /// 1: the mirror image.
    pub flip: usize,
    /// The training timestep, uniform over the schedule (0 to 999 for SD).
    pub timestep: usize,
    /// Standard normal noise, flattened in the latents' shape
    /// `[1, 4, resolution / s, resolution / s]` (s: `VaeConfig::latent_scale`).
    pub noise: Vec<f32>,
}

/// Which part of the objective to differentiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Term {
    /// The whole objective: noise term plus weighted attention term.
    Total,
    /// The attention term alone, unweighted.
    Attention,
}

/// A loss and its gradients with respect to one stage's vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    /// The stage of the draw's timestep: whose vectors the gradients are for.
    pub stage: usize,
    /// The total loss, as in [`StepReport::loss`].
    pub loss: f64,
    /// The noise-prediction term.
    pub noise_loss: f64,
    /// The attention term, unweighted.
    pub attn_loss: f64,
    /// `[dim]` each.
    pub key: Vec<f32>,
    /// The gradient of the stage's value vector.
    pub value: Vec<f32>,
}

/// A training run's fixed parts.
pub struct Trainer<'a> {
    sd: &'a StableDiffusion,
    /// The run's settings.
    pub config: TrainConfig,
    objective: Objective,
    prompt: TrainPrompt,
    /// Per photo: the latents of the photo and of its mirror image.
    latents: Vec<[Tensor<4>; 2]>,
    fingerprint: Fingerprint,
    class_embedding: Vec<f32>,
    device: Device,
    /// The f16 loss scale, carried across steps, and the clean steps since it last changed.
    scale: Cell<f32>,
    clean_steps: Cell<usize>,
}

/// Clean steps after which a lowered loss scale is doubled again (up to its initial value).
const SCALE_GROWTH_STEPS: usize = 100;

/// The loss scale for the next step and the clean steps counted, after a step that was
/// finite at `used` (`current` or lower): a lowered scale is kept; one that held for
/// `SCALE_GROWTH_STEPS` steps below `initial` is doubled.
fn next_scale(current: f32, used: f32, clean: usize, initial: f32) -> (f32, usize) {
    if used < current {
        (used, 0)
    } else if clean + 1 >= SCALE_GROWTH_STEPS && current < initial {
        ((current * 2.0).min(initial), 0)
    } else {
        (current, clean + 1)
    }
}

/// What one step run on the device left: the new rows of its stage (key, its two AdamW
/// moments, value, its moments; `dim` values each) and its three losses.
struct StepDone {
    timestep: usize,
    stage: usize,
    rows: Vec<f32>,
    losses: [f32; 3],
}

impl StepDone {
    /// Whether the gradients were finite: a gradient that overflowed leaves NaN in the
    /// updated vectors (inf / inf), however the device rounds.
    fn is_finite(&self) -> bool {
        self.rows.iter().all(|x| x.is_finite())
    }
}

/// AdamW on the device as `torch.optim.AdamW` computes it (decoupled weight decay, betas
/// 0.9 and 0.999, eps 1e-8, in its order of operations): `[param, exp_avg, exp_avg_sq]` after
/// the `step`-th update with gradient `grad`.
fn adamw(
    [p, m, v]: [Tensor<2>; 3],
    grad: Tensor<2>,
    lr: f64,
    weight_decay: f64,
    step: u32,
) -> [Tensor<2>; 3] {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let p = p.mul_scalar(1.0 - lr * weight_decay);
    // exp_avg.lerp_(grad, 1 - beta1)
    let m = m.clone() + (grad.clone() - m).mul_scalar(1.0 - b1);
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let v = v.mul_scalar(b2) + (grad.clone() * grad).mul_scalar(1.0 - b2);
    let step = step as i32;
    let (c1, c2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
    let denom = v.clone().sqrt().div_scalar(c2.sqrt()).add_scalar(eps);
    let p = p - (m.clone() / denom).mul_scalar(lr / c1);
    [p, m, v]
}

/// Centre (or given) square crop, resized to `side` (Lanczos), as `[1, 3, side, side]` in
/// [-1, 1], and its mirror image.
fn prepare(photo: &Photo, side: usize, device: &Device) -> Result<[Tensor<4>; 2], TrainError> {
    let img = Image::from_raw(
        photo.image.width as u32,
        photo.image.height as u32,
        photo.image.data.clone(),
    )
    .ok_or(TrainError::PhotoSize)?;
    let (w, h) = img.dimensions();
    let (x, y, s) = photo.crop.unwrap_or_else(|| {
        let s = w.min(h);
        ((w - s) / 2, (h - s) / 2, s)
    });
    if s == 0 || x + s > w || y + s > h {
        return Err(TrainError::Crop {
            x,
            y,
            size: s,
            width: w,
            height: h,
        });
    }
    let square = image::imageops::crop_imm(&img, x, y, s, s).to_image();
    let resized = image::imageops::resize(&square, side as u32, side as u32, FilterType::Lanczos3);
    let to_tensor = |img: &Image| {
        let mut data = vec![0f32; 3 * side * side];
        for (px, py, p) in img.enumerate_pixels() {
            for c in 0..3 {
                data[(c * side + py as usize) * side + px as usize] = p[c] as f32 / 127.5 - 1.0;
            }
        }
        Tensor::<4>::from_data(TensorData::new(data, [1, 3, side, side]), device)
    };
    Ok([
        to_tensor(&resized),
        to_tensor(&image::imageops::flip_horizontal(&resized)),
    ])
}

async fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, TrainError> {
    crate::nn::read_f32(t).await.map_err(TrainError::Read)
}

impl<'a> Trainer<'a> {
    /// Prepares a run: tokenizes the prompts and encodes the photos with the VAE once.
    /// `sd` must live on an autodiff device (`device.clone().autodiff()`).
    pub async fn new(
        sd: &'a StableDiffusion,
        scheduler: &SchedulerConfig,
        photos: &[Photo],
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if photos.is_empty() {
            return Err(TrainError::NoPhotos);
        }
        if config.steps == 0
            || config.stages == 0
            || config.resolution == 0
            || !config.resolution.is_multiple_of(8)
        {
            return Err(TrainError::Settings);
        }
        if !crate::clip::tokenizer::is_placeholder_name(&config.token) {
            return Err(TrainError::Token(config.token.clone()));
        }
        let class_id = sd
            .tokenizer
            .single_token(&config.class_word)
            .ok_or_else(|| TrainError::ClassWord(config.class_word.clone()))?;
        let template = config.template();
        if template.matches("<id>").count() != 1 {
            return Err(TrainError::TemplateId(template));
        }
        // The placeholder takes one position, which the class word fills in the reference.
        let probe = Identity {
            token: "id".into(),
            class_word: config.class_word.clone(),
            stages: 1,
            family: sd.family,
            dim: 0,
            key: vec![],
            value: vec![],
            fingerprint: Fingerprint {
                vocab: 0,
                dim: 0,
                widths: vec![],
                samples: vec![],
            },
            training: serde_json::Value::Null,
            faces: Vec::new(),
        };
        let tokens = tokenize_prompt(sd, &template, std::slice::from_ref(&probe))?;
        if tokens.windows.len() != 1 {
            return Err(TrainError::TemplateTooLong);
        }
        let prompt = TrainPrompt {
            ids: tokens.windows[0].clone(),
            positions: tokens.slots.iter().map(|s| s.position).collect(),
        };

        let sf = sd.vae.config.scaling_factor;
        let mut latents = Vec::new();
        for photo in photos {
            let [a, b] = prepare(photo, config.resolution, device)?;
            let enc = |x: Tensor<4>| sd.vae.encode(x).mean.mul_scalar(sf).detach();
            latents.push([enc(a), enc(b)]);
        }
        let class_embedding = read(sd.token_embedding(class_id)).await?;
        let fingerprint = fingerprint(sd).await.map_err(TrainError::Read)?;
        Ok(Self {
            sd,
            objective: Objective {
                schedule: TrainSchedule::new(scheduler),
                prediction: scheduler.prediction_type,
                attn_weight: config.attn_weight,
            },
            prompt,
            latents,
            fingerprint,
            class_embedding,
            config,
            device: device.clone(),
            scale: Cell::new(loss_scale(sd.unet.dtype())),
            clean_steps: Cell::new(0),
        })
    }

    /// Starts from another f16 loss scale than the dtype's (tests provoke an overflow with a
    /// large one).
    pub fn with_loss_scale(self, scale: f32) -> Self {
        self.scale.set(scale);
        self
    }

    /// Width of the identity vectors: the text encoder's token-embedding width (768 for SD
    /// 1.x, 1024 for SD 2.x; 768 + 1280 for SDXL's two).
    pub fn dim(&self) -> usize {
        self.class_embedding.len()
    }

    /// Vectors at the class word's embedding, optimizer at rest.
    pub fn initial_state(&self) -> TrainState {
        let n = self.config.stages * self.dim();
        let vectors: Vec<f32> = self
            .class_embedding
            .iter()
            .copied()
            .cycle()
            .take(n)
            .collect();
        TrainState {
            step: 0,
            key: vectors.clone(),
            value: vectors,
            m_key: vec![0.0; n],
            v_key: vec![0.0; n],
            m_value: vec![0.0; n],
            v_value: vec![0.0; n],
            stage_steps: vec![0; self.config.stages],
        }
    }

    /// The training prompt (ids and placeholder position).
    pub fn prompt(&self) -> &TrainPrompt {
        &self.prompt
    }

    /// The random draws of step `step`: photo, mirror, timestep, noise.
    fn draws(&self, step: usize) -> (usize, usize, usize, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(
            self.config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64,
        );
        let photo = rng.random_range(0..self.latents.len());
        let flip = rng.random_range(0..2usize);
        let t = rng.random_range(0..self.objective.schedule.alphas_cumprod.len());
        let numel = self.latents[0][0].shape().num_elements();
        let noise = (0..numel)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        (photo, flip, t, noise)
    }

    /// The loss of fixed vectors at a given timestep and noise (for evaluation), photo 0.
    pub fn evaluate(&self, state: &TrainState, t: usize, noise: &[f32]) -> Loss {
        let draw = Draw {
            photo: 0,
            flip: 0,
            timestep: t,
            noise: noise.to_vec(),
        };
        self.loss(state, &draw, false).0
    }

    /// The loss for one draw, and the stage's key and value leaves it was computed from
    /// (tracked for gradients when `grad`).
    fn loss(&self, state: &TrainState, draw: &Draw, grad: bool) -> (Loss, Tensor<2>, Tensor<2>) {
        let stage = self.stage(draw);
        let d = self.dim();
        let row = |v: &[f32]| {
            let t = Tensor::<2>::from_data(
                TensorData::new(v[stage * d..(stage + 1) * d].to_vec(), [1, d]),
                &self.device,
            );
            if grad { t.require_grad() } else { t }
        };
        let (key, value) = (row(&state.key), row(&state.value));
        (self.loss_of(key.clone(), value.clone(), draw), key, value)
    }

    /// The loss of one draw at the given key and value rows.
    fn loss_of(&self, key: Tensor<2>, value: Tensor<2>, draw: &Draw) -> Loss {
        let latents = self.latents[draw.photo][draw.flip].clone();
        let noise = Tensor::<4>::from_data(
            TensorData::new(draw.noise.clone(), latents.shape()),
            &self.device,
        );
        let inputs = LossInputs {
            latents,
            noise,
            timestep: draw.timestep,
        };
        sefi_loss(
            self.sd,
            &self.objective,
            &self.prompt,
            key,
            value,
            &inputs,
            &self.device,
        )
    }

    /// The stage whose vectors a draw's timestep uses.
    fn stage(&self, draw: &Draw) -> usize {
        stage_of(
            draw.timestep as f64,
            self.config.stages,
            self.objective.schedule.alphas_cumprod.len(),
        )
    }

    /// A row of the vectors on the device as a leaf of the autodiff graph, with the trainer's
    /// checkpointing strategy (operands with different strategies cannot be combined).
    fn leaf(&self, row: Tensor<2>) -> Tensor<2> {
        let row = row.autodiff();
        match self.device.gradient_checkpointing_strategy() {
            Some(strategy) => row.with_gradient_checkpointing_strategy(strategy),
            None => row,
        }
        .require_grad()
    }

    /// The loss of `state`'s vectors for one draw, and the gradient of `term` with respect
    /// to the key and value vectors of the timestep's stage.
    pub async fn gradients(
        &self,
        state: &TrainState,
        draw: &Draw,
        term: Term,
    ) -> Result<Gradients, TrainError> {
        let stage = self.stage(draw);
        // Loss scaling for F16 models, halved (and the pass redone: a backward pass consumes
        // its graph) while the scaled gradients overflow. The scale found is kept for the next
        // steps, so a run whose gradients overflow at the initial scale redoes one pass, not
        // one a step; it grows back after `SCALE_GROWTH_STEPS` clean steps. Scaling by a power
        // of two is exact, so the gradients do not depend on it (short of overflow).
        let mut scale = self.scale.get();
        loop {
            let (loss, key, value) = self.loss(state, draw, true);
            let objective = match term {
                Term::Total => loss.total.clone(),
                Term::Attention => loss.attention.clone(),
            };
            let grads = objective.mul_scalar(scale).backward();
            let missing = || TrainError::Read("no gradient reached the identity vectors".into());
            let flat = |t: Tensor<2>| t.flatten::<1>(0, 1).cast(DType::F32);
            let scalar = |t: Tensor<1>| t.without_autodiff().cast(DType::F32);
            let key_grad = flat(key.grad(&grads).ok_or_else(missing)?);
            let n = key_grad.dims()[0];
            // One readback a step (a sync with the GPU): both gradients and the three losses.
            let mut k = read(Tensor::cat(
                vec![
                    key_grad,
                    flat(value.grad(&grads).ok_or_else(missing)?),
                    scalar(loss.total),
                    scalar(loss.noise),
                    scalar(loss.attention),
                ],
                0,
            ))
            .await?;
            let mut v = k.split_off(n);
            let losses = v.split_off(v.len() - 3);
            if k.iter().chain(&v).all(|g| g.is_finite()) {
                k.iter_mut().chain(&mut v).for_each(|g| *g /= scale);
                self.keep_scale(scale);
                return Ok(Gradients {
                    stage,
                    loss: f64::from(losses[0]),
                    noise_loss: f64::from(losses[1]),
                    attn_loss: f64::from(losses[2]),
                    key: k,
                    value: v,
                });
            }
            if scale <= 1.0 {
                return Err(TrainError::NonFinite);
            }
            scale /= 2.0;
        }
    }

    /// Keeps the scale a step's gradients were finite at (see [`next_scale`]).
    fn keep_scale(&self, used: f32) {
        let (scale, clean) = next_scale(
            self.scale.get(),
            used,
            self.clean_steps.get(),
            loss_scale(self.sd.unet.dtype()),
        );
        self.scale.set(scale);
        self.clean_steps.set(clean);
    }

    /// The identity token's attention map beside the class word's (the target), for the first
    /// identity at the finest cross-attention resolution, averaged over heads and layers,
    /// each scaled to its maximum: a grey image twice as wide as high.
    pub async fn attention_maps(
        &self,
        state: &TrainState,
        draw: &Draw,
    ) -> Result<RgbImage, TrainError> {
        let loss = self.evaluate(state, draw.timestep, &draw.noise);
        let finest = loss
            .maps
            .iter()
            .map(|(a, _)| a.dims()[2])
            .max()
            .unwrap_or(0);
        let mut maps = [vec![0f32; finest], vec![0f32; finest]];
        let mut layers = 0;
        for (a, r) in loss.maps.iter().filter(|(a, _)| a.dims()[2] == finest) {
            layers += 1;
            for (k, t) in [a, r].into_iter().enumerate() {
                let [_, _, q, _] = t.dims();
                // [b, heads, q, ids] -> mean over heads of identity 0 -> [q].
                let m = t
                    .clone()
                    .detach()
                    .narrow(0, 0, 1)
                    .narrow(3, 0, 1)
                    .mean_dim(1)
                    .reshape([1, q]);
                for (acc, v) in maps[k].iter_mut().zip(read(m).await?) {
                    *acc += v;
                }
            }
        }
        let side = (finest as f64).sqrt().round() as usize;
        if layers == 0 || side * side != finest {
            return Err(TrainError::NoAttentionMaps);
        }
        let mut data = Vec::with_capacity(2 * finest * 3);
        for y in 0..side {
            for map in &maps {
                let max = map.iter().cloned().fold(f32::MIN_POSITIVE, f32::max);
                for x in 0..side {
                    let v = (map[y * side + x] / max * 255.0).round() as u8;
                    data.extend([v, v, v]);
                }
            }
        }
        Ok(RgbImage {
            width: 2 * side,
            height: side,
            data,
        })
    }

    /// The random draw of step `step`.
    pub fn draw(&self, step: usize) -> Draw {
        let (photo, flip, timestep, noise) = self.draws(step);
        Draw {
            photo,
            flip,
            timestep,
            noise,
        }
    }

    /// One optimisation step: the loss at a random timestep, its gradient with respect to
    /// that stage's key and value vectors, and an AdamW update of them (see [`Trainer::steps`]).
    pub async fn step(&self, state: &mut TrainState) -> Result<StepReport, TrainError> {
        let mut reports = self.steps(state, 1).await?;
        Ok(reports.remove(0))
    }

    /// Up to `n` optimisation steps with one readback (a sync with the GPU) for all of them:
    /// the vectors, AdamW's moments and the losses stay on the device from step to step, and
    /// what the steps changed comes back at the end. The result is the same as `n` single
    /// steps. Fewer than `n` steps are done where an f16 loss scale overflowed: that step is
    /// redone at lower scales, alone, and the batch ends with it.
    pub async fn steps(
        &self,
        state: &mut TrainState,
        n: usize,
    ) -> Result<Vec<StepReport>, TrainError> {
        let started = web_time::Instant::now();
        // The scales the steps use if none overflows (see `next_scale`).
        let initial = loss_scale(self.sd.unet.dtype());
        let (mut scale, mut clean) = (self.scale.get(), self.clean_steps.get());
        let scales: Vec<f32> = (0..n.max(1))
            .map(|_| {
                let used = scale;
                (scale, clean) = next_scale(scale, used, clean, initial);
                used
            })
            .collect();
        let mut reports = Vec::with_capacity(scales.len());
        for (done, scale) in self
            .run_steps(state, &scales)
            .await?
            .into_iter()
            .zip(&scales)
        {
            if done.is_finite() {
                reports.push(self.apply(state, done, *scale));
                continue;
            }
            // Loss scaling for f16 models, halved (and the step redone: a backward pass
            // consumes its graph) while the scaled gradients overflow. The scale found is kept
            // for the next steps, so a run whose gradients overflow at the initial scale redoes
            // one step, not one a step; it grows back after `SCALE_GROWTH_STEPS` clean steps.
            // Scaling by a power of two is exact, so the updates do not depend on it (short of
            // overflow). The steps after it in the batch started from vectors that no longer
            // hold: the caller asks again.
            let mut scale = *scale;
            loop {
                if scale <= 1.0 {
                    return Err(TrainError::NonFinite);
                }
                scale /= 2.0;
                let done = self.run_steps(state, &[scale]).await?.remove(0);
                if done.is_finite() {
                    reports.push(self.apply(state, done, scale));
                    break;
                }
            }
            break;
        }
        let speed = reports.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
        for r in &mut reports {
            r.steps_per_second = speed;
        }
        Ok(reports)
    }

    /// Runs one step per scale from `state` on the device, each from the vectors the one
    /// before left, and reads what they changed back at once.
    async fn run_steps(
        &self,
        state: &TrainState,
        scales: &[f32],
    ) -> Result<Vec<StepDone>, TrainError> {
        let d = self.dim();
        let plain = self.device.clone().without_autodiff();
        // Per stage: key, its first and second moment, value, its moments; `[1, dim]` each.
        let mut rows: Vec<[Tensor<2>; 6]> = (0..self.config.stages)
            .map(|stage| {
                [
                    &state.key,
                    &state.m_key,
                    &state.v_key,
                    &state.value,
                    &state.m_value,
                    &state.v_value,
                ]
                .map(|v| {
                    Tensor::<2>::from_data(
                        TensorData::new(v[stage * d..(stage + 1) * d].to_vec(), [1, d]),
                        &plain,
                    )
                })
            })
            .collect();
        let mut stage_steps = state.stage_steps.clone();
        let mut out = Vec::with_capacity(7 * scales.len());
        let mut draws = Vec::with_capacity(scales.len());
        for (i, &scale) in scales.iter().enumerate() {
            let draw = self.draw(state.step + i);
            let stage = self.stage(&draw);
            let [key, m_key, v_key, value, m_value, v_value] = rows[stage].clone();
            let (key_leaf, value_leaf) = (self.leaf(key.clone()), self.leaf(value.clone()));
            let loss = self.loss_of(key_leaf.clone(), value_leaf.clone(), &draw);
            let grads = loss.total.clone().mul_scalar(scale).backward();
            let grad = |leaf: &Tensor<2>| {
                leaf.grad(&grads)
                    .map(|g| g.cast(DType::F32).div_scalar(scale))
                    .ok_or_else(|| {
                        TrainError::Read("no gradient reached the identity vectors".into())
                    })
            };
            let (key_grad, value_grad) = (grad(&key_leaf)?, grad(&value_leaf)?);
            stage_steps[stage] += 1;
            let n = stage_steps[stage];
            let c = &self.config;
            let [key, m_key, v_key] = adamw([key, m_key, v_key], key_grad, c.lr, c.weight_decay, n);
            let [value, m_value, v_value] = adamw(
                [value, m_value, v_value],
                value_grad,
                c.lr,
                c.weight_decay,
                n,
            );
            rows[stage] = [key, m_key, v_key, value, m_value, v_value];
            out.extend(rows[stage].iter().map(|r| r.clone().reshape([d])));
            let scalar = |t: Tensor<1>| t.without_autodiff().cast(DType::F32);
            out.push(Tensor::cat(
                vec![
                    scalar(loss.total),
                    scalar(loss.noise),
                    scalar(loss.attention),
                ],
                0,
            ));
            draws.push((draw.timestep, stage));
        }
        let values = read(Tensor::cat(out, 0)).await?;
        Ok(values
            .chunks(6 * d + 3)
            .zip(draws)
            .map(|(v, (timestep, stage))| StepDone {
                timestep,
                stage,
                rows: v[..6 * d].to_vec(),
                losses: [v[6 * d], v[6 * d + 1], v[6 * d + 2]],
            })
            .collect())
    }

    /// Writes a finished step into `state` and keeps the loss scale it was finite at.
    fn apply(&self, state: &mut TrainState, done: StepDone, scale: f32) -> StepReport {
        let d = self.dim();
        let range = done.stage * d..(done.stage + 1) * d;
        let fields = [
            &mut state.key,
            &mut state.m_key,
            &mut state.v_key,
            &mut state.value,
            &mut state.m_value,
            &mut state.v_value,
        ];
        for (field, row) in fields.into_iter().zip(done.rows.chunks(d)) {
            field[range.clone()].copy_from_slice(row);
        }
        state.stage_steps[done.stage] += 1;
        state.step += 1;
        self.keep_scale(scale);
        StepReport {
            step: state.step,
            total: self.config.steps,
            loss: f64::from(done.losses[0]),
            noise_loss: f64::from(done.losses[1]),
            attn_loss: f64::from(done.losses[2]),
            timestep: done.timestep,
            stage: done.stage,
            steps_per_second: 0.0,
        }
    }

    /// The model it trains on.
    pub fn sd(&self) -> &StableDiffusion {
        self.sd
    }

    /// The device it trains on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The training record of `state`, with the state itself where the run is to `resume`.
    fn record(&self, state: &TrainState, resume: bool) -> serde_json::Value {
        TrainingRecord {
            config: self.config.clone(),
            steps_done: state.step,
            state: resume.then(|| state.clone()),
        }
        .to_json()
    }

    /// The identity the state holds.
    pub fn identity(&self, state: &TrainState) -> Identity {
        Identity {
            token: self.config.token.clone(),
            class_word: self.config.class_word.clone(),
            stages: self.config.stages,
            family: self.sd.family.base(),
            dim: self.dim(),
            key: state.key.clone(),
            value: state.value.clone(),
            fingerprint: self.fingerprint.clone(),
            training: self.record(state, false),
            faces: Vec::new(),
        }
    }

    /// A checkpoint: the identity file with the optimizer state inside its `training`
    /// metadata, so that one file resumes the run.
    pub fn checkpoint(&self, state: &TrainState) -> Result<Vec<u8>, super::IdentityError> {
        let mut identity = self.identity(state);
        identity.training = self.record(state, true);
        identity.to_bytes()
    }

    /// The state stored in a checkpoint, if it belongs to this run's settings.
    pub fn resume_state(&self, checkpoint: &Identity) -> Result<TrainState, TrainError> {
        let record =
            TrainingRecord::read(&checkpoint.training).ok_or(TrainError::CheckpointSettings)?;
        let same = TrainConfig {
            steps: self.config.steps,
            ..record.config
        } == self.config;
        if !same {
            return Err(TrainError::CheckpointMismatch);
        }
        record.state.ok_or(TrainError::CheckpointState)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device's AdamW against torch.optim.AdamW (`tests/fixtures/sefi/adamw.py`), step by
    /// step from the same parameter and gradients.
    #[test]
    #[cfg(not(target_family = "wasm"))]
    fn adamw_matches_torch() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sefi/adamw.json"
        );
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        let device = Device::flex();
        let tensor = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [2, 6]), &device);
        let mut state = [
            tensor(floats(&golden["start"])),
            tensor(vec![0.0; 12]),
            tensor(vec![0.0; 12]),
        ];
        let (lr, wd) = (
            golden["lr"].as_f64().unwrap(),
            golden["weight_decay"].as_f64().unwrap(),
        );
        for (i, step) in golden["steps"].as_array().unwrap().iter().enumerate() {
            let grad = tensor(floats(&step["grad"]));
            state = adamw(state, grad, lr, wd, i as u32 + 1);
            for (t, key) in state.iter().zip(["param", "exp_avg", "exp_avg_sq"]) {
                let got = crate::block_on(crate::nn::read_f32(t.clone())).unwrap();
                for (g, want) in got.iter().zip(floats(&step[key])) {
                    // The same float32 operations in the same order, but torch's lerp uses a
                    // fused multiply-add: measured up to 5.2 units in the last place.
                    assert!(
                        (g - want).abs() <= 16.0 * f32::EPSILON * want.abs(),
                        "step {}: {key} {g} vs torch {want}",
                        i + 1
                    );
                }
            }
        }
    }

    #[test]
    fn the_loss_scale_is_carried_and_grows_back() {
        // A step that overflowed at 1024 and was finite at 256 leaves 256 for the next.
        assert_eq!(next_scale(1024.0, 256.0, 7, 1024.0), (256.0, 0));
        // Clean steps at the lowered scale keep it, until enough of them double it.
        let mut state = (256.0, 0);
        for _ in 0..SCALE_GROWTH_STEPS - 1 {
            state = next_scale(state.0, state.0, state.1, 1024.0);
            assert_eq!(state.0, 256.0);
        }
        state = next_scale(state.0, state.0, state.1, 1024.0);
        assert_eq!(state, (512.0, 0));
        // Never above the initial scale; f32 models (scale 1) never change.
        assert_eq!(next_scale(1024.0, 1024.0, 500, 1024.0), (1024.0, 501));
        assert_eq!(next_scale(1.0, 1.0, 500, 1.0), (1.0, 501));
    }
}
