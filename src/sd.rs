//! A whole Stable Diffusion model on a device: tokenizer, text encoder, UNet and VAE (and for
//! SDXL a second tokenizer and text encoder).

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
    /// SDXL's second tokenizer: the same vocabulary, padded with `!`.
    pub tokenizer_2: Option<ClipTokenizer>,
    /// SDXL's second text encoder (OpenCLIP bigG with its projection).
    pub text_encoder_2: Option<ClipTextModel>,
    /// The denoising UNet, working on latents.
    pub unet: UNet2DConditionModel,
    /// The autoencoder between images and latents.
    pub vae: AutoencoderKL,
}

/// Parameter counts of the UNet, the text encoder and the VAE of a config, and of SDXL's second
/// text encoder (0 without one), computed without allocating weights.
pub fn param_counts(config: &SdConfig, device: &Device) -> Result<[u64; 4], WeightsError> {
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
        match &config.text_encoder_2 {
            Some(c) => count(Component::TextEncoder2, &|v| {
                ClipTextModel::with_projection(v, c).map(drop)
            })?,
            None => 0,
        },
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
    check(Component::Vae, &|v| AutoencoderKL::new(v, &c.vae).map(drop))?;
    check(Component::TextEncoder2, &|v| match &c.text_encoder_2 {
        Some(t) => ClipTextModel::with_projection(v, t).map(drop),
        None => Ok(()),
    })
}

/// SDXL's second tokenizer (the bundled vocabulary padded with `!` when the checkpoint names
/// none); `None` for SD 1.x/2.x.
fn tokenizer_2(checkpoint: &Checkpoint) -> Result<Option<ClipTokenizer>, WeightsError> {
    match (&checkpoint.config.text_encoder_2, &checkpoint.tokenizer_2) {
        (None, _) => Ok(None),
        (Some(_), Some(source)) => tokenizer(source).map(Some),
        (Some(_), None) => Ok(Some(ClipTokenizer::openai("!"))),
    }
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
        let (u, t, v, t2) = (
            store(Component::Unet),
            store(Component::TextEncoder),
            store(Component::Vae),
            store(Component::TextEncoder2),
        );
        Ok(Self {
            family,
            config: config.clone(),
            tokenizer: ClipTokenizer::openai(if matches!(family, Family::Sd1 | Family::Sdxl) {
                "<|endoftext|>"
            } else {
                "!"
            }),
            text_encoder: ClipTextModel::new(t.root(), &config.text_encoder)?,
            tokenizer_2: config
                .text_encoder_2
                .as_ref()
                .map(|_| ClipTokenizer::openai("!")),
            text_encoder_2: config
                .text_encoder_2
                .as_ref()
                .map(|c| ClipTextModel::with_projection(t2.root(), c))
                .transpose()?,
            unet: UNet2DConditionModel::new(u.root(), &config.unet)?,
            vae: AutoencoderKL::new(v.root(), &config.vae)?,
        })
    }

    /// Streams the models onto `device`, weights in `dtype` (F32, or F16/BF16 where the device
    /// supports them). A VAE whose config asks for `force_upcast` (SDXL's, which overflows in
    /// f16) is loaded in F32 for SDXL, as diffusers' SDXL pipeline decodes it.
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
        let text_encoder_2 = match &c.text_encoder_2 {
            Some(t) => Some(
                nn::load(
                    checkpoint,
                    Component::TextEncoder2,
                    device,
                    dtype,
                    |v| ClipTextModel::with_projection(v, t),
                    progress,
                )
                .await?,
            ),
            None => None,
        };
        let vae_dtype = if checkpoint.family == Family::Sdxl && c.vae.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae = nn::load(
            checkpoint,
            Component::Vae,
            device,
            vae_dtype,
            |v| AutoencoderKL::new(v, &c.vae),
            progress,
        )
        .await?;
        Ok(Self {
            family: checkpoint.family,
            config: c.clone(),
            tokenizer: tokenizer(&checkpoint.tokenizer)?,
            text_encoder,
            tokenizer_2: tokenizer_2(checkpoint)?,
            text_encoder_2,
            unet,
            vae,
        })
    }
}
