//! A Stable Diffusion checkpoint as the three models see it: every tensor under its diffusers
//! name, wherever it lives (a diffusers folder's per-model files, or one single-file original
//! checkpoint mapped by [`super::ldm`]). Only headers are read until a tensor is asked for.

use std::collections::BTreeMap;
use std::fmt;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::family::{Component, Family};
use super::ldm::{self, LdmFamily, Transform};
use super::legacy::{self, Adaptation, Adapted};
use super::{ByteSource, HostData, HostTensor, SafetensorsFile, WeightsError};
use crate::config::{self, Prediction, SdConfig, TextConfig, UNetConfig, VaeConfig};
use crate::schedule::SchedulerConfig;

/// How the files are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A diffusers folder (`unet/`, `text_encoder/`, `vae/`, ...).
    Diffusers,
    /// One original (CompVis/LDM) `.safetensors` file.
    SingleFile,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Diffusers => "diffusers",
            Format::SingleFile => "single-file",
        })
    }
}

/// Where the tokenizer comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TokenizerSource {
    /// `tokenizer/vocab.json` and `tokenizer/merges.txt` of the model.
    Files {
        /// Path of `vocab.json`.
        vocab: String,
        /// Path of `merges.txt`.
        merges: String,
        /// The padding token (see [`pad_token_of`]).
        pad_token: String,
    },
    /// The same files' contents, read beforehand (the browser, where files are not paths).
    Texts {
        /// Contents of `vocab.json`.
        vocab: String,
        /// Contents of `merges.txt`.
        merges: String,
        /// The padding token (see [`pad_token_of`]).
        pad_token: String,
    },
    /// The CLIP vocabulary bundled with SeFi Studio (single-file checkpoints carry none).
    Bundled {
        /// The padding token: `<|endoftext|>` for SD 1.x (and SDXL's first tokenizer), `!`
        /// for SD 2.x (and SDXL's second).
        pad_token: String,
    },
}

/// The padding token a tokenizer folder names in `special_tokens_map.json` or
/// `tokenizer_config.json` (either as a string or as `{"content": ...}`); CLIP's end token
/// when neither names one.
pub fn pad_token_of(configs: &[&str]) -> String {
    configs
        .iter()
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .find_map(|v| {
            let pad = &v["pad_token"];
            pad.as_str()
                .or_else(|| pad["content"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "<|endoftext|>".to_string())
}

/// Where one model tensor is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    file: usize,
    key: String,
    transform: Transform,
    /// The dtype the tensor is stored in.
    pub dtype: Dtype,
    /// Shape after the transform.
    pub shape: Vec<usize>,
}

/// The weight files of one model: one file, or the shards an `*.safetensors.index.json`
/// lists (large models, such as SDXL's UNet saved in f32, are split).
pub type Shards = Vec<Box<dyn ByteSource>>;

/// The shard file names an `*.safetensors.index.json` maps tensors to, sorted, each once.
/// Names with a path in them are refused: shards lie beside their index.
pub fn shard_names(index_file: &str, text: &str) -> Result<Vec<String>, WeightsError> {
    let bad = |reason: String| WeightsError::Config {
        file: index_file.into(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not a valid index: {e}")))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad("it has no `weight_map`".into()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`{tensor}` maps to a non-string")))?;
        if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
            return Err(bad(format!(
                "`{tensor}` maps to `{file}`, which is not a file name beside the index"
            )));
        }
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    if names.is_empty() {
        return Err(bad("its `weight_map` is empty".into()));
    }
    names.sort();
    Ok(names)
}

