//! CLIP's text transformer (transformers' `CLIPTextModel`): OpenAI CLIP ViT-L/14 for SD 1.x
//! (quick-gelu), OpenCLIP ViT-H/14 for SD 2.x (gelu), and for SDXL both ViT-L/14 and OpenCLIP
//! ViT-bigG/14 with its text projection (`CLIPTextModelWithProjection`). It takes token ids, or
//! token embeddings so that learned identity vectors can be spliced in at placeholder positions.

use burn::tensor::{
    DType, Device, Int, Tensor, TensorData, module::attention, ops::AttentionModuleOptions,
};

use crate::config::TextConfig;
use crate::nn::{Activation, Embedding, LayerNorm, Linear, Vars};
use crate::weights::WeightsError;

/// Token ids as the encoder takes them: `rows` sequences of equal length, `[rows, len]`.
pub fn ids_tensor(ids: &[u32], rows: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Tensor::from_data(
        TensorData::new(data, [rows, ids.len() / rows.max(1)]),
        device,
    )
}

/// What the encoder returns.
#[derive(Clone, Debug)]
pub struct TextOutput {
    /// The last layer's states after the final layer norm, `[batch, seq, hidden]`: what SD
    /// conditions on (for SD 2.x the diffusers text encoder already ends one layer early).
    pub last_hidden_state: Tensor<3>,
    /// The states entering the last layer, without the final norm (`hidden_states[-2]`),
    /// `[batch, seq, hidden]`: "CLIP skip" uses these.
    pub penultimate: Tensor<3>,
    /// `last_hidden_state` at each sequence's end token, `[batch, hidden]`.
    pub pooled: Tensor<2>,
    /// `pooled` through the text projection, `[batch, projection_dim]`: SDXL's pooled
    /// conditioning (`text_embeds`). `None` for models without a projection.
    pub text_embeds: Option<Tensor<2>>,
}

#[derive(Clone, Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vars: Vars, dim: usize, heads: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            q_proj: Linear::new(vars.pp("q_proj"), dim, dim, true)?,
            k_proj: Linear::new(vars.pp("k_proj"), dim, dim, true)?,
            v_proj: Linear::new(vars.pp("v_proj"), dim, dim, true)?,
            out_proj: Linear::new(vars.pp("out_proj"), dim, dim, true)?,
            heads,
        })
    }

    /// Causal self-attention, `[b, s, d]` -> `[b, s, d]`.
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
            is_causal: true,
        };
        let out = attention(q, k, v, None, None, options)
            .swap_dims(1, 2)
            .reshape([b, s, d]);
        self.out_proj.forward(out)
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vars: Vars, c: &TextConfig, act: Activation) -> Result<Self, WeightsError> {
        let d = c.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::new(vars.pp("layer_norm1"), d, c.layer_norm_eps)?,
            self_attn: SelfAttention::new(vars.pp("self_attn"), d, c.num_attention_heads)?,
            layer_norm2: LayerNorm::new(vars.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::new(vars.pp("mlp").pp("fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::new(vars.pp("mlp").pp("fc2"), c.intermediate_size, d, true)?,
            act,
        })
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone()
            + self.fc2.forward(
                self.act
                    .forward(self.fc1.forward(self.layer_norm2.forward(x))),
            )
    }
}

