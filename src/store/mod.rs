//! The browser's Origin Private File System (OPFS): models, identities, training checkpoints
//! and the gallery live here, on the user's device. Works in the page and in the worker.
//!
//! Paths are `/`-separated below the origin's root; folders are made on write. Model files
//! are stored in parts (see [`crate::app::catalog::PART_SIZE`]) and read back through
//! [`PartsSource`] tensor by tensor, so no whole checkpoint is ever in memory.

use futures::future::LocalBoxFuture;
use js_sys::{Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Blob, File, FileSystemDirectoryHandle, FileSystemFileHandle, FileSystemGetDirectoryOptions,
    FileSystemGetFileOptions, FileSystemRemoveOptions, FileSystemWritableFileStream,
    StorageManager,
};

use crate::weights::{ByteSource, WeightsError};

/// Why storage failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The browser offers no origin-private file system here.
    #[error(
        "this browser gives the page no private file storage ({0}). Private windows often have none: open SeFi Studio in a normal window"
    )]
    Unavailable(String),
    /// The site's storage quota is used up.
    #[error(
        "the browser's storage for this site is full. Delete cached models or gallery images below, free disk space, or allow the site more storage"
    )]
    Full,
    /// No file or folder at that path.
    #[error("{0} is not in storage")]
    NotFound(String),
    /// Any other failure of the file system.
    #[error("storage failed on {path}: {reason}")]
    Io {
        /// The file or folder.
        path: String,
        /// The browser's message.
        reason: String,
    },
}

fn error_name(e: &JsValue) -> String {
    Reflect::get(e, &"name".into())
        .ok()
        .and_then(|n| n.as_string())
        .unwrap_or_default()
}

fn describe(e: &JsValue) -> String {
    Reflect::get(e, &"message".into())
        .ok()
        .and_then(|m| m.as_string())
        .filter(|m| !m.is_empty())
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

fn classify(path: &str, e: JsValue) -> StoreError {
    match error_name(&e).as_str() {
        "QuotaExceededError" => StoreError::Full,
        "NotFoundError" => StoreError::NotFound(path.into()),
        _ => StoreError::Io {
            path: path.into(),
            reason: describe(&e),
        },
    }
}

async fn wait(path: &str, p: Promise) -> Result<JsValue, StoreError> {
    JsFuture::from(p).await.map_err(|e| classify(path, e))
}

/// `navigator.storage` of the page or the worker.
fn storage() -> Result<StorageManager, StoreError> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into())
        .map_err(|e| StoreError::Unavailable(describe(&e)))?;
    Reflect::get(&navigator, &"storage".into())
        .ok()
        .filter(|s| !s.is_undefined())
        .and_then(|s| s.dyn_into::<StorageManager>().ok())
        .ok_or_else(|| StoreError::Unavailable("navigator.storage is missing".into()))
}

/// Bytes used and the quota, as the browser estimates them.
pub async fn estimate() -> Result<(f64, f64), StoreError> {
    let promise = storage()?
        .estimate()
        .map_err(|e| StoreError::Unavailable(describe(&e)))?;
    let est = wait("estimate", promise).await?;
    let num = |k: &str| {
        Reflect::get(&est, &k.into())
            .ok()
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0)
    };
    Ok((num("usage"), num("quota")))
}

/// Asks the browser not to evict the site's storage under pressure (it may say no).
pub async fn persist() -> bool {
    let Ok(promise) = storage().and_then(|s| {
        s.persist()
            .map_err(|e| StoreError::Unavailable(describe(&e)))
    }) else {
        return false;
    };
    wait("persist", promise)
        .await
        .ok()
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

/// The origin's private file system.
#[derive(Clone)]
pub struct Store {
    root: FileSystemDirectoryHandle,
}

/// An open file being written; its bytes appear in the file when [`Writer::close`] commits
/// them (an interrupted writer leaves the file as it was). Dropped unclosed, it gives up, so the
/// file is not held open until the next garbage collection.
pub struct Writer {
    path: String,
    stream: Option<FileSystemWritableFileStream>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.abort();
        }
    }
}

impl Writer {
    /// Opens the file behind `h` for writing from its start.
    async fn open(path: &str, h: &FileSystemFileHandle) -> Result<Self, StoreError> {
        let stream = wait(path, h.create_writable()).await?;
        Ok(Self {
            path: path.into(),
            stream: Some(stream.unchecked_into()),
        })
    }

