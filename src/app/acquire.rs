//! Bringing a model into storage: downloading it from an address (streamed, in parts, resumed
//! after an interruption) or copying the user's own files. Runs on the page, whose
//! Content-Security-Policy decides which hosts it may reach; the worker then reads the model
//! from storage.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;

use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{File, Headers, ReadableStreamDefaultReader, RequestInit, Response};

use super::catalog::{
    Manifest, ModelKind, ModelSource, PART_SIZE, StoredFile, Wanted, is_shard_index, model_id,
    shard_files, unet_is_xl, xl_files,
};
use super::view::ErrorKind;
use crate::store::{PartsSource, Store, StoreError, Writer, estimate};
use crate::weights::ByteSource;

/// Why a model could not be brought into storage.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AcquireError {
    #[error(
        "this site may only download models from the hosts its Content-Security-Policy lists, and {host} is not one of them (a guarantee that nothing is sent elsewhere). Download the files yourself and pick them with \"Your files\", or ask the site's owner to add the host"
    )]
    /// The page's Content-Security-Policy does not list the model's host.
    BlockedHost {
        /// The refused host.
        host: String,
    },
    /// A request failed or was answered with an error status.
    #[error("{0}")]
    Network(String),
    /// The files are not a model this app can run.
    #[error("{0}")]
    BadModel(String),
    /// Storage failed (or is full).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The user stopped it.
    #[error("stopped")]
    Cancelled,
}

impl AcquireError {
    /// The `data-kind` the page shows it with.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AcquireError::BlockedHost { .. } => ErrorKind::BlockedHost,
            AcquireError::Network(_) => ErrorKind::Network,
            AcquireError::BadModel(_) => ErrorKind::BadModel,
            AcquireError::Store(StoreError::Full) => ErrorKind::StorageFull,
            AcquireError::Store(_) => ErrorKind::Storage,
            AcquireError::Cancelled => ErrorKind::Cancelled,
        }
    }
}

/// How far a download or copy is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// The file being stored.
    pub file: String,
    /// Bytes stored so far, all files.
    pub bytes: u64,
    /// Of the current file.
    pub file_bytes: u64,
    /// The current file's size, once known.
    pub file_total: Option<u64>,
}

/// Where a stored file's parts live: `models/<id>/<path with / as __>.<part>`.
pub fn part_prefix(id: &str, path: &str) -> String {
    format!("models/{id}/{}", path.replace('/', "__"))
}

/// Where a stored model's manifest lives.
pub fn manifest_path(id: &str) -> String {
    format!("models/{id}/manifest.json")
}

/// A stored model's manifest; `None` when it is missing or unreadable.
pub async fn read_manifest(store: &Store, id: &str) -> Result<Option<Manifest>, StoreError> {
    Ok(store
        .read_text(&manifest_path(id))
        .await?
        .and_then(|t| serde_json::from_str(&t).ok()))
}

/// Writes a stored model's manifest.
pub async fn write_manifest(store: &Store, m: &Manifest) -> Result<(), StoreError> {
    let text = serde_json::to_string_pretty(m).expect("plain data");
    store.write(&manifest_path(&m.id), text.as_bytes()).await
}

/// Every stored model, most recently loaded first.
pub async fn list_models(store: &Store) -> Result<Vec<Manifest>, StoreError> {
    let mut out = Vec::new();
    for id in store.list("models").await? {
        if let Some(m) = read_manifest(store, &id).await? {
            out.push(m);
        }
    }
    out.sort_by(|a, b| b.last_used.total_cmp(&a.last_used));
    Ok(out)
}

fn now() -> f64 {
    js_sys::Date::now()
}

fn network(url: &str, e: &JsValue) -> AcquireError {
    let detail = Reflect::get(e, &"message".into())
        .ok()
        .and_then(|m| m.as_string())
        .unwrap_or_default();
    AcquireError::Network(format!(
        "could not download {url} ({detail}). Check the connection and the address; the server must allow downloads from other sites (CORS). What is stored so far is kept: load again to resume"
    ))
}

/// Bytes of the stored whole parts of a file, removing a partial last part.
async fn stored_prefix(store: &Store, prefix: &str) -> Result<u64, StoreError> {
    let mut have = 0;
    for k in 0.. {
        match store.size(&format!("{prefix}.{k}")).await? {
            Some(s) if s == PART_SIZE => have += s,
            Some(_) => {
                store.remove(&format!("{prefix}.{k}")).await?;
                break;
            }
            None => break,
        }
    }
    Ok(have)
}

