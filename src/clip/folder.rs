//! A CLIP model's folder as transformers saves `CLIPModel` (`openai/clip-vit-large-patch14`
//! from the Hub): `config.json`, `model.safetensors`, the tokenizer files and
//! `preprocessor_config.json`. Folders of 2021-2023 and of today are both read; only headers
//! are read until a tensor is asked for.

use std::collections::BTreeMap;

use super::image::ImageProcessor;
use super::tokenizer::ClipTokenizer;
use super::vision_model::VisionConfig;
use crate::config::TextConfig;
use crate::weights::checkpoint::{
    Entry, Shards, TokenizerSource, check_entries, index, read_entry, read_order,
};
use crate::weights::legacy::Adaptation;
use crate::weights::{Component, HostTensor, SafetensorsFile, TensorSource, WeightsError};

/// `CLIPConfig`: both towers' configs and the width of the shared embedding space.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// The text tower (`text_config`).
    pub text: TextConfig,
    /// The vision tower (`vision_config`).
    pub vision: VisionConfig,
    /// Width of the space both projections map into (768 for ViT-L/14).
    pub projection_dim: usize,
}

/// transformers' `CLIPTextConfig` defaults, for what a config leaves out.
fn text_defaults() -> serde_json::Value {
    serde_json::json!({
        "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 512,
        "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407,
    })
}

/// `base` with the keys of each of `layers` written over it, later layers winning.
fn merged(base: serde_json::Value, layers: &[&serde_json::Value]) -> serde_json::Value {
    let mut out = base;
    for layer in layers {
        if let (Some(out), Some(layer)) = (out.as_object_mut(), layer.as_object()) {
            for (k, v) in layer {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

impl ClipConfig {
    /// From a `CLIPModel`'s `config.json`. Configs written by transformers before 4.28 hold
    /// `text_config_dict` and `vision_config_dict` beside full `text_config` and
    /// `vision_config` filled from that time's defaults; as transformers does, the `_dict`
    /// values win.
    pub fn from_json(file: &str, text: &str) -> Result<Self, WeightsError> {
        let bad = |reason: String| WeightsError::Config {
            file: file.into(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not a valid config: {e}")))?;
        let model_type = v["model_type"].as_str().unwrap_or_default();
        if model_type != "clip" {
            return Err(WeightsError::NotClip {
                path: file.into(),
                reason: format!("its model_type is `{model_type}`, not `clip`"),
            });
        }
        let text_json = merged(
            text_defaults(),
            &[&v["text_config"], &v["text_config_dict"]],
        );
        let vision_json = merged(
            serde_json::to_value(VisionConfig::default()).expect("a config serialises"),
            &[&v["vision_config"], &v["vision_config_dict"]],
        );
        let projection_dim = v["projection_dim"].as_u64().unwrap_or(512) as usize;
        let mut text: TextConfig =
            serde_json::from_value(text_json).map_err(|e| bad(format!("text_config: {e}")))?;
        // `CLIPModel` projects with the top-level width, whatever the towers say.
        text.projection_dim = projection_dim;
        let vision: VisionConfig =
            serde_json::from_value(vision_json).map_err(|e| bad(format!("vision_config: {e}")))?;
        Ok(Self {
            text,
            vision,
            projection_dim,
        })
    }
}

/// The files of a CLIP folder, read or opened beforehand (native paths or the browser's files).
pub struct ClipParts {
    /// `config.json`.
    pub config: String,
    /// `preprocessor_config.json`, if the folder has one.
    pub preprocessor: Option<String>,
    /// The tokenizer: the folder's `vocab.json` and `merges.txt`, or the bundled vocabulary
    /// (the same for every OpenAI and OpenCLIP model).
    pub tokenizer: TokenizerSource,
    /// `model.safetensors` (or its shards).
    pub weights: Shards,
}

/// The tokenizer of a folder without tokenizer files: the bundled vocabulary, which every
/// OpenAI CLIP model shares, padded with its end token.
pub fn bundled_tokenizer() -> TokenizerSource {
    TokenizerSource::Bundled {
        pad_token: "<|endoftext|>".into(),
    }
}

/// An open CLIP folder.
pub struct ClipFolder {
    /// Where it is, for messages.
    pub path: String,
    /// Both towers' configs.
    pub config: ClipConfig,
    /// How pictures become the vision tower's input.
    pub processor: ImageProcessor,
    /// The text tower's tokenizer.
    pub tokenizer: ClipTokenizer,
    /// What older layouts needed (buffers skipped).
    pub adaptations: Vec<Adaptation>,
    files: Vec<SafetensorsFile>,
    entries: BTreeMap<String, Entry>,
}

impl ClipFolder {
    /// Opens the weights' headers and reads the configs and the tokenizer.
    pub async fn open(path: &str, parts: ClipParts) -> Result<Self, WeightsError> {
        let config = ClipConfig::from_json(&format!("{path}/config.json"), &parts.config)?;
        let processor = match &parts.preprocessor {
            Some(t) => ImageProcessor::from_json(&format!("{path}/preprocessor_config.json"), t)?,
            None => ImageProcessor::default(),
        };
        let tokenizer = ClipTokenizer::from_source(&parts.tokenizer)?;
        let mut files = Vec::new();
        let mut adaptations = Vec::new();
        let entries = index(
            path,
            Component::Clip,
            parts.weights,
            &mut files,
            &mut adaptations,
        )
        .await?;
        Ok(Self {
            path: path.into(),
            config,
            processor,
            tokenizer,
            adaptations,
            files,
            entries,
        })
    }

    /// Parameters of both towers with their projections (`logit_scale` is skipped).
    pub fn params(&self) -> u64 {
        self.entries
            .values()
            .map(|e| e.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Bytes its weights take on a device in `dtype`.
    pub fn weight_bytes(&self, dtype: burn::tensor::DType) -> u64 {
        self.params() * dtype.size() as u64
    }

    /// Opens a folder on disk: `model.safetensors` (or `model.fp16.safetensors`, or shards),
    /// `config.json`, and where present `preprocessor_config.json` and the tokenizer files.
    #[cfg(not(target_family = "wasm"))]
    pub async fn open_dir(dir: &std::path::Path) -> Result<Self, WeightsError> {
        use crate::weights::open;
        let path = dir.display().to_string();
        let config =
            open::read_text(&dir.join("config.json"))?.ok_or_else(|| WeightsError::NotClip {
                path: path.clone(),
                reason: "it has no config.json".into(),
            })?;
        let weights = open::weight_file(dir, Component::Clip, open::Variant::Auto)?;
        let tokenizer = open::tokenizer(dir)?.unwrap_or_else(bundled_tokenizer);
        let parts = ClipParts {
            config,
            preprocessor: open::read_text(&dir.join("preprocessor_config.json"))?,
            tokenizer,
            weights,
        };
        Self::open(&path, parts).await
    }
}

impl TensorSource for ClipFolder {
    fn path(&self) -> &str {
        &self.path
    }

    fn check(
        &self,
        component: Component,
        expected: &BTreeMap<String, Vec<usize>>,
    ) -> Result<(), WeightsError> {
        check_entries(&self.path, component, &self.entries, expected)
    }

    fn read_order(&self, _: Component) -> Vec<String> {
        read_order(&self.files, &self.entries)
    }

    async fn read(&self, component: Component, name: &str) -> Result<HostTensor, WeightsError> {
        read_entry(&self.path, component, &self.files, &self.entries, name).await
    }
}
