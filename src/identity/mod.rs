//! SeFi identities: per-stage key and value token vectors (see docs/METHOD.md), their file format,
//! how they condition the UNet, and the training objective.

#[cfg(feature = "compute")]
pub mod condition;
#[cfg(feature = "compute")]
pub mod loss;
pub mod prompt;
#[cfg(feature = "compute")]
pub mod session;
pub mod settings;
#[cfg(feature = "compute")]
pub mod train;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::clip::tokenizer::{PLACEHOLDER_NAME_RULE, is_placeholder_name};
use crate::weights::{Family, MemorySource, SafetensorsFile, WeightsError};

/// Default number of timestep stages.
pub const STAGES: usize = 5;
/// The identity file's `format` metadata.
pub const FORMAT: &str = "sefi-identity";
/// The identity file's `format_version` metadata: files of any other version are refused
/// with [`IdentityError::Version`].
pub const FORMAT_VERSION: u32 = 1;

/// The stage of timestep `t` out of `train_steps`: `floor(t * stages / train_steps)`.
pub fn stage_of(t: f64, stages: usize, train_steps: usize) -> usize {
    ((t.max(0.0) * stages as f64 / train_steps as f64).floor() as usize).min(stages - 1)
}

/// A few values of a model's token-embedding table, enough to tell models apart while
/// ignoring storage precision (fp32 and fp16 files of one model match).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Rows of the token-embedding table (the tokenizer's vocabulary size).
    pub vocab: usize,
    /// Width of the table: 768 for SD 1.x, 1024 for SD 2.x; for SDXL the sum of both
    /// encoders' (768 + 1280).
    pub dim: usize,
    /// SDXL: the width of each encoder's table, CLIP-L's then bigG's (`[768, 1280]`); empty
    /// for models with one text encoder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub widths: Vec<usize>,
    /// The first values of a few rows (the start token, "a", "person"), of each table in turn.
    pub samples: Vec<f32>,
}

/// Rows of the token-embedding table the fingerprint samples, and values per row.
pub const FINGERPRINT_ROWS: [usize; 3] = [49406, 320, 2533];
/// Values the fingerprint takes from the start of each of [`FINGERPRINT_ROWS`].
pub const FINGERPRINT_VALUES: usize = 8;

impl Fingerprint {
    /// Same table, up to half-precision rounding.
    pub fn matches(&self, other: &Fingerprint) -> bool {
        self.vocab == other.vocab
            && self.dim == other.dim
            && self.samples.len() == other.samples.len()
            && self
                .samples
                .iter()
                .zip(&other.samples)
                .all(|(a, b)| (a - b).abs() <= 1e-2 * (1.0 + b.abs()))
    }
}

/// A learned identity on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    /// The placeholder name: prompts refer to it as `<token>`.
    pub token: String,
    /// What the subject is ("person", "dog", ...): the vectors start from its embedding and
    /// its attention is the mask of the attention loss.
    pub class_word: String,
    /// Number of timestep stages: the rows of `key` and `value`.
    pub stages: usize,
    /// The base family (identities of sd2 and sd2-v models are interchangeable).
    pub family: Family,
    /// Width of each vector, the text encoder's token-embedding width (768 for SD 1.x, 1024
    /// for SD 2.x). For SDXL both encoders' side by side: 768 for CLIP-L, then 1280 for bigG
    /// (the split is `fingerprint.widths`).
    pub dim: usize,
    /// `[stages, dim]`, row-major: the key token of each stage.
    pub key: Vec<f32>,
    /// `[stages, dim]`: the value token of each stage.
    pub value: Vec<f32>,
    /// The fingerprint of the model it was trained on, compared by [`Identity::check_model`].
    pub fingerprint: Fingerprint,
    /// Training settings, for the record.
    pub training: serde_json::Value,
    /// The face descriptors of the training photos (each 128 values of length 1, see
    /// `face::Descriptor`): what generated images are scored against. Empty for subjects
    /// without a face and for files from before scores.
    pub faces: Vec<Vec<f32>>,
}

