//! The SeFi trainer: photos to VAE latents once, then AdamW on the identity's 2 x S vectors
//! (everything else frozen) with the noise-prediction and face-wise attention losses.
//!
//! Every step draws its randomness (photo, flip, timestep, noise) from a generator seeded by
//! (seed, step), so a run resumed from a checkpoint continues exactly as the uninterrupted run.

use std::cell::Cell;

use burn::tensor::{DType, Device, Tensor, TensorData};
use image::{RgbImage as Image, imageops::FilterType};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::condition::fingerprint;
use super::loss::{Loss, LossInputs, Objective, TrainPrompt, loss_scale, sefi_loss};
use super::prompt::tokenize_prompt;
pub use super::settings::{StepReport, TrainConfig};
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

/// Why training cannot start or go on.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// The settings, photos, template, model or checkpoint cannot be used; the message says
    /// what to change.
    #[error("{0}")]
    Setup(String),
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

/// Everything that changes during training: what a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps done.
    pub step: usize,
    /// `[stages, dim]` each.
    pub key: Vec<f32>,
    /// The value vectors, `[stages, dim]` flattened like `key`.
    pub value: Vec<f32>,
    /// AdamW moments, same layout.
    pub m_key: Vec<f32>,
    /// AdamW's second moment (squared gradients) of the key vectors.
    pub v_key: Vec<f32>,
    /// AdamW's first moment of the value vectors.
    pub m_value: Vec<f32>,
    /// AdamW's second moment of the value vectors.
    pub v_value: Vec<f32>,
    /// Updates applied to each stage (its AdamW step count; a stage is updated only when
    /// its timesteps are drawn).
    pub stage_steps: Vec<u32>,
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

