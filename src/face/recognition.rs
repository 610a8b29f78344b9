//! The face recognition network of face-api (`@vladmandic/face-api` 1.7.15,
//! `face_recognition_model`): dlib's ResNet-34-style face descriptor (MIT), rebuilt from the
//! tfjs weights as face-api runs them. A 150 x 150 RGB face chip -> 128 numbers; photos of one
//! person lie close together. Weight names are the manifest's (`conv32_down/conv/filters`, ...),
//! kernels in tfjs's `[h, w, in, out]` layout, each tensor quantised to bytes with a scale and
//! a minimum.

use burn::tensor::{
    Device, Tensor, TensorData,
    activation::relu,
    module::{avg_pool2d, conv2d, max_pool2d},
    ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions},
};
use serde::Deserialize;

use super::FaceError;

/// The chip's side in pixels.
pub const CHIP: usize = 150;
/// The descriptor's length.
pub const DESCRIPTOR: usize = 128;
/// Subtracted from the chip's 0-255 RGB values before dividing by 255 (face-api's).
const MEAN_RGB: [f32; 3] = [122.782, 117.001, 104.298];

/// A convolution followed by a per-channel scale and shift (batch norm, folded).
struct ConvLayer {
    filters: Tensor<4>,
    bias: Tensor<1>,
    scale: Tensor<1>,
    shift: Tensor<1>,
    options: ConvOptions<2>,
}

impl ConvLayer {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let c = self.scale.dims()[0];
        let x = conv2d(
            x,
            self.filters.clone(),
            Some(self.bias.clone()),
            self.options.clone(),
        );
        x * self.scale.clone().reshape([1, c, 1, 1]) + self.shift.clone().reshape([1, c, 1, 1])
    }
}

/// Two convolutions and the input added back; a `down` layer halves the size (its first
/// convolution strides by 2 without padding, the input is average-pooled and zero-padded to the
/// new channels, and the output padded by a zero row and column where the sizes differ).
struct Residual {
    conv1: ConvLayer,
    conv2: ConvLayer,
    down: bool,
}

impl Residual {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut out = self.conv2.forward(relu(self.conv1.forward(x.clone())));
        let skip = if self.down {
            let pooled = avg_pool2d(x, AvgPoolOptions::new([2, 2]).with_stride([2, 2]));
            let [n, c, h, w] = pooled.dims();
            let [_, c_out, oh, ow] = out.dims();
            // A 3 x 3 'valid' convolution striding by 2 leaves one row and column fewer than
            // the pooling where the input's side is 4k + 3: face-api appends zeros.
            if (oh, ow) != (h, w) {
                let device = out.device();
                out = Tensor::cat(vec![out, Tensor::zeros([n, c_out, h - oh, ow], &device)], 2);
                out = Tensor::cat(vec![out, Tensor::zeros([n, c_out, h, w - ow], &device)], 3);
            }
            if c_out != c {
                let zeros = Tensor::zeros([n, c_out - c, h, w], &pooled.device());
                Tensor::cat(vec![pooled, zeros], 1)
            } else {
                pooled
            }
        } else {
            x
        };
        relu(out + skip)
    }
}

/// The network.
pub struct FaceRecognitionNet {
    conv32_down: ConvLayer,
    layers: Vec<Residual>,
    fc: Tensor<2>,
}

/// One entry of a tfjs weights manifest.
#[derive(Deserialize)]
struct ManifestEntry {
    name: String,
    shape: Vec<usize>,
    dtype: String,
    quantization: Option<Quantization>,
}

#[derive(Deserialize)]
struct Quantization {
    dtype: String,
    scale: f64,
    min: f64,
}

#[derive(Deserialize)]
struct ManifestGroup {
    weights: Vec<ManifestEntry>,
}

/// The residual layers in order: name and whether it halves the size.
const LAYERS: [(&str, bool); 14] = [
    ("conv32_1", false),
    ("conv32_2", false),
    ("conv32_3", false),
    ("conv64_down", true),
    ("conv64_1", false),
    ("conv64_2", false),
    ("conv64_3", false),
    ("conv128_down", true),
    ("conv128_1", false),
    ("conv128_2", false),
    ("conv256_down", true),
    ("conv256_1", false),
    ("conv256_2", false),
    ("conv256_down_out", true),
];

