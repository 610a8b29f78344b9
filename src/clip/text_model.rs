//! CLIP's text transformer (transformers' `CLIPTextModel`): OpenAI CLIP ViT-L/14 for SD 1.x
//! (quick-gelu), OpenCLIP ViT-H/14 for SD 2.x (gelu), and for SDXL both ViT-L/14 and OpenCLIP
//! ViT-bigG/14 with its text projection (`CLIPTextModelWithProjection`). It takes token ids, or
//! token embeddings so that learned identity vectors can be spliced in at placeholder positions.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use super::encoder::{EncoderLayer, LayerShape};
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

/// Each window's first end token (its largest id): where CLIP pools, `[windows]`.
pub fn end_positions(windows: &[Vec<u32>], device: &Device) -> Tensor<1, Int> {
    let eos: Vec<i64> = windows
        .iter()
        .map(|w| {
            let max = w.iter().copied().max().unwrap_or(0);
            w.iter().position(|&i| i == max).unwrap_or(0) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(eos, [windows.len()]), device)
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
        let shape = LayerShape {
            hidden_size: d,
            intermediate_size: c.intermediate_size,
            heads: c.num_attention_heads,
            layer_norm_eps: c.layer_norm_eps,
            act,
            causal: true,
        };
        Ok(Self {
            token_embedding: Embedding::new(emb.pp("token_embedding"), c.vocab_size, d)?,
            position_embedding: emb
                .pp("position_embedding")
                .get("weight", [c.max_position_embeddings, d])?,
            layers: EncoderLayer::stack(vars.clone(), c.num_hidden_layers, &shape)?,
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
