//! leptos components of the page. They show state, keep the user's things in storage and send
//! requests; the worker computes. One [`Ctx`] of signals is shared by the panels.

mod clip;
mod generate;
mod gpu;
mod identity;
mod model;
mod widgets;

use std::cell::Cell;
use std::rc::Rc;

use gloo_worker::{Spawnable, WorkerBridge};
use leptos::prelude::*;

use super::catalog::Manifest;
use super::protocol::{JsCodec, ModelInfo, Request, Response, Versioned, WorkerError, outdated};
use super::view::{Report, Watchdog};
use super::worker::{self, GpuWorker};
use crate::store::lock::{self, Held};
use crate::store::{Store, StoreError};

pub use clip::ClipState;
pub use generate::{GalleryItem, GenView};
pub use gpu::GpuState;
pub use identity::{IdentityEntry, PhotoEntry, TrainView};
pub use widgets::{ErrorKind, UiError};

/// Mounts the app on `<body>`; called by the page binary.
pub fn mount() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

/// Where the model panel stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelState {
    Empty,
    /// Bringing files into storage.
    Acquiring {
        phase: &'static str,
        name: String,
        file: String,
        bytes: u64,
        file_bytes: u64,
        file_total: Option<u64>,
        /// Bytes per second.
        speed: f64,
        /// Set to stop it (what is stored so far is kept).
        cancel: Rc<Cell<bool>>,
    },
    /// Moving tensors to the GPU (`sent`), or waiting for the GPU check to finish.
    Loading {
        name: String,
        done: usize,
        total: usize,
        sent: bool,
    },
    Ready(Box<ModelInfo>),
    Failed(UiError),
}

/// The page's shared state.
#[derive(Clone, Copy)]
pub struct Ctx {
    pub gpu: RwSignal<GpuState>,
    pub model: RwSignal<ModelState, LocalStorage>,
    /// The model the worker is loading or holds.
    pub model_id: RwSignal<Option<String>>,
    /// Why the last download or copy failed (the loaded model, if any, stays usable).
    pub model_error: RwSignal<Option<UiError>>,
    pub cached: RwSignal<Vec<Manifest>>,
    /// The CLIP model that scores prompt fidelity.
    pub clip: RwSignal<ClipState, LocalStorage>,
    pub quota: RwSignal<Option<(f64, f64)>>,
    pub train: RwSignal<TrainView>,
    pub identities: RwSignal<Vec<IdentityEntry>>,
    /// The photos to learn from, with their squares and faces.
    pub photos: RwSignal<Vec<PhotoEntry>>,
    pub generation: RwSignal<GenView>,
    pub gallery: RwSignal<Vec<GalleryItem>>,
    pub prompt: RwSignal<String>,
    pub negative: RwSignal<String>,
    pub seed: RwSignal<u64>,
    worker: StoredValue<Option<WorkerBridge<GpuWorker>>, LocalStorage>,
    /// Counts the workers started: what a replaced worker still sends is dropped.
    worker_serial: StoredValue<u64>,
    watchdog: StoredValue<Watchdog>,
    /// This tab's hold on the training run (`runs/current`), from its start until it ends.
    run_lock: StoredValue<Option<Held>, LocalStorage>,
}

fn now() -> f64 {
    js_sys::Date::now()
}

