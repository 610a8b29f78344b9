//! Picks the compute device at run time and reports what it found.
//!
//! One code path serves every backend: burn's runtime [`Device`]. Which backends exist is
//! decided by the crate's features (`cpu`, `wgpu`, `cuda`); which one runs is decided here.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{DType, Device};
use serde::{Deserialize, Serialize};

#[cfg(not(any(feature = "cpu", feature = "wgpu", feature = "cuda")))]
compile_error!("enable at least one backend feature: `cpu`, `wgpu` or `cuda`");

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
    Cpu,
    Wgpu,
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

/// Adapter limits that decide which models and resolutions fit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuLimits {
    /// Largest single buffer, bytes.
    pub max_buffer_size: u64,
    /// Largest storage buffer one shader can bind, bytes.
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_invocations_per_workgroup: u32,
    /// Shared (workgroup) memory per workgroup, bytes.
    pub max_compute_workgroup_storage_size: u32,
}

/// What was found: enough for a user to tell which GPU runs their work and whether it fits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub backend: Backend,
    /// The adapter as it names itself ("NVIDIA GeForce RTX 4090", "llvmpipe ...", "CPU").
    pub adapter: String,
    /// Graphics or compute API underneath ("Vulkan", "BrowserWebGpu", "CUDA", "host").
    pub api: String,
    /// "DiscreteGpu", "IntegratedGpu", "Cpu", ... as the driver reports it.
    pub device_type: String,
    pub driver: String,
    /// A software adapter (lavapipe, SwiftShader): correct but slow.
    pub software: bool,
    /// Total device memory in bytes where the API tells it (CUDA); WebGPU does not.
    pub memory_bytes: Option<u64>,
    pub limits: Option<GpuLimits>,
    /// Half-precision floats are supported for computation.
    pub f16: bool,
    pub bf16: bool,
}

/// A ready device and what it is.
#[derive(Clone, Debug)]
pub struct ComputeDevice {
    pub device: Device,
    pub info: DeviceInfo,
}

/// Why a device could not be opened, phrased so the user knows what to do next.
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum DeviceError {
    #[error("unknown device `{0}`: use auto, cpu, wgpu or cuda")]
    UnknownChoice(String),
    #[error(
        "this build has no {backend} backend; rebuild with `cargo build --release --features {backend}` or pick another --device"
    )]
    NotCompiled { backend: Backend },
    #[error("this browser offers no WebGPU adapter. {hint} (browser said: {detail})")]
    NoWebGpu { detail: String, hint: String },
    #[error("no GPU adapter was found ({detail}). {hint}")]
    NoWgpuAdapter { detail: String, hint: String },
    #[error(
        "no usable CUDA device ({detail}). Install the NVIDIA driver (it provides libcuda), or use --device wgpu or --device cpu"
    )]
    NoCuda { detail: String },
}

impl DeviceChoice {
    /// Opens the chosen device. WebGPU adapters are requested once per process and reused.
    pub async fn open(self) -> Result<ComputeDevice, DeviceError> {
        match self {
            DeviceChoice::Cpu => open_cpu(),
            DeviceChoice::Wgpu => open_wgpu().await,
            DeviceChoice::Cuda => open_cuda(),
            DeviceChoice::Auto => open_auto().await,
        }
    }
}

async fn open_auto() -> Result<ComputeDevice, DeviceError> {
    if Backend::Cuda.is_compiled()
        && let Ok(cuda) = open_cuda()
    {
        return Ok(cuda);
    }
    if Backend::Wgpu.is_compiled() {
        match open_wgpu().await {
            // A software Vulkan/WebGPU adapter is slower than the native CPU backend, so only
            // a hardware adapter wins over `cpu`; in the browser wgpu is the only choice.
            Ok(dev) if !dev.info.software || cfg!(target_family = "wasm") => return Ok(dev),
            Ok(dev) if !Backend::Cpu.is_compiled() => return Ok(dev),
            Err(e) if !Backend::Cpu.is_compiled() => return Err(e),
            _ => {}
        }
    }
    open_cpu()
}

fn dtype_support(device: &Device) -> (bool, bool) {
    (
        device.supports_dtype(DType::F16),
        device.supports_dtype(DType::BF16),
    )
}

#[cfg(feature = "cpu")]
fn open_cpu() -> Result<ComputeDevice, DeviceError> {
    let device = Device::flex();
    let (f16, bf16) = dtype_support(&device);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(ComputeDevice {
        info: DeviceInfo {
            backend: Backend::Cpu,
            adapter: format!("CPU ({threads} threads)"),
            api: "host".into(),
            device_type: "Cpu".into(),
            driver: "burn flex".into(),
            software: true,
            memory_bytes: None,
            limits: None,
            f16,
            bf16,
        },
        device,
    })
}

