//! What can go wrong between a file and a model.

use super::family::{Component, Family};

/// Everything that can go wrong between a file and a model, each with what the user can do.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum WeightsError {
    /// A file or folder could not be opened or read (missing, no permission, I/O failure).
    #[error("cannot read {file}: {reason}")]
    Io {
        /// The path or name of the file.
        file: String,
        /// The operating system's message.
        reason: String,
    },
    /// The file is shorter than its header (or a read) requires; fetch it again.
    #[error(
        "{file} is cut short: it needs at least {needed} bytes but has {actual}. The download or copy was probably interrupted; fetch the file again"
    )]
    Truncated {
        /// The path or name of the file.
        file: String,
        /// Bytes the file would need to hold.
        needed: u64,
        /// Bytes it actually holds.
        actual: u64,
    },
    /// The safetensors header is unreadable or inconsistent with the file (or names no such
    /// tensor).
    #[error(
        "{file} is not a valid safetensors file ({reason}). It may be damaged, or not a model file at all"
    )]
    CorruptHeader {
        /// The path or name of the file.
        file: String,
        /// What is wrong with the header.
        reason: String,
    },
    /// The file is a PyTorch pickle checkpoint, which is never opened; use its
    /// `.safetensors` version.
    #[error(
        "{file} is a PyTorch pickle checkpoint (.ckpt/.pt/.bin). Opening a pickle file can run any code hidden in it, so SeFi Studio never loads them. Use the model's .safetensors version (most models publish one), or convert the file once on a machine you trust, e.g. with diffusers' conversion scripts"
    )]
    Pickle {
        /// The path or name of the file.
        file: String,
    },
    /// A tensor is stored in a dtype other than F32, F16 or BF16.
    #[error(
        "tensor `{name}` in {file} is stored as {dtype}; only F32, F16 and BF16 weights are supported"
    )]
    UnsupportedDtype {
        /// The path or name of the file.
        file: String,
        /// The tensor's name in the file.
        name: String,
        /// The stored dtype, as safetensors names it.
        dtype: String,
    },
    /// The file or folder is not laid out like any Stable Diffusion checkpoint known here.
    #[error("{path} is not a Stable Diffusion model that SeFi Studio recognises: {reason}")]
    UnknownModel {
        /// The checkpoint's path.
        path: String,
        /// What was missing or out of place.
        reason: String,
    },
    /// A folder given as a CLIP model is not one (a `CLIPModel` with both towers).
    #[error(
        "{path} is not a CLIP model with both towers: {reason}. Give the folder of openai/clip-vit-large-patch14 as downloaded from the Hub"
    )]
    NotClip {
        /// The folder's path.
        path: String,
        /// What was missing or out of place.
        reason: String,
    },
    /// The checkpoint is a recognised model of a kind not supported yet (e.g. SDXL).
    #[error(
        "{path} is {what}, which SeFi Studio does not support yet. Supported: Stable Diffusion 1.x and 2.x"
    )]
    Unsupported {
        /// The checkpoint's path.
        path: String,
        /// The kind of model it is, as a phrase ("an SDXL model").
        what: String,
    },
    /// The checkpoint belongs to another family than the one required.
    #[error("{path} is a {found} model, but {expected} was expected{why}")]
    WrongFamily {
        /// The checkpoint's path.
        path: String,
        /// The family required.
        expected: Family,
        /// The family of the checkpoint.
        found: Family,
        /// Text appended to the message to say why `expected` was required (may be empty).
        why: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error(
        "the {component} weights in {path} lack the tensor `{name}`. The file is incomplete or was made for a different model layout"
    )]
    Missing {
        /// The checkpoint's path.
        path: String,
        /// The model that needs the tensor.
        component: Component,
        /// The tensor's diffusers name.
        name: String,
    },
    /// The checkpoint holds tensors the model does not use.
    #[error(
        "the {component} weights in {path} have {count} tensor(s) the model does not use, e.g. `{first}`. The file was made for a different model layout (or its config.json does not match it)"
    )]
    Unexpected {
        /// The checkpoint's path.
        path: String,
        /// The model whose weights hold the extra tensors.
        component: Component,
        /// How many tensors are left over.
        count: usize,
        /// The diffusers name of the first of them.
        first: String,
    },
    /// A tensor's shape differs from the one the model's config gives it.
    #[error(
        "tensor `{name}` of the {component} in {path} has shape {found:?}, but the model expects {expected:?}. The config.json does not match the weights, or the file belongs to another model"
    )]
    Shape {
        /// The checkpoint's path.
        path: String,
        /// The model the tensor belongs to.
        component: Component,
        /// The tensor's diffusers name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape in the checkpoint (after any transform).
        found: Vec<usize>,
    },
    /// A tensor is larger than the largest buffer this GPU binds, and the model cannot split it.
    #[error(
        "tensor `{name}` of the {component} has {bytes} bytes, more than the {limit} bytes this GPU lets a shader use. Try f16 weights, another GPU or another browser"
    )]
    TooLarge {
        /// The model the tensor belongs to.
        component: Component,
        /// The tensor's diffusers name.
        name: String,
        /// Its size on the device.
        bytes: u64,
        /// The device's binding limit.
        limit: u64,
    },
    /// A config file (`config.json`, `scheduler_config.json`) is invalid or describes a model
    /// that cannot be built.
    #[error("{file}: {reason}")]
    Config {
        /// The path of the config file.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<crate::config::ConfigError> for WeightsError {
    fn from(e: crate::config::ConfigError) -> Self {
        WeightsError::Config {
            file: e.file,
            reason: e.reason,
        }
    }
}