impl FaceRecognitionNet {
    /// The network from face-api's files: the weights manifest (JSON) and the weights (`.bin`,
    /// uint8 quantised as the manifest says).
    pub fn from_tfjs(manifest: &str, weights: &[u8], device: &Device) -> Result<Self, FaceError> {
        let bad = |m: String| FaceError::Weights(m);
        let groups: Vec<ManifestGroup> =
            serde_json::from_str(manifest).map_err(|e| bad(format!("the manifest: {e}")))?;
        let mut tensors = std::collections::HashMap::new();
        let mut offset = 0;
        for entry in groups.iter().flat_map(|g| &g.weights) {
            let n: usize = entry.shape.iter().product();
            let mut bytes = |size: usize| {
                let out = weights
                    .get(offset..offset + n * size)
                    .ok_or_else(|| bad("the weights file is shorter than its manifest".into()));
                offset += n * size;
                out
            };
            // Most tensors are bytes with a scale and a minimum, some plain float32.
            let values: Vec<f32> = match (&entry.quantization, entry.dtype.as_str()) {
                (Some(q), "float32") if q.dtype == "uint8" => bytes(1)?
                    .iter()
                    // As tfjs dequantises: in double precision, stored as f32.
                    .map(|&b| (f64::from(b) * q.scale + q.min) as f32)
                    .collect(),
                (None, "float32") => bytes(4)?
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                _ => {
                    return Err(bad(format!(
                        "{} is neither float32 nor float32 quantised to uint8",
                        entry.name
                    )));
                }
            };
            tensors.insert(entry.name.clone(), (values, entry.shape.clone()));
        }
        if offset != weights.len() {
            return Err(bad("the weights file is longer than its manifest".into()));
        }
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>, FaceError> {
            let (values, got) = tensors
                .remove(name)
                .ok_or_else(|| bad(format!("the tensor {name} is missing")))?;
            if got != shape {
                return Err(bad(format!("{name} is {got:?}, not {shape:?}")));
            }
            Ok(values)
        };
        let mut layer = |prefix: &str,
                         c_in: usize,
                         c_out: usize,
                         k: usize,
                         stride: usize|
         -> Result<ConvLayer, FaceError> {
            let filters = take(&format!("{prefix}/conv/filters"), &[k, k, c_in, c_out])?;
            let vector = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c_out]), device);
            // 'same' for stride 1 (odd kernels: symmetric), 'valid' for stride 2.
            let pad = if stride == 1 { k / 2 } else { 0 };
            Ok(ConvLayer {
                filters: Tensor::<4>::from_data(
                    TensorData::new(filters, [k, k, c_in, c_out]),
                    device,
                )
                .permute([3, 2, 0, 1]),
                bias: vector(take(&format!("{prefix}/conv/bias"), &[c_out])?),
                scale: vector(take(&format!("{prefix}/scale/weights"), &[c_out])?),
                shift: vector(take(&format!("{prefix}/scale/biases"), &[c_out])?),
                options: ConvOptions::new([stride; 2], [pad; 2], [1, 1], 1),
            })
        };
        let conv32_down = layer("conv32_down", 3, 32, 7, 2)?;
        let mut layers = Vec::with_capacity(LAYERS.len());
        let mut channels = 32;
        for (name, down) in LAYERS {
            let c_out = if down && name != "conv256_down_out" {
                channels * 2
            } else {
                channels
            };
            layers.push(Residual {
                conv1: layer(
                    &format!("{name}/conv1"),
                    channels,
                    c_out,
                    3,
                    if down { 2 } else { 1 },
                )?,
                conv2: layer(&format!("{name}/conv2"), c_out, c_out, 3, 1)?,
                down,
            });
            channels = c_out;
        }
        let fc = take("fc", &[channels, DESCRIPTOR])?;
        Ok(Self {
            conv32_down,
            layers,
            fc: Tensor::from_data(TensorData::new(fc, [channels, DESCRIPTOR]), device),
        })
    }

    /// Face chips `[n, 150, 150, 3]`, RGB bytes as f32 (0 to 255) -> descriptors `[n, 128]`
    /// (as face-api computes them: not normalised).
    pub fn forward(&self, chips: Tensor<4>) -> Tensor<2> {
        let mean = Tensor::<1>::from_data(TensorData::new(MEAN_RGB.to_vec(), [3]), &chips.device());
        let x = (chips - mean.reshape([1, 1, 1, 3]))
            .div_scalar(255.0)
            .permute([0, 3, 1, 2]);
        let x = relu(self.conv32_down.forward(x));
        let mut x = max_pool2d(x, MaxPoolOptions::new([3, 3]).with_stride([2, 2]));
        for layer in &self.layers {
            x = layer.forward(x);
        }
        let [n, c, _, _] = x.dims();
        x.mean_dim(2)
            .mean_dim(3)
            .reshape([n, c])
            .matmul(self.fc.clone())
    }
}
