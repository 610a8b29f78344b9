//! Messages between the page and the worker, and how they cross `postMessage`. Byte payloads
//! (photos, identity files, PNGs) are `ByteBuf`s, which cross as `Uint8Array`s.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use wasm_bindgen::JsValue;

use super::fit::FitReport;
use super::view::ErrorKind;
use crate::check::CheckReport;
use crate::device::DeviceInfo;
use crate::face::{Face, FaceScore};
use crate::identity::settings::{StepReport, TrainConfig};
use crate::pipeline::GenerateRequest;
use crate::weights::Family;

/// Page → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Open the WebGPU device, report it, and run the autodiff check on it.
    GpuCheck,
    /// Load the stored model `models/<id>` onto the GPU (replacing any other).
    LoadModel {
        /// The stored model's id.
        id: String,
    },
    /// Load the stored CLIP model `models/<id>` onto the GPU (replacing any other): from then
    /// on every generated image is scored for prompt fidelity (CLIP-T).
    LoadClip {
        /// The stored CLIP model's id.
        id: String,
    },
    /// Free the CLIP model's GPU memory; images are no longer scored for prompt fidelity.
    UnloadClip,
    /// Train an identity on the loaded model (or continue from a checkpoint).
    Train(TrainJob),
    /// Stop training after the current step: `cancel` discards it, otherwise the answer
    /// carries a checkpoint to continue from.
    StopTraining {
        /// Discard the run instead of pausing it.
        cancel: bool,
    },
    /// Generate images with the loaded model.
    Generate(GenerateJob),
    /// Stop the generation after the current step.
    CancelGenerate,
    /// Find the faces in a photo: its pixels as the page shows it (at most
    /// [`FACE_PHOTO_SIDE`] on a side), RGB bytes row by row.
    FindFaces {
        /// The page's name for the photo, given back with the faces.
        key: u32,
        /// Pixels.
        width: usize,
        /// Pixels.
        height: usize,
        /// `width * height * 3` bytes.
        rgb: ByteBuf,
    },
}

/// The longest side of a photo the page sends to be searched for faces: the detector sees
/// 128 pixels, and a phone's 12-megapixel photo would be 36 MB.
pub const FACE_PHOTO_SIDE: u32 = 1024;

/// A training run to start or continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    /// The run's settings.
    pub config: TrainConfig,
    /// The photos, cropped to their squares, as PNG files.
    pub photos: Vec<ByteBuf>,
    /// A checkpoint to continue from.
    pub resume: Option<ByteBuf>,
    /// Send a checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// Send attention maps every this many steps.
    pub maps_every: usize,
    /// Draw a preview image of the identity so far every this many steps, scored against the
    /// photos' faces (0: none).
    pub previews_every: usize,
}

/// A generation to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateJob {
    /// Prompts, sampler, size, seed.
    pub request: GenerateRequest,
    /// Identity files the prompt may refer to.
    pub identities: Vec<ByteBuf>,
    /// For the PNG's parameters.
    pub model_name: String,
}

/// Worker → page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The device and its check, or why there is none.
    GpuCheck(Result<GpuReport, WorkerError>),
    /// Tensors moved to the GPU so far.
    ModelProgress {
        /// Tensors loaded.
        done: usize,
        /// Tensors in the model.
        total: usize,
    },
    /// The model is on the GPU.
    ModelReady(ModelInfo),
    /// The model could not be loaded.
    ModelFailed(WorkerError),
    /// The CLIP model is on the GPU.
    ClipReady(ClipInfo),
    /// The CLIP model could not be loaded (images go on without its score).
    ClipFailed(WorkerError),
    /// A training step's report.
    TrainStep(StepReport),
    /// Heat-maps over the training square: the identity token's and the class word's
    /// attention, as PNGs with transparency.
    TrainMaps {
        /// Steps done when they were made (0: before training).
        step: usize,
        /// The identity token's map.
        identity: ByteBuf,
        /// The class word's map (the target).
        class: ByteBuf,
    },
    /// A denoising step of a preview done (training is busy drawing it).
    TrainPreviewStep {
        /// Denoising steps done.
        step: usize,
        /// Denoising steps in the preview.
        total: usize,
    },
    /// A preview of the identity so far: "a photo of <token>".
    TrainPreview {
        /// Steps done when it was drawn.
        step: usize,
        /// The image, as PNG.
        png: ByteBuf,
        /// Its face's similarity to the photos' faces; `None` where it shows none.
        likeness: Option<f32>,
    },
    /// This run draws no previews, and why (the GPU's memory left for one is too little).
    TrainNoPreviews {
        /// What to tell the user.
        why: String,
    },
    /// A checkpoint to store (an identity file with the optimizer's state).
    TrainCheckpoint {
        /// Steps in the checkpoint.
        step: usize,
        /// The checkpoint file.
        bytes: ByteBuf,
    },
    /// Stopped on request; `checkpoint` continues it (absent when cancelled).
    TrainStopped {
        /// Steps done.
        step: usize,
        /// The checkpoint file (a pause).
        checkpoint: Option<ByteBuf>,
    },
    /// Finished: the identity file.
    TrainDone {
        /// The identity file's bytes.
        identity: ByteBuf,
    },
    /// Training stopped on an error.
    TrainFailed(WorkerError),
    /// A denoising step done.
    GenStep {
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
        /// A cheap look at the latents (PNG, 1/8 size).
        preview: Option<ByteBuf>,
    },
    /// The images.
    GenDone {
        /// One per image asked for.
        images: Vec<GenImage>,
        /// What the pipeline warned about.
        warnings: Vec<String>,
    },
    /// The generation stopped on an error (or was cancelled).
    GenFailed(WorkerError),
    /// The faces in a photo (in the pixels it was sent in), the most confident first.
    Faces {
        /// The photo's key, as sent.
        key: u32,
        /// The faces, or why they could not be looked for.
        faces: Result<Vec<Face>, WorkerError>,
    },
    /// The worker hit an error it cannot recover from; the page starts a new one.
    Crashed(WorkerError),
}

