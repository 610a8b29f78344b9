//! The sampling loop on a device: prompts to conditioning, classifier-free guidance, progress
//! events and cancellation, and decoding to RGB images.

use std::collections::HashMap;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use super::{Event, Flow, GenerateRequest, GivenNoise, HostLatents, PipelineError, RgbImage};
use crate::identity::condition::encode_spliced;
use crate::identity::prompt::UnknownPlaceholder;
pub use crate::identity::prompt::{CHUNK, PromptTokens, Slot, tokenize_prompt};
use crate::identity::{Identity, stage_of};
use crate::schedule::{Plan, Scheduler, SchedulerConfig};
pub use crate::sd::Encoded;
use crate::sd::StableDiffusion;
use crate::unet::{AddedCond, Context};

/// The result: final latents (before the VAE) and the decoded images.
#[derive(Debug)]
pub struct Generated {
    /// `[num_images, channels, height / scale, width / scale]` (`VaeConfig::latent_scale`), as
    /// the sampler leaves them.
    pub latents: Tensor<4>,
    /// The decoded images, `num_images` of them in batch order.
    pub images: Vec<RgbImage>,
    /// What users should know, such as a prompt longer than one text-encoder window.
    pub warnings: Vec<String>,
}

/// Token ids of a prompt without identities (see [`tokenize_prompt`]).
pub fn prompt_windows(sd: &StableDiffusion, text: &str) -> Result<Vec<Vec<u32>>, PipelineError> {
    Ok(tokenize_prompt(sd, text, &[])?.windows)
}

/// Encodes windows of ids, `k` windows -> `states` `[1, 77 k, dim]` and, for SDXL, the first
/// window's `pooled` `[1, 1280]` (see [`StableDiffusion::encode_embeds`]).
pub fn encode_windows(sd: &StableDiffusion, windows: &[Vec<u32>], device: &Device) -> Encoded {
    join_windows(sd.encode(windows, device))
}

/// `[k, 77, dim]` windows joined into one sequence `[1, 77 k, dim]`; the pooled embedding is
/// the first window's, as the popular web UIs take it for long SDXL prompts.
fn join_windows(encoded: Encoded) -> Encoded {
    let [k, s, d] = encoded.states.dims();
    Encoded {
        states: encoded.states.reshape([1, k * s, d]),
        pooled: encoded.pooled.map(|p| p.narrow(0, 0, 1)),
    }
}

/// Encodes a prompt with `vector(slot)` spliced in at every slot -> `[1, 77 k, dim]`.
fn encode_tokens(
    sd: &StableDiffusion,
    tokens: &PromptTokens,
    vector: &dyn Fn(&Slot) -> Vec<f32>,
    device: &Device,
) -> Encoded {
    if tokens.slots.is_empty() {
        return encode_windows(sd, &tokens.windows, device);
    }
    let parts: Vec<Encoded> = tokens
        .windows
        .iter()
        .enumerate()
        .map(|(w, ids)| {
            let slots: Vec<&Slot> = tokens.slots.iter().filter(|s| s.window == w).collect();
            if slots.is_empty() {
                return sd.encode(std::slice::from_ref(ids), device);
            }
            let rows: Vec<f32> = slots.iter().flat_map(|s| vector(s)).collect();
            let dim = rows.len() / slots.len();
            let vectors = Tensor::<2>::from_data(TensorData::new(rows, [slots.len(), dim]), device);
            let positions: Vec<usize> = slots.iter().map(|s| s.position).collect();
            encode_spliced(sd, ids, &positions, vectors, device)
        })
        .collect();
    let pooled = parts[0].pooled.clone();
    Encoded {
        states: Tensor::cat(parts.into_iter().map(|p| p.states).collect(), 1),
        pooled,
    }
}

fn long_prompt_warnings(sd: &StableDiffusion, prompts: [(&str, &[Vec<u32>]); 2]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (name, w) in prompts {
        if w.len() > 1 {
            let tokens = w
                .iter()
                .map(|x| {
                    x.iter()
                        .skip(1)
                        .take_while(|&&i| i != sd.tokenizer.end_id())
                        .count()
                })
                .sum::<usize>();
            warnings.push(format!(
                "the {name} has {tokens} tokens, more than the text encoder's {CHUNK}: it is encoded in {} windows of {CHUNK} tokens and the results joined, as the popular web UIs do",
                w.len()
            ));
        }
    }
    warnings
}

