//! Prompt fidelity in the model panel: a CLIP model, added from its address or the user's
//! folder and stored like the models, is loaded beside the model, and then every generated
//! image carries its CLIP-T.

use std::cell::Cell;
use std::rc::Rc;

use leptos::prelude::*;
use leptos::task::spawn_local;

use super::model::{error, refresh_cache, source_of};
use super::widgets::{ErrorBox, ErrorKind, UiError, bytes, input_files};
use super::{Ctx, GpuState, store};
use crate::app::acquire::{self, Progress};
use crate::app::catalog::{CLIP_ADDRESS, Manifest, ModelKind};
use crate::app::protocol::{ClipInfo, Request, WorkerError};
use crate::store::lock;

/// Where prompt fidelity stands.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ClipState {
    /// No CLIP model: images carry no CLIP-T.
    #[default]
    Off,
    /// Bringing its files into storage.
    Acquiring {
        /// What the user gave.
        name: String,
        /// The file being stored.
        file: String,
        /// Bytes stored so far, all files.
        bytes: u64,
        /// Set to stop.
        cancel: Rc<Cell<bool>>,
    },
    /// Stored; moving to the GPU (`sent`), or waiting for the GPU check to finish.
    Loading {
        id: String,
        name: String,
        sent: bool,
    },
    /// On the GPU: the next images are scored.
    Ready(ClipInfo),
    /// Why it could not be added or loaded (images go on without CLIP-T).
    Failed(UiError),
}

impl ClipState {
    /// The stored CLIP model it holds or is loading.
    fn id(&self) -> Option<&str> {
        match self {
            ClipState::Loading { id, .. } => Some(id),
            ClipState::Ready(info) => Some(&info.id),
            _ => None,
        }
    }
}

/// Sends the stored CLIP model to the GPU (now, or once the GPU check is done).
pub fn load_stored(ctx: Ctx, m: &Manifest) {
    if ctx.clip.with_untracked(|c| c.id() == Some(m.id.as_str())) {
        return;
    }
    let sent = matches!(ctx.gpu.get_untracked(), GpuState::Ready(_));
    ctx.clip.set(ClipState::Loading {
        id: m.id.clone(),
        name: m.name.clone(),
        sent,
    });
    if sent {
        ctx.send(Request::LoadClip { id: m.id.clone() });
    }
}

/// The GPU check is done: a CLIP model waiting for it is sent.
pub fn on_gpu_ready(ctx: Ctx) {
    let waiting = ctx.clip.with_untracked(|c| match c {
        ClipState::Loading {
            id, sent: false, ..
        } => Some(id.clone()),
        _ => None,
    });
    if let Some(id) = waiting {
        ctx.clip.update(|c| {
            if let ClipState::Loading { sent, .. } = c {
                *sent = true;
            }
        });
        ctx.send(Request::LoadClip { id });
    }
}

/// The worker's answer to `LoadClip`.
pub fn on_loaded(ctx: Ctx, result: Result<ClipInfo, WorkerError>) {
    match result {
        Ok(info) => {
            let id = info.id.clone();
            ctx.clip.set(ClipState::Ready(info));
            spawn_local(async move {
                if let Ok(s) = store().await {
                    let _ = acquire::touch(&s, &id).await;
                }
                refresh_cache(ctx).await;
            });
        }
        Err(e) => ctx.clip.set(ClipState::Failed(e.into())),
    }
}

/// The worker was replaced: a CLIP model it held loads again on the next one when `again`
/// (a lost device or a stall, as the model does), else it is reported gone.
pub fn on_crash(ctx: Ctx, again: bool, error: &UiError) {
    let held = ctx.clip.with_untracked(|c| match c {
        ClipState::Loading { id, name, .. } => Some((id.clone(), name.clone())),
        ClipState::Ready(info) => Some((info.id.clone(), info.name.clone())),
        _ => None,
    });
    if let Some((id, name)) = held {
        ctx.clip.set(if again {
            ClipState::Loading {
                id,
                name,
                sent: false,
            }
        } else {
            ClipState::Failed(error.clone())
        });
    }
}

/// On opening the page: the CLIP model that was in use last time loads again.
pub fn load_last(ctx: Ctx) {
    let last = ctx.cached.with_untracked(|l| {
        l.iter()
            .find(|m| m.kind == ModelKind::Clip && m.complete && m.last_used > 0.0)
            .cloned()
    });
    if let Some(m) = last
        && ctx.clip.with_untracked(|c| *c == ClipState::Off)
    {
        load_stored(ctx, &m);
    }
}

/// Frees the CLIP model; it does not load on the next visit (it stays in storage).
fn remove(ctx: Ctx) {
    let id = ctx.clip.with_untracked(|c| c.id().map(str::to_string));
    ctx.send(Request::UnloadClip);
    ctx.clip.set(ClipState::Off);
    if let Some(id) = id {
        spawn_local(async move {
            if let Ok(s) = store().await {
                let _ = acquire::forget_use(&s, &id).await;
            }
            refresh_cache(ctx).await;
        });
    }
}

/// Finishes storing a CLIP model whose download was interrupted.
pub fn resume(ctx: Ctx, address: String) {
    spawn_local(acquire(ctx, Pick::Address(address)));
}

/// Where a CLIP model comes from.
enum Pick {
    Address(String),
    Files(Vec<web_sys::File>),
}

