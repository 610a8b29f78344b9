//! CLIP's vision transformer (transformers' `CLIPVisionTransformer`, the `vision_model.` part
//! of `CLIPModel`): the image cut into patches, a class token in front, the shared encoder
//! layers without a mask, and the class token's state as the image's summary.

use burn::tensor::{DType, Tensor};

use super::encoder::{EncoderLayer, LayerShape};
use crate::nn::{Activation, Conv2d, LayerNorm, Vars};
use crate::weights::WeightsError;

/// `CLIPVisionConfig`; the defaults are transformers' (ViT-B/32).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    /// Width of the patch states (1024 for ViT-L/14).
    pub hidden_size: usize,
    /// Width of the hidden layer of each encoder layer's MLP.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Self-attention heads per encoder layer.
    pub num_attention_heads: usize,
    /// Colour channels of the input (3).
    pub num_channels: usize,
    /// Side of the square input in pixels (224).
    pub image_size: usize,
    /// Side of a square patch in pixels (14 for ViT-L/14).
    pub patch_size: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu`.
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl VisionConfig {
    /// Patches along a side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// The `vision_model.` weights of a `CLIPModel`.
#[derive(Clone, Debug)]
pub struct ClipVisionModel {
    patch_embedding: Conv2d,
    class_embedding: Tensor<1>,
    position_embedding: Tensor<2>,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
}

/// What the vision tower returns.
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// Every position's state after the last layer, the class token first,
    /// `[batch, 1 + grid², hidden]`, F32.
    pub last_hidden_state: Tensor<3>,
    /// The class token's state after the final layer norm, `[batch, hidden]`, F32.
    pub pooled: Tensor<2>,
}

impl ClipVisionModel {
    /// Built from the weights under `vision_model.`.
    pub fn new(vars: Vars, c: &VisionConfig) -> Result<Self, WeightsError> {
        let act = Activation::from_name(&c.hidden_act).ok_or_else(|| WeightsError::Config {
            file: "config.json".into(),
            reason: format!("unknown vision hidden_act `{}`", c.hidden_act),
        })?;
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return Err(WeightsError::Config {
                file: "config.json".into(),
                reason: format!(
                    "the vision model's image_size {} is not a whole number of {} px patches",
                    c.image_size, c.patch_size
                ),
            });
        }
        let vars = vars.pp("vision_model");
        let emb = vars.pp("embeddings");
        let d = c.hidden_size;
        // The patch projection: one patch a position, no bias.
        let patch_embedding = Conv2d::without_bias(
            emb.pp("patch_embedding"),
            c.num_channels,
            d,
            c.patch_size,
            c.patch_size,
        )?;
        let shape = LayerShape {
            hidden_size: d,
            intermediate_size: c.intermediate_size,
            heads: c.num_attention_heads,
            layer_norm_eps: c.layer_norm_eps,
            act,
            causal: false,
        };
        Ok(Self {
            patch_embedding,
            class_embedding: emb.get("class_embedding", [d])?,
            position_embedding: emb
                .pp("position_embedding")
                .get("weight", [c.grid() * c.grid() + 1, d])?,
            pre_layrnorm: LayerNorm::new(vars.pp("pre_layrnorm"), d, c.layer_norm_eps)?,
            layers: EncoderLayer::stack(vars.clone(), c.num_hidden_layers, &shape)?,
            post_layernorm: LayerNorm::new(vars.pp("post_layernorm"), d, c.layer_norm_eps)?,
        })
    }

    /// The weights' dtype. Inputs are cast to it; outputs come back as F32.
    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// Encodes normalised pixels `[batch, channels, image_size, image_size]` (see
    /// [`super::image::pixel_values`]).
    pub fn forward(&self, pixels: Tensor<4>) -> VisionOutput {
        let [b, _, _, _] = pixels.dims();
        let d = self.class_embedding.dims()[0];
        let patches = self.patch_embedding.forward(pixels.cast(self.dtype()));
        let [_, _, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let class = self
            .class_embedding
            .clone()
            .reshape([1, 1, d])
            .expand([b, 1, d]);
        let mut x =
            Tensor::cat(vec![class, patches], 1) + self.position_embedding.clone().unsqueeze::<3>();
        x = self.pre_layrnorm.forward(x);
        for layer in &self.layers {
            x = layer.forward(x);
        }
        let pooled = self
            .post_layernorm
            .forward(x.clone().narrow(1, 0, 1).reshape([b, d]))
            .cast(DType::F32);
        VisionOutput {
            last_hidden_state: x.cast(DType::F32),
            pooled,
        }
    }
}
