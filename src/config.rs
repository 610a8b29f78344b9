//! Model configurations as plain structs: per-version constructors and `config.json` reading.
//! Field names and defaults are diffusers' / transformers', so a config.json maps one to one.

use serde::{Deserialize, Serialize};

/// A boolean that config.json may give as `null` (Python's `None`, false where diffusers tests
/// it).
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// A number for every block, or one number for all (diffusers accepts both in config.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// One number shared by every block.
    All(usize),
    /// One number per block, in down-block order.
    Each(Vec<usize>),
}

impl PerBlock {
    /// The number for down block `block` (0-based); blocks past the end of a list take its
    /// last entry.
    pub fn get(&self, block: usize) -> usize {
        match self {
            PerBlock::All(n) => *n,
            PerBlock::Each(v) => v[block.min(v.len() - 1)],
        }
    }
}

/// `UNet2DConditionModel`'s config (the fields SD 1.x, 2.x and XL use).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Latent height and width the model was trained at (pixels / 8): 64 for 512 px, 96 for
    /// 768 px.
    pub sample_size: usize,
    /// Channels of the input latents (4).
    pub in_channels: usize,
    /// Channels of the prediction (4).
    pub out_channels: usize,
    /// Type of each down block, highest resolution first: `CrossAttnDownBlock2D` (with
    /// attention) or `DownBlock2D`.
    pub down_block_types: Vec<String>,
    /// Type of each up block, lowest resolution first: `CrossAttnUpBlock2D` (with attention)
    /// or `UpBlock2D`.
    pub up_block_types: Vec<String>,
    /// Output channels of each UNet level, highest resolution first; the first also sets the
    /// timestep embedding's width (4 times it).
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// For SD 1.x/2.x diffusers reads this as the number of heads (a long-standing naming
    /// quirk of `UNet2DConditionModel`), unless `num_attention_heads` is set.
    pub attention_head_dim: PerBlock,
    /// Attention heads per block; when set, it takes precedence over `attention_head_dim`.
    pub num_attention_heads: Option<PerBlock>,
    /// Width of the text-encoder states that cross-attention attends to (768 for SD 1.x,
    /// 1024 for SD 2.x).
    pub cross_attention_dim: usize,
    /// Transformer blocks in each block's `Transformer2DModel`s (1 for SD 1.x and 2.x).
    pub transformer_layers_per_block: PerBlock,
    /// Groups of the UNet's group norms.
    pub norm_num_groups: usize,
    /// Epsilon of the resnets' and the output's group norms.
    pub norm_eps: f64,
    /// Whether the transformers project in and out with linear layers (SD 2.x, XL) rather
    /// than 1x1 convolutions (SD 1.x).
    #[serde(deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    /// Softmax in f32 for f16 models (SD 2.1 768-v); f32 models are unaffected. SDXL's
    /// config.json has `null`, which diffusers reads as false.
    #[serde(deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    /// Whether the sinusoidal timestep features put the cosines before the sines.
    pub flip_sin_to_cos: bool,
    /// Subtracted from half the feature width in the timestep frequencies' denominator
    /// (diffusers' `downscale_freq_shift`; 0 for SD).
    pub freq_shift: usize,
    /// Extra conditioning added to the timestep embedding: `None`, or SDXL's `text_time`
    /// (the pooled text embedding and the micro-conditioning time ids, see
    /// [`crate::unet::AddedCond`]).
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal features of each of the six SDXL time ids (256).
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: the pooled text embedding plus six time-id features
    /// (2816 = 1280 + 6 x 256 for SDXL base).
    pub projection_class_embeddings_input_dim: Option<usize>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self::v1_5()
    }
}

