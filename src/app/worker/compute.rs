//! The worker's jobs: the GPU check, loading, training and generation on the loaded model,
//! each streaming its progress back to the page.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use gloo_worker::HandlerId;
use serde_bytes::ByteBuf;

use super::load::load_model;
use super::state::{Loaded, Reply, State, clip_bytes, model, open_wgpu};
use crate::app::fit;
use crate::app::memory::Work;
use crate::app::protocol::{
    GenImage, GenerateJob, GpuReport, Request, Response, TrainJob, WorkerError,
};
use crate::identity::session::{self, Due, Finished, Previews, Schedule, Stop, TrainEvent};
use crate::identity::train::{Photo, TrainError, Trainer, decode_photo};
use crate::identity::{Identity, IdentityError};
use crate::pipeline::{self, Event, Flow, GivenNoise, PipelineError, RgbImage};

/// A checkpoint is due at least this often, whatever the step count.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(20);
/// Heat-maps (a forward pass each) at least this often.
const MAPS_AFTER: Duration = Duration::from_secs(120);

thread_local! {
    /// Where a panic is reported: the page's bridge.
    static REPORT_TO: RefCell<Option<(Reply, Option<HandlerId>)>> =
        const { RefCell::new(None) };
    /// Set once the worker has said it cannot go on: a lost device makes both the browser's
    /// notice and the panics that follow report, and the page needs one.
    static CRASHED: Cell<bool> = const { Cell::new(false) };
}

/// Tells the page, once, that this worker cannot go on.
fn report_crash(error: WorkerError) {
    if CRASHED.with(|c| c.replace(true)) {
        return;
    }
    REPORT_TO.with(|r| {
        if let Ok(r) = r.try_borrow()
            && let Some((reply, Some(id))) = r.as_ref()
        {
            reply(*id, Response::Crashed(error));
        }
    });
}

/// A panic in the worker (a GPU error wgpu cannot return, a bug) leaves its wasm instance
/// unusable, and a lost GPU device leaves it nothing to compute on: tell the page why, so
/// that it starts a new worker and explains.
pub fn install_panic_hook(reply: Reply) {
    REPORT_TO.with(|r| *r.borrow_mut() = Some((reply, None)));
    crate::device::lost::on_lost(|reason| report_crash(WorkerError::device_lost(reason)));
    std::panic::set_hook(Box::new(|info| {
        console_error_panic_hook::hook(info);
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| info.to_string());
        // Work on a lost device fails in many ways; the loss is the cause to report.
        report_crash(match crate::device::lost::reason() {
            Some(reason) => WorkerError::device_lost(&reason),
            None => WorkerError::from_crash(&message),
        });
    }));
}

/// Test hook: faults that headless browsers cannot provoke, asked for by setting
/// `self.__sefiFault` in the worker (from the browser's devtools or a test driver) and acted
/// on at the next training or generation step. `"stall"` hangs the worker as a deadlocked
/// driver would; `"lose-device"` destroys the GPU device as a driver reset does.
fn injected_fault() {
    let global = js_sys::global();
    let key = wasm_bindgen::JsValue::from_str("__sefiFault");
    let Some(fault) = js_sys::Reflect::get(&global, &key)
        .ok()
        .and_then(|f| f.as_string())
    else {
        return;
    };
    let _ = js_sys::Reflect::delete_property(&global, &key);
    match fault.as_str() {
        "stall" => loop {
            std::hint::spin_loop();
        },
        "lose-device" => crate::device::lost::destroy(),
        _ => {}
    }
}

