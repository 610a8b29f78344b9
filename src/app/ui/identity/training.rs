//! A training run on the page's side: starting it (photos and record into storage), the
//! worker's reports into [`TrainView`], checkpoints kept in storage, pause, continue and cancel,
//! and the offer to continue a run found in storage.

use leptos::prelude::*;
use leptos::task::spawn_local;
use serde_bytes::ByteBuf;

use super::list::{identity_path, load_list};
use super::photos::{PhotoEntry, crop_png};
use crate::app::protocol::{Request, Response, TrainJob};
use crate::app::run::Run;
use crate::app::ui::widgets::{
    ErrorBox, ErrorKind, LikenessChart, LossChart, UiError, blob_url, duration, revoke,
};
use crate::app::ui::{Ctx, ModelState, library, store};
use crate::app::view::{Phase, RunRecord};
use crate::identity::settings::TrainConfig;
use crate::store::lock;

/// Checkpoints every this many steps (and every 20 s, and when paused).
const CHECKPOINT_EVERY: usize = 10;
const MAPS_EVERY: usize = 10;
/// A preview of the identity every this many steps (a 20-step generation each: six of them in
/// a run of the default 600 steps), scored for likeness.
const PREVIEWS_EVERY: usize = 100;
/// The page's address may set another interval: `?preview-every=50`, or 0 for none (a slow GPU).
const PREVIEWS_PARAM: &str = "preview-every";

/// Steps between previews: the page address's `preview-every`, else [`PREVIEWS_EVERY`].
fn previews_every() -> usize {
    web_sys::window()
        .and_then(|w| w.location().search().ok())
        .and_then(|q| web_sys::UrlSearchParams::new_with_str(&q).ok())
        .and_then(|p| p.get(PREVIEWS_PARAM))
        .and_then(|v| v.parse().ok())
        .unwrap_or(PREVIEWS_EVERY)
}

/// Takes the training run for this tab, or says what another tab is doing.
async fn take_run(ctx: Ctx) -> Result<(), UiError> {
    if ctx.run_lock.with_value(Option::is_some) {
        return Ok(());
    }
    match lock::try_lock(lock::TRAINING).await? {
        Some(held) => {
            ctx.run_lock.set_value(Some(held));
            Ok(())
        }
        None => Err(UiError::new(
            ErrorKind::Busy,
            "Another SeFi Studio tab is training an identity. One tab trains at a time, since tabs share this \
             browser's storage and GPU. Meanwhile this tab can generate with the stored identities and browse \
             the gallery; it can train once the other tab's run ends or that tab is closed.",
        )),
    }
}

/// Lets other tabs train.
fn release_run(ctx: Ctx) {
    ctx.run_lock.set_value(None);
}

pub async fn look_for_unfinished_run(ctx: Ctx) {
    // A run another tab is training is that tab's to offer.
    if ctx.run_lock.with_value(Option::is_none) && lock::is_held(lock::TRAINING).await {
        return;
    }
    let Ok(s) = store().await else { return };
    if let Ok(Some(stored)) = Run::current(&s).load().await {
        ctx.train.update(|t| t.offer_unfinished(stored.record));
    }
}

pub fn on_crash(ctx: Ctx, error: UiError) {
    release_run(ctx);
    ctx.train.update(|t| t.crashed(error));
    // The worker that was looking for faces is gone.
    super::photos::no_answer(ctx);
    spawn_local(look_for_unfinished_run(ctx));
}

pub fn on_response(ctx: Ctx, response: Response) {
    match response {
        Response::TrainStep(r) => ctx.train.update(|t| t.step_done(&r)),
        Response::TrainMaps {
            step,
            identity,
            class,
        } => ctx.train.update(|t| {
            let (identity, class) = (
                blob_url(&identity, "image/png"),
                blob_url(&class, "image/png"),
            );
            if let Some((a, b)) = t.show_maps(identity, class, step) {
                revoke(&a);
                revoke(&b);
            }
        }),
        Response::TrainPreviewStep { step, total } => {
            ctx.train.update(|t| t.drawing = Some((step, total)))
        }
        Response::TrainPreview {
            step,
            png,
            likeness,
        } => ctx.train.update(|t| {
            if let Some(old) = t.show_preview(blob_url(&png, "image/png"), step, likeness) {
                revoke(&old);
            }
        }),
        Response::TrainNoPreviews { why } => ctx.train.update(|t| t.no_previews = Some(why)),
        Response::TrainCheckpoint { step, bytes } => {
            spawn_local(async move {
                let saved = save_checkpoint(step, &bytes).await;
                ctx.train.update(|t| t.checkpoint_saved(step, saved));
            });
        }
        Response::TrainStopped { step, checkpoint } => spawn_local(async move {
            let result = match checkpoint {
                Some(bytes) => save_checkpoint(step, &bytes).await,
                None => match store().await {
                    Ok(s) => Run::current(&s).remove().await.map_err(UiError::from),
                    Err(e) => Err(e),
                },
            };
            release_run(ctx);
            ctx.train.update(|t| t.stopped(step, result));
            look_for_unfinished_run(ctx).await;
        }),
        Response::TrainDone { identity } => spawn_local(async move {
            let token = ctx.train.with_untracked(|t| t.token.clone());
            let result = async {
                let (s, _held) = library().await?;
                // The identity first: a tab closed between the two still offers the run.
                s.write(&identity_path(&token), &identity).await?;
                Run::current(&s).remove().await?;
                Ok::<_, UiError>(())
            }
            .await;
            release_run(ctx);
            ctx.train.update(|t| t.done(result));
            load_list(ctx).await;
        }),
        Response::TrainFailed(e) => {
            release_run(ctx);
            ctx.train.update(|t| t.failed(e.into()));
        }
        _ => {}
    }
}

