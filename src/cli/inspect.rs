//! `sefi inspect`: what a model file or folder is, without loading its weights.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use super::shared;
use crate::sd;
use crate::weights::legacy::Adaptation;
use crate::weights::open::Variant;
use crate::weights::{Component, Family, Format, TokenizerSource};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A diffusers model folder, or a single-file `.safetensors` checkpoint.
    pub path: PathBuf,
    /// For single files: a diffusers folder whose config.json files give the model sizes
    /// (default: the family's standard sizes).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Inspect the `.fp16.safetensors` variant files of a diffusers folder.
    #[arg(long)]
    pub fp16: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Params {
    unet: u64,
    text_encoder: u64,
    vae: u64,
    /// SDXL's second text encoder; absent for SD 1.x/2.x.
    #[serde(skip_serializing_if = "Option::is_none")]
    text_encoder_2: Option<u64>,
}

#[derive(Serialize)]
struct Report<'a> {
    path: &'a str,
    family: Family,
    format: Format,
    dtype: String,
    params: Params,
    prediction: crate::config::Prediction,
    tokenizer: &'a TokenizerSource,
    /// SDXL's second tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    tokenizer_2: Option<&'a TokenizerSource>,
    /// "ok", or why the tensors do not fit the models of the config.
    layout: String,
    /// Tensors stored under older names, and skipped buffers, of files written by older
    /// diffusers and transformers releases.
    adapted: &'a [Adaptation],
}

pub fn run(args: InspectArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let variant = if args.fp16 {
        Variant::Fp16
    } else {
        Variant::Auto
    };
    let ckpt = shared::open_checkpoint(&args.path, args.config.as_deref(), variant)?;
    let layout = sd::validate(&ckpt, &shape_device());
    let report = Report {
        path: &ckpt.path,
        family: ckpt.family,
        format: ckpt.format,
        dtype: format!("{:?}", ckpt.dtype()),
        params: Params {
            unet: ckpt.params(Component::Unet),
            text_encoder: ckpt.params(Component::TextEncoder),
            vae: ckpt.params(Component::Vae),
            text_encoder_2: ckpt
                .config
                .text_encoder_2
                .is_some()
                .then(|| ckpt.params(Component::TextEncoder2)),
        },
        prediction: ckpt.config.prediction,
        tokenizer: &ckpt.tokenizer,
        tokenizer_2: ckpt.tokenizer_2.as_ref(),
        layout: match &layout {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        },
        adapted: &ckpt.adaptations,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if layout.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A device for shape checks that never starts a GPU.
fn shape_device() -> burn::tensor::Device {
    #[cfg(feature = "cpu")]
    return burn::tensor::Device::flex();
    #[cfg(not(feature = "cpu"))]
    burn::tensor::Device::default()
}

fn print_text(r: &Report) {
    let family = match r.family {
        Family::Sd1 => "Stable Diffusion 1.x",
        Family::Sd2 => "Stable Diffusion 2.x, epsilon prediction",
        Family::Sd2V => "Stable Diffusion 2.x, v-prediction",
        Family::Sdxl => "Stable Diffusion XL",
    };
    let format = match r.format {
        Format::Diffusers => "diffusers folder",
        Format::SingleFile => "single-file checkpoint",
    };
    println!("path          {}", r.path);
    println!("family        {} ({family})", r.family);
    println!("format        {format}");
    println!("dtype         {}", r.dtype);
    println!("unet          {:>15} parameters", thousands(r.params.unet));
    println!(
        "text encoder  {:>15} parameters",
        thousands(r.params.text_encoder)
    );
    if let Some(n) = r.params.text_encoder_2 {
        println!("text encoder 2{:>15} parameters", thousands(n));
    }
    println!("vae           {:>15} parameters", thousands(r.params.vae));
    for (label, t) in [
        ("tokenizer   ", Some(r.tokenizer)),
        ("tokenizer 2 ", r.tokenizer_2),
    ] {
        match t {
            Some(TokenizerSource::Files {
                vocab, pad_token, ..
            }) => println!("{label}  {vocab} (pad {pad_token:?})"),
            Some(TokenizerSource::Texts { pad_token, .. }) => {
                println!("{label}  the model's own (pad {pad_token:?})")
            }
            Some(TokenizerSource::Bundled { pad_token }) => {
                println!("{label}  bundled CLIP vocabulary (pad {pad_token:?})")
            }
            None => {}
        }
    }
    let renamed: Vec<_> = r.adapted.iter().filter(|a| a.loaded_as.is_some()).collect();
    if let Some(first) = renamed.first() {
        println!(
            "older names   {} tensor(s) as older diffusers releases named them, loaded under today's names (e.g. {} `{}` as `{}`)",
            renamed.len(),
            first.component,
            first.stored,
            first.loaded_as.as_deref().unwrap_or_default()
        );
    }
    for a in r.adapted.iter().filter(|a| a.loaded_as.is_none()) {
        println!(
            "skipped       {} `{}`: a buffer older files carry, recomputed by the model",
            a.component, a.stored
        );
    }
    if r.layout == "ok" {
        println!("layout        ok: every tensor the models need, with the right shapes");
    } else {
        println!("layout        PROBLEM: {}", r.layout);
        if r.format == Format::SingleFile {
            println!(
                "              (for a model with non-standard sizes, pass --config with a diffusers folder that describes it)"
            );
        }
    }
}

/// 859520964 -> "859,520,964".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