/// A prompt's tokens, its negative prompt's windows, and warnings.
type TokenizedPair = (PromptTokens, Vec<Vec<u32>>, Vec<String>);

/// Both prompts' tokens, padded to the same number of windows.
fn tokenize_pair(
    sd: &StableDiffusion,
    prompt: &str,
    negative: &str,
    identities: &[Identity],
) -> Result<TokenizedPair, PipelineError> {
    let mut pos = tokenize_prompt(sd, prompt, identities)?;
    let mut neg = prompt_windows(sd, negative).map_err(|e| match e {
        PipelineError::UnknownPlaceholder(UnknownPlaceholder { name, .. }) => {
            PipelineError::Request(format!(
                "<{name}>: identities cannot be used in the negative prompt"
            ))
        }
        e => e,
    })?;
    let warnings = long_prompt_warnings(sd, [("prompt", &pos.windows), ("negative prompt", &neg)]);
    let k = pos.windows.len().max(neg.len());
    let empty = prompt_windows(sd, "")?.remove(0);
    pos.windows.resize(k, empty.clone());
    neg.resize(k, empty);
    Ok((pos, neg, warnings))
}

/// Conditioning for a prompt without identities and its negative: `(cond, uncond)`, each
/// `[1, 77 k, dim]`.
pub fn encode_prompts(
    sd: &StableDiffusion,
    prompt: &str,
    negative: &str,
    device: &Device,
) -> Result<(Tensor<3>, Tensor<3>, Vec<String>), PipelineError> {
    let (pos, neg, warnings) = tokenize_pair(sd, prompt, negative, &[])?;
    Ok((
        encode_windows(sd, &pos.windows, device).states,
        encode_windows(sd, &neg, device).states,
        warnings,
    ))
}

/// Standard normal noise of `shape` for image `i` of a seeded request.
fn seeded_noise(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

fn to_device(h: &HostLatents, device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(h.data.clone(), h.shape), device)
}

/// Reads a tensor back (asynchronously, as WebGPU requires).
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, PipelineError> {
    crate::nn::read_f32(t).await.map_err(PipelineError::Read)
}

/// Generates images from a prompt: prepare the conditioning and the starting latents, run the
/// sampling loop, decode.
pub async fn generate(
    sd: &StableDiffusion,
    scheduler: &SchedulerConfig,
    req: &GenerateRequest,
    identities: &[Identity],
    given: &GivenNoise,
    device: &Device,
    on_event: &mut dyn FnMut(Event) -> Flow,
) -> Result<Generated, PipelineError> {
    req.validate()?;
    let plan = Plan::new(req.sampler, scheduler, req.steps)?;
    let scale = sd.config.vae.latent_scale();
    let shape = [
        req.num_images,
        sd.config.unet.in_channels,
        req.height / scale,
        req.width / scale,
    ];
    let mut noise = Noise::new(req, shape, given, plan.len())?;

    let (prompt, negative, warnings) =
        tokenize_pair(sd, &req.prompt, &req.negative_prompt, identities)?;
    if on_event(Event::Encoded {
        warnings: warnings.clone(),
    }) == Flow::Cancel
    {
        return Err(PipelineError::Cancelled);
    }
    // SDXL, as diffusers: an empty negative prompt is zeros where the model asks for it.
    let negative = if req.guidance <= 1.0 {
        Negative::None
    } else if sd.config.force_zeros_for_empty_prompt && req.negative_prompt.trim().is_empty() {
        Negative::Zeros
    } else {
        Negative::Windows(&negative[..])
    };
    let mut conditioning = Conditioning::new(
        sd,
        device,
        prompt,
        negative,
        identities,
        req.num_images,
        scheduler.num_train_timesteps,
        [req.height, req.width],
    );

    let latents = sample(
        sd,
        Scheduler::new(plan),
        req,
        &mut conditioning,
        &mut noise,
        device,
        on_event,
    )
    .await?;
    let images = decode(sd, latents.clone()).await?;
    Ok(Generated {
        latents,
        images,
        warnings,
    })
}

