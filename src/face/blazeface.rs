//! BlazeFace, short range: MediaPipe's face detector (`face_detection_short_range.tflite`),
//! rebuilt from its layers. A 128 x 128 RGB input in [-1, 1]; for each of 896 anchors, a box,
//! six keypoints and a score. Tensor names and layouts are those of the TensorFlow Lite file
//! (`conv2d/Kernel` is `[out, h, w, in]`, a depthwise kernel `[1, h, w, channels]`), as
//! `tests/fixtures/face/generate.py` copies them into the site's safetensors file.

use burn::tensor::{
    Device, Tensor, TensorData,
    activation::relu,
    module::{conv2d, max_pool2d},
    ops::{ConvOptions, MaxPoolOptions},
};
use safetensors::SafeTensors;

use super::FaceError;

/// The input's side in pixels.
pub const INPUT: usize = 128;
/// Anchors: 2 per cell of the 16 x 16 grid, then 6 per cell of the 8 x 8 grid.
pub const ANCHORS: usize = 896;
/// Per anchor: box centre offset and size (x, y, w, h), then six keypoints (x, y).
pub const COORDS: usize = 16;

/// The blocks that halve the resolution (their depthwise kernel strides by 2 and the skip path
/// max-pools), by index in the file's numbering (`depthwise_conv2d_2`, ...).
const STRIDE_2: [usize; 3] = [2, 5, 11];
/// Blocks in all; the 16 x 16 heads read block 10's output, the 8 x 8 heads the last's.
const BLOCKS: usize = 16;
const HEAD_16X16_AFTER: usize = 10;

/// A convolution as TensorFlow Lite runs it with `SAME` padding.
struct Conv {
    weight: Tensor<4>,
    bias: Tensor<1>,
    options: ConvOptions<2>,
}

impl Conv {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d(
            x,
            self.weight.clone(),
            Some(self.bias.clone()),
            self.options.clone(),
        )
    }
}

/// Depthwise 3 x 3, pointwise 1 x 1, plus the input (max-pooled where the block strides,
/// zero-padded to the new channel count), then ReLU.
struct BlazeBlock {
    depthwise: Conv,
    pointwise: Conv,
    stride_2: bool,
    channel_pad: usize,
}

impl BlazeBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.pointwise.forward(self.depthwise.forward(x.clone()));
        let mut skip = if self.stride_2 {
            max_pool2d(x, MaxPoolOptions::new([2, 2]).with_stride([2, 2]))
        } else {
            x
        };
        if self.channel_pad > 0 {
            let [n, _, hh, ww] = skip.dims();
            let zeros = Tensor::zeros([n, self.channel_pad, hh, ww], &skip.device());
            skip = Tensor::cat(vec![skip, zeros], 1);
        }
        relu(h + skip)
    }
}

/// The network.
pub struct BlazeFace {
    conv: Conv,
    blocks: Vec<BlazeBlock>,
    classificator_8: Conv,
    regressor_8: Conv,
    classificator_16: Conv,
    regressor_16: Conv,
}

/// `SAME` padding of a `kernel` window striding by `stride` over an even side: TensorFlow puts
/// the odd pixel at the end.
fn same(kernel: usize, stride: usize) -> [(usize, usize); 2] {
    let total = if stride == 1 { kernel - 1 } else { kernel - 2 };
    [(total / 2, total - total / 2); 2]
}

impl BlazeFace {
    /// The network from the site's safetensors file (float16 or float32 tensors).
    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self, FaceError> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| FaceError::Weights(e.to_string()))?;
        let get = |name: &str| -> Result<(Vec<f32>, Vec<usize>), FaceError> {
            let view = file
                .tensor(name)
                .map_err(|_| FaceError::Weights(format!("the tensor {name} is missing")))?;
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                other => {
                    return Err(FaceError::Weights(format!(
                        "{name} is {other:?}, not float16 or float32"
                    )));
                }
            };
            Ok((values, view.shape().to_vec()))
        };
        // `[out, h, w, in]` (a depthwise kernel: `[1, h, w, channels]`, one group a channel).
        let conv = |name: &str, stride: usize, depthwise: bool| -> Result<Conv, FaceError> {
            let (w, shape) = get(&format!("{name}/Kernel"))?;
            let (b, bias_shape) = get(&format!("{name}/Bias"))?;
            let [o, kh, kw, i] = shape[..] else {
                return Err(FaceError::Weights(format!("{name}/Kernel is not 4-d")));
            };
            let channels = if depthwise { i } else { o };
            if bias_shape != [channels] || kh != kw {
                return Err(FaceError::Weights(format!("{name} has unexpected shapes")));
            }
            let kernel = Tensor::<4>::from_data(TensorData::new(w, [o, kh, kw, i]), device);
            let (weight, groups) = if depthwise {
                (kernel.permute([3, 0, 1, 2]), i)
            } else {
                (kernel.permute([0, 3, 1, 2]), 1)
            };
            let mut options = ConvOptions::new([stride; 2], [0, 0], [1, 1], groups);
            options.padding = same(kh, stride);
            Ok(Conv {
                weight,
                bias: Tensor::from_data(TensorData::new(b, [channels]), device),
                options,
            })
        };
        let numbered = |base: &str, i: usize| {
            if i == 0 {
                base.to_string()
            } else {
                format!("{base}_{i}")
            }
        };
        let mut blocks = Vec::with_capacity(BLOCKS);
        for i in 0..BLOCKS {
            let stride_2 = STRIDE_2.contains(&i);
            let depthwise = conv(
                &numbered("depthwise_conv2d", i),
                if stride_2 { 2 } else { 1 },
                true,
            )?;
            let pointwise = conv(&numbered("conv2d", i + 1), 1, false)?;
            let [c_out, c_in, _, _] = pointwise.weight.dims();
            blocks.push(BlazeBlock {
                depthwise,
                pointwise,
                stride_2,
                channel_pad: c_out
                    .checked_sub(c_in)
                    .ok_or_else(|| FaceError::Weights(format!("block {i} narrows its channels")))?,
            });
        }
        Ok(Self {
            conv: conv("conv2d", 2, false)?,
            blocks,
            classificator_8: conv("classificator_8", 1, false)?,
            regressor_8: conv("regressor_8", 1, false)?,
            classificator_16: conv("classificator_16", 1, false)?,
            regressor_16: conv("regressor_16", 1, false)?,
        })
    }

    /// `[n, 3, 128, 128]` in [-1, 1] -> the raw box regressors `[n, 896, 16]` and score logits
    /// `[n, 896]`, anchors in the file's order (each grid row by row, anchors of a cell
    /// together).
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<3>, Tensor<2>) {
        let mut x = relu(self.conv.forward(x));
        let mut fine = None;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if i == HEAD_16X16_AFTER {
                fine = Some(x.clone());
            }
        }
        let fine = fine.expect("the network has more blocks than the fine heads' input");
        // NCHW -> NHWC, then one row per anchor.
        let rows = |t: Tensor<4>, width: usize| {
            let [n, c, h, w] = t.dims();
            t.permute([0, 2, 3, 1])
                .reshape([n, h * w * c / width, width])
        };
        let regressors = Tensor::cat(
            vec![
                rows(self.regressor_8.forward(fine.clone()), COORDS),
                rows(self.regressor_16.forward(x.clone()), COORDS),
            ],
            1,
        );
        let scores = Tensor::cat(
            vec![
                rows(self.classificator_8.forward(fine), 1),
                rows(self.classificator_16.forward(x), 1),
            ],
            1,
        );
        let [n, anchors, _] = scores.dims();
        (regressors, scores.reshape([n, anchors]))
    }
}
