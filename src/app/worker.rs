//! The dedicated worker that owns the GPU: every model computation runs here, so the page
//! stays responsive. It keeps one model on the GPU, trains and generates with it, and streams
//! progress back as [`Response`]s.

use gloo_worker::{HandlerId, Registrable, Worker, WorkerScope};

use super::protocol::{JsCodec, Request, Response};

/// The worker's loader script as trunk emits it (`data-bin="sefi-worker"` with
/// `data-loader-shim`); a same-origin script, so the CSP needs no `blob:` workers.
pub const LOADER: &str = "./sefi-worker_loader.js";

#[cfg(feature = "compute")]
pub use compute::gpu_check;

pub struct GpuWorker {
    #[cfg(feature = "compute")]
    state: std::rc::Rc<compute::State>,
}

impl Worker for GpuWorker {
    type Message = ();
    type Input = Request;
    type Output = Response;

    fn create(scope: &WorkerScope<Self>) -> Self {
        #[cfg(feature = "compute")]
        compute::install_panic_hook(scope.clone());
        #[cfg(not(feature = "compute"))]
        let _ = scope;
        GpuWorker {
            #[cfg(feature = "compute")]
            state: Default::default(),
        }
    }

    fn update(&mut self, _scope: &WorkerScope<Self>, _msg: ()) {}

    fn received(&mut self, scope: &WorkerScope<Self>, msg: Request, id: HandlerId) {
        #[cfg(feature = "compute")]
        compute::received(&self.state, scope, msg, id);
        #[cfg(not(feature = "compute"))]
        scope.respond(
            id,
            Response::Crashed(super::protocol::WorkerError::Other(format!(
                "this build has no compute backend (asked for {msg:?}); the worker binary is built with `wgpu`"
            ))),
        );
    }
}

/// Starts the worker's message loop; called by the worker binary.
pub fn register() {
    GpuWorker::registrar().encoding::<JsCodec>().register();
}

#[cfg(feature = "compute")]
mod compute {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::time::Duration;

    use burn::tensor::Device;
    use gloo_worker::{HandlerId, WorkerScope};
    use serde_bytes::ByteBuf;
    use web_time::Instant;

    use super::GpuWorker;
    use crate::app::acquire::{part_prefix, read_manifest};
    use crate::app::catalog::{Manifest, PART_SIZE};
    use crate::app::fit;
    use crate::app::protocol::{
        GenImage, GenerateJob, GpuReport, ModelInfo, Request, Response, TrainJob, WorkerError,
    };
    use crate::device::{ComputeDevice, DeviceChoice, DeviceError, Precision};
    use crate::identity::condition::fingerprint;
    use crate::identity::session::{self, Due, Finished, Schedule, Stop, TrainEvent};
    use crate::identity::train::{Photo, TrainError, Trainer, decode_photo};
    use crate::identity::{Fingerprint, Identity, IdentityError};
    use crate::pipeline::{self, Event, Flow, GivenNoise, PipelineError, RgbImage};
    use crate::schedule::SchedulerConfig;
    use crate::sd::{self, StableDiffusion};
    use crate::store::{PartsSource, Store, StoreError};
    use crate::weights::checkpoint::pad_token_of;
    use crate::weights::{
        ByteSource, Checkpoint, Component, DiffusersParts, TokenizerSource, WeightsError,
    };

    /// A checkpoint is due at least this often, whatever the step count.
    const CHECKPOINT_AFTER: Duration = Duration::from_secs(20);
    /// Heat-maps (a forward pass each) at least this often.
    const MAPS_AFTER: Duration = Duration::from_secs(120);

    /// A model on the GPU.
    struct Loaded {
        sd: StableDiffusion,
        scheduler: SchedulerConfig,
        fingerprint: Fingerprint,
        /// The autodiff device the model lives on (training needs gradients).
        device: Device,
        info: ModelInfo,
    }

    #[derive(Default)]
    pub struct State {
        device: RefCell<Option<ComputeDevice>>,
        model: RefCell<Option<Rc<Loaded>>>,
        /// Set by `StopTraining`: `Some(cancel)`.
        stop_training: Cell<Option<bool>>,
        cancel_generate: Cell<bool>,
    }

