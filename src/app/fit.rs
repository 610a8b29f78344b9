//! Whether a model and a resolution fit a GPU, estimated before any work. WebGPU tells no
//! memory size, only buffer limits: the hard check is the largest buffer (the attention scores
//! of the first UNet level), the memory figures are estimates to compare with the GPU's.

use serde::{Deserialize, Serialize};

use crate::config::UNetConfig;
use crate::device::GpuLimits;

/// SD 1.5's UNet, whose measured training memory the estimates scale from.
const SD15_UNET_PARAMS: f64 = 859_520_964.0;
/// Training activations of SD 1.5 at 512 px with f32 weights (measured: 14.5 GiB peak with
/// 4.1 GiB of weights).
const SD15_TRAIN_ACTIVATIONS_512: f64 = 10.4 * GIB;
const GIB: f64 = (1u64 << 30) as f64;

/// The largest attention-score buffer, `[batch, heads, tokens, tokens]` in f32, of the
/// UNet's first attention level at `width` x `height` pixels.
pub fn attention_bytes(unet: &UNetConfig, width: usize, height: usize, batch: usize) -> u64 {
    let Some(level) = unet
        .down_block_types
        .iter()
        .position(|t| t.contains("Attn"))
    else {
        return 0;
    };
    let tokens = ((width / 8) >> level) as u64 * ((height / 8) >> level) as u64;
    batch as u64 * unet.heads(level) as u64 * tokens * tokens * 4
}

/// The VAE decoder's attention-score buffer, `[1, 1, tokens, tokens]` in f32: its mid-block
/// attends over every latent position (one head), which at 1024 px is 16384 tokens, 1 GiB.
pub fn vae_attention_bytes(width: usize, height: usize) -> u64 {
    let tokens = (width / 8) as u64 * (height / 8) as u64;
    tokens * tokens * 4
}

/// The largest buffer generating `batch` images with guidance binds at `width` x `height`.
fn generate_buffer(unet: &UNetConfig, width: usize, height: usize, batch: usize) -> u64 {
    attention_bytes(unet, width, height, batch).max(vae_attention_bytes(width, height))
}

/// The largest square side (a multiple of 64) whose attention (the UNet's and the VAE
/// decoder's) fits `limit` bytes.
pub fn largest_side(unet: &UNetConfig, batch: usize, limit: u64) -> usize {
    let mut side = 64;
    while side < 4096 && generate_buffer(unet, side + 64, side + 64, batch) <= limit {
        side += 64;
    }
    side
}

/// What a loaded model needs, for the GPU panel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// The weights on the GPU.
    pub weights_bytes: u64,
    /// Estimated peak while training at `resolution`.
    pub train_bytes: u64,
    /// Estimated peak while generating one image at `resolution` with guidance.
    pub generate_bytes: u64,
    /// The size the estimates are for (the model's own).
    pub resolution: usize,
    /// The largest buffer one shader may bind, where known.
    pub binding_limit: Option<u64>,
    /// The largest square image that fits the binding limit, for one image with guidance.
    pub largest_generate_side: Option<usize>,
    /// Every weight tensor fits the binding limit (or none is known): the model can load.
    pub weights_fit: bool,
    /// Problems and what to change; empty when it fits.
    pub advice: Vec<String>,
}

/// Estimates the memory of a model with `params` parameters (all three models) stored at
/// `bytes_per_param`, whose largest tensor has `largest_tensor` bytes, at `resolution`.
pub fn estimate(
    unet: &UNetConfig,
    unet_params: u64,
    params: u64,
    bytes_per_param: u64,
    largest_tensor: u64,
    resolution: usize,
    limits: Option<&GpuLimits>,
) -> FitReport {
    let weights = params * bytes_per_param;
    let scale = (resolution as f64 / 512.0).powi(2) * unet_params as f64 / SD15_UNET_PARAMS;
    let train = weights as f64 + SD15_TRAIN_ACTIVATIONS_512 * scale * bytes_per_param as f64 / 4.0;
    // One image with guidance: a batch of 2.
    let attention = attention_bytes(unet, resolution, resolution, 2);
    let vae_attention = vae_attention_bytes(resolution, resolution);
    let generate = weights as f64 + 2.0 * attention.max(vae_attention) as f64 + 0.5 * GIB * scale;
    let binding = limits.map(|l| l.max_storage_buffer_binding_size.min(l.max_buffer_size));
    let largest_generate_side = binding.map(|l| largest_side(unet, 2, l));
    let mut advice = Vec::new();
    if let (Some(limit), Some(side)) = (binding, largest_generate_side) {
        let mib = |b: u64| format!("{} MiB", b.div_ceil(1 << 20));
        if largest_tensor > limit {
            advice.push(format!(
                "The model's largest tensor has {}, more than the {} this GPU lets a shader use. {}",
                mib(largest_tensor),
                mib(limit),
                if bytes_per_param > 2 {
                    "Half-precision (f16) weights would halve it, but this GPU cannot compute in f16; try another GPU or browser."
                } else {
                    "Try another GPU or browser."
                }
            ));
        }
        let biggest = attention.max(vae_attention);
        if biggest > limit {
            let what = if attention >= vae_attention {
                "the attention"
            } else {
                "decoding the image (the VAE's attention)"
            };
            advice.push(format!(
                "At {resolution} px {what} needs a {} buffer; this GPU allows {}. Choose {side} px or less.",
                mib(biggest),
                mib(limit),
            ));
        }
    }
    FitReport {
        weights_bytes: weights,
        train_bytes: train as u64,
        generate_bytes: generate as u64,
        resolution,
        binding_limit: binding,
        largest_generate_side,
        weights_fit: binding.is_none_or(|limit| largest_tensor <= limit),
        advice,
    }
}

