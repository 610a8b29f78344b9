//! Whether a model and a resolution fit a GPU, estimated before any work. WebGPU tells no
//! memory size, only buffer limits: the hard check is the largest buffer that cannot be split
//! (token tables load in row chunks, attention runs in query chunks and the VAE decodes in
//! tiles, see `nn`, `unet::attention` and `VaeConfig::decode_plan`; the UNet's own
//! activations stay whole), the memory figures are estimates to compare with the GPU's.

use serde::{Deserialize, Serialize};

use super::memory::{self, Need, Work};
use crate::config::SdConfig;

const GIB: f64 = (1u64 << 30) as f64;

/// The UNet's widest activation that stays whole: where a level's skip connection joins the
/// output of the level below it on the way up (`[batch, C(l) + C(l + 1), tokens(l)]`, normed
/// in f32; at the first level, 320 + 640 channels for SD 1.x, 2.x and SDXL). The
/// feed-forward's GEGLU projection, 8 x a level's channels, splits into token chunks
/// (`unet::attention`).
pub fn unet_bytes(config: &SdConfig, width: usize, height: usize, batch: usize) -> u64 {
    let channels = &config.unet.block_out_channels;
    let scale = config.vae.latent_scale();
    let (w, h) = ((width / scale) as u64, (height / scale) as u64);
    (0..channels.len())
        .map(|level| {
            let below = channels[(level + 1).min(channels.len() - 1)];
            let tokens = (w >> level) * (h >> level);
            batch as u64 * tokens * (channels[level] + below) as u64 * 4
        })
        .max()
        .unwrap_or(0)
}

/// The largest buffer generating `images` images with guidance (a UNet batch twice as large;
/// the VAE decodes them together) binds at `width` x `height`.
pub fn generate_buffer(config: &SdConfig, width: usize, height: usize, images: usize) -> u64 {
    let work = Work::Generate {
        width,
        height,
        images,
    };
    buffer(config, work).0
}

/// The largest buffer a training step binds at `resolution`: the VAE encoder's first level
/// (its channels at full size, normed in f32) or the UNet's widest of one noisy latent.
pub fn train_buffer(config: &SdConfig, resolution: usize) -> u64 {
    let channels = config.vae.block_out_channels.first().copied().unwrap_or(0) as u64;
    let encode = channels * resolution as u64 * resolution as u64 * 4;
    unet_bytes(config, resolution, resolution, 1).max(encode)
}

/// The largest square side (a multiple of 64) at which `images` images fit `limit` bytes.
pub fn largest_side(config: &SdConfig, images: usize, limit: u64) -> usize {
    largest_fitting(limit, |side| generate_buffer(config, side, side, images))
}

fn largest_fitting(limit: u64, need: impl Fn(usize) -> u64) -> usize {
    let mut side = 64;
    while side < 4096 && need(side + 64) <= limit {
        side += 64;
    }
    side
}

/// What a GPU offers a run, as far as it is known.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Budget {
    /// The largest buffer one shader may bind (wgpu, WebGPU).
    pub binding: Option<u64>,
    /// The GPU's memory, where the API tells it (CUDA) or the user did (the page's
    /// `?gpu-memory-mib=N`).
    pub memory: Option<u64>,
    /// The GPU computes in f16: half-precision weights are a way out.
    pub f16: bool,
    /// burn's CPU backend (see `memory::Target`).
    pub cpu: bool,
}

impl Budget {
    /// A device's budget.
    pub fn of(info: &crate::device::DeviceInfo) -> Self {
        Self {
            binding: info
                .limits
                .as_ref()
                .map(|l| l.max_storage_buffer_binding_size.min(l.max_buffer_size)),
            memory: info.memory_bytes,
            f16: info.f16,
            cpu: info.backend == crate::device::Backend::Cpu,
        }
    }

    /// What is left for a model and its runs beside `resident` bytes that stay on the GPU
    /// (a CLIP model that scores the images).
    pub fn beside(self, resident: u64) -> Self {
        Self {
            memory: self.memory.map(|m| m.saturating_sub(resident)),
            ..self
        }
    }

    fn target(&self) -> memory::Target {
        memory::Target {
            binding: self.binding,
            cpu: self.cpu,
        }
    }
}