async fn save_checkpoint(step: usize, bytes: &[u8]) -> Result<(), UiError> {
    let s = store().await?;
    Ok(Run::current(&s).save_checkpoint(step, bytes).await?)
}

/// Stores the photos' squares and the run's record, then starts the run.
pub fn start(
    ctx: Ctx,
    config: TrainConfig,
    entries: Vec<PhotoEntry>,
    model_id: String,
    model_name: String,
) {
    spawn_local(async move {
        let result = async {
            take_run(ctx).await?;
            let mut pngs = Vec::new();
            for p in &entries {
                pngs.push(crop_png(p).await?);
            }
            let record = RunRecord {
                config: config.clone(),
                model_id,
                model_name,
                photos: pngs.len(),
                step: 0,
            };
            Run::current(&store().await?).begin(&record, &pngs).await?;
            Ok::<_, UiError>(pngs)
        }
        .await;
        match result {
            Ok(pngs) => send(ctx, config, pngs, None, 0),
            Err(e) => {
                release_run(ctx);
                ctx.train.update(|t| t.error = Some(e));
            }
        }
    });
}

/// Sends a run to the worker.
fn send(
    ctx: Ctx,
    config: TrainConfig,
    photos: Vec<Vec<u8>>,
    resume: Option<Vec<u8>>,
    start: usize,
) {
    ctx.train.update(|t| {
        let underlay = photos.first().map(|p| blob_url(p, "image/png"));
        if let Some(old) = t.start(&config, start, underlay) {
            revoke(&old);
        }
    });
    ctx.send(Request::Train(TrainJob {
        config,
        photos: photos.into_iter().map(ByteBuf::from).collect(),
        resume: resume.map(ByteBuf::from),
        checkpoint_every: CHECKPOINT_EVERY,
        maps_every: MAPS_EVERY,
        previews_every: previews_every(),
    }));
}

/// Continues the stored run from its checkpoint.
async fn continue_run(ctx: Ctx) -> Result<(), UiError> {
    take_run(ctx).await?;
    let result = continue_taken(ctx).await;
    if result.is_err() {
        release_run(ctx);
    }
    result
}

async fn continue_taken(ctx: Ctx) -> Result<(), UiError> {
    let stored = Run::current(&store().await?)
        .load()
        .await?
        .ok_or_else(|| UiError::new(ErrorKind::Storage, "the stored run is gone"))?;
    let record = stored.record;
    match ctx.model.get_untracked() {
        ModelState::Ready(i) if i.id == record.model_id => {}
        _ => {
            return Err(UiError::new(
                ErrorKind::NoModel,
                format!(
                    "This run was started on {}: load that model (step 1) to continue it.",
                    record.model_name
                ),
            ));
        }
    }
    ctx.train.update(|t| t.offer = None);
    send(
        ctx,
        record.config,
        stored.photos,
        stored.checkpoint,
        record.step,
    );
    Ok(())
}

/// Removes the stored run, unless another tab is training it.
async fn discard_run(ctx: Ctx) -> Result<(), UiError> {
    take_run(ctx).await?;
    let removed = async { Ok(Run::current(&store().await?).remove().await?) }.await;
    release_run(ctx);
    removed
}

#[component]
pub fn ResumeOffer() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let error = RwSignal::new(None::<UiError>);
    let cont = move |_| {
        spawn_local(async move {
            error.set(continue_run(ctx).await.err());
        })
    };
    let discard = move |_| {
        spawn_local(async move {
            if let Err(e) = discard_run(ctx).await {
                return error.set(Some(e));
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
pub fn TrainProgress() -> impl IntoView {
    let ctx = expect_context::<Ctx>();
    let t = ctx.train;
    let visible = move || t.with(|t| t.phase != Phase::Idle || !t.points.is_empty());
    let points = Signal::derive(move || t.with(|t| t.points.clone()));
    let likeness = Signal::derive(move || t.with(|t| t.likeness.clone()));
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
                if let Err(e) = discard_run(ctx).await {
                    return t.update(|t| t.error = Some(e));
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
                        {move || t.with(|t| t.drawing).map(|(step, total)| {
                            format!(" · drawing a preview: {step}/{total}")
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
                    <Show when=move || t.with(|t| !t.likeness.is_empty())>
                        <LikenessChart points=likeness total />
                    </Show>
                    {move || t.with(|t| t.no_previews.clone().map(|why| view! {
                        <p class="muted" data-testid="train-no-previews">{why}</p>
                    }))}
                    {move || t.with(|t| t.preview.clone().map(|(url, step)| {
                        let token = t.token.clone();
                        let caption = match t.likeness.last() {
                            Some(&(s, l)) if s == step => format!("step {step}: likeness {l:.2}"),
                            _ => format!("step {step}: no face to score"),
                        };
                        view! {
                            <figure class="preview" data-testid="train-preview" data-step=step>
                                <img src=url alt=format!("a photo of <{token}>, step {step}") />
                                <figcaption>{caption}</figcaption>
                            </figure>
                        }
                    }))}
                </div>
            </div>
        </Show>
    }
}
