//! The identity panel: photos and their square crops, the settings, training with live loss
//! and attention heat-maps, pause/continue/cancel with checkpoints in storage, and the list of
//! learned identities.

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{HtmlImageElement, ImageEncodeOptions, OffscreenCanvas};

use super::widgets::{
    ErrorBox, LossChart, NumberField, UiError, blob_url, blob_url_of, dropped_files, duration,
    input_files, revoke,
};
use super::{Ctx, ModelState, store};
use crate::app::protocol::{Request, Response, TrainJob};
use crate::clip::tokenizer::{PLACEHOLDER_NAME_RULE, is_placeholder_name};
use crate::identity::Identity;
use crate::identity::settings::{DEFAULT_CLASS_WORD, TrainConfig};
use crate::store::Store;

const RUN: &str = "runs/current";
/// Checkpoints every this many steps (and every 20 s, and when paused).
const CHECKPOINT_EVERY: usize = 10;
const MAPS_EVERY: usize = 10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Idle,
    Running,
    Stopping,
    Paused,
    Done,
    Failed,
}

/// A run in storage: `runs/current/run.json`, beside its photos and checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub config: TrainConfig,
    pub model_id: String,
    pub model_name: String,
    pub photos: usize,
    /// Steps in the stored checkpoint.
    pub step: usize,
}

/// What the training part of the panel shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainView {
    pub phase: Phase,
    pub token: String,
    pub step: usize,
    pub total: usize,
    /// (step, loss, attention term)
    pub points: Vec<(usize, f64, f64)>,
    pub steps_per_second: f64,
    /// The step of the last checkpoint in storage.
    pub checkpoint_step: Option<usize>,
    /// Heat-maps (identity, class word) as blob URLs, and the step they are from.
    pub maps: Option<(String, String, usize)>,
    /// The first training square, under the heat-maps.
    pub underlay: Option<String>,
    pub error: Option<UiError>,
    /// An unfinished run found in storage.
    pub offer: Option<RunRecord>,
}

/// A learned identity in storage.
#[derive(Clone, Debug, PartialEq)]
pub struct IdentityEntry {
    pub token: String,
    pub class_word: String,
    pub family: String,
    pub steps: u64,
    /// Blob URL of the file, for export.
    pub url: String,
}

fn identity_path(token: &str) -> String {
    format!("identities/{token}.safetensors")
}

/// Reads `identities/` into the list.
pub async fn load_list(ctx: Ctx) {
    let Ok(s) = store().await else { return };
    let mut list = Vec::new();
    for name in s.list("identities").await.unwrap_or_default() {
        let path = format!("identities/{name}");
        let Ok(file) = s.file(&path).await else {
            continue;
        };
        let Ok(bytes) = crate::store::read_blob(&path, &file).await else {
            continue;
        };
        if let Ok(id) = Identity::from_bytes(&name, bytes).await {
            list.push(IdentityEntry {
                steps: id.training["steps_done"].as_u64().unwrap_or(0),
                token: id.token,
                class_word: id.class_word,
                family: id.family.to_string(),
                url: blob_url_of(&file),
            });
        }
    }
    ctx.identities
        .update(|old| old.iter().for_each(|e| revoke(&e.url)));
    ctx.identities.set(list);
}

/// An identity file's bytes, by token.
pub async fn identity_bytes(token: &str) -> Option<Vec<u8>> {
    store().await.ok()?.read(&identity_path(token)).await.ok()
}

pub async fn look_for_unfinished_run(ctx: Ctx) {
    let Ok(s) = store().await else { return };
    let Ok(Some(text)) = s.read_text(&format!("{RUN}/run.json")).await else {
        return;
    };
    if let Ok(record) = serde_json::from_str::<RunRecord>(&text) {
        ctx.train.update(|t| {
            if t.phase == Phase::Idle {
                t.offer = Some(record);
            }
        });
    }
}

async fn write_record(s: &Store, r: &RunRecord) -> Result<(), UiError> {
    let text = serde_json::to_string(r).expect("plain data");
    s.write(&format!("{RUN}/run.json"), text.as_bytes())
        .await
        .map_err(UiError::from)
}

