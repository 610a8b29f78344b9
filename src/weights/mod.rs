//! Weights: streaming safetensors reading, dtype casts, the key maps of diffusers folders and
//! single-file checkpoints, and model detection. Nothing here needs a compute backend except
//! the hand-over to the device in [`crate::nn`].

pub mod checkpoint;
pub mod file;
pub mod ldm;
pub mod legacy;
#[cfg(not(target_family = "wasm"))]
pub mod open;
pub mod source;

pub use checkpoint::{
    Checkpoint, Component, DiffusersParts, Entry, Family, Format, TokenizerSource,
};
pub use file::{HostData, HostTensor, SafetensorsFile};
pub use source::{ByteSource, MemorySource};

#[cfg(not(target_family = "wasm"))]
pub use source::FileSource;

/// Everything that can go wrong between a file and a model, each with what the user can do.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {file}: {reason}")]
    Io { file: String, reason: String },
    #[error(
        "{file} is cut short: it needs at least {needed} bytes but has {actual}. The download or copy was probably interrupted; fetch the file again"
    )]
    Truncated {
        file: String,
        needed: u64,
        actual: u64,
    },
    #[error(
        "{file} is not a valid safetensors file ({reason}). It may be damaged, or not a model file at all"
    )]
    CorruptHeader { file: String, reason: String },
    #[error(
        "{file} is a PyTorch pickle checkpoint (.ckpt/.pt/.bin). Opening a pickle file can run any code hidden in it, so SeFi Studio never loads them. Use the model's .safetensors version (most models publish one), or convert the file once on a machine you trust, e.g. with diffusers' conversion scripts"
    )]
    Pickle { file: String },
    #[error(
        "tensor `{name}` in {file} is stored as {dtype}; only F32, F16 and BF16 weights are supported"
    )]
    UnsupportedDtype {
        file: String,
        name: String,
        dtype: String,
    },
    #[error("{path} is not a Stable Diffusion model that SeFi Studio recognises: {reason}")]
    UnknownModel { path: String, reason: String },
    #[error(
        "{path} is {what}, which SeFi Studio does not support yet. Supported: Stable Diffusion 1.x and 2.x"
    )]
    Unsupported { path: String, what: String },
    #[error("{path} is a {found} model, but {expected} was expected{why}")]
    WrongFamily {
        path: String,
        expected: Family,
        found: Family,
        why: String,
    },
    #[error(
        "the {component} weights in {path} lack the tensor `{name}`. The file is incomplete or was made for a different model layout"
    )]
    Missing {
        path: String,
        component: Component,
        name: String,
    },
    #[error(
        "the {component} weights in {path} have {count} tensor(s) the model does not use, e.g. `{first}`. The file was made for a different model layout (or its config.json does not match it)"
    )]
    Unexpected {
        path: String,
        component: Component,
        count: usize,
        first: String,
    },
    #[error(
        "tensor `{name}` of the {component} in {path} has shape {found:?}, but the model expects {expected:?}. The config.json does not match the weights, or the file belongs to another model"
    )]
    Shape {
        path: String,
        component: Component,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{file}: {reason}")]
    Config { file: String, reason: String },
}

impl From<crate::config::ConfigError> for WeightsError {
    fn from(e: crate::config::ConfigError) -> Self {
        WeightsError::Config {
            file: e.file,
            reason: e.reason,
        }
    }
}
