//! The "Your GPU" panel: the adapter, its limits, the autodiff check, and whether the loaded
//! model fits.

use leptos::prelude::*;

use super::widgets::bytes;
use super::{Ctx, ModelState};
use crate::app::protocol::{GpuReport, WorkerError};
use crate::check::TOLERANCE;
use crate::device::{DeviceInfo, WEBGPU_HINT};

#[derive(Clone, Debug, PartialEq)]
pub enum GpuState {
    Checking,
    Ready(Box<GpuReport>),
    Failed(WorkerError),
}

#[component]
pub fn GpuPanel() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let state = ctx.gpu;
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
            <FitView />
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
            <dt>"memory"</dt>
            <dd data-testid="gpu-memory">
                {match device.memory_bytes {
                    Some(m) => mib(m),
                    None => "not told by the browser".to_string(),
                }}
            </dd>
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
        WorkerError::Outdated(advice) => ("outdated", "SeFi Studio was updated", advice, None),
        other => ("error", "The GPU check failed", other.to_string(), None),
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

/// Whether the loaded model fits, and what to change when it does not.
#[component]
fn FitView() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    move || {
        let ModelState::Ready(info) = ctx.model.get() else {
            return None;
        };
        let f = info.fit.clone();
        Some(view! {
            <h3>"Does the model fit?"</h3>
            <dl class="facts" data-testid="gpu-fit">
                <dt>"weights"</dt>
                <dd>{format!("{} ({})", bytes(f.weights_bytes as f64), info.dtype)}</dd>
                <dt>{format!("generating at {} px", f.resolution)}</dt>
                <dd>{format!("about {} of GPU memory", bytes(f.generate_bytes as f64))}</dd>
                <dt>{format!("training at {} px", f.resolution)}</dt>
                <dd>{format!("about {} of GPU memory", bytes(f.train_bytes as f64))}</dd>
                {f.largest_generate_side.map(|s| view! {
                    <dt>"largest image"</dt>
                    <dd>{format!("{s} × {s} px (the GPU's buffer limit)")}</dd>
                })}
            </dl>
            {if f.advice.is_empty() {
                let text = match f.memory_bytes {
                    Some(m) => format!("Fits this GPU's limits and its {} of memory.", bytes(m as f64)),
                    None => "Fits this GPU's limits. Browsers do not tell how much memory a GPU has: \
                        if it has less than the figures above, use a smaller size (or add \
                        ?gpu-memory-mib=N to the page's address, and runs that need more than N MiB \
                        are refused before they start).".to_string(),
                };
                view! { <p class="status ok">{text}</p> }.into_any()
            } else {
                f.advice.into_iter().map(|a| view! { <p class="status error">{a}</p> }).collect_view().into_any()
            }}
        })
    }
}