pub fn on_crash(ctx: Ctx, error: UiError) {
    ctx.train.update(|t| {
        if matches!(t.phase, Phase::Running | Phase::Stopping) {
            t.phase = Phase::Failed;
            t.error = Some(error);
        }
    });
    spawn_local(look_for_unfinished_run(ctx));
}

pub fn on_response(ctx: Ctx, response: Response) {
    match response {
        Response::TrainStep(r) => ctx.train.update(|t| {
            t.step = r.step;
            t.total = r.total;
            t.points.push((r.step, r.loss, r.attn_loss));
            // Smoothed, so that one slow step (a checkpoint, the heat-maps) does not jump.
            t.steps_per_second = if t.steps_per_second == 0.0 {
                r.steps_per_second
            } else {
                0.8 * t.steps_per_second + 0.2 * r.steps_per_second
            };
        }),
        Response::TrainMaps {
            step,
            identity,
            class,
        } => ctx.train.update(|t| {
            if let Some((a, b, _)) = t.maps.take() {
                revoke(&a);
                revoke(&b);
            }
            t.maps = Some((
                blob_url(&identity, "image/png"),
                blob_url(&class, "image/png"),
                step,
            ));
        }),
        Response::TrainCheckpoint { step, bytes } => {
            spawn_local(async move {
                match save_checkpoint(step, &bytes).await {
                    Ok(()) => ctx.train.update(|t| t.checkpoint_step = Some(step)),
                    Err(e) => ctx.train.update(|t| t.error = Some(e)),
                }
            });
        }
        Response::TrainStopped { step, checkpoint } => spawn_local(async move {
            let result = match checkpoint {
                Some(bytes) => save_checkpoint(step, &bytes).await,
                None => match store().await {
                    Ok(s) => s.remove(RUN).await.map_err(UiError::from),
                    Err(e) => Err(e),
                },
            };
            ctx.train.update(|t| {
                t.phase = if t.phase == Phase::Stopping && step < t.total {
                    Phase::Paused
                } else {
                    Phase::Idle
                };
                if let Err(e) = result {
                    t.error = Some(e);
                }
            });
            look_for_unfinished_run(ctx).await;
        }),
        Response::TrainDone { identity } => spawn_local(async move {
            let token = ctx.train.with_untracked(|t| t.token.clone());
            let result = async {
                let s = store().await?;
                s.write(&identity_path(&token), &identity).await?;
                s.remove(RUN).await?;
                Ok::<_, UiError>(())
            }
            .await;
            ctx.train.update(|t| {
                t.phase = Phase::Done;
                t.offer = None;
                if let Err(e) = result {
                    t.error = Some(e);
                }
            });
            load_list(ctx).await;
        }),
        Response::TrainFailed(e) => ctx.train.update(|t| {
            t.phase = Phase::Failed;
            t.error = Some(e.into());
        }),
        _ => {}
    }
}

async fn save_checkpoint(step: usize, bytes: &[u8]) -> Result<(), UiError> {
    let s = store().await?;
    s.write(&format!("{RUN}/checkpoint.safetensors"), bytes)
        .await?;
    let text = s
        .read_text(&format!("{RUN}/run.json"))
        .await?
        .unwrap_or_default();
    if let Ok(mut r) = serde_json::from_str::<RunRecord>(&text) {
        r.step = step;
        write_record(&s, &r).await?;
    }
    Ok(())
}

/// A photo the user added, with the square they chose (in the photo's pixels).
#[derive(Clone, Debug, PartialEq)]
struct PhotoEntry {
    key: u32,
    name: String,
    url: String,
    width: u32,
    height: u32,
    crop: (u32, u32, u32),
}

async fn decoded(url: &str) -> Option<HtmlImageElement> {
    let img = HtmlImageElement::new().ok()?;
    img.set_src(url);
    JsFuture::from(img.decode()).await.ok()?;
    Some(img)
}