/// Files that make up a diffusers folder, as byte sources with their config texts.
pub struct DiffusersParts {
    /// The UNet weights (`unet/diffusion_pytorch_model[.fp16].safetensors`, or its shards).
    pub unet: Shards,
    /// The text encoder weights (`text_encoder/model[.fp16].safetensors`, or its shards).
    pub text_encoder: Shards,
    /// The VAE weights (`vae/diffusion_pytorch_model[.fp16].safetensors`).
    pub vae: Shards,
    /// SDXL's second text encoder (`text_encoder_2/model[.fp16].safetensors`, or its shards);
    /// empty for SD 1.x/2.x.
    pub text_encoder_2: Shards,
    /// Text of `unet/config.json`; `None` if absent (the sizes then come from the shapes).
    pub unet_config: Option<String>,
    /// Text of `text_encoder/config.json`, if present.
    pub text_encoder_config: Option<String>,
    /// Text of `text_encoder_2/config.json`, if present.
    pub text_encoder_2_config: Option<String>,
    /// Text of `model_index.json`, if present (SDXL's `force_zeros_for_empty_prompt`).
    pub model_index: Option<String>,
    /// Text of `vae/config.json`, if present.
    pub vae_config: Option<String>,
    /// Text of `scheduler/scheduler_config.json`, if present.
    pub scheduler_config: Option<String>,
    /// The folder's tokenizer; `None` to use the bundled vocabulary.
    pub tokenizer: Option<TokenizerSource>,
    /// SDXL's second tokenizer (`tokenizer_2/`); `None` to use the bundled vocabulary.
    pub tokenizer_2: Option<TokenizerSource>,
}

/// An opened checkpoint: family, config, and the index of every tensor.
pub struct Checkpoint {
    /// The folder path, or the single file's name, as used in messages.
    pub path: String,
    /// Whether it is a diffusers folder or a single file.
    pub format: Format,
    /// The model family, detected from the configs or the tensors.
    pub family: Family,
    /// The sizes of the three models and the prediction type.
    pub config: SdConfig,
    /// Where the tokenizer vocabulary comes from.
    pub tokenizer: TokenizerSource,
    /// SDXL's second tokenizer (the same vocabulary, padded with `!`); `None` otherwise.
    pub tokenizer_2: Option<TokenizerSource>,
    /// The noise schedule (`scheduler/scheduler_config.json`, or the family's).
    pub scheduler: SchedulerConfig,
    /// Older names and buffers of the files, mapped onto today's layout ([`legacy`]).
    pub adaptations: Vec<Adaptation>,
    files: Vec<SafetensorsFile>,
    entries: BTreeMap<Component, BTreeMap<String, Entry>>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("family", &self.family)
            .finish()
    }
}

fn pad_token(family: Family) -> String {
    match family {
        Family::Sd1 | Family::Sdxl => "<|endoftext|>".into(),
        _ => "!".into(),
    }
}

/// SDXL's refiner conditions on bigG alone (no `text_encoder/`, 1280-wide cross-attention) and
/// starts from the base model's latents: it is refused by name.
fn refiner(path: &str) -> WeightsError {
    WeightsError::Unsupported {
        path: path.into(),
        what: "an SDXL refiner (it refines the latents of the SDXL base model and cannot generate on its own; open stable-diffusion-xl-base-1.0 or a model fine-tuned from it)".into(),
    }
}

/// The tensors of one model's files (a file, or shards), under today's diffusers names; the
/// files are appended to `files` and what older layouts needed to `adaptations`.
pub(crate) async fn index(
    path: &str,
    component: Component,
    sources: Shards,
    files: &mut Vec<SafetensorsFile>,
    adaptations: &mut Vec<Adaptation>,
) -> Result<BTreeMap<String, Entry>, WeightsError> {
    let mut map = BTreeMap::new();
    for source in sources {
        let file = SafetensorsFile::open(source).await?;
        let file_name = file.name().to_string();
        for (key, dtype, shape) in file.tensors() {
            // transformers 5 saves CLIPTextModel without the `text_model.` prefix.
            let stored = if component.is_text_encoder()
                && !key.starts_with("text_model.")
                && key != "text_projection.weight"
            {
                format!("text_model.{key}")
            } else {
                key.clone()
            };
            let (name, transform) = match legacy::adapt(component, &stored, &shape) {
                Adapted::Current => (stored, Transform::Copy),
                Adapted::Buffer => {
                    adaptations.push(Adaptation {
                        component,
                        stored: key,
                        loaded_as: None,
                    });
                    continue;
                }
                Adapted::Renamed { name, transform } => {
                    adaptations.push(Adaptation {
                        component,
                        stored: key.clone(),
                        loaded_as: Some(name.clone()),
                    });
                    (name, transform)
                }
            };
            let entry = Entry {
                file: files.len(),
                shape: transform.apply_shape(&shape),
                key,
                transform,
                dtype,
            };
            let this_key = entry.key.clone();
            let this_file = entry.file;
            if let Some(other) = map.insert(name.clone(), entry) {
                let reason = if other.file != this_file {
                    format!(
                        "its {component} weights hold `{name}` in two shards ({} and {file_name}); the shards do not belong together",
                        files
                            .get(other.file)
                            .map_or("", |f: &SafetensorsFile| f.name())
                    )
                } else {
                    format!(
                        "its {component} weights hold `{name}` twice, as `{}` and as `{this_key}` (today's name and an older one); keep one of them",
                        other.key
                    )
                };
                return Err(WeightsError::UnknownModel {
                    path: path.into(),
                    reason,
                });
            }
        }
        files.push(file);
    }
    Ok(map)
}