/// Writes a stream of chunks into parts, starting at byte `start` of the file (a part
/// boundary), skipping the first `skip` bytes of the stream.
struct PartWriter<'a> {
    store: &'a Store,
    prefix: String,
    at: u64,
    part: Option<(Writer, u64)>,
}

impl PartWriter<'_> {
    async fn write(&mut self, chunk: &Uint8Array) -> Result<(), StoreError> {
        let mut offset = 0u32;
        while offset < chunk.length() {
            if self.part.is_none() {
                let k = self.at / PART_SIZE;
                let w = self.store.writer(&format!("{}.{k}", self.prefix)).await?;
                self.part = Some((w, 0));
            }
            let (w, filled) = self.part.as_mut().expect("opened above");
            let room = (PART_SIZE - *filled).min(u64::from(chunk.length() - offset)) as u32;
            w.write_js(&chunk.subarray(offset, offset + room)).await?;
            *filled += u64::from(room);
            self.at += u64::from(room);
            offset += room;
            if *filled == PART_SIZE {
                let (w, _) = self.part.take().expect("open");
                w.close().await?;
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64, StoreError> {
        if let Some((w, _)) = self.part.take() {
            w.close().await?;
        }
        Ok(self.at)
    }

    async fn abort(mut self) {
        if let Some((w, _)) = self.part.take() {
            w.abort().await;
        }
    }
}

fn header(h: &Headers, name: &str) -> Option<String> {
    h.get(name).ok().flatten()
}

/// Total size from `Content-Range: bytes a-b/total` or `Content-Length`.
fn total_size(resp: &Response) -> Option<u64> {
    let h = resp.headers();
    if resp.status() == 206 {
        header(&h, "content-range").and_then(|r| r.rsplit('/').next()?.parse().ok())
    } else {
        header(&h, "content-length").and_then(|l| l.parse().ok())
    }
}

async fn fetch(url: &str, from: u64) -> Result<Response, AcquireError> {
    request(url, "GET", from).await
}

/// A `method` request for `url`, from byte `from` on when it is not 0.
async fn request(url: &str, method: &str, from: u64) -> Result<Response, AcquireError> {
    let window = web_sys::window().expect("the page has a window");
    let init = RequestInit::new();
    init.set_method(method);
    if from > 0 {
        let headers = Headers::new().map_err(|e| network(url, &e))?;
        headers
            .set("Range", &format!("bytes={from}-"))
            .map_err(|e| network(url, &e))?;
        init.set_headers(&headers);
    }
    let resp = JsFuture::from(window.fetch_with_str_and_init(url, &init))
        .await
        .map_err(|e| network(url, &e))?;
    Ok(resp.unchecked_into())
}

/// Whether the server has `url` (a HEAD request: a pickle is named, never fetched).
async fn exists(url: &str) -> bool {
    request(url, "HEAD", 0).await.is_ok_and(|r| r.ok())
}

/// Downloads one file into parts; `Ok(None)` when the server has no such file.
async fn download_file(
    store: &Store,
    id: &str,
    path: &str,
    url: &str,
    done_before: u64,
    cancel: &Cell<bool>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<u64>, AcquireError> {
    let prefix = part_prefix(id, path);
    let have = stored_prefix(store, &prefix).await?;
    let resp = fetch(url, have).await?;
    match resp.status() {
        404 | 410 => return Ok(None),
        200 | 206 => {}
        416 if have > 0 => {
            // The stored parts already hold the whole file (the page closed before the
            // manifest said so), or the file on the server changed: then start over.
            let total = header(&resp.headers(), "content-range")
                .and_then(|r| r.rsplit('/').next()?.parse::<u64>().ok());
            if total == Some(have) {
                return Ok(Some(have));
            }
            for k in 0..have / PART_SIZE {
                store.remove(&format!("{prefix}.{k}")).await?;
            }
            return Box::pin(download_file(
                store,
                id,
                path,
                url,
                done_before,
                cancel,
                progress,
            ))
            .await;
        }
        s => {
            return Err(AcquireError::Network(format!(
                "{url} answered {s} {}; check the address (private models need to be downloaded yourself and picked as files)",
                resp.status_text()
            )));
        }
    }
    // A server that ignores `Range` sends the whole file again: skip what is stored.
    let mut skip = if resp.status() == 200 { have } else { 0 };
    let size = total_size(&resp);
    if let (Some(size), Ok((usage, quota))) = (size, estimate().await) {
        let needed = size.saturating_sub(have) as f64;
        if quota > 0.0 && usage + needed > quota {
            return Err(AcquireError::Store(StoreError::Full));
        }
    }
    let body = resp
        .body()
        .ok_or_else(|| AcquireError::Network(format!("{url} sent no body")))?;
    let reader: ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let mut writer = PartWriter {
        store,
        prefix,
        at: have,
        part: None,
    };
    let result: Result<(), AcquireError> = async {
        loop {
            if cancel.get() {
                let _ = JsFuture::from(reader.cancel()).await;
                return Err(AcquireError::Cancelled);
            }
            let item = JsFuture::from(reader.read())
                .await
                .map_err(|e| network(url, &e))?;
            if Reflect::get(&item, &"done".into())
                .ok()
                .and_then(|d| d.as_bool())
                .unwrap_or(true)
            {
                return Ok(());
            }
            let chunk: Uint8Array = Reflect::get(&item, &"value".into())
                .map_err(|e| network(url, &e))?
                .unchecked_into();
            let chunk = if skip > 0 {
                let n = skip.min(u64::from(chunk.length())) as u32;
                skip -= u64::from(n);
                chunk.subarray(n, chunk.length())
            } else {
                chunk
            };
            writer.write(&chunk).await?;
            progress(Progress {
                file: path.into(),
                bytes: done_before + writer.at,
                file_bytes: writer.at,
                file_total: size,
            });
        }
    }
    .await;
    if let Err(e) = result {
        writer.abort().await;
        return Err(e);
    }
    let got = writer.finish().await?;
    if let Some(size) = size
        && got != size
    {
        return Err(AcquireError::Network(format!(
            "{url} ended after {got} of {size} bytes; load again to resume"
        )));
    }
    Ok(Some(got))
}

/// The storage id of a model of `kind` known by `key` (its address, or its files): a CLIP
/// model is never taken for a Stable Diffusion model stored from the same address.
fn kind_id(kind: ModelKind, key: &str) -> String {
    match kind {
        ModelKind::StableDiffusion => model_id(key),
        ModelKind::Clip => model_id(&format!("clip|{key}")),
    }
}

/// Downloads a model of `kind` (or finishes an interrupted download) into storage; with
/// `vae`, a diffusers VAE folder (`config.json`, `diffusion_pytorch_model*.safetensors`) whose
/// files are stored as the model's `vae/`.
pub async fn download(
    store: &Store,
    kind: ModelKind,
    source: &ModelSource,
    fp16: bool,
    vae: Option<&ModelSource>,
    cancel: Rc<Cell<bool>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest, AcquireError> {
    if kind == ModelKind::Clip && matches!(source, ModelSource::SingleFile { .. }) {
        return Err(AcquireError::BadModel(format!(
            "give the CLIP model's folder (config.json and model.safetensors), such as {}, not one file",
            super::catalog::CLIP_ADDRESS
        )));
    }
    let vae_base = match (vae, source) {
        (None, _) => None,
        (Some(ModelSource::Folder { base }), ModelSource::Folder { .. }) => Some(base.clone()),
        (Some(ModelSource::SingleFile { .. }), _) => {
            return Err(AcquireError::BadModel(
                "give the VAE as a diffusers folder (config.json and diffusion_pytorch_model.safetensors), not one file".into(),
            ));
        }
        (Some(_), ModelSource::SingleFile { .. }) => {
            return Err(AcquireError::BadModel(
                "another VAE can replace the VAE of a diffusers folder, not of a single-file checkpoint".into(),
            ));
        }
    };
    // Another VAE makes another stored model.
    let id = match vae {
        Some(v) => kind_id(kind, &format!("{}|vae={}", source.address(), v.address())),
        None => kind_id(kind, source.address()),
    };
    let mut manifest = match read_manifest(store, &id).await? {
        Some(m) => m,
        None => Manifest {
            id: id.clone(),
            kind,
            name: match vae {
                Some(v) => format!("{} + {}", source.display_name(), v.display_name()),
                None => source.display_name(),
            },
            address: source.address().into(),
            single_file: matches!(source, ModelSource::SingleFile { .. }),
            fp16,
            vae: vae.map(|v| v.address().to_string()),
            files: Vec::new(),
            complete: false,
            last_used: 0.0,
        },
    };
    if manifest.complete {
        return Ok(manifest);
    }
    write_manifest(store, &manifest).await?;
    let (mut queue, base): (VecDeque<Wanted>, String) = match source {
        ModelSource::SingleFile { url } => (
            VecDeque::from([Wanted {
                candidates: vec!["model.safetensors".into()],
                optional: false,
                pickles: Vec::new(),
            }]),
            url.clone(),
        ),
        ModelSource::Folder { base } => (kind.folder_files(manifest.fp16).into(), base.clone()),
    };
    let mut done = 0;
    while let Some(want) = queue.pop_front() {
        let mut found = None;
        for name in &want.candidates {
            if let Some(f) = manifest.file(name).filter(|f| f.complete) {
                done += f.size.unwrap_or(0);
                found = Some(name.clone());
                break;
            }
            let url = match (&vae_base, name.strip_prefix("vae/")) {
                _ if manifest.single_file => base.clone(),
                (Some(vae_base), Some(file)) => format!("{vae_base}{file}"),
                _ => format!("{base}{name}"),
            };
            let got = download_file(store, &id, name, &url, done, &cancel, progress).await?;
            if let Some(size) = got {
                manifest.files.retain(|f| &f.path != name);
                manifest.files.push(StoredFile {
                    path: name.clone(),
                    url: Some(url),
                    size: Some(size),
                    complete: true,
                });
                write_manifest(store, &manifest).await?;
                done += size;
                found = Some(name.clone());
                break;
            }
        }
        if let Some(name) = &found {
            let text = || stored_text(store, &manifest, name);
            follow_up(name, text, &mut queue, manifest.fp16).await?;
        }
        if found.is_none() && !want.optional {
            return Err(AcquireError::BadModel(if manifest.single_file {
                format!("{} was not found (404)", source.address())
            } else {
                let mut pickle = None;
                for p in &want.pickles {
                    if exists(&format!("{base}{p}")).await {
                        pickle = Some(p.as_str());
                        break;
                    }
                }
                want.missing(source.address(), pickle, kind)
            }));
        }
    }
    manifest.complete = true;
    write_manifest(store, &manifest).await?;
    Ok(manifest)
}

/// A stored file's text.
async fn stored_text(store: &Store, m: &Manifest, path: &str) -> Result<String, AcquireError> {
    let size = m.file(path).and_then(|f| f.size).unwrap_or(0);
    let src = PartsSource::open(store, path, &part_prefix(&m.id, path), size, PART_SIZE).await?;
    let bytes = src
        .read_at(0, size as usize)
        .await
        .map_err(|e| AcquireError::BadModel(e.to_string()))?;
    String::from_utf8(bytes).map_err(|_| AcquireError::BadModel(format!("{path} is not text")))
}

/// What a file just stored adds to the files still wanted: an SDXL UNet's config the second
/// text encoder, a shard index its shards.
async fn follow_up<F: Future<Output = Result<String, AcquireError>>>(
    name: &str,
    text: impl FnOnce() -> F,
    queue: &mut VecDeque<Wanted>,
    fp16: bool,
) -> Result<(), AcquireError> {
    if name == "unet/config.json" {
        if unet_is_xl(&text().await?) {
            queue.extend(xl_files(fp16));
        }
    } else if is_shard_index(name) {
        for shard in shard_files(name, &text().await?)
            .map_err(AcquireError::BadModel)?
            .into_iter()
            .rev()
        {
            queue.push_front(shard);
        }
    }
    Ok(())
}

/// The path of a picked file inside its folder, without the folder's own name
/// (`tiny/unet/config.json` -> `unet/config.json`).
fn relative_path(file: &File) -> String {
    let rel = Reflect::get(file, &"webkitRelativePath".into())
        .ok()
        .and_then(|p| p.as_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| file.name());
    match rel.split_once('/') {
        Some((_, rest)) => rest.to_string(),
        None => rel,
    }
}

/// Copies the user's own files into storage: one `.safetensors` checkpoint, or the files of a
/// diffusers folder (picked as a folder); a CLIP model is always a folder.
pub async fn copy_files(
    store: &Store,
    kind: ModelKind,
    files: Vec<File>,
    cancel: Rc<Cell<bool>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest, AcquireError> {
    let named: Vec<(String, File)> = files.into_iter().map(|f| (relative_path(&f), f)).collect();
    let pickle = named.iter().find(|(p, _)| {
        [".ckpt", ".pt", ".pth", ".bin"]
            .iter()
            .any(|e| p.to_ascii_lowercase().ends_with(e))
    });
    let is_folder = kind == ModelKind::Clip || named.iter().any(|(p, _)| p.starts_with("unet/"));
    let chosen: Vec<(String, File)> = if is_folder {
        let mut out: Vec<(String, File)> = Vec::new();
        let mut queue: VecDeque<Wanted> = kind.folder_files(false).into();
        while let Some(want) = queue.pop_front() {
            match want
                .candidates
                .iter()
                .find_map(|c| named.iter().find(|(p, _)| p == c))
            {
                Some((path, f)) => {
                    let text = || file_text(f);
                    follow_up(path, text, &mut queue, false).await?;
                    out.push((path.clone(), f.clone()));
                }
                None if want.optional => {}
                None => {
                    let pickle = want
                        .pickles
                        .iter()
                        .find(|p| named.iter().any(|(n, _)| n == *p));
                    return Err(AcquireError::BadModel(want.missing(
                        "the folder",
                        pickle.map(String::as_str),
                        kind,
                    )));
                }
            }
        }
        out
    } else {
        let singles: Vec<_> = named
            .iter()
            .filter(|(p, _)| p.to_ascii_lowercase().ends_with(".safetensors"))
            .collect();
        match singles[..] {
            [(_, f)] => vec![("model.safetensors".to_string(), f.clone())],
            _ if pickle.is_some() => {
                return Err(AcquireError::BadModel(format!(
                    "{} is a PyTorch pickle file; SeFi Studio only opens .safetensors files, which cannot hide code. Most models publish one",
                    pickle.map(|(p, _)| p.as_str()).unwrap_or_default()
                )));
            }
            [] => {
                return Err(AcquireError::BadModel(
                    "pick one .safetensors checkpoint, or a diffusers model folder".into(),
                ));
            }
            _ => {
                return Err(AcquireError::BadModel(
                    "several .safetensors files were picked: pick one checkpoint, or the model's whole folder".into(),
                ));
            }
        }
    };
    let name = if is_folder {
        named
            .first()
            .and_then(|(_, f)| {
                Reflect::get(f, &"webkitRelativePath".into())
                    .ok()
                    .and_then(|p| p.as_string())
                    .and_then(|p| p.split('/').next().map(str::to_string))
            })
            .unwrap_or_else(|| "my model".into())
    } else {
        chosen[0].1.name()
    };
    let total: u64 = chosen.iter().map(|(_, f)| f.size() as u64).sum();
    let identity: String = chosen
        .iter()
        .map(|(p, f)| format!("{p}:{}:{}", f.size(), f.last_modified()))
        .collect();
    let id = kind_id(kind, &format!("local:{name}:{identity}"));
    if let Some(m) = read_manifest(store, &id).await?
        && m.complete
    {
        return Ok(m);
    }
    if let Ok((usage, quota)) = estimate().await
        && quota > 0.0
        && usage + total as f64 > quota
    {
        return Err(AcquireError::Store(StoreError::Full));
    }
    let mut manifest = Manifest {
        id: id.clone(),
        kind,
        name,
        address: format!("local:{id}"),
        single_file: !is_folder,
        fp16: false,
        vae: None,
        files: Vec::new(),
        complete: false,
        last_used: 0.0,
    };
    let mut done = 0u64;
    for (path, file) in chosen {
        let prefix = part_prefix(&id, &path);
        let size = file.size() as u64;
        for k in 0..StoredFile::parts(size) {
            if cancel.get() {
                return Err(AcquireError::Cancelled);
            }
            let (a, b) = (k * PART_SIZE, ((k + 1) * PART_SIZE).min(size));
            let blob = file
                .slice_with_f64_and_f64(a as f64, b as f64)
                .map_err(|e| AcquireError::BadModel(format!("cannot read {path}: {e:?}")))?;
            let mut w = store.writer(&format!("{prefix}.{k}")).await?;
            if let Err(e) = w.write_blob(&blob).await {
                w.abort().await;
                return Err(e.into());
            }
            w.close().await?;
            done += b - a;
            progress(Progress {
                file: path.clone(),
                bytes: done,
                file_bytes: done,
                file_total: Some(total),
            });
        }
        manifest.files.push(StoredFile {
            path,
            url: None,
            size: Some(size),
            complete: true,
        });
        write_manifest(store, &manifest).await?;
    }
    manifest.complete = true;
    write_manifest(store, &manifest).await?;
    Ok(manifest)
}

/// A picked file's text.
async fn file_text(file: &File) -> Result<String, AcquireError> {
    JsFuture::from(file.text())
        .await
        .ok()
        .and_then(|t| t.as_string())
        .ok_or_else(|| AcquireError::BadModel(format!("cannot read {} as text", file.name())))
}

/// Marks a model as not in use: it is not loaded again on the next visit.
pub async fn forget_use(store: &Store, id: &str) -> Result<(), StoreError> {
    if let Some(mut m) = read_manifest(store, id).await? {
        m.last_used = 0.0;
        write_manifest(store, &m).await?;
    }
    Ok(())
}

/// Marks a model as the last used one.
pub async fn touch(store: &Store, id: &str) -> Result<(), StoreError> {
    if let Some(mut m) = read_manifest(store, id).await? {
        m.last_used = now();
        write_manifest(store, &m).await?;
    }
    Ok(())
}