/// The chosen square as a PNG, at most 1024 px (the worker resizes it to the training size).
async fn crop_png(p: &PhotoEntry) -> Result<Vec<u8>, UiError> {
    let fail = |m: &str| UiError::new("bad-photo", format!("{}: {m}", p.name));
    let img = decoded(&p.url)
        .await
        .ok_or_else(|| fail("it can no longer be read"))?;
    let (x, y, s) = p.crop;
    let side = s.min(1024);
    let canvas = OffscreenCanvas::new(side, side).map_err(|_| fail("no canvas"))?;
    let c2d: web_sys::OffscreenCanvasRenderingContext2d = canvas
        .get_context("2d")
        .ok()
        .flatten()
        .and_then(|c| c.dyn_into().ok())
        .ok_or_else(|| fail("no 2D canvas"))?;
    c2d.draw_image_with_html_image_element_and_sw_and_sh_and_dx_and_dy_and_dw_and_dh(
        &img,
        x as f64,
        y as f64,
        s as f64,
        s as f64,
        0.0,
        0.0,
        side as f64,
        side as f64,
    )
    .map_err(|_| fail("cannot draw it"))?;
    let opts = ImageEncodeOptions::new();
    opts.set_type("image/png");
    let promise = canvas
        .convert_to_blob_with_options(&opts)
        .map_err(|_| fail("cannot encode it"))?;
    let blob: web_sys::Blob = JsFuture::from(promise)
        .await
        .map_err(|_| fail("cannot encode it"))?
        .unchecked_into();
    crate::store::read_blob(&p.name, &blob)
        .await
        .map_err(UiError::from)
}