/// `CLIPTextModel` (its `text_model.` part), or `CLIPTextModelWithProjection` (that and
/// `text_projection`).
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor<2>,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Built from the weights under `text_model.`.
    pub fn new(vars: Vars, c: &TextConfig) -> Result<Self, WeightsError> {
        let act = Activation::from_name(&c.hidden_act).ok_or_else(|| WeightsError::Config {
            file: "text_encoder/config.json".into(),
            reason: format!("unknown hidden_act `{}`", c.hidden_act),
        })?;
        let vars = vars.pp("text_model");
        let emb = vars.pp("embeddings");
        let d = c.hidden_size;
        Ok(Self {
            token_embedding: Embedding::new(emb.pp("token_embedding"), c.vocab_size, d)?,
            position_embedding: emb
                .pp("position_embedding")
                .get("weight", [c.max_position_embeddings, d])?,
            layers: (0..c.num_hidden_layers)
                .map(|i| EncoderLayer::new(vars.pp("encoder").pp("layers").pp(i), c, act))
                .collect::<Result<_, _>>()?,
            final_layer_norm: LayerNorm::new(vars.pp("final_layer_norm"), d, c.layer_norm_eps)?,
            text_projection: None,
        })
    }

    /// `CLIPTextModelWithProjection`: the weights under `text_model.` and the bias-free
    /// `text_projection` (SDXL's second text encoder).
    pub fn with_projection(vars: Vars, c: &TextConfig) -> Result<Self, WeightsError> {
        let projection = Linear::new(
            vars.pp("text_projection"),
            c.hidden_size,
            c.projection_dim,
            false,
        )?;
        Ok(Self {
            text_projection: Some(projection),
            ..Self::new(vars, c)?
        })
    }

    /// The token-embedding table: its size, `[vocab, hidden]`.
    pub fn token_embedding_dims(&self) -> [usize; 2] {
        [self.token_embedding.count(), self.token_embedding.dim()]
    }

    /// The token embedding of `id`, `[1, hidden]`, in the weights' dtype.
    pub fn token_embedding_row(&self, id: usize) -> Tensor<2> {
        self.token_embedding.row(id)
    }

    /// Token embeddings of `ids` (`[batch, seq]` -> `[batch, seq, hidden]`, F32), before
    /// position embeddings: the sequence to splice learned vectors into.
    pub fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.token_embedding.forward(ids).cast(DType::F32)
    }

    /// The weights' dtype. Inputs are cast to it; outputs come back as F32.
    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// Encodes token ids; the pooled output is taken at the first end token (the largest id).
    ///
    /// - `ids`: `[batch, seq]`, `seq` at most `max_position_embeddings` (77)
    /// - output: `last_hidden_state` and `penultimate` `[batch, seq, hidden]`, `pooled`
    ///   `[batch, hidden]`, all F32
    pub fn forward(&self, ids: Tensor<2, Int>) -> TextOutput {
        let [b, _] = ids.dims();
        let eos = ids.clone().argmax(1).reshape([b]);
        self.forward_embeds(self.embed_tokens(ids), eos)
    }

    /// Encodes token embeddings `[batch, seq, hidden]`; `eos` `[batch]` gives each sequence's
    /// end-token position for the pooled output.
    ///
    /// - `embeds`: `[batch, seq, hidden]`, `seq` at most `max_position_embeddings` (77)
    /// - `eos`: `[batch]`, each below `seq`
    /// - output: `last_hidden_state` and `penultimate` `[batch, seq, hidden]`, `pooled`
    ///   `[batch, hidden]`, `text_embeds` `[batch, projection_dim]`, all F32
    pub fn forward_embeds(&self, embeds: Tensor<3>, eos: Tensor<1, Int>) -> TextOutput {
        let [b, s, d] = embeds.dims();
        let mut x = embeds.cast(self.dtype())
            + self
                .position_embedding
                .clone()
                .narrow(0, 0, s)
                .unsqueeze::<3>();
        let mut penultimate = x.clone();
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            if i == last {
                penultimate = x.clone();
            }
            x = layer.forward(x);
        }
        let last_hidden_state = self.final_layer_norm.forward(x).cast(DType::F32);
        let penultimate = penultimate.cast(DType::F32);
        let index = eos.reshape([b, 1, 1]).expand([b, 1, d]);
        let pooled = last_hidden_state.clone().gather(1, index).reshape([b, d]);
        let text_embeds = self.text_projection.as_ref().map(|p| {
            p.forward(pooled.clone().cast(self.dtype()))
                .cast(DType::F32)
        });
        TextOutput {
            last_hidden_state,
            penultimate,
            pooled,
            text_embeds,
        }
    }
}
