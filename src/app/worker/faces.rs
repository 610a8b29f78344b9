//! The face models in the worker: fetched from the site (`models/`) and built on the GPU at
//! their first use, then kept. They find the faces in the page's photos, record the training
//! photos' faces in the identity, and score generated images.

use std::rc::Rc;

use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;

use super::state::{State, device};
use crate::app::protocol::WorkerError;
use crate::face::score::FaceModels;
use crate::face::{Face, FaceDetector, FaceRecognizer, FaceScore};
use crate::identity::Identity;
use crate::rgb::RgbImage;

/// Where the site serves the models, beside the worker's script.
const DETECTOR: &str = "models/face_detection_short_range.safetensors";
const RECOGNITION_MANIFEST: &str = "models/face_recognition_model-weights_manifest.json";
const RECOGNITION_WEIGHTS: &str = "models/face_recognition_model.bin";

/// A file of the site, from the worker.
async fn fetch(path: &str) -> Result<Vec<u8>, WorkerError> {
    let fail = |why: String| {
        WorkerError::Other(format!(
            "The face models could not be loaded from this site ({path}: {why}); reload the page."
        ))
    };
    let scope: web_sys::WorkerGlobalScope = js_sys::global().unchecked_into();
    let response: web_sys::Response = JsFuture::from(scope.fetch_with_str(path))
        .await
        .map_err(|e| fail(format!("{e:?}")))?
        .unchecked_into();
    if !response.ok() {
        return Err(fail(format!("HTTP {}", response.status())));
    }
    let buffer = JsFuture::from(
        response
            .array_buffer()
            .map_err(|e| fail(format!("{e:?}")))?,
    )
    .await
    .map_err(|e| fail(format!("{e:?}")))?;
    Ok(js_sys::Uint8Array::new(&buffer).to_vec())
}

/// The face models, loaded once.
pub(super) async fn models(state: &State) -> Result<Rc<FaceModels>, WorkerError> {
    if let Some(m) = state.faces.borrow().as_ref() {
        return Ok(m.clone());
    }
    let device = device(state).await?.device;
    let bad = |e: crate::face::FaceError| WorkerError::Other(e.to_string());
    let detector = FaceDetector::from_safetensors(&fetch(DETECTOR).await?, &device).map_err(bad)?;
    let manifest = String::from_utf8(fetch(RECOGNITION_MANIFEST).await?)
        .map_err(|e| WorkerError::Other(e.to_string()))?;
    let recognizer =
        FaceRecognizer::from_tfjs(&manifest, &fetch(RECOGNITION_WEIGHTS).await?, &device)
            .map_err(bad)?;
    let models = Rc::new(FaceModels {
        detector,
        recognizer,
    });
    *state.faces.borrow_mut() = Some(models.clone());
    Ok(models)
}

/// The faces in a photo the page sent.
pub(super) async fn find(
    state: &State,
    width: usize,
    height: usize,
    rgb: Vec<u8>,
) -> Result<Vec<Face>, WorkerError> {
    if rgb.len() != width * height * 3 {
        return Err(WorkerError::BadPhoto(format!(
            "the photo's pixels ({} bytes) do not match its size {width} x {height}",
            rgb.len()
        )));
    }
    let image = RgbImage {
        width,
        height,
        data: rgb,
    };
    let models = models(state).await?;
    models
        .detector
        .detect(&image)
        .await
        .map_err(|e| WorkerError::Other(e.to_string()))
}

/// Records the faces of the training squares in the identity (each square's most confident).
/// Without the models (the site unreachable), the identity is kept without them: only the
/// scores of its images are missing.
pub(super) async fn record(state: &State, identity: &mut Identity, photos: &[RgbImage]) {
    let models = match models(state).await {
        Ok(m) => m,
        Err(e) => {
            web_sys::console::warn_1(&format!("faces not recorded: {e}").into());
            return;
        }
    };
    for photo in photos {
        match models.photo_face(photo, None).await {
            Ok(Some(face)) => identity.faces.push(face.0),
            Ok(None) => {}
            Err(e) => web_sys::console::warn_1(&format!("a face not recorded: {e}").into()),
        }
    }
}

/// The faces of generated images against the identities the prompt names that keep faces:
/// `None` for every image where there are none.
pub(super) async fn score(
    state: &State,
    prompt: &str,
    identities: &[Identity],
    images: &[RgbImage],
) -> Result<Vec<Option<Vec<FaceScore>>>, WorkerError> {
    let references = Identity::named_in(prompt, identities);
    if references.is_empty() {
        return Ok(vec![None; images.len()]);
    }
    let models = models(state).await?;
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        out.push(Some(
            models
                .score(image, &references)
                .await
                .map_err(|e| WorkerError::Other(e.to_string()))?,
        ));
    }
    Ok(out)
}
