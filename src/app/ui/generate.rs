//! The generate panel: prompt with identity chips, settings, per-step progress with a live
//! preview, and the gallery kept in storage.

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::widgets::{
    ErrorBox, ErrorKind, NumberField, UiError, blob_url, blob_url_of, input_files, random_seed,
    revoke,
};
use super::{Ctx, ModelState, library, store};
use crate::app::protocol::{GenerateJob, Request, Response};
pub use crate::app::view::GenView;
use crate::clip::tokenizer::placeholders;
use crate::face::FaceScore;
use crate::pipeline::GenerateRequest;
use crate::pipeline::png::{Parameters, read_parameters};
use crate::schedule::Sampler;

/// Bytes read from the start of an image for its settings.
const IMAGE_HEAD: usize = 1 << 20;

/// Square sizes offered, and two portrait/landscape ones.
const SIZES: &[(&str, usize, usize)] = &[
    ("64", 64, 64),
    ("128", 128, 128),
    ("256", 256, 256),
    ("384", 384, 384),
    ("512", 512, 512),
    ("512x768", 512, 768),
    ("768x512", 768, 512),
    ("768", 768, 768),
    ("1024", 1024, 1024),
];

/// What a gallery image was made with: `gallery/<name>.json` beside `gallery/<name>.png`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GalleryMeta {
    pub name: String,
    pub request: GenerateRequest,
    pub seed: u64,
    pub model: String,
    pub parameters: String,
    pub created: f64,
    /// The faces' likeness to the prompt's identities (`None`: not scored; images from before
    /// scores have none).
    #[serde(default)]
    pub faces: Option<Vec<FaceScore>>,
    /// Its prompt fidelity (CLIP-T), where a CLIP model was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_t: Option<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GalleryItem {
    pub meta: GalleryMeta,
    pub url: String,
    /// Not in storage (it was full): only this page has it.
    pub unsaved: bool,
}

pub async fn load_gallery(ctx: Ctx) {
    let Ok(s) = store().await else { return };
    let mut items = Vec::new();
    for name in s.list("gallery").await.unwrap_or_default() {
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let (Ok(Some(text)), Ok(file)) = (
            s.read_text(&format!("gallery/{name}")).await,
            s.file(&format!("gallery/{stem}.png")).await,
        ) else {
            continue;
        };
        if let Ok(meta) = serde_json::from_str::<GalleryMeta>(&text) {
            items.push(GalleryItem {
                meta,
                url: blob_url_of(&file),
                unsaved: false,
            });
        }
    }
    items.sort_by(|a, b| b.meta.created.total_cmp(&a.meta.created));
    ctx.gallery.set(items);
}

pub fn on_crash(ctx: Ctx, error: UiError) {
    ctx.generation.update(|g| g.crashed(error));
}

pub fn on_response(ctx: Ctx, response: Response) {
    match response {
        Response::GenStep {
            step,
            total,
            preview,
        } => ctx.generation.update(|g| {
            let preview = preview.map(|p| blob_url(&p, "image/png"));
            if let Some(old) = g.step_done(step, total, preview) {
                revoke(&old);
            }
        }),
        Response::GenDone { images, warnings } => {
            ctx.generation.update(|g| {
                if let Some(old) = g.done(warnings) {
                    revoke(&old);
                }
            });
            let Some((request, model)) = ctx.generation.with_untracked(|g| g.asked.clone()) else {
                return;
            };
            spawn_local(async move {
                let created = js_sys::Date::now();
                let mut save_error = None;
                let mut fresh = Vec::new();
                for (i, image) in images.into_iter().enumerate() {
                    let name = format!("{created:.0}-{i}");
                    let meta = GalleryMeta {
                        name: name.clone(),
                        request: request.clone(),
                        seed: image.seed,
                        model: model.clone(),
                        parameters: image.parameters,
                        created: created + i as f64,
                        faces: image.faces,
                        clip_t: image.clip_t,
                    };
                    let saved = async {
                        let (s, _held) = library().await?;
                        s.write(&format!("gallery/{name}.png"), &image.png).await?;
                        let text = serde_json::to_string(&meta).expect("plain data");
                        s.write(&format!("gallery/{name}.json"), text.as_bytes())
                            .await?;
                        Ok::<_, UiError>(())
                    }
                    .await;
                    if let Err(e) = &saved {
                        save_error = Some(e.clone());
                    }
                    fresh.push(GalleryItem {
                        meta,
                        url: blob_url(&image.png, "image/png"),
                        unsaved: saved.is_err(),
                    });
                }
                fresh.reverse();
                ctx.gallery.update(|g| {
                    fresh.append(g);
                    *g = fresh;
                });
                if let Some(e) = save_error {
                    ctx.generation.update(|g| g.unsaved(&e));
                }
            });
        }
        Response::GenFailed(e) => ctx.generation.update(|g| {
            if let Some(old) = g.failed(e.into()) {
                revoke(&old);
            }
        }),
        _ => {}
    }
}

