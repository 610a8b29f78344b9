//! `UNet2DConditionModel` for SD 1.x, 2.x and XL (diffusers' `models/unets/unet_2d_condition.py`
//! and `unet_2d_blocks.py`). Field names follow the checkpoint keys.
//!
//! SDXL adds several transformer layers per block (`transformer_layers_per_block`) and the
//! `text_time` embedding: the pooled text embedding and sinusoidal features of six
//! micro-conditioning ids go through `add_embedding` into the timestep embedding.

pub mod attention;
pub mod resnet;

use burn::tensor::{DType, Tensor, TensorData, activation::silu};

pub use attention::{AddedCond, AttentionCapture, Context, Transformer2DModel};
pub use resnet::{ResnetBlock2D, Upsample2D};

use crate::config::UNetConfig;
use crate::nn::{Conv2d, GroupNorm, Linear, Vars};
use crate::weights::WeightsError;

fn has_attention(block_type: &str, down: bool) -> Result<bool, WeightsError> {
    match (block_type, down) {
        ("CrossAttnDownBlock2D", true) | ("CrossAttnUpBlock2D", false) => Ok(true),
        ("DownBlock2D", true) | ("UpBlock2D", false) => Ok(false),
        _ => Err(WeightsError::Config {
            file: "unet/config.json".into(),
            reason: format!("unsupported UNet block type `{block_type}`"),
        }),
    }
}

