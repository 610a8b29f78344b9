//! Conditioning with identities: learned vectors spliced into the prompt's token embeddings
//! at the placeholder positions, then the frozen text encoder.

use burn::tensor::{Device, Tensor};

use super::{FINGERPRINT_ROWS, FINGERPRINT_VALUES, Fingerprint};
use crate::nn::read_f32;
use crate::sd::{Encoded, StableDiffusion};

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

/// The encoding of one 77-token window with `vectors` (`[n, dim]`, `dim` the sum of the
/// encoders' token widths) at `positions`: `states` `[1, 77, cross_attention_dim]`, and SDXL's
/// `pooled` `[1, 1280]`.
pub fn encode_spliced(
    sd: &StableDiffusion,
    ids: &[u32],
    positions: &[usize],
    vectors: Tensor<2>,
    device: &Device,
) -> Encoded {
    let window = [ids.to_vec()];
    let embeds = splice(sd.embed_tokens(&window, device), positions, vectors);
    sd.encode_embeds(embeds, &window, device)
}

/// The fingerprint of a model's token-embedding tables (see [`Fingerprint`]): for SDXL,
/// samples of CLIP-L's table, then of bigG's.
pub async fn fingerprint(sd: &StableDiffusion) -> Result<Fingerprint, String> {
    let mut encoders = vec![&sd.text_encoder];
    encoders.extend(sd.text_encoder_2.as_ref());
    let vocab = encoders[0].token_embedding_dims()[0];
    let widths = sd.token_widths();
    let mut samples = Vec::new();
    for encoder in encoders {
        let [rows, width] = encoder.token_embedding_dims();
        for row in FINGERPRINT_ROWS {
            let t = encoder.token_embedding_row(row.min(rows - 1)).narrow(
                1,
                0,
                FINGERPRINT_VALUES.min(width),
            );
            samples.extend(read_f32(t).await?);
        }
    }
    Ok(Fingerprint {
        vocab,
        dim: widths.iter().sum(),
        widths: if widths.len() > 1 { widths } else { Vec::new() },
        samples,
    })
}
