//! PNG files with the generation parameters embedded as a `parameters` text chunk, in the
//! layout the popular Stable Diffusion web UIs write and read back: the prompt, then
//! `Negative prompt: ...`, then a last line of `Key: value` settings separated by commas
//! (values holding a comma, a colon or a quote are JSON strings).

use super::{GenerateRequest, RgbImage};
use crate::schedule::Sampler;

/// The `parameters` text of one image (`seed` is that image's own seed).
pub fn parameters_text(req: &GenerateRequest, seed: u64, model: &str) -> String {
    let mut s = req.prompt.clone();
    if !req.negative_prompt.is_empty() {
        s.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}",
        req.steps,
        req.sampler.webui_name(),
        req.guidance,
        req.width,
        req.height,
        quote(model),
    ));
    s
}

/// The parameters with a `Likeness` setting after the others: each scored face's identity and
/// its similarity (`<alice> 0.972; <bob> 0.918`), where faces were scored.
pub fn with_likeness(mut parameters: String, faces: &[(String, f32)]) -> String {
    if !faces.is_empty() {
        let value: Vec<String> = faces
            .iter()
            .map(|(name, s)| format!("{name} {s:.3}"))
            .collect();
        parameters.push_str(&format!(", Likeness: {}", quote(&value.join("; "))));
    }
    parameters
}

/// The parameters with a `CLIP-T` setting after the others: how well the image follows its
/// prompt (CLIP's cosine), where a CLIP model scored it.
pub fn with_clip_t(mut parameters: String, clip_t: Option<f32>) -> String {
    if let Some(c) = clip_t {
        parameters.push_str(&format!(", CLIP-T: {c:.3}"));
    }
    parameters
}

/// A settings value as written: quoted when it would end or split its entry, or lose the
/// spaces at its ends.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '"', '\n', '\r']) || value.trim() != value {
        serde_json::to_string(value).expect("a string")
    } else {
        value.into()
    }
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

/// Why a PNG's parameters cannot be read.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PngError {
    /// Not a PNG file, or one damaged before its first image data.
    #[error("{file} is not a readable PNG image ({reason})")]
    NotPng {
        /// The file's name.
        file: String,
        /// What the decoder said.
        reason: String,
    },
    /// A PNG without a `parameters` text.
    #[error(
        "{file} holds no generation parameters (images made by SeFi Studio and the popular Stable Diffusion web UIs do)"
    )]
    NoParameters {
        /// The file's name.
        file: String,
    },
    /// A `parameters` text beyond [`MAX_PARAMETERS`] bytes, compressed or not.
    #[error("{file}'s parameters text is larger than {MAX_PARAMETERS} bytes")]
    TooLarge {
        /// The file's name.
        file: String,
    },
}

/// The largest `parameters` text read (long prompts are a few kilobytes).
pub const MAX_PARAMETERS: usize = 64 * 1024;
/// What the PNG decoder may allocate while reading up to the first image data.
const READ_LIMIT: usize = 4 * MAX_PARAMETERS;

/// The `parameters` text of a PNG: from a `tEXt`, `zTXt` or `iTXt` chunk before the image
/// data, where the web UIs and [`encode`] put it. Allocates at most a few hundred kilobytes,
/// whatever the file claims.
pub fn read_parameters(file: &str, bytes: &[u8]) -> Result<String, PngError> {
    let not_png = |e: ::png::DecodingError| PngError::NotPng {
        file: file.into(),
        reason: e.to_string(),
    };
    let too_large = || PngError::TooLarge { file: file.into() };
    let limits = ::png::Limits { bytes: READ_LIMIT };
    let reader = ::png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits)
        .read_info()
        .map_err(|e| match e {
            ::png::DecodingError::LimitsExceeded => too_large(),
            e => not_png(e),
        })?;
    let info = reader.info();
    let text = if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        t.text.clone()
    } else if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        let mut t = t.clone();
        t.decompress_text_with_limit(MAX_PARAMETERS)
            .map_err(|_| too_large())?;
        t.get_text().map_err(not_png)?
    } else if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        let mut t = t.clone();
        t.decompress_text_with_limit(MAX_PARAMETERS)
            .map_err(|_| too_large())?;
        t.get_text().map_err(not_png)?
    } else {
        return Err(PngError::NoParameters { file: file.into() });
    };
    if text.len() > MAX_PARAMETERS {
        return Err(too_large());
    }
    Ok(text)
}