impl Checkpoint {
    /// Opens a diffusers folder's files. The configs decide the family; without them the
    /// tensor shapes do.
    pub async fn diffusers(path: &str, parts: DiffusersParts) -> Result<Self, WeightsError> {
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        let mut adaptations = Vec::new();
        for (component, sources) in Component::ALL.into_iter().zip([
            parts.unet,
            parts.text_encoder,
            parts.vae,
            parts.text_encoder_2,
        ]) {
            let map = index(path, component, sources, &mut files, &mut adaptations).await?;
            entries.insert(component, map);
        }
        let cfg_file = |c: &str| format!("{path}/{c}/config.json");
        let shapes = Shapes(&entries);
        let family_from_shapes = shapes.family(path)?;
        let unet: UNetConfig = match &parts.unet_config {
            Some(t) => {
                config::check_unet_json(&cfg_file("unet"), t)?;
                config::from_json(&cfg_file("unet"), t)?
            }
            None => family_from_shapes.full_size().unet,
        };
        let xl = unet.addition_embed_type.is_some();
        if xl && !unet.text_time() {
            return Err(WeightsError::Config {
                file: cfg_file("unet"),
                reason: format!(
                    "`addition_embed_type: {}` is a UNet variant SeFi Studio does not support (only SDXL's `text_time`)",
                    unet.addition_embed_type.as_deref().unwrap_or_default()
                ),
            });
        }
        let has = |c: Component| !entries[&c].is_empty();
        if xl && !has(Component::TextEncoder) {
            return Err(refiner(path));
        }
        if xl != has(Component::TextEncoder2) {
            return Err(WeightsError::UnknownModel {
                path: path.into(),
                reason: if xl {
                    "its UNet is an SDXL UNet, but the folder has no text_encoder_2/ weights".into()
                } else {
                    "it has text_encoder_2/ weights, but its UNet takes no SDXL conditioning (unet/config.json has no `addition_embed_type`)".into()
                },
            });
        }
        let text_encoder: TextConfig = match &parts.text_encoder_config {
            Some(t) => config::from_json(&cfg_file("text_encoder"), t)?,
            None => family_from_shapes.full_size().text_encoder,
        };
        let text_encoder_2: Option<TextConfig> = if xl {
            Some(match &parts.text_encoder_2_config {
                Some(t) => config::from_json(&cfg_file("text_encoder_2"), t)?,
                None => TextConfig::sdxl_g(),
            })
        } else {
            None
        };
        if let Some(t2) = &text_encoder_2
            && unet.cross_attention_dim != text_encoder.hidden_size + t2.hidden_size
        {
            if unet.cross_attention_dim == t2.hidden_size {
                return Err(refiner(path));
            }
            return Err(WeightsError::Config {
                file: cfg_file("unet"),
                reason: format!(
                    "`cross_attention_dim` is {}, but the two text encoders give {} + {}",
                    unet.cross_attention_dim, text_encoder.hidden_size, t2.hidden_size
                ),
            });
        }
        let force_zeros_for_empty_prompt = xl
            && match &parts.model_index {
                Some(t) => {
                    let v: serde_json::Value =
                        serde_json::from_str(t).map_err(|e| WeightsError::Config {
                            file: format!("{path}/model_index.json"),
                            reason: e.to_string(),
                        })?;
                    v["force_zeros_for_empty_prompt"].as_bool().unwrap_or(true)
                }
                None => true,
            };
        let vae: VaeConfig = match &parts.vae_config {
            Some(t) => config::from_json(&cfg_file("vae"), t)?,
            None => family_from_shapes.full_size().vae,
        };
        let scheduler = match &parts.scheduler_config {
            Some(t) => config::from_json(&format!("{path}/scheduler/scheduler_config.json"), t)?,
            None => SchedulerConfig::for_prediction(family_from_shapes.full_size().prediction),
        };
        let prediction = scheduler.prediction_type;
        let sd2 = unet.use_linear_projection || text_encoder.hidden_act == "gelu";
        let family = match (xl, sd2, prediction) {
            (true, _, Prediction::Epsilon) => Family::Sdxl,
            (true, _, Prediction::VPrediction) => {
                return Err(WeightsError::Unsupported {
                    path: path.into(),
                    what: "an SDXL model with v-prediction".into(),
                });
            }
            (false, false, _) => Family::Sd1,
            (false, true, Prediction::Epsilon) => Family::Sd2,
            (false, true, Prediction::VPrediction) => Family::Sd2V,
        };
        let tokenizer = parts.tokenizer.unwrap_or(TokenizerSource::Bundled {
            pad_token: pad_token(family),
        });
        let tokenizer_2 = xl.then(|| {
            parts.tokenizer_2.unwrap_or(TokenizerSource::Bundled {
                pad_token: "!".into(),
            })
        });
        Ok(Self {
            path: path.into(),
            format: Format::Diffusers,
            family,
            config: SdConfig {
                unet,
                text_encoder,
                text_encoder_2,
                vae,
                prediction,
                force_zeros_for_empty_prompt,
            },
            tokenizer,
            tokenizer_2,
            scheduler,
            adaptations,
            files,
            entries,
        })
    }