/// The generation settings as the form holds them.
#[derive(Clone, Copy)]
struct GenSettings {
    steps: RwSignal<usize>,
    guidance: RwSignal<f64>,
    sampler: RwSignal<Sampler>,
    /// One of [`SIZES`]' names.
    size: RwSignal<String>,
    count: RwSignal<usize>,
}

impl GenSettings {
    fn new() -> Self {
        Self {
            steps: RwSignal::new(25),
            guidance: RwSignal::new(GenerateRequest::default().guidance),
            sampler: RwSignal::new(Sampler::DpmPp2mKarras),
            size: RwSignal::new("512".to_string()),
            count: RwSignal::new(1),
        }
    }

    /// Takes what an image's parameters say into the form (and the prompts and seed), and
    /// returns what could not be taken, one sentence each.
    fn take(&self, ctx: Ctx, p: &Parameters) -> Vec<String> {
        let (width, height) = self.size();
        let mut req = GenerateRequest {
            steps: self.steps.get_untracked(),
            guidance: self.guidance.get_untracked(),
            sampler: self.sampler.get_untracked(),
            seed: ctx.seed.get_untracked(),
            width,
            height,
            ..GenerateRequest::default()
        };
        let mut unused = p.apply(&mut req);
        ctx.prompt.set(req.prompt);
        ctx.negative.set(req.negative_prompt);
        self.steps.set(req.steps);
        self.guidance.set(req.guidance);
        self.sampler.set(req.sampler);
        // The seed field holds what a JavaScript number holds exactly.
        if req.seed < 1 << 53 {
            ctx.seed.set(req.seed);
        } else {
            unused.push(format!("The seed {} is too large for this page.", req.seed));
        }
        match SIZES.iter().find(|s| (s.1, s.2) == (req.width, req.height)) {
            Some(s) => self.size.set(s.0.into()),
            None => unused.push(format!(
                "The size {} × {} is not offered; {width} × {height} is kept.",
                req.width, req.height
            )),
        }
        unused
    }

    /// The chosen size, width by height.
    fn size(&self) -> (usize, usize) {
        let name = self.size.get_untracked();
        SIZES
            .iter()
            .find(|s| s.0 == name)
            .map_or((512, 512), |&(_, w, h)| (w, h))
    }
}