/// Why an identity cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum IdentityError {
    /// The file has no `format: sefi-identity` metadata: it is some other safetensors file.
    #[error("{file} is not a SeFi identity file (no `format: {FORMAT}` metadata)")]
    NotIdentity {
        /// The file's name, as given to [`Identity::from_bytes`].
        file: String,
    },
    /// The file states another format version than [`FORMAT_VERSION`] (or none).
    #[error(
        "{file} is an identity file of format version {found}; this version of SeFi Studio reads version {FORMAT_VERSION}"
    )]
    Version {
        /// The file's name.
        file: String,
        /// The version the file states (empty if it states none).
        found: String,
    },
    /// The identity file is malformed (missing or unreadable metadata, `key` and `value` of
    /// the wrong shapes), or an identity could not be written.
    #[error("{file}: {reason}")]
    Invalid {
        /// The file's name (when writing, the identity's token).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The identity was trained on a model of another family (or embedding width) and cannot
    /// be used with this one; train it again on a model of this family.
    #[error(
        "<{token}> was learned on a {identity} model and cannot be used with this {model} model: identities only work with the model family they were trained on"
    )]
    WrongFamily {
        /// The identity's placeholder name.
        token: String,
        /// The family the identity was trained on.
        identity: Family,
        /// The family of the model in use.
        model: Family,
    },
    /// The identity was trained on another model of the same family (its token-embedding
    /// fingerprint differs): it can be used, with a warning, but should be retrained.
    #[error(
        "<{token}> was learned on a different {family} model (its token embeddings differ); it may still work, but results will be off. Retrain it on this model"
    )]
    OtherModel {
        /// The identity's placeholder name.
        token: String,
        /// The family of the model in use.
        family: Family,
    },
    /// The file's safetensors header or tensors could not be read.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

impl Identity {
    /// This identity as a likeness reference, named `<token>`; `None` where it keeps no faces.
    #[cfg(feature = "compute")]
    pub fn face_reference(&self) -> Option<crate::face::score::Reference> {
        (!self.faces.is_empty()).then(|| crate::face::score::Reference {
            name: format!("<{}>", self.token),
            faces: self
                .faces
                .iter()
                .cloned()
                .map(crate::face::Descriptor)
                .collect(),
        })
    }

    /// The identities a prompt names that keep faces: what its images are scored against.
    #[cfg(feature = "compute")]
    pub fn named_in(prompt: &str, identities: &[Identity]) -> Vec<crate::face::score::Reference> {
        identities
            .iter()
            .filter(|i| prompt.contains(&format!("<{}>", i.token)))
            .filter_map(Identity::face_reference)
            .collect()
    }

    /// The prompt as CLIP reads it to score prompt fidelity: each of these identities'
    /// placeholders replaced by its class word ([`crate::clip::plain_prompt`]).
    pub fn plain_prompt(prompt: &str, identities: &[Identity]) -> String {
        let class_words: Vec<(&str, &str)> = identities
            .iter()
            .map(|i| (i.token.as_str(), i.class_word.as_str()))
            .collect();
        crate::clip::plain_prompt(prompt, &class_words)
    }

    /// Checks that the identity fits a model.
    pub fn check_model(
        &self,
        family: Family,
        fingerprint: &Fingerprint,
    ) -> Result<(), IdentityError> {
        if self.family.base() != family.base() || self.dim != fingerprint.dim {
            return Err(IdentityError::WrongFamily {
                token: self.token.clone(),
                identity: self.family,
                model: family,
            });
        }
        if !self.fingerprint.matches(fingerprint) {
            return Err(IdentityError::OtherModel {
                token: self.token.clone(),
                family,
            });
        }
        Ok(())
    }

