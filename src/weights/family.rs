//! What a checkpoint is: its model family, and the models (components) it is made of.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Model family, as users and identity files name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L/14 text encoder, epsilon prediction.
    #[serde(rename = "sd1")]
    Sd1,
    /// SD 2.x with epsilon prediction (2.0-base, 2.1-base).
    #[serde(rename = "sd2")]
    Sd2,
    /// SD 2.x with v-prediction (2.0-v, 2.1 at 768 px).
    #[serde(rename = "sd2-v")]
    Sd2V,
    /// SDXL base: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, added text/time
    /// conditioning, epsilon prediction.
    #[serde(rename = "sdxl")]
    Sdxl,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sd2V => "sd2-v",
            Family::Sdxl => "sdxl",
        })
    }
}

impl Family {
    /// The classifier-free guidance scale the family's pipelines default to in diffusers:
    /// 5.0 for SDXL, 7.5 for the others.
    pub fn default_guidance(self) -> f64 {
        match self {
            Family::Sdxl => 5.0,
            _ => 7.5,
        }
    }

    /// Same text encoder, so identities transfer (sd2 and sd2-v share OpenCLIP ViT-H).
    pub fn base(self) -> Family {
        match self {
            Family::Sd2V => Family::Sd2,
            f => f,
        }
    }
}

/// One of the models of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The denoising UNet (`unet/`, `model.diffusion_model.*` in a single file).
    Unet,
    /// The CLIP text encoder (`text_encoder/`, `cond_stage_model.*` or SDXL's
    /// `conditioner.embedders.0.*` in a single file).
    TextEncoder,
    /// The autoencoder between images and latents (`vae/`, `first_stage_model.*` in a single
    /// file).
    Vae,
    /// SDXL's second text encoder, OpenCLIP bigG with its projection (`text_encoder_2/`,
    /// `conditioner.embedders.1.model.*` in a single file). SD 1.x/2.x have none.
    TextEncoder2,
    /// A CLIP model with both towers (`openai/clip-vit-large-patch14`), which scores how well
    /// images follow their prompts; a folder of its own, never part of a checkpoint.
    Clip,
}

impl Component {
    /// The models, in the order their files are opened.
    pub const ALL: [Component; 4] = [
        Component::Unet,
        Component::TextEncoder,
        Component::Vae,
        Component::TextEncoder2,
    ];

    /// The diffusers folder, and the prefix of mapped single-file names.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::Vae => "vae",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Clip => "",
        }
    }

    /// The path of `file` inside its folder (the CLIP model's files are at its folder's top).
    pub fn path(self, file: &str) -> String {
        match self.folder() {
            "" => file.to_string(),
            folder => format!("{folder}/{file}"),
        }
    }

    /// Whether it is a transformers model (weights `model.safetensors`, configs of
    /// transformers) rather than a diffusers one.
    pub fn is_text_encoder(self) -> bool {
        matches!(self, Component::TextEncoder | Component::TextEncoder2)
    }

    /// The file name of the weights in its diffusers folder, without `.safetensors` (and
    /// without the `.fp16` of the half-precision variant).
    pub fn weights_stem(self) -> &'static str {
        if self.is_text_encoder() || self == Component::Clip {
            "model"
        } else {
            "diffusion_pytorch_model"
        }
    }

    /// The PyTorch pickle files the same weights are published as (transformers and diffusers
    /// wrote these before safetensors; many folders still hold them beside the safetensors
    /// files). Never opened: only named when they are all a folder has.
    pub fn pickle_files(self) -> [String; 2] {
        let stem = if self.is_text_encoder() || self == Component::Clip {
            "pytorch_model"
        } else {
            "diffusion_pytorch_model"
        };
        [
            self.path(&format!("{stem}.bin")),
            self.path(&format!("{stem}.fp16.bin")),
        ]
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::Vae => "VAE",
            Component::TextEncoder2 => "second text encoder",
            Component::Clip => "CLIP model",
        })
    }
}
