//! The sampling loop on a device: prompts to conditioning, classifier-free guidance, progress
//! events and cancellation, and decoding to RGB images.

use std::collections::HashMap;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};

use super::{Event, Flow, GenerateRequest, GivenNoise, HostLatents, PipelineError, RgbImage};
use crate::clip::ids_tensor;
use crate::identity::condition::encode_spliced;
use crate::identity::prompt::UnknownPlaceholder;
pub use crate::identity::prompt::{CHUNK, PromptTokens, Slot, tokenize_prompt};
use crate::identity::{Identity, stage_of};
use crate::schedule::{Plan, Scheduler, SchedulerConfig};
use crate::sd::StableDiffusion;
use crate::unet::Context;

/// The result: final latents (before the VAE) and the decoded images.
#[derive(Debug)]
pub struct Generated {
    pub latents: Tensor<4>,
    pub images: Vec<RgbImage>,
    pub warnings: Vec<String>,
}

/// Token ids of a prompt without identities (see [`tokenize_prompt`]).
pub fn prompt_windows(sd: &StableDiffusion, text: &str) -> Result<Vec<Vec<u32>>, PipelineError> {
    Ok(tokenize_prompt(sd, text, &[])?.windows)
}

/// Encodes windows of ids, `k` windows -> `[1, 77 k, dim]`.
fn encode_windows(sd: &StableDiffusion, windows: &[Vec<u32>], device: &Device) -> Tensor<3> {
    let k = windows.len();
    let flat: Vec<u32> = windows.iter().flatten().copied().collect();
    let ids = ids_tensor(&flat, k, device);
    let states = sd.text_encoder.forward(ids).last_hidden_state;
    let d = states.dims()[2];
    states.reshape([1, k * (CHUNK + 2), d])
}

/// Encodes a prompt with `vector(slot)` spliced in at every slot -> `[1, 77 k, dim]`.
fn encode_tokens(
    sd: &StableDiffusion,
    tokens: &PromptTokens,
    vector: &dyn Fn(&Slot) -> Vec<f32>,
    device: &Device,
) -> Tensor<3> {
    if tokens.slots.is_empty() {
        return encode_windows(sd, &tokens.windows, device);
    }
    let parts = tokens
        .windows
        .iter()
        .enumerate()
        .map(|(w, ids)| {
            let slots: Vec<&Slot> = tokens.slots.iter().filter(|s| s.window == w).collect();
            if slots.is_empty() {
                return encode_windows(sd, std::slice::from_ref(ids), device);
            }
            let rows: Vec<f32> = slots.iter().flat_map(|s| vector(s)).collect();
            let dim = rows.len() / slots.len();
            let vectors = Tensor::<2>::from_data(TensorData::new(rows, [slots.len(), dim]), device);
            let positions: Vec<usize> = slots.iter().map(|s| s.position).collect();
            encode_spliced(sd, ids, &positions, vectors, device)
        })
        .collect();
    Tensor::cat(parts, 1)
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
        encode_windows(sd, &pos.windows, device),
        encode_windows(sd, &neg, device),
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

/// Generates images from a prompt.
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
    let shape = [
        req.num_images,
        sd.config.unet.in_channels,
        req.height / 8,
        req.width / 8,
    ];
    let per_image = shape[1] * shape[2] * shape[3];
    let n = req.num_images;

    // Noise: given, or one seeded stream per image (seed + i), so that image i is the same
    // whatever the batch size.
    let mut rngs: Vec<StdRng> = (0..n)
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
        None => HostLatents {
            shape,
            data: rngs
                .iter_mut()
                .flat_map(|r| seeded_noise(r, per_image))
                .collect(),
        },
    };
    if let (Some(steps), true) = (&given.steps, req.sampler.is_ancestral())
        && (steps.len() < plan.len() || steps.iter().any(|s| s.shape != shape))
    {
        return Err(PipelineError::Request(format!(
            "ancestral sampling needs {} noise tensors of shape {shape:?}",
            plan.len()
        )));
    }

    let (pos, neg, warnings) = tokenize_pair(sd, &req.prompt, &req.negative_prompt, identities)?;
    if on_event(Event::Encoded {
        warnings: warnings.clone(),
    }) == Flow::Cancel
    {
        return Err(PipelineError::Cancelled);
    }
    let guided = req.guidance > 1.0;
    let repeat = |t: Tensor<3>| {
        let [_, s, d] = t.dims();
        t.expand([n, s, d])
    };
    let uncond = guided.then(|| repeat(encode_windows(sd, &neg, device)));
    // Identity vectors differ per timestep stage: the key and value contexts of each
    // combination of stages are computed once per generation.
    let train_steps = scheduler.num_train_timesteps;
    let stages_at = |t: f64| -> Vec<usize> {
        if pos.slots.is_empty() {
            Vec::new()
        } else {
            identities
                .iter()
                .map(|id| stage_of(t, id.stages, train_steps))
                .collect()
        }
    };
    let mut contexts: HashMap<Vec<usize>, Context> = HashMap::new();
    let mut context_for = |stages: &Vec<usize>| -> Context {
        contexts
            .entry(stages.clone())
            .or_insert_with(|| {
                let row = |values: fn(&Identity) -> &Vec<f32>| {
                    move |slot: &Slot| {
                        let id = &identities[slot.identity];
                        let stage = stages[slot.identity];
                        values(id)[stage * id.dim..(stage + 1) * id.dim].to_vec()
                    }
                };
                let c_k = repeat(encode_tokens(sd, &pos, &row(|i| &i.key), device));
                let c_v = if pos.slots.is_empty() {
                    c_k.clone()
                } else {
                    repeat(encode_tokens(sd, &pos, &row(|i| &i.value), device))
                };
                match &uncond {
                    Some(u) => Context::split(
                        Tensor::cat(vec![u.clone(), c_k], 0),
                        Tensor::cat(vec![u.clone(), c_v], 0),
                    ),
                    None => Context::split(c_k, c_v),
                }
            })
            .clone()
    };

    let mut scheduler = Scheduler::new(plan);
    let total = scheduler.plan().len();
    let mut latents = to_device(&initial, device).mul_scalar(scheduler.plan().init_noise_sigma);
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
        let context = context_for(&stages_at(t));
        let out = sd.unet.forward(input, timesteps, &context, None);
        let out = if guided {
            let [u, c]: [Tensor<4>; 2] = out.chunk(2, 0).try_into().expect("two halves");
            u.clone() + (c - u).mul_scalar(req.guidance)
        } else {
            out
        };
        let noise = req.sampler.is_ancestral().then(|| match &given.steps {
            Some(steps) => to_device(&steps[i], device),
            None => {
                let data = rngs
                    .iter_mut()
                    .flat_map(|r| seeded_noise(r, per_image))
                    .collect();
                to_device(&HostLatents { shape, data }, device)
            }
        });
        latents = scheduler.step(out, i, latents, noise);
        let preview =
            if req.preview_every > 0 && ((i + 1) % req.preview_every == 0 || i + 1 == total) {
                Some(preview(latents.clone()).await?)
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
    let images = decode(sd, latents.clone()).await?;
    Ok(Generated {
        latents,
        images,
        warnings,
    })
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
