//! `sefi score`: how much the faces in images look like identities (or photos), the numbers
//! the page shows on every image.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::Device;
use clap::Args;

use super::shared;
use crate::clip::{ClipFolder, PromptFidelity, plain_prompt};
use crate::device::{ComputeDevice, DeviceChoice, Precision};
use crate::face::FaceScore;
use crate::face::score::{FaceModels, Reference};
use crate::face::{FaceDetector, FaceError, FaceRecognizer};
use crate::identity::Identity;

/// The face models' files, as the site serves them (`www/models/`).
const DETECTOR: &str = "face_detection_short_range.safetensors";
const RECOGNITION_MANIFEST: &str = "face_recognition_model-weights_manifest.json";
const RECOGNITION_WEIGHTS: &str = "face_recognition_model.bin";
/// Names a folder that holds them.
pub(crate) const MODELS_ENV: &str = "SEFI_FACE_MODELS";

/// Where the face models are: `$SEFI_FACE_MODELS`, else `models/` beside the binary, else the
/// source tree's `www/models/` (what `cargo run` and `cargo install --path .` find). They are
/// read from disk rather than built into the binary, which stays 4 MB smaller.
fn models_dir() -> Result<PathBuf, String> {
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("models")));
    let candidates = std::env::var_os(MODELS_ENV)
        .map(PathBuf::from)
        .into_iter()
        .chain(beside_binary)
        .chain([Path::new(env!("CARGO_MANIFEST_DIR")).join("www/models")]);
    for dir in candidates {
        if dir.join(DETECTOR).is_file() {
            return Ok(dir);
        }
    }
    Err(format!(
        "the face models are not found: set {MODELS_ENV} to a folder holding {DETECTOR}, {RECOGNITION_MANIFEST} and {RECOGNITION_WEIGHTS} (the site's models/ folder, www/models in the sources)"
    ))
}

/// The face detector and recognition network on a device.
pub(crate) fn face_models(device: &Device) -> Result<FaceModels, String> {
    let dir = models_dir()?;
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| {
            format!(
                "cannot read the face model {}: {e}",
                dir.join(name).display()
            )
        })
    };
    let bad = |e: FaceError| e.to_string();
    let manifest = String::from_utf8(read(RECOGNITION_MANIFEST)?)
        .map_err(|e| format!("{RECOGNITION_MANIFEST}: {e}"))?;
    Ok(FaceModels {
        detector: FaceDetector::from_safetensors(&read(DETECTOR)?, device).map_err(bad)?,
        recognizer: FaceRecognizer::from_tfjs(&manifest, &read(RECOGNITION_WEIGHTS)?, device)
            .map_err(bad)?,
    })
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// An identity file: its faces are those of the photos it was learned from. Repeatable;
    /// each face in an image is matched to its most similar identity.
    #[arg(long = "identity")]
    pub identities: Vec<PathBuf>,
    /// A photo to compare with (its most confident face), for identity files that hold no
    /// faces. Repeatable.
    #[arg(long = "photo")]
    pub photos: Vec<PathBuf>,
    /// The images to score (PNG or JPEG).
    #[arg(long = "image", required = true, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// A CLIP model folder (openai/clip-vit-large-patch14 from the Hub) to score prompt
    /// fidelity (CLIP-T): the cosine between each image and its prompt.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// The prompt the images were made from, for --clip; by default each PNG's own (its
    /// parameters). Identities' `<name>`s are read as their class words.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "auto", value_parser = shared::parse_device)]
    pub device: DeviceChoice,
}

/// The scores of one image.
#[derive(serde::Serialize)]
struct Scored {
    image: String,
    faces: Vec<FaceScore>,
    /// Prompt fidelity, where a CLIP model was given.
    clip_t: Option<f32>,
}