#[component]
pub fn GeneratePanel() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let settings = GenSettings::new();
    let model_ready = move || matches!(ctx.model.get(), ModelState::Ready(_));

    // The model's native size once one is ready, and its family's usual guidance (diffusers'
    // SDXL pipeline defaults to 5.0).
    Effect::new(move |_| {
        if let ModelState::Ready(info) = ctx.model.get() {
            let native = info.resolution.to_string();
            if SIZES.iter().any(|s| s.0 == native) {
                settings.size.set(native);
            }
            settings.guidance.set(info.family.default_guidance());
        }
    });

    // Settings from an image's `parameters` text: ours, or the popular web UIs'.
    let image_error = RwSignal::new(None::<UiError>);
    let image_notes = RwSignal::new(Vec::<String>::new());
    let from_image = move |files: Vec<web_sys::File>| {
        spawn_local(async move {
            let Some(file) = files.into_iter().next() else {
                return;
            };
            let read = async {
                // The text sits before the image data: the file's start holds it.
                let head = file
                    .slice_with_f64_and_f64(0.0, IMAGE_HEAD as f64)
                    .map_err(|_| UiError::new(ErrorKind::BadImage, "the file cannot be read"))?;
                let bytes = crate::store::read_blob(&file.name(), &head)
                    .await
                    .map_err(|e| UiError::new(ErrorKind::Storage, e.to_string()))?;
                read_parameters(&file.name(), &bytes)
                    .map_err(|e| UiError::new(ErrorKind::BadImage, e.to_string()))
            };
            match read.await {
                Ok(text) => {
                    image_error.set(None);
                    image_notes.set(settings.take(ctx, &Parameters::parse(&text)));
                }
                Err(e) => {
                    image_notes.set(Vec::new());
                    image_error.set(Some(e));
                }
            }
        })
    };

    let generate = move |_| {
        let ModelState::Ready(info) = ctx.model.get_untracked() else {
            return;
        };
        let (width, height) = settings.size();
        let request = GenerateRequest {
            prompt: ctx.prompt.get_untracked(),
            negative_prompt: ctx.negative.get_untracked(),
            steps: settings.steps.get_untracked().max(1),
            guidance: settings.guidance.get_untracked(),
            sampler: settings.sampler.get_untracked(),
            seed: ctx.seed.get_untracked(),
            width,
            height,
            num_images: settings.count.get_untracked().clamp(1, 8),
            preview_every: 1,
        };
        ctx.generation.update(|g| {
            if let Some(old) = g.start(request.steps) {
                revoke(&old);
            }
        });
        spawn_local(async move {
            let mut identities = Vec::new();
            for name in placeholders(&request.prompt) {
                if let Some(bytes) = super::identity::identity_bytes(name).await {
                    identities.push(ByteBuf::from(bytes));
                }
            }
            let job = GenerateJob {
                request,
                identities,
                model_name: info.name.clone(),
            };
            let asked = (job.request.clone(), job.model_name.clone());
            ctx.generation.update(|g| g.asked = Some(asked));
            ctx.send(Request::Generate(job));
        });
    };

    view! {
        <section class="panel" id="generate" data-testid="generate-panel">
            <h2><span class="num">"3"</span>" Generate"</h2>
            <PromptBox />
            <GenerateSettings settings />
            <label class="link">
                "Take the settings of an image (PNG)"
                <input
                    type="file"
                    class="hidden"
                    accept="image/png"
                    data-testid="settings-from-image"
                    on:change=move |ev| from_image(input_files(&ev))
                />
            </label>
            {move || image_error.get().map(|error| view! { <ErrorBox error testid="settings-error" /> })}
            {move || {
                image_notes
                    .get()
                    .into_iter()
                    .map(|n| view! { <p class="warning" data-testid="settings-note">{n}</p> })
                    .collect_view()
            }}
            <div class="row">
                <button
                    class="primary"
                    data-testid="generate"
                    disabled=move || !model_ready() || ctx.generation.with(|g| g.running)
                    on:click=generate
                >
                    "Generate"
                </button>
                <Show when=move || ctx.generation.with(|g| g.running)>
                    <button data-testid="gen-cancel" on:click=move |_| ctx.send(Request::CancelGenerate)>
                        "Stop"
                    </button>
                </Show>
                {move || (!model_ready()).then(|| view! { <span class="muted">" Load a model first."</span> })}
            </div>
            <GenProgress />
            <Gallery />
        </section>
    }
}

