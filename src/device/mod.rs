//! Picks the compute device at run time and reports what it found.
//!
//! One code path serves every backend: burn's runtime `Device`. Which backends exist is
//! decided by the crate's features (`cpu`, `wgpu`, `cuda`); which one runs is decided here.
//! The types below carry no burn dependency, so the page (which never computes) can show
//! them without linking a backend.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[cfg(feature = "compute")]
mod open;
#[cfg(all(feature = "wgpu", target_family = "wasm"))]
pub use open::lost;
#[cfg(feature = "wgpu")]
pub use open::request_wgpu_binding_limit;
#[cfg(feature = "compute")]
pub use open::{ComputeDevice, binding_limit, cap_bindings};

/// A compute backend this crate knows how to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's pure-Rust CPU backend (flex).
    Cpu,
    /// WebGPU in the browser; Vulkan, Metal or DX12 natively.
    Wgpu,
    /// NVIDIA CUDA.
    Cuda,
}

impl Backend {
    /// Whether this build carries the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Cpu => cfg!(feature = "cpu"),
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Cuda => cfg!(feature = "cuda"),
        }
    }

    fn feature(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.feature())
    }
}

/// What the user asked for: a backend, or the best one available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA if present, else a hardware wgpu adapter, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// The wgpu backend (WebGPU, Vulkan, Metal or DX12).
    Wgpu,
    /// The CUDA backend (the first NVIDIA GPU).
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "wgpu" | "webgpu" | "vulkan" | "metal" | "dx12" => Ok(DeviceChoice::Wgpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            _ => Err(DeviceError::UnknownChoice(s.to_string())),
        }
    }
}

/// The dtype frozen model weights are kept in. Learned vectors, losses and optimiser state are
/// always F32; activations follow the weights, with norms and timestep features in F32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// F16 on a hardware GPU that supports it (half the memory and traffic), F32 elsewhere:
    /// CPUs and software adapters compute half floats no faster.
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16 (F32's range with half the bits).
    Bf16,
}

impl FromStr for Precision {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Precision::Auto),
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(DeviceError::UnknownPrecision(s.to_string())),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        })
    }
}

impl DeviceInfo {
    /// `precision` made concrete for this device, or why the device cannot do it.
    pub fn resolve(&self, precision: Precision) -> Result<Precision, DeviceError> {
        let unsupported = || DeviceError::UnsupportedPrecision {
            precision,
            adapter: self.adapter.clone(),
        };
        match precision {
            Precision::Auto if self.f16 && !self.software && self.backend != Backend::Cpu => {
                Ok(Precision::F16)
            }
            Precision::Auto | Precision::F32 => Ok(Precision::F32),
            Precision::F16 if self.f16 => Ok(Precision::F16),
            Precision::Bf16 if self.bf16 => Ok(Precision::Bf16),
            Precision::F16 | Precision::Bf16 => Err(unsupported()),
        }
    }
}

/// Adapter limits that decide which models and resolutions fit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuLimits {
    /// Largest single buffer, bytes.
    pub max_buffer_size: u64,
    /// Largest storage buffer one shader can bind, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Most shader invocations in one workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Shared (workgroup) memory per workgroup, bytes.
    pub max_compute_workgroup_storage_size: u32,
}

/// What was found: enough for a user to tell which GPU runs their work and whether it fits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The backend that drives the device.
    pub backend: Backend,
    /// The adapter as it names itself ("NVIDIA GeForce RTX 4090", "llvmpipe ...", "CPU").
    pub adapter: String,
    /// Graphics or compute API underneath ("Vulkan", "BrowserWebGpu", "CUDA", "host").
    pub api: String,
    /// "DiscreteGpu", "IntegratedGpu", "Cpu", ... as the driver reports it.
    pub device_type: String,
    /// Driver name and version where the API reports them; empty otherwise.
    pub driver: String,
    /// A software adapter (lavapipe, SwiftShader): correct but slow.
    pub software: bool,
    /// Total device memory in bytes where the API tells it (CUDA); WebGPU does not.
    pub memory_bytes: Option<u64>,
    /// Adapter limits (wgpu only).
    pub limits: Option<GpuLimits>,
    /// Half-precision floats are supported for computation.
    pub f16: bool,
    /// bfloat16 is supported for computation.
    pub bf16: bool,
}

/// Why a device could not be opened, phrased so the user knows what to do next.
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum DeviceError {
    /// The device name given (e.g. to `--device`) is none of those known.
    #[error("unknown device `{0}`: use auto, cpu, wgpu or cuda")]
    UnknownChoice(String),
    /// The precision name given is none of those known.
    #[error("unknown precision `{0}`: use auto, f32, f16 or bf16")]
    UnknownPrecision(String),
    /// F16 or BF16 was asked for on a device that cannot compute in it.
    #[error("{adapter} cannot compute in {precision}; choose f32 or auto")]
    UnsupportedPrecision {
        /// The precision asked for.
        precision: Precision,
        /// The adapter's name.
        adapter: String,
    },
    /// The backend asked for was left out of this build by its features.
    #[error(
        "this build has no {backend} backend; rebuild with `cargo build --release --features {backend}` or pick another --device"
    )]
    NotCompiled {
        /// The backend asked for.
        backend: Backend,
    },
    /// In the browser: WebGPU is missing or gave no adapter.
    #[error("this browser offers no WebGPU adapter. {hint} (browser said: {detail})")]
    NoWebGpu {
        /// The error the browser reported.
        detail: String,
        /// What the user can do (see [`WEBGPU_HINT`]).
        hint: String,
    },
    /// Natively: wgpu found no GPU adapter (no Vulkan, Metal or DX12 driver).
    #[error("no GPU adapter was found ({detail}). {hint}")]
    NoWgpuAdapter {
        /// The error wgpu reported.
        detail: String,
        /// What the user can do (install a Vulkan driver, or use the CPU).
        hint: String,
    },
    /// The CUDA driver is absent, fails to load, or reports no device.
    #[error(
        "no usable CUDA device ({detail}). Install the NVIDIA driver (it provides libcuda), or use --device wgpu or --device cpu"
    )]
    NoCuda {
        /// What the driver said, or what is missing.
        detail: String,
    },
}

/// What a browser user can do when WebGPU is missing.
pub const WEBGPU_HINT: &str = "Use a browser with WebGPU: Chrome or Edge 113 or newer on \
    Windows, macOS or ChromeOS (on Linux start Chrome with --enable-unsafe-webgpu \
    --enable-features=Vulkan), Safari 26 or newer, or Firefox 141 or newer on Windows. Check \
    that hardware acceleration is on in the browser's settings";

#[cfg(all(test, feature = "compute", not(target_family = "wasm")))]
mod tests {
    use super::*;

    #[test]
    fn parses_choices() {
        assert_eq!("AUTO".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        assert_eq!("webgpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Wgpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.to_string().contains("auto, cpu, wgpu or cuda"), "{err}");
    }

    #[test]
    fn missing_backend_is_an_error_not_a_panic() {
        for backend in [Backend::Cpu, Backend::Wgpu, Backend::Cuda] {
            if backend.is_compiled() {
                continue;
            }
            let choice = match backend {
                Backend::Cpu => DeviceChoice::Cpu,
                Backend::Wgpu => DeviceChoice::Wgpu,
                Backend::Cuda => DeviceChoice::Cuda,
            };
            let err = crate::block_on(choice.open()).unwrap_err();
            assert_eq!(err, DeviceError::NotCompiled { backend });
            assert!(err.to_string().contains("--features"), "{err}");
        }
    }
}