impl UNetConfig {
    /// SD 1.x (stable-diffusion-v1-5).
    pub fn v1_5() -> Self {
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            cross_attention_dim: 768,
            transformer_layers_per_block: PerBlock::All(1),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            use_linear_projection: false,
            upcast_attention: false,
            flip_sin_to_cos: true,
            freq_shift: 0,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
        }
    }

    /// SDXL base 1.0 (1024 px): three levels, the first without attention, 1, 2 and 10
    /// transformer layers per level, 2048-wide context, added text/time conditioning.
    pub fn sdxl_base() -> Self {
        Self {
            sample_size: 128,
            down_block_types: [
                "DownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
                .map(String::from)
                .to_vec(),
            block_out_channels: vec![320, 640, 1280],
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            cross_attention_dim: 2048,
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Self::v1_5()
        }
    }

    /// Whether the model takes SDXL's added text/time conditioning.
    pub fn text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// SD 2.1 (768 px, v-prediction).
    pub fn v2_1() -> Self {
        Self {
            sample_size: 96,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            cross_attention_dim: 1024,
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::v1_5()
        }
    }

    /// SD 2.1-base (512 px, epsilon).
    pub fn v2_1_base() -> Self {
        Self {
            sample_size: 64,
            upcast_attention: false,
            ..Self::v2_1()
        }
    }

    /// Heads of the attention layers in down block `block` (the mid block uses the last).
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(block)
    }
}

/// `CLIPTextModel`'s config (transformers' `CLIPTextConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    /// Tokens in the vocabulary: rows of the token-embedding table (49408).
    pub vocab_size: usize,
    /// Width of the token states (768 for ViT-L/14, 1024 for ViT-H/14).
    pub hidden_size: usize,
    /// Width of the hidden layer of each encoder layer's MLP.
    pub intermediate_size: usize,
    /// Encoder layers (23 for SD 2.x, whose text encoder stops one short of OpenCLIP's 24).
    pub num_hidden_layers: usize,
    /// Self-attention heads per encoder layer.
    pub num_attention_heads: usize,
    /// Longest token sequence, start and end tokens included (77): rows of the
    /// position-embedding table.
    pub max_position_embeddings: usize,
    /// `quick_gelu` (OpenAI CLIP, SD 1.x) or `gelu` (OpenCLIP, SD 2.x).
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    pub layer_norm_eps: f64,
    /// Output width of `CLIPTextModelWithProjection`'s text projection; SD conditions on the
    /// hidden states, so the text encoder here has no projection.
    pub projection_dim: usize,
    /// Padding token id as config.json records it; the tokenizer decides the padding used.
    pub pad_token_id: u32,
    /// Start-of-text token id as config.json records it; the tokenizer supplies the ids used.
    pub bos_token_id: u32,
    /// End-of-text token id as config.json records it; the pooled output is taken at the
    /// largest id instead.
    pub eos_token_id: u32,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self::v1_5()
    }
}

impl TextConfig {
    /// CLIP ViT-L/14's text model (SD 1.x).
    pub fn v1_5() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 768,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
        }
    }

    /// OpenCLIP ViT-H/14's text model as SD 2.x uses it: 23 of its 24 layers, since SD 2
    /// conditions on the penultimate layer.
    pub fn v2_1() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: "gelu".into(),
            projection_dim: 512,
            ..Self::v1_5()
        }
    }

    /// OpenCLIP ViT-bigG/14's text model with its projection (SDXL's `text_encoder_2`).
    pub fn sdxl_g() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: "gelu".into(),
            projection_dim: 1280,
            ..Self::v1_5()
        }
    }
}

/// `AutoencoderKL`'s config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    /// Channels of the images encoded (3: RGB).
    pub in_channels: usize,
    /// Channels of the images decoded (3: RGB).
    pub out_channels: usize,
    /// Output channels of each encoder level, highest resolution first (the decoder mirrors
    /// them); every level but the last halves the image size.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Channels of the latents (4).
    pub latent_channels: usize,
    /// Groups of the VAE's group norms.
    pub norm_num_groups: usize,
    /// Image height and width, in pixels, the VAE was trained at.
    pub sample_size: usize,
    /// Factor that brings the VAE's latents to about unit variance for the UNet (0.18215
    /// for SD 1.x and 2.x, 0.13025 for SDXL).
    pub scaling_factor: f64,
    /// The VAE overflows in f16 and must run in f32 (SDXL's stock VAE; diffusers' default).
    /// The SDXL pipeline honours it, as diffusers' does; the SD 1.x/2.x pipelines never needed to.
    pub force_upcast: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self::v1_5()
    }
}