/// The request's noise on the host: the starting latents and, for ancestral samplers, the
/// noise of each step; given by the caller, or one seeded stream per image (seed + i), so that
/// image i is the same whatever the batch size.
struct Noise<'a> {
    shape: [usize; 4],
    initial: HostLatents,
    given_steps: Option<&'a [HostLatents]>,
    streams: Vec<StdRng>,
}

impl<'a> Noise<'a> {
    fn new(
        req: &GenerateRequest,
        shape: [usize; 4],
        given: &'a GivenNoise,
        steps: usize,
    ) -> Result<Self, PipelineError> {
        let n = req.num_images;
        let mut streams: Vec<StdRng> = (0..n)
            .map(|i| StdRng::seed_from_u64(req.seed.wrapping_add(i as u64)))
            .collect();
        let initial = match &given.initial {
            Some(h) if h.shape != shape => {
                return Err(PipelineError::Request(format!(
                    "the latents have shape {:?}, but {}x{} images x{n} need {shape:?}",
                    h.shape, req.width, req.height
                )));
            }
            Some(h) => h.clone(),
            None => next_noise(&mut streams, shape),
        };
        if let (Some(given), true) = (&given.steps, req.sampler.is_ancestral())
            && (given.len() < steps || given.iter().any(|s| s.shape != shape))
        {
            return Err(PipelineError::Request(format!(
                "ancestral sampling needs {steps} noise tensors of shape {shape:?}"
            )));
        }
        Ok(Self {
            shape,
            initial,
            given_steps: given.steps.as_deref(),
            streams,
        })
    }

    /// The noise an ancestral sampler adds at step `i`.
    fn step(&mut self, i: usize) -> HostLatents {
        match self.given_steps {
            Some(steps) => steps[i].clone(),
            None => next_noise(&mut self.streams, self.shape),
        }
    }
}

/// The next `shape` of standard normal noise, each image from its own stream.
fn next_noise(streams: &mut [StdRng], shape: [usize; 4]) -> HostLatents {
    let per_image = shape[1] * shape[2] * shape[3];
    HostLatents {
        shape,
        data: streams
            .iter_mut()
            .flat_map(|r| seeded_noise(r, per_image))
            .collect(),
    }
}

/// The negative side of classifier-free guidance.
enum Negative<'a> {
    /// No guidance.
    None,
    /// Zeros in place of an encoded empty negative prompt (SDXL).
    Zeros,
    /// The negative prompt's token windows.
    Windows(&'a [Vec<u32>]),
}

/// The UNet's text conditioning: the negative prompt's encoding (with guidance) and the
/// prompt's key and value contexts. Identity vectors differ per timestep stage, so the contexts
/// of each combination of the identities' stages are encoded once, when the loop first needs
/// them.
struct Conditioning<'a> {
    sd: &'a StableDiffusion,
    device: &'a Device,
    prompt: PromptTokens,
    identities: &'a [Identity],
    /// The negative prompt's encoding, `[batch, 77 k, dim]`; `None` without guidance.
    negative: Option<Encoded>,
    /// Zeros take the negative's place once the prompt's shapes are known.
    zero_negative: bool,
    batch: usize,
    train_steps: usize,
    /// SDXL's micro-conditioning: original size, crop top-left, target size (pixels).
    time_ids: [f32; 6],
    by_stages: HashMap<Vec<usize>, Context>,
}

