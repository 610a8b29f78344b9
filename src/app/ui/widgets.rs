//! Small pieces the panels share: errors with what to do, number formats, blob URLs, the
//! loss chart.

use js_sys::{Array, Uint8Array};
use leptos::prelude::*;
use web_sys::{Blob, BlobPropertyBag, Url};

use crate::app::protocol::WorkerError;
use crate::device::WEBGPU_HINT;

pub use crate::app::view::{ErrorKind, UiError};

impl From<WorkerError> for UiError {
    fn from(e: WorkerError) -> Self {
        let message = match &e {
            WorkerError::NoWebGpu(detail) => format!("{WEBGPU_HINT}. ({detail})"),
            WorkerError::NoModel => "Load a model first (step 1).".into(),
            e => e.to_string(),
        };
        UiError::new(e.kind(), message)
    }
}

/// An error box with the given test id.
#[component]
pub fn ErrorBox(error: UiError, testid: &'static str) -> impl IntoView {
    view! {
        <div class="status error" role="alert" data-testid=testid data-kind=error.kind.as_str()>
            <strong>{error.kind.title()}</strong>
            <p>{error.message}</p>
        </div>
    }
}

pub fn bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "…".into();
    }
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A seed users can read and type: below 2^32, as the common web UIs use.
pub fn random_seed() -> u64 {
    (js_sys::Math::random() * 4_294_967_296.0) as u64
}

/// An object URL for bytes (revoke it when the thing it shows goes away).
pub fn blob_url(bytes: &[u8], mime: &str) -> String {
    let parts = Array::of1(&Uint8Array::from(bytes));
    let opts = BlobPropertyBag::new();
    opts.set_type(mime);
    Blob::new_with_u8_array_sequence_and_options(&parts, &opts)
        .and_then(|b| Url::create_object_url_with_blob(&b))
        .unwrap_or_default()
}

pub fn blob_url_of(blob: &Blob) -> String {
    Url::create_object_url_with_blob(blob).unwrap_or_default()
}

pub fn revoke(url: &str) {
    if url.starts_with("blob:") {
        let _ = Url::revoke_object_url(url);
    }
}

/// Files of an `<input type=file>` change event.
pub fn input_files(ev: &web_sys::Event) -> Vec<web_sys::File> {
    let input: web_sys::HtmlInputElement = event_target(ev);
    let out = files_of(input.files());
    // Picking the same file again must fire `change` again.
    input.set_value("");
    out
}

/// Files dropped on an element.
pub fn dropped_files(ev: &web_sys::DragEvent) -> Vec<web_sys::File> {
    ev.prevent_default();
    files_of(ev.data_transfer().and_then(|d| d.files()))
}

fn files_of(list: Option<web_sys::FileList>) -> Vec<web_sys::File> {
    list.map(|l| (0..l.length()).filter_map(|i| l.get(i)).collect())
        .unwrap_or_default()
}

/// A line chart of the losses: total (left axis, linear) with the attention term beside it.
#[component]
pub fn LossChart(points: Signal<Vec<(usize, f64, f64)>>, total: Signal<usize>) -> impl IntoView {
    const W: f64 = 480.0;
    const H: f64 = 140.0;
    let path = move |pick: fn(&(usize, f64, f64)) -> f64| {
        points.with(|p| {
            if p.is_empty() {
                return String::new();
            }
            let max = p.iter().map(pick).fold(f64::MIN_POSITIVE, f64::max);
            let n = total.get().max(1) as f64;
            // At most ~400 points drawn.
            let stride = (p.len() / 400).max(1);
            p.iter()
                .step_by(stride)
                .chain(p.last())
                .enumerate()
                .map(|(i, q)| {
                    let x = q.0 as f64 / n * W;
                    let y = H - pick(q) / max * (H - 8.0) - 4.0;
                    format!("{}{x:.1},{y:.1}", if i == 0 { "M" } else { " L" })
                })
                .collect()
        })
    };
    let last = move || points.with(|p| p.last().map(|q| q.1).unwrap_or(f64::NAN));
    view! {
        <figure class="chart">
            <svg
                data-testid="train-loss"
                data-points=move || points.with(Vec::len)
                data-last=move || format!("{}", last())
                viewBox=format!("0 0 {W} {H}")
                preserveAspectRatio="none"
                role="img"
                aria-label="Training loss"
            >
                <path class="loss-total" d=move || path(|q| q.1) />
                <path class="loss-attn" d=move || path(|q| q.2) />
            </svg>
            <figcaption>
                <span class="key total">"loss"</span>
                " "
                {move || {
                    let l = last();
                    if l.is_finite() { format!("{l:.4}") } else { "–".into() }
                }}
                <span class="key attn">"attention term"</span>
                " (each scaled to its own maximum)"
            </figcaption>
        </figure>
    }
}

