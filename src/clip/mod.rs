//! CLIP: the tokenizer and the text encoder Stable Diffusion conditions on, and the whole
//! `CLIPModel` (both towers) that scores how well an image follows its prompt (CLIP-T).

#[cfg(feature = "compute")]
mod encoder;
#[cfg(feature = "compute")]
pub mod folder;
pub mod image;
#[cfg(feature = "compute")]
pub mod model;
#[cfg(feature = "compute")]
pub mod text_model;
pub mod tokenizer;
#[cfg(feature = "compute")]
pub mod vision_model;

#[cfg(feature = "compute")]
pub use folder::{ClipConfig, ClipFolder, ClipParts};
pub use image::ImageProcessor;
#[cfg(feature = "compute")]
pub use model::{ClipModel, PromptFidelity};
#[cfg(feature = "compute")]
pub use text_model::{ClipTextModel, TextOutput, end_positions, ids_tensor};
pub use tokenizer::{ClipTokenizer, Piece, TokenizerError, Tokens, plain_prompt};
#[cfg(feature = "compute")]
pub use vision_model::{ClipVisionModel, VisionConfig, VisionOutput};
