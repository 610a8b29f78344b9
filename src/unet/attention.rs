//! `Transformer2DModel` with `BasicTransformerBlock`s and the `Attention` inside them
//! (diffusers' `models/transformers/transformer_2d.py`, `models/attention*.py`).
//!
//! Cross-attention takes its keys and its values from two contexts (SeFi's disentangled
//! identity tokens), and can report its attention probabilities at chosen token positions.

use burn::tensor::{
    DType, Int, Tensor,
    activation::{gelu, softmax},
    module::attention,
    ops::AttentionModuleOptions,
};

use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear, Vars};
use crate::weights::WeightsError;

/// What cross-attention attends to: keys computed from `key`, values from `value`, both
/// `[batch, tokens, dim]`. Ordinary prompts use the same states for both. SDXL UNets also take
/// the `added` conditioning.
#[derive(Clone, Debug)]
pub struct Context {
    /// Encoder states the keys are projected from, `[batch, tokens, dim]`.
    pub key: Tensor<3>,
    /// Encoder states the values are projected from, `[batch, tokens, dim]`.
    pub value: Tensor<3>,
    /// SDXL's pooled text embedding and time ids; `None` for SD 1.x/2.x.
    pub added: Option<AddedCond>,
}

/// SDXL's added conditioning (`added_cond_kwargs` in diffusers), summed into the timestep
/// embedding through `add_embedding`.
#[derive(Clone, Debug)]
pub struct AddedCond {
    /// The second text encoder's projected pooled output, `[batch, projection_dim]`.
    pub text_embeds: Tensor<2>,
    /// Micro-conditioning: original height and width, crop top and left, target height and
    /// width, in pixels, `[batch, 6]`.
    pub time_ids: Tensor<2>,
}

impl AddedCond {
    /// Both halves of a guided batch in one: `[a; b]` along the batch.
    pub fn cat(a: &AddedCond, b: &AddedCond) -> Self {
        Self {
            text_embeds: Tensor::cat(vec![a.text_embeds.clone(), b.text_embeds.clone()], 0),
            time_ids: Tensor::cat(vec![a.time_ids.clone(), b.time_ids.clone()], 0),
        }
    }
}

impl Context {
    /// The same encoder states for keys and values.
    pub fn new(states: Tensor<3>) -> Self {
        Self {
            key: states.clone(),
            value: states,
            added: None,
        }
    }

    /// Keys and values from separate encoder states (same shape).
    pub fn split(key: Tensor<3>, value: Tensor<3>) -> Self {
        Self {
            key,
            value,
            added: None,
        }
    }

    /// The same context with SDXL's added conditioning.
    pub fn with_added(mut self, added: Option<AddedCond>) -> Self {
        self.added = added;
        self
    }
}

/// Asks cross-attention layers for their attention probabilities at some token positions.
#[derive(Debug)]
pub struct AttentionCapture {
    positions: Tensor<1, Int>,
    reference: Option<(Tensor<3>, Tensor<1, Int>)>,
    /// One per cross-attention layer, in forward order (the order of diffusers'
    /// `named_modules()`): `[batch, heads, queries, positions]`, differentiable.
    pub maps: Vec<Tensor<4>>,
    /// With a reference: the probabilities the same queries give the reference context's
    /// keys at the reference positions, one per layer like `maps`, without gradient.
    pub reference_maps: Vec<Tensor<4>>,
}

impl AttentionCapture {
    /// Captures the attention to the context tokens at `positions` (token indices,
    /// `[positions]`).
    pub fn new(positions: Tensor<1, Int>) -> Self {
        Self {
            positions,
            reference: None,
            maps: Vec::new(),
            reference_maps: Vec::new(),
        }
    }

    /// Also computes, with every layer's own queries, the attention to `context`'s keys at
    /// `positions` (SeFi's face-wise mask: the class word's map in the reference prompt).
    pub fn with_reference(mut self, context: Tensor<3>, positions: Tensor<1, Int>) -> Self {
        self.reference = Some((context, positions));
        self
    }
}

/// Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`).
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `context_dim`: width of the cross-attention context (the query width for
    /// self-attention). `bias`: whether q/k/v have biases (the VAE's do).
    pub fn new(
        vars: Vars,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
    ) -> Result<Self, WeightsError> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(vars.pp("to_q"), query_dim, inner, bias)?,
            to_k: Linear::new(vars.pp("to_k"), context_dim, inner, bias)?,
            to_v: Linear::new(vars.pp("to_v"), context_dim, inner, bias)?,
            to_out: Linear::new(vars.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// `x`: `[b, n, query_dim]`; `context`: keys/values for cross-attention (None: self).
    ///
    /// - `x`: `[batch, queries, query_dim]`
    /// - `context.key`, `context.value`: `[batch, tokens, context_dim]`
    /// - output: `[batch, queries, query_dim]`
    ///
    /// With `capture`, pushes `[batch, heads, queries, positions]` onto its `maps` (and, with
    /// a reference, onto its `reference_maps`).
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<&Context>,
        capture: Option<&mut AttentionCapture>,
    ) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let q = self.to_q.forward(x.clone());
        // Contexts arrive in F32 from the text encoder; they meet the weights in their dtype.
        let dtype = self.to_k.weight.dtype();
        let (k, v) = match context {
            Some(c) => (
                self.to_k.forward(c.key.clone().cast(dtype)),
                self.to_v.forward(c.value.clone().cast(dtype)),
            ),
            None => (self.to_k.forward(x.clone()), self.to_v.forward(x)),
        };
        let inner = q.dims()[2];
        let dh = inner / self.heads;
        let split = |t: Tensor<3>| {
            let m = t.dims()[1];
            t.reshape([b, m, self.heads, dh]).swap_dims(1, 2)
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let out = match capture {
            // The probabilities are needed: compute them explicitly.
            Some(capture) => {
                let scale = (dh as f64).powf(-0.5);
                if let Some((context, positions)) = &capture.reference {
                    // The reference side is a target: no gradient, not even through q.
                    let [cb, m, _] = context.dims();
                    let kr = self
                        .to_k
                        .forward(context.clone().cast(dtype))
                        .reshape([cb, m, self.heads, dh])
                        .swap_dims(1, 2);
                    let qd = q.clone().detach();
                    let kr = kr.expand([qd.dims()[0], self.heads, m, dh]);
                    let probs = softmax(qd.matmul(kr.swap_dims(2, 3)).mul_scalar(scale), 3);
                    capture
                        .reference_maps
                        .push(probs.select(3, positions.clone()).cast(DType::F32).detach());
                }
                let probs = softmax(q.matmul(k.swap_dims(2, 3)).mul_scalar(scale), 3);
                capture.maps.push(
                    probs
                        .clone()
                        .select(3, capture.positions.clone())
                        .cast(DType::F32),
                );
                probs.matmul(v)
            }
            None => attend(q, k, v),
        };
        self.to_out
            .forward(out.swap_dims(1, 2).reshape([b, n, inner]))
    }
}

/// Scaled dot-product attention, `[b, h, n, d]` queries against `[b, h, m, d]` keys and
/// values, through burn's fused op, in query chunks where the scores the op may materialise
/// (`[b, h, chunk, m]`, f32) would pass the device's binding limit (a 512 px self-attention
/// of SD 1.5 with guidance: 1 GiB). Each query's row of scores is whole, so chunking changes
/// no result.
fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, h, n, _] = q.dims();
    let m = k.dims()[2];
    let limit = crate::device::binding_limit(&q.device());
    let chunks: Vec<_> = crate::nn::row_chunks(n, b * h * m * 4, limit).collect();
    if chunks.len() == 1 {
        return attention(q, k, v, None, None, AttentionModuleOptions::default());
    }
    let outs = chunks
        .into_iter()
        .map(|r| {
            let qc = q.clone().narrow(2, r.start, r.len());
            let options = AttentionModuleOptions::default();
            attention(qc, k.clone(), v.clone(), None, None, options)
        })
        .collect();
    Tensor::cat(outs, 2)
}

