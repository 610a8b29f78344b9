//! How much memory a run needs, estimated from the model's config before it starts: the
//! weights, plus the activations of a generation or a training step. The activations follow
//! the UNet's structure (channels and tokens per level, resnets and transformer layers, the
//! self-attention scores) and the VAE decoder's full-size layers; the constants that weigh
//! them are fitted to measured peaks (`bench/memory/peaks.csv`, refitted by
//! `bench/memory/fit.py`), and the tests hold every measured peak within 15% of the model.

use crate::config::{SdConfig, UNetConfig};

const GIB: f64 = (1u64 << 30) as f64;

/// What is about to run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Work {
    /// `images` images of `width` x `height` with guidance (a UNet batch of `2 * images`;
    /// the VAE decodes the images together where they fit the binding limit).
    Generate {
        /// Pixels.
        width: usize,
        /// Pixels.
        height: usize,
        /// Images at once.
        images: usize,
    },
    /// A training step at `resolution` (one photo), with or without gradient checkpointing.
    Train {
        /// The photo's side in pixels.
        resolution: usize,
        /// Burn's gradient checkpointing: activations recomputed in the backward pass.
        checkpointing: bool,
    },
}

impl Work {
    /// The same work at another square size.
    pub fn at(self, side: usize) -> Self {
        match self {
            Work::Generate { images, .. } => Work::Generate {
                width: side,
                height: side,
                images,
            },
            Work::Train { checkpointing, .. } => Work::Train {
                resolution: side,
                checkpointing,
            },
        }
    }
}

/// An estimate, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Need {
    /// The weights of all models.
    pub weights: u64,
    /// Everything else at the run's peak: activations, kept tensors, the runtime's own.
    pub activations: u64,
}

impl Need {
    /// Weights and activations.
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}

/// The fitted constants (`bench/memory/fit.py` prints them from the measured peaks), in GiB
/// at 4 bytes an element.
mod fitted {
    /// What a generation keeps whatever the size: the runtime's own, the text states, the
    /// latents, allocator slack.
    pub const GENERATE_BASE: f64 = 0.0422;
    /// Live copies of the VAE decoder's widest activation while it decodes.
    pub const GENERATE_VAE: f64 = 4.5826;
    /// Copies of every UNet activation a training step keeps for its backward pass,
    /// without and with checkpointing.
    pub const TRAIN_UNET: f64 = 41.6375;
    pub const TRAIN_UNET_CHECKPOINTED: f64 = 32.2176;
    /// Copies of the transformer layers' weights (in the compute dtype) a training step on
    /// the CPU backend holds beside the weights: SDXL's steps held 6-7 GiB more than their
    /// activations explain, about the size of its transformer weights in f16, nearly
    /// whatever the size; lavapipe's SD 1.5 step held none.
    pub const TRAIN_CPU_WEIGHT_COPIES: f64 = 1.3879;
}

/// Elements of one UNet pass's activations, summed over its layers, and of its
/// self-attention scores (whole), for a batch of `batch` at `width` x `height` pixels.
/// A transformer layer weighs as 2.5 resnets: its projections, norms and the GEGLU
/// feed-forward (8 x channels wide) keep about that many tensors of the level's size.
fn unet_elements(
    unet: &UNetConfig,
    scale: usize,
    width: usize,
    height: usize,
    batch: usize,
) -> (f64, f64) {
    let levels = unet.block_out_channels.len();
    let mut activations = 0.0;
    let mut scores = 0.0;
    for (level, &channels) in unet.block_out_channels.iter().enumerate() {
        let tokens = ((width / scale) >> level) as f64 * ((height / scale) >> level) as f64;
        // The down block's resnets and the up block's one more; the mid block's two.
        let mut resnets = 2 * unet.layers_per_block + 1;
        if level == levels - 1 {
            resnets += 2;
        }
        let transformers = transformer_layers(unet, level);
        activations += channels as f64 * tokens * (resnets as f64 + 2.5 * transformers as f64);
        scores += unet.heads(level) as f64 * tokens * tokens * transformers as f64;
    }
    (activations * batch as f64, scores * batch as f64)
}

