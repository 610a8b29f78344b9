//! The dedicated worker that owns the GPU: every model computation runs here, so the page
//! stays responsive. It keeps one model on the GPU, trains and generates with it, and streams
//! progress back as [`Response`]s.

use gloo_worker::{HandlerId, Registrable, Worker, WorkerScope};

use super::protocol::{BUILD, JsCodec, Request, Response, Versioned, WorkerError};

/// The worker's loader script as trunk emits it (`data-bin="sefi-worker"` with
/// `data-loader-shim`); a same-origin script, so the CSP needs no `blob:` workers.
pub const LOADER: &str = "./sefi-worker_loader.js";

/// Test hook: `?max-binding-mib=N` in the page's address is passed on to the worker, which
/// then asks WebGPU for a device that binds at most N MiB of a buffer (WebGPU's default is
/// 128): a phone's or an integrated GPU's limits, on any GPU.
pub const MAX_BINDING_PARAM: &str = "max-binding-mib";

/// `?gpu-memory-mib=N` in the page's address tells the worker the GPU's memory, which
/// browsers do not: models, generations and training runs that the memory model says need
/// more are refused before they start, with what to change.
pub const GPU_MEMORY_PARAM: &str = "gpu-memory-mib";

/// The loader's address, with the page's `max-binding-mib` and `gpu-memory-mib` when it has
/// them.
pub fn loader_url(page_query: &str) -> String {
    let page = web_sys::UrlSearchParams::new_with_str(page_query).ok();
    let passed: Vec<String> = [MAX_BINDING_PARAM, GPU_MEMORY_PARAM]
        .into_iter()
        .filter_map(|name| {
            let mib = page.as_ref()?.get(name)?.parse::<u64>().ok()?;
            Some(format!("{name}={mib}"))
        })
        .collect();
    if passed.is_empty() {
        LOADER.to_string()
    } else {
        format!("{LOADER}?{}", passed.join("&"))
    }
}

#[cfg(feature = "compute")]
pub use compute::gpu_check;

/// The worker: one per page, holding the GPU device and the loaded model.
pub struct GpuWorker {
    #[cfg(feature = "compute")]
    state: std::rc::Rc<state::State>,
}

impl Worker for GpuWorker {
    type Message = ();
    type Input = Versioned<Request>;
    type Output = Versioned<Response>;

    fn create(scope: &WorkerScope<Self>) -> Self {
        #[cfg(feature = "compute")]
        compute::install_panic_hook(scope.clone());
        #[cfg(not(feature = "compute"))]
        let _ = scope;
        GpuWorker {
            #[cfg(feature = "compute")]
            state: Default::default(),
        }
    }

    fn update(&mut self, _scope: &WorkerScope<Self>, _msg: ()) {}

    fn received(&mut self, scope: &WorkerScope<Self>, msg: Versioned<Request>, id: HandlerId) {
        let msg = match msg {
            Versioned::Ours(msg) => msg,
            // A page of another build: whatever it asked, the answer is ours, which tells it.
            Versioned::Foreign { build } => {
                let why = WorkerError::Outdated(format!(
                    "this worker is build {BUILD}; the page is build {build}"
                ));
                return scope.respond(id, Versioned::Ours(Response::Crashed(why)));
            }
        };
        #[cfg(feature = "compute")]
        compute::received(&self.state, scope, msg, id);
        #[cfg(not(feature = "compute"))]
        scope.respond(
            id,
            Versioned::Ours(Response::Crashed(WorkerError::Other(format!(
                "this build has no compute backend (asked for {msg:?}); the worker binary is built with `wgpu`"
            )))),
        );
    }
}

/// Starts the worker's message loop; called by the worker binary.
pub fn register() {
    GpuWorker::registrar().encoding::<JsCodec>().register();
}

#[cfg(feature = "compute")]
mod clip;
#[cfg(feature = "compute")]
mod compute;
#[cfg(feature = "compute")]
mod faces;
#[cfg(feature = "compute")]
mod load;
#[cfg(feature = "compute")]
mod state;
