//! leptos components of the page. They only show state and send requests; the worker computes.

use gloo_worker::Spawnable;
use leptos::prelude::*;

use super::protocol::{GpuReport, JsCodec, Request, Response, WorkerError};
use super::worker::{self, GpuWorker};
use crate::check::TOLERANCE;
use crate::device::{DeviceInfo, WEBGPU_HINT};

/// Mounts the app on `<body>`; called by the page binary.
pub fn mount() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

#[component]
fn App() -> impl IntoView {
    view! {
        <header class="top">
            <h1>"SeFi Studio"</h1>
            <p class="tagline">
                "Personalise image models with one photo, on your own GPU. "
                "Your photos never leave this device."
            </p>
        </header>
        <main>
            <GpuPanel />
        </main>
    }
}

#[derive(Clone, Debug)]
enum GpuState {
    Checking,
    Ready(Box<GpuReport>),
    Failed(WorkerError),
}

/// Whether this browser exposes WebGPU at all (`navigator.gpu`), checked before starting
/// the worker so that the explanation appears at once.
fn browser_has_webgpu() -> bool {
    let navigator = web_sys::window().map(|w| w.navigator());
    navigator.is_some_and(|n| {
        js_sys::Reflect::get(&n, &"gpu".into()).is_ok_and(|gpu| !gpu.is_undefined())
    })
}

#[component]
fn GpuPanel() -> impl IntoView {
    let (state, set_state) = signal(GpuState::Checking);
    if browser_has_webgpu() {
        let bridge = GpuWorker::spawner()
            .encoding::<JsCodec>()
            .callback(move |response| match response {
                Response::GpuCheck(Ok(report)) => set_state.set(GpuState::Ready(Box::new(report))),
                Response::GpuCheck(Err(e)) => set_state.set(GpuState::Failed(e)),
            })
            .spawn_with_loader(worker::LOADER);
        bridge.send(Request::GpuCheck);
        // The bridge must live as long as the page: dropping it terminates the worker.
        StoredValue::new_local(bridge);
        // A worker that fails to start (blocked script, out of memory) never answers.
        set_timeout(
            move || {
                if matches!(state.get_untracked(), GpuState::Checking) {
                    set_state.set(GpuState::Failed(WorkerError::Other(
                        "The GPU worker did not answer within two minutes. Reload the page; if it \
                         happens again, open the browser's developer console for the reason."
                            .into(),
                    )));
                }
            },
            std::time::Duration::from_secs(120),
        );
    } else {
        set_state.set(GpuState::Failed(WorkerError::NoWebGpu(
            "navigator.gpu is missing".into(),
        )));
    }

    view! {
        <section class="panel" id="gpu" data-testid="gpu-panel">
            <h2>"Your GPU"</h2>
            {move || match state.get() {
                GpuState::Checking => {
                    view! {
                        <p class="status" data-testid="gpu-status" data-state="checking">
                            "Checking your GPU…"
                        </p>
                    }
                        .into_any()
                }
                GpuState::Ready(report) => view! { <GpuReportView report=*report /> }.into_any(),
                GpuState::Failed(error) => view! { <GpuError error /> }.into_any(),
            }}
        </section>
    }
}

#[component]
fn GpuReportView(report: GpuReport) -> impl IntoView {
    let GpuReport { device, check } = report;
    let verdict = if check.passed {
        "Your GPU computes correctly: training and generation can run here."
    } else {
        "Your GPU returned wrong numbers: results on this device cannot be trusted."
    };
    let state = if check.passed { "ok" } else { "wrong" };
    view! {
        <p class=format!("status {state}") data-testid="gpu-status" data-state=state>
            {verdict}
        </p>
        <DeviceTable device />
        <h3>"Autodiff check"</h3>
        <p class="explain">
            "A small forward and backward pass (matmul, softmax, tanh) ran in a background worker on WebGPU; "
            "its results were read back and compared with the same maths in double precision."
        </p>
        <dl class="facts">
            <dt>"loss"</dt>
            <dd data-testid="check-loss">{format!("{:.7}", check.loss)}</dd>
            <dt>"expected"</dt>
            <dd data-testid="check-expected">{format!("{:.7}", check.expected_loss)}</dd>
            <dt>"largest relative error"</dt>
            <dd data-testid="check-error">
                {format!("{:.1e} (tolerance {TOLERANCE:.0e})", check.max_rel_error)}
            </dd>
            <dt>"gradient entries"</dt>
            <dd data-testid="check-grad" data-values=grad_json(&check.grad)>
                {check.grad.len()}
            </dd>
            <dt>"time"</dt>
            <dd>{format!("{:.0} ms (first run includes compiling shaders)", check.millis)}</dd>
        </dl>
    }
}

fn grad_json(grad: &[f64]) -> String {
    let items: Vec<String> = grad.iter().map(|g| format!("{g:e}")).collect();
    format!("[{}]", items.join(","))
}

#[component]
fn DeviceTable(device: DeviceInfo) -> impl IntoView {
    let limits = device.limits.clone();
    let mib = |b: u64| format!("{} MiB", b >> 20);
    view! {
        <dl class="facts" data-testid="gpu-info">
            <dt>"adapter"</dt>
            <dd data-testid="gpu-adapter">
                {device.adapter.clone()}
                {device.software.then_some(" (software: correct but slow)")}
            </dd>
            <dt>"API"</dt>
            <dd>{device.api.clone()}</dd>
            {limits
                .map(|l| {
                    view! {
                        <dt>"largest buffer"</dt>
                        <dd data-testid="gpu-max-buffer">{mib(l.max_buffer_size)}</dd>
                        <dt>"largest storage binding"</dt>
                        <dd>{mib(l.max_storage_buffer_binding_size)}</dd>
                        <dt>"workgroup"</dt>
                        <dd>
                            {format!(
                                "{} invocations, {} KiB shared",
                                l.max_compute_invocations_per_workgroup,
                                l.max_compute_workgroup_storage_size >> 10,
                            )}
                        </dd>
                    }
                })}
            <dt>"half precision (f16)"</dt>
            <dd data-testid="gpu-f16">{if device.f16 { "yes" } else { "no" }}</dd>
        </dl>
    }
}

#[component]
fn GpuError(error: WorkerError) -> impl IntoView {
    let (state, title, advice, detail) = match error {
        WorkerError::NoWebGpu(detail) => (
            "no-webgpu",
            "WebGPU is not available in this browser",
            format!("{WEBGPU_HINT}."),
            Some(detail),
        ),
        WorkerError::Other(message) => ("error", "The GPU check failed", message, None),
    };
    view! {
        <div class="status error" data-testid="gpu-status" data-state=state role="alert">
            <strong>{title}</strong>
            <p>{advice}</p>
            {detail
                .map(|d| {
                    view! {
                        <details>
                            <summary>"What the browser said"</summary>
                            <code>{d}</code>
                        </details>
                    }
                })}
            <p>
                "Nothing is uploaded: SeFi Studio needs a GPU in this browser to learn and paint on your device."
            </p>
        </div>
    }
}