/// Chips that insert identities at the cursor, the prompt and the negative prompt.
#[component]
fn PromptBox() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let prompt_ref = NodeRef::<leptos::html::Textarea>::new();
    let insert = move |token: String| {
        let text = format!("<{token}>");
        let at = prompt_ref
            .get()
            .and_then(|t| t.selection_start().ok().flatten())
            .map(|i| i as usize);
        ctx.prompt.update(|p| {
            // selectionStart counts UTF-16 units; fall back to the end when they differ.
            let at = at.filter(|&i| i <= p.len() && p.is_char_boundary(i) && p.is_ascii());
            match at {
                Some(i) => p.insert_str(i, &text),
                None => p.push_str(&text),
            }
        });
    };

    view! {
        <div class="chips" aria-label="Your identities">
            <For
                each=move || ctx.identities.get()
                key=|e| e.token.clone()
                children=move |e| {
                    let token = e.token.clone();
                    view! {
                        <button
                            class="chip"
                            data-testid="identity-chip"
                            title=format!("Insert <{}> ({})", e.token, e.class_word)
                            on:click=move |_| insert(token.clone())
                        >
                            {format!("<{}>", e.token)}
                        </button>
                    }
                }
            />
        </div>
        <label class="block">
            <span>"Prompt"</span>
            <textarea
                node_ref=prompt_ref
                data-testid="prompt"
                rows="3"
                placeholder="a photo of <alice> holding a basketball in front of the Eiffel Tower"
                prop:value=move || ctx.prompt.get()
                on:input=move |ev| ctx.prompt.set(event_target_value(&ev))
            ></textarea>
        </label>
        <label class="block">
            <span>"Negative prompt"</span>
            <textarea
                data-testid="negative-prompt"
                rows="2"
                placeholder="blurry, low quality"
                prop:value=move || ctx.negative.get()
                on:input=move |ev| ctx.negative.set(event_target_value(&ev))
            ></textarea>
        </label>
    }
}

/// Steps, guidance, seed, sampler, size and image count.
#[component]
fn GenerateSettings(settings: GenSettings) -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let GenSettings {
        steps,
        guidance,
        sampler,
        size,
        count,
    } = settings;
    view! {
        <div class="form-grid">
            <NumberField label="Steps" testid="gen-steps" value=steps min="1" step="1" max="150" />
            <NumberField label="Guidance" testid="gen-guidance" value=guidance min="1" step="0.5" />
            <label>
                <span>"Seed"</span>
                <span class="with-button">
                    <input
                        type="number"
                        min="0"
                        data-testid="seed"
                        prop:value=move || ctx.seed.get().to_string()
                        on:input=move |ev| {
                            if let Ok(v) = event_target_value(&ev).parse::<u64>() {
                                ctx.seed.set(v.min((1 << 53) - 1))
                            }
                        }
                    />
                    <button
                        data-testid="seed-dice"
                        title="A new random seed"
                        aria-label="A new random seed"
                        on:click=move |_| ctx.seed.set(random_seed())
                    >
                        "Random"
                    </button>
                </span>
            </label>
            <label>
                <span>"Sampler"</span>
                <select
                    data-testid="gen-sampler"
                    on:change=move |ev| {
                        if let Ok(s) = event_target_value(&ev).parse() {
                            sampler.set(s)
                        }
                    }
                >
                    {Sampler::ALL
                        .map(|s| {
                            view! {
                                <option value=s.name() prop:selected=move || sampler.get() == s>
                                    {s.webui_name()}
                                </option>
                            }
                        })
                        .collect_view()}
                </select>
            </label>
            <label>
                <span>"Size"</span>
                <select data-testid="gen-size" on:change=move |ev| size.set(event_target_value(&ev))>
                    {SIZES
                        .iter()
                        .map(|&(value, w, h)| {
                            view! {
                                <option value=value prop:selected=move || size.get() == value>
                                    {format!("{w} × {h}")}
                                </option>
                            }
                        })
                        .collect_view()}
                </select>
            </label>
            <NumberField label="Images" testid="gen-count" value=count min="1" step="1" max="8" />
        </div>
    }
}

/// The generation in progress (with its live preview), its error and warnings.
#[component]
fn GenProgress() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    view! {
        <Show when=move || ctx.generation.with(|g| g.running || g.step > 0)>
            <div class="row">
                <progress
                    class="grow"
                    data-testid="gen-progress"
                    data-step=move || ctx.generation.with(|g| g.step)
                    max=move || ctx.generation.with(|g| g.total.max(1))
                    value=move || ctx.generation.with(|g| g.step)
                ></progress>
                <span class="muted">
                    {move || ctx.generation.with(|g| format!("step {} of {}", g.step, g.total))}
                </span>
                {move || ctx.generation.with(|g| g.preview.clone()).map(|src| view! {
                    <img class="preview" data-testid="gen-preview" src=src alt="Preview of the image being made" />
                })}
            </div>
        </Show>
        {move || ctx.generation.with(|g| g.error.clone()).map(|error| view! { <ErrorBox error testid="gen-error" /> })}
        {move || ctx.generation.with(|g| g.warnings.clone()).into_iter().map(|w| view! { <p class="warning">{w}</p> }).collect_view()}
    }
}