/// GiB with a decimal from 1 GiB up, whole MiB below.
pub fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / GIB)
    } else {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// What `work` is, in words.
fn describe(work: Work) -> String {
    match work {
        Work::Generate {
            width,
            height,
            images: 1,
        } => format!("Generating at {width}x{height}"),
        Work::Generate {
            width,
            height,
            images,
        } => format!("Generating {images} images at {width}x{height}"),
        Work::Train {
            resolution,
            checkpointing,
        } => format!(
            "Training at {resolution} px{}",
            if checkpointing {
                " with gradient checkpointing"
            } else {
                ""
            }
        ),
    }
}

/// The largest buffer `work` binds that no chunking splits, and what it holds.
fn buffer(config: &SdConfig, work: Work) -> (u64, &'static str) {
    match work {
        Work::Generate {
            width,
            height,
            images,
        } => {
            let unet = unet_bytes(config, width, height, 2 * images);
            // Decoding splits down to one tile of the smallest size.
            let decode = config.vae.decode_bytes_unsplit(width, height);
            if unet >= decode {
                (unet, "the UNet's widest layer")
            } else {
                (decode, "decoding the image (the VAE)")
            }
        }
        Work::Train { resolution, .. } => {
            let unet = unet_bytes(config, resolution, resolution, 1);
            let need = train_buffer(config, resolution);
            if need == unet {
                (need, "the UNet's widest layer")
            } else {
                (need, "encoding the photo (the VAE)")
            }
        }
    }
}

/// The verdict on a run before it starts, from the model's config and parameter count: the
/// buffers it binds against the binding limit and its memory (`memory::need`) against the
/// GPU's, where known. `Err` says what does not fit and what to change.
pub fn check(
    config: &SdConfig,
    params: u64,
    weight_bytes: u64,
    work: Work,
    budget: Budget,
) -> Result<Need, String> {
    let need = |work: Work, weight_bytes: u64| {
        memory::need(config, params, weight_bytes, work, budget.target())
    };
    let images = match work {
        Work::Generate { images, .. } if images > 1 => ", or fewer images at once",
        _ => "",
    };
    if let Some(limit) = budget.binding {
        let (biggest, what) = buffer(config, work);
        if biggest > limit {
            let side = largest_fitting(limit, |side| buffer(config, work.at(side)).0);
            return Err(format!(
                "{}: {what} needs a {} buffer; this GPU allows {}. Choose {side} px or less{images}.",
                describe(work),
                mib(biggest),
                mib(limit),
            ));
        }
    }
    let wanted = need(work, weight_bytes);
    let Some(memory) = budget.memory else {
        return Ok(wanted);
    };
    if wanted.total() <= memory {
        return Ok(wanted);
    }
    let mut ways = Vec::new();
    let fits = |work: Work, bytes: u64| need(work, bytes).total() <= memory;
    if fits(work.at(64), weight_bytes) {
        let side = largest_fitting(memory, |side| need(work.at(side), weight_bytes).total());
        ways.push(format!("choose {side} px or less{images}"));
    }
    if let Work::Train {
        resolution,
        checkpointing: false,
    } = work
    {
        let on = Work::Train {
            resolution,
            checkpointing: true,
        };
        if fits(on, weight_bytes) {
            ways.push(format!(
                "train with gradient checkpointing (about {})",
                gib(need(on, weight_bytes).total())
            ));
        }
    }
    if weight_bytes > 2 && budget.f16 && fits(work, 2) {
        ways.push(format!(
            "use f16 weights (about {})",
            gib(need(work, 2).total())
        ));
    }
    let change = if ways.is_empty() {
        "It does not fit at any size: try a smaller model or another GPU".to_string()
    } else {
        let ways = ways.join(", or ");
        let mut chars = ways.chars();
        chars
            .next()
            .map_or(String::new(), |c| c.to_uppercase().chain(chars).collect())
    };
    Err(format!(
        "{} needs about {} of GPU memory ({} of weights); this GPU has {}. {change}.",
        describe(work),
        gib(wanted.total()),
        gib(wanted.weights),
        gib(memory),
    ))
}

/// What a loaded model needs, for the GPU panel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// The weights on the GPU.
    pub weights_bytes: u64,
    /// Estimated peak while training at `resolution` (checkpointed, as the page trains).
    pub train_bytes: u64,
    /// Estimated peak while generating one image at `resolution` with guidance.
    pub generate_bytes: u64,
    /// The size the estimates are for (the model's own).
    pub resolution: usize,
    /// The largest buffer one shader may bind, where known.
    pub binding_limit: Option<u64>,
    /// The GPU's memory, where known.
    pub memory_bytes: Option<u64>,
    /// The largest square image that fits the binding limit, for one image with guidance.
    pub largest_generate_side: Option<usize>,
    /// Every weight tensor fits the binding limit (or none is known), and the weights the
    /// memory: the model can load.
    pub weights_fit: bool,
    /// Problems and what to change; empty when it fits.
    pub advice: Vec<String>,
}