/// Elements of the UNet's transformer layers' weights: self-attention 4 C^2, cross-attention
/// 2 C^2 + 2 C x context, the GEGLU feed-forward 12 C^2.
fn transformer_weights(unet: &UNetConfig) -> f64 {
    let context = unet.cross_attention_dim as f64;
    let mut total = 0.0;
    for (level, &channels) in unet.block_out_channels.iter().enumerate() {
        let c = channels as f64;
        total += transformer_layers(unet, level) as f64 * (18.0 * c * c + 2.0 * c * context);
    }
    total
}

/// Transformer layers at a UNet level: the down block's and the up block's one more where
/// the level attends, and the mid block's at the last level.
fn transformer_layers(unet: &UNetConfig, level: usize) -> usize {
    let depth = unet.transformer_layers_per_block.get(level);
    let mut layers = if unet.down_block_types[level].contains("Attn") {
        depth * (2 * unet.layers_per_block + 1)
    } else {
        0
    };
    if level == unet.block_out_channels.len() - 1 {
        layers += depth;
    }
    layers
}

/// Where a run computes: what the memory model needs to know of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Target {
    /// The largest buffer one shader may bind: attention runs in query chunks under it
    /// (`unet::attention`) and the VAE decodes in tiles (`VaeConfig::decode_plan`); `None`
    /// where neither is split.
    pub binding: Option<u64>,
    /// burn's CPU backend, whose training steps hold weight copies the GPU backends' do not.
    pub cpu: bool,
}

/// The first UNet level with attention.
fn first_attention_level(unet: &UNetConfig) -> Option<usize> {
    unet.down_block_types
        .iter()
        .position(|t| t.contains("Attn"))
}

/// The memory `work` needs with a model of `params` parameters stored at `weight_bytes`
/// each, on `target`.
pub fn need(config: &SdConfig, params: u64, weight_bytes: u64, work: Work, target: Target) -> Need {
    let scale = config.vae.latent_scale();
    // Activations are computed in the weights' dtype (softmax and norms in f32 either way,
    // which the fit absorbs); attention scores are f32.
    let act = weight_bytes.min(4) as f64 / 4.0;
    let f32_gib = |elements: f64| elements * 4.0 / GIB;
    let gib = match work {
        Work::Generate {
            width,
            height,
            images,
        } => {
            // The UNet's peak is one layer's scores (in query chunks under the limit), the
            // VAE's its widest layer at full size; they do not overlap.
            let scores = f32_gib(first_layer_scores(
                &config.unet,
                scale,
                width,
                height,
                2 * images,
            ));
            let scores = target
                .binding
                .map_or(scores, |l| scores.min(l as f64 / GIB));
            let widest = config
                .vae
                .decode_bytes_planned(images, width, height, target.binding);
            let widest = widest as f64 / GIB;
            fitted::GENERATE_BASE * act + scores.max(fitted::GENERATE_VAE * widest * act)
        }
        Work::Train {
            resolution,
            checkpointing,
        } => {
            let (activations, scores) =
                unet_elements(&config.unet, scale, resolution, resolution, 1);
            let (unet, kept_scores) = if checkpointing {
                // The probabilities are recomputed in the backward pass.
                (fitted::TRAIN_UNET_CHECKPOINTED, 0.0)
            } else {
                (fitted::TRAIN_UNET, f32_gib(scores))
            };
            let copies = if target.cpu {
                fitted::TRAIN_CPU_WEIGHT_COPIES * f32_gib(transformer_weights(&config.unet))
            } else {
                0.0
            };
            (unet * f32_gib(activations) + copies) * act + kept_scores
        }
    };
    Need {
        weights: params * weight_bytes,
        activations: (gib * GIB) as u64,
    }
}