#[component]
pub fn IdentityPanel() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let photos = RwSignal::new(Vec::<PhotoEntry>::new());
    let photo_error = RwSignal::new(None::<UiError>);
    let name = RwSignal::new(String::new());
    // The library's defaults (`TrainConfig::new`); the resolution 0 means the model's own.
    let defaults = TrainConfig::new("", DEFAULT_CLASS_WORD, 0);
    let class_word = RwSignal::new(defaults.class_word);
    let steps = RwSignal::new(defaults.steps);
    let lr = RwSignal::new(defaults.lr);
    let attn = RwSignal::new(defaults.attn_weight);
    let resolution = RwSignal::new(0usize);
    let seed = RwSignal::new(0u64);
    let next_key = StoredValue::new(0u32);

    let add = move |files: Vec<web_sys::File>| {
        for file in files {
            spawn_local(async move {
                let url = blob_url_of(&file);
                match decoded(&url).await {
                    Some(img) if img.natural_width() > 0 => {
                        let (w, h) = (img.natural_width(), img.natural_height());
                        let s = w.min(h);
                        let key = next_key.get_value();
                        next_key.set_value(key + 1);
                        photo_error.set(None);
                        photos.update(|p| {
                            p.push(PhotoEntry {
                                key,
                                name: file.name(),
                                url,
                                width: w,
                                height: h,
                                crop: ((w - s) / 2, (h - s) / 2, s),
                            })
                        });
                    }
                    _ => {
                        revoke(&url);
                        photo_error.set(Some(UiError::new(
                            "bad-photo",
                            format!(
                                "{} could not be read as an image. Use a JPEG, PNG or WebP photo.",
                                file.name()
                            ),
                        )));
                    }
                }
            });
        }
    };

    let model_ready = move || matches!(ctx.model.get(), ModelState::Ready(_));
    let running = move || {
        matches!(
            ctx.train.with(|t| t.phase),
            Phase::Running | Phase::Stopping
        )
    };
    let can_start = move || {
        model_ready()
            && !photos.with(Vec::is_empty)
            && is_placeholder_name(&name.get())
            && !running()
    };

    let start = move |_| {
        let Some((model_id, model_name, native)) = (match ctx.model.get_untracked() {
            ModelState::Ready(i) => Some((i.id.clone(), i.name.clone(), i.resolution)),
            _ => None,
        }) else {
            return;
        };
        let token = name.get_untracked().trim().to_string();
        if ctx
            .identities
            .with_untracked(|l| l.iter().any(|e| e.token == token))
        {
            ctx.train.update(|t| {
                t.error = Some(UiError::new(
                    "exists",
                    format!("An identity named <{token}> exists already: pick another name, or delete or rename it below."),
                ))
            });
            return;
        }
        let mut config = TrainConfig::new(
            &token,
            class_word.get_untracked().trim(),
            if resolution.get_untracked() == 0 {
                native
            } else {
                resolution.get_untracked()
            },
        );
        config.steps = steps.get_untracked().max(1);
        config.lr = lr.get_untracked();
        config.attn_weight = attn.get_untracked();
        config.seed = seed.get_untracked();
        let entries = photos.get_untracked();
        spawn_local(async move {
            let result = async {
                let mut pngs = Vec::new();
                for p in &entries {
                    pngs.push(crop_png(p).await?);
                }
                let s = store().await?;
                s.remove(RUN).await?;
                for (i, png) in pngs.iter().enumerate() {
                    s.write(&format!("{RUN}/photo-{i}.png"), png).await?;
                }
                let record = RunRecord {
                    config: config.clone(),
                    model_id,
                    model_name,
                    photos: pngs.len(),
                    step: 0,
                };
                write_record(&s, &record).await?;
                Ok::<_, UiError>(pngs)
            }
            .await;
            match result {
                Ok(pngs) => run(ctx, config, pngs, None, 0),
                Err(e) => ctx.train.update(|t| t.error = Some(e)),
            }
        });
    };

    view! {
        <section class="panel" id="identity" data-testid="identity-panel">
            <h2><span class="num">"2"</span>" Learn an identity"</h2>
            <p class="explain">
                "Add one or more photos of the same person (or pet, or thing), choose the square to learn from, "
                "and give it a name. Training runs on your GPU; the photos stay in this browser."
            </p>
            <ResumeOffer />
            <div
                class="drop photos"
                on:dragover=|ev: web_sys::DragEvent| ev.prevent_default()
                on:drop=move |ev: web_sys::DragEvent| add(dropped_files(&ev))
            >
                <label class="button">
                    "Add photos"
                    <input
                        type="file"
                        class="hidden"
                        accept="image/*"
                        multiple
                        data-testid="photo-input"
                        on:change=move |ev| add(input_files(&ev))
                    />
                </label>
                <span class="muted">" or drop them here. Click a photo to move its square."</span>
                <div class="photo-grid">
                    <For
                        each=move || photos.get()
                        key=|p| p.key
                        children=move |p: PhotoEntry| view! { <PhotoCrop key=p.key photos /> }
                    />
                </div>
            </div>
            {move || photo_error.get().map(|error| view! { <ErrorBox error testid="photo-error" /> })}
            <div class="form-grid">
                <label>
                    <span>"Name (use it in prompts as <name>)"</span>
                    <input
                        type="text"
                        data-testid="identity-name"
                        placeholder="alice"
                        spellcheck="false"
                        prop:value=move || name.get()
                        on:input=move |ev| name.set(event_target_value(&ev))
                    />
                    {move || {
                        let n = name.get();
                        (!n.is_empty() && !is_placeholder_name(&n))
                            .then(|| view! { <small class="bad">{format!("Use {PLACEHOLDER_NAME_RULE}.")}</small> })
                    }}
                </label>
                <label>
                    <span>"What it is (class word)"</span>
                    <input
                        type="text"
                        data-testid="class-word"
                        list="class-words"
                        prop:value=move || class_word.get()
                        on:input=move |ev| class_word.set(event_target_value(&ev))
                    />
                    <datalist id="class-words">
                        {["person", "man", "woman", "child", "dog", "cat", "car", "toy", "bag"]
                            .map(|w| view! { <option value=w></option> })
                            .collect_view()}
                    </datalist>
                </label>
                <NumberField label="Steps" testid="train-steps" value=steps min="1" step="1" />
            </div>
            <details class="advanced">
                <summary>"Advanced settings"</summary>
                <div class="form-grid">
                    <NumberField label="Learning rate" testid="train-lr" value=lr step="0.0005" />
                    <NumberField label="Attention loss weight" testid="train-attn-weight" value=attn step="0.001" />
                    <NumberField label="Resolution (px, 0: the model's own)" testid="train-resolution" value=resolution step="64" />
                    <NumberField label="Seed" testid="train-seed" value=seed step="1" />
                </div>
            </details>
            <div class="row">
                <button
                    class="primary"
                    data-testid="train-start"
                    disabled=move || !can_start()
                    on:click=start
                >
                    "Start training"
                </button>
                {move || (!model_ready()).then(|| view! { <span class="muted">" Load a model first."</span> })}
            </div>
            <TrainProgress />
            <IdentityList />
        </section>
    }
}