    /// The same model with another VAE: a diffusers VAE's weights (`diffusion_pytorch_model*.safetensors`)
    /// and its `config.json`, such as SDXL's fp16-fix VAE, which computes in f16 without
    /// overflowing (its config drops `force_upcast`). `name` names it in messages.
    pub async fn with_vae(
        mut self,
        name: &str,
        sources: Shards,
        config: Option<String>,
    ) -> Result<Self, WeightsError> {
        let map = index(
            name,
            Component::Vae,
            sources,
            &mut self.files,
            &mut self.adaptations,
        )
        .await?;
        if let Some(text) = config {
            self.config.vae = config::from_json(&format!("{name}/config.json"), &text)?;
        }
        self.entries.insert(Component::Vae, map);
        Ok(self)
    }

    /// Opens a single-file original checkpoint. The family comes from the text encoder's
    /// keys. `config` gives the model sizes (as diffusers' `from_single_file(config=...)`);
    /// without it the family's full-size config is used, and SD 2.x is taken to be the
    /// 768-px v-prediction model, as diffusers does.
    pub async fn single_file(
        source: Box<dyn ByteSource>,
        config: Option<SdConfig>,
    ) -> Result<Self, WeightsError> {
        let path = source.name().to_string();
        let file = SafetensorsFile::open(source).await?;
        let keys: Vec<(String, Vec<usize>)> =
            file.tensors().into_iter().map(|(k, _, s)| (k, s)).collect();
        let Some(ldm_family) = ldm::detect_family(&keys) else {
            let reason = if keys
                .iter()
                .any(|(k, _)| k.starts_with("model.diffusion_model."))
            {
                "it has a UNet but no known text encoder (cond_stage_model.*)".to_string()
            } else {
                "it has none of the tensors of an original Stable Diffusion checkpoint (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*)".to_string()
            };
            return Err(WeightsError::UnknownModel { path, reason });
        };
        if ldm_family == LdmFamily::SdxlRefiner {
            return Err(refiner(&path));
        }
        let map = ldm::map_keys(&keys, ldm_family);
        if let Some(first) = map.unknown.first() {
            return Err(WeightsError::UnknownModel {
                path,
                reason: format!(
                    "{} tensor(s) belong to none of the three models, e.g. `{first}`",
                    map.unknown.len()
                ),
            });
        }
        let mut entries: BTreeMap<Component, BTreeMap<String, Entry>> = Component::ALL
            .iter()
            .map(|&c| (c, BTreeMap::new()))
            .collect();
        for m in map.mapped {
            let (prefix, name) = m
                .target
                .split_once('.')
                .expect("targets carry a component prefix");
            let component = match prefix {
                "unet" => Component::Unet,
                "text_encoder" => Component::TextEncoder,
                "text_encoder_2" => Component::TextEncoder2,
                _ => Component::Vae,
            };
            let info = file
                .info(&m.source)
                .expect("mapped names come from the file");
            let shape = m.transform.apply_shape(&info.shape);
            entries.get_mut(&component).expect("all components").insert(
                name.to_string(),
                Entry {
                    file: 0,
                    key: m.source,
                    transform: m.transform,
                    dtype: info.dtype,
                    shape,
                },
            );
        }
        let family = match ldm_family {
            LdmFamily::Sd1 => Family::Sd1,
            LdmFamily::Sd2 => match config.as_ref().map(|c| c.prediction) {
                Some(Prediction::Epsilon) => Family::Sd2,
                _ => Family::Sd2V,
            },
            LdmFamily::Sdxl | LdmFamily::SdxlRefiner => Family::Sdxl,
        };
        let config = config.unwrap_or_else(|| family.full_size());
        if (family == Family::Sdxl) != config.text_encoder_2.is_some() {
            return Err(WeightsError::WrongFamily {
                path,
                expected: family,
                found: if family == Family::Sdxl {
                    Family::Sd1
                } else {
                    Family::Sdxl
                },
                why: " by the config given for its sizes; pass the config of a model of the file's own family".into(),
            });
        }
        let scheduler = SchedulerConfig::for_prediction(config.prediction);
        Ok(Self {
            path,
            format: Format::SingleFile,
            family,
            config,
            tokenizer: TokenizerSource::Bundled {
                pad_token: pad_token(family),
            },
            tokenizer_2: (family == Family::Sdxl).then(|| TokenizerSource::Bundled {
                pad_token: "!".into(),
            }),
            scheduler,
            adaptations: Vec::new(),
            files: vec![file],
            entries,
        })
    }

