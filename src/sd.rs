//! A whole Stable Diffusion model on a device: tokenizer, text encoder, UNet and VAE (and for
//! SDXL a second tokenizer and text encoder).

use burn::tensor::{DType, Device, Tensor};

use crate::clip::{ClipTextModel, ClipTokenizer, end_positions, ids_tensor};
use crate::config::SdConfig;
use crate::nn::{self, LoadProgress, VarStore};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::{Checkpoint, Component, Family, WeightsError};

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

/// A prompt as the UNet is conditioned on it.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The context, `[windows, 77, cross_attention_dim]`.
    pub states: Tensor<3>,
    /// SDXL's pooled embedding (bigG's projected output at the end token),
    /// `[windows, projection_dim]`; `None` for SD 1.x/2.x.
    pub pooled: Option<Tensor<2>>,
}

/// The ids the second SDXL tokenizer gives for the same text: the vocabularies are the same,
/// only the padding after the end token differs (`!` rather than `<|endoftext|>`).
fn repad(windows: &[Vec<u32>], end: u32, pad: u32) -> Vec<u32> {
    windows
        .iter()
        .flat_map(|w| {
            let stop = w.iter().position(|&i| i == end).map_or(w.len(), |p| p + 1);
            w.iter()
                .enumerate()
                .map(move |(i, &id)| if i < stop { id } else { pad })
        })
        .collect()
}

/// One model of a config built on a store that only records the names and shapes it asks
/// for (no weights allocated); SD 1.x/2.x's absent second text encoder asks for nothing.
fn shapes(
    config: &SdConfig,
    device: &Device,
    component: Component,
) -> Result<VarStore, WeightsError> {
    let store = VarStore::shapes(device, component);
    let v = store.root();
    match component {
        Component::Unet => UNet2DConditionModel::new(v, &config.unet).map(drop),
        Component::TextEncoder => ClipTextModel::new(v, &config.text_encoder).map(drop),
        Component::Vae => AutoencoderKL::new(v, &config.vae).map(drop),
        Component::TextEncoder2 => match &config.text_encoder_2 {
            Some(c) => ClipTextModel::with_projection(v, c).map(drop),
            None => Ok(()),
        },
        Component::Clip => Ok(()),
    }?;
    Ok(store)
}

/// Parameter counts of the UNet, the text encoder and the VAE of a config, and of SDXL's second
/// text encoder (0 without one), computed without allocating weights.
pub fn param_counts(config: &SdConfig, device: &Device) -> Result<[u64; 4], WeightsError> {
    let mut counts = [0; 4];
    for (count, component) in counts.iter_mut().zip(Component::ALL) {
        *count = shapes(config, device, component)?.param_count();
    }
    Ok(counts)
}

/// Elements of the largest tensor of a config's models that loads as one buffer (the token
/// tables load in row chunks), computed without allocating weights: what a GPU's binding
/// limit must hold.
pub fn largest_whole_tensor(config: &SdConfig, device: &Device) -> Result<u64, WeightsError> {
    let mut largest = 0;
    for component in Component::ALL {
        largest = largest.max(shapes(config, device, component)?.largest_whole());
    }
    Ok(largest)
}

/// Checks, without reading any weights, that a checkpoint holds exactly the tensors that
/// the models of its config need, with the right shapes.
/// `device` only holds a one-element placeholder.
pub fn validate(checkpoint: &Checkpoint, device: &Device) -> Result<(), WeightsError> {
    for component in Component::ALL {
        let store = shapes(&checkpoint.config, device, component)?;
        checkpoint.check(component, &store.requested())?;
    }
    Ok(())
}

/// SDXL's second tokenizer (the bundled vocabulary padded with `!` when the checkpoint names
/// none); `None` for SD 1.x/2.x.
fn tokenizer_2(checkpoint: &Checkpoint) -> Result<Option<ClipTokenizer>, WeightsError> {
    match (&checkpoint.config.text_encoder_2, &checkpoint.tokenizer_2) {
        (None, _) => Ok(None),
        (Some(_), Some(source)) => ClipTokenizer::from_source(source).map(Some),
        (Some(_), None) => Ok(Some(ClipTokenizer::openai("!"))),
    }
}

