//! The model panel: presets, an address, or the user's own files; download progress; the
//! models kept in storage.

use std::cell::Cell;
use std::rc::Rc;

use leptos::prelude::*;
use leptos::task::spawn_local;

use super::clip::ClipState;
use super::widgets::{ErrorBox, ErrorKind, UiError, bytes, dropped_files, duration, input_files};
use super::{Ctx, ModelState, store};
use crate::app::acquire::{self, AcquireError, Progress};
use crate::app::catalog::{Manifest, ModelKind, ModelSource, PRESETS, Preset, csp_allows};
use crate::app::fit;
use crate::app::protocol::{ModelInfo, Request};
use crate::store::{estimate, lock};

fn gpu_ready(ctx: Ctx) -> bool {
    matches!(ctx.gpu.get_untracked(), super::GpuState::Ready(_))
}

/// Sends the stored model to the GPU (now, or once the GPU check is done).
fn load_stored(ctx: Ctx, m: &Manifest) {
    if ctx.model_id.get_untracked().as_deref() == Some(m.id.as_str())
        && matches!(
            ctx.model.get_untracked(),
            ModelState::Ready(_) | ModelState::Loading { .. }
        )
    {
        return;
    }
    if let super::GpuState::Failed(e) = ctx.gpu.get_untracked() {
        ctx.model.set(ModelState::Failed(e.into()));
        return;
    }
    let sent = gpu_ready(ctx);
    ctx.model_id.set(Some(m.id.clone()));
    ctx.model.set(ModelState::Loading {
        name: m.name.clone(),
        done: 0,
        total: 0,
        sent,
    });
    if sent {
        ctx.send(Request::LoadModel { id: m.id.clone() });
    }
}

/// Loads the stored model `id` again (after its worker was replaced), once the GPU is ready.
pub fn reload(ctx: Ctx, id: &str) {
    let stored = ctx
        .cached
        .with_untracked(|l| l.iter().find(|m| m.id == id).cloned());
    if let Some(m) = stored {
        load_stored(ctx, &m);
    }
}

/// The GPU check is done: a model waiting for it is sent.
pub fn on_gpu_ready(ctx: Ctx) {
    let waiting = ctx
        .model
        .with_untracked(|m| matches!(m, ModelState::Loading { sent: false, .. }));
    if let (true, Some(id)) = (waiting, ctx.model_id.get_untracked()) {
        ctx.model.update(|m| {
            if let ModelState::Loading { sent, .. } = m {
                *sent = true;
            }
        });
        ctx.send(Request::LoadModel { id });
    }
}

pub fn on_ready(ctx: Ctx, info: ModelInfo) {
    let id = info.id.clone();
    ctx.model.set(ModelState::Ready(Box::new(info)));
    spawn_local(async move {
        if let Ok(s) = store().await {
            let _ = acquire::touch(&s, &id).await;
        }
        refresh_cache(ctx).await;
    });
}

/// Reads the stored models and the quota.
pub async fn refresh_cache(ctx: Ctx) {
    let Ok(s) = store().await else { return };
    if let Ok(list) = acquire::list_models(&s).await {
        ctx.cached.set(list);
    }
    ctx.quota.set(estimate().await.ok());
}

/// On opening the page: loads the model that was last loaded successfully.
pub async fn load_last(ctx: Ctx) {
    refresh_cache(ctx).await;
    let last = ctx.cached.with_untracked(|l| {
        l.iter()
            .find(|m| m.kind == ModelKind::StableDiffusion && m.complete && m.last_used > 0.0)
            .cloned()
    });
    if let Some(m) = last
        && ctx.model_id.get_untracked().is_none()
        && matches!(ctx.model.get_untracked(), ModelState::Empty)
    {
        load_stored(ctx, &m);
    }
    super::clip::load_last(ctx);
}

/// Where a model comes from.
enum Pick {
    /// A model folder or file at an address; `fp16` prefers the half-precision variant files;
    /// `vae` is the address of a VAE to use in place of the model's (empty: its own).
    Address {
        address: String,
        fp16: bool,
        vae: String,
    },
    /// Files the user dropped or chose.
    Files(Vec<web_sys::File>),
}

