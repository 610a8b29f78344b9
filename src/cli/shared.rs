//! What the commands share: the model arguments, the argument parsers, opening a model, the
//! fit check and reading a photo.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::device::DeviceChoice;
use crate::identity::train::decode_photo;
use crate::pipeline::RgbImage;
use crate::weights::open::Variant;
use crate::weights::{Checkpoint, WeightsError};

/// The model to work with: `--model`, and `--config` and `--vae` beside it.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A diffusers model folder, or a single-file `.safetensors` checkpoint.
    #[arg(long = "model")]
    pub path: PathBuf,
    /// For single files with non-standard sizes: a diffusers folder describing the model.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Use the VAE of this folder instead of the model's (e.g. SDXL's fp16-fix VAE, which
    /// runs in f16): `config.json` and `diffusion_pytorch_model.safetensors`, or a model folder.
    #[arg(long)]
    pub vae: Option<PathBuf>,
}

impl ModelArgs {
    /// Opens the model, with the VAE of `--vae` when it names one.
    pub fn open(&self) -> Result<Checkpoint, WeightsError> {
        let ckpt = open_checkpoint(&self.path, self.config.as_deref(), Variant::Auto)?;
        match &self.vae {
            Some(dir) => crate::block_on(ckpt.with_vae_dir(dir)),
            None => Ok(ckpt),
        }
    }
}

/// Parses `--dtype auto|f32|f16|bf16`.
pub(crate) fn parse_precision(s: &str) -> Result<crate::device::Precision, String> {
    s.parse()
        .map_err(|e: crate::device::DeviceError| e.to_string())
}

/// Parses `--device auto|cpu|wgpu|cuda`.
pub(crate) fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
        .map_err(|e: crate::device::DeviceError| e.to_string())
}

/// Opens a model folder or file; `config` is a diffusers folder giving a single file's sizes.
pub(crate) fn open_checkpoint(
    model: &Path,
    config: Option<&Path>,
    variant: Variant,
) -> Result<Checkpoint, WeightsError> {
    let config = config
        .map(|d| crate::block_on(crate::weights::open::config_from_dir(d)))
        .transpose()?;
    crate::block_on(Checkpoint::open_path(model, variant, config))
}

/// The page's fit verdict, before anything loads: the largest weight tensor and the largest
/// buffer that cannot be split (the UNet's widest layer, one VAE decoder tile) against
/// what the device binds, and the memory the run needs against the GPU's where the API tells
/// it (`app::fit::check`). Says what to change when it does not fit.
pub(crate) fn check_fit(
    ckpt: &Checkpoint,
    dev: &crate::device::ComputeDevice,
    dtype: burn::tensor::DType,
    work: crate::app::memory::Work,
) -> Result<crate::app::memory::Need, String> {
    use crate::app::fit;
    let budget = fit::Budget {
        binding: crate::device::binding_limit(&dev.device),
        ..fit::Budget::of(&dev.info)
    };
    let mib = |b: u64| b.div_ceil(1 << 20);
    let config = &ckpt.config;
    if let Some(limit) = budget.binding {
        let largest = crate::sd::largest_whole_tensor(config, &dev.device)
            .map_err(|e| e.to_string())?
            * dtype.size() as u64;
        if largest > limit {
            return Err(format!(
                "the model's largest tensor has {} MiB, more than the {} MiB this GPU binds: use f16 weights (--dtype f16) or another GPU",
                mib(largest),
                mib(limit)
            ));
        }
    }
    let params = crate::weights::Component::ALL
        .iter()
        .map(|&c| ckpt.params(c))
        .sum();
    fit::check(config, params, dtype.size() as u64, work, budget)
}

/// Reads a photo as 8-bit RGB.
pub(crate) fn read_photo(path: &Path) -> Result<RgbImage, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the photo {}: {e}", path.display()))?;
    decode_photo(&bytes).map_err(|e| format!("cannot read the photo {}: {e}", path.display()))
}