fn transformer(
    vars: Vars,
    c: &UNetConfig,
    channels: usize,
    heads: usize,
    block: usize,
) -> Result<Transformer2DModel, WeightsError> {
    Transformer2DModel::new(
        vars,
        channels,
        c.cross_attention_dim,
        heads,
        c.transformer_layers_per_block.get(block),
        c.norm_num_groups,
        c.use_linear_projection,
    )
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
#[derive(Clone, Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Conv2d>,
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`.
#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Clone, Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Transformer2DModel,
}

/// The denoising UNet.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    /// The config the model was built from.
    pub config: UNetConfig,
    conv_in: Conv2d,
    linear_1: Linear,
    linear_2: Linear,
    /// SDXL's `add_embedding` (`linear_1`, SiLU, `linear_2`), with the width of each time
    /// id's features.
    add_embedding: Option<(Linear, Linear, usize)>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the UNet from the weights under `vars`, laid out as `c` describes; fails on a
    /// block type other than the SD ones.
    pub fn new(vars: Vars, c: &UNetConfig) -> Result<Self, WeightsError> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        let resnet =
            |v: Vars, i: usize, o: usize| ResnetBlock2D::new(v, i, o, Some(temb), groups, eps);

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let v = vars.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = ch[i];
            let attn = has_attention(ty, true)?;
            let mut block = DownBlock {
                resnets: vec![],
                attentions: vec![],
                downsampler: None,
            };
            for j in 0..c.layers_per_block {
                block.resnets.push(resnet(
                    v.pp("resnets").pp(j),
                    if j == 0 { in_ch } else { out_ch },
                    out_ch,
                )?);
                if attn {
                    block.attentions.push(transformer(
                        v.pp("attentions").pp(j),
                        c,
                        out_ch,
                        c.heads(i),
                        i,
                    )?);
                }
            }
            if i + 1 < n {
                block.downsampler = Some(Conv2d::new(
                    v.pp("downsamplers").pp(0).pp("conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    1,
                )?);
            }
            down_blocks.push(block);
        }

        let mv = vars.pp("mid_block");
        let mid_block = MidBlock {
            resnets: [
                resnet(mv.pp("resnets").pp(0), ch[n - 1], ch[n - 1])?,
                resnet(mv.pp("resnets").pp(1), ch[n - 1], ch[n - 1])?,
            ],
            attention: transformer(
                mv.pp("attentions").pp(0),
                c,
                ch[n - 1],
                c.heads(n - 1),
                n - 1,
            )?,
        };

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev[0];
        for (i, ty) in c.up_block_types.iter().enumerate() {
            let v = vars.pp("up_blocks").pp(i);
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let attn = has_attention(ty, false)?;
            let layers = c.layers_per_block + 1;
            let mut block = UpBlock {
                resnets: vec![],
                attentions: vec![],
                upsampler: None,
            };
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let res_in = if j == 0 { prev_out } else { out_ch };
                block
                    .resnets
                    .push(resnet(v.pp("resnets").pp(j), res_in + skip, out_ch)?);
                if attn {
                    block.attentions.push(transformer(
                        v.pp("attentions").pp(j),
                        c,
                        out_ch,
                        c.heads(n - 1 - i),
                        n - 1 - i,
                    )?);
                }
            }
            if i + 1 < n {
                block.upsampler = Some(Upsample2D::new(v.pp("upsamplers").pp(0), out_ch)?);
            }
            up_blocks.push(block);
        }

        let add_embedding = match c.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let missing = |field: &str| WeightsError::Config {
                    file: "unet/config.json".into(),
                    reason: format!("`addition_embed_type: text_time` needs `{field}`"),
                };
                let time_dim = c
                    .addition_time_embed_dim
                    .ok_or_else(|| missing("addition_time_embed_dim"))?;
                let input = c
                    .projection_class_embeddings_input_dim
                    .ok_or_else(|| missing("projection_class_embeddings_input_dim"))?;
                let v = vars.pp("add_embedding");
                Some((
                    Linear::new(v.pp("linear_1"), input, temb, true)?,
                    Linear::new(v.pp("linear_2"), temb, temb, true)?,
                    time_dim,
                ))
            }
            Some(other) => {
                return Err(WeightsError::Config {
                    file: "unet/config.json".into(),
                    reason: format!(
                        "`addition_embed_type: {other}` is a UNet variant SeFi Studio does not support (only SDXL's `text_time`)"
                    ),
                });
            }
        };

        Ok(Self {
            config: c.clone(),
            add_embedding,
            conv_in: Conv2d::new(vars.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            linear_1: Linear::new(vars.pp("time_embedding").pp("linear_1"), ch[0], temb, true)?,
            linear_2: Linear::new(vars.pp("time_embedding").pp("linear_2"), temb, temb, true)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vars.pp("conv_norm_out"), groups, ch[0], eps)?,
            conv_out: Conv2d::new(vars.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1)?,
        })
    }

    /// Sinusoidal features (`get_timestep_embedding`) of `values`, `[n]` -> `[n, dim]`.
    fn sinusoids(&self, values: Tensor<1>, dim: usize) -> Tensor<2> {
        let half = dim / 2;
        let shift = self.config.freq_shift as f64;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
            .collect();
        // In F32 whatever the weights: timesteps up to 999 lose their units digit in F16.
        let values = values.cast(DType::F32);
        let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &values.device());
        let [n] = values.dims();
        let args = values.reshape([n, 1]) * freqs.reshape([1, half]);
        let (sin, cos) = (args.clone().sin(), args.cos());
        if self.config.flip_sin_to_cos {
            Tensor::cat(vec![cos, sin], 1)
        } else {
            Tensor::cat(vec![sin, cos], 1)
        }
    }

    /// The timestep embedding, plus SDXL's added text/time embedding, `[b, 4 ch0]`.
    fn embedding(&self, timesteps: Tensor<1>, added: Option<&AddedCond>) -> Tensor<2> {
        let dtype = self.dtype();
        let features = self.sinusoids(timesteps, self.config.block_out_channels[0]);
        let temb = self
            .linear_2
            .forward(silu(self.linear_1.forward(features.cast(dtype))));
        let Some((linear_1, linear_2, time_dim)) = &self.add_embedding else {
            return temb;
        };
        let added = added.expect("an SDXL UNet is called with its added conditioning");
        let [b, ids] = added.time_ids.dims();
        let times = self
            .sinusoids(added.time_ids.clone().reshape([b * ids]), *time_dim)
            .reshape([b, ids * time_dim]);
        let input = Tensor::cat(vec![added.text_embeds.clone().cast(DType::F32), times], 1);
        temb + linear_2.forward(silu(linear_1.forward(input.cast(dtype))))
    }

    /// Predicts noise (or v) for latents `sample` `[b, c, h, w]` at `timesteps` `[b]`, attending
    /// to `context`. With `capture`, every cross-attention layer adds its probabilities at the
    /// capture's token positions. An SDXL UNet needs `context.added`.
    ///
    /// - `sample`: `[batch, in_channels, height, width]`
    /// - `timesteps`: `[batch]`
    /// - `context.key`, `context.value`: `[batch, tokens, cross_attention_dim]`
    /// - `context.added`: `text_embeds` `[batch, projection_dim]`, `time_ids` `[batch, 6]`
    /// - output: `[batch, out_channels, height, width]`, F32
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        context: &Context,
        mut capture: Option<&mut AttentionCapture>,
    ) -> Tensor<4> {
        let dtype = self.dtype();
        let temb = self.embedding(timesteps, context.added.as_ref());
        let temb = Some(&temb);

        let mut x = self.conv_in.forward(sample.cast(dtype));
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(x, temb);
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(x, context, capture.as_deref_mut());
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(x);
                skips.push(x.clone());
            }
        }

        let mid = &self.mid_block;
        x = mid.resnets[0].forward(x, temb);
        x = mid.attention.forward(x, context, capture.as_deref_mut());
        x = mid.resnets[1].forward(x, temb);

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = resnet.forward(Tensor::cat(vec![x, skip], 1), temb);
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(x, context, capture.as_deref_mut());
                }
            }
            if let Some(up) = &block.upsampler {
                let size = skips.last().map(|s| {
                    let d = s.dims();
                    [d[2], d[3]]
                });
                x = up.forward(x, size);
            }
        }

        self.conv_out
            .forward(silu(self.conv_norm_out.forward(x)))
            .cast(DType::F32)
    }

    /// The weights' dtype. Inputs are cast to it; outputs (and captured maps) come back as F32.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }
}