/// One photo with its square: a click centres the square there, the slider sizes it.
#[component]
fn PhotoCrop(key: u32, photos: RwSignal<Vec<PhotoEntry>>) -> impl IntoView {
    let entry = move || photos.with(|p| p.iter().find(|e| e.key == key).cloned());
    let Some(first) = entry() else {
        return ().into_any();
    };
    let (w, h) = (first.width, first.height);
    let set_crop = move |f: &dyn Fn((u32, u32, u32)) -> (u32, u32, u32)| {
        photos.update(|p| {
            if let Some(e) = p.iter_mut().find(|e| e.key == key) {
                let (x, y, s) = f(e.crop);
                let s = s.clamp(8, w.min(h));
                e.crop = (x.min(w - s), y.min(h - s), s);
            }
        })
    };
    let pct = move |v: u32, of: u32| format!("{:.3}%", v as f64 / of as f64 * 100.0);
    // Set through the CSSOM (style:...), which the CSP allows, not as a style attribute.
    let crop = move || entry().map(|e| e.crop).unwrap_or((0, 0, 0));
    let click = move |ev: web_sys::MouseEvent| {
        let Some(target) = ev
            .current_target()
            .and_then(|t| t.dyn_into::<web_sys::Element>().ok())
        else {
            return;
        };
        let rect = target.get_bounding_client_rect();
        let fx = (ev.client_x() as f64 - rect.left()) / rect.width().max(1.0);
        let fy = (ev.client_y() as f64 - rect.top()) / rect.height().max(1.0);
        set_crop(&|(_, _, s)| {
            let cx = (fx * w as f64) as i64 - s as i64 / 2;
            let cy = (fy * h as f64) as i64 - s as i64 / 2;
            (cx.max(0) as u32, cy.max(0) as u32, s)
        });
    };
    let remove = move |_| {
        photos.update(|p| {
            if let Some(i) = p.iter().position(|e| e.key == key) {
                revoke(&p[i].url);
                p.remove(i);
            }
        })
    };
    view! {
        <figure class="photo" data-testid="photo-crop">
            <div class="crop-area" on:click=click>
                <img src=first.url.clone() alt=first.name.clone() draggable="false" />
                <div
                    class="crop-square"
                    style:left=move || pct(crop().0, w)
                    style:top=move || pct(crop().1, h)
                    style:width=move || pct(crop().2, w)
                    style:height=move || pct(crop().2, h)
                ></div>
            </div>
            <figcaption>
                <input
                    type="range"
                    min="8"
                    max=w.min(h)
                    aria-label="Square size"
                    prop:value=move || entry().map(|e| e.crop.2).unwrap_or(0).to_string()
                    on:input=move |ev| {
                        if let Ok(s) = event_target_value(&ev).parse::<u32>() {
                            set_crop(&|(x, y, old)| {
                                let grow = (s as i64 - old as i64) / 2;
                                (
                                    (x as i64 - grow).max(0) as u32,
                                    (y as i64 - grow).max(0) as u32,
                                    s,
                                )
                            })
                        }
                    }
                />
                <button class="link" on:click=remove aria-label="Remove photo">"Remove"</button>
            </figcaption>
        </figure>
    }
    .into_any()
}