/// How often the page looks whether the worker still makes progress.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Ctx {
    pub fn send(&self, request: Request) {
        if matches!(
            request,
            Request::LoadModel { .. } | Request::Train(_) | Request::Generate(_)
        ) {
            self.watchdog.update_value(|w| w.begin(now()));
        }
        self.worker.with_value(|w| {
            if let Some(w) = w {
                w.send(Versioned::Ours(request));
            }
        });
    }

    /// Starts (or restarts, after a crash) the GPU worker and runs the GPU check.
    fn start_worker(self) {
        self.worker_serial.update_value(|n| *n += 1);
        let serial = self.worker_serial.get_value();
        let bridge = GpuWorker::spawner()
            .encoding::<JsCodec>()
            .callback(move |response| {
                if self.worker_serial.get_value() == serial {
                    self.on_response(response);
                }
            })
            .spawn_with_loader(&worker::loader_url(
                &web_sys::window()
                    .and_then(|w| w.location().search().ok())
                    .unwrap_or_default(),
            ));
        bridge.send(Versioned::Ours(Request::GpuCheck));
        // Dropping the old bridge terminates a crashed worker.
        self.worker.set_value(Some(bridge));
        // A worker that fails to start (blocked script, out of memory) never answers.
        set_timeout(
            move || {
                if self.worker_serial.get_value() == serial
                    && matches!(self.gpu.get_untracked(), GpuState::Checking)
                {
                    self.gpu.set(GpuState::Failed(WorkerError::Other(
                        "The GPU worker did not answer within three minutes. Reload the page; if it \
                         happens again, open the browser's developer console for the reason."
                            .into(),
                    )));
                }
            },
            std::time::Duration::from_secs(180),
        );
    }

    /// Stops a worker that shows no progress for far longer than its steps take.
    fn watch(self) {
        let _ = set_interval_with_handle(
            move || {
                let stalled = self
                    .watchdog
                    .with_value(|w| w.overdue(now()).map(|silent| (silent, w.median())));
                if let Some((silent, median)) = stalled {
                    let usual = median.map_or(String::new(), |m| {
                        format!(", where its steps take {:.1} s", m / 1000.0)
                    });
                    self.on_crash(WorkerError::Stalled(format!(
                        "The GPU worker showed no progress for {:.0} s{usual}: the GPU driver may have hung. \
                         It was stopped and a new one started; your identities, checkpoints and images are \
                         safe in storage, and training can continue from its last checkpoint.",
                        silent / 1000.0
                    )));
                }
            },
            WATCH_EVERY,
        );
    }

    fn on_response(self, response: Versioned<Response>) {
        let response = match response {
            Versioned::Ours(r) => r,
            Versioned::Foreign { build } => return self.on_outdated(&build),
        };
        let t = now();
        self.watchdog.update_value(|w| match &response {
            Response::TrainStep(r) if r.step >= r.total => w.report(t, Report::LastStep),
            Response::GenStep { step, total, .. } if step >= total => w.report(t, Report::LastStep),
            Response::TrainStep(_) | Response::GenStep { .. } => w.report(t, Report::Step),
            Response::ModelProgress { .. }
            | Response::TrainMaps { .. }
            | Response::TrainPreviewStep { .. }
            | Response::TrainPreview { .. }
            | Response::TrainNoPreviews { .. }
            | Response::TrainCheckpoint { .. } => w.report(t, Report::Other),
            Response::ModelReady(_)
            | Response::ModelFailed(_)
            | Response::TrainStopped { .. }
            | Response::TrainDone { .. }
            | Response::TrainFailed(_)
            | Response::GenDone { .. }
            | Response::GenFailed(_) => w.end(t),
            Response::GpuCheck(_)
            | Response::Crashed(_)
            | Response::Faces { .. }
            | Response::ClipReady(_)
            | Response::ClipFailed(_) => {}
        });
        match response {
            Response::GpuCheck(r) => {
                let ok = r.is_ok();
                self.gpu.set(match r {
                    Ok(report) => GpuState::Ready(Box::new(report)),
                    Err(e) => GpuState::Failed(e),
                });
                if ok {
                    model::on_gpu_ready(self);
                    clip::on_gpu_ready(self);
                }
            }
            Response::ModelProgress { done, total } => self.model.update(|m| {
                if let ModelState::Loading {
                    done: d, total: t, ..
                } = m
                {
                    (*d, *t) = (done, total);
                }
            }),
            Response::ModelReady(info) => model::on_ready(self, info),
            Response::ClipReady(info) => clip::on_loaded(self, Ok(info)),
            Response::ClipFailed(e) => clip::on_loaded(self, Err(e)),
            Response::ModelFailed(e) => {
                self.model_id.set(None);
                self.model.set(ModelState::Failed(e.into()));
            }
            Response::TrainStep(_)
            | Response::TrainMaps { .. }
            | Response::TrainPreviewStep { .. }
            | Response::TrainPreview { .. }
            | Response::TrainNoPreviews { .. }
            | Response::TrainCheckpoint { .. }
            | Response::TrainStopped { .. }
            | Response::TrainDone { .. }
            | Response::TrainFailed(_) => identity::on_response(self, response),
            Response::GenStep { .. } | Response::GenDone { .. } | Response::GenFailed(_) => {
                generate::on_response(self, response)
            }
            Response::Faces { key, faces } => identity::on_faces(self, key, faces),
            Response::Crashed(e) => self.on_crash(e),
        }
    }

    /// Drops the current worker (nothing it still sends is read, and it is terminated) and
    /// fails what depended on it with `error`.
    fn lose_worker(self, error: &UiError) {
        self.worker_serial.update_value(|n| *n += 1);
        self.worker.set_value(None);
        self.watchdog.update_value(Watchdog::reset);
        self.model_id.set(None);
        self.model.set(ModelState::Failed(error.clone()));
        identity::on_crash(self, error.clone());
        generate::on_crash(self, error.clone());
    }

    /// The worker's wasm instance is gone (or hangs, or lost its GPU): say why everywhere it
    /// matters and start a new one. Storage (models, identities, checkpoints, gallery) is
    /// untouched. After a lost device or a stall, the model that was on the GPU loads again,
    /// so that a run can continue from its checkpoint.
    fn on_crash(self, e: WorkerError) {
        if matches!(e, WorkerError::Outdated(_)) {
            return self.on_outdated("of another build");
        }
        let reload = match (&e, self.model.get_untracked()) {
            (WorkerError::DeviceLost(_) | WorkerError::Stalled(_), ModelState::Ready(info)) => {
                Some(info.id)
            }
            _ => None,
        };
        let again = matches!(e, WorkerError::DeviceLost(_) | WorkerError::Stalled(_));
        let error = UiError::from(e);
        self.lose_worker(&error);
        clip::on_crash(self, again, &error);
        self.gpu.set(GpuState::Checking);
        if let Some(id) = reload {
            self.model_error.set(Some(error));
            model::reload(self, &id);
        }
        // Not from inside the dying worker's callback.
        set_timeout(
            move || self.start_worker(),
            std::time::Duration::from_millis(50),
        );
    }

    /// The worker is of another build than the page (the site was redeployed): only a reload
    /// helps, and a new worker would be the same, so none is started.
    fn on_outdated(self, build: &str) {
        let e = outdated(build);
        self.lose_worker(&UiError::from(e.clone()));
        clip::on_crash(self, false, &UiError::from(e.clone()));
        self.gpu.set(GpuState::Failed(e));
    }
}