    /// Appends bytes.
    pub async fn write_js(&mut self, bytes: &Uint8Array) -> Result<(), StoreError> {
        let p = self
            .stream()
            .write_with_js_u8_array(bytes)
            .map_err(|e| classify(&self.path, e))?;
        wait(&self.path, p).await.map(drop)
    }

    /// Appends a blob's bytes (a user's file, without reading it into memory).
    pub async fn write_blob(&mut self, blob: &Blob) -> Result<(), StoreError> {
        let p = self
            .stream()
            .write_with_blob(blob)
            .map_err(|e| classify(&self.path, e))?;
        wait(&self.path, p).await.map(drop)
    }

    fn stream(&self) -> &FileSystemWritableFileStream {
        self.stream.as_ref().expect("open until closed or given up")
    }

    /// Commits what was written: only now does the file change.
    pub async fn close(mut self) -> Result<(), StoreError> {
        let stream = self.stream.take().expect("open");
        wait(&self.path, stream.close()).await.map(drop)
    }

    /// Gives up: nothing written since opening reaches the file.
    pub async fn abort(mut self) {
        let stream = self.stream.take().expect("open");
        let _ = JsFuture::from(stream.abort()).await;
    }
}

/// Writes `bytes` as the whole content of the file behind `h`, committing them on close.
async fn fill(path: &str, h: &FileSystemFileHandle, bytes: &[u8]) -> Result<(), StoreError> {
    let mut w = Writer::open(path, h).await?;
    match w.write_js(&Uint8Array::from(bytes)).await {
        Ok(()) => w.close().await,
        Err(e) => {
            w.abort().await;
            Err(e)
        }
    }
}

/// The suffix of a file that [`Store::write`] has not finished; [`Store::list`] leaves such
/// files out.
pub const UNFINISHED: &str = ".unfinished";

fn split(path: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let name = parts.pop().unwrap_or("");
    (parts, name)
}