/// Sends a run to the worker.
fn run(ctx: Ctx, config: TrainConfig, photos: Vec<Vec<u8>>, resume: Option<Vec<u8>>, start: usize) {
    ctx.train.update(|t| {
        if let Some(u) = t.underlay.take() {
            revoke(&u);
        }
        *t = TrainView {
            phase: Phase::Running,
            token: config.token.clone(),
            total: config.steps,
            step: start,
            checkpoint_step: (start > 0).then_some(start),
            underlay: photos.first().map(|p| blob_url(p, "image/png")),
            maps: t.maps.take(),
            ..TrainView::default()
        };
    });
    ctx.send(Request::Train(TrainJob {
        config,
        photos: photos.into_iter().map(ByteBuf::from).collect(),
        resume: resume.map(ByteBuf::from),
        checkpoint_every: CHECKPOINT_EVERY,
        maps_every: MAPS_EVERY,
    }));
}

/// Continues the stored run from its checkpoint.
async fn continue_run(ctx: Ctx) -> Result<(), UiError> {
    let s = store().await?;
    let text = s
        .read_text(&format!("{RUN}/run.json"))
        .await?
        .ok_or_else(|| UiError::new("storage", "the stored run is gone"))?;
    let record: RunRecord = serde_json::from_str(&text)
        .map_err(|e| UiError::new("storage", format!("the stored run is damaged: {e}")))?;
    match ctx.model.get_untracked() {
        ModelState::Ready(i) if i.id == record.model_id => {}
        _ => {
            return Err(UiError::new(
                "no-model",
                format!(
                    "This run was started on {}: load that model (step 1) to continue it.",
                    record.model_name
                ),
            ));
        }
    }
    let mut photos = Vec::new();
    for i in 0..record.photos {
        photos.push(s.read(&format!("{RUN}/photo-{i}.png")).await?);
    }
    let checkpoint = s.read(&format!("{RUN}/checkpoint.safetensors")).await.ok();
    ctx.train.update(|t| t.offer = None);
    let start = if checkpoint.is_some() { record.step } else { 0 };
    run(ctx, record.config, photos, checkpoint, start);
    Ok(())
}

#[component]
fn ResumeOffer() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let error = RwSignal::new(None::<UiError>);
    let cont = move |_| {
        spawn_local(async move {
            error.set(continue_run(ctx).await.err());
        })
    };
    let discard = move |_| {
        spawn_local(async move {
            if let Ok(s) = store().await {
                let _ = s.remove(RUN).await;
            }
            ctx.train.update(|t| {
                t.offer = None;
                t.phase = Phase::Idle;
            });
        })
    };
    move || {
        let offer = ctx.train.with(|t| {
            (t.phase != Phase::Running && t.phase != Phase::Stopping)
                .then(|| t.offer.clone())
                .flatten()
        })?;
        Some(view! {
            <div class="offer" data-testid="train-resume-offer" data-step=offer.step>
                <p>
                    "Training of "
                    <strong>{format!("<{}>", offer.config.token)}</strong>
                    {format!(
                        " stopped at step {} of {} (on {}). Continue where it stopped?",
                        offer.step,
                        offer.config.steps,
                        offer.model_name
                    )}
                </p>
                <button class="primary" data-testid="train-continue" on:click=cont>"Continue"</button>
                <button data-testid="train-discard" on:click=discard>"Discard"</button>
                {move || error.get().map(|error| view! { <ErrorBox error testid="train-error" /> })}
            </div>
        })
    }
}