/// Clears the last failure at once (before the work starts), so that only the new outcome shows.
fn clear_failure(ctx: Ctx) {
    ctx.model_error.set(None);
    if matches!(ctx.model.get_untracked(), ModelState::Failed(_)) {
        ctx.model.set(ModelState::Empty);
    }
}

async fn acquire(ctx: Ctx, pick: Pick) {
    let cancel = Rc::new(Cell::new(false));
    let previous = match ctx.model.get_untracked() {
        m @ (ModelState::Ready(_) | ModelState::Loading { .. }) => m,
        _ => ModelState::Empty,
    };
    ctx.model_error.set(None);
    let (phase, name) = match &pick {
        Pick::Address { address, .. } => ("download", address.clone()),
        Pick::Files(f) => ("copy", f.first().map(|f| f.name()).unwrap_or_default()),
    };
    ctx.model.set(ModelState::Acquiring {
        phase,
        name: name.clone(),
        file: String::new(),
        bytes: 0,
        file_bytes: 0,
        file_total: None,
        speed: 0.0,
        cancel: cancel.clone(),
    });
    // One tab at a time stores models: another tab's download is waited for (and used, when
    // it brought the same model), or taken over when that tab closes.
    let _held = match lock::try_lock(lock::MODELS).await {
        Ok(Some(held)) => Some(held),
        Ok(None) => {
            ctx.model.update(|m| {
                if let ModelState::Acquiring { phase, .. } = m {
                    *phase = "wait";
                }
            });
            lock::lock(lock::MODELS).await.ok()
        }
        Err(_) => None,
    };
    let started = js_sys::Date::now();
    let mut last = 0.0;
    let mut progress = |p: Progress| {
        let now = js_sys::Date::now();
        if now - last < 100.0 {
            return;
        }
        last = now;
        ctx.model.set(ModelState::Acquiring {
            phase,
            name: name.clone(),
            file: p.file,
            bytes: p.bytes,
            file_bytes: p.file_bytes,
            file_total: p.file_total,
            speed: p.bytes as f64 / ((now - started) / 1e3).max(1e-3),
            cancel: cancel.clone(),
        });
    };
    let result: Result<Manifest, UiError> = async {
        let s = store().await?;
        match pick {
            Pick::Address { address, fp16, vae } => {
                let source = source_of(&address)?;
                let vae = match vae.trim() {
                    "" => None,
                    v => Some(source_of(v)?),
                };
                let sd = ModelKind::StableDiffusion;
                acquire::download(
                    &s,
                    sd,
                    &source,
                    fp16,
                    vae.as_ref(),
                    cancel.clone(),
                    &mut progress,
                )
                .await
                .map_err(error)
            }
            Pick::Files(files) => acquire::copy_files(
                &s,
                ModelKind::StableDiffusion,
                files,
                cancel.clone(),
                &mut progress,
            )
            .await
            .map_err(error),
        }
    }
    .await;
    match result {
        Ok(m)
            if ctx.model_id.get_untracked().as_deref() == Some(m.id.as_str())
                && previous != ModelState::Empty =>
        {
            // Already on the GPU (or on its way).
            ctx.model.set(previous);
        }
        Ok(m) => load_stored(ctx, &m),
        Err(e) => {
            ctx.model.set(previous);
            if e.kind != ErrorKind::Cancelled {
                ctx.model_error.set(Some(e));
            }
        }
    }
    refresh_cache(ctx).await;
}

/// What a typed address points at, if the page's Content-Security-Policy lets it go there.
pub(super) fn source_of(address: &str) -> Result<ModelSource, UiError> {
    let origin = super::widgets::page_origin();
    let source = ModelSource::parse(address, &origin)
        .map_err(|e| UiError::new(ErrorKind::BadModel, e.to_string()))?;
    if !csp_allows(&super::widgets::page_policy(), source.address(), &origin) {
        let host = source.host().unwrap_or_default().to_string();
        return Err(error(AcquireError::BlockedHost { host }));
    }
    Ok(source)
}

