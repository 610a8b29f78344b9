//! What the worker holds between messages: the GPU device, the model on it, the face and CLIP
//! models, and the flags that stop a job. Every job reads it through here.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use burn::tensor::Device;

use gloo_worker::HandlerId;

use crate::app::protocol::{ModelInfo, Response, WorkerError};
use crate::device::{ComputeDevice, DeviceChoice, DeviceError};
use crate::identity::Fingerprint;
use crate::schedule::SchedulerConfig;
use crate::sd::StableDiffusion;

/// A model on the GPU.
pub(super) struct Loaded {
    pub(super) sd: StableDiffusion,
    pub(super) scheduler: SchedulerConfig,
    pub(super) fingerprint: Fingerprint,
    /// The autodiff device the model lives on (training needs gradients).
    pub(super) device: Device,
    pub(super) info: ModelInfo,
}

/// The worker's state.
#[derive(Default)]
pub struct State {
    pub(super) device: RefCell<Option<ComputeDevice>>,
    pub(super) model: RefCell<Option<Rc<Loaded>>>,
    /// Set by `StopTraining`: `Some(cancel)`.
    pub(super) stop_training: Cell<Option<bool>>,
    pub(super) cancel_generate: Cell<bool>,
    /// The face models, once loaded.
    pub(super) faces: RefCell<Option<Rc<crate::face::score::FaceModels>>>,
    /// The CLIP model the page added, which scores prompt fidelity.
    pub(super) clip: RefCell<Option<Rc<crate::clip::PromptFidelity>>>,
}

pub(super) fn device_error(e: DeviceError) -> WorkerError {
    match e {
        DeviceError::NoWebGpu { detail, .. } | DeviceError::NoWgpuAdapter { detail, .. } => {
            WorkerError::NoWebGpu(detail)
        }
        other => WorkerError::Other(other.to_string()),
    }
}

/// The WebGPU device, opened at the first use.
pub(super) async fn device(state: &State) -> Result<ComputeDevice, WorkerError> {
    if let Some(d) = state.device.borrow().as_ref() {
        return Ok(d.clone());
    }
    let d = open_wgpu().await?;
    *state.device.borrow_mut() = Some(d.clone());
    Ok(d)
}

/// WebGPU's device (opened once per worker), with the binding limit the page asked for and
/// the memory it told.
pub(super) async fn open_wgpu() -> Result<ComputeDevice, WorkerError> {
    if let Some(mib) = worker_param(super::address::MAX_BINDING_PARAM) {
        crate::device::request_wgpu_binding_limit(mib << 20);
    }
    let mut dev = DeviceChoice::Wgpu.open().await.map_err(device_error)?;
    if let Some(mib) = worker_param(super::address::GPU_MEMORY_PARAM) {
        dev.info.memory_bytes.get_or_insert(mib << 20);
    }
    Ok(dev)
}

/// How the worker answers a request of the page: the worker's scope, without its type.
pub type Reply = Rc<dyn Fn(HandlerId, Response)>;

/// A number the page passed in the worker's own address (see [`super::address::loader_url`]).
fn worker_param(name: &str) -> Option<u64> {
    let location = js_sys::Reflect::get(&js_sys::global(), &"location".into()).ok()?;
    let search = js_sys::Reflect::get(&location, &"search".into())
        .ok()?
        .as_string()?;
    web_sys::UrlSearchParams::new_with_str(&search)
        .ok()?
        .get(name)?
        .parse()
        .ok()
}

/// GPU memory the CLIP model holds beside the model (0 without one).
pub(super) fn clip_bytes(state: &State) -> u64 {
    state.clip.borrow().as_ref().map_or(0, |c| c.weight_bytes())
}

pub(super) fn model(state: &State) -> Result<Rc<Loaded>, WorkerError> {
    state.model.borrow().clone().ok_or(WorkerError::NoModel)
}
