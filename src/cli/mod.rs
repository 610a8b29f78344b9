//! The `sefi` command line: thin wrappers that turn the core's results into terminal output.

mod bench;
mod device;
mod generate;
mod inspect;
mod score;
mod train;

use clap::{Parser, Subcommand};

use crate::device::DeviceChoice;

/// The command line: `sefi <command> [options]`.
#[derive(Debug, Parser)]
#[command(
    name = "sefi",
    version,
    about = "Private, on-device identity personalisation of Stable Diffusion"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Find the compute device, show what it is and prove it computes correctly.
    Device(device::DeviceArgs),
    /// Generate images from a text prompt.
    Generate(generate::GenerateArgs),
    /// Learn an identity from one or more photos.
    Train(train::TrainArgs),
    /// Score how much the faces in images look like identities or photos.
    Score(score::ScoreArgs),
    /// Tell what a model folder or checkpoint file is, without loading its weights.
    Inspect(inspect::InspectArgs),
    /// Measure the speed and memory of the main pieces of work (random weights).
    Bench(bench::BenchArgs),
}

/// Parses `--device auto|cpu|wgpu|cuda`.
pub(crate) fn parse_precision(s: &str) -> Result<crate::device::Precision, String> {
    s.parse()
        .map_err(|e: crate::device::DeviceError| e.to_string())
}

pub(crate) fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
        .map_err(|e: crate::device::DeviceError| e.to_string())
}

/// Opens a model folder or file; `config` is a diffusers folder giving a single file's sizes.
pub(crate) fn open_checkpoint(
    model: &std::path::Path,
    config: Option<&std::path::Path>,
    variant: crate::weights::open::Variant,
) -> Result<crate::weights::Checkpoint, crate::weights::WeightsError> {
    let config = config
        .map(|d| crate::block_on(crate::weights::open::config_from_dir(d)))
        .transpose()?;
    crate::block_on(crate::weights::Checkpoint::open_path(
        model, variant, config,
    ))
}

/// [`open_checkpoint`], with the VAE of another folder when `vae` names one.
pub(crate) fn open_with_vae(
    model: &std::path::Path,
    config: Option<&std::path::Path>,
    vae: Option<&std::path::Path>,
    variant: crate::weights::open::Variant,
) -> Result<crate::weights::Checkpoint, crate::weights::WeightsError> {
    let ckpt = open_checkpoint(model, config, variant)?;
    match vae {
        Some(dir) => crate::block_on(ckpt.with_vae_dir(dir)),
        None => Ok(ckpt),
    }
}

/// The page's fit verdict, before anything loads: the largest weight tensor and the largest
/// buffer that cannot be split (the UNet's widest layer, one VAE decoder tile) against
/// what the device binds, and the memory the run needs against the GPU's where the API tells
/// it (`app::fit::check`). Says what to change when it does not fit.
pub(crate) fn check_fit(
    ckpt: &crate::weights::Checkpoint,
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

/// Runs the CLI; the return value is the process exit code.
pub fn main() -> std::process::ExitCode {
    #[cfg(target_os = "linux")]
    let _runtime_dir = RuntimeDir::ensure();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Device(args) => device::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Score(args) => score::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set in the
/// environment" each time an adapter is probed in a process without one (servers, containers,
/// `sudo`), which reads as a failure. The process gets a private one, as a login session would
/// give it, removed again at exit.
#[cfg(target_os = "linux")]
struct RuntimeDir(Option<std::path::PathBuf>);

#[cfg(target_os = "linux")]
impl RuntimeDir {
    fn ensure() -> Self {
        use std::os::unix::fs::DirBuilderExt;
        let set =
            std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
        if set {
            return Self(None);
        }
        let dir = std::env::temp_dir().join(format!("sefi-runtime-{}", std::process::id()));
        if std::fs::DirBuilder::new().mode(0o700).create(&dir).is_err() {
            return Self(None);
        }
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        Self(Some(dir))
    }
}

#[cfg(target_os = "linux")]
impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
