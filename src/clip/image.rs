//! What CLIP sees of a picture (transformers' `CLIPImageProcessor`): the shorter side resized
//! to the model's size (bicubic), a centred square cut out, the pixels normalised.

use image::{RgbImage as Buffer, imageops, imageops::FilterType};

use crate::config::ConfigError;
use crate::rgb::RgbImage;

/// A `CLIPImageProcessor`'s settings, from `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    /// The shorter side after resizing, in pixels (224).
    pub shortest_edge: usize,
    /// Height and width of the centred crop (224, 224).
    pub crop: [usize; 2],
    /// Per-channel mean subtracted after scaling to 0-1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Default for ImageProcessor {
    /// OpenAI CLIP's: 224 px, and the normalisation every published CLIP processor has.
    fn default() -> Self {
        Self {
            shortest_edge: 224,
            crop: [224, 224],
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

/// A size as either form of the config gives it: a number (the feature extractors of
/// 2021-2022) or an object (today's `{"shortest_edge": n}`, `{"height": h, "width": w}`).
fn size(v: &serde_json::Value, file: &str, key: &str) -> Result<Option<[usize; 2]>, ConfigError> {
    let bad = || ConfigError {
        file: file.into(),
        reason: format!("`{key}` is not a size: {v}"),
    };
    let n = |v: &serde_json::Value| v.as_u64().map(|n| n as usize);
    Ok(match v {
        serde_json::Value::Null => None,
        serde_json::Value::Number(_) => Some([n(v).ok_or_else(bad)?; 2]),
        serde_json::Value::Object(o) => {
            match (o.get("shortest_edge"), o.get("height"), o.get("width")) {
                (Some(e), _, _) => Some([n(e).ok_or_else(bad)?; 2]),
                (None, Some(h), Some(w)) => Some([n(h).ok_or_else(bad)?, n(w).ok_or_else(bad)?]),
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    })
}

impl ImageProcessor {
    /// From `preprocessor_config.json`; what it leaves out keeps OpenAI CLIP's value. Only the
    /// processing every CLIP model publishes is supported: resize, centre crop and normalise,
    /// bicubic.
    pub fn from_json(file: &str, text: &str) -> Result<Self, ConfigError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ConfigError {
            file: file.into(),
            reason: e.to_string(),
        })?;
        let mut p = Self::default();
        for flag in ["do_resize", "do_center_crop", "do_normalize"] {
            if v[flag] == serde_json::Value::Bool(false) {
                return Err(ConfigError {
                    file: file.into(),
                    reason: format!("`{flag}` is false; CLIP models resize, crop and normalise"),
                });
            }
        }
        if let Some(r) = v["resample"].as_u64()
            && r != 3
        {
            return Err(ConfigError {
                file: file.into(),
                reason: format!("`resample` is {r}; only bicubic (3) is supported"),
            });
        }
        if let Some([edge, _]) = size(&v["size"], file, "size")? {
            p.shortest_edge = edge;
        }
        if let Some(crop) = size(&v["crop_size"], file, "crop_size")? {
            p.crop = crop;
        }
        for (key, out) in [("image_mean", &mut p.mean), ("image_std", &mut p.std)] {
            if let Some(a) = v[key].as_array() {
                let vals: Vec<f32> = a
                    .iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| x as f32)
                    .collect();
                *out = vals.try_into().map_err(|_| ConfigError {
                    file: file.into(),
                    reason: format!("`{key}` must hold three numbers"),
                })?;
            }
        }
        if p.shortest_edge == 0 || p.crop.contains(&0) || p.std.contains(&0.0) {
            return Err(ConfigError {
                file: file.into(),
                reason: "a size or a standard deviation is zero".into(),
            });
        }
        Ok(p)
    }

    /// The picture resized (its shorter side to `shortest_edge`, the longer in proportion,
    /// rounded down, as transformers does) and cropped at the centre, 8 bits per channel.
    pub fn resized(&self, image: &RgbImage) -> RgbImage {
        let (w, h) = (image.width.max(1), image.height.max(1));
        let (short, long) = (w.min(h), w.max(h));
        let long_out = self.shortest_edge * long / short;
        let (rw, rh) = if w <= h {
            (self.shortest_edge, long_out)
        } else {
            (long_out, self.shortest_edge)
        };
        let buffer = Buffer::from_raw(image.width as u32, image.height as u32, image.data.clone())
            .expect("an RgbImage holds width * height * 3 bytes");
        // Catmull-Rom is PIL's bicubic (a = -0.5), widened when shrinking as PIL's is. PIL
        // rounds and clips to 8 bits between its two passes, this filter only at the end, so
        // a few values at sharp edges differ by several levels (see tests/clip.rs).
        let resized = imageops::resize(&buffer, rw as u32, rh as u32, FilterType::CatmullRom);
        let [ch, cw] = self.crop;
        // transformers' centre crop: the top-left corner rounded down; a crop larger than the
        // picture reads black beyond it.
        let top = (rh as i64 - ch as i64).div_euclid(2);
        let left = (rw as i64 - cw as i64).div_euclid(2);
        let resized = RgbImage {
            width: rw,
            height: rh,
            data: resized.into_raw(),
        };
        let mut data = Vec::with_capacity(cw * ch * 3);
        for y in 0..ch as i64 {
            for x in 0..cw as i64 {
                for c in 0..3 {
                    data.push(resized.at_or_black(left + x, top + y, c));
                }
            }
        }
        RgbImage {
            width: cw,
            height: ch,
            data,
        }
    }

    /// The model's input for a picture: channels first, `[3, crop height, crop width]`, each
    /// value `(v / 255 - mean) / std`.
    pub fn pixel_values(&self, image: &RgbImage) -> Vec<f32> {
        let r = self.resized(image);
        let plane = r.width * r.height;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in r.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}
