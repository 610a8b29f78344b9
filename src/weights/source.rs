//! Byte sources that weights stream from: a native file, an in-memory buffer (tests), and,
//! in the browser, OPFS files and HTTP range reads. Reads are async so that one loader serves
//! every platform.

use std::sync::Arc;

use futures::future::LocalBoxFuture;

use super::WeightsError;

/// Random-access bytes of one file.
pub trait ByteSource {
    /// What to call the file in messages (a path, a URL, a file name).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// True for a source of zero bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads exactly `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize)
    -> LocalBoxFuture<'_, Result<Vec<u8>, WeightsError>>;
}

/// Bytes held in memory.
#[derive(Clone)]
pub struct MemorySource {
    name: String,
    bytes: Arc<[u8]>,
}

impl MemorySource {
    /// Wraps `bytes`, to be called `name` in messages.
    pub fn new(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        Self {
            name: name.into(),
            bytes: bytes.into(),
        }
    }
}

impl ByteSource for MemorySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(
        &self,
        offset: u64,
        len: usize,
    ) -> LocalBoxFuture<'_, Result<Vec<u8>, WeightsError>> {
        let result = usize::try_from(offset)
            .ok()
            .and_then(|start| self.bytes.get(start..start.checked_add(len)?))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| WeightsError::Truncated {
                file: self.name.clone(),
                needed: offset + len as u64,
                actual: self.len(),
            });
        Box::pin(async move { result })
    }
}

/// A file on a native file system, read with positioned reads (no shared cursor).
#[cfg(not(target_family = "wasm"))]
pub struct FileSource {
    name: String,
    file: std::fs::File,
    len: u64,
}

#[cfg(not(target_family = "wasm"))]
impl FileSource {
    /// Opens the file at `path` for reading; fails with [`WeightsError::Io`].
    pub fn open(path: &std::path::Path) -> Result<Self, WeightsError> {
        let name = path.display().to_string();
        let io = |e: std::io::Error| WeightsError::Io {
            file: name.clone(),
            reason: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(Self { name, file, len })
    }
}

#[cfg(not(target_family = "wasm"))]
impl ByteSource for FileSource {
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
        #[cfg(unix)]
        use std::os::unix::fs::FileExt;
        #[cfg(windows)]
        use std::os::windows::fs::FileExt;
        let result = if offset + len as u64 > self.len {
            Err(WeightsError::Truncated {
                file: self.name.clone(),
                needed: offset + len as u64,
                actual: self.len,
            })
        } else {
            let mut buf = vec![0u8; len];
            #[cfg(unix)]
            let read = self.file.read_exact_at(&mut buf, offset);
            #[cfg(windows)]
            let read = {
                let mut done = 0;
                let mut r = Ok(());
                while done < len {
                    match self.file.seek_read(&mut buf[done..], offset + done as u64) {
                        Ok(0) => {
                            r = Err(std::io::ErrorKind::UnexpectedEof.into());
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e) => {
                            r = Err(e);
                            break;
                        }
                    }
                }
                r
            };
            read.map(|()| buf).map_err(|e| WeightsError::Io {
                file: self.name.clone(),
                reason: e.to_string(),
            })
        };
        Box::pin(async move { result })
    }
}