    /// The tensors of one model, by diffusers name.
    pub fn entries(&self, component: Component) -> &BTreeMap<String, Entry> {
        &self.entries[&component]
    }

    /// Number of parameters of one model.
    pub fn params(&self, component: Component) -> u64 {
        self.entries(component)
            .values()
            .map(|e| e.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// The dtype most of the weights are stored in.
    pub fn dtype(&self) -> Dtype {
        let mut count: BTreeMap<String, (u64, Dtype)> = BTreeMap::new();
        for map in self.entries.values() {
            for e in map.values() {
                count
                    .entry(format!("{:?}", e.dtype))
                    .or_insert((0, e.dtype))
                    .0 += e.shape.iter().product::<usize>() as u64;
            }
        }
        count
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, d)| d)
            .unwrap_or(Dtype::F32)
    }

    /// Checks the stored tensors against what a model expects: every expected tensor present
    /// with its shape, and nothing left over.
    pub fn check(
        &self,
        component: Component,
        expected: &BTreeMap<String, Vec<usize>>,
    ) -> Result<(), WeightsError> {
        check_entries(&self.path, component, self.entries(component), expected)
    }

    /// Names of one model's tensors in the order their bytes lie in the files, so that reads
    /// stream forward.
    pub fn read_order(&self, component: Component) -> Vec<String> {
        read_order(&self.files, self.entries(component))
    }

    /// Reads one tensor (diffusers name) from its file and applies its transform.
    pub async fn read(&self, component: Component, name: &str) -> Result<HostTensor, WeightsError> {
        read_entry(
            &self.path,
            component,
            &self.files,
            self.entries(component),
            name,
        )
        .await
    }
}

impl super::TensorSource for Checkpoint {
    fn path(&self) -> &str {
        &self.path
    }

    fn check(
        &self,
        component: Component,
        expected: &BTreeMap<String, Vec<usize>>,
    ) -> Result<(), WeightsError> {
        Checkpoint::check(self, component, expected)
    }

    fn read_order(&self, component: Component) -> Vec<String> {
        Checkpoint::read_order(self, component)
    }

    async fn read(&self, component: Component, name: &str) -> Result<HostTensor, WeightsError> {
        Checkpoint::read(self, component, name).await
    }
}

