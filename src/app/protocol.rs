//! Messages between the page and the worker, and how they cross `postMessage`.

use serde::{Deserialize, Serialize};
use wasm_bindgen::JsValue;

use crate::check::CheckReport;
use crate::device::DeviceInfo;

/// Page → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Open the WebGPU device, report it, and run the autodiff check on it.
    GpuCheck,
}

impl Request {
    /// The answer to this request when it cannot be carried out.
    pub fn refuse(&self, error: WorkerError) -> Response {
        match self {
            Request::GpuCheck => Response::GpuCheck(Err(error)),
        }
    }
}

/// Worker → page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    GpuCheck(Result<GpuReport, WorkerError>),
}

/// The "Your GPU" panel's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    pub device: DeviceInfo,
    pub check: CheckReport,
}

/// A failure the page explains to the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WorkerError {
    /// The browser has no usable WebGPU adapter; the text is the technical reason (the page
    /// adds what to do).
    NoWebGpu(String),
    /// Anything else, with the message to show.
    Other(String),
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerError::NoWebGpu(m) | WorkerError::Other(m) => f.write_str(m),
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