impl VaeConfig {
    /// The VAE of SD 1.x and 2.x.
    pub fn v1_5() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 512,
            scaling_factor: 0.18215,
            force_upcast: true,
        }
    }

    /// The VAE of SDXL: SD's architecture with another latent scale.
    pub fn sdxl() -> Self {
        Self {
            sample_size: 1024,
            scaling_factor: 0.13025,
            ..Self::v1_5()
        }
    }

    /// The VAE of SD 2.1 (768 px): SD 1.x's, with a `sample_size` of 768.
    pub fn v2_1() -> Self {
        Self {
            sample_size: 768,
            ..Self::v1_5()
        }
    }

    /// Pixels per latent position: every level but the last halves the size (diffusers'
    /// `2 ** (len(block_out_channels) - 1)`; 8 for every published VAE).
    pub fn latent_scale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// The decoder's widest activation decoding `images` images of `width` x `height` pixels
    /// at once: the second level's channels at full size (256 for every published VAE), normed
    /// in f32 whatever the weights' dtype. 256 MiB for one 512 px image.
    pub fn decode_bytes(&self, images: usize, width: usize, height: usize) -> u64 {
        let channels = self.block_out_channels.iter().take(2).max().copied();
        let pixels = images as u64 * width as u64 * height as u64;
        channels.unwrap_or(0) as u64 * pixels * 4
    }

    /// How the decoder splits decoding `images` images of `width` x `height` pixels so that
    /// its widest activation fits `limit` bytes (a GPU's binding limit, where it has one).
    pub fn decode_plan(
        &self,
        images: usize,
        width: usize,
        height: usize,
        limit: Option<u64>,
    ) -> DecodePlan {
        let Some(limit) = limit else {
            return DecodePlan::Whole;
        };
        if self.decode_bytes(images, width, height) <= limit {
            return DecodePlan::Whole;
        }
        if self.decode_bytes(1, width, height) <= limit {
            return DecodePlan::EachImage;
        }
        // As large as fits, up to the size the VAE was trained at (diffusers' default tile).
        let scale = self.latent_scale();
        let mut tile = MIN_DECODE_TILE;
        while tile < self.sample_size / scale {
            let side = (tile + 1) * scale;
            if self.decode_bytes(1, side, side) > limit {
                break;
            }
            tile += 1;
        }
        if width <= tile * scale && height <= tile * scale {
            // One tile would be the whole image: nothing smaller to split into.
            return DecodePlan::EachImage;
        }
        DecodePlan::Tiles(tile)
    }

    /// The decoder's widest activation as `decode_plan` splits the work under `limit`.
    pub fn decode_bytes_planned(
        &self,
        images: usize,
        width: usize,
        height: usize,
        limit: Option<u64>,
    ) -> u64 {
        match self.decode_plan(images, width, height, limit) {
            DecodePlan::Whole => self.decode_bytes(images, width, height),
            DecodePlan::EachImage => self.decode_bytes(1, width, height),
            DecodePlan::Tiles(tile) => {
                let side = tile * self.latent_scale();
                self.decode_bytes(1, side, side)
            }
        }
    }

    /// The decoder's widest activation that no plan splits: one image, or one tile of the
    /// smallest size.
    pub fn decode_bytes_unsplit(&self, width: usize, height: usize) -> u64 {
        let side = MIN_DECODE_TILE * self.latent_scale();
        self.decode_bytes(1, width.min(side), height.min(side))
    }
}