/// The self-attention scores of one layer of the first level with attention, whole.
fn first_layer_scores(
    unet: &UNetConfig,
    scale: usize,
    width: usize,
    height: usize,
    batch: usize,
) -> f64 {
    let Some(level) = first_attention_level(unet) else {
        return 0.0;
    };
    let tokens = ((width / scale) >> level) as f64 * ((height / scale) >> level) as f64;
    batch as f64 * unet.heads(level) as f64 * tokens * tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One measured peak from `bench/memory/peaks.csv`.
    struct Peak {
        config: SdConfig,
        params: u64,
        work: Work,
        weight_bytes: u64,
        target: Target,
        bytes: u64,
        line: String,
    }

    fn peaks() -> Vec<Peak> {
        let text = include_str!("../../bench/memory/peaks.csv");
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        lines
            .map(|line| {
                let field = |name: &str| {
                    let i = header.iter().position(|h| *h == name).unwrap();
                    line.split(',').nth(i).unwrap().to_string()
                };
                let number = |name: &str| field(name).parse::<u64>().unwrap();
                let side = number("resolution") as usize;
                let work = match field("work").as_str() {
                    "generate" => Work::Generate {
                        width: side,
                        height: side,
                        images: number("images") as usize,
                    },
                    "train" => Work::Train {
                        resolution: side,
                        checkpointing: field("checkpointing") == "true",
                    },
                    other => panic!("unknown work {other}"),
                };
                Peak {
                    config: match field("config").as_str() {
                        "sd15" => SdConfig::v1_5(),
                        "sdxl" => SdConfig::sdxl_base(),
                        other => panic!("unknown config {other}"),
                    },
                    params: number("params"),
                    work,
                    weight_bytes: if field("dtype") == "f32" { 4 } else { 2 },
                    target: Target {
                        binding: field("binding_limit_bytes").parse().ok(),
                        cpu: field("backend") == "cpu",
                    },
                    bytes: number("peak_bytes"),
                    line: line.to_string(),
                }
            })
            .collect()
    }

    /// Every measured peak is within 15% of the model, whether it was fitted or only
    /// checked (f16, SDXL's generation, lavapipe).
    #[test]
    fn the_model_holds_the_measured_peaks() {
        let peaks = peaks();
        assert!(peaks.len() >= 10);
        for p in peaks {
            let model = need(&p.config, p.params, p.weight_bytes, p.work, p.target).total();
            let error = model as f64 / p.bytes as f64 - 1.0;
            assert!(error.abs() <= 0.15, "{:+.1}% for {}", 100.0 * error, p.line);
        }
    }

    #[test]
    fn more_pixels_more_memory_and_checkpointing_less() {
        let sd15 = SdConfig::v1_5();
        let params = 1_066_235_307;
        let train = |resolution, checkpointing| {
            need(
                &sd15,
                params,
                2,
                Work::Train {
                    resolution,
                    checkpointing,
                },
                Target::default(),
            )
            .total()
        };
        assert!(train(256, false) < train(512, false));
        assert!(train(512, true) < train(512, false));
        // The target: a 512 px step of SD 1.5 in f16 with checkpointing under 6 GiB
        // (measured 5.96 GiB on the CPU).
        assert!(train(512, true) < 6 << 30, "{}", train(512, true));
        // Query chunks and decoder tiles bound a generation's activations by the binding
        // limit.
        let generate = Work::Generate {
            width: 1024,
            height: 1024,
            images: 1,
        };
        let whole = need(&sd15, params, 4, generate, Target::default()).activations;
        let limited = Target {
            binding: Some(128 << 20),
            cpu: false,
        };
        let chunked = need(&sd15, params, 4, generate, limited).activations;
        assert!(chunked < whole / 3, "{chunked} vs {whole}");
    }
}