/// A preset's fit on the GPU found, before any download: `None` until the GPU is known; else
/// whether its weights can load at all, and what to tell.
fn preset_fit(ctx: Ctx, p: &Preset) -> Option<(bool, String)> {
    let super::GpuState::Ready(report) = ctx.gpu.get() else {
        return None;
    };
    let fit = fit::preset(p, fit::Budget::of(&report.device));
    let text = if fit.advice.is_empty() {
        format!(
            "Fits this GPU at {} px: about {} of GPU memory to generate, {} to train.",
            p.resolution,
            bytes(fit.generate_bytes as f64),
            bytes(fit.train_bytes as f64)
        )
    } else {
        fit.advice.join(" ")
    };
    Some((fit.weights_fit, text))
}

pub(super) fn error(e: AcquireError) -> UiError {
    UiError::new(e.kind(), e.to_string())
}

/// `?model=URL` in the page's address.
fn address_from_page() -> Option<String> {
    let search = web_sys::window()?.location().search().ok()?;
    web_sys::UrlSearchParams::new_with_str(&search)
        .ok()?
        .get("model")
}

#[component]
pub fn ModelPanel() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let address = RwSignal::new(address_from_page().unwrap_or_default());
    // Another VAE for the model (empty: the model's own).
    let vae = RwSignal::new(String::new());
    let busy = move || {
        matches!(
            ctx.model.get(),
            ModelState::Acquiring { .. } | ModelState::Loading { .. }
        )
    };
    let start = move || {
        let a = address.get_untracked();
        let preset = PRESETS.iter().find(|p| p.address == a.trim());
        clear_failure(ctx);
        // Said before any download: a preset whose weights this GPU cannot hold.
        if let Some((false, why)) = preset.and_then(|p| preset_fit(ctx, p)) {
            ctx.model_error
                .set(Some(UiError::new(ErrorKind::OutOfMemory, why)));
            return;
        }
        let fp16 = preset.is_some_and(|p| p.fp16);
        let vae = vae.get_untracked();
        spawn_local(acquire(
            ctx,
            Pick::Address {
                address: a,
                fp16,
                vae,
            },
        ));
    };
    let files = move |f: Vec<web_sys::File>| {
        if !f.is_empty() {
            clear_failure(ctx);
            spawn_local(acquire(ctx, Pick::Files(f)));
        }
    };
    view! {
        <section class="panel" id="model" data-testid="model-panel">
            <h2><span class="num">"1"</span>" Choose a model"</h2>
            <p class="explain">
                "Stable Diffusion 1.x, 2.x or XL, as a diffusers folder or one .safetensors file. "
                "It is downloaded once into this browser's storage and reused on every visit."
            </p>
            <div class="presets">
                {PRESETS
                    .iter()
                    .map(|p| {
                        view! {
                            <button
                                class="preset"
                                data-testid="model-preset"
                                on:click=move |_| {
                                    address.set(p.address.to_string());
                                    vae.set(String::new());
                                }
                                title=p.note
                            >
                                <strong>{p.name}</strong>
                                <small>{p.note}</small>
                                {move || preset_fit(ctx, p).map(|(loads, text)| view! {
                                    <small
                                        class=if loads { "fit" } else { "fit error" }
                                        data-testid="preset-fit"
                                    >
                                        {text}
                                    </small>
                                })}
                            </button>
                        }
                    })
                    .collect_view()}
            </div>
            <form class="row" on:submit=move |ev| {
                ev.prevent_default();
                start();
            }>
                <label class="grow">
                    <span>"Model address"</span>
                    <input
                        type="text"
                        data-testid="model-url"
                        placeholder="owner/name on Hugging Face, or a URL"
                        spellcheck="false"
                        prop:value=move || address.get()
                        on:input=move |ev| address.set(event_target_value(&ev))
                    />
                </label>
                <button type="submit" class="primary" data-testid="model-load" disabled=busy>
                    "Load"
                </button>
            </form>
            <details class="advanced" open=move || !vae.get().is_empty()>
                <summary>"Another VAE"</summary>
                <label>
                    <span>
                        "The address of a diffusers VAE (config.json and diffusion_pytorch_model.safetensors) "
                        "to use in place of the model's; empty for the model's own."
                    </span>
                    <input
                        type="text"
                        data-testid="model-vae"
                        placeholder="owner/name on Hugging Face, or a URL"
                        spellcheck="false"
                        prop:value=move || vae.get()
                        on:input=move |ev| vae.set(event_target_value(&ev))
                    />
                </label>
                {move || {
                    let a = address.get();
                    PRESETS
                        .iter()
                        .find(|p| p.address == a.trim())
                        .and_then(|p| p.vae)
                        .map(|suggested| view! {
                            <button type="button" data-testid="model-vae-suggested" on:click=move |_| vae.set(suggested.to_string())>
                                {format!("Use {suggested}")}
                            </button>
                            <small class="muted">
                                " SDXL's own VAE overflows in f16 and decodes in f32; this one decodes in f16, with less memory."
                            </small>
                        })
                }}
            </details>
            <div
                class="drop"
                on:dragover=|ev: web_sys::DragEvent| ev.prevent_default()
                on:drop=move |ev: web_sys::DragEvent| files(dropped_files(&ev))
            >
                "Or use your own: drop a .safetensors file here, "
                <label class="link">
                    "pick a file"
                    <input
                        type="file"
                        class="hidden"
                        data-testid="model-files"
                        accept=".safetensors,.json,.txt"
                        multiple
                        on:change=move |ev| files(input_files(&ev))
                    />
                </label>
                " or "
                <label class="link">
                    "pick a diffusers folder"
                    <input
                        type="file"
                        class="hidden"
                        data-testid="model-folder"
                        prop:webkitdirectory=true
                        on:change=move |ev| files(input_files(&ev))
                    />
                </label>
                ". Files are copied into this browser's storage, not uploaded."
            </div>
            {move || model_status(ctx)}
            {move || ctx.model_error.get().map(|error| view! { <ErrorBox error testid="model-error" /> })}
            <super::clip::PromptFidelityPanel />
            <CachedModels />
        </section>
    }
}

