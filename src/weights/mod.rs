//! Weights: streaming safetensors reading, dtype casts, the key maps of diffusers folders and
//! single-file checkpoints, and model detection. Nothing here needs a compute backend except
//! the hand-over to the device in `crate::nn`.

pub mod checkpoint;
mod error;
mod family;
pub mod file;
pub mod ldm;
pub mod legacy;
#[cfg(not(target_family = "wasm"))]
pub mod open;
pub mod source;

pub use checkpoint::{Checkpoint, DiffusersParts, Entry, Format, TokenizerSource};
pub use error::WeightsError;
pub use family::{Component, Family};
pub use file::{HostData, HostTensor, SafetensorsFile};
pub use source::{ByteSource, MemorySource};

#[cfg(not(target_family = "wasm"))]
pub use source::FileSource;

/// Where a model's tensors are read from: one model of a Stable Diffusion checkpoint, or a
/// CLIP folder. [`crate::nn::load`] streams any of them onto a device.
// The futures are awaited on the thread that made them (the page's worker, or `block_on`), so
// they need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait TensorSource {
    /// The path or name to give in messages.
    fn path(&self) -> &str;
    /// Checks the stored tensors of `component` against what its model expects: every expected
    /// tensor present with its shape, and nothing left over.
    fn check(
        &self,
        component: Component,
        expected: &std::collections::BTreeMap<String, Vec<usize>>,
    ) -> Result<(), WeightsError>;
    /// Names of the tensors of `component` in the order their bytes lie in the files.
    fn read_order(&self, component: Component) -> Vec<String>;
    /// Reads one tensor, under the name the model asks for.
    async fn read(&self, component: Component, name: &str) -> Result<HostTensor, WeightsError>;
}
