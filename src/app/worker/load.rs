//! A stored model onto the GPU: its files read in parts from the browser's storage, the
//! checkpoint opened from their headers and configs, the weights streamed to the device.

use std::rc::Rc;

use web_time::Instant;

use super::state::{Loaded, State, clip_bytes, device};
use crate::app::acquire::{part_prefix, read_manifest};
use crate::app::catalog::{Manifest, ModelKind, PART_SIZE};
use crate::app::fit;
use crate::app::protocol::{ModelInfo, Response, WorkerError};
use crate::device::Precision;
use crate::identity::condition::fingerprint;
use crate::sd::{self, StableDiffusion};
use crate::store::{PartsSource, Store, StoreError};
use crate::weights::checkpoint::{Shards, pad_token_of, shard_names};
use crate::weights::{
    ByteSource, Checkpoint, Component, DiffusersParts, TokenizerSource, WeightsError,
};

pub(super) fn bad_model(e: impl ToString) -> WorkerError {
    WorkerError::BadModel(e.to_string())
}

pub(super) fn storage(e: StoreError) -> WorkerError {
    WorkerError::Other(e.to_string())
}

pub(super) async fn source(
    store: &Store,
    m: &Manifest,
    path: &str,
) -> Result<PartsSource, WorkerError> {
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

pub(super) async fn text(
    store: &Store,
    m: &Manifest,
    path: &str,
) -> Result<Option<String>, WorkerError> {
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
    let xl = m
        .files
        .iter()
        .any(|f| f.path.starts_with("text_encoder_2/"));
    let parts = DiffusersParts {
        unet: weights(store, m, Component::Unet).await?,
        text_encoder: weights(store, m, Component::TextEncoder).await?,
        vae: weights(store, m, Component::Vae).await?,
        text_encoder_2: if xl {
            weights(store, m, Component::TextEncoder2).await?
        } else {
            Vec::new()
        },
        unet_config: text(store, m, "unet/config.json").await?,
        text_encoder_config: text(store, m, "text_encoder/config.json").await?,
        text_encoder_2_config: text(store, m, "text_encoder_2/config.json").await?,
        model_index: text(store, m, "model_index.json").await?,
        vae_config: text(store, m, "vae/config.json").await?,
        scheduler_config: text(store, m, "scheduler/scheduler_config.json").await?,
        tokenizer: tokenizer(store, m, "tokenizer").await?,
        tokenizer_2: tokenizer(store, m, "tokenizer_2").await?,
    };
    Checkpoint::diffusers(&m.name, parts)
        .await
        .map_err(bad_model)
}

/// One model's stored weights: its file (full precision first), or the shards its index lists.
pub(super) async fn weights(
    store: &Store,
    m: &Manifest,
    c: Component,
) -> Result<Shards, WorkerError> {
    let stem = c.weights_stem();
    let path = |file: &str| c.path(&format!("{stem}{file}"));
    let boxed = |s: PartsSource| -> Box<dyn ByteSource> { Box::new(s) };
    for single in [path(".safetensors"), path(".fp16.safetensors")] {
        if m.file(&single).is_some() {
            return Ok(vec![boxed(source(store, m, &single).await?)]);
        }
    }
    for index in [
        path(".safetensors.index.json"),
        path(".safetensors.index.fp16.json"),
    ] {
        if let Some(text) = text(store, m, &index).await? {
            let mut shards = Vec::new();
            for name in shard_names(&index, &text).map_err(bad_model)? {
                shards.push(boxed(source(store, m, &c.path(&name)).await?));
            }
            return Ok(shards);
        }
    }
    Err(bad_model(format!(
        "{} is missing from the stored model",
        path(".safetensors")
    )))
}

/// `file` in the stored model's folder `dir` ("" for its top).
fn in_dir(dir: &str, file: &str) -> String {
    match dir {
        "" => file.to_string(),
        dir => format!("{dir}/{file}"),
    }
}

/// A stored tokenizer folder's files, with its pad token; `None` if it has none.
pub(super) async fn tokenizer(
    store: &Store,
    m: &Manifest,
    dir: &str,
) -> Result<Option<TokenizerSource>, WorkerError> {
    let (Some(vocab), Some(merges)) = (
        text(store, m, &in_dir(dir, "vocab.json")).await?,
        text(store, m, &in_dir(dir, "merges.txt")).await?,
    ) else {
        return Ok(None);
    };
    let mut configs = Vec::new();
    for f in ["special_tokens_map.json", "tokenizer_config.json"] {
        configs.extend(text(store, m, &in_dir(dir, f)).await?);
    }
    Ok(Some(TokenizerSource::Texts {
        vocab,
        merges,
        pad_token: pad_token_of(&configs.iter().map(String::as_str).collect::<Vec<_>>()),
    }))
}

pub(super) fn weights_error(e: WeightsError) -> WorkerError {
    match e {
        WeightsError::Io { .. } => WorkerError::Other(e.to_string()),
        e => bad_model(e),
    }
}

/// Storage and a stored model's manifest, once its files are all there and it is of `kind`.
pub(super) async fn stored(id: &str, kind: ModelKind) -> Result<(Store, Manifest), WorkerError> {
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
    if manifest.kind != kind {
        return Err(bad_model(match kind {
            ModelKind::StableDiffusion => format!(
                "{} is a CLIP model, which scores images; add it under \"Prompt fidelity\" and load a Stable Diffusion model here",
                manifest.name
            ),
            ModelKind::Clip => format!(
                "{} is a Stable Diffusion model, not a CLIP model; give the folder of {}",
                manifest.name,
                crate::app::catalog::CLIP_ADDRESS
            ),
        }));
    }
    Ok((store, manifest))
}

pub(super) async fn load_model(
    state: &State,
    id: &str,
    respond: &dyn Fn(Response),
) -> Result<ModelInfo, WorkerError> {
    let started = Instant::now();
    let (store, manifest) = stored(id, ModelKind::StableDiffusion).await?;
    let dev = device(state).await?;
    let ckpt = open_checkpoint(&store, &manifest).await?;
    sd::validate(&ckpt, &dev.device).map_err(weights_error)?;
    let precision = dev
        .info
        .resolve(Precision::Auto)
        .map_err(|e| WorkerError::Other(e.to_string()))?;
    let bytes_per_param = if precision == Precision::F32 { 4 } else { 2 };
    let largest = sd::largest_whole_tensor(&ckpt.config, &dev.device).map_err(weights_error)?
        * bytes_per_param;
    let params: u64 = Component::ALL.iter().map(|&c| ckpt.params(c)).sum();
    let resolution = ckpt.config.unet.sample_size * ckpt.config.vae.latent_scale();
    let fit = fit::estimate(
        &ckpt.config,
        params,
        bytes_per_param,
        largest,
        resolution,
        fit::Budget::of(&dev.info).beside(clip_bytes(state)),
    );
    if !fit.weights_fit {
        return Err(WorkerError::OutOfMemory(fit.advice.join(" ")));
    }
    // Free the previous model's GPU memory before loading the next.
    state.model.borrow_mut().take();
    // Training recomputes activations in the backward pass rather than keeping them: a
    // browser tells no GPU memory size, and on SD 1.5 at 512 px this took a training step's
    // peak from 14.5 to 10.6 GiB in f32 (bench/NOTES.md). Generation is not affected.
    let device = dev.device.clone().autodiff().gradient_checkpointing();
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