fn model_status(ctx: Ctx) -> AnyView {
    match ctx.model.get() {
        ModelState::Empty => view! { <p class="muted">"No model loaded yet."</p> }.into_any(),
        ModelState::Acquiring {
            phase,
            name,
            file,
            bytes: b,
            file_bytes,
            file_total,
            speed,
            cancel,
        } => {
            let left = file_total
                .map(|t| duration(t.saturating_sub(file_bytes) as f64 / speed.max(1.0)))
                .unwrap_or_else(|| "…".into());
            view! {
                <div class="progress-box">
                    <p>
                        {match phase {
                            "download" => "Downloading ",
                            "wait" => "Waiting for another SeFi Studio tab to finish storing a model, then getting ",
                            _ => "Copying ",
                        }}
                        <strong>{name}</strong>
                    </p>
                    <progress
                        data-testid="model-progress"
                        data-phase=phase
                        data-bytes=b
                        data-total=file_total.unwrap_or(0)
                        max=file_total.unwrap_or(0).max(1) as f64
                        value=file_bytes as f64
                    ></progress>
                    <p class="muted">
                        {format!(
                            "{file}: {} of {} · {}/s · {left} left for this file · {} in all",
                            bytes(file_bytes as f64),
                            file_total.map(|t| bytes(t as f64)).unwrap_or_else(|| "?".into()),
                            bytes(speed),
                            bytes(b as f64),
                        )}
                    </p>
                    <button on:click=move |_| cancel.set(true)>"Stop"</button>
                    <span class="muted">" What is stored so far is kept: loading again resumes."</span>
                </div>
            }
                .into_any()
        }
        ModelState::Loading {
            name, done, total, ..
        } => view! {
            <div class="progress-box">
                <p>"Moving " <strong>{name}</strong> " to the GPU, tensor by tensor…"</p>
                <progress
                    data-testid="model-progress"
                    data-phase="load"
                    data-bytes=done
                    data-total=total
                    max=total.max(1) as f64
                    value=done as f64
                ></progress>
                <p class="muted">
                    {if total == 0 {
                        "Reading the model's layout…".to_string()
                    } else {
                        format!("{done} of {total} tensors")
                    }}
                </p>
            </div>
        }
        .into_any(),
        ModelState::Ready(info) => view! {
            <div class="status ok" data-testid="model-ready" data-model-id=info.id.clone()>
                <strong>{info.name.clone()}</strong>
                {format!(
                    " is ready: {}, {:.0} M parameters in {} on the GPU, {} px native (loaded in {:.1} s).",
                    info.family,
                    info.params as f64 / 1e6,
                    info.dtype,
                    info.resolution,
                    info.millis / 1e3
                )}
            </div>
        }
        .into_any(),
        // One error box at a time: a failed download's explanation wins.
        ModelState::Failed(_) if ctx.model_error.with(Option::is_some) => ().into_any(),
        ModelState::Failed(error) => view! { <ErrorBox error testid="model-error" /> }.into_any(),
    }
}

