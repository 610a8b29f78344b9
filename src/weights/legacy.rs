//! Diffusers folders as they were published in 2022-2023: the tensor names and buffers that
//! older diffusers and transformers releases wrote, mapped onto the names of today's layout.
//! Each rule mirrors an adaptation the reference libraries make when they load such a file;
//! anything not covered here is left to the strict check in [`super::Checkpoint::check`], so
//! a file made for another model is still refused.

use serde::Serialize;

use super::Component;
use super::ldm::Transform;

/// What becomes of one stored tensor of a diffusers folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adapted {
    /// Today's name, used as it is.
    Current,
    /// An older name (or shape) of a tensor the model uses: load it as `name`.
    Renamed {
        /// Today's diffusers name.
        name: String,
        /// How the stored tensor becomes today's (e.g. squeezing a 1x1 convolution kernel).
        transform: Transform,
    },
    /// A buffer older files carry that the model recomputes; skipped, never read.
    Buffer,
}

/// One adaptation made while opening a folder (`sefi inspect` lists them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Adaptation {
    /// The model whose weight file holds the tensor.
    pub component: Component,
    /// The name in the file.
    pub stored: String,
    /// The name it is loaded as; `None` for a skipped buffer.
    pub loaded_as: Option<String>,
}

/// The adaptation for the tensor `name` (text encoder names already carry `text_model.`) of
/// shape `shape` in `component`'s weight file.
pub fn adapt(component: Component, name: &str, shape: &[usize]) -> Adapted {
    match component {
        // transformers before 4.31 saved CLIP's `position_ids` (int64 [1, 77]) as a persistent
        // buffer, in both of SDXL's text encoders too (its 0.9 release and fine-tunes of that
        // time); today it is recomputed, and transformers skips the stored one on load.
        Component::TextEncoder | Component::TextEncoder2
            if name == "text_model.embeddings.position_ids" =>
        {
            Adapted::Buffer
        }
        // The same buffer in both towers of a CLIP model of that time (openai's own folders).
        Component::Clip
            if matches!(
                name,
                "text_model.embeddings.position_ids" | "vision_model.embeddings.position_ids"
            ) =>
        {
            Adapted::Buffer
        }
        // The temperature of CLIP's training loss: a cosine score needs none.
        Component::Clip if name == "logit_scale" => Adapted::Buffer,
        Component::Vae => vae(name, shape),
        _ => Adapted::Current,
    }
}

/// The VAE's mid-block attention. diffusers before its attention refactor (0.14, 2023) named
/// the projections `query`, `key`, `value`, `proj_attn`; diffusers renames them on load
/// (`_convert_deprecated_attention_blocks`, since `_fix_state_dict_keys_on_load`). Files
/// converted from original checkpoints without squeezing keep the four weights as 1x1
/// convolution kernels [C, C, 1, 1], under either naming.
fn vae(name: &str, shape: &[usize]) -> Adapted {
    // (older name, today's name) of each projection.
    const PROJECTIONS: [(&str, &str); 4] = [
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out.0"),
    ];
    let Some((block, tail)) = attention_block(name) else {
        return Adapted::Current;
    };
    let Some((proj, param)) = tail.rsplit_once('.') else {
        return Adapted::Current;
    };
    let Some(today) = PROJECTIONS
        .iter()
        .find_map(|&(old, new)| (proj == old || proj == new).then_some(new))
    else {
        return Adapted::Current;
    };
    if !["weight", "bias"].contains(&param) {
        return Adapted::Current;
    }
    let conv_kernel = param == "weight" && shape.len() == 4 && shape[2..] == [1, 1];
    if proj == today && !conv_kernel {
        return Adapted::Current;
    }
    Adapted::Renamed {
        name: format!("{block}.{today}.{param}"),
        transform: if conv_kernel {
            Transform::Squeeze
        } else {
            Transform::Copy
        },
    }
}

/// Splits `decoder.mid_block.attentions.0.query.weight` into the attention block's path and
/// the rest (`query.weight`).
fn attention_block(name: &str) -> Option<(&str, &str)> {
    let coder = ["encoder.", "decoder."]
        .into_iter()
        .find(|p| name.starts_with(p))?;
    let rest = name[coder.len()..].strip_prefix("mid_block.attentions.")?;
    let (index, tail) = rest.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let block_len = name.len() - tail.len() - 1;
    Some((&name[..block_len], tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renamed(name: &str, transform: Transform) -> Adapted {
        Adapted::Renamed {
            name: name.into(),
            transform,
        }
    }

    #[test]
    fn old_vae_attention_names_map_to_todays() {
        let a = |n: &str, s: &[usize]| adapt(Component::Vae, n, s);
        let block = "decoder.mid_block.attentions.0";
        for (old, new) in [
            ("query", "to_q"),
            ("key", "to_k"),
            ("value", "to_v"),
            ("proj_attn", "to_out.0"),
        ] {
            assert_eq!(
                a(&format!("{block}.{old}.weight"), &[512, 512]),
                renamed(&format!("{block}.{new}.weight"), Transform::Copy)
            );
            assert_eq!(
                a(&format!("{block}.{old}.bias"), &[512]),
                renamed(&format!("{block}.{new}.bias"), Transform::Copy)
            );
            assert_eq!(
                a(
                    &format!("encoder.mid_block.attentions.0.{old}.weight"),
                    &[8, 8, 1, 1]
                ),
                renamed(
                    &format!("encoder.mid_block.attentions.0.{new}.weight"),
                    Transform::Squeeze
                )
            );
        }
        // Today's names: kept, or squeezed when stored as kernels.
        assert_eq!(
            a(&format!("{block}.to_k.weight"), &[4, 4]),
            Adapted::Current
        );
        assert_eq!(a(&format!("{block}.to_out.0.bias"), &[4]), Adapted::Current);
        assert_eq!(
            a(&format!("{block}.to_out.0.weight"), &[4, 4, 1, 1]),
            renamed(&format!("{block}.to_out.0.weight"), Transform::Squeeze)
        );
        // Everything else is left to the strict check.
        for name in [
            format!("{block}.group_norm.weight"),
            format!("{block}.query.scale"),
            "decoder.up_blocks.0.attentions.0.query.weight".into(),
            "decoder.mid_block.attentions.x.query.weight".into(),
            "decoder.conv_in.weight".into(),
        ] {
            assert_eq!(a(&name, &[4, 4]), Adapted::Current, "{name}");
        }
        assert_eq!(
            a(&format!("{block}.to_q.weight"), &[4, 4, 3, 3]),
            Adapted::Current
        );
    }

    #[test]
    fn only_the_known_buffer_is_skipped() {
        for component in [Component::TextEncoder, Component::TextEncoder2] {
            assert_eq!(
                adapt(component, "text_model.embeddings.position_ids", &[1, 77]),
                Adapted::Buffer
            );
        }
        for (component, name) in [
            (Component::TextEncoder, "text_model.embeddings.token_ids"),
            (
                Component::TextEncoder,
                "text_model.encoder.layers.0.position_ids",
            ),
            (Component::Unet, "text_model.embeddings.position_ids"),
            (Component::Unet, "mid_block.attentions.0.query.weight"),
        ] {
            assert_eq!(adapt(component, name, &[1, 77]), Adapted::Current, "{name}");
        }
    }
}