/// The smallest decoder tile, in latent positions (64 px): smaller tiles show their seams.
pub const MIN_DECODE_TILE: usize = 8;

/// How the VAE decoder splits its work (`VaeConfig::decode_plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodePlan {
    /// All images at once.
    Whole,
    /// One image at a time (the same result).
    EachImage,
    /// One image at a time, each in overlapping square tiles of this many latent positions,
    /// blended where they overlap as diffusers' `AutoencoderKL.tiled_decode` does. The result
    /// differs a little from a whole decode: each tile's attention sees only the tile.
    Tiles(usize),
}

/// What the UNet predicts (from `scheduler/scheduler_config.json`'s `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise added to the clean latents (`epsilon`).
    Epsilon,
    /// The velocity `sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0` (`v_prediction`).
    VPrediction,
}

/// The models of a Stable Diffusion checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SdConfig {
    /// The denoising UNet's config.
    pub unet: UNetConfig,
    /// The CLIP text encoder's config.
    pub text_encoder: TextConfig,
    /// SDXL's second text encoder (OpenCLIP bigG with its projection); `None` for SD 1.x/2.x.
    #[serde(default)]
    pub text_encoder_2: Option<TextConfig>,
    /// The autoencoder's config.
    pub vae: VaeConfig,
    /// What the UNet predicts.
    pub prediction: Prediction,
    /// SDXL: an empty negative prompt conditions on zeros rather than on the encoded empty
    /// text (`model_index.json`'s `force_zeros_for_empty_prompt`, true for SDXL base).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: bool,
}

impl SdConfig {
    /// SD 1.5 (512 px, epsilon prediction).
    pub fn v1_5() -> Self {
        Self {
            unet: UNetConfig::v1_5(),
            text_encoder: TextConfig::v1_5(),
            vae: VaeConfig::v1_5(),
            prediction: Prediction::Epsilon,
            text_encoder_2: None,
            force_zeros_for_empty_prompt: false,
        }
    }

    /// SD 2.1 (768 px, v-prediction).
    pub fn v2_1() -> Self {
        Self {
            unet: UNetConfig::v2_1(),
            text_encoder: TextConfig::v2_1(),
            vae: VaeConfig::v2_1(),
            prediction: Prediction::VPrediction,
            text_encoder_2: None,
            force_zeros_for_empty_prompt: false,
        }
    }

    /// SD 2.1-base (512 px, epsilon prediction).
    pub fn v2_1_base() -> Self {
        Self {
            unet: UNetConfig::v2_1_base(),
            text_encoder: TextConfig::v2_1(),
            vae: VaeConfig::v1_5(),
            prediction: Prediction::Epsilon,
            text_encoder_2: None,
            force_zeros_for_empty_prompt: false,
        }
    }

    /// SDXL base 1.0 (1024 px, epsilon prediction).
    pub fn sdxl_base() -> Self {
        Self {
            unet: UNetConfig::sdxl_base(),
            text_encoder: TextConfig::v1_5(),
            text_encoder_2: Some(TextConfig::sdxl_g()),
            vae: VaeConfig::sdxl(),
            prediction: Prediction::Epsilon,
            force_zeros_for_empty_prompt: true,
        }
    }

    /// Tiny SD 1.x-shaped models for tests: the real block layout at a width of 32 (the
    /// models of `tests/fixtures/sd/`).
    pub fn tiny_sd1() -> Self {
        Self {
            unet: UNetConfig {
                sample_size: 8,
                block_out_channels: vec![32, 32, 32, 32],
                cross_attention_dim: 16,
                norm_num_groups: 16,
                ..UNetConfig::v1_5()
            },
            text_encoder: TextConfig {
                hidden_size: 16,
                intermediate_size: 37,
                num_hidden_layers: 5,
                num_attention_heads: 4,
                projection_dim: 16,
                ..TextConfig::v1_5()
            },
            vae: VaeConfig {
                block_out_channels: vec![32, 32, 32, 64],
                norm_num_groups: 16,
                sample_size: 32,
                ..VaeConfig::v1_5()
            },
            text_encoder_2: None,
            prediction: Prediction::Epsilon,
            force_zeros_for_empty_prompt: false,
        }
    }