impl Store {
    /// The origin-private file system's root.
    pub async fn open() -> Result<Self, StoreError> {
        let root = wait("/", storage()?.get_directory())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Self {
            root: root.unchecked_into(),
        })
    }

    async fn dir(
        &self,
        parts: &[&str],
        create: bool,
    ) -> Result<FileSystemDirectoryHandle, StoreError> {
        let mut dir = self.root.clone();
        let opts = FileSystemGetDirectoryOptions::new();
        opts.set_create(create);
        for (i, p) in parts.iter().enumerate() {
            let path = parts[..=i].join("/");
            dir = wait(&path, dir.get_directory_handle_with_options(p, &opts))
                .await?
                .unchecked_into();
        }
        Ok(dir)
    }

    async fn handle(&self, path: &str, create: bool) -> Result<FileSystemFileHandle, StoreError> {
        let (dirs, name) = split(path);
        let dir = self.dir(&dirs, create).await?;
        let opts = FileSystemGetFileOptions::new();
        opts.set_create(create);
        Ok(wait(path, dir.get_file_handle_with_options(name, &opts))
            .await?
            .unchecked_into())
    }

    /// A snapshot of a stored file, for reading.
    pub async fn file(&self, path: &str) -> Result<File, StoreError> {
        let h = self.handle(path, false).await?;
        Ok(wait(path, h.get_file()).await?.unchecked_into())
    }

    /// The size of a stored file, `None` if it is not there.
    pub async fn size(&self, path: &str) -> Result<Option<u64>, StoreError> {
        match self.file(path).await {
            Ok(f) => Ok(Some(f.size() as u64)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A whole file's bytes.
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, StoreError> {
        let file = self.file(path).await?;
        read_blob(path, &file).await
    }

    /// A text file's content, `None` if it is not there.
    pub async fn read_text(&self, path: &str) -> Result<Option<String>, StoreError> {
        match self.read(path).await {
            Ok(b) => String::from_utf8(b).map(Some).map_err(|e| StoreError::Io {
                path: path.into(),
                reason: e.to_string(),
            }),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens `path` for writing from its start (made if missing).
    pub async fn writer(&self, path: &str) -> Result<Writer, StoreError> {
        Writer::open(path, &self.handle(path, true).await?).await
    }

    /// Writes a whole file at once: a tab that dies at any moment of it leaves the old file, or
    /// no file where there was none. The bytes go to `<path>.unfinished`, which is then moved
    /// onto `path`, because a writer on a new file makes it exist, empty, until it is closed.
    pub async fn write(&self, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let temp = format!("{path}{UNFINISHED}");
        let h = self.handle(&temp, true).await?;
        // `move` (Chromium, Firefox) replaces the target in one step.
        if let Some(mv) = Reflect::get(&h, &"move".into())
            .ok()
            .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
        {
            if let Err(e) = fill(&temp, &h, bytes).await {
                // Frees what the unfinished copy took (the usual failure is a full storage).
                let _ = self.remove(&temp).await;
                return Err(e);
            }
            let (_, name) = split(path);
            if let Ok(p) = mv.call1(&h, &name.into())
                && wait(path, p.unchecked_into()).await.is_ok()
            {
                return Ok(());
            }
        }
        // Without `move`, or when it failed: in place, which is atomic for a file that exists.
        let _ = self.remove(&temp).await;
        fill(path, &self.handle(path, true).await?, bytes).await
    }

    /// Removes a file or a folder with everything in it; absent is fine.
    pub async fn remove(&self, path: &str) -> Result<(), StoreError> {
        let (dirs, name) = split(path);
        let dir = match self.dir(&dirs, false).await {
            Ok(d) => d,
            Err(StoreError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let opts = FileSystemRemoveOptions::new();
        opts.set_recursive(true);
        match wait(path, dir.remove_entry_with_options(name, &opts)).await {
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Names in a folder (empty if it does not exist), sorted; unfinished writes left out.
    pub async fn list(&self, path: &str) -> Result<Vec<String>, StoreError> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let dir = match self.dir(&parts, false).await {
            Ok(d) => d,
            Err(StoreError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let iter = dir.keys();
        let mut names = Vec::new();
        loop {
            let next = iter.next().map_err(|e| classify(path, e))?;
            let item = wait(path, next).await?;
            if Reflect::get(&item, &"done".into())
                .ok()
                .and_then(|d| d.as_bool())
                .unwrap_or(true)
            {
                break;
            }
            if let Some(name) = Reflect::get(&item, &"value".into())
                .ok()
                .and_then(|v| v.as_string())
                .filter(|n| !n.ends_with(UNFINISHED))
            {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Reads a blob's bytes into memory.
pub async fn read_blob(path: &str, blob: &Blob) -> Result<Vec<u8>, StoreError> {
    let buf = wait(path, blob.array_buffer()).await?;
    Ok(Uint8Array::new(&buf).to_vec())
}

pub mod lock;

/// A model file stored in parts of `part_size` bytes, read at any offset.
pub struct PartsSource {
    name: String,
    parts: Vec<File>,
    part_size: u64,
    len: u64,
}

impl PartsSource {
    /// Opens the parts `prefix.0`, `prefix.1`, ... of a file of `len` bytes.
    pub async fn open(
        store: &Store,
        name: &str,
        prefix: &str,
        len: u64,
        part_size: u64,
    ) -> Result<Self, StoreError> {
        let count = len.div_ceil(part_size).max(1);
        let mut parts = Vec::with_capacity(count as usize);
        for k in 0..count {
            parts.push(store.file(&format!("{prefix}.{k}")).await?);
        }
        let stored: u64 = parts.iter().map(|f| f.size() as u64).sum();
        if stored != len {
            return Err(StoreError::Io {
                path: name.into(),
                reason: format!(
                    "{stored} bytes are stored of {len}; load the model again to finish the download"
                ),
            });
        }
        Ok(Self {
            name: name.into(),
            parts,
            part_size,
            len,
        })
    }
}

impl ByteSource for PartsSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(
        &self,
        offset: u64,
        len: usize,
    ) -> LocalBoxFuture<'_, Result<Vec<u8>, WeightsError>> {
        Box::pin(async move {
            let end = offset + len as u64;
            if end > self.len {
                return Err(WeightsError::Truncated {
                    file: self.name.clone(),
                    needed: end,
                    actual: self.len,
                });
            }
            let mut out = Vec::with_capacity(len);
            let mut at = offset;
            while at < end {
                let k = (at / self.part_size) as usize;
                let start = at - k as u64 * self.part_size;
                let stop = (end - k as u64 * self.part_size).min(self.part_size);
                let slice = self.parts[k]
                    .slice_with_f64_and_f64(start as f64, stop as f64)
                    .map_err(|e| io(&self.name, e))?;
                let buf = JsFuture::from(slice.array_buffer())
                    .await
                    .map_err(|e| io(&self.name, e))?;
                let bytes = Uint8Array::new(&buf);
                let old = out.len();
                out.resize(old + bytes.length() as usize, 0);
                bytes.copy_to(&mut out[old..]);
                at += stop - start;
            }
            Ok(out)
        })
    }
}

fn io(name: &str, e: JsValue) -> WeightsError {
    WeightsError::Io {
        file: name.into(),
        reason: describe(&e),
    }
}
