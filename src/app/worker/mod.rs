//! The dedicated worker that owns the GPU: every model computation runs here, so the page
//! stays responsive. It keeps one model on the GPU, trains and generates with it, and streams
//! progress back as [`Response`]s.

use gloo_worker::{HandlerId, Registrable, Worker, WorkerScope};

use super::protocol::{BUILD, JsCodec, Request, Response, Versioned, WorkerError};

mod address;
pub use address::{GPU_MEMORY_PARAM, LOADER, MAX_BINDING_PARAM, loader_url};

#[cfg(feature = "compute")]
pub use compute::gpu_check;

/// The worker: one per page, holding the GPU device and the loaded model.
pub struct GpuWorker {
    #[cfg(feature = "compute")]
    state: std::rc::Rc<state::State>,
    #[cfg(feature = "compute")]
    reply: state::Reply,
}

impl Worker for GpuWorker {
    type Message = ();
    type Input = Versioned<Request>;
    type Output = Versioned<Response>;

    fn create(scope: &WorkerScope<Self>) -> Self {
        #[cfg(feature = "compute")]
        let reply: state::Reply = {
            let scope = scope.clone();
            std::rc::Rc::new(move |id, r| scope.respond(id, Versioned::Ours(r)))
        };
        #[cfg(feature = "compute")]
        compute::install_panic_hook(reply.clone());
        #[cfg(not(feature = "compute"))]
        let _ = scope;
        GpuWorker {
            #[cfg(feature = "compute")]
            state: Default::default(),
            #[cfg(feature = "compute")]
            reply,
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
        compute::received(&self.state, &self.reply, msg, id);
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