/// The likeness of the training previews, step by step: the cosine similarity of each
/// preview's face to the photos' (0.5 at the bottom, 1 at the top), with the line above which
/// faces are taken for the same person.
#[component]
pub fn LikenessChart(points: Signal<Vec<(usize, f32)>>, total: Signal<usize>) -> impl IntoView {
    const W: f64 = 480.0;
    const H: f64 = 140.0;
    const LOW: f64 = 0.5;
    let y = |v: f64| H - (v.clamp(LOW, 1.0) - LOW) / (1.0 - LOW) * (H - 8.0) - 4.0;
    let x = move |step: usize| step as f64 / total.get().max(1) as f64 * W;
    let path = move || {
        points.with(|p| {
            p.iter()
                .enumerate()
                .map(|(i, &(s, v))| {
                    format!(
                        "{}{:.1},{:.1}",
                        if i == 0 { "M" } else { " L" },
                        x(s),
                        y(v as f64)
                    )
                })
                .collect::<String>()
        })
    };
    let dots = move || {
        points.with(|p| {
            p.iter()
                .map(|&(s, v)| view! { <circle class="likeness-dot" cx=x(s) cy=y(v as f64) r="3" /> })
                .collect::<Vec<_>>()
        })
    };
    let same = y(crate::face::SAME_PERSON as f64);
    let last = move || points.with(|p| p.last().map(|q| q.1));
    view! {
        <figure class="chart">
            <svg
                data-testid="train-likeness"
                data-points=move || points.with(Vec::len)
                viewBox=format!("0 0 {W} {H}")
                preserveAspectRatio="none"
                role="img"
                aria-label="Likeness of the previews"
            >
                <line class="same-person" x1="0" x2=W y1=same y2=same />
                <path class="likeness" d=path />
                {dots}
            </svg>
            <figcaption>
                <span class="key likeness">"likeness"</span>
                " "
                {move || last().map_or("–".into(), |l| format!("{l:.2}"))}
                " (of the previews' faces to your photos'; the dashed line: same person)"
            </figcaption>
        </figure>
    }
}

/// The value of the `<meta http-equiv=Content-Security-Policy>` of the page.
pub fn page_policy() -> String {
    web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| {
            d.query_selector("meta[http-equiv=Content-Security-Policy]")
                .ok()
                .flatten()
        })
        .and_then(|m| m.get_attribute("content"))
        .unwrap_or_default()
}

pub fn page_origin() -> String {
    web_sys::window()
        .and_then(|w| w.location().origin().ok())
        .unwrap_or_default()
}

/// Reads a file the user picked.
pub async fn file_bytes(file: &web_sys::File) -> Result<Vec<u8>, UiError> {
    crate::store::read_blob(&file.name(), file)
        .await
        .map_err(|e| UiError::new(ErrorKind::Storage, e.to_string()))
}

/// A labelled number input bound to a signal; text that does not parse leaves the value as is.
#[component]
pub fn NumberField<T>(
    label: &'static str,
    testid: &'static str,
    value: RwSignal<T>,
    #[prop(default = "0")] min: &'static str,
    #[prop(default = "any")] step: &'static str,
    #[prop(optional)] max: Option<&'static str>,
) -> impl IntoView
where
    T: std::str::FromStr + ToString + Clone + Send + Sync + 'static,
{
    view! {
        <label>
            <span>{label}</span>
            <input
                type="number"
                min=min
                max=max
                step=step
                data-testid=testid
                prop:value=move || value.get().to_string()
                on:input=move |ev| {
                    if let Ok(v) = event_target_value(&ev).parse() {
                        value.set(v)
                    }
                }
            />
        </label>
    }
}