/// What a preset needs, from its published sizes, before anything is downloaded: weights in
/// f16 where the GPU computes in it, f32 otherwise.
pub fn preset(p: &crate::app::catalog::Preset, limits: Option<&GpuLimits>, f16: bool) -> FitReport {
    let bytes_per_param = if f16 { 2 } else { 4 };
    let unet = p.family.full_size().unet;
    estimate(
        &unet,
        p.unet_params,
        p.params,
        bytes_per_param,
        p.largest_tensor * bytes_per_param,
        p.resolution,
        limits,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_attention_at_512_is_a_gibibyte_with_guidance() {
        let unet = UNetConfig::v1_5();
        // 64x64 latents: 4096 tokens, 8 heads, batch 2 (guidance), f32.
        assert_eq!(attention_bytes(&unet, 512, 512, 2), 2 * 8 * 4096 * 4096 * 4);
        assert_eq!(attention_bytes(&unet, 256, 256, 1), 8 * 1024 * 1024 * 4);
        assert_eq!(largest_side(&unet, 2, 1 << 30), 512);
        assert_eq!(largest_side(&unet, 2, 128 << 20), 256);
        // The VAE's mid-block attention over every latent position.
        assert_eq!(vae_attention_bytes(512, 512), 4096 * 4096 * 4);
        assert_eq!(vae_attention_bytes(1024, 1024), 1 << 30);
    }

    #[test]
    fn sdxl_at_1024_needs_a_gibibyte_buffer() {
        let unet = UNetConfig::sdxl_base();
        // The first attention level is the second (64x64 latents at 1024 px): 10 heads.
        assert_eq!(
            attention_bytes(&unet, 1024, 1024, 2),
            2 * 10 * 4096 * 4096 * 4
        );
        let limits = |binding: u64| GpuLimits {
            max_buffer_size: binding,
            max_storage_buffer_binding_size: binding,
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_storage_size: 32 << 10,
        };
        let sdxl = crate::app::catalog::PRESETS
            .iter()
            .find(|p| p.family == crate::weights::Family::Sdxl)
            .unwrap();
        // WebGPU's default binding limit (128 MiB): 1024 px does not fit, 512 px does.
        let small = preset(sdxl, Some(&limits(128 << 20)), true);
        // Its largest tensor (bigG's token embeddings, 121 MiB in f16) still loads.
        assert!(small.weights_fit);
        assert_eq!(small.largest_generate_side, Some(512));
        assert!(
            small
                .advice
                .iter()
                .any(|a| a.contains("Choose 512 px or less")),
            "{:?}",
            small.advice
        );
        // A GPU that binds 2 GiB fits 1024 px; the weights are 6.5 GiB in f16.
        let big = preset(sdxl, Some(&limits(2 << 30)), true);
        assert!(big.advice.is_empty(), "{:?}", big.advice);
        assert_eq!(big.largest_generate_side, Some(1088));
        let gib = big.weights_bytes as f64 / GIB;
        assert!((gib - 6.46).abs() < 0.01, "{gib}");
        // Without f16 the weights double, and training at 1024 px needs far more.
        let f32_report = preset(sdxl, Some(&limits(2 << 30)), false);
        assert_eq!(f32_report.weights_bytes, 2 * big.weights_bytes);
        assert!(f32_report.train_bytes > 4 * f32_report.weights_bytes);
    }

    #[test]
    fn advice_says_what_to_change() {
        let unet = UNetConfig::v1_5();
        let limits = GpuLimits {
            max_buffer_size: 1 << 30,
            max_storage_buffer_binding_size: 128 << 20,
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_storage_size: 32 << 10,
        };
        let total = 859_520_964 + 123_060_480 + 83_653_863;
        let f32_report = estimate(
            &unet,
            859_520_964,
            total,
            4,
            151_781_376,
            512,
            Some(&limits),
        );
        assert_eq!(f32_report.advice.len(), 2, "{:?}", f32_report.advice);
        assert!(
            !f32_report.weights_fit,
            "a 145 MiB tensor over a 128 MiB binding"
        );
        assert!(f32_report.advice[0].contains("largest tensor"));
        assert!(f32_report.advice[1].contains("Choose 256 px or less"));
        // The measured figure: 14.5 GiB at 512 px in f32.
        let gib = f32_report.train_bytes as f64 / GIB;
        assert!((gib - 14.4).abs() < 0.3, "{gib}");
        let fine = estimate(&unet, 859_520_964, total, 2, 75_890_688, 256, Some(&limits));
        assert!(fine.advice.is_empty(), "{:?}", fine.advice);
        assert!(fine.weights_fit);
        assert!(fine.train_bytes < f32_report.train_bytes / 4);
    }
}
