//! SeFi's training objective: noise prediction plus the face-wise attention loss.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::condition::encode_spliced;
use crate::config::Prediction;
use crate::schedule::TrainSchedule;
use crate::sd::StableDiffusion;
use crate::unet::{AddedCond, AttentionCapture, Context};

/// One training prompt: ids with placeholders at `positions`, and the reference prompt (the
/// same with the class words in place), which tokenizes to the same positions.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainPrompt {
    /// The training prompt's 77 ids; placeholder positions hold the class word's id.
    pub ids: Vec<u32>,
    /// Where each identity's vectors go (one per identity).
    pub positions: Vec<usize>,
}

/// The loss of one step and its parts (scalars, `[1]`).
#[derive(Clone, Debug)]
pub struct Loss {
    /// What is minimised: `noise + attn_weight * attention`.
    pub total: Tensor<1>,
    /// Mean squared error between the UNet's prediction and its target (the noise, or v).
    pub noise: Tensor<1>,
    /// The face-wise attention loss `L_attn`, unweighted: the mean of `layers`.
    pub attention: Tensor<1>,
    /// The attention loss of every cross-attention layer.
    pub layers: Vec<Tensor<1>>,
    /// The identity token's maps and the class word's, per layer: `[b, heads, hw, ids]`.
    pub maps: Vec<(Tensor<4>, Tensor<4>)>,
}

/// What a loss is multiplied by before the backward pass, and its gradients divided by after,
/// for a model computing in `dtype`. F16 gradients under 6e-8 flush to zero, and the attention
/// term's are that small; the scale lifts them into range. BF16 and F32 have F32's range.
pub fn loss_scale(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 1024.0,
        _ => 1.0,
    }
}

/// The fixed parts of the objective.
#[derive(Clone, Debug)]
pub struct Objective {
    /// The DDPM schedule the model was trained with.
    pub schedule: TrainSchedule,
    /// What the UNet predicts: the noise, or v.
    pub prediction: Prediction,
    /// Weight of the attention loss (docs/METHOD.md: 0.003, the paper's).
    pub attn_weight: f64,
}

/// What the loss needs besides the vectors.
#[derive(Clone, Debug)]
pub struct LossInputs {
    /// Clean latents (VAE mean times the scaling factor), `[1, 4, h, w]`.
    pub latents: Tensor<4>,
    /// The noise, same shape.
    pub noise: Tensor<4>,
    /// Training timestep.
    pub timestep: usize,
}

/// `||target - model(z_t, t, c_K, c_V)||^2 + lambda * L_attn` for one stage's vectors:
/// `key` and `value` are `[identities, dim]`, one row per placeholder of `prompt`.
pub fn sefi_loss(
    sd: &StableDiffusion,
    objective: &Objective,
    prompt: &TrainPrompt,
    key: Tensor<2>,
    value: Tensor<2>,
    inputs: &LossInputs,
    device: &Device,
) -> Loss {
    let c_k = encode_spliced(sd, &prompt.ids, &prompt.positions, key, device).states;
    // SDXL's pooled embedding comes from the value prompt: like the values, it feeds what the
    // UNet draws (it is added to the timestep embedding), not where attention goes.
    let value = encode_spliced(sd, &prompt.ids, &prompt.positions, value, device);
    let c_v = value.states;
    let c_r = sd
        .encode(std::slice::from_ref(&prompt.ids), device)
        .states
        .detach();

    let a = objective.schedule.alphas_cumprod[inputs.timestep];
    // diffusers' sqrt_alpha_prod and sqrt_one_minus_alpha_prod.
    let (sqrt_alpha, sqrt_one_minus_alpha) = (a.sqrt(), (1.0 - a).sqrt());
    let z_t = inputs.latents.clone().mul_scalar(sqrt_alpha)
        + inputs.noise.clone().mul_scalar(sqrt_one_minus_alpha);
    let target = match objective.prediction {
        Prediction::Epsilon => inputs.noise.clone(),
        Prediction::VPrediction => {
            inputs.noise.clone().mul_scalar(sqrt_alpha)
                - inputs.latents.clone().mul_scalar(sqrt_one_minus_alpha)
        }
    };

    let positions = Tensor::<1, Int>::from_data(
        TensorData::new(
            prompt.positions.iter().map(|&p| p as i64).collect(),
            [prompt.positions.len()],
        ),
        device,
    );
    let mut capture = AttentionCapture::new(positions.clone()).with_reference(c_r, positions);
    let t = Tensor::<1>::from_data(TensorData::new(vec![inputs.timestep as f32], [1]), device);
    // SDXL's micro-conditioning: the photo is a full, uncropped square at the training size.
    let [_, _, h, w] = inputs.latents.dims();
    let added = value.pooled.map(|text_embeds| {
        let scale = sd.config.vae.latent_scale();
        let (h, w) = ((h * scale) as f32, (w * scale) as f32);
        AddedCond {
            text_embeds,
            time_ids: Tensor::from_data(
                TensorData::new(vec![h, w, 0.0, 0.0, h, w], [1, 6]),
                device,
            ),
        }
    });
    let out = sd.unet.forward(
        z_t,
        t,
        &Context::split(c_k, c_v).with_added(added),
        Some(&mut capture),
    );

    let noise = (target - out).powi_scalar(2).mean();
    let maps: Vec<(Tensor<4>, Tensor<4>)> = capture
        .maps
        .into_iter()
        .zip(capture.reference_maps)
        .collect();
    let layers: Vec<Tensor<1>> = maps
        .iter()
        .map(|(a, r)| (a.clone() - r.clone()).powi_scalar(2).mean())
        .collect();
    let attention = Tensor::cat(layers.clone(), 0).mean();
    let total = noise.clone() + attention.clone().mul_scalar(objective.attn_weight);
    Loss {
        total,
        noise,
        attention,
        layers,
        maps,
    }
}