#[component]
fn Gallery() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let delete = move |name: String, url: String| {
        spawn_local(async move {
            if let Ok((s, _held)) = library().await {
                let _ = s.remove(&format!("gallery/{name}.png")).await;
                let _ = s.remove(&format!("gallery/{name}.json")).await;
            }
            revoke(&url);
            ctx.gallery.update(|g| g.retain(|i| i.meta.name != name));
        })
    };
    view! {
        <div class="gallery" data-testid="gallery">
            <For
                each=move || ctx.gallery.get()
                key=|i| i.url.clone()
                children=move |item: GalleryItem| {
                    let meta = item.meta.clone();
                    let (seed, prompt, negative) = (meta.seed, meta.request.prompt.clone(), meta.request.negative_prompt.clone());
                    let (name, url) = (meta.name.clone(), item.url.clone());
                    view! {
                        <figure class="result">
                            <img
                                data-testid="result-image"
                                src=item.url.clone()
                                alt=meta.request.prompt.clone()
                                title=meta.parameters.clone()
                                width=meta.request.width
                                height=meta.request.height
                            />
                            <figcaption>
                                <p class="prompt">{meta.request.prompt.clone()}</p>
                                {likeness(&meta.faces)}
                                {meta.clip_t.map(|c| view! {
                                    <p
                                        class="clip-t"
                                        data-testid="clip-t"
                                        title="CLIP's cosine between the image and its prompt (each identity read as its class word); around 0.3 for an image that shows its prompt"
                                    >
                                        {format!("Prompt fidelity (CLIP-T): {c:.3}")}
                                    </p>
                                })}
                                <p class="muted">
                                    {format!(
                                        "seed {} · {} steps · {} × {}{}",
                                        meta.seed,
                                        meta.request.steps,
                                        meta.request.width,
                                        meta.request.height,
                                        if item.unsaved { " · not kept in storage" } else { "" }
                                    )}
                                </p>
                                <a
                                    class="button"
                                    data-testid="download"
                                    href=item.url.clone()
                                    download=format!("sefi-{}.png", meta.name)
                                >
                                    "Download PNG"
                                </a>
                                <button data-testid="use-seed" on:click=move |_| ctx.seed.set(seed)>
                                    "Use this seed"
                                </button>
                                <button
                                    data-testid="reuse-prompt"
                                    on:click=move |_| {
                                        ctx.prompt.set(prompt.clone());
                                        ctx.negative.set(negative.clone());
                                    }
                                >
                                    "Use this prompt"
                                </button>
                                <button class="danger" on:click=move |_| delete(name.clone(), url.clone())>
                                    "Delete"
                                </button>
                            </figcaption>
                        </figure>
                    }
                }
            />
        </div>
    }
}

/// How much an image's faces look like the prompt's identities, where they were scored.
fn likeness(faces: &Option<Vec<FaceScore>>) -> Option<impl IntoView + use<>> {
    let faces = faces.as_ref()?;
    let line = if faces.is_empty() {
        view! { <span>"No face found to score."</span> }.into_any()
    } else {
        faces
            .iter()
            .map(|f| {
                let name = f.identity.clone().unwrap_or_default();
                let (class, verdict) = if f.same_person {
                    ("same", "looks like")
                } else {
                    ("", "unlike")
                };
                view! {
                    <span class=class title="Cosine similarity of the face descriptors; 0.91 and above: the same person">
                        {format!("{verdict} {name}: {:.2} ", f.similarity)}
                    </span>
                }
            })
            .collect_view()
            .into_any()
    };
    Some(view! { <p class="likeness" data-testid="likeness">{line}</p> })
}