/// The "Your GPU" panel's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GpuReport {
    /// The adapter and what it can do.
    pub device: DeviceInfo,
    /// The autodiff check's result on it.
    pub check: CheckReport,
}

/// A model on the GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The stored model's id.
    pub id: String,
    /// Its name, as the catalog or the user gave it.
    pub name: String,
    /// SD 1.x, 2.x (epsilon or v-prediction).
    pub family: Family,
    /// Precision of the weights on the GPU.
    pub dtype: String,
    /// Parameters of the three networks.
    pub params: u64,
    /// Native resolution (training default).
    pub resolution: usize,
    /// What fits this GPU: sizes for generation and training.
    pub fit: FitReport,
    /// How long loading took.
    pub millis: f64,
}

/// A CLIP model on the GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipInfo {
    /// The stored model's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Precision of the weights on the GPU.
    pub dtype: String,
    /// Parameters of both towers with their projections.
    pub params: u64,
    /// How long loading took.
    pub millis: f64,
}

/// One generated image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenImage {
    /// PNG with the parameters embedded.
    pub png: ByteBuf,
    /// The seed that makes this image again.
    pub seed: u64,
    /// Pixels.
    pub width: usize,
    /// Pixels.
    pub height: usize,
    /// The parameters text (as in the PNG's `parameters` chunk).
    pub parameters: String,
    /// Its faces, each with its most similar identity of the prompt; `None` where the prompt
    /// names no identity that keeps its photos' faces.
    pub faces: Option<Vec<FaceScore>>,
    /// Its prompt fidelity (CLIP-T), where a CLIP model is loaded.
    pub clip_t: Option<f32>,
}

/// A failure the page explains to the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WorkerError {
    /// The browser has no usable WebGPU adapter; the text is the technical reason (the page
    /// adds what to do).
    NoWebGpu(String),
    /// The GPU ran out of memory or refused a buffer this large.
    OutOfMemory(String),
    /// The GPU device stopped (driver reset, GPU removed, browser's own limit).
    DeviceLost(String),
    /// The worker made no progress for far longer than its steps take (a hung driver).
    Stalled(String),
    /// The page and the worker come from different builds.
    Outdated(String),
    /// The model cannot be used (damaged, unsupported, wrong files).
    BadModel(String),
    /// An identity file cannot be used with this model.
    BadIdentity(String),
    /// A photo cannot be decoded.
    BadPhoto(String),
    /// No model is loaded yet.
    NoModel,
    /// Anything else, with the message to show.
    Other(String),
}

