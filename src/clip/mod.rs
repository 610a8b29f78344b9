//! CLIP text side of Stable Diffusion: the tokenizer and the text encoder.

#[cfg(feature = "compute")]
pub mod text_model;
pub mod tokenizer;

#[cfg(feature = "compute")]
pub use text_model::{ClipTextModel, TextOutput, ids_tensor};
pub use tokenizer::{ClipTokenizer, Piece, TokenizerError, Tokens};
