//! transformers' `CLIPModel`, both towers with their projections into one space, and the
//! score it gives: prompt fidelity (CLIP-T), the cosine between a prompt and an image there.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::folder::{ClipConfig, ClipFolder};
use super::text_model::{ClipTextModel, end_positions, ids_tensor};
use super::vision_model::{ClipVisionModel, VisionOutput};
use crate::nn::{self, Linear, LoadProgress, Vars};
use crate::rgb::RgbImage;
use crate::weights::{Component, WeightsError};

/// `CLIPModel`: the text tower with `text_projection`, the vision tower with
/// `visual_projection`.
#[derive(Clone, Debug)]
pub struct ClipModel {
    /// The text tower; its `text_embeds` are `get_text_features`.
    pub text_model: ClipTextModel,
    /// The vision tower.
    pub vision_model: ClipVisionModel,
    visual_projection: Linear,
}

impl ClipModel {
    /// Built from a `CLIPModel`'s weights.
    pub fn new(vars: Vars, c: &ClipConfig) -> Result<Self, WeightsError> {
        Ok(Self {
            text_model: ClipTextModel::with_projection(vars.clone(), &c.text)?,
            vision_model: ClipVisionModel::new(vars.clone(), &c.vision)?,
            visual_projection: Linear::new(
                vars.pp("visual_projection"),
                c.vision.hidden_size,
                c.projection_dim,
                false,
            )?,
        })
    }

    /// Streams a folder's weights onto `device` in `dtype`.
    pub async fn load(
        folder: &ClipFolder,
        device: &Device,
        dtype: DType,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self, WeightsError> {
        let build = |v: Vars| Self::new(v, &folder.config);
        nn::load(folder, Component::Clip, device, dtype, build, progress).await
    }

    /// `get_text_features`: token ids `[batch, seq]` (each with its end token) to
    /// `[batch, projection_dim]`, F32.
    pub fn text_embeds(&self, ids: Tensor<2, Int>, eos: Tensor<1, Int>) -> Tensor<2> {
        let embeds = self.text_model.embed_tokens(ids);
        self.text_model
            .forward_embeds(embeds, eos)
            .text_embeds
            .expect("CLIPModel's text tower has its projection")
    }

    /// The vision tower's output for normalised pixels `[batch, 3, size, size]`.
    pub fn vision(&self, pixels: Tensor<4>) -> VisionOutput {
        self.vision_model.forward(pixels)
    }

    /// `get_image_features`: normalised pixels `[batch, 3, size, size]` to
    /// `[batch, projection_dim]`, F32.
    pub fn image_embeds(&self, pixels: Tensor<4>) -> Tensor<2> {
        let pooled = self.vision(pixels).pooled;
        self.visual_projection
            .forward(pooled.cast(self.vision_model.dtype()))
            .cast(DType::F32)
    }
}

/// A CLIP model ready to score: its weights on a device, its tokenizer and image processing.
pub struct PromptFidelity {
    folder: ClipFolder,
    model: ClipModel,
    device: Device,
    bytes: u64,
}

impl PromptFidelity {
    /// Loads a CLIP folder's model onto `device` in `dtype` (f16 halves its 1.7 GB on GPUs).
    pub async fn load(
        folder: ClipFolder,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, WeightsError> {
        let model = ClipModel::load(&folder, device, dtype, &mut |_| {}).await?;
        Ok(Self {
            bytes: folder.weight_bytes(dtype),
            folder,
            model,
            device: device.clone(),
        })
    }

    /// Bytes its weights take on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.bytes
    }

    /// The model, for tests and benchmarks.
    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// Where it was loaded from.
    pub fn folder(&self) -> &ClipFolder {
        &self.folder
    }

    /// The cosine between `prompt` (plain text: see [`plain_prompt`]) and each image in
    /// CLIP's space, as torchmetrics' CLIP score computes it before scaling by 100.
    pub async fn scores(&self, prompt: &str, images: &[RgbImage]) -> Result<Vec<f32>, String> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self.folder.tokenizer.tokenize(prompt);
        let ids = tokens.ids[..=tokens.end_position].to_vec();
        let eos = end_positions(std::slice::from_ref(&ids), &self.device);
        let text = self
            .model
            .text_embeds(ids_tensor(&ids, 1, &self.device), eos);
        let p = &self.folder.processor;
        let [h, w] = p.crop;
        let pixels: Vec<f32> = images.iter().flat_map(|i| p.pixel_values(i)).collect();
        let pixels = Tensor::<4>::from_data(
            TensorData::new(pixels, [images.len(), 3, h, w]),
            &self.device,
        );
        let image = self.model.image_embeds(pixels);
        let text = nn::read_f32(text).await?;
        let image = nn::read_f32(image).await?;
        Ok(image
            .chunks_exact(text.len())
            .map(|v| cosine(v, &text))
            .collect())
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (norm(a) * norm(b)).max(1e-12)) as f32
}