impl WorkerError {
    /// The `data-kind` the page shows it with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkerError::NoWebGpu(_) => ErrorKind::NoWebGpu,
            WorkerError::OutOfMemory(_) => ErrorKind::OutOfMemory,
            WorkerError::DeviceLost(_) => ErrorKind::DeviceLost,
            WorkerError::Stalled(_) => ErrorKind::Stalled,
            WorkerError::Outdated(_) => ErrorKind::Outdated,
            WorkerError::BadModel(_) => ErrorKind::BadModel,
            WorkerError::BadIdentity(_) => ErrorKind::BadIdentity,
            WorkerError::BadPhoto(_) => ErrorKind::BadPhoto,
            WorkerError::NoModel => ErrorKind::NoModel,
            WorkerError::Other(_) => ErrorKind::Other,
        }
    }

    /// The GPU device was taken away (`reason`: the browser's words). The page starts a new
    /// worker and loads the model again.
    pub fn device_lost(reason: &str) -> Self {
        WorkerError::DeviceLost(format!(
            "The GPU stopped working for this page ({reason}); this happens when the driver resets or the browser reclaims the GPU. A new GPU worker was started and the model is loading again; your identities, checkpoints and images are safe in storage, and training can continue from its last checkpoint."
        ))
    }

    /// Whether a GPU error message says memory ran out (WebGPU's words, or cubecl's "can't
    /// allocate buffer").
    pub fn is_out_of_memory(message: &str) -> bool {
        let m = message.to_ascii_lowercase();
        m.contains("out of memory") || m.contains("outofmemory") || m.contains("allocat")
    }

    /// Sorts a panic or GPU error message by its cause.
    pub fn from_crash(message: &str) -> Self {
        let m = message.to_ascii_lowercase();
        if Self::is_out_of_memory(message) {
            WorkerError::OutOfMemory(format!(
                "The GPU ran out of memory ({message}). Choose a smaller size or fewer images, close other tabs that use the GPU, then load the model again."
            ))
        } else if m.contains("lost") || m.contains("device is destroyed") {
            WorkerError::device_lost(message)
        } else if m.contains("max_buffer_size")
            || m.contains("buffer size")
            || m.contains("binding size")
        {
            WorkerError::OutOfMemory(format!(
                "The GPU refused a buffer this large ({message}). Choose a smaller size."
            ))
        } else {
            WorkerError::Other(format!(
                "The GPU worker stopped: {message}. Load the model again; your identities, checkpoints and images are safe in storage."
            ))
        }
    }
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerError::NoModel => f.write_str("load a model first"),
            WorkerError::NoWebGpu(m)
            | WorkerError::OutOfMemory(m)
            | WorkerError::DeviceLost(m)
            | WorkerError::Stalled(m)
            | WorkerError::Outdated(m)
            | WorkerError::BadModel(m)
            | WorkerError::BadIdentity(m)
            | WorkerError::BadPhoto(m)
            | WorkerError::Other(m) => f.write_str(m),
        }
    }
}

/// This build of the sources (a hash made by `build.rs`). The page and the worker of one
/// deployment share it.
pub const BUILD: &str = concat!("sefi-", env!("SEFI_BUILD"));

/// A message stamped with the build that sent it. After a redeploy a page can meet a worker of
/// another build (the worker's script has a fixed name and may come from a cache): every
/// message says its build, and one from another build, or of a shape this build cannot read,
/// arrives as [`Versioned::Foreign`] instead of failing to decode.
#[derive(Clone, Debug, PartialEq)]
pub enum Versioned<T> {
    /// A message of this build.
    Ours(T),
    /// A message of another build; `build` is its id as far as it can be read.
    Foreign {
        /// The sender's build.
        build: String,
    },
}

#[derive(Serialize)]
struct Stamped<'a, T> {
    build: &'a str,
    body: Option<&'a T>,
}

impl<T: Serialize> Serialize for Versioned<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Versioned::Ours(body) => Stamped {
                build: BUILD,
                body: Some(body),
            },
            Versioned::Foreign { build } => Stamped { build, body: None },
        }
        .serialize(s)
    }
}

impl<'de, T: for<'a> Deserialize<'a>> Deserialize<'de> for Versioned<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Taken as a plain JS value first, so that nothing about its shape can fail here.
        let raw: JsValue = serde_wasm_bindgen::preserve::deserialize(d)?;
        let field = |name: &str| js_sys::Reflect::get(&raw, &name.into()).ok();
        let Some(build) = field("build").and_then(|b| b.as_string()) else {
            return Ok(Versioned::Foreign {
                build: "an older build".into(),
            });
        };
        if build != BUILD {
            return Ok(Versioned::Foreign { build });
        }
        Ok(field("body")
            .and_then(|body| serde_wasm_bindgen::from_value(body).ok())
            .map_or_else(
                || Versioned::Foreign {
                    build: format!("{build}, with a message this build cannot read"),
                },
                Versioned::Ours,
            ))
    }
}

/// What the page says when its worker is of another build.
pub fn outdated(theirs: &str) -> WorkerError {
    WorkerError::Outdated(format!(
        "SeFi Studio was updated while this page was open: the page is build {BUILD} and its GPU worker is {theirs}. Reload the page to use the new version; your models, identities and images stay in storage."
    ))
}

/// Messages cross as structured-clone JS values (serde-wasm-bindgen) rather than bincode
/// bytes: cheaper for large arrays and readable in the browser's devtools.
pub struct JsCodec;

impl gloo_worker::Codec for JsCodec {
    fn encode<I: Serialize>(input: I) -> JsValue {
        serde_wasm_bindgen::to_value(&input).expect("worker messages are plain data")
    }

    fn decode<O: for<'de> Deserialize<'de>>(input: JsValue) -> O {
        // What we send inside gloo's envelope is [`Versioned`], which decodes whatever the
        // other side sent; only gloo's own envelope (its version is pinned) could fail here.
        serde_wasm_bindgen::from_value(input).expect("a gloo-worker envelope of an unknown shape")
    }
}
