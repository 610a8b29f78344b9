//! Opening a device: the part of [`super`] that needs burn.

use burn::tensor::{DType, Device};

use super::{Backend, DeviceChoice, DeviceError, DeviceInfo};
#[cfg(feature = "wgpu")]
use super::{GpuLimits, WEBGPU_HINT};

impl super::Precision {
    /// The dtype of a resolved precision (`Auto` unresolved means F32).
    pub fn dtype(self) -> DType {
        match self {
            super::Precision::Auto | super::Precision::F32 => DType::F32,
            super::Precision::F16 => DType::F16,
            super::Precision::Bf16 => DType::BF16,
        }
    }
}

/// The largest buffer one kernel may bind, per opened device, and a cap that lowers it on
/// every device. Models split what would be larger (token tables in row chunks, attention in
/// query chunks), so a device that grants only WebGPU's default 128 MiB still runs them.
mod bindings {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use burn::tensor::Device;

    static LIMITS: Mutex<Vec<(Device, u64)>> = Mutex::new(Vec::new());
    static CAP: AtomicU64 = AtomicU64::new(u64::MAX);

    pub(super) fn register(device: &Device, bytes: u64) {
        let mut limits = LIMITS.lock().unwrap_or_else(|e| e.into_inner());
        limits.retain(|(d, _)| d != device);
        limits.push((device.clone(), bytes));
    }

    /// The binding limit of `device` (autodiff or not), lowered to the cap; `None` where
    /// neither limits it (the CPU, CUDA).
    pub fn binding_limit(device: &Device) -> Option<u64> {
        let own = LIMITS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(d, _)| d == device)
            .map(|&(_, bytes)| bytes);
        let cap = CAP.load(Ordering::Relaxed);
        match own {
            Some(bytes) => Some(bytes.min(cap)),
            None => (cap != u64::MAX).then_some(cap),
        }
    }

    #[cfg(feature = "wgpu")]
    static WGPU: AtomicU64 = AtomicU64::new(u64::MAX);

    /// Makes the first wgpu open request a device that binds at most `bytes` per buffer
    /// (WebGPU's default is 128 MiB), whatever the adapter grants: the device a phone or an
    /// integrated GPU gives, on any GPU. Native wgpu enforces any such limit; browsers grant
    /// at least WebGPU's defaults, so there a lower one holds for our planning alone. No
    /// effect once wgpu is open.
    #[cfg(feature = "wgpu")]
    pub fn request_wgpu_binding_limit(bytes: u64) {
        WGPU.store(bytes.max(1), Ordering::Relaxed);
    }

    #[cfg(feature = "wgpu")]
    pub(super) fn requested_wgpu() -> Option<u64> {
        Some(WGPU.load(Ordering::Relaxed)).filter(|&b| b != u64::MAX)
    }

    /// Plans every later model load and attention for buffers of at most `bytes` on every
    /// device, as if each granted no more: to run, and test, what a small GPU runs.
    pub fn cap_bindings(bytes: u64) {
        CAP.store(bytes.max(1), Ordering::Relaxed);
    }
}
#[cfg(feature = "wgpu")]
pub use bindings::request_wgpu_binding_limit;
pub use bindings::{binding_limit, cap_bindings};

/// A ready device and what it is.
#[derive(Clone, Debug)]
pub struct ComputeDevice {
    /// The burn device that tensors are placed on.
    pub device: Device,
    /// What the device is, for reports and for choosing a precision.
    pub info: DeviceInfo,
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
    let requested = bindings::requested_wgpu();
    let (device, setup) = match requested {
        None => Device::wgpu_options()
            .init_with_setup_async()
            .await
            .map_err(|e| no_adapter(e.to_string()))?,
        Some(bytes) => {
            let setup = limited_setup(bytes).await.map_err(no_adapter)?;
            let device = Device::wgpu_options()
                .setup(setup.clone())
                .init()
                .map_err(|e| no_adapter(e.to_string()))?;
            (device, setup)
        }
    };
    #[cfg(target_family = "wasm")]
    lost::watch(&setup.device);
    let adapter = setup.adapter.get_info();
    let mut limits = setup.device.limits();
    // Browsers grant at least WebGPU's defaults whatever is asked: below 128 MiB only our
    // planning (chunks, fit verdicts) is held to the requested limit.
    if let Some(bytes) = requested {
        limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(bytes);
    }
    bindings::register(
        &device,
        limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size),
    );
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