/// Checks the tensors a model's files hold (`have`) against what it expects: every expected
/// tensor present with its shape, and nothing left over.
pub(crate) fn check_entries(
    path: &str,
    component: Component,
    have: &BTreeMap<String, Entry>,
    expected: &BTreeMap<String, Vec<usize>>,
) -> Result<(), WeightsError> {
    for (name, shape) in expected {
        match have.get(name) {
            None => {
                return Err(WeightsError::Missing {
                    path: path.into(),
                    component,
                    name: name.clone(),
                });
            }
            Some(e) if &e.shape != shape => {
                return Err(WeightsError::Shape {
                    path: path.into(),
                    component,
                    name: name.clone(),
                    expected: shape.clone(),
                    found: e.shape.clone(),
                });
            }
            Some(_) => {}
        }
    }
    let extra: Vec<&String> = have.keys().filter(|k| !expected.contains_key(*k)).collect();
    if let Some(first) = extra.first() {
        return Err(WeightsError::Unexpected {
            path: path.into(),
            component,
            count: extra.len(),
            first: (*first).clone(),
        });
    }
    Ok(())
}

/// The names of `entries` in the order their bytes lie in `files`, so that reads stream
/// forward.
pub(crate) fn read_order(
    files: &[SafetensorsFile],
    entries: &BTreeMap<String, Entry>,
) -> Vec<String> {
    let mut names: Vec<(&String, (usize, usize))> = entries
        .iter()
        .map(|(name, e)| {
            (
                name,
                (
                    e.file,
                    files[e.file].info(&e.key).map_or(0, |i| i.data_offsets.0),
                ),
            )
        })
        .collect();
    names.sort_by_key(|(_, at)| *at);
    names.into_iter().map(|(n, _)| n.clone()).collect()
}

/// Reads the tensor `name` of `entries` from its file and applies its transform; `Missing`
/// (under `path` and `component`) where the entries hold no such tensor.
pub(crate) async fn read_entry(
    path: &str,
    component: Component,
    files: &[SafetensorsFile],
    entries: &BTreeMap<String, Entry>,
    name: &str,
) -> Result<HostTensor, WeightsError> {
    let e = entries.get(name).ok_or_else(|| WeightsError::Missing {
        path: path.into(),
        component,
        name: name.into(),
    })?;
    let t = files[e.file].read(&e.key).await?;
    let data = match &e.transform {
        Transform::Copy | Transform::Squeeze => t.data,
        transform => match t.data {
            HostData::F32(v) => HostData::F32(transform.apply_data(&v, &t.shape)),
            HostData::F16(v) => HostData::F16(transform.apply_data(&v, &t.shape)),
            HostData::BF16(v) => HostData::BF16(transform.apply_data(&v, &t.shape)),
        },
    };
    Ok(HostTensor {
        shape: e.shape.clone(),
        data,
    })
}

/// Family guesses from tensor shapes alone (a diffusers folder without config files).
struct Shapes<'a>(&'a BTreeMap<Component, BTreeMap<String, Entry>>);

impl Shapes<'_> {
    fn family(&self, path: &str) -> Result<Family, WeightsError> {
        let unet = &self.0[&Component::Unet];
        let cross = unet
            .iter()
            .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
            .map(|(_, e)| e.shape.get(1).copied().unwrap_or(0));
        let Some(cross) = cross else {
            return Err(WeightsError::UnknownModel {
                path: path.into(),
                reason: "its UNet has no cross-attention layers (attn2.to_k.weight)".into(),
            });
        };
        if unet.keys().any(|k| k.starts_with("add_embedding.")) {
            return Ok(Family::Sdxl);
        }
        let linear_proj = unet
            .iter()
            .any(|(k, e)| k.ends_with("proj_in.weight") && e.shape.len() == 2);
        Ok(if cross == 1024 || linear_proj {
            Family::Sd2V
        } else {
            Family::Sd1
        })
    }
}

impl Family {
    /// The full-size config of the family's reference model.
    pub fn full_size(self) -> SdConfig {
        match self {
            Family::Sd1 => SdConfig::v1_5(),
            Family::Sd2 => SdConfig::v2_1_base(),
            Family::Sd2V => SdConfig::v2_1(),
            Family::Sdxl => SdConfig::sdxl_base(),
        }
    }
}
