//! The transformer layers both CLIP towers share (transformers' `CLIPEncoderLayer`): the text
//! tower attends causally, the vision tower to every patch.

use burn::tensor::{Tensor, module::attention, ops::AttentionModuleOptions};

use crate::nn::{Activation, LayerNorm, Linear, Vars};
use crate::weights::WeightsError;

/// The widths of a tower's layers, as its config gives them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub layer_norm_eps: f64,
    pub act: Activation,
    /// Each position sees only those before it (the text tower).
    pub causal: bool,
}

#[derive(Clone, Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    causal: bool,
}

impl SelfAttention {
    fn new(vars: Vars, s: &LayerShape) -> Result<Self, WeightsError> {
        let dim = s.hidden_size;
        Ok(Self {
            q_proj: Linear::new(vars.pp("q_proj"), dim, dim, true)?,
            k_proj: Linear::new(vars.pp("k_proj"), dim, dim, true)?,
            v_proj: Linear::new(vars.pp("v_proj"), dim, dim, true)?,
            out_proj: Linear::new(vars.pp("out_proj"), dim, dim, true)?,
            heads: s.heads,
            causal: s.causal,
        })
    }

    /// `[b, s, d]` -> `[b, s, d]`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, d] = x.dims();
        let split = |t: Tensor<3>| {
            t.reshape([b, s, self.heads, d / self.heads])
                .swap_dims(1, 2)
        };
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: self.causal,
        };
        let out = attention(q, k, v, None, None, options)
            .swap_dims(1, 2)
            .reshape([b, s, d]);
        self.out_proj.forward(out)
    }
}

/// One pre-norm transformer layer: self-attention, then the MLP, each with a residual.
#[derive(Clone, Debug)]
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn new(vars: Vars, s: &LayerShape) -> Result<Self, WeightsError> {
        let d = s.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::new(vars.pp("layer_norm1"), d, s.layer_norm_eps)?,
            self_attn: SelfAttention::new(vars.pp("self_attn"), s)?,
            layer_norm2: LayerNorm::new(vars.pp("layer_norm2"), d, s.layer_norm_eps)?,
            fc1: Linear::new(vars.pp("mlp").pp("fc1"), d, s.intermediate_size, true)?,
            fc2: Linear::new(vars.pp("mlp").pp("fc2"), s.intermediate_size, d, true)?,
            act: s.act,
        })
    }

    /// The layers `encoder.layers.{0..count}` under `vars`.
    pub(crate) fn stack(
        vars: Vars,
        count: usize,
        s: &LayerShape,
    ) -> Result<Vec<Self>, WeightsError> {
        (0..count)
            .map(|i| Self::new(vars.pp("encoder").pp("layers").pp(i), s))
            .collect()
    }

    /// `[b, s, d]` -> `[b, s, d]`.
    pub(crate) fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone()
            + self.fc2.forward(
                self.act
                    .forward(self.fc1.forward(self.layer_norm2.forward(x))),
            )
    }
}