impl<'a> Conditioning<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        sd: &'a StableDiffusion,
        device: &'a Device,
        prompt: PromptTokens,
        negative: Negative,
        identities: &'a [Identity],
        batch: usize,
        train_steps: usize,
        [height, width]: [usize; 2],
    ) -> Self {
        let (h, w) = (height as f32, width as f32);
        Self {
            sd,
            device,
            prompt,
            identities,
            negative: match negative {
                Negative::Windows(windows) => Some(encode_windows(sd, windows, device)),
                _ => None,
            },
            zero_negative: matches!(negative, Negative::Zeros),
            batch,
            train_steps,
            time_ids: [h, w, 0.0, 0.0, h, w],
            by_stages: HashMap::new(),
        }
    }

    /// Whether the UNet sees a negative half.
    fn guided(&self) -> bool {
        self.negative.is_some() || self.zero_negative
    }

    /// `[1, s, d]` -> `[batch, s, d]`.
    fn per_image(&self, t: Tensor<3>) -> Tensor<3> {
        let [_, s, d] = t.dims();
        t.expand([self.batch, s, d])
    }

    /// `[1, d]` -> `[batch, d]`.
    fn per_image_2(&self, t: Tensor<2>) -> Tensor<2> {
        let [_, d] = t.dims();
        t.expand([self.batch, d])
    }

    /// The UNet's context at timestep `t`: `[2 batch, ..]` (negative first) with guidance,
    /// `[batch, ..]` without.
    fn at(&mut self, t: f64) -> Context {
        // Without identities in the prompt, every timestep shares one context.
        let stages: Vec<usize> = if self.prompt.slots.is_empty() {
            Vec::new()
        } else {
            (self.identities.iter())
                .map(|id| stage_of(t, id.stages, self.train_steps))
                .collect()
        };
        if let Some(context) = self.by_stages.get(&stages) {
            return context.clone();
        }
        let context = self.encode(&stages);
        self.by_stages.insert(stages, context.clone());
        context
    }

    /// Encodes the prompt with each identity's key (and value) vector of its stage spliced in.
    fn encode(&self, stages: &[usize]) -> Context {
        let stage_vector = |pick: fn(&Identity) -> &Vec<f32>| {
            move |slot: &Slot| {
                let id = &self.identities[slot.identity];
                let stage = stages[slot.identity];
                pick(id)[stage * id.dim..(stage + 1) * id.dim].to_vec()
            }
        };
        let encode = |pick: fn(&Identity) -> &Vec<f32>| {
            encode_tokens(self.sd, &self.prompt, &stage_vector(pick), self.device)
        };
        let key = encode(|id| &id.key);
        let value = if self.prompt.slots.is_empty() {
            key.clone()
        } else {
            encode(|id| &id.value)
        };
        let negative = match (&self.negative, self.zero_negative) {
            (Some(n), _) => Some(n.clone()),
            (None, true) => Some(Encoded {
                states: key.states.zeros_like(),
                pooled: key.pooled.as_ref().map(|p| p.zeros_like()),
            }),
            (None, false) => None,
        };
        let added = |pooled: &Option<Tensor<2>>| {
            let pooled = pooled.clone()?;
            let time_ids = Tensor::<2>::from_data(
                TensorData::new(self.time_ids.to_vec(), [1, 6]),
                self.device,
            );
            Some(AddedCond {
                text_embeds: self.per_image_2(pooled),
                time_ids: self.per_image_2(time_ids),
            })
        };
        let (key_states, value_states) = (self.per_image(key.states), self.per_image(value.states));
        let cond = added(&value.pooled);
        match negative {
            Some(negative) => {
                let states = self.per_image(negative.states);
                let added = match (added(&negative.pooled), cond) {
                    (Some(n), Some(c)) => Some(AddedCond::cat(&n, &c)),
                    _ => None,
                };
                Context::split(
                    Tensor::cat(vec![states.clone(), key_states], 0),
                    Tensor::cat(vec![states, value_states], 0),
                )
                .with_added(added)
            }
            None => Context::split(key_states, value_states).with_added(cond),
        }
    }
}

/// The sampling loop: from the starting noise to the final latents `[batch, 4, h / s, w / s]`,
/// with classifier-free guidance, progress events, previews and cancellation.
async fn sample(
    sd: &StableDiffusion,
    mut scheduler: Scheduler,
    req: &GenerateRequest,
    conditioning: &mut Conditioning<'_>,
    noise: &mut Noise<'_>,
    device: &Device,
    on_event: &mut dyn FnMut(Event) -> Flow,
) -> Result<Tensor<4>, PipelineError> {
    let guided = conditioning.guided();
    let total = scheduler.plan().len();
    let mut latents =
        to_device(&noise.initial, device).mul_scalar(scheduler.plan().init_noise_sigma);
    // Steps between previews, and the step and time of the last one.
    let mut spacing = req.preview_every;
    let mut last_preview = (0, web_time::Instant::now());
    for i in 0..total {
        let t = scheduler.plan().timesteps[i];
        let input = if guided {
            Tensor::cat(vec![latents.clone(), latents.clone()], 0)
        } else {
            latents.clone()
        };
        let input = scheduler.scale_model_input(input, i);
        let batch = input.dims()[0];
        let timesteps =
            Tensor::<1>::from_data(TensorData::new(vec![t as f32; batch], [batch]), device);
        let prediction = sd.unet.forward(input, timesteps, &conditioning.at(t), None);
        let prediction = if guided {
            let [uncond, cond]: [Tensor<4>; 2] =
                prediction.chunk(2, 0).try_into().expect("two halves");
            uncond.clone() + (cond - uncond).mul_scalar(req.guidance)
        } else {
            prediction
        };
        let step_noise = (req.sampler.is_ancestral()).then(|| to_device(&noise.step(i), device));
        latents = scheduler.step(prediction, i, latents, step_noise);
        let step = i + 1;
        let preview =
            if req.preview_every > 0 && (step - last_preview.0 >= spacing || step == total) {
                let image = preview(latents.clone()).await?;
                // The read waited for the GPU, so the time since the last one is the GPU's.
                spacing = preview_spacing(
                    step - last_preview.0,
                    last_preview.1.elapsed(),
                    req.preview_every,
                );
                last_preview = (step, web_time::Instant::now());
                Some(image)
            } else {
                None
            };
        if on_event(Event::Step {
            step: i + 1,
            total,
            preview,
        }) == Flow::Cancel
        {
            return Err(PipelineError::Cancelled);
        }
    }
    Ok(latents)
}