/// A `parameters` text, split into its parts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parameters {
    /// The prompt (every line before the negative prompt and the settings).
    pub prompt: String,
    /// The negative prompt, empty when there is none.
    pub negative_prompt: String,
    /// The settings line's entries, in order, values unquoted.
    pub settings: Vec<(String, String)>,
}

impl Parameters {
    /// Splits a `parameters` text. Any text reads: what is not a settings line is prompt.
    pub fn parse(text: &str) -> Self {
        // Split at '\n' alone: `lines()` would also drop a '\r' the prompt holds.
        let mut lines: Vec<&str> = text.split('\n').collect();
        let mut settings = Vec::new();
        // The last line is the settings line when it reads whole as at least two entries.
        if let Some(entries) = lines.last().and_then(|l| settings_line(l))
            && entries.len() >= 2
        {
            settings = entries;
            lines.pop();
        }
        let (mut prompt, mut negative) = (Vec::new(), Vec::new());
        for line in lines {
            if let Some(rest) = line.strip_prefix("Negative prompt:") {
                negative.push(rest.trim_start());
            } else if negative.is_empty() {
                prompt.push(line);
            } else {
                negative.push(line);
            }
        }
        Self {
            prompt: prompt.join("\n").trim().into(),
            negative_prompt: negative.join("\n").trim().into(),
            settings,
        }
    }

    /// A setting's value by its key (`"Steps"`, `"Seed"`, ...).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Puts what these parameters say into a request: the prompts, steps, sampler, guidance,
    /// seed and size. Returns what could not be used, one sentence each (the request keeps its
    /// own value there).
    pub fn apply(&self, req: &mut GenerateRequest) -> Vec<String> {
        let mut unused = Vec::new();
        req.prompt = self.prompt.clone();
        req.negative_prompt = self.negative_prompt.clone();
        let mut read = |key: &str, ok: &dyn Fn(&str) -> bool| -> Option<&str> {
            let v = self.get(key)?;
            if !ok(v) {
                unused.push(format!("{key} \"{v}\" is not usable here."));
            }
            ok(v).then_some(v)
        };
        if let Some(v) = read("Steps", &|v| {
            v.parse().is_ok_and(|n: usize| (1..=1000).contains(&n))
        }) {
            req.steps = v.parse().expect("checked");
        }
        if let Some(v) = read("CFG scale", &|v| {
            v.parse().is_ok_and(|x: f64| (0.0..=100.0).contains(&x))
        }) {
            req.guidance = v.parse().expect("checked");
        }
        if let Some(v) = read("Seed", &|v| v.parse::<u64>().is_ok()) {
            req.seed = v.parse().expect("checked");
        }
        if let Some(size) = self.get("Size") {
            match size.split_once('x').and_then(|(w, h)| {
                let (w, h) = (
                    w.trim().parse::<usize>().ok()?,
                    h.trim().parse::<usize>().ok()?,
                );
                (w > 0 && h > 0 && w % 8 == 0 && h % 8 == 0 && w <= 4096 && h <= 4096)
                    .then_some((w, h))
            }) {
                Some((w, h)) => (req.width, req.height) = (w, h),
                None => unused.push(format!("Size \"{size}\" is not usable here.")),
            }
        }
        if let Some(name) = self.get("Sampler") {
            let karras = self.get("Schedule type") == Some("Karras");
            let name = match name {
                "DPM++ 2M" if karras => "DPM++ 2M Karras",
                n => n,
            };
            match Sampler::ALL.into_iter().find(|s| s.webui_name() == name) {
                Some(s) => req.sampler = s,
                None => unused.push(format!(
                    "The sampler \"{name}\" is not offered; {} is kept.",
                    req.sampler.webui_name()
                )),
            }
        }
        unused
    }
}