#[component]
fn TrainProgress() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let t = ctx.train;
    let visible = move || t.with(|t| t.phase != Phase::Idle || !t.points.is_empty());
    let points = Signal::derive(move || t.with(|t| t.points.clone()));
    let total = Signal::derive(move || t.with(|t| t.total));
    let pause = move |_| {
        t.update(|t| t.phase = Phase::Stopping);
        ctx.send(Request::StopTraining { cancel: false });
    };
    let resume = move |_| {
        spawn_local(async move {
            if let Err(e) = continue_run(ctx).await {
                t.update(|t| t.error = Some(e));
            }
        })
    };
    let cancel = move |_| {
        if t.with_untracked(|t| t.phase) == Phase::Running {
            t.update(|t| t.phase = Phase::Idle);
            ctx.send(Request::StopTraining { cancel: true });
        } else {
            spawn_local(async move {
                if let Ok(s) = store().await {
                    let _ = s.remove(RUN).await;
                }
                t.update(|t| {
                    t.phase = Phase::Idle;
                    t.offer = None;
                });
            });
        }
    };
    view! {
        {move || t.with(|t| t.error.clone()).map(|error| view! { <ErrorBox error testid="train-error" /> })}
        <Show when=visible>
            <div class="training">
                <div class="row">
                    <progress
                        class="grow"
                        data-testid="train-progress"
                        data-step=move || t.with(|t| t.step)
                        data-checkpoint=move || t.with(|t| t.checkpoint_step.map(|s| s.to_string()))
                        max=move || t.with(|t| t.total.max(1))
                        value=move || t.with(|t| t.step)
                    ></progress>
                    <span class="muted" data-testid="train-steps-per-second">
                        {move || t.with(|t| {
                            let left = (t.total - t.step.min(t.total)) as f64 / t.steps_per_second.max(1e-9);
                            format!(
                                "step {} of {} · {:.2} steps/s · {} left",
                                t.step,
                                t.total,
                                t.steps_per_second,
                                if t.phase == Phase::Running { duration(left) } else { "–".into() }
                            )
                        })}
                    </span>
                </div>
                <div class="row">
                    {move || match t.with(|t| t.phase) {
                        Phase::Running => view! {
                            <button data-testid="train-pause" on:click=pause>"Pause"</button>
                            <button class="danger" data-testid="train-cancel" on:click=cancel>"Cancel"</button>
                        }.into_any(),
                        Phase::Stopping => view! { <span class="muted">"Stopping after this step…"</span> }.into_any(),
                        Phase::Paused | Phase::Failed => view! {
                            <button class="primary" data-testid="train-resume" on:click=resume>"Resume"</button>
                            <button class="danger" data-testid="train-cancel" on:click=cancel>"Cancel"</button>
                        }.into_any(),
                        Phase::Done => view! {
                            <span class="status ok">
                                {move || t.with(|t| format!("<{}> is learned: use it in step 3.", t.token))}
                            </span>
                        }.into_any(),
                        Phase::Idle => ().into_any(),
                    }}
                </div>
                <div class="train-views">
                    <LossChart points total />
                    {move || t.with(|t| t.maps.clone().map(|(id_map, class_map, step)| {
                        let token = t.token.clone();
                        let under = t.underlay.clone().unwrap_or_default();
                        view! {
                            <div class="maps" data-testid="attention-map" data-step=step>
                                <figure>
                                    <div class="heat">
                                        <img src=under.clone() alt="" />
                                        <img class="over" src=id_map alt=format!("attention of <{token}>") />
                                    </div>
                                    <figcaption>{format!("<{token}>")}</figcaption>
                                </figure>
                                <figure>
                                    <div class="heat">
                                        <img src=under alt="" />
                                        <img class="over" src=class_map alt="attention of the class word" />
                                    </div>
                                    <figcaption>"class word (the target)"</figcaption>
                                </figure>
                            </div>
                        }
                    }))}
                </div>
            </div>
        </Show>
    }
}