async fn acquire(ctx: Ctx, pick: Pick) {
    let cancel = Rc::new(Cell::new(false));
    let name = match &pick {
        Pick::Address(a) => a.trim().to_string(),
        Pick::Files(f) => f.first().map(|f| f.name()).unwrap_or_default(),
    };
    let acquiring = |file: String, bytes: u64| ClipState::Acquiring {
        name: name.clone(),
        file,
        bytes,
        cancel: cancel.clone(),
    };
    ctx.clip.set(acquiring(String::new(), 0));
    let mut last = 0.0;
    let mut progress = |p: Progress| {
        let now = js_sys::Date::now();
        if now - last >= 100.0 {
            last = now;
            ctx.clip.set(acquiring(p.file, p.bytes));
        }
    };
    let result: Result<Manifest, UiError> = async {
        // One tab at a time stores models (see the model panel).
        let _held = lock::lock(lock::MODELS).await?;
        let s = store().await?;
        let stored = match pick {
            Pick::Address(address) => {
                let source = source_of(&address)?;
                acquire::download(
                    &s,
                    ModelKind::Clip,
                    &source,
                    false,
                    None,
                    cancel.clone(),
                    &mut progress,
                )
                .await
            }
            Pick::Files(files) => {
                acquire::copy_files(&s, ModelKind::Clip, files, cancel.clone(), &mut progress).await
            }
        };
        stored.map_err(error)
    }
    .await;
    match result {
        Ok(m) => {
            ctx.clip.set(ClipState::Off);
            load_stored(ctx, &m);
        }
        Err(e) if e.kind == ErrorKind::Cancelled => ctx.clip.set(ClipState::Off),
        Err(e) => ctx.clip.set(ClipState::Failed(e)),
    }
    refresh_cache(ctx).await;
}

/// The CLIP part of the model panel.
#[component]
pub fn PromptFidelityPanel() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let address = RwSignal::new(CLIP_ADDRESS.to_string());
    // One CLIP model at a time: "Stop scoring" before adding another.
    let busy = move || {
        ctx.clip
            .with(|c| c.id().is_some() || matches!(c, ClipState::Acquiring { .. }))
    };
    let files = move |f: Vec<web_sys::File>| {
        if !f.is_empty() {
            spawn_local(acquire(ctx, Pick::Files(f)));
        }
    };
    // Open while a CLIP model is in use, and as the user leaves it (stopping keeps it open).
    let shown = RwSignal::new(false);
    Effect::new(move |_| {
        if ctx.clip.with(|c| *c != ClipState::Off) {
            shown.set(true);
        }
    });
    let toggled = move |ev: web_sys::Event| {
        let open = ev
            .target()
            .and_then(|t| js_sys::Reflect::get(&t, &"open".into()).ok())
            .and_then(|o| o.as_bool());
        if let Some(open) = open {
            shown.set(open);
        }
    };
    view! {
        <details class="advanced" data-testid="clip-panel" prop:open=move || shown.get() on:toggle=toggled>
            <summary>"Prompt fidelity (optional)"</summary>
            <p class="muted">
                "A CLIP model scores how well each image follows its prompt (CLIP-T), on this GPU: "
                {CLIP_ADDRESS}
                " is about 1.7 GB to download and takes about 0.9 GB of GPU memory beside the model."
            </p>
            <form class="row" on:submit=move |ev| {
                ev.prevent_default();
                spawn_local(acquire(ctx, Pick::Address(address.get_untracked())));
            }>
                <label class="grow">
                    <span>"CLIP model address"</span>
                    <input
                        type="text"
                        data-testid="clip-url"
                        spellcheck="false"
                        prop:value=move || address.get()
                        on:input=move |ev| address.set(event_target_value(&ev))
                    />
                </label>
                <button type="submit" data-testid="clip-load" disabled=busy>
                    "Add"
                </button>
                <label class="button">
                    "Your folder"
                    <input
                        type="file"
                        class="hidden"
                        data-testid="clip-folder"
                        prop:webkitdirectory=true
                        disabled=busy
                        on:change=move |ev| files(input_files(&ev))
                    />
                </label>
            </form>
            {move || status(ctx)}
        </details>
    }
}

fn status(ctx: Ctx) -> AnyView {
    match ctx.clip.get() {
        ClipState::Off => view! {
            <p class="muted" data-testid="clip-off">"No CLIP model: images are not scored for prompt fidelity."</p>
        }
        .into_any(),
        ClipState::Acquiring {
            name,
            file,
            bytes: b,
            cancel,
        } => view! {
            <div class="progress-box" data-testid="clip-progress" data-phase="store">
                <p>"Storing " <strong>{name}</strong> {format!(": {file}, {} in all", bytes(b as f64))}</p>
                <button on:click=move |_| cancel.set(true)>"Stop"</button>
                <span class="muted">" What is stored so far is kept: adding it again resumes."</span>
            </div>
        }
        .into_any(),
        ClipState::Loading { name, .. } => view! {
            <p class="progress-box" data-testid="clip-progress" data-phase="load">
                "Moving " <strong>{name}</strong> " to the GPU…"
            </p>
        }
        .into_any(),
        ClipState::Ready(info) => view! {
            <div class="status ok" data-testid="clip-ready" data-model-id=info.id.clone()>
                <strong>{info.name.clone()}</strong>
                {format!(
                    " scores every image: {:.0} M parameters in {} on the GPU (loaded in {:.1} s). ",
                    info.params as f64 / 1e6,
                    info.dtype,
                    info.millis / 1e3
                )}
                <button data-testid="clip-remove" on:click=move |_| remove(ctx)>"Stop scoring"</button>
            </div>
        }
        .into_any(),
        ClipState::Failed(error) => view! { <ErrorBox error testid="clip-error" /> }.into_any(),
    }
}