pub fn received(state: &Rc<State>, reply: &Reply, msg: Request, id: HandlerId) {
    REPORT_TO.with(|r| {
        if let Some((_, last)) = r.borrow_mut().as_mut() {
            *last = Some(id);
        }
    });
    match msg {
        Request::StopTraining { cancel } => state.stop_training.set(Some(cancel)),
        Request::CancelGenerate => state.cancel_generate.set(true),
        Request::UnloadClip => {
            state.clip.borrow_mut().take();
        }
        msg => {
            let (state, reply) = (state.clone(), reply.clone());
            wasm_bindgen_futures::spawn_local(async move {
                let respond = |r: Response| reply(id, r);
                match msg {
                    Request::GpuCheck => respond(Response::GpuCheck(gpu_check().await)),
                    Request::LoadModel { id } => {
                        let r = load_model(&state, &id, &respond).await;
                        respond(match r {
                            Ok(info) => Response::ModelReady(info),
                            Err(e) => Response::ModelFailed(e),
                        });
                    }
                    Request::LoadClip { id } => {
                        respond(match super::clip::load(&state, &id).await {
                            Ok(info) => Response::ClipReady(info),
                            Err(e) => Response::ClipFailed(e),
                        });
                    }
                    Request::Train(job) => {
                        if let Err(e) = train(&state, job, &respond).await {
                            respond(Response::TrainFailed(e));
                        }
                    }
                    Request::Generate(job) => {
                        state.cancel_generate.set(false);
                        respond(match generate(&state, job, &respond).await {
                            Ok(r) => r,
                            Err(e) => Response::GenFailed(e),
                        });
                    }
                    Request::FindFaces {
                        key,
                        width,
                        height,
                        rgb,
                    } => respond(Response::Faces {
                        key,
                        faces: super::faces::find(&state, width, height, rgb.into_vec()).await,
                    }),
                    Request::StopTraining { .. }
                    | Request::CancelGenerate
                    | Request::UnloadClip => {}
                }
            });
        }
    }
}

/// Opens the WebGPU device (once) and runs the autodiff check on it.
pub async fn gpu_check() -> Result<GpuReport, WorkerError> {
    let dev = open_wgpu().await?;
    let check = crate::check::autodiff_check(&dev.device)
        .await
        .map_err(|e| WorkerError::Other(e.to_string()))?;
    Ok(GpuReport {
        device: dev.info,
        check,
    })
}

/// The verdict on `work` before it starts ([`fit::check`]: the buffers it binds and, where
/// the GPU's memory is known, the memory it needs), as the page's error.
fn check_fits(state: &State, loaded: &Loaded, work: Work) -> Result<(), WorkerError> {
    let fit = &loaded.info.fit;
    let budget = fit::Budget {
        binding: fit.binding_limit,
        memory: fit.memory_bytes,
        f16: state.device.borrow().as_ref().is_some_and(|d| d.info.f16),
        cpu: false,
    }
    .beside(clip_bytes(state));
    let params = loaded.info.params.max(1);
    fit::check(
        &loaded.sd.config,
        params,
        fit.weights_bytes / params,
        work,
        budget,
    )
    .map(|_| ())
    .map_err(WorkerError::OutOfMemory)
}

/// Grey level -> a warm heat colour whose opacity grows with the attention.
fn heat(v: u8) -> [u8; 4] {
    let t = f32::from(v) / 255.0;
    let r = (255.0 * (1.6 * t).min(1.0)) as u8;
    let g = (255.0 * (1.6 * t - 0.5).clamp(0.0, 1.0)) as u8;
    let b = (255.0 * (2.5 * t - 1.5).clamp(0.0, 1.0)) as u8;
    [r, g, b, (40.0 + 200.0 * t) as u8]
}