#[component]
fn CachedModels() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let delete = move |id: String| {
        spawn_local(async move {
            match lock::try_lock(lock::MODELS).await {
                Ok(Some(_held)) => {
                    if let Ok(s) = store().await {
                        let _ = s.remove(&format!("models/{id}")).await;
                    }
                }
                _ => ctx.model_error.set(Some(UiError::new(
                    ErrorKind::Busy,
                    "A model is being downloaded or copied (in this tab or another SeFi Studio tab): delete this one once that is done.",
                ))),
            }
            // A model on the GPU stays usable until another one is loaded.
            refresh_cache(ctx).await;
        });
    };
    view! {
        <details class="cache" open=move || !ctx.cached.with(Vec::is_empty)>
            <summary>"Stored models"</summary>
            <ul class="cached">
                <For
                    each=move || ctx.cached.get()
                    key=|m| (m.id.clone(), m.complete, m.bytes())
                    children=move |m: Manifest| {
                        let id = m.id.clone();
                        let load = m.clone();
                        let clip = m.kind == ModelKind::Clip;
                        let resume = m.address.clone();
                        let fp16 = m.fp16;
                        let resume_vae = m.vae.clone().unwrap_or_default();
                        view! {
                            <li
                                data-testid="cached-model"
                                data-id=m.id.clone()
                                data-complete=m.complete.to_string()
                            >
                                <span class="name">{m.name.clone()}</span>
                                {clip.then(|| view! { <span class="badge">"CLIP"</span> })}
                                <span class="muted">
                                    {format!(
                                        " {}{}",
                                        bytes(m.bytes() as f64),
                                        if m.complete { "" } else { ", unfinished" },
                                    )}
                                </span>
                                {if m.complete {
                                    let this = m.id.clone();
                                    let in_use = move || match clip {
                                        true => ctx.clip.with(|c| {
                                            matches!(c, ClipState::Ready(info) if info.id == this)
                                        }),
                                        false => {
                                            ctx.model_id.get().as_deref() == Some(this.as_str())
                                                && matches!(ctx.model.get(), ModelState::Ready(_))
                                        }
                                    };
                                    view! {
                                        <Show
                                            when=in_use
                                            fallback=move || {
                                                let load = load.clone();
                                                view! {
                                                    <button on:click=move |_| match clip {
                                                        true => super::clip::load_stored(ctx, &load),
                                                        false => load_stored(ctx, &load),
                                                    }>"Load"</button>
                                                }
                                            }
                                        >
                                            <span class="badge">"on the GPU"</span>
                                        </Show>
                                    }
                                        .into_any()
                                } else if !resume.starts_with("local:") {
                                    view! {
                                        <button on:click=move |_| match clip {
                                            true => super::clip::resume(ctx, resume.clone()),
                                            false => spawn_local(
                                                acquire(
                                                    ctx,
                                                    Pick::Address {
                                                        address: resume.clone(),
                                                        fp16,
                                                        vae: resume_vae.clone(),
                                                    },
                                                ),
                                            ),
                                        }>"Resume download"</button>
                                    }
                                        .into_any()
                                } else {
                                    ().into_any()
                                }}
                                <button
                                    class="danger"
                                    data-testid="cached-model-delete"
                                    on:click=move |_| delete(id.clone())
                                >
                                    "Delete"
                                </button>
                            </li>
                        }
                    }
                />
            </ul>
            <p class="muted" data-testid="storage-quota">
                {move || match ctx.quota.get() {
                    Some((used, quota)) => format!(
                        "This site uses {} of the {} your browser allows it.",
                        bytes(used),
                        bytes(quota)
                    ),
                    None => "The browser does not tell how much storage is left.".into(),
                }}
            </p>
        </details>
    }
}