#[cfg(not(feature = "cpu"))]
fn open_cpu() -> Result<ComputeDevice, DeviceError> {
    Err(DeviceError::NotCompiled {
        backend: Backend::Cpu,
    })
}

#[cfg(feature = "wgpu")]
async fn open_wgpu() -> Result<ComputeDevice, DeviceError> {
    // burn refuses to initialise the same wgpu runtime twice, so the first answer is kept
    // (errors too: a machine without an adapter will not grow one during the process).
    static WGPU: futures::lock::Mutex<Option<Result<ComputeDevice, DeviceError>>> =
        futures::lock::Mutex::new(None);
    let mut slot = WGPU.lock().await;
    if slot.is_none() {
        *slot = Some(init_wgpu().await);
    }
    slot.clone().expect("filled above")
}

#[cfg(feature = "wgpu")]
async fn init_wgpu() -> Result<ComputeDevice, DeviceError> {
    let (device, setup) = Device::wgpu_options()
        .init_with_setup_async()
        .await
        .map_err(|e| no_adapter(e.to_string()))?;
    let adapter = setup.adapter.get_info();
    let limits = setup.device.limits();
    let (f16, bf16) = dtype_support(&device);
    let device_type = format!("{:?}", adapter.device_type);
    let software = adapter.device_type == burn::tensor::wgpu::wgpu::DeviceType::Cpu
        || adapter.name.to_ascii_lowercase().contains("swiftshader");
    Ok(ComputeDevice {
        info: DeviceInfo {
            backend: Backend::Wgpu,
            adapter: if adapter.name.is_empty() {
                "WebGPU adapter (name hidden by the browser)".into()
            } else {
                adapter.name
            },
            api: format!("{:?}", adapter.backend),
            device_type,
            driver: [adapter.driver, adapter.driver_info]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            software,
            memory_bytes: None,
            limits: Some(GpuLimits {
                max_buffer_size: limits.max_buffer_size,
                max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
                max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
                max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            }),
            f16,
            bf16,
        },
        device,
    })
}

#[cfg(feature = "wgpu")]
fn no_adapter(detail: String) -> DeviceError {
    if cfg!(target_family = "wasm") {
        DeviceError::NoWebGpu {
            detail,
            hint: WEBGPU_HINT.into(),
        }
    } else {
        DeviceError::NoWgpuAdapter {
            detail,
            hint: "Install your GPU's Vulkan driver (on Debian/Ubuntu without a GPU: \
                   `apt-get install mesa-vulkan-drivers libvulkan1`), or use --device cpu"
                .into(),
        }
    }
}

/// What a browser user can do when WebGPU is missing.
pub const WEBGPU_HINT: &str = "Use a browser with WebGPU: Chrome or Edge 113 or newer on \
    Windows, macOS or ChromeOS (on Linux start Chrome with --enable-unsafe-webgpu \
    --enable-features=Vulkan), Safari 26 or newer, or Firefox 141 or newer on Windows. Check \
    that hardware acceleration is on in the browser's settings";

#[cfg(not(feature = "wgpu"))]
async fn open_wgpu() -> Result<ComputeDevice, DeviceError> {
    Err(DeviceError::NotCompiled {
        backend: Backend::Wgpu,
    })
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<ComputeDevice, DeviceError> {
    use cudarc::driver::result as cu;
    // cudarc loads libcuda lazily and panics when it is absent; turn that into an error.
    let probe = std::panic::catch_unwind(|| -> Result<(String, u64), cu::DriverError> {
        cu::init()?;
        if cu::device::get_count()? < 1 {
            return Ok((String::new(), 0));
        }
        let dev = cu::device::get(0)?;
        // SAFETY: `dev` is a valid device handle returned by the driver just above.
        let mem = unsafe { cu::device::total_mem(dev)? };
        Ok((cu::device::get_name(dev)?, mem as u64))
    });
    let (name, memory) = match probe {
        Ok(Ok((name, _))) if name.is_empty() => {
            return Err(DeviceError::NoCuda {
                detail: "the driver reports no CUDA device".into(),
            });
        }
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            return Err(DeviceError::NoCuda {
                detail: e.to_string(),
            });
        }
        Err(_) => {
            return Err(DeviceError::NoCuda {
                detail: "libcuda could not be loaded".into(),
            });
        }
    };
    let device = Device::cuda(0);
    let (f16, bf16) = dtype_support(&device);
    Ok(ComputeDevice {
        info: DeviceInfo {
            backend: Backend::Cuda,
            adapter: name,
            api: "CUDA".into(),
            device_type: "DiscreteGpu".into(),
            driver: String::new(),
            software: false,
            memory_bytes: Some(memory),
            limits: None,
            f16,
            bf16,
        },
        device,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<ComputeDevice, DeviceError> {
    Err(DeviceError::NotCompiled {
        backend: Backend::Cuda,
    })
}

#[cfg(all(test, not(target_family = "wasm")))]
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
