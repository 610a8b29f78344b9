//! One safetensors file read lazily: the header once, then tensor by tensor on request.
//! The format is parsed by the `safetensors` crate; this adds positioned, async reads.

use std::collections::HashMap;

use safetensors::{Dtype, tensor::Metadata, tensor::TensorInfo};

use super::{ByteSource, WeightsError};

/// Headers larger than this are refused as corrupt (real ones are well under 1 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Element data of a tensor on the host, in the file's precision.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// IEEE half-precision floats.
    F16(Vec<half::f16>),
    /// bfloat16 values.
    BF16(Vec<half::bf16>),
}

/// A tensor read from a file, not yet on a device.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements in row-major order.
    pub data: HostData,
}

impl HostTensor {
    /// The elements converted to `f32` (a copy, whatever the stored precision).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// An open safetensors file: its parsed header and where its data starts.
pub struct SafetensorsFile {
    source: Box<dyn ByteSource>,
    data_start: u64,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("name", &self.name())
            .finish()
    }
}

/// True when the first bytes are those of a PyTorch checkpoint: a zip archive (torch.save
/// since 1.6) or a raw pickle stream (protocol 2 to 5).
pub fn looks_like_pickle(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
        || (head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]))
}

impl SafetensorsFile {
    /// Reads and checks the header. Refuses pickle checkpoints, damaged headers and files
    /// shorter than their header says.
    pub async fn open(source: Box<dyn ByteSource>) -> Result<Self, WeightsError> {
        let file = source.name().to_string();
        let len = source.len();
        let lower = file.to_ascii_lowercase();
        let head = source.read_at(0, len.min(8) as usize).await?;
        if looks_like_pickle(&head)
            || [".ckpt", ".pt", ".pth", ".bin", ".pkl"]
                .iter()
                .any(|e| lower.ends_with(e))
        {
            return Err(WeightsError::Pickle { file });
        }
        let corrupt = |reason: String| WeightsError::CorruptHeader {
            file: file.clone(),
            reason,
        };
        if len < 8 {
            return Err(corrupt(format!("it is only {len} bytes long")));
        }
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if n > MAX_HEADER {
            return Err(corrupt(format!("its header claims {n} bytes")));
        }
        if 8 + n > len {
            return Err(WeightsError::Truncated {
                file,
                needed: 8 + n,
                actual: len,
            });
        }
        let header = source.read_at(8, n as usize).await?;
        let metadata: Metadata =
            serde_json::from_slice(&header).map_err(|e| corrupt(format!("header: {e}")))?;
        let needed = 8 + n + metadata.data_len() as u64;
        if needed > len {
            return Err(WeightsError::Truncated {
                file,
                needed,
                actual: len,
            });
        }
        if needed < len {
            return Err(corrupt(format!(
                "{} bytes follow the last tensor",
                len - needed
            )));
        }
        Ok(Self {
            source,
            data_start: 8 + n,
            metadata,
        })
    }

    /// What to call the file in messages (its source's name).
    pub fn name(&self) -> &str {
        self.source.name()
    }

    /// Size of the file in bytes.
    pub fn len(&self) -> u64 {
        self.source.len()
    }

    /// True for a file of zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tensor names with their dtype and shape, in file order.
    pub fn tensors(&self) -> Vec<(String, Dtype, Vec<usize>)> {
        self.metadata
            .offset_keys()
            .into_iter()
            .map(|name| {
                let info = self
                    .metadata
                    .info(&name)
                    .expect("offset_keys lists known names");
                (name, info.dtype, info.shape.clone())
            })
            .collect()
    }

    /// The header entry of tensor `name` (dtype, shape, byte offsets in the data section);
    /// `None` if the file has no such tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// The free-form `__metadata__` strings.
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo, WeightsError> {
        self.info(name).ok_or_else(|| WeightsError::CorruptHeader {
            file: self.name().to_string(),
            reason: format!("no tensor `{name}`"),
        })
    }

    /// One tensor's raw little-endian bytes.
    pub async fn read_bytes(&self, name: &str) -> Result<Vec<u8>, WeightsError> {
        let (start, end) = self.info_or_err(name)?.data_offsets;
        self.source
            .read_at(self.data_start + start as u64, end - start)
            .await
    }

    /// Reads one tensor's bytes and decodes them (little-endian, as the format says).
    pub async fn read(&self, name: &str) -> Result<HostTensor, WeightsError> {
        let info = self.info_or_err(name)?;
        let bytes = self.read_bytes(name).await?;
        let data = match info.dtype {
            Dtype::F32 => HostData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::F16 => HostData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
            ),
            Dtype::BF16 => HostData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                    .collect(),
            ),
            other => {
                return Err(WeightsError::UnsupportedDtype {
                    file: self.name().to_string(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(HostTensor {
            shape: info.shape.clone(),
            data,
        })
    }
}
