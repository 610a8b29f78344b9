//! The CLIP model in the worker: loaded from storage when the page adds one, then kept on the
//! GPU beside the Stable Diffusion model to score every generated image's prompt fidelity
//! (CLIP-T).

use std::rc::Rc;

use web_time::Instant;

use super::load::{bad_model, stored, text, tokenizer, weights, weights_error};
use super::state::{State, device};
use crate::app::catalog::ModelKind;
use crate::app::fit::gib;
use crate::app::protocol::{ClipInfo, WorkerError};
use crate::clip::folder::bundled_tokenizer;
use crate::clip::{ClipFolder, ClipParts, PromptFidelity};
use crate::device::Precision;
use crate::identity::Identity;
use crate::rgb::RgbImage;
use crate::weights::Component;

/// Loads the stored CLIP model `id` onto the GPU, in f16 where the GPU has it (half of
/// ViT-L/14's 1.7 GB), in place of the one before.
pub(super) async fn load(state: &State, id: &str) -> Result<ClipInfo, WorkerError> {
    let started = Instant::now();
    let (store, m) = stored(id, ModelKind::Clip).await?;
    let dev = device(state).await?;
    let config = text(&store, &m, "config.json")
        .await?
        .ok_or_else(|| bad_model("config.json is missing from the stored CLIP model"))?;
    let parts = ClipParts {
        config,
        preprocessor: text(&store, &m, "preprocessor_config.json").await?,
        tokenizer: tokenizer(&store, &m, "")
            .await?
            .unwrap_or_else(bundled_tokenizer),
        weights: weights(&store, &m, Component::Clip).await?,
    };
    let folder = ClipFolder::open(&m.name, parts)
        .await
        .map_err(weights_error)?;
    let params = folder.params();
    let precision = dev
        .info
        .resolve(Precision::Auto)
        .map_err(|e| WorkerError::Other(e.to_string()))?;
    // Where the GPU's memory is known, the model's weights and the CLIP model's must fit it
    // together (a run's own memory is weighed before it starts).
    let bytes = folder.weight_bytes(precision.dtype());
    let model = state.model.borrow().as_ref().map(|m| m.info.clone());
    if let (Some(memory), Some(model)) = (dev.info.memory_bytes, model)
        && model.fit.weights_bytes + bytes > memory
    {
        return Err(WorkerError::OutOfMemory(format!(
            "The CLIP model needs {} of GPU memory beside {}'s {}, and this GPU has {}: images go on without its score. A model in f16 or a smaller one leaves room for it.",
            gib(bytes),
            model.name,
            gib(model.fit.weights_bytes),
            gib(memory)
        )));
    }
    // Free the previous CLIP model's GPU memory before loading the next.
    state.clip.borrow_mut().take();
    let clip = PromptFidelity::load(folder, &dev.device, precision.dtype())
        .await
        .map_err(weights_error)?;
    *state.clip.borrow_mut() = Some(Rc::new(clip));
    Ok(ClipInfo {
        id: id.into(),
        name: m.name.clone(),
        dtype: precision.to_string(),
        params,
        millis: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// Each image's CLIP-T against the prompt, read with the identities' class words in place of
/// their placeholders; `None` for each where no CLIP model is loaded.
pub(super) async fn score(
    state: &State,
    prompt: &str,
    identities: &[Identity],
    images: &[RgbImage],
) -> Result<Vec<Option<f32>>, WorkerError> {
    let clip = state.clip.borrow().clone();
    let Some(clip) = clip else {
        return Ok(vec![None; images.len()]);
    };
    let plain = Identity::plain_prompt(prompt, identities);
    let scores = clip
        .scores(&plain, images)
        .await
        .map_err(|e| WorkerError::Other(format!("the images could not be scored by CLIP: {e}")))?;
    Ok(scores.into_iter().map(Some).collect())
}
