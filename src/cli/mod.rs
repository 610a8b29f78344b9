//! The `sefi` command line: thin wrappers that turn the core's results into terminal output.

mod bench;
mod device;
mod generate;
mod inspect;
mod score;
mod shared;
mod train;

use clap::{Parser, Subcommand};

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
