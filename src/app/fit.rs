//! Whether a model and a resolution fit a GPU, estimated before any work. WebGPU tells no
//! memory size, only buffer limits: the hard check is the largest buffer that cannot be split
//! (token tables load in row chunks and attention runs in query chunks, see `nn` and
//! `unet::attention`; the VAE decoder's full-size activations and the feed-forward's stay
//! whole), the memory figures are estimates to compare with the GPU's.

use serde::{Deserialize, Serialize};

use crate::config::{SdConfig, UNetConfig, VaeConfig};
use crate::device::GpuLimits;

/// SD 1.5's UNet, whose measured training memory the estimates scale from.
const SD15_UNET_PARAMS: f64 = 859_520_964.0;
/// Training activations of SD 1.5 at 512 px with f32 weights (measured: 14.5 GiB peak with
/// 4.1 GiB of weights).
const SD15_TRAIN_ACTIVATIONS_512: f64 = 10.4 * GIB;
const GIB: f64 = (1u64 << 30) as f64;

/// Pixels per latent position: the VAE halves the size at every level but the last.
fn latent_scale(vae: &VaeConfig) -> usize {
    1 << vae.block_out_channels.len().saturating_sub(1)
}

/// The largest attention-score buffer, `[batch, heads, tokens, tokens]` in f32, of the
/// UNet's first attention level at `width` x `height` pixels, were it computed whole.
pub fn attention_bytes(unet: &UNetConfig, width: usize, height: usize, batch: usize) -> u64 {
    let Some(level) = first_attention_level(unet) else {
        return 0;
    };
    let tokens = ((width / 8) >> level) as u64 * ((height / 8) >> level) as u64;
    batch as u64 * unet.heads(level) as u64 * tokens * tokens * 4
}

fn first_attention_level(unet: &UNetConfig) -> Option<usize> {
    unet.down_block_types
        .iter()
        .position(|t| t.contains("Attn"))
}

/// The VAE decoder's attention-score buffer, `[1, 1, tokens, tokens]` in f32, were it
/// computed whole: its mid-block attends over every latent position (one head), which at
/// 1024 px is 16384 tokens, 1 GiB.
pub fn vae_attention_bytes(width: usize, height: usize) -> u64 {
    let tokens = (width / 8) as u64 * (height / 8) as u64;
    tokens * tokens * 4
}

/// The VAE decoder's widest activation, at full size: the second level's channels upsampled
/// (256 for every published VAE), normed in f32 whatever the weights' dtype. 256 MiB at
/// 512 px: no chunking splits it.
pub fn vae_decode_bytes(vae: &VaeConfig, width: usize, height: usize) -> u64 {
    let channels = vae.block_out_channels.iter().take(2).max().copied();
    channels.unwrap_or(0) as u64 * width as u64 * height as u64 * 4
}

/// The UNet's widest activation: the GEGLU projection of the first attention level's
/// feed-forward, `[batch, tokens, 8 * channels]` in f32.
pub fn feed_forward_bytes(config: &SdConfig, width: usize, height: usize, batch: usize) -> u64 {
    let Some(level) = first_attention_level(&config.unet) else {
        return 0;
    };
    let scale = latent_scale(&config.vae) << level;
    let tokens = (width / scale) as u64 * (height / scale) as u64;
    batch as u64 * tokens * 8 * config.unet.block_out_channels[level] as u64 * 4
}

/// The largest buffer generating `images` images with guidance (a UNet batch twice as large;
/// the VAE decodes them together) binds at `width` x `height`.
pub fn generate_buffer(config: &SdConfig, width: usize, height: usize, images: usize) -> u64 {
    let decode = images as u64 * vae_decode_bytes(&config.vae, width, height);
    feed_forward_bytes(config, width, height, 2 * images).max(decode)
}