#[component]
fn IdentityList() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let error = RwSignal::new(None::<UiError>);
    let editing = RwSignal::new(None::<(String, String)>);
    let import = move |files: Vec<web_sys::File>| {
        spawn_local(async move {
            for file in files {
                let result = async {
                    let bytes = super::widgets::file_bytes(&file).await?;
                    let id = Identity::from_bytes(&file.name(), bytes.clone())
                        .await
                        .map_err(|e| UiError::new("bad-identity", e.to_string()))?;
                    if ctx
                        .identities
                        .with_untracked(|l| l.iter().any(|e| e.token == id.token))
                    {
                        return Err(UiError::new(
                            "exists",
                            format!("<{}> exists already: rename or delete it first.", id.token),
                        ));
                    }
                    store()
                        .await?
                        .write(&identity_path(&id.token), &bytes)
                        .await?;
                    Ok(())
                }
                .await;
                error.set(result.err());
            }
            load_list(ctx).await;
        })
    };
    let rename = move |old: String, new: String| {
        spawn_local(async move {
            let new = new.trim().to_string();
            let result = async {
                if !is_placeholder_name(&new) {
                    return Err(UiError::new(
                        "bad-identity",
                        format!("Names are {PLACEHOLDER_NAME_RULE}."),
                    ));
                }
                if ctx
                    .identities
                    .with_untracked(|l| l.iter().any(|e| e.token == new))
                {
                    return Err(UiError::new("exists", format!("<{new}> exists already.")));
                }
                let s = store().await?;
                let bytes = s.read(&identity_path(&old)).await?;
                let mut id = Identity::from_bytes(&old, bytes)
                    .await
                    .map_err(|e| UiError::new("bad-identity", e.to_string()))?;
                id.token = new.clone();
                let out = id
                    .to_bytes()
                    .map_err(|e| UiError::new("bad-identity", e.to_string()))?;
                // Written before the old one goes, so a failure loses nothing.
                s.write(&identity_path(&new), &out).await?;
                s.remove(&identity_path(&old)).await?;
                Ok(())
            }
            .await;
            error.set(result.err());
            editing.set(None);
            load_list(ctx).await;
        })
    };
    let delete = move |token: String| {
        let sure = web_sys::window()
            .and_then(|w| {
                w.confirm_with_message(&format!(
                    "Delete <{token}>? Export it first to keep a copy."
                ))
                .ok()
            })
            .unwrap_or(false);
        if sure {
            spawn_local(async move {
                if let Ok(s) = store().await {
                    let _ = s.remove(&identity_path(&token)).await;
                }
                load_list(ctx).await;
            })
        }
    };
    view! {
        <h3>"Your identities"</h3>
        <ul class="identities" data-testid="identity-list">
            <For
                each=move || ctx.identities.get()
                key=|e| (e.token.clone(), e.url.clone())
                children=move |e: IdentityEntry| {
                    let (t1, t2, t3) = (e.token.clone(), e.token.clone(), e.token.clone());
                    view! {
                        <li data-testid="identity-item" data-token=e.token.clone()>
                            {move || match editing.get() {
                                Some((old, draft)) if old == t1 => view! {
                                    <form class="inline" on:submit=move |ev| {
                                        ev.prevent_default();
                                        rename(old.clone(), draft.clone());
                                    }>
                                        <input
                                            type="text"
                                            data-testid="identity-rename-input"
                                            prop:value=editing.get().map(|e| e.1).unwrap_or_default()
                                            on:input=move |ev| editing.update(|e| if let Some(e) = e { e.1 = event_target_value(&ev) })
                                        />
                                        <button type="submit">"Save"</button>
                                    </form>
                                }.into_any(),
                                _ => view! { <strong class="token">{format!("<{t1}>")}</strong> }.into_any(),
                            }}
                            <span class="muted">
                                {format!(" {} · {} · {} steps ", e.class_word, e.family, e.steps)}
                            </span>
                            <a
                                class="button"
                                data-testid="identity-export"
                                href=e.url.clone()
                                download=format!("{}.safetensors", e.token)
                            >
                                "Export"
                            </a>
                            <button
                                data-testid="identity-rename"
                                on:click=move |_| editing.set(Some((t2.clone(), t2.clone())))
                            >
                                "Rename"
                            </button>
                            <button
                                class="danger"
                                data-testid="identity-delete"
                                on:click=move |_| delete(t3.clone())
                            >
                                "Delete"
                            </button>
                        </li>
                    }
                }
            />
        </ul>
        {move || ctx.identities.with(Vec::is_empty).then(|| view! {
            <p class="muted">"None yet. Learned identities are kept in this browser; export them to keep a copy."</p>
        })}
        <label class="link">
            "Import an identity (.safetensors)"
            <input
                type="file"
                class="hidden"
                accept=".safetensors"
                multiple
                data-testid="identity-import"
                on:change=move |ev| import(input_files(&ev))
            />
        </label>
        {move || error.get().map(|error| view! { <ErrorBox error testid="identity-error" /> })}
    }
}
