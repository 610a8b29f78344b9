//! PNG files with the generation parameters embedded as a `parameters` text chunk, in the
//! layout the popular Stable Diffusion web UIs write and read back.

use super::{GenerateRequest, RgbImage};

/// The `parameters` text of one image (`seed` is that image's own seed).
pub fn parameters_text(req: &GenerateRequest, seed: u64, model: &str) -> String {
    let mut s = req.prompt.clone();
    if !req.negative_prompt.is_empty() {
        s.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {model}",
        req.steps,
        req.sampler.webui_name(),
        req.guidance,
        req.width,
        req.height
    ));
    s
}

/// Encodes an image as PNG with a `parameters` text chunk.
pub fn encode(image: &RgbImage, parameters: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut enc = ::png::Encoder::new(&mut out, image.width as u32, image.height as u32);
    enc.set_color(::png::ColorType::Rgb);
    enc.set_depth(::png::BitDepth::Eight);
    // tEXt is Latin-1 only; iTXt carries any prompt text in UTF-8.
    if parameters.is_ascii() {
        enc.add_text_chunk("parameters".into(), parameters.into())
            .map_err(|e| e.to_string())?;
    } else {
        enc.add_itxt_chunk("parameters".into(), parameters.into())
            .map_err(|e| e.to_string())?;
    }
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&image.data)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}
