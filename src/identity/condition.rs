//! Conditioning with identities: learned vectors spliced into the prompt's token embeddings
//! at the placeholder positions, then the frozen text encoder.

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::{FINGERPRINT_ROWS, FINGERPRINT_VALUES, Fingerprint};
use crate::clip::ids_tensor;
use crate::nn::read_f32;
use crate::sd::StableDiffusion;

/// Token embeddings `[1, seq, dim]` with row `positions[j]` replaced by `vectors[j]`.
pub fn splice(embeds: Tensor<3>, positions: &[usize], vectors: Tensor<2>) -> Tensor<3> {
    let [_, seq, dim] = embeds.dims();
    let mut order: Vec<(usize, usize)> = positions
        .iter()
        .copied()
        .enumerate()
        .map(|(j, p)| (p, j))
        .collect();
    order.sort();
    let mut parts = Vec::new();
    let mut at = 0;
    for (p, j) in order {
        if p > at {
            parts.push(embeds.clone().narrow(1, at, p - at));
        }
        parts.push(vectors.clone().narrow(0, j, 1).reshape([1, 1, dim]));
        at = p + 1;
    }
    if at < seq {
        parts.push(embeds.narrow(1, at, seq - at));
    }
    Tensor::cat(parts, 1)
}

/// The first end token (the largest id): where CLIP pools.
pub fn eos_position(ids: &[u32]) -> usize {
    let max = ids.iter().copied().max().unwrap_or(0);
    ids.iter().position(|&i| i == max).unwrap_or(0)
}

/// Encoder states `[1, seq, dim]` of one 77-token window with `vectors` (`[n, dim]`) at
/// `positions`.
pub fn encode_spliced(
    sd: &StableDiffusion,
    ids: &[u32],
    positions: &[usize],
    vectors: Tensor<2>,
    device: &Device,
) -> Tensor<3> {
    let embeds = splice(
        sd.text_encoder.embed_tokens(ids_tensor(ids, 1, device)),
        positions,
        vectors,
    );
    let eos =
        Tensor::<1, Int>::from_data(TensorData::new(vec![eos_position(ids) as i64], [1]), device);
    sd.text_encoder
        .forward_embeds(embeds, eos)
        .last_hidden_state
}

/// The fingerprint of a model's token-embedding table (see [`Fingerprint`]).
pub async fn fingerprint(sd: &StableDiffusion) -> Result<Fingerprint, String> {
    let table = sd.text_encoder.token_embedding_table();
    let [vocab, dim] = table.dims();
    let mut samples = Vec::new();
    for row in FINGERPRINT_ROWS {
        let t = table.clone().narrow(0, row.min(vocab - 1), 1).narrow(
            1,
            0,
            FINGERPRINT_VALUES.min(dim),
        );
        samples.extend(read_f32(t).await?);
    }
    Ok(Fingerprint {
        vocab,
        dim,
        samples,
    })
}