    /// Tiny SD 2.x-shaped models for tests (v-prediction, linear projections, gelu).
    pub fn tiny_sd2() -> Self {
        let sd1 = Self::tiny_sd1();
        Self {
            unet: UNetConfig {
                attention_head_dim: PerBlock::Each(vec![2, 4, 4, 4]),
                use_linear_projection: true,
                upcast_attention: true,
                ..sd1.unet
            },
            text_encoder: TextConfig {
                num_hidden_layers: 4,
                hidden_act: "gelu".into(),
                ..sd1.text_encoder
            },
            text_encoder_2: None,
            vae: sd1.vae,
            prediction: Prediction::VPrediction,
            force_zeros_for_empty_prompt: false,
        }
    }

    /// Tiny SDXL-shaped models for tests (the model of `tests/fixtures/sd/tiny-sdxl/`).
    pub fn tiny_sdxl() -> Self {
        let sd1 = Self::tiny_sd1();
        Self {
            unet: UNetConfig {
                sample_size: 8,
                block_out_channels: vec![32, 64, 64],
                attention_head_dim: PerBlock::Each(vec![1, 2, 4]),
                transformer_layers_per_block: PerBlock::Each(vec![1, 2, 3]),
                cross_attention_dim: 48,
                norm_num_groups: 16,
                addition_time_embed_dim: Some(8),
                projection_class_embeddings_input_dim: Some(80),
                ..UNetConfig::sdxl_base()
            },
            text_encoder: sd1.text_encoder,
            text_encoder_2: Some(TextConfig {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                hidden_act: "gelu".into(),
                projection_dim: 32,
                ..TextConfig::v1_5()
            }),
            vae: VaeConfig {
                scaling_factor: 0.13025,
                ..sd1.vae
            },
            prediction: Prediction::Epsilon,
            force_zeros_for_empty_prompt: true,
        }
    }
}

/// A config file that cannot be used, and why. (The weights layer wraps it in its own error,
/// so configs know nothing of weights.)
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ConfigError {
    /// The config file's path, as the caller gave it.
    pub file: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses one config.json.
pub fn from_json<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(|e| ConfigError {
        file: file.into(),
        reason: format!("not a valid config: {e}"),
    })
}

/// Refuses `unet/config.json` settings this UNet does not implement (variants such as
/// class-conditioned, LCM-distilled or dual cross-attention models), naming the setting,
/// rather than computing something else silently.
pub fn check_unet_json(file: &str, text: &str) -> Result<(), ConfigError> {
    use serde_json::{Value, json};
    let v: Value = serde_json::from_str(text).map_err(|e| ConfigError {
        file: file.into(),
        reason: e.to_string(),
    })?;
    let expected: [(&str, Value); 12] = [
        ("act_fn", json!("silu")),
        ("center_input_sample", json!(false)),
        ("class_embed_type", Value::Null),
        ("conv_in_kernel", json!(3)),
        ("conv_out_kernel", json!(3)),
        ("dual_cross_attention", json!(false)),
        ("encoder_hid_dim", Value::Null),
        ("mid_block_type", json!("UNetMidBlock2DCrossAttn")),
        ("only_cross_attention", json!(false)),
        ("resnet_time_scale_shift", json!("default")),
        ("time_cond_proj_dim", Value::Null),
        ("time_embedding_type", json!("positional")),
    ];
    for (key, want) in expected {
        if let Some(got) = v.get(key).filter(|got| **got != want) {
            return Err(ConfigError {
                file: file.into(),
                reason: format!(
                    "`{key}: {got}` is a UNet variant SeFi Studio does not support (expected {want})"
                ),
            });
        }
    }
    Ok(())
}