    thread_local! {
        /// Where a panic is reported: the page's bridge.
        static REPORT_TO: RefCell<Option<(WorkerScope<GpuWorker>, Option<HandlerId>)>> =
            const { RefCell::new(None) };
    }

    /// A panic in the worker (a GPU error wgpu cannot return, a bug) leaves its wasm instance
    /// unusable: tell the page why, so that it starts a new worker and explains.
    pub fn install_panic_hook(scope: WorkerScope<GpuWorker>) {
        REPORT_TO.with(|r| *r.borrow_mut() = Some((scope, None)));
        std::panic::set_hook(Box::new(|info| {
            console_error_panic_hook::hook(info);
            let payload = info.payload();
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| info.to_string());
            REPORT_TO.with(|r| {
                if let Ok(r) = r.try_borrow()
                    && let Some((scope, Some(id))) = r.as_ref()
                {
                    scope.respond(*id, Response::Crashed(WorkerError::from_crash(&message)));
                }
            });
        }));
    }

    pub fn received(
        state: &Rc<State>,
        scope: &WorkerScope<GpuWorker>,
        msg: Request,
        id: HandlerId,
    ) {
        REPORT_TO.with(|r| {
            if let Some((_, last)) = r.borrow_mut().as_mut() {
                *last = Some(id);
            }
        });
        match msg {
            Request::StopTraining { cancel } => state.stop_training.set(Some(cancel)),
            Request::CancelGenerate => state.cancel_generate.set(true),
            msg => {
                let (state, scope) = (state.clone(), scope.clone());
                wasm_bindgen_futures::spawn_local(async move {
                    let respond = |r: Response| scope.respond(id, r);
                    match msg {
                        Request::GpuCheck => respond(Response::GpuCheck(gpu_check().await)),
                        Request::LoadModel { id } => {
                            let r = load_model(&state, &id, &respond).await;
                            respond(match r {
                                Ok(info) => Response::ModelReady(info),
                                Err(e) => Response::ModelFailed(e),
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
                        Request::StopTraining { .. } | Request::CancelGenerate => {}
                    }
                });
            }
        }
    }

    fn device_error(e: DeviceError) -> WorkerError {
        match e {
            DeviceError::NoWebGpu { detail, .. } | DeviceError::NoWgpuAdapter { detail, .. } => {
                WorkerError::NoWebGpu(detail)
            }
            other => WorkerError::Other(other.to_string()),
        }
    }

    /// Opens the WebGPU device (once) and runs the autodiff check on it.
    pub async fn gpu_check() -> Result<GpuReport, WorkerError> {
        let dev = DeviceChoice::Wgpu.open().await.map_err(device_error)?;
        let check = crate::check::autodiff_check(&dev.device)
            .await
            .map_err(|e| WorkerError::Other(e.to_string()))?;
        Ok(GpuReport {
            device: dev.info,
            check,
        })
    }

    async fn device(state: &State) -> Result<ComputeDevice, WorkerError> {
        if let Some(d) = state.device.borrow().as_ref() {
            return Ok(d.clone());
        }
        let d = DeviceChoice::Wgpu.open().await.map_err(device_error)?;
        *state.device.borrow_mut() = Some(d.clone());
        Ok(d)
    }

    fn bad_model(e: impl ToString) -> WorkerError {
        WorkerError::BadModel(e.to_string())
    }

    fn storage(e: StoreError) -> WorkerError {
        WorkerError::Other(e.to_string())
    }

    async fn source(store: &Store, m: &Manifest, path: &str) -> Result<PartsSource, WorkerError> {
        let size = m
            .file(path)
            .and_then(|f| f.size)
            .ok_or_else(|| bad_model(format!("{path} is missing from the stored model")))?;
        PartsSource::open(
            store,
            &format!("{}/{path}", m.name),
            &part_prefix(&m.id, path),
            size,
            PART_SIZE,
        )
        .await
        .map_err(storage)
    }

    async fn text(store: &Store, m: &Manifest, path: &str) -> Result<Option<String>, WorkerError> {
        if m.file(path).is_none() {
            return Ok(None);
        }
        let src = source(store, m, path).await?;
        let bytes = src
            .read_at(0, src.len() as usize)
            .await
            .map_err(bad_model)?;
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| bad_model(format!("{path} is not text")))
    }

    /// The stored model's checkpoint, reading only headers and configs.
    async fn open_checkpoint(store: &Store, m: &Manifest) -> Result<Checkpoint, WorkerError> {
        if m.single_file {
            let src = source(store, m, "model.safetensors").await?;
            return Checkpoint::single_file(Box::new(src), None)
                .await
                .map_err(bad_model);
        }
        let weights = |dir: &str, stem: &str| {
            let full = format!("{dir}/{stem}.safetensors");
            let half = format!("{dir}/{stem}.fp16.safetensors");
            if m.file(&full).is_some() { full } else { half }
        };
        let boxed = |s: PartsSource| -> Box<dyn ByteSource> { Box::new(s) };
        let tokenizer = match (
            text(store, m, "tokenizer/vocab.json").await?,
            text(store, m, "tokenizer/merges.txt").await?,
        ) {
            (Some(vocab), Some(merges)) => {
                let mut configs = Vec::new();
                for f in [
                    "tokenizer/special_tokens_map.json",
                    "tokenizer/tokenizer_config.json",
                ] {
                    configs.extend(text(store, m, f).await?);
                }
                Some(TokenizerSource::Texts {
                    vocab,
                    merges,
                    pad_token: pad_token_of(
                        &configs.iter().map(String::as_str).collect::<Vec<_>>(),
                    ),
                })
            }
            _ => None,
        };
        let parts = DiffusersParts {
            unet: boxed(source(store, m, &weights("unet", "diffusion_pytorch_model")).await?),
            text_encoder: boxed(source(store, m, &weights("text_encoder", "model")).await?),
            vae: boxed(source(store, m, &weights("vae", "diffusion_pytorch_model")).await?),
            unet_config: text(store, m, "unet/config.json").await?,
            text_encoder_config: text(store, m, "text_encoder/config.json").await?,
            vae_config: text(store, m, "vae/config.json").await?,
            scheduler_config: text(store, m, "scheduler/scheduler_config.json").await?,
            tokenizer,
        };
        Checkpoint::diffusers(&m.name, parts)
            .await
            .map_err(bad_model)
    }

    fn weights_error(e: WeightsError) -> WorkerError {
        match e {
            WeightsError::Io { .. } => WorkerError::Other(e.to_string()),
            e => bad_model(e),
        }
    }

    async fn load_model(
        state: &State,
        id: &str,
        respond: &dyn Fn(Response),
    ) -> Result<ModelInfo, WorkerError> {
        let started = Instant::now();
        let store = Store::open().await.map_err(storage)?;
        let manifest = read_manifest(&store, id)
            .await
            .map_err(storage)?
            .ok_or_else(|| bad_model("this model is no longer in storage; load it again"))?;
        if !manifest.complete {
            return Err(bad_model(
                "the model's download did not finish; load it again to resume",
            ));
        }
        let dev = device(state).await?;
        let ckpt = open_checkpoint(&store, &manifest).await?;
        sd::validate(&ckpt, &dev.device).map_err(weights_error)?;
        let precision = dev
            .info
            .resolve(Precision::Auto)
            .map_err(|e| WorkerError::Other(e.to_string()))?;
        let bytes_per_param = if precision == Precision::F32 { 4 } else { 2 };
        let largest = Component::ALL
            .iter()
            .flat_map(|&c| ckpt.entries(c).values())
            .map(|e| e.shape.iter().product::<usize>() as u64 * bytes_per_param)
            .max()
            .unwrap_or(0);
        let params: u64 = Component::ALL.iter().map(|&c| ckpt.params(c)).sum();
        let resolution = ckpt.config.unet.sample_size * 8;
        let fit = fit::estimate(
            &ckpt.config.unet,
            ckpt.params(Component::Unet),
            params,
            bytes_per_param,
            largest,
            resolution,
            dev.info.limits.as_ref(),
        );
        if fit.binding_limit.is_some_and(|l| largest > l) {
            return Err(WorkerError::OutOfMemory(fit.advice.join(" ")));
        }
        // Free the previous model's GPU memory before loading the next.
        state.model.borrow_mut().take();
        let device = dev.device.clone().autodiff();
        // Progress over all three models, whichever order they load in.
        let total = Component::ALL.iter().map(|&c| ckpt.entries(c).len()).sum();
        let (mut finished, mut current) = (0, None);
        let sd = StableDiffusion::load(&ckpt, &device, precision.dtype(), &mut |p| {
            if current.is_some_and(|(c, _)| c != p.component) {
                finished += current.map_or(0, |(_, n)| n);
            }
            current = Some((p.component, p.tensors_total));
            respond(Response::ModelProgress {
                done: finished + p.tensors_done,
                total,
            })
        })
        .await
        .map_err(weights_error)?;
        let fingerprint = fingerprint(&sd).await.map_err(WorkerError::Other)?;
        let info = ModelInfo {
            id: id.into(),
            name: manifest.name.clone(),
            family: ckpt.family,
            dtype: precision.to_string(),
            params,
            resolution,
            fit,
            millis: started.elapsed().as_secs_f64() * 1e3,
        };
        *state.model.borrow_mut() = Some(Rc::new(Loaded {
            sd,
            scheduler: ckpt.scheduler.clone(),
            fingerprint,
            device,
            info: info.clone(),
        }));
        Ok(info)
    }

    fn model(state: &State) -> Result<Rc<Loaded>, WorkerError> {
        state.model.borrow().clone().ok_or(WorkerError::NoModel)
    }

    fn train_error(e: TrainError) -> WorkerError {
        WorkerError::Other(e.to_string())
    }

    fn identity_error(e: IdentityError) -> WorkerError {
        WorkerError::BadIdentity(e.to_string())
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
            train_error(e)
        }
    }

    impl From<IdentityError> for WorkerError {
        fn from(e: IdentityError) -> Self {
            identity_error(e)
        }
    }

    async fn train(
        state: &State,
        job: TrainJob,
        respond: &dyn Fn(Response),
    ) -> Result<(), WorkerError> {
        let loaded = model(state)?;
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
        };
        let mut stop = || {
            state
                .stop_training
                .take()
                .map(|cancel| if cancel { Stop::Cancel } else { Stop::Pause })
        };
        let mut on_event = |event: TrainEvent| -> Result<(), WorkerError> {
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
            });
            Ok(())
        };
        respond(
            match session::run(&trainer, &mut st, &schedule, &mut stop, &mut on_event).await? {
                Finished::Done(identity) => Response::TrainDone {
                    identity: ByteBuf::from(identity.to_bytes()?),
                },
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
            let id = Identity::from_bytes("identity", bytes.into_vec())
                .await
                .map_err(identity_error)?;
            match id.check_model(loaded.sd.family, &loaded.fingerprint) {
                Ok(()) => {}
                Err(e @ IdentityError::OtherModel { .. }) => warnings.push(e.to_string()),
                Err(e) => {
                    // Only an identity the prompt uses must fit the model.
                    if req.prompt.contains(&format!("<{}>", id.token)) {
                        return Err(identity_error(e));
                    }
                    continue;
                }
            }
            identities.push(id);
        }
        let batch = if req.guidance > 1.0 { 2 } else { 1 } * req.num_images;
        if let Some(limit) = loaded.info.fit.binding_limit {
            let need = fit::attention_bytes(&loaded.sd.config.unet, req.width, req.height, batch);
            if need > limit {
                return Err(WorkerError::OutOfMemory(format!(
                    "{}x{} with {} image(s) needs a {} MiB attention buffer, and this GPU allows {} MiB. Choose {} px or less, or fewer images at once.",
                    req.width,
                    req.height,
                    req.num_images,
                    need >> 20,
                    limit >> 20,
                    fit::largest_side(&loaded.sd.config.unet, batch, limit)
                )));
            }
        }
        let generated = pipeline::generate(
            &loaded.sd,
            &loaded.scheduler,
            &req,
            &identities,
            &GivenNoise::default(),
            &loaded.device,
            &mut |event| {
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
        let mut images = Vec::new();
        for (i, image) in generated.images.iter().enumerate() {
            let seed = req.seed.wrapping_add(i as u64);
            let parameters = pipeline::png::parameters_text(&req, seed, &job.model_name);
            let png = pipeline::png::encode(image, &parameters).map_err(WorkerError::Other)?;
            images.push(GenImage {
                png: ByteBuf::from(png),
                seed,
                width: image.width,
                height: image.height,
                parameters,
            });
        }
        Ok(Response::GenDone { images, warnings })
    }
}
