//! Opening checkpoints from native paths: a diffusers folder or a single `.safetensors` file.

use std::path::Path;

use super::checkpoint::{DiffusersParts, Shards, TokenizerSource, pad_token_of, shard_names};
use super::{ByteSource, Checkpoint, Component, FileSource, WeightsError};
use crate::config::SdConfig;

/// Which weight files of a diffusers folder to use when both exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// The full-precision files, or the `.fp16` ones when only they exist.
    #[default]
    Auto,
    /// The `.fp16.safetensors` files (half the size; what most downloads use).
    Fp16,
}

pub(crate) fn read_text(path: &Path) -> Result<Option<String>, WeightsError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WeightsError::Io {
            file: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// The shards an index lists, opened from the index's folder.
fn shards(index: &Path) -> Result<Shards, WeightsError> {
    let text = read_text(index)?.unwrap_or_default();
    let dir = index.parent().unwrap_or(Path::new("."));
    shard_names(&index.display().to_string(), &text)?
        .iter()
        .map(|name| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(WeightsError::Io {
                    file: path.display().to_string(),
                    reason: format!(
                        "{} lists this shard, but it is not there; the download is incomplete",
                        index.display()
                    ),
                });
            }
            Ok(Box::new(FileSource::open(&path)?) as Box<dyn ByteSource>)
        })
        .collect()
}

/// The weights in `dir` under `stem`: one file, or the shards an index lists (as diffusers and
/// transformers name them: `{stem}.safetensors.index.json` and, for the fp16 variant,
/// `{stem}.safetensors.index.fp16.json`); full precision first unless `variant` asks for fp16.
/// `None` when there are none.
fn weights_in(dir: &Path, stem: &str, variant: Variant) -> Result<Option<Shards>, WeightsError> {
    let full = dir.join(format!("{stem}.safetensors"));
    let half = dir.join(format!("{stem}.fp16.safetensors"));
    let full_index = dir.join(format!("{stem}.safetensors.index.json"));
    let half_index = dir.join(format!("{stem}.safetensors.index.fp16.json"));
    let pick = match variant {
        Variant::Fp16 if half.exists() => Some(half),
        Variant::Fp16 if half_index.exists() => return shards(&half_index).map(Some),
        _ if full.exists() => Some(full),
        _ if full_index.exists() => return shards(&full_index).map(Some),
        _ if half.exists() => Some(half),
        _ if half_index.exists() => return shards(&half_index).map(Some),
        _ => None,
    };
    pick.map(|p| Ok(vec![Box::new(FileSource::open(&p)?) as Box<dyn ByteSource>]))
        .transpose()
}

/// The weight file of one model of a diffusers folder, or its shards.
pub(crate) fn weight_file(
    folder: &Path,
    component: Component,
    variant: Variant,
) -> Result<Shards, WeightsError> {
    let dir = folder.join(component.folder());
    let stem = component.weights_stem();
    if let Some(weights) = weights_in(&dir, stem, variant)? {
        return Ok(weights);
    }
    if let Some(pickle) = component
        .pickle_files()
        .iter()
        .map(|f| folder.join(f))
        .find(|p| p.exists())
    {
        return Err(WeightsError::Pickle {
            file: pickle.display().to_string(),
        });
    }
    Err(WeightsError::UnknownModel {
        path: dir.display().to_string(),
        reason: format!("it has no {stem}.safetensors"),
    })
}

/// The tokenizer files of a diffusers folder, with its pad token.
pub(crate) fn tokenizer(dir: &Path) -> Result<Option<TokenizerSource>, WeightsError> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !vocab.exists() || !merges.exists() {
        return Ok(None);
    }
    let mut configs = Vec::new();
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        if let Some(text) = read_text(&dir.join(f))? {
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| WeightsError::Config {
                file: dir.join(f).display().to_string(),
                reason: e.to_string(),
            })?;
            configs.push(text);
        }
    }
    let pad_token = pad_token_of(&configs.iter().map(String::as_str).collect::<Vec<_>>());
    Ok(Some(TokenizerSource::Files {
        vocab: vocab.display().to_string(),
        merges: merges.display().to_string(),
        pad_token,
    }))
}