/// Whether this browser exposes WebGPU at all (`navigator.gpu`), checked before starting
/// the worker so that the explanation appears at once.
fn browser_has_webgpu() -> bool {
    let navigator = web_sys::window().map(|w| w.navigator());
    navigator.is_some_and(|n| {
        js_sys::Reflect::get(&n, &"gpu".into()).is_ok_and(|gpu| !gpu.is_undefined())
    })
}

/// Opens storage, reporting failures as a [`UiError`].
pub async fn store() -> Result<Store, UiError> {
    Store::open().await.map_err(UiError::from)
}

/// Storage with the library's tab lock, for writing identities and gallery images: other tabs
/// wait until the returned lock is dropped.
pub async fn library() -> Result<(Store, Held), UiError> {
    let held = lock::lock(lock::LIBRARY).await?;
    Ok((store().await?, held))
}

impl From<StoreError> for UiError {
    fn from(e: StoreError) -> Self {
        let kind = if e == StoreError::Full {
            ErrorKind::StorageFull
        } else {
            ErrorKind::Storage
        };
        UiError::new(kind, e.to_string())
    }
}

#[component]
fn App() -> impl IntoView {
    let ctx = Ctx {
        gpu: RwSignal::new(GpuState::Checking),
        model: RwSignal::new_local(ModelState::Empty),
        model_id: RwSignal::new(None),
        model_error: RwSignal::new(None),
        cached: RwSignal::new(Vec::new()),
        clip: RwSignal::new_local(ClipState::Off),
        quota: RwSignal::new(None),
        train: RwSignal::new(TrainView::default()),
        identities: RwSignal::new(Vec::new()),
        photos: RwSignal::new(Vec::new()),
        generation: RwSignal::new(GenView::default()),
        gallery: RwSignal::new(Vec::new()),
        prompt: RwSignal::new(String::new()),
        negative: RwSignal::new(String::new()),
        seed: RwSignal::new(widgets::random_seed()),
        worker: StoredValue::new_local(None),
        worker_serial: StoredValue::new(0),
        watchdog: StoredValue::new(Watchdog::default()),
        run_lock: StoredValue::new_local(None),
    };
    provide_context(ctx);
    if browser_has_webgpu() {
        ctx.start_worker();
        ctx.watch();
    } else {
        ctx.gpu.set(GpuState::Failed(WorkerError::NoWebGpu(
            "navigator.gpu is missing".into(),
        )));
    }
    leptos::task::spawn_local(async move {
        model::load_last(ctx).await;
        identity::load_list(ctx).await;
        identity::look_for_unfinished_run(ctx).await;
        generate::load_gallery(ctx).await;
        crate::store::persist().await;
    });

    view! {
        <header class="top">
            <div class="brand">
                <h1>"SeFi Studio"</h1>
                <p class="tagline">
                    "Teach an image model who you are from one photo, then paint yourself anywhere. "
                    "Everything runs on your own GPU; your photos never leave this device."
                </p>
            </div>
            <nav class="steps" aria-label="Steps">
                <a href="#model">"1 · Model"</a>
                <a href="#identity">"2 · Identity"</a>
                <a href="#generate">"3 · Generate"</a>
                <a href="#gpu">"Your GPU"</a>
            </nav>
        </header>
        <main>
            <model::ModelPanel />
            <identity::IdentityPanel />
            <generate::GeneratePanel />
            <gpu::GpuPanel />
        </main>
        <footer class="foot">
            "SeFi Studio is a static site: models download straight from their hosts into this browser's storage, "
            "and nothing you add is sent anywhere."
        </footer>
    }
}