    /// The identity file: safetensors with `key` and `value` `[stages, dim]` (f32) and the
    /// metadata. SDXL identities hold each encoder's part apart, as SDXL embeddings in the
    /// ecosystem do (`clip_l`, `clip_g`): `key_l`, `value_l` `[stages, 768]` and `key_g`,
    /// `value_g` `[stages, 1280]`.
    pub fn to_bytes(&self) -> Result<Vec<u8>, IdentityError> {
        let invalid = |reason: String| IdentityError::Invalid {
            file: self.token.clone(),
            reason,
        };
        let widths = match self.fingerprint.widths.as_slice() {
            [] => vec![self.dim],
            w if w.iter().sum::<usize>() == self.dim => w.to_vec(),
            w => {
                return Err(invalid(format!(
                    "widths {w:?} do not add up to {}",
                    self.dim
                )));
            }
        };
        // Column `start..start + width` of every stage's row.
        let part = |v: &[f32], start: usize, width: usize| -> Vec<u8> {
            v.chunks(self.dim)
                .flat_map(|row| &row[start..start + width])
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
        let names: &[(&str, &str)] = if widths.len() == 1 {
            &[("key", "value")]
        } else {
            &[("key_l", "value_l"), ("key_g", "value_g")]
        };
        let mut data = Vec::new();
        let mut start = 0;
        for (&(k, v), &width) in names.iter().zip(&widths) {
            data.push((k, width, part(&self.key, start, width)));
            data.push((v, width, part(&self.value, start, width)));
            start += width;
        }
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("token", self.token.clone()),
            ("class_word", self.class_word.clone()),
            ("stages", self.stages.to_string()),
            ("family", self.family.base().to_string()),
            (
                "fingerprint",
                serde_json::to_string(&self.fingerprint).expect("serialisable"),
            ),
            ("training", self.training.to_string()),
        ]
        .into_iter()
        .chain((!self.faces.is_empty()).then(|| {
            (
                "faces",
                serde_json::to_string(&self.faces).expect("serialisable"),
            )
        }))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let views = data
            .iter()
            .map(|(name, width, bytes)| {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![self.stages, *width],
                    bytes,
                )
                .map(|view| (*name, view))
                .map_err(|e| invalid(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        safetensors::serialize(views, Some(metadata)).map_err(|e| invalid(e.to_string()))
    }

    /// Reads an identity file (`file` names it in messages).
    pub async fn from_bytes(file: &str, bytes: Vec<u8>) -> Result<Self, IdentityError> {
        let st = SafetensorsFile::open(Box::new(MemorySource::new(file, bytes))).await?;
        let invalid = |reason: String| IdentityError::Invalid {
            file: file.into(),
            reason,
        };
        let meta = st.user_metadata().cloned().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(IdentityError::NotIdentity { file: file.into() });
        }
        let version = meta.get("format_version").cloned().unwrap_or_default();
        if version != FORMAT_VERSION.to_string() {
            return Err(IdentityError::Version {
                file: file.into(),
                found: version,
            });
        }
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| invalid(format!("missing metadata `{k}`")))
        };
        let family: Family = serde_json::from_value(serde_json::Value::String(get("family")?))
            .map_err(|e| invalid(e.to_string()))?;
        let mut fingerprint: Fingerprint =
            serde_json::from_str(&get("fingerprint")?).map_err(|e| invalid(e.to_string()))?;
        let stages: usize = get("stages")?
            .parse()
            .map_err(|_| invalid("bad `stages`".into()))?;
        let names: &[(&str, &str)] = if family == Family::Sdxl {
            &[("key_l", "value_l"), ("key_g", "value_g")]
        } else {
            &[("key", "value")]
        };
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for &(k, v) in names {
            let (key, value) = (st.read(k).await?, st.read(v).await?);
            if key.shape.len() != 2 || key.shape[0] != stages || key.shape != value.shape {
                return Err(invalid(format!(
                    "`{k}` {:?} and `{v}` {:?} must both be [{stages}, width]",
                    key.shape, value.shape
                )));
            }
            keys.push((key.shape[1], key.to_f32()));
            values.push((key.shape[1], value.to_f32()));
        }
        let widths: Vec<usize> = keys.iter().map(|p| p.0).collect();
        let dim = widths.iter().sum();
        // Every stage's rows of the parts side by side.
        let join = |parts: &[(usize, Vec<f32>)]| -> Vec<f32> {
            (0..stages)
                .flat_map(|s| parts.iter().flat_map(move |(w, v)| &v[s * w..(s + 1) * w]))
                .copied()
                .collect()
        };
        let (key, value) = (join(&keys), join(&values));
        if widths.len() > 1 {
            fingerprint.widths = widths;
        }
        // The name becomes a file name and text on the page: only what a prompt can name.
        let token = get("token")?;
        if !is_placeholder_name(&token) {
            return Err(invalid(format!(
                "its name {token:?} cannot be used; names use {PLACEHOLDER_NAME_RULE}"
            )));
        }
        Ok(Self {
            token,
            class_word: get("class_word")?,
            stages,
            family,
            dim,
            key,
            value,
            fingerprint,
            training: meta
                .get("training")
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(serde_json::Value::Null),
            faces: match meta.get("faces") {
                Some(f) => serde_json::from_str(f)
                    .map_err(|e| invalid(format!("unreadable `faces`: {e}")))?,
                None => Vec::new(),
            },
        })
    }
}
