//! The identity panel: photos and their square crops, the settings, training with live loss
//! and attention heat-maps, pause/continue/cancel with checkpoints in storage, and the list of
//! learned identities.

mod list;
mod photos;
mod training;

use leptos::prelude::*;

use super::widgets::{ErrorKind, NumberField, UiError};
use super::{Ctx, ModelState};
pub use crate::app::view::TrainView;
use crate::clip::tokenizer::{PLACEHOLDER_NAME_RULE, is_placeholder_name};
use crate::identity::settings::{DEFAULT_CLASS_WORD, TrainConfig};
use list::IdentityList;
pub use list::{IdentityEntry, identity_bytes, load_list};
use photos::PhotoPicker;
pub use photos::{PhotoEntry, on_faces};
use training::{ResumeOffer, TrainProgress};
pub use training::{look_for_unfinished_run, on_crash, on_response};

/// The training settings as the form holds them.
#[derive(Clone, Copy)]
struct Settings {
    name: RwSignal<String>,
    class_word: RwSignal<String>,
    steps: RwSignal<usize>,
    lr: RwSignal<f64>,
    attn: RwSignal<f64>,
    /// 0: the model's own.
    resolution: RwSignal<usize>,
    seed: RwSignal<u64>,
}

impl Settings {
    /// The library's defaults (`TrainConfig::new`).
    fn new() -> Self {
        let defaults = TrainConfig::new("", DEFAULT_CLASS_WORD, 0);
        Self {
            name: RwSignal::new(String::new()),
            class_word: RwSignal::new(defaults.class_word),
            steps: RwSignal::new(defaults.steps),
            lr: RwSignal::new(defaults.lr),
            attn: RwSignal::new(defaults.attn_weight),
            resolution: RwSignal::new(0),
            seed: RwSignal::new(0),
        }
    }

    /// The run's configuration, for a model whose own resolution is `native`.
    fn config(&self, native: usize) -> TrainConfig {
        let resolution = match self.resolution.get_untracked() {
            0 => native,
            r => r,
        };
        let mut config = TrainConfig::new(
            self.name.get_untracked().trim(),
            self.class_word.get_untracked().trim(),
            resolution,
        );
        config.steps = self.steps.get_untracked().max(1);
        config.lr = self.lr.get_untracked();
        config.attn_weight = self.attn.get_untracked();
        config.seed = self.seed.get_untracked();
        config
    }
}

#[component]
pub fn IdentityPanel() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let photos = ctx.photos;
    let settings = Settings::new();
    let name = settings.name;

    let model_ready = move || matches!(ctx.model.get(), ModelState::Ready(_));
    let can_start = move || {
        model_ready()
            && !photos.with(Vec::is_empty)
            && is_placeholder_name(&name.get())
            && !ctx.train.with(TrainView::is_running)
    };
    let start = move |_| {
        let ModelState::Ready(model) = ctx.model.get_untracked() else {
            return;
        };
        let config = settings.config(model.resolution);
        let token = config.token.clone();
        if ctx
            .identities
            .with_untracked(|l| l.iter().any(|e| e.token == token))
        {
            ctx.train.update(|t| {
                t.error = Some(UiError::new(
                    ErrorKind::Exists,
                    format!("An identity named <{token}> exists already: pick another name, or delete or rename it below."),
                ))
            });
            return;
        }
        training::start(
            ctx,
            config,
            photos.get_untracked(),
            model.id.clone(),
            model.name.clone(),
        );
    };

    view! {
        <section class="panel" id="identity" data-testid="identity-panel">
            <h2><span class="num">"2"</span>" Learn an identity"</h2>
            <p class="explain">
                "Add one or more photos of the same person (or pet, or thing), choose the square to learn from, "
                "and give it a name. Training runs on your GPU; the photos stay in this browser."
            </p>
            <ResumeOffer />
            <PhotoPicker photos />
            <TrainSettings settings />
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

/// The name, the class word, the step count, and the advanced settings.
#[component]
fn TrainSettings(settings: Settings) -> impl IntoView {
    let Settings {
        name,
        class_word,
        steps,
        lr,
        attn,
        resolution,
        seed,
    } = settings;
    view! {
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
    }
}