/// Estimates what a model with `params` parameters (all three models) stored at
/// `bytes_per_param`, whose largest tensor other than the token tables (which load in row
/// chunks) has `largest_tensor` bytes, needs at `resolution`.
pub fn estimate(
    config: &SdConfig,
    params: u64,
    bytes_per_param: u64,
    largest_tensor: u64,
    resolution: usize,
    budget: Budget,
) -> FitReport {
    let generate = Work::Generate {
        width: resolution,
        height: resolution,
        images: 1,
    };
    let train = Work::Train {
        resolution,
        checkpointing: true,
    };
    let need = |work| memory::need(config, params, bytes_per_param, work, budget.target());
    let weights = params * bytes_per_param;
    let mut advice = Vec::new();
    if let Some(limit) = budget.binding
        && largest_tensor > limit
    {
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
    let weights_in_memory = budget.memory.is_none_or(|m| weights <= m);
    if !weights_in_memory {
        advice.push(format!(
            "The weights alone need {}, and this GPU has {}: try a smaller model or another GPU.",
            gib(weights),
            gib(budget.memory.unwrap_or(0))
        ));
    } else if let Err(e) = check(config, params, bytes_per_param, generate, budget) {
        advice.push(e);
    }
    FitReport {
        weights_bytes: weights,
        train_bytes: need(train).total(),
        generate_bytes: need(generate).total(),
        resolution,
        binding_limit: budget.binding,
        memory_bytes: budget.memory,
        largest_generate_side: budget.binding.map(|l| largest_side(config, 1, l)),
        weights_fit: budget.binding.is_none_or(|limit| largest_tensor <= limit)
            && weights_in_memory,
        advice,
    }
}

/// What a preset needs, from its published sizes, before anything is downloaded: weights in
/// f16 where the GPU computes in it, f32 otherwise.
pub fn preset(p: &crate::app::catalog::Preset, budget: Budget) -> FitReport {
    let bytes_per_param = if budget.f16 { 2 } else { 4 };
    estimate(
        &p.family.full_size(),
        p.params,
        bytes_per_param,
        p.largest_tensor * bytes_per_param,
        p.resolution,
        budget,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::catalog::PRESETS;
    use crate::config::DecodePlan;
    use crate::weights::Family;

    fn binding(bytes: u64) -> Budget {
        Budget {
            binding: Some(bytes),
            memory: None,
            f16: true,
            cpu: false,
        }
    }

    fn memory(gib: u64, f16: bool) -> Budget {
        Budget {
            binding: None,
            memory: Some(gib << 30),
            f16,
            cpu: false,
        }
    }

    #[test]
    fn a_clip_model_beside_the_model_leaves_less_memory() {
        // ViT-L/14 in f16 beside SD 1.5 in f16 on a 4 GiB GPU.
        let clip = 427_616_512 * 2;
        let sd = family(Family::Sd1);
        let gpu = Budget {
            memory: Some(2560 << 20),
            ..memory(0, true)
        };
        assert_eq!(gpu.beside(clip).memory, Some((2560 << 20) - clip));
        assert_eq!(memory(1, true).beside(2 << 30).memory, Some(0));
        assert_eq!(binding(1 << 20).beside(clip), binding(1 << 20));
        // SD 1.5's 2.1 GB of f16 weights load on 2.5 GiB alone, not beside CLIP's 0.86 GB.
        let (alone, beside) = (preset(sd, gpu), preset(sd, gpu.beside(clip)));
        assert!(alone.weights_fit, "{alone:?}");
        assert!(!beside.weights_fit, "{beside:?}");
    }

    fn family(family: Family) -> &'static crate::app::catalog::Preset {
        PRESETS.iter().find(|p| p.family == family).unwrap()
    }

    #[test]
    fn sd15_buffers_at_512() {
        let sd15 = SdConfig::v1_5();
        // The VAE decoder's widest activation, 256 channels at 512x512, splits into images and
        // then tiles (45 latent positions, 360 px, under WebGPU's default binding limit); what
        // stays whole is the first level's skip joining the second's output (2 x 4096 tokens
        // x 960 channels).
        assert_eq!(sd15.vae.decode_bytes(1, 512, 512), 256 << 20);
        let limit = Some(128 << 20);
        assert_eq!(
            sd15.vae.decode_plan(1, 512, 512, limit),
            DecodePlan::Tiles(45)
        );
        assert_eq!(
            sd15.vae.decode_plan(2, 320, 320, limit),
            DecodePlan::EachImage
        );
        assert_eq!(sd15.vae.decode_plan(2, 512, 512, None), DecodePlan::Whole);
        assert_eq!(unet_bytes(&sd15, 512, 512, 2), 30 << 20);
        assert_eq!(generate_buffer(&sd15, 512, 512, 1), 30 << 20);
        assert_eq!(generate_buffer(&sd15, 512, 512, 2), 60 << 20);
        assert_eq!(largest_side(&sd15, 1, 1 << 30), 2944);
        // WebGPU's default binding limit.
        assert_eq!(largest_side(&sd15, 1, 128 << 20), 1024);
        // Training encodes the photo: 128 channels at 512x512 in f32, exactly 128 MiB.
        assert_eq!(train_buffer(&sd15, 512), 128 << 20);
    }

    #[test]
    fn sdxl_at_1024_fits_webgpus_default_binding_limit() {
        let sdxl_config = SdConfig::sdxl_base();
        // The VAE decodes in tiles where its 1 GiB does not fit; the UNet's widest layer is its
        // first level's 320 + 640 channels at 128 x 128 tokens.
        assert_eq!(generate_buffer(&sdxl_config, 1024, 1024, 1), 120 << 20);
        let sdxl = family(Family::Sdxl);
        // WebGPU's default binding limit (128 MiB): 1024 px fits. Its token tables load in
        // row chunks; its largest whole tensor is 56 MiB in f16.
        let small = preset(sdxl, binding(128 << 20));
        assert!(small.weights_fit);
        assert!(small.advice.is_empty(), "{:?}", small.advice);
        assert_eq!(small.largest_generate_side, Some(1024));
        // The README's example.
        let tiny = preset(sdxl, binding(64 << 20));
        assert!(tiny.weights_fit);
        assert_eq!(
            tiny.advice,
            [
                "Generating at 1024x1024: the UNet's widest layer needs a 120 MiB buffer; this GPU allows 64 MiB. Choose 704 px or less."
            ]
        );
        assert_eq!(
            preset(sdxl, binding(1 << 30)).largest_generate_side,
            Some(2944)
        );
        // A GPU that binds 2 GiB; the weights are 6.5 GiB in f16.
        let big = preset(sdxl, binding(2 << 30));
        assert!(big.advice.is_empty(), "{:?}", big.advice);
        assert_eq!(big.largest_generate_side, Some(4096));
        let gib = big.weights_bytes as f64 / GIB;
        assert!((gib - 6.46).abs() < 0.01, "{gib}");
        // Without f16 the weights double.
        let f32_report = preset(
            sdxl,
            Budget {
                f16: false,
                ..binding(2 << 30)
            },
        );
        assert_eq!(f32_report.weights_bytes, 2 * big.weights_bytes);
        assert!(f32_report.train_bytes > f32_report.weights_bytes);
    }

    #[test]
    fn advice_says_what_to_change() {
        let sd15 = SdConfig::v1_5();
        let limits = binding(128 << 20);
        let total = 859_520_964 + 123_060_480 + 83_653_863;
        // Its largest whole tensor, a 2560-to-1280 3x3 convolution, in f32: 112.5 MiB.
        let largest = 1280 * 2560 * 9 * 4;
        let f32_report = estimate(&sd15, total, 4, largest, 1280, limits);
        assert!(
            f32_report.weights_fit,
            "the token tables load in row chunks"
        );
        assert_eq!(f32_report.advice.len(), 1, "{:?}", f32_report.advice);
        assert!(f32_report.advice[0].contains("the UNet's widest layer"));
        assert!(f32_report.advice[0].contains("Choose 1024 px or less"));
        assert!(
            estimate(&sd15, total, 4, largest, 512, limits)
                .advice
                .is_empty()
        );
        let fine = estimate(&sd15, total, 2, largest / 2, 256, limits);
        assert!(fine.advice.is_empty(), "{:?}", fine.advice);
        assert!(fine.weights_fit);
        assert!(fine.train_bytes < f32_report.train_bytes);
        // A tensor that must stay whole and does not fit is said so.
        let tight = estimate(&sd15, total, 4, largest, 256, binding(32 << 20));
        assert!(!tight.weights_fit);
        assert!(
            tight.advice[0].contains("largest tensor"),
            "{:?}",
            tight.advice
        );
    }

    /// An 8 GB GPU is told before the download that SDXL's weights fit but generating at
    /// 1024 px does not with f32 weights, and what would.
    #[test]
    fn memory_is_weighed_before_a_download() {
        let sdxl = family(Family::Sdxl);
        let f32_only = preset(sdxl, memory(8, false));
        assert!(!f32_only.weights_fit, "12.9 GiB of f32 weights on 8 GiB");
        assert!(
            f32_only.advice[0].contains("The weights alone need 12.9 GiB"),
            "{:?}",
            f32_only.advice
        );
        // In f16 the weights fit, but decoding at 1024 px does not: a smaller size does.
        let f16 = preset(sdxl, memory(8, true));
        assert!(f16.weights_fit);
        assert_eq!(
            f16.advice,
            [
                "Generating at 1024x1024 needs about 8.8 GiB of GPU memory (6.5 GiB of weights); this GPU has 8.0 GiB. Choose 832 px or less."
            ]
        );
        assert_eq!(f16.memory_bytes, Some(8 << 30));
        assert!(preset(sdxl, memory(12, true)).advice.is_empty());
        // SD 1.5 in f16 on a 4 GiB GPU: generation fits, training at 512 px does not.
        let sd15 = family(Family::Sd1);
        let small = preset(sd15, memory(4, true));
        assert!(small.advice.is_empty(), "{:?}", small.advice);
        assert!(small.train_bytes > 4 << 30, "{}", small.train_bytes);
    }

    #[test]
    fn a_run_too_large_for_the_memory_says_what_to_change() {
        let sd15 = SdConfig::v1_5();
        let params = family(Family::Sd1).params;
        let train = |resolution, checkpointing| Work::Train {
            resolution,
            checkpointing,
        };
        // 12 GiB, f32 on a GPU: 512 px fits only with checkpointing or f16 (the CPU backend
        // measured 14.5 and 10.6 GiB, with weight copies a GPU does not make).
        let e = check(&sd15, params, 4, train(512, false), memory(12, true)).unwrap_err();
        assert_eq!(
            e,
            "Training at 512 px needs about 13.0 GiB of GPU memory (4.0 GiB of weights); this GPU has 12.0 GiB. Choose 448 px or less, or train with gradient checkpointing (about 8.9 GiB), or use f16 weights (about 7.8 GiB)."
        );
        assert!(check(&sd15, params, 4, train(512, true), memory(12, true)).is_ok());
        // Where the GPU cannot compute in f16, f16 is not offered.
        let e = check(&sd15, params, 4, train(512, true), memory(8, false)).unwrap_err();
        assert!(!e.contains("f16"), "{e}");
        assert!(
            e.ends_with("this GPU has 8.0 GiB. Choose 448 px or less."),
            "{e}"
        );
        // Weights that do not fit at all.
        let e = check(&sd15, params, 4, train(64, true), memory(2, false)).unwrap_err();
        assert!(
            e.ends_with("It does not fit at any size: try a smaller model or another GPU."),
            "{e}"
        );
        // Several images: fewer at once is a way out too.
        let four = Work::Generate {
            width: 512,
            height: 512,
            images: 4,
        };
        let e = check(&sd15, params, 4, four, memory(6, false)).unwrap_err();
        assert!(e.contains("or less, or fewer images at once"), "{e}");
        // Unknown memory: only the binding limit is checked.
        assert!(check(&sd15, params, 4, four, Budget::default()).is_ok());
    }
}
