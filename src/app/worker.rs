//! The dedicated worker that owns the GPU: every model computation runs here, so the page
//! stays responsive.

use gloo_worker::{HandlerId, Registrable, Worker, WorkerScope};

use super::protocol::{GpuReport, JsCodec, Request, Response, WorkerError};
use crate::check::autodiff_check;
use crate::device::{DeviceChoice, DeviceError};

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
pub async fn handle(request: Request) -> Response {
    match request {
        Request::GpuCheck => Response::GpuCheck(gpu_check().await),
    }
}

async fn gpu_check() -> Result<GpuReport, WorkerError> {
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
