//! Prompts with identities: token ids in CLIP windows, and where each `<name>` puts its
//! identity's vectors. Training and generation both start here.

#[cfg(feature = "compute")]
use crate::clip::Piece;
#[cfg(feature = "compute")]
use crate::sd::StableDiffusion;

#[cfg(feature = "compute")]
use super::Identity;

/// Tokens a CLIP window holds between its start and end tokens.
pub const CHUNK: usize = 75;

/// A prompt names an identity that is not loaded.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("the prompt refers to <{name}>, but no identity of that name is loaded (loaded: {loaded})")]
pub struct UnknownPlaceholder {
    /// The name written between `<` and `>` in the prompt.
    pub name: String,
    /// The loaded identities, as `<a>, <b>`.
    pub loaded: String,
}

/// Where an identity's vectors go: a window, a position in it, and which identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Index of the window in [`PromptTokens::windows`].
    pub window: usize,
    /// Position in that window's ids: 1 to [`CHUNK`] (0 holds the start token).
    pub position: usize,
    /// Index of the identity in the slice given to `tokenize_prompt`.
    pub identity: usize,
}

/// A prompt's token ids in windows, and the identity slots among them.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTokens {
    /// Windows of `CHUNK + 2` (77) ids: start token, up to [`CHUNK`] tokens, end token,
    /// padding. Placeholder positions hold the identity's class word id.
    pub windows: Vec<Vec<u32>>,
    /// One slot per `<name>` in the prompt, in prompt order.
    pub slots: Vec<Slot>,
}

/// Token ids of a prompt in windows of [`CHUNK`] tokens, each with start and end tokens and
/// padding: one window for prompts that fit, as diffusers; more for longer prompts, encoded
/// separately and concatenated, as the popular web UIs do (diffusers would cut them). Each
/// `<name>` takes one position, for the vectors of the identity of that name.
#[cfg(feature = "compute")]
pub fn tokenize_prompt(
    sd: &StableDiffusion,
    text: &str,
    identities: &[Identity],
) -> Result<PromptTokens, UnknownPlaceholder> {
    let tok = &sd.tokenizer;
    let mut ids = Vec::new();
    let mut marks = Vec::new();
    for piece in tok.encode(text) {
        match piece {
            Piece::Id(id) => ids.push(id),
            Piece::Placeholder(name) => {
                let Some(j) = identities.iter().position(|i| i.token == name) else {
                    return Err(UnknownPlaceholder {
                        name,
                        loaded: identities
                            .iter()
                            .map(|i| format!("<{}>", i.token))
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                };
                // The class word's id holds the place (never the end token: CLIP pools there).
                marks.push((ids.len(), j));
                ids.push(tok.single_token(&identities[j].class_word).unwrap_or(0));
            }
        }
    }
    let window = |chunk: &[u32]| {
        let mut w = Vec::with_capacity(CHUNK + 2);
        w.push(tok.start_id());
        w.extend_from_slice(chunk);
        w.push(tok.end_id());
        w.resize(CHUNK + 2, tok.pad_id());
        w
    };
    let windows = if ids.is_empty() {
        vec![window(&[])]
    } else {
        ids.chunks(CHUNK).map(window).collect()
    };
    let slots = marks
        .into_iter()
        .map(|(i, identity)| Slot {
            window: i / CHUNK,
            position: 1 + i % CHUNK,
            identity,
        })
        .collect();
    Ok(PromptTokens { windows, slots })
}