/// The default adapter with a device whose shaders bind at most `bytes` of a buffer (and no
/// more than the adapter grants), as cubecl would request it otherwise.
#[cfg(feature = "wgpu")]
async fn limited_setup(bytes: u64) -> Result<burn::tensor::wgpu::WgpuSetup, String> {
    use burn::tensor::wgpu::wgpu;
    let instance = wgpu::Instance::default();
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    // Buffers themselves stay as large as granted (WebGPU's defaults too allow twice the
    // binding): cubecl's memory pages and staging buffers hold several tensors.
    let granted = adapter.limits();
    let required_limits = wgpu::Limits {
        max_storage_buffer_binding_size: bytes.min(granted.max_storage_buffer_binding_size),
        ..granted
    };
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: None,
            required_features: adapter
                .features()
                .difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            required_limits,
            memory_hints: wgpu::MemoryHints::MemoryUsage,
            trace: wgpu::Trace::Off,
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
        })
        .await
        .map_err(|e| e.to_string())?;
    let backend = adapter.get_info().backend;
    Ok(burn::tensor::wgpu::WgpuSetup {
        instance,
        adapter,
        device,
        queue,
        backend,
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

#[cfg(not(feature = "wgpu"))]
async fn open_wgpu() -> Result<ComputeDevice, DeviceError> {
    Err(DeviceError::NotCompiled {
        backend: Backend::Wgpu,
    })
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<ComputeDevice, DeviceError> {
    use cudarc::driver::result as cu;
    // cudarc loads libcuda lazily and panics (printing a panic message) when it is absent: ask
    // first, quietly.
    // SAFETY: only tries to open the driver's library, which runs no code of ours.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DeviceError::NoCuda {
            detail: "the NVIDIA driver's library (libcuda) is not installed".into(),
        });
    }
    // Any other failure to load it still becomes an error rather than a crash.
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

/// The browser's WebGPU device can be taken away at any time (a driver reset, the GPU
/// removed, the browser reclaiming it). burn marks the device poisoned and fails what follows;
/// this tells the worker at once, so that it can say why and a new one can start.
#[cfg(all(feature = "wgpu", target_family = "wasm"))]
pub mod lost {
    use std::cell::RefCell;

    use burn::tensor::wgpu::wgpu;

    thread_local! {
        static DEVICE: RefCell<Option<wgpu::Device>> = const { RefCell::new(None) };
        static LOST: RefCell<Option<String>> = const { RefCell::new(None) };
        static HANDLER: RefCell<Option<fn(&str)>> = const { RefCell::new(None) };
    }

    pub(super) fn watch(device: &wgpu::Device) {
        DEVICE.with(|d| *d.borrow_mut() = Some(device.clone()));
        // On WebGPU this adds a reaction to `GPUDevice.lost`; burn's own stays.
        device.set_device_lost_callback(|reason, message| {
            let why = format!("{reason:?}: {message}");
            LOST.with(|l| *l.borrow_mut() = Some(why.clone()));
            if let Some(handler) = HANDLER.with(|h| *h.borrow()) {
                handler(&why);
            }
        });
    }

    /// Calls `handler` with the browser's reason when the device is lost.
    pub fn on_lost(handler: fn(&str)) {
        HANDLER.with(|h| *h.borrow_mut() = Some(handler));
    }

    /// Why the device was lost, if it was.
    pub fn reason() -> Option<String> {
        LOST.with(|l| l.borrow().clone())
    }

    /// Destroys the device, as a driver reset would: the test hook for device loss.
    pub fn destroy() {
        if let Some(device) = DEVICE.with(|d| d.borrow().clone()) {
            device.destroy();
        }
    }
}