impl StableDiffusion {
    /// Widths of the text encoders' token embeddings: `[768]` for SD 1.x, `[1024]` for SD 2.x,
    /// `[768, 1280]` for SDXL. An identity vector is their concatenation.
    pub fn token_widths(&self) -> Vec<usize> {
        let mut widths = vec![self.config.text_encoder.hidden_size];
        widths.extend(self.config.text_encoder_2.as_ref().map(|c| c.hidden_size));
        widths
    }

    /// Token embeddings of windows of ids, every encoder's side by side,
    /// `[windows, 77, sum of token_widths]`, F32: the sequence identity vectors are spliced into.
    pub fn embed_tokens(&self, windows: &[Vec<u32>], device: &Device) -> Tensor<3> {
        let flat: Vec<u32> = windows.iter().flatten().copied().collect();
        let l = self
            .text_encoder
            .embed_tokens(ids_tensor(&flat, windows.len(), device));
        match (&self.text_encoder_2, &self.tokenizer_2) {
            (Some(encoder_2), Some(tokenizer_2)) => {
                let ids_2 = repad(windows, self.tokenizer.end_id(), tokenizer_2.pad_id());
                let g = encoder_2.embed_tokens(ids_tensor(&ids_2, windows.len(), device));
                Tensor::cat(vec![l, g], 2)
            }
            _ => l,
        }
    }

    /// Encodes token embeddings of windows (from [`Self::embed_tokens`], possibly spliced).
    /// SD 1.x/2.x: the text encoder's last states. SDXL, as diffusers' `encode_prompt`: both
    /// encoders' penultimate states side by side, and bigG's projected pooled output.
    ///
    /// - `embeds`: `[windows, 77, sum of token_widths]`
    /// - output: `states` `[windows, 77, cross_attention_dim]`, `pooled` `[windows, 1280]`
    pub fn encode_embeds(
        &self,
        embeds: Tensor<3>,
        windows: &[Vec<u32>],
        device: &Device,
    ) -> Encoded {
        let eos = end_positions(windows, device);
        let Some(encoder_2) = &self.text_encoder_2 else {
            return Encoded {
                states: self
                    .text_encoder
                    .forward_embeds(embeds, eos)
                    .last_hidden_state,
                pooled: None,
            };
        };
        let [_, _, width] = embeds.dims();
        let width_l = self.config.text_encoder.hidden_size;
        let l = self
            .text_encoder
            .forward_embeds(embeds.clone().narrow(2, 0, width_l), eos.clone());
        // The pad id ("!", 0) is below the end token's: bigG pools at the same position.
        let g = encoder_2.forward_embeds(embeds.narrow(2, width_l, width - width_l), eos);
        Encoded {
            states: Tensor::cat(vec![l.penultimate, g.penultimate], 2),
            pooled: g.text_embeds,
        }
    }

    /// Encodes windows of ids (see [`Self::encode_embeds`]).
    pub fn encode(&self, windows: &[Vec<u32>], device: &Device) -> Encoded {
        self.encode_embeds(self.embed_tokens(windows, device), windows, device)
    }

    /// The token-embedding row of `id` of every encoder side by side, `[1, sum of
    /// token_widths]`: where a new identity's vectors start.
    pub fn token_embedding(&self, id: u32) -> Tensor<2> {
        let row =
            |encoder: &ClipTextModel| encoder.token_embedding_row(id as usize).cast(DType::F32);
        let l = row(&self.text_encoder);
        match &self.text_encoder_2 {
            Some(g) => Tensor::cat(vec![l, row(g)], 1),
            None => l,
        }
    }

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
            tokenizer: ClipTokenizer::from_source(&checkpoint.tokenizer)?,
            text_encoder,
            tokenizer_2: tokenizer_2(checkpoint)?,
            text_encoder_2,
            unet,
            vae,
        })
    }
}
