//! A whole Stable Diffusion model on a device: tokenizer, text encoder, UNet and VAE.

use burn::tensor::{DType, Device};

use crate::clip::{ClipTextModel, ClipTokenizer};
use crate::config::SdConfig;
use crate::nn::{self, LoadProgress, VarStore};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::{Checkpoint, Component, Family, TokenizerSource, WeightsError};

/// A Stable Diffusion model on a device: tokenizer, text encoder, UNet and VAE, with the
/// family and config they were built from.
pub struct StableDiffusion {
    /// Which SD generation and prediction type the checkpoint is.
    pub family: Family,
    /// The configs of the three models and the UNet's prediction type.
    pub config: SdConfig,
    /// Turns prompts into token ids for the text encoder.
    pub tokenizer: ClipTokenizer,
    /// The CLIP text encoder the UNet is conditioned on.
    pub text_encoder: ClipTextModel,
    /// The denoising UNet, working on latents.
    pub unet: UNet2DConditionModel,
    /// The autoencoder between images and latents.
    pub vae: AutoencoderKL,
}

/// Parameter counts of the three models of a config, computed without allocating weights.
pub fn param_counts(config: &SdConfig, device: &Device) -> Result<[u64; 3], WeightsError> {
    let count = |component, build: &dyn Fn(nn::Vars) -> Result<(), WeightsError>| {
        let store = VarStore::shapes(device, component);
        build(store.root()).map(|()| store.param_count())
    };
    Ok([
        count(Component::Unet, &|v| {
            UNet2DConditionModel::new(v, &config.unet).map(drop)
        })?,
        count(Component::TextEncoder, &|v| {
            ClipTextModel::new(v, &config.text_encoder).map(drop)
        })?,
        count(Component::Vae, &|v| {
            AutoencoderKL::new(v, &config.vae).map(drop)
        })?,
    ])
}

/// Checks, without reading any weights, that a checkpoint holds exactly the tensors that
/// the models of its config need, with the right shapes.
/// `device` only holds a one-element placeholder.
pub fn validate(checkpoint: &Checkpoint, device: &Device) -> Result<(), WeightsError> {
    let c = &checkpoint.config;
    let check = |component, build: &dyn Fn(nn::Vars) -> Result<(), WeightsError>| {
        let store = VarStore::shapes(device, component);
        build(store.root())?;
        checkpoint.check(component, &store.requested())
    };
    check(Component::Unet, &|v| {
        UNet2DConditionModel::new(v, &c.unet).map(drop)
    })?;
    check(Component::TextEncoder, &|v| {
        ClipTextModel::new(v, &c.text_encoder).map(drop)
    })?;
    check(Component::Vae, &|v| AutoencoderKL::new(v, &c.vae).map(drop))
}

/// The tokenizer a checkpoint names: its own files, or the bundled vocabulary.
pub fn tokenizer(source: &TokenizerSource) -> Result<ClipTokenizer, WeightsError> {
    match source {
        TokenizerSource::Bundled { pad_token } => Ok(ClipTokenizer::openai(pad_token)),
        TokenizerSource::Texts {
            vocab,
            merges,
            pad_token,
        } => {
            ClipTokenizer::from_files(vocab, merges, pad_token).map_err(|e| WeightsError::Config {
                file: "tokenizer/vocab.json".into(),
                reason: e.to_string(),
            })
        }
        TokenizerSource::Files {
            vocab,
            merges,
            pad_token,
        } => {
            let read = |p: &String| {
                std::fs::read_to_string(p).map_err(|e| WeightsError::Io {
                    file: p.clone(),
                    reason: e.to_string(),
                })
            };
            ClipTokenizer::from_files(&read(vocab)?, &read(merges)?, pad_token).map_err(|e| {
                WeightsError::Config {
                    file: vocab.clone(),
                    reason: e.to_string(),
                }
            })
        }
    }
}

impl StableDiffusion {
    /// The models of `config` with random weights (benchmarks and memory measurements).
    pub fn random(
        config: &SdConfig,
        family: Family,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, WeightsError> {
        let store = |c| VarStore::random(device, c, dtype);
        let (u, t, v) = (
            store(Component::Unet),
            store(Component::TextEncoder),
            store(Component::Vae),
        );
        Ok(Self {
            family,
            config: config.clone(),
            tokenizer: ClipTokenizer::openai(if family == Family::Sd1 {
                "<|endoftext|>"
            } else {
                "!"
            }),
            text_encoder: ClipTextModel::new(t.root(), &config.text_encoder)?,
            unet: UNet2DConditionModel::new(u.root(), &config.unet)?,
            vae: AutoencoderKL::new(v.root(), &config.vae)?,
        })
    }

    /// Streams the three models onto `device`, weights in `dtype` (F32, or F16/BF16 where the
    /// device supports them).
    pub async fn load(
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self, WeightsError> {
        let c = &checkpoint.config;
        let text_encoder = nn::load(
            checkpoint,
            Component::TextEncoder,
            device,
            dtype,
            |v| ClipTextModel::new(v, &c.text_encoder),
            progress,
        )
        .await?;
        let unet = nn::load(
            checkpoint,
            Component::Unet,
            device,
            dtype,
            |v| UNet2DConditionModel::new(v, &c.unet),
            progress,
        )
        .await?;
        let vae = nn::load(
            checkpoint,
            Component::Vae,
            device,
            dtype,
            |v| AutoencoderKL::new(v, &c.vae),
            progress,
        )
        .await?;
        Ok(Self {
            family: checkpoint.family,
            config: c.clone(),
            tokenizer: tokenizer(&checkpoint.tokenizer)?,
            text_encoder,
            unet,
            vae,
        })
    }
}
