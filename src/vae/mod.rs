//! `AutoencoderKL` (diffusers' `models/autoencoders/autoencoder_kl.py` and `vae.py`): images
//! to latent distributions and latents back to images.

use burn::tensor::{DType, Tensor, TensorData, activation::silu};

use crate::config::{DecodePlan, VaeConfig};
use crate::nn::{Conv2d, GroupNorm, Vars};
use crate::unet::{Context, ResnetBlock2D, Upsample2D, attention::Attention};
use crate::weights::WeightsError;

const EPS: f64 = 1e-6;

/// `UNetMidBlock2D` without timesteps: resnet, single-head self-attention, resnet.
#[derive(Clone, Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    group_norm: GroupNorm,
    attention: Attention,
}

impl MidBlock {
    fn new(vars: Vars, c: usize, groups: usize) -> Result<Self, WeightsError> {
        let attn = vars.pp("attentions").pp(0);
        Ok(Self {
            resnets: [
                ResnetBlock2D::new(vars.pp("resnets").pp(0), c, c, None, groups, EPS)?,
                ResnetBlock2D::new(vars.pp("resnets").pp(1), c, c, None, groups, EPS)?,
            ],
            group_norm: GroupNorm::new(attn.pp("group_norm"), groups, c, EPS)?,
            attention: Attention::new(attn, c, c, 1, c, true)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.resnets[0].forward(x, None);
        let [b, c, h, w] = x.dims();
        let seq = self
            .group_norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let attended = self.attention.forward(seq, None::<&Context>, None);
        let x = attended.swap_dims(1, 2).reshape([b, c, h, w]) + x;
        self.resnets[1].forward(x, None)
    }
}

/// A `DownEncoderBlock2D` or `UpDecoderBlock2D`: resnets, then an optional resampler.
#[derive(Clone, Debug)]
struct Block {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
    upsampler: Option<Upsample2D>,
}

impl Block {
    fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for r in &self.resnets {
            x = r.forward(x, None);
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(x);
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(x, None);
        }
        x
    }
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Block>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vars: Vars, c: &VaeConfig) -> Result<Self, WeightsError> {
        let ch = &c.block_out_channels;
        let (n, g) = (ch.len(), c.norm_num_groups);
        let mut down_blocks = Vec::with_capacity(n);
        let mut out = ch[0];
        for (i, &width) in ch.iter().enumerate() {
            let v = vars.pp("down_blocks").pp(i);
            let inp = out;
            out = width;
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        v.pp("resnets").pp(j),
                        if j == 0 { inp } else { out },
                        out,
                        None,
                        g,
                        EPS,
                    )
                })
                .collect::<Result<_, _>>()?;
            // diffusers pads right and bottom by one, then convolves without padding.
            let downsampler = (i + 1 < n)
                .then(|| {
                    Conv2d::new(v.pp("downsamplers").pp(0).pp("conv"), out, out, 3, 2, 0)
                        .map(|c| c.with_padding([(0, 1), (0, 1)]))
                })
                .transpose()?;
            down_blocks.push(Block {
                resnets,
                downsampler,
                upsampler: None,
            });
        }
        Ok(Self {
            conv_in: Conv2d::new(vars.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::new(vars.pp("mid_block"), ch[n - 1], g)?,
            conv_norm_out: GroupNorm::new(vars.pp("conv_norm_out"), g, ch[n - 1], EPS)?,
            conv_out: Conv2d::new(
                vars.pp("conv_out"),
                ch[n - 1],
                2 * c.latent_channels,
                3,
                1,
                1,
            )?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for b in &self.down_blocks {
            x = b.forward(x);
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vars: Vars, c: &VaeConfig) -> Result<Self, WeightsError> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let (n, g) = (rev.len(), c.norm_num_groups);
        let mut up_blocks = Vec::with_capacity(n);
        let mut out = rev[0];
        for (i, &width) in rev.iter().enumerate() {
            let v = vars.pp("up_blocks").pp(i);
            let prev = out;
            out = width;
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        v.pp("resnets").pp(j),
                        if j == 0 { prev } else { out },
                        out,
                        None,
                        g,
                        EPS,
                    )
                })
                .collect::<Result<_, _>>()?;
            let upsampler = (i + 1 < n)
                .then(|| Upsample2D::new(v.pp("upsamplers").pp(0), out))
                .transpose()?;
            up_blocks.push(Block {
                resnets,
                downsampler: None,
                upsampler,
            });
        }
        Ok(Self {
            conv_in: Conv2d::new(vars.pp("conv_in"), c.latent_channels, rev[0], 3, 1, 1)?,
            mid_block: MidBlock::new(vars.pp("mid_block"), rev[0], g)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vars.pp("conv_norm_out"), g, rev[n - 1], EPS)?,
            conv_out: Conv2d::new(vars.pp("conv_out"), rev[n - 1], c.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.mid_block.forward(self.conv_in.forward(z));
        for b in &self.up_blocks {
            x = b.forward(x);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

/// The posterior of an encoded image: a diagonal Gaussian over latents.
#[derive(Clone, Debug)]
pub struct Posterior {
    /// `[b, latent_channels, h/8, w/8]`.
    pub mean: Tensor<4>,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<4>,
}

/// The VAE of Stable Diffusion.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    /// The config the model was built from (its `scaling_factor` scales latents for the UNet).
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
}

impl AutoencoderKL {
    /// Builds the encoder, decoder and (post-)quantisation convolutions from the weights
    /// under `vars`, shaped by `c`.
    pub fn new(vars: Vars, c: &VaeConfig) -> Result<Self, WeightsError> {
        let l = c.latent_channels;
        Ok(Self {
            config: c.clone(),
            encoder: Encoder::new(vars.pp("encoder"), c)?,
            decoder: Decoder::new(vars.pp("decoder"), c)?,
            quant_conv: Conv2d::new(vars.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?,
            post_quant_conv: Conv2d::new(vars.pp("post_quant_conv"), l, l, 1, 1, 0)?,
        })
    }

    /// Images in [-1, 1], `[b, 3, h, w]` (F32) -> the latent posterior (F32). Multiply a latent by
    /// `config.scaling_factor` before handing it to the UNet.
    ///
    /// - `image`: `[batch, in_channels, height, width]`, height and width multiples of 8
    /// - output: `mean` and `logvar`, each `[batch, latent_channels, height / 8, width / 8]`
    ///
    /// The factor 8 is `2^(block_out_channels.len() - 1)`: SD's VAE has four levels.
    pub fn encode(&self, image: Tensor<4>) -> Posterior {
        let image = image.cast(self.dtype());
        let moments = self
            .quant_conv
            .forward(self.encoder.forward(image))
            .cast(DType::F32);
        let [mean, logvar] = moments.chunk(2, 1).try_into().expect("two chunks");
        Posterior {
            mean,
            logvar: logvar.clamp(-30.0, 20.0),
        }
    }

    /// Latents (already divided by the scaling factor) -> images in about [-1, 1].
    ///
    /// - `latents`: `[batch, latent_channels, height, width]`
    /// - output: `[batch, out_channels, scale * height, scale * width]`, F32, where `scale` is
    ///   `config.latent_scale()`
    ///
    /// Where the device binds less than the decoder's widest activation (WebGPU's default is
    /// 128 MiB; one 512 px image needs 256 MiB), the images are decoded one at a time, and
    /// where one is still too large, in tiles (`VaeConfig::decode_plan`).
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let [images, _, h, w] = latents.dims();
        let scale = self.config.latent_scale();
        let limit = crate::device::binding_limit(&latents.device());
        match self.config.decode_plan(images, w * scale, h * scale, limit) {
            DecodePlan::Whole => self.decode_whole(latents),
            DecodePlan::EachImage => each_image(latents, |z| self.decode_whole(z)),
            DecodePlan::Tiles(tile) => each_image(latents, |z| self.decode_tiled(z, tile)),
        }
    }

    fn decode_whole(&self, latents: Tensor<4>) -> Tensor<4> {
        let latents = latents.cast(self.dtype());
        self.decoder
            .forward(self.post_quant_conv.forward(latents))
            .cast(DType::F32)
    }

    /// Decodes in overlapping square tiles of `tile` latent positions, each blended into the
    /// one above and the one to its left over a quarter of the tile, as diffusers'
    /// `AutoencoderKL.tiled_decode` does (with `tile_latent_min_size = tile`); shapes as
    /// `decode`. Each tile's attention sees only the tile, so the result differs a little from
    /// a whole decode; the decoder's activations are a tile's.
    pub fn decode_tiled(&self, latents: Tensor<4>, tile: usize) -> Tensor<4> {
        let [_, _, h, w] = latents.dims();
        let scale = self.config.latent_scale();
        // diffusers: overlap_size, blend_extent, row_limit.
        let stride = (tile * 3 / 4).max(1);
        let blend = tile * scale / 4;
        let keep = tile * scale - blend;
        let latents = self.post_quant_conv.forward(latents.cast(self.dtype()));
        let mut rows: Vec<Vec<Tensor<4>>> = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut row: Vec<Tensor<4>> = Vec::new();
            for j in (0..w).step_by(stride) {
                let z = latents
                    .clone()
                    .narrow(2, i, tile.min(h - i))
                    .narrow(3, j, tile.min(w - j));
                let mut decoded = self.decoder.forward(z).cast(DType::F32);
                // diffusers blends in place, so the tiles above and to the left are already
                // blended themselves when they are read.
                if let Some(above) = rows.last() {
                    decoded = blend_tiles(&above[row.len()], decoded, blend, 2);
                }
                if let Some(left) = row.last() {
                    decoded = blend_tiles(left, decoded, blend, 3);
                }
                row.push(decoded);
            }
            rows.push(row);
        }
        let crop = |t: &Tensor<4>| {
            let [_, _, th, tw] = t.dims();
            t.clone()
                .narrow(2, 0, th.min(keep))
                .narrow(3, 0, tw.min(keep))
        };
        let rows = rows
            .iter()
            .map(|row| Tensor::cat(row.iter().map(&crop).collect(), 3))
            .collect();
        Tensor::cat(rows, 2)
    }

    /// The weights' dtype. Inputs are cast to it; outputs come back as F32.
    pub fn dtype(&self) -> DType {
        self.quant_conv.weight.dtype()
    }
}

/// `decode` applied to each image of the batch alone, the results stacked again.
fn each_image(latents: Tensor<4>, decode: impl Fn(Tensor<4>) -> Tensor<4>) -> Tensor<4> {
    let images = latents.dims()[0];
    let outs = (0..images)
        .map(|i| decode(latents.clone().narrow(0, i, 1)))
        .collect();
    Tensor::cat(outs, 0)
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows (columns)
/// of `b` fade in from the last ones of `a`, `b`'s weight growing as `y / extent`.
fn blend_tiles(a: &Tensor<4>, b: Tensor<4>, extent: usize, dim: usize) -> Tensor<4> {
    let (len_a, len_b) = (a.dims()[dim], b.dims()[dim]);
    let extent = extent.min(len_a).min(len_b);
    if extent == 0 {
        return b;
    }
    let mut shape = [1; 4];
    shape[dim] = extent;
    // The weights in f64 then rounded, as PyTorch turns its Python scalars.
    let weights = |f: fn(f64) -> f64| {
        let w: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        Tensor::<4>::from_data(TensorData::new(w, shape), &b.device())
    };
    let faded = a.clone().narrow(dim, len_a - extent, extent) * weights(|t| 1.0 - t)
        + b.clone().narrow(dim, 0, extent) * weights(|t| t);
    if extent == len_b {
        return faded;
    }
    Tensor::cat(vec![faded, b.narrow(dim, extent, len_b - extent)], dim)
}
