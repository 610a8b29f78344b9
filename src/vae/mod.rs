//! `AutoencoderKL` (diffusers' `models/autoencoders/autoencoder_kl.py` and `vae.py`): images
//! to latent distributions and latents back to images.

use burn::tensor::{DType, Tensor, activation::silu};

use crate::config::VaeConfig;
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
    /// - output: `[batch, out_channels, 8 * height, 8 * width]`, F32
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let latents = latents.cast(self.dtype());
        self.decoder
            .forward(self.post_quant_conv.forward(latents))
            .cast(DType::F32)
    }

    /// The weights' dtype. Inputs are cast to it; outputs come back as F32.
    pub fn dtype(&self) -> DType {
        self.quant_conv.weight.dtype()
    }
}