/// The largest buffer a training step binds at `resolution`: the VAE encoder's first level
/// (its channels at full size, normed in f32) or the feed-forward of one noisy latent.
pub fn train_buffer(config: &SdConfig, resolution: usize) -> u64 {
    let channels = config.vae.block_out_channels.first().copied().unwrap_or(0) as u64;
    let encode = channels * resolution as u64 * resolution as u64 * 4;
    feed_forward_bytes(config, resolution, resolution, 1).max(encode)
}

/// The largest square side (a multiple of 64) at which `images` images fit `limit` bytes.
pub fn largest_side(config: &SdConfig, images: usize, limit: u64) -> usize {
    largest_fitting(limit, |side| generate_buffer(config, side, side, images))
}

/// The largest training resolution (a multiple of 64) that fits `limit` bytes.
pub fn largest_train_side(config: &SdConfig, limit: u64) -> usize {
    largest_fitting(limit, |side| train_buffer(config, side))
}

fn largest_fitting(limit: u64, need: impl Fn(usize) -> u64) -> usize {
    let mut side = 64;
    while side < 4096 && need(side + 64) <= limit {
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
/// `bytes_per_param`, whose largest tensor other than the token tables (which load in row
/// chunks) has `largest_tensor` bytes, at `resolution`.
pub fn estimate(
    config: &SdConfig,
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
    let attention = attention_bytes(&config.unet, resolution, resolution, 2);
    let vae_attention = vae_attention_bytes(resolution, resolution);
    let generate = weights as f64 + 2.0 * attention.max(vae_attention) as f64 + 0.5 * GIB * scale;
    let binding = limits.map(|l| l.max_storage_buffer_binding_size.min(l.max_buffer_size));
    let largest_generate_side = binding.map(|l| largest_side(config, 1, l));
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
        let feed_forward = feed_forward_bytes(config, resolution, resolution, 2);
        let decode = vae_decode_bytes(&config.vae, resolution, resolution);
        let biggest = feed_forward.max(decode);
        if biggest > limit {
            let what = if feed_forward >= decode {
                "the UNet's feed-forward"
            } else {
                "decoding the image (the VAE)"
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
    estimate(
        &p.family.full_size(),
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

    fn limits(binding: u64) -> GpuLimits {
        GpuLimits {
            max_buffer_size: binding,
            max_storage_buffer_binding_size: binding,
            max_compute_invocations_per_workgroup: 256,
            max_compute_workgroup_storage_size: 32 << 10,
        }
    }

    #[test]
    fn sd15_buffers_at_512() {
        let sd15 = SdConfig::v1_5();
        // Were it whole: 64x64 latents, 4096 tokens, 8 heads, batch 2 (guidance), f32.
        assert_eq!(
            attention_bytes(&sd15.unet, 512, 512, 2),
            2 * 8 * 4096 * 4096 * 4
        );
        assert_eq!(vae_attention_bytes(512, 512), 4096 * 4096 * 4);
        // What stays whole: the VAE decoder's 256 channels at 512x512, the first level's
        // GEGLU projection (2 x 4096 tokens x 2560).
        assert_eq!(vae_decode_bytes(&sd15.vae, 512, 512), 256 << 20);
        assert_eq!(feed_forward_bytes(&sd15, 512, 512, 2), 80 << 20);
        assert_eq!(generate_buffer(&sd15, 512, 512, 1), 256 << 20);
        assert_eq!(generate_buffer(&sd15, 512, 512, 2), 512 << 20);
        assert_eq!(largest_side(&sd15, 1, 1 << 30), 1024);
        // WebGPU's default binding limit.
        assert_eq!(largest_side(&sd15, 1, 128 << 20), 320);
        // Training encodes the photo: 128 channels at 512x512 in f32, exactly 128 MiB.
        assert_eq!(train_buffer(&sd15, 512), 128 << 20);
        assert_eq!(largest_train_side(&sd15, 128 << 20), 512);
    }

    #[test]
    fn sdxl_at_1024_needs_a_gibibyte_buffer() {
        let sdxl_config = SdConfig::sdxl_base();
        // The first attention level is the second (64x64 tokens at 1024 px, 640 channels).
        assert_eq!(feed_forward_bytes(&sdxl_config, 1024, 1024, 2), 160 << 20);
        assert_eq!(generate_buffer(&sdxl_config, 1024, 1024, 1), 1 << 30);
        let sdxl = crate::app::catalog::PRESETS
            .iter()
            .find(|p| p.family == crate::weights::Family::Sdxl)
            .unwrap();
        // WebGPU's default binding limit (128 MiB): 1024 px does not fit, 320 px does.
        let small = preset(sdxl, Some(&limits(128 << 20)), true);
        // Its token tables load in row chunks; its largest whole tensor is 56 MiB in f16.
        assert!(small.weights_fit);
        assert_eq!(small.largest_generate_side, Some(320));
        assert!(
            small
                .advice
                .iter()
                .any(|a| a.contains("Choose 320 px or less")),
            "{:?}",
            small.advice
        );
        // The README's example.
        let half = preset(sdxl, Some(&limits(512 << 20)), true);
        assert_eq!(
            half.advice,
            [
                "At 1024 px decoding the image (the VAE) needs a 1024 MiB buffer; this GPU allows 512 MiB. Choose 704 px or less."
            ]
        );
        assert_eq!(
            preset(sdxl, Some(&limits(1 << 30)), true).largest_generate_side,
            Some(1024)
        );
        // A GPU that binds 2 GiB fits 1024 px; the weights are 6.5 GiB in f16.
        let big = preset(sdxl, Some(&limits(2 << 30)), true);
        assert!(big.advice.is_empty(), "{:?}", big.advice);
        assert_eq!(big.largest_generate_side, Some(1408));
        let gib = big.weights_bytes as f64 / GIB;
        assert!((gib - 6.46).abs() < 0.01, "{gib}");
        // Without f16 the weights double, and training at 1024 px needs far more.
        let f32_report = preset(sdxl, Some(&limits(2 << 30)), false);
        assert_eq!(f32_report.weights_bytes, 2 * big.weights_bytes);
        assert!(f32_report.train_bytes > 4 * f32_report.weights_bytes);
    }

    #[test]
    fn advice_says_what_to_change() {
        let sd15 = SdConfig::v1_5();
        let limits = limits(128 << 20);
        let total = 859_520_964 + 123_060_480 + 83_653_863;
        // Its largest whole tensor, a 2560-to-1280 3x3 convolution, in f32: 112.5 MiB.
        let largest = 1280 * 2560 * 9 * 4;
        let f32_report = estimate(&sd15, 859_520_964, total, 4, largest, 512, Some(&limits));
        assert!(
            f32_report.weights_fit,
            "the token tables load in row chunks"
        );
        assert_eq!(f32_report.advice.len(), 1, "{:?}", f32_report.advice);
        assert!(f32_report.advice[0].contains("decoding the image"));
        assert!(f32_report.advice[0].contains("Choose 320 px or less"));
        // The measured figure: 14.5 GiB at 512 px in f32.
        let gib = f32_report.train_bytes as f64 / GIB;
        assert!((gib - 14.4).abs() < 0.3, "{gib}");
        let fine = estimate(
            &sd15,
            859_520_964,
            total,
            2,
            largest / 2,
            256,
            Some(&limits),
        );
        assert!(fine.advice.is_empty(), "{:?}", fine.advice);
        assert!(fine.weights_fit);
        assert!(fine.train_bytes < f32_report.train_bytes / 4);
        // A tensor that must stay whole and does not fit is said so.
        let tight = estimate(
            &sd15,
            859_520_964,
            total,
            4,
            largest,
            256,
            Some(&limits_of(32)),
        );
        assert!(!tight.weights_fit);
        assert!(
            tight.advice[0].contains("largest tensor"),
            "{:?}",
            tight.advice
        );
    }

    fn limits_of(mib: u64) -> GpuLimits {
        limits(mib << 20)
    }
}