fn rgba_png(width: usize, height: usize, data: &[u8]) -> Result<Vec<u8>, WorkerError> {
    let mut out = Vec::new();
    let mut enc = ::png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(::png::ColorType::Rgba);
    enc.set_depth(::png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .map_err(|e| WorkerError::Other(e.to_string()))?;
    w.write_image_data(data)
        .map_err(|e| WorkerError::Other(e.to_string()))?;
    w.finish().map_err(|e| WorkerError::Other(e.to_string()))?;
    Ok(out)
}

/// The trainer's side-by-side grey maps as two heat-map PNGs.
fn heat_maps(maps: &RgbImage) -> Result<[ByteBuf; 2], WorkerError> {
    let side = maps.height;
    let half = |k: usize| -> Result<ByteBuf, WorkerError> {
        let mut data = Vec::with_capacity(side * side * 4);
        for y in 0..side {
            for x in 0..side {
                data.extend(heat(maps.data[(y * maps.width + k * side + x) * 3]));
            }
        }
        rgba_png(side, side, &data).map(ByteBuf::from)
    };
    Ok([half(0)?, half(1)?])
}

impl From<TrainError> for WorkerError {
    fn from(e: TrainError) -> Self {
        match &e {
            TrainError::Read(m) if WorkerError::is_out_of_memory(m) => {
                WorkerError::OutOfMemory(format!(
                    "The GPU ran out of memory while training ({m}). Train at a smaller size, load the model in f16, or close other tabs that use the GPU; the run continues from its last checkpoint."
                ))
            }
            _ => WorkerError::Other(e.to_string()),
        }
    }
}

impl From<IdentityError> for WorkerError {
    fn from(e: IdentityError) -> Self {
        WorkerError::BadIdentity(e.to_string())
    }
}

async fn train(
    state: &State,
    job: TrainJob,
    respond: &dyn Fn(Response),
) -> Result<(), WorkerError> {
    let loaded = model(state)?;
    // The worker trains checkpointed (see `load_model`).
    check_fits(
        state,
        &loaded,
        Work::Train {
            resolution: job.config.resolution,
            checkpointing: true,
        },
    )?;
    let mut photos = Vec::new();
    for (i, bytes) in job.photos.iter().enumerate() {
        let image = decode_photo(bytes)
            .map_err(|e| WorkerError::BadPhoto(format!("photo {}: {e}", i + 1)))?;
        photos.push(Photo { image, crop: None });
    }
    let trainer = Trainer::new(
        &loaded.sd,
        &loaded.scheduler,
        &photos,
        job.config,
        &loaded.device,
    )
    .await?;
    let mut st = match job.resume {
        Some(bytes) => {
            let saved = Identity::from_bytes("checkpoint", bytes.into_vec()).await?;
            trainer.resume_state(&saved)?
        }
        None => trainer.initial_state(),
    };
    state.stop_training.set(None);
    let schedule = Schedule {
        checkpoint: Due {
            every: job.checkpoint_every,
            after: Some(CHECKPOINT_AFTER),
            ..Due::default()
        },
        maps: Due {
            every: job.maps_every,
            after: Some(MAPS_AFTER),
            first_step: true,
            last_step: true,
        },
        maps_before_training: true,
        read_every: session::READ_EVERY,
    };
    // Previews are scored against the training squares' faces; a run too short for a preview
    // does not fetch the face models.
    let squares: Vec<RgbImage> = photos.iter().map(|p| p.image.clone()).collect();
    let mut wants_previews = job.previews_every > 0 && trainer.config.steps >= job.previews_every;
    // A preview is a generation at the training size, drawn between two steps: where the GPU's
    // memory is known and one does not fit beside the run, the run goes on without them.
    let side = trainer.config.resolution;
    let preview = Work::Generate {
        width: side,
        height: side,
        images: 1,
    };
    if wants_previews && let Err(e) = check_fits(state, &loaded, preview) {
        wants_previews = false;
        respond(Response::TrainNoPreviews {
            why: format!("This run draws no previews of the identity: {e}"),
        });
    }
    let face_models = match wants_previews {
        true => super::faces::models(state)
            .await
            .inspect_err(|e| web_sys::console::warn_1(&format!("previews not scored: {e}").into()))
            .ok(),
        false => None,
    };
    let mut faces = Vec::new();
    if let Some(models) = &face_models {
        for square in &squares {
            if let Ok(Some(face)) = models.photo_face(square, None).await {
                faces.push(face);
            }
        }
    }
    let token = trainer.config.token.clone();
    let previews = wants_previews.then(|| Previews {
        due: Due {
            every: job.previews_every,
            // The last point of the likeness curve: where the run ended.
            last_step: true,
            ..Due::default()
        },
        request: Previews::request(
            &token,
            trainer.config.resolution,
            loaded.sd.family.default_guidance(),
            trainer.config.seed,
        ),
        scheduler: &loaded.scheduler,
        faces: face_models.as_deref().map(|m| (m, faces)),
    });
    let mut stop = || {
        state
            .stop_training
            .take()
            .map(|cancel| if cancel { Stop::Cancel } else { Stop::Pause })
    };
    let mut on_event = |event: TrainEvent| -> Result<(), WorkerError> {
        injected_fault();
        respond(match event {
            TrainEvent::Step(report) => Response::TrainStep(report),
            TrainEvent::Checkpoint { step, bytes } => Response::TrainCheckpoint {
                step,
                bytes: ByteBuf::from(bytes),
            },
            TrainEvent::Maps { step, maps, .. } => {
                let [identity, class] = heat_maps(&maps)?;
                Response::TrainMaps {
                    step,
                    identity,
                    class,
                }
            }
            TrainEvent::PreviewStep { step, total } => Response::TrainPreviewStep { step, total },
            TrainEvent::Preview {
                step,
                image,
                likeness,
            } => {
                let text = format!("a photo of <{token}>, step {step}");
                let png = pipeline::png::encode(&image, &text).map_err(WorkerError::Other)?;
                Response::TrainPreview {
                    step,
                    png: ByteBuf::from(png),
                    likeness,
                }
            }
        });
        Ok(())
    };
    respond(
        match session::run(
            &trainer,
            &mut st,
            &schedule,
            previews.as_ref(),
            &mut stop,
            &mut on_event,
        )
        .await?
        {
            Finished::Done(mut identity) => {
                super::faces::record(state, &mut identity, &squares).await;
                Response::TrainDone {
                    identity: ByteBuf::from(identity.to_bytes()?),
                }
            }
            Finished::Stopped { step, checkpoint } => Response::TrainStopped {
                step,
                checkpoint: checkpoint.map(ByteBuf::from),
            },
        },
    );
    Ok(())
}

fn pipeline_error(e: PipelineError) -> WorkerError {
    match e {
        PipelineError::UnknownPlaceholder(_) => WorkerError::BadIdentity(e.to_string()),
        e => WorkerError::Other(e.to_string()),
    }
}

async fn generate(
    state: &State,
    job: GenerateJob,
    respond: &dyn Fn(Response),
) -> Result<Response, WorkerError> {
    let loaded = model(state)?;
    let req = job.request;
    req.validate().map_err(pipeline_error)?;
    let mut warnings = Vec::new();
    let mut identities = Vec::new();
    for bytes in job.identities {
        let id = Identity::from_bytes("identity", bytes.into_vec()).await?;
        match id.check_model(loaded.sd.family, &loaded.fingerprint) {
            Ok(()) => {}
            Err(e @ IdentityError::OtherModel { .. }) => warnings.push(e.to_string()),
            Err(e) => {
                // Only an identity the prompt uses must fit the model.
                if req.prompt.contains(&format!("<{}>", id.token)) {
                    return Err(e.into());
                }
                continue;
            }
        }
        identities.push(id);
    }
    check_fits(
        state,
        &loaded,
        Work::Generate {
            width: req.width,
            height: req.height,
            images: req.num_images,
        },
    )?;
    let generated = pipeline::generate(
        &loaded.sd,
        &loaded.scheduler,
        &req,
        &identities,
        &GivenNoise::default(),
        &loaded.device,
        &mut |event| {
            injected_fault();
            match event {
                Event::Encoded { warnings: w } => warnings.extend(w),
                Event::Step {
                    step,
                    total,
                    preview,
                } => {
                    let preview = preview
                        .and_then(|p| pipeline::png::encode(&p, "").ok())
                        .map(ByteBuf::from);
                    respond(Response::GenStep {
                        step,
                        total,
                        preview,
                    });
                }
            }
            if state.cancel_generate.get() {
                Flow::Cancel
            } else {
                Flow::Continue
            }
        },
    )
    .await
    .map_err(pipeline_error)?;
    let scores = super::faces::score(state, &req.prompt, &identities, &generated.images).await?;
    let clip_t = super::clip::score(state, &req.prompt, &identities, &generated.images).await?;
    let mut images = Vec::new();
    for (((i, image), faces), clip_t) in generated.images.iter().enumerate().zip(scores).zip(clip_t)
    {
        let seed = req.seed.wrapping_add(i as u64);
        let parameters = pipeline::png::with_clip_t(
            pipeline::png::with_likeness(
                pipeline::png::parameters_text(&req, seed, &job.model_name),
                &crate::face::score::likeness(faces.as_deref().unwrap_or_default()),
            ),
            clip_t,
        );
        let png = pipeline::png::encode(image, &parameters).map_err(WorkerError::Other)?;
        images.push(GenImage {
            png: ByteBuf::from(png),
            seed,
            width: image.width,
            height: image.height,
            parameters,
            faces,
            clip_t,
        });
    }
    Ok(Response::GenDone { images, warnings })
}
