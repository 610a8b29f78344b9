//! Messages between the page and the worker, and how they cross `postMessage`. Byte payloads
//! (photos, identity files, PNGs) are `ByteBuf`s, which cross as `Uint8Array`s.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use wasm_bindgen::JsValue;

use super::fit::FitReport;
use super::view::ErrorKind;
use crate::check::CheckReport;
use crate::device::DeviceInfo;
use crate::identity::settings::{StepReport, TrainConfig};
use crate::pipeline::GenerateRequest;
use crate::weights::Family;

/// Page → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Open the WebGPU device, report it, and run the autodiff check on it.
    GpuCheck,
    /// Load the stored model `models/<id>` onto the GPU (replacing any other).
    LoadModel {
        id: String,
    },
    /// Train an identity on the loaded model (or continue from a checkpoint).
    Train(TrainJob),
    /// Stop training after the current step: `cancel` discards it, otherwise the answer
    /// carries a checkpoint to continue from.
    StopTraining {
        cancel: bool,
    },
    Generate(GenerateJob),
    CancelGenerate,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    pub config: TrainConfig,
    /// The photos, cropped to their squares, as PNG files.
    pub photos: Vec<ByteBuf>,
    /// A checkpoint to continue from.
    pub resume: Option<ByteBuf>,
    /// Send a checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// Send attention maps every this many steps.
    pub maps_every: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateJob {
    pub request: GenerateRequest,
    /// Identity files the prompt may refer to.
    pub identities: Vec<ByteBuf>,
    /// For the PNG's parameters.
    pub model_name: String,
}

/// Worker → page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    GpuCheck(Result<GpuReport, WorkerError>),
    /// Tensors moved to the GPU so far.
    ModelProgress {
        done: usize,
        total: usize,
    },
    ModelReady(ModelInfo),
    ModelFailed(WorkerError),
    TrainStep(StepReport),
    /// Heat-maps over the training square: the identity token's and the class word's
    /// attention, as PNGs with transparency.
    TrainMaps {
        step: usize,
        identity: ByteBuf,
        class: ByteBuf,
    },
    /// A checkpoint to store (an identity file with the optimizer's state).
    TrainCheckpoint {
        step: usize,
        bytes: ByteBuf,
    },
    /// Stopped on request; `checkpoint` continues it (absent when cancelled).
    TrainStopped {
        step: usize,
        checkpoint: Option<ByteBuf>,
    },
    /// Finished: the identity file.
    TrainDone {
        identity: ByteBuf,
    },
    TrainFailed(WorkerError),
    GenStep {
        step: usize,
        total: usize,
        /// A cheap look at the latents (PNG, 1/8 size).
        preview: Option<ByteBuf>,
    },
    GenDone {
        images: Vec<GenImage>,
        warnings: Vec<String>,
    },
    GenFailed(WorkerError),
    /// The worker hit an error it cannot recover from; the page starts a new one.
    Crashed(WorkerError),
}

/// The "Your GPU" panel's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    pub device: DeviceInfo,
    pub check: CheckReport,
}

/// A model on the GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub name: String,
    pub family: Family,
    /// Precision of the weights on the GPU.
    pub dtype: String,
    pub params: u64,
    /// Native resolution (training default).
    pub resolution: usize,
    pub fit: FitReport,
    pub millis: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenImage {
    /// PNG with the parameters embedded.
    pub png: ByteBuf,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub parameters: String,
}

/// A failure the page explains to the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WorkerError {
    /// The browser has no usable WebGPU adapter; the text is the technical reason (the page
    /// adds what to do).
    NoWebGpu(String),
    /// The GPU ran out of memory or refused a buffer this large.
    OutOfMemory(String),
    /// The GPU device stopped (driver reset, GPU removed, browser's own limit).
    DeviceLost(String),
    /// The model cannot be used (damaged, unsupported, wrong files).
    BadModel(String),
    /// An identity file cannot be used with this model.
    BadIdentity(String),
    /// A photo cannot be decoded.
    BadPhoto(String),
    /// No model is loaded yet.
    NoModel,
    /// Anything else, with the message to show.
    Other(String),
}

impl WorkerError {
    /// The `data-kind` the page shows it with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkerError::NoWebGpu(_) => ErrorKind::NoWebGpu,
            WorkerError::OutOfMemory(_) => ErrorKind::OutOfMemory,
            WorkerError::DeviceLost(_) => ErrorKind::DeviceLost,
            WorkerError::BadModel(_) => ErrorKind::BadModel,
            WorkerError::BadIdentity(_) => ErrorKind::BadIdentity,
            WorkerError::BadPhoto(_) => ErrorKind::BadPhoto,
            WorkerError::NoModel => ErrorKind::NoModel,
            WorkerError::Other(_) => ErrorKind::Other,
        }
    }

    /// Sorts a panic or GPU error message by its cause.
    pub fn from_crash(message: &str) -> Self {
        let m = message.to_ascii_lowercase();
        if m.contains("out of memory") || m.contains("outofmemory") || m.contains("allocation") {
            WorkerError::OutOfMemory(format!(
                "The GPU ran out of memory ({message}). Choose a smaller size or fewer images, close other tabs that use the GPU, then load the model again."
            ))
        } else if m.contains("lost") || m.contains("device is destroyed") {
            WorkerError::DeviceLost(format!(
                "The GPU stopped working for this page ({message}); this happens when the driver resets or the browser reclaims the GPU. Load the model again; your identities, checkpoints and images are safe in storage."
            ))
        } else if m.contains("max_buffer_size")
            || m.contains("buffer size")
            || m.contains("binding size")
        {
            WorkerError::OutOfMemory(format!(
                "The GPU refused a buffer this large ({message}). Choose a smaller size."
            ))
        } else {
            WorkerError::Other(format!(
                "The GPU worker stopped: {message}. Load the model again; your identities, checkpoints and images are safe in storage."
            ))
        }
    }
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerError::NoModel => f.write_str("load a model first"),
            WorkerError::NoWebGpu(m)
            | WorkerError::OutOfMemory(m)
            | WorkerError::DeviceLost(m)
            | WorkerError::BadModel(m)
            | WorkerError::BadIdentity(m)
            | WorkerError::BadPhoto(m)
            | WorkerError::Other(m) => f.write_str(m),
        }
    }
}

/// Messages cross as structured-clone JS values (serde-wasm-bindgen) rather than bincode
/// bytes: cheaper for large arrays and readable in the browser's devtools.
pub struct JsCodec;

impl gloo_worker::Codec for JsCodec {
    fn encode<I: Serialize>(input: I) -> JsValue {
        serde_wasm_bindgen::to_value(&input).expect("worker messages are plain data")
    }

    fn decode<O: for<'de> Deserialize<'de>>(input: JsValue) -> O {
        // Page and worker are built from one source in one build, so a message that does not
        // decode is a bug, not user input.
        serde_wasm_bindgen::from_value(input).expect("worker message of an unknown shape")
    }
}