/// Centre (or given) square crop, resized to `side` (Lanczos), as `[1, 3, side, side]` in
/// [-1, 1], and its mirror image.
fn prepare(photo: &Photo, side: usize, device: &Device) -> Result<[Tensor<4>; 2], TrainError> {
    let img = Image::from_raw(
        photo.image.width as u32,
        photo.image.height as u32,
        photo.image.data.clone(),
    )
    .ok_or_else(|| TrainError::Setup("a photo's pixel data does not match its size".into()))?;
    let (w, h) = img.dimensions();
    let (x, y, s) = photo.crop.unwrap_or_else(|| {
        let s = w.min(h);
        ((w - s) / 2, (h - s) / 2, s)
    });
    if s == 0 || x + s > w || y + s > h {
        return Err(TrainError::Setup(format!(
            "the crop {x},{y},{s} does not fit in the {w}x{h} photo"
        )));
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
        let setup = |m: String| TrainError::Setup(m);
        if photos.is_empty() {
            return Err(setup("give at least one photo".into()));
        }
        if config.steps == 0
            || config.stages == 0
            || config.resolution == 0
            || !config.resolution.is_multiple_of(8)
        {
            return Err(setup(
                "steps and stages must be at least 1, and the resolution a positive multiple of 8"
                    .into(),
            ));
        }
        if !crate::clip::tokenizer::is_placeholder_name(&config.token) {
            return Err(setup(format!(
                "the token `{}` cannot be written as a placeholder in prompts: use {}",
                config.token,
                crate::clip::tokenizer::PLACEHOLDER_NAME_RULE
            )));
        }
        let class_id = sd.tokenizer.single_token(&config.class_word).ok_or_else(|| {
            setup(format!("the class word `{}` is not a single token of CLIP's vocabulary; pick a common word such as person, dog, cat or car", config.class_word))
        })?;
        let template = config.template();
        if template.matches("<id>").count() != 1 {
            return Err(setup(format!(
                "the template `{template}` must contain <id> once"
            )));
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
        };
        let tokens = tokenize_prompt(sd, &template, std::slice::from_ref(&probe))
            .map_err(|e| setup(e.to_string()))?;
        if tokens.windows.len() != 1 {
            return Err(setup(
                "the template is longer than the text encoder's window".into(),
            ));
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
        let stage = stage_of(
            draw.timestep as f64,
            self.config.stages,
            self.objective.schedule.alphas_cumprod.len(),
        );
        let d = self.dim();
        let row = |v: &[f32]| {
            let t = Tensor::<2>::from_data(
                TensorData::new(v[stage * d..(stage + 1) * d].to_vec(), [1, d]),
                &self.device,
            );
            if grad { t.require_grad() } else { t }
        };
        let (key, value) = (row(&state.key), row(&state.value));
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
        let loss = sefi_loss(
            self.sd,
            &self.objective,
            &self.prompt,
            key.clone(),
            value.clone(),
            &inputs,
            &self.device,
        );
        (loss, key, value)
    }

    /// The loss of `state`'s vectors for one draw, and the gradient of `term` with respect
    /// to the key and value vectors of the timestep's stage.
    pub async fn gradients(
        &self,
        state: &TrainState,
        draw: &Draw,
        term: Term,
    ) -> Result<Gradients, TrainError> {
        let stage = stage_of(
            draw.timestep as f64,
            self.config.stages,
            self.objective.schedule.alphas_cumprod.len(),
        );
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
            return Err(TrainError::Setup("no square attention maps to draw".into()));
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
    /// that stage's key and value vectors, and an AdamW update of them.
    pub async fn step(&self, state: &mut TrainState) -> Result<StepReport, TrainError> {
        let started = web_time::Instant::now();
        let draw = self.draw(state.step);
        let grads = self.gradients(state, &draw, Term::Total).await?;
        let stage = grads.stage;
        let range = stage * self.dim()..(stage + 1) * self.dim();

        // AdamW (PyTorch's, decoupled weight decay) on this stage's rows only.
        state.stage_steps[stage] += 1;
        let n = state.stage_steps[stage] as i32;
        let c = &self.config;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let update = |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]| {
            for i in 0..g.len() {
                let gi = g[i] as f64;
                let mut pi = p[i] as f64 * (1.0 - c.lr * c.weight_decay);
                let mi = b1 * m[i] as f64 + (1.0 - b1) * gi;
                let vi = b2 * v[i] as f64 + (1.0 - b2) * gi * gi;
                let m_hat = mi / (1.0 - b1.powi(n));
                let v_hat = vi / (1.0 - b2.powi(n));
                pi -= c.lr * m_hat / (v_hat.sqrt() + eps);
                (p[i], m[i], v[i]) = (pi as f32, mi as f32, vi as f32);
            }
        };
        update(
            &mut state.key[range.clone()],
            &mut state.m_key[range.clone()],
            &mut state.v_key[range.clone()],
            &grads.key,
        );
        update(
            &mut state.value[range.clone()],
            &mut state.m_value[range.clone()],
            &mut state.v_value[range.clone()],
            &grads.value,
        );
        state.step += 1;
        Ok(StepReport {
            step: state.step,
            total: c.steps,
            loss: grads.loss,
            noise_loss: grads.noise_loss,
            attn_loss: grads.attn_loss,
            timestep: draw.timestep,
            stage,
            steps_per_second: 1.0 / started.elapsed().as_secs_f64().max(1e-9),
        })
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
            training: serde_json::json!({ "config": self.config, "steps_done": state.step }),
        }
    }

    /// A checkpoint: the identity file with the optimizer state inside its `training`
    /// metadata, so that one file resumes the run.
    pub fn checkpoint(&self, state: &TrainState) -> Result<Vec<u8>, super::IdentityError> {
        let mut identity = self.identity(state);
        identity.training =
            serde_json::json!({ "config": self.config, "steps_done": state.step, "state": state });
        identity.to_bytes()
    }

    /// The state stored in a checkpoint, if it belongs to this run's settings.
    pub fn resume_state(&self, checkpoint: &Identity) -> Result<TrainState, TrainError> {
        let training = &checkpoint.training;
        let config: TrainConfig = serde_json::from_value(training["config"].clone())
            .map_err(|_| TrainError::Setup("the checkpoint holds no training settings".into()))?;
        let same = TrainConfig {
            steps: self.config.steps,
            ..config.clone()
        } == self.config;
        if !same {
            return Err(TrainError::Setup("the checkpoint was made with other settings (token, class word, seed, learning rate, ...); start a new run or use the same settings".into()));
        }
        serde_json::from_value(training["state"].clone())
            .map_err(|_| TrainError::Setup("the checkpoint holds no optimizer state".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
