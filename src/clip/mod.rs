//! CLIP text side of Stable Diffusion: the tokenizer (and, next, the text encoder).

pub mod tokenizer;

pub use tokenizer::{ClipTokenizer, Piece, TokenizerError, Tokens};