/// The entries of a settings line, `None` unless the whole line reads as entries.
fn settings_line(line: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once(':')?;
        let key = key.trim();
        let key_ok = key.chars().next().is_some_and(char::is_alphanumeric)
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '/'));
        if !key_ok {
            return None;
        }
        let after = after.trim_start();
        let (value, next) = if after.starts_with('"') {
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<String>();
            let value = de.next()?.ok()?;
            (value, &after[de.byte_offset()..])
        } else {
            match after.find(',') {
                Some(i) => (after[..i].trim_end().to_string(), &after[i..]),
                None => (after.trim_end().to_string(), ""),
            }
        };
        out.push((key.to_string(), value));
        let next = next.trim_start();
        rest = match next.strip_prefix(',') {
            Some(r) => r.trim_start(),
            None if next.is_empty() => "",
            None => return None,
        };
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_web_ui_settings_line_splits_into_entries() {
        let text = "a photo of <alice>, smiling\nat dusk\nNegative prompt: blurry, dark\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 512x768, Model hash: 6ce0161689, Model: \"v1-5, pruned\", Version: v1.10.1";
        let p = Parameters::parse(text);
        assert_eq!(p.prompt, "a photo of <alice>, smiling\nat dusk");
        assert_eq!(p.negative_prompt, "blurry, dark");
        assert_eq!(p.get("Model"), Some("v1-5, pruned"));
        assert_eq!(p.get("Version"), Some("v1.10.1"));
        let mut req = GenerateRequest::default();
        assert_eq!(p.apply(&mut req), Vec::<String>::new());
        assert_eq!(
            (
                req.steps,
                req.sampler,
                req.guidance,
                req.seed,
                req.width,
                req.height
            ),
            (30, Sampler::DpmPp2mKarras, 6.5, 42, 512, 768)
        );
    }

    #[test]
    fn text_without_a_settings_line_is_all_prompt() {
        let p = Parameters::parse("a cat: sitting, on a mat");
        assert_eq!(p.prompt, "a cat: sitting, on a mat");
        assert!(p.settings.is_empty());
    }

    #[test]
    fn unusable_settings_are_named_and_the_rest_applies() {
        let p = Parameters::parse("x\nSteps: 0, Sampler: LMS, Seed: 7, Size: 513x512");
        let mut req = GenerateRequest::default();
        let unused = p.apply(&mut req);
        assert_eq!(unused.len(), 3, "{unused:?}");
        assert_eq!((req.seed, req.steps, req.width), (7, 25, 512));
    }

    /// A compressed text that inflates to gigabytes is refused at its bound, not inflated.
    #[test]
    fn a_compressed_text_bomb_is_refused() {
        let huge = "a".repeat(64 << 20);
        for itxt in [false, true] {
            let mut out = Vec::new();
            let mut enc = ::png::Encoder::new(&mut out, 1, 1);
            enc.set_color(::png::ColorType::Rgb);
            if !itxt {
                enc.add_ztxt_chunk("parameters".into(), huge.clone())
                    .unwrap();
            }
            let mut w = enc.write_header().unwrap();
            if itxt {
                let mut chunk = ::png::text_metadata::ITXtChunk::new("parameters", &huge);
                chunk.compressed = true;
                chunk.compress_text().unwrap();
                w.write_text_chunk(&chunk).unwrap();
            }
            w.write_image_data(&[0, 0, 0]).unwrap();
            w.finish().unwrap();
            assert!(out.len() < 1 << 20, "{} bytes", out.len());
            assert!(
                matches!(
                    read_parameters("bomb.png", &out),
                    Err(PngError::TooLarge { .. })
                ),
                "itxt {itxt}"
            );
        }
    }
}
