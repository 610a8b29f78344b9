//! The dedicated worker that owns the GPU: every model computation runs here, so the page
//! stays responsive.

use gloo_worker::{HandlerId, Registrable, Worker, WorkerScope};

#[cfg(feature = "compute")]
use super::protocol::{GpuReport, WorkerError};
use super::protocol::{JsCodec, Request, Response};

/// The worker's loader script as trunk emits it (`data-bin="sefi-worker"` with
/// `data-loader-shim`); a same-origin script, so the CSP needs no `blob:` workers.
pub const LOADER: &str = "./sefi-worker_loader.js";

pub struct GpuWorker;

impl Worker for GpuWorker {
    type Message = ();
    type Input = Request;
    type Output = Response;

    fn create(_scope: &WorkerScope<Self>) -> Self {
        console_error_panic_hook::set_once();
        GpuWorker
    }

    fn update(&mut self, _scope: &WorkerScope<Self>, _msg: ()) {}

    fn received(&mut self, scope: &WorkerScope<Self>, msg: Request, id: HandlerId) {
        let scope = scope.clone();
        wasm_bindgen_futures::spawn_local(async move {
            let response = handle(msg).await;
            scope.respond(id, response);
        });
    }
}

/// Starts the worker's message loop; called by the worker binary.
pub fn register() {
    GpuWorker::registrar().encoding::<JsCodec>().register();
}

/// Answers one request. Public so that in-browser tests can drive it without a page.
#[cfg(feature = "compute")]
pub async fn handle(request: Request) -> Response {
    match request {
        Request::GpuCheck => Response::GpuCheck(gpu_check().await),
    }
}

/// The page is built without a compute backend (it only needs this type to talk to the worker
/// binary, which has one), so this build cannot answer.
#[cfg(not(feature = "compute"))]
pub async fn handle(request: Request) -> Response {
    request.refuse(super::protocol::WorkerError::Other(
        "this build has no compute backend; the worker binary is built with `wgpu`".into(),
    ))
}

#[cfg(feature = "compute")]
async fn gpu_check() -> Result<GpuReport, WorkerError> {
    use crate::check::autodiff_check;
    use crate::device::{DeviceChoice, DeviceError};

    let dev = DeviceChoice::Wgpu.open().await.map_err(|e| match e {
        DeviceError::NoWebGpu { detail, .. } | DeviceError::NoWgpuAdapter { detail, .. } => {
            WorkerError::NoWebGpu(detail)
        }
        other => WorkerError::Other(other.to_string()),
    })?;
    let check = autodiff_check(&dev.device)
        .await
        .map_err(|e| WorkerError::Other(e.to_string()))?;
    Ok(GpuReport {
        device: dev.info,
        check,
    })
}
