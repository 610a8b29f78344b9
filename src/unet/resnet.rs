//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (diffusers' `models/resnet.py`), shared by
//! the UNet and the VAE.

use burn::tensor::{
    Tensor,
    activation::silu,
    module::interpolate,
    ops::{InterpolateMode, InterpolateOptions},
};

use crate::nn::{Conv2d, GroupNorm, Linear, Vars};
use crate::weights::WeightsError;

/// Two 3x3 convolutions with group norm and SiLU, an optional timestep projection added in
/// between, and a 1x1 shortcut when the channel count changes.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// `temb`: width of the timestep embedding (None in the VAE).
    pub fn new(
        vars: Vars,
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self, WeightsError> {
        Ok(Self {
            norm1: GroupNorm::new(vars.pp("norm1"), groups, c_in, eps)?,
            conv1: Conv2d::new(vars.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj: temb
                .map(|t| Linear::new(vars.pp("time_emb_proj"), t, c_out, true))
                .transpose()?,
            norm2: GroupNorm::new(vars.pp("norm2"), groups, c_out, eps)?,
            conv2: Conv2d::new(vars.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut: (c_in != c_out)
                .then(|| Conv2d::new(vars.pp("conv_shortcut"), c_in, c_out, 1, 1, 0))
                .transpose()?,
        })
    }

    /// `x`: `[b, c_in, h, w]`, `temb`: `[b, t]` -> `[b, c_out, h, w]`.
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let [b, c] = [h.dims()[0], h.dims()[1]];
            h = h + proj.forward(silu(temb.clone())).reshape([b, c, 1, 1]);
        }
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// Nearest-neighbour upsampling followed by a 3x3 convolution.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Reads the 3x3 convolution `conv` under `vars`, `channels` in and out.
    pub fn new(vars: Vars, channels: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            conv: Conv2d::new(vars.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Doubles the size, or resizes to `size` (the UNet passes its skip connection's size so
    /// that odd sizes line up, as diffusers' `upsample_size` does).
    ///
    /// - `x`: `[batch, channels, height, width]`
    /// - output: `[batch, channels, 2 * height, 2 * width]`, or
    ///   `[batch, channels, size[0], size[1]]` with `size`
    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        let x = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
        );
        self.conv.forward(x)
    }
}