/// GEGLU feed-forward: `net.0.proj` makes value and gate, `net.2` projects back.
#[derive(Clone, Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vars: Vars, dim: usize) -> Result<Self, WeightsError> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::new(vars.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            out: Linear::new(vars.pp("net").pp(2), inner, dim, true)?,
        })
    }

    /// `[b, n, dim]` -> `[b, n, dim]`, in token chunks where the projection (`[b, n, 8 * dim]`,
    /// at most f32) would pass the device's binding limit (SD 2.1 at 768 px with guidance:
    /// 180 MiB). Each token is projected alone, so chunking changes no result.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, dim] = x.dims();
        let limit = crate::device::binding_limit(&x.device());
        let chunks: Vec<_> = crate::nn::row_chunks(n, b * 8 * dim * 4, limit).collect();
        if chunks.len() == 1 {
            return self.forward_whole(x);
        }
        let outs = chunks
            .into_iter()
            .map(|r| self.forward_whole(x.clone().narrow(1, r.start, r.len())))
            .collect();
        Tensor::cat(outs, 1)
    }

    fn forward_whole(&self, x: Tensor<3>) -> Tensor<3> {
        let [hidden, gate] = self
            .proj
            .forward(x)
            .chunk(2, 2)
            .try_into()
            .expect("two chunks");
        self.out.forward(hidden * gelu(gate))
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual.
#[derive(Clone, Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vars: Vars, dim: usize, context_dim: usize, heads: usize) -> Result<Self, WeightsError> {
        let dh = dim / heads;
        Ok(Self {
            norm1: LayerNorm::new(vars.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vars.pp("attn1"), dim, dim, heads, dh, false)?,
            norm2: LayerNorm::new(vars.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vars.pp("attn2"), dim, context_dim, heads, dh, false)?,
            norm3: LayerNorm::new(vars.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vars.pp("ff"), dim)?,
        })
    }

    fn forward(
        &self,
        x: Tensor<3>,
        context: &Context,
        capture: Option<&mut AttentionCapture>,
    ) -> Tensor<3> {
        let x = x.clone() + self.attn1.forward(self.norm1.forward(x), None, None);
        let x = x.clone()
            + self
                .attn2
                .forward(self.norm2.forward(x), Some(context), capture);
        x.clone() + self.ff.forward(self.norm3.forward(x))
    }
}

/// Projection in or out: a 1x1 convolution (SD 1.x) or a linear layer (SD 2.x).
#[derive(Clone, Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Spatial transformer: group norm, projection in, transformer blocks over the `h*w`
/// positions, projection out, residual.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Reads the weights under `vars`: `layers` transformer blocks of `heads` heads over
    /// `channels` channels, cross-attending to a context of width `context_dim`; the input
    /// norm has `groups` groups, and the projections are linear if `linear_projection`, else
    /// 1x1 convolutions.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vars: Vars,
        channels: usize,
        context_dim: usize,
        heads: usize,
        layers: usize,
        groups: usize,
        linear_projection: bool,
    ) -> Result<Self, WeightsError> {
        let proj = |name: &str| -> Result<Projection, WeightsError> {
            Ok(if linear_projection {
                Projection::Linear(Linear::new(vars.pp(name), channels, channels, true)?)
            } else {
                Projection::Conv(Conv2d::new(vars.pp(name), channels, channels, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::new(vars.pp("norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            transformer_blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        vars.pp("transformer_blocks").pp(i),
                        channels,
                        context_dim,
                        heads,
                    )
                })
                .collect::<Result<_, _>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    /// `[b, c, h, w]` -> same shape.
    ///
    /// - `x`: `[batch, channels, height, width]`
    /// - `context.key`, `context.value`: `[batch, tokens, context_dim]`
    /// - output: `[batch, channels, height, width]`
    ///
    /// With `capture`, each transformer block's cross-attention pushes
    /// `[batch, heads, height * width, positions]` onto its `maps`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        context: &Context,
        mut capture: Option<&mut AttentionCapture>,
    ) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let to_seq = |t: Tensor<4>| t.reshape([b, c, h * w]).swap_dims(1, 2);
        let from_seq = |t: Tensor<3>| t.swap_dims(1, 2).reshape([b, c, h, w]);
        let normed = self.norm.forward(x.clone());
        let mut seq = match &self.proj_in {
            Projection::Conv(conv) => to_seq(conv.forward(normed)),
            Projection::Linear(lin) => lin.forward(to_seq(normed)),
        };
        for block in &self.transformer_blocks {
            seq = block.forward(seq, context, capture.as_deref_mut());
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(from_seq(seq)),
            Projection::Linear(lin) => from_seq(lin.forward(seq)),
        };
        out + x
    }
}