/// How often previews are read back on a GPU fast enough: at most this often.
const PREVIEW_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Steps until the next preview, after `steps` steps took `elapsed` (up to a preview's
/// readback): as many as run in [`PREVIEW_INTERVAL`], at least `every` (the request's).
/// A GPU slower than that previews every `every` steps, as asked.
pub fn preview_spacing(steps: usize, elapsed: std::time::Duration, every: usize) -> usize {
    let per_second = steps as f64 / elapsed.as_secs_f64().max(1e-9);
    ((per_second * PREVIEW_INTERVAL.as_secs_f64()).floor() as usize).max(every)
}

/// Latents (as the sampler leaves them) -> RGB images, as diffusers' image processor makes
/// them: decode `latents / scaling_factor`, map [-1, 1] to [0, 1], round to 8 bits.
pub async fn decode(
    sd: &StableDiffusion,
    latents: Tensor<4>,
) -> Result<Vec<RgbImage>, PipelineError> {
    let x = sd
        .vae
        .decode(latents.div_scalar(sd.vae.config.scaling_factor));
    let x = x.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0);
    let [n, c, h, w] = x.dims();
    let values = read_f32(x).await?;
    Ok((0..n)
        .map(|b| {
            let mut data = Vec::with_capacity(h * w * 3);
            for y in 0..h {
                for xx in 0..w {
                    for ch in 0..3.min(c) {
                        let v = values[((b * c + ch) * h + y) * w + xx];
                        data.push((v * 255.0).round() as u8);
                    }
                }
            }
            RgbImage {
                width: w,
                height: h,
                data,
            }
        })
        .collect())
}

/// A cheap look at latents: a fixed linear map from the 4 latent channels to RGB (no VAE),
/// at 1/8 of the image size, for the first image of the batch.
pub async fn preview(latents: Tensor<4>) -> Result<RgbImage, PipelineError> {
    // Least-squares fit of SD 1.x/2.x latents to RGB, as commonly used for previews.
    const FACTORS: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let [_, c, h, w] = latents.dims();
    let first = latents.narrow(0, 0, 1);
    let values = read_f32(first).await?;
    let mut data = Vec::with_capacity(h * w * 3);
    for i in 0..h * w {
        for rgb in 0..3 {
            let v: f32 = FACTORS
                .iter()
                .take(c)
                .enumerate()
                .map(|(ch, f)| values[ch * h * w + i] * f[rgb])
                .sum();
            data.push(((v + 1.0) * 127.5).clamp(0.0, 255.0) as u8);
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::preview_spacing;
    use std::time::Duration;

    #[test]
    fn previews_space_out_on_fast_gpus_only() {
        // Two seconds a step: every step, as asked.
        assert_eq!(preview_spacing(1, Duration::from_secs(2), 1), 1);
        // Twenty steps a second: five steps a preview (four previews a second).
        assert_eq!(preview_spacing(10, Duration::from_millis(500), 1), 5);
        // Never closer than asked.
        assert_eq!(preview_spacing(10, Duration::from_millis(500), 8), 8);
    }
}