impl Checkpoint {
    /// Opens a diffusers folder or a single-file checkpoint. `config` applies to single files
    /// (a diffusers folder, or its `unet/`, `text_encoder/`, `vae/` configs, that describe the
    /// sizes); folders bring their own.
    pub async fn open_path(
        path: &Path,
        variant: Variant,
        config: Option<SdConfig>,
    ) -> Result<Self, WeightsError> {
        let name = path.display().to_string();
        if path.is_dir() {
            if !path.join("unet").is_dir() {
                return Err(WeightsError::UnknownModel {
                    path: name,
                    reason: "the folder has no unet/ subfolder (a diffusers model folder has unet/, text_encoder/, vae/, tokenizer/)".into(),
                });
            }
            let unet_config = read_text(&path.join("unet/config.json"))?;
            let xl = path.join("text_encoder_2").is_dir();
            if xl && !path.join("text_encoder").is_dir() {
                // The refiner: the checkpoint layer names it.
                let parts = DiffusersParts {
                    unet: weight_file(path, Component::Unet, variant)?,
                    text_encoder: Vec::new(),
                    vae: Vec::new(),
                    text_encoder_2: Vec::new(),
                    unet_config,
                    text_encoder_config: None,
                    text_encoder_2_config: None,
                    model_index: None,
                    vae_config: None,
                    scheduler_config: None,
                    tokenizer: None,
                    tokenizer_2: None,
                };
                return Checkpoint::diffusers(&name, parts).await;
            }
            let parts = DiffusersParts {
                unet: weight_file(path, Component::Unet, variant)?,
                text_encoder: weight_file(path, Component::TextEncoder, variant)?,
                vae: weight_file(path, Component::Vae, variant)?,
                text_encoder_2: if xl {
                    weight_file(path, Component::TextEncoder2, variant)?
                } else {
                    Vec::new()
                },
                unet_config,
                text_encoder_config: read_text(&path.join("text_encoder/config.json"))?,
                text_encoder_2_config: read_text(&path.join("text_encoder_2/config.json"))?,
                model_index: read_text(&path.join("model_index.json"))?,
                vae_config: read_text(&path.join("vae/config.json"))?,
                scheduler_config: read_text(&path.join("scheduler/scheduler_config.json"))?,
                tokenizer: tokenizer(&path.join("tokenizer"))?,
                tokenizer_2: tokenizer(&path.join("tokenizer_2"))?,
            };
            Checkpoint::diffusers(&name, parts).await
        } else if path.exists() {
            Checkpoint::single_file(Box::new(FileSource::open(path)?), config).await
        } else {
            Err(WeightsError::Io {
                file: name,
                reason: "no such file or folder".into(),
            })
        }
    }
}

impl Checkpoint {
    /// The same model with the VAE of `dir`: a folder holding `config.json` and
    /// `diffusion_pytorch_model[.fp16].safetensors` (as madebyollin/sdxl-vae-fp16-fix publishes
    /// it), or a model folder whose `vae/` does.
    pub async fn with_vae_dir(self, dir: &Path) -> Result<Self, WeightsError> {
        let dir = if dir.join("vae").is_dir() {
            dir.join("vae")
        } else {
            dir.to_path_buf()
        };
        let stem = Component::Vae.weights_stem();
        let sources =
            weights_in(&dir, stem, Variant::Auto)?.ok_or_else(|| WeightsError::UnknownModel {
                path: dir.display().to_string(),
                reason: format!("it has no {stem}.safetensors, so it is not a diffusers VAE"),
            })?;
        let config = read_text(&dir.join("config.json"))?;
        self.with_vae(&dir.display().to_string(), sources, config)
            .await
    }
}

/// Reads the sizes of a model from a diffusers folder's config files (for single files).
pub async fn config_from_dir(dir: &Path) -> Result<SdConfig, WeightsError> {
    Ok(Checkpoint::open_path(dir, Variant::Auto, None)
        .await?
        .config)
}