/// A CLIP folder's model on `dev`, in f16 on GPUs that have it (CLIP ViT-L/14 is 1.7 GB in f32).
pub(crate) fn prompt_fidelity(dir: &Path, dev: &ComputeDevice) -> Result<PromptFidelity, String> {
    let what = |e: &dyn std::fmt::Display| format!("--clip: {e}");
    let folder = crate::block_on(ClipFolder::open_dir(dir)).map_err(|e| what(&e))?;
    let precision = dev.info.resolve(Precision::Auto).map_err(|e| what(&e))?;
    crate::block_on(PromptFidelity::load(folder, &dev.device, precision.dtype()))
        .map_err(|e| what(&e))
}

/// The prompt of a generated PNG, from its parameters.
fn png_prompt(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = crate::pipeline::png::read_parameters(&path.display().to_string(), &bytes)
        .map_err(|e| format!("{e}; give the prompt with --prompt"))?;
    Ok(crate::pipeline::png::Parameters::parse(&text).prompt)
}

pub fn run(args: ScoreArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dev = crate::block_on(args.device.open())?;
    let models = face_models(&dev.device)?;
    let mut references = Vec::new();
    let mut class_words = Vec::new();
    for path in &args.identities {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the identity {}: {e}", path.display()))?;
        let identity = crate::block_on(Identity::from_bytes(&path.display().to_string(), bytes))?;
        class_words.push((identity.token.clone(), identity.class_word.clone()));
        match identity.face_reference() {
            Some(reference) => references.push(reference),
            None => eprintln!(
                "{} holds no faces (learned before scores existed, or its photos show none): give its photo with --photo",
                path.display()
            ),
        }
    }
    for path in &args.photos {
        let image = shared::read_photo(path)?;
        let face = crate::block_on(models.photo_face(&image, None))?
            .ok_or_else(|| format!("no face found in the photo {}", path.display()))?;
        references.push(Reference {
            name: path.display().to_string(),
            faces: vec![face],
        });
    }
    if references.is_empty() && args.clip.is_none() {
        return Err("nothing to compare with: give --identity (a file that holds its photos' faces), --photo, or --clip for prompt fidelity".into());
    }
    let clip = args
        .clip
        .as_deref()
        .map(|dir| prompt_fidelity(dir, &dev))
        .transpose()?;
    let class_words: Vec<(&str, &str)> = class_words
        .iter()
        .map(|(t, c)| (t.as_str(), c.as_str()))
        .collect();
    let mut scored = Vec::new();
    for path in &args.images {
        let image = shared::read_photo(path)?;
        let faces = match references.is_empty() {
            true => Vec::new(),
            false => crate::block_on(models.score(&image, &references))?,
        };
        let clip_t = match &clip {
            Some(clip) => {
                let prompt = match &args.prompt {
                    Some(p) => p.clone(),
                    None => png_prompt(path)?,
                };
                let plain = plain_prompt(&prompt, &class_words);
                Some(crate::block_on(clip.scores(&plain, std::slice::from_ref(&image)))?[0])
            }
            None => None,
        };
        if !args.json {
            if !references.is_empty() {
                print_scores(&path.display().to_string(), &faces);
            }
            if let Some(c) = clip_t {
                print_clip_t(&path.display().to_string(), c);
            }
        }
        scored.push(Scored {
            image: path.display().to_string(),
            faces,
            clip_t,
        });
    }
    if args.json {
        println!("{}", serde_json::json!({ "images": scored }));
    }
    Ok(ExitCode::SUCCESS)
}

/// One line an image: how well it follows its prompt.
pub(crate) fn print_clip_t(image: &str, score: f32) {
    println!("{image}: prompt fidelity (CLIP-T) {score:.3}");
}

/// One line an image: each face's most similar reference and its similarity.
pub(crate) fn print_scores(image: &str, faces: &[FaceScore]) {
    if faces.is_empty() {
        println!("{image}: no face found");
    }
    for (i, f) in faces.iter().enumerate() {
        let [x0, y0, x1, y1] = f.face.bbox;
        println!(
            "{image}: face {} at ({x0:.0}, {y0:.0})-({x1:.0}, {y1:.0}): {} {:.3}{}",
            i + 1,
            f.identity.as_deref().unwrap_or("-"),
            f.similarity,
            if f.same_person {
                " (same person)"
            } else {
                " (someone else)"
            }
        );
    }
}
