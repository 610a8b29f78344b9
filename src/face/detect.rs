//! Finding faces: BlazeFace's input made as MediaPipe makes it, the network, and its outputs
//! decoded as MediaPipe decodes them.

use burn::tensor::{Device, Tensor, TensorData};

use super::blazeface::{ANCHORS, BlazeFace, COORDS, INPUT};
use super::{Face, FaceError};
use crate::rgb::RgbImage;

/// Scores below this are not faces (MediaPipe's `min_detection_confidence` default).
pub const MIN_SCORE: f32 = 0.5;
/// Boxes overlapping a better one by more than this (intersection over union) are merged into
/// it (MediaPipe's `min_suppression_threshold`).
const MERGE_IOU: f64 = 0.3;

/// The face detector on a device.
pub struct FaceDetector {
    net: BlazeFace,
    device: Device,
}

impl FaceDetector {
    /// The detector from its weights file (`www/models/face_detection_short_range.safetensors`).
    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self, FaceError> {
        Ok(Self {
            net: BlazeFace::from_safetensors(bytes, device)?,
            device: device.clone(),
        })
    }

    /// The faces in a photo, the most confident first.
    pub async fn detect(&self, image: &RgbImage) -> Result<Vec<Face>, FaceError> {
        let (input, letterbox) = letterbox(image);
        let x: Vec<f32> = input.iter().map(|&v| f32::from(v) / 127.5 - 1.0).collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [1, INPUT, INPUT, 3]), &self.device)
            .permute([0, 3, 1, 2]);
        let (regressors, scores) = self.net.forward(x);
        // One readback: the regressors, then the scores.
        let out = crate::nn::read_f32(Tensor::cat(
            vec![
                regressors.reshape([ANCHORS * COORDS]),
                scores.reshape([ANCHORS]),
            ],
            0,
        ))
        .await
        .map_err(FaceError::Read)?;
        let (regressors, scores) = out.split_at(ANCHORS * COORDS);
        Ok(decode(
            regressors,
            scores,
            letterbox,
            image.width,
            image.height,
        ))
    }
}

/// Where the photo lies in the detector's square input: the padding on the left and on the top,
/// as fractions of the square's side (the same on the other side).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Letterbox {
    /// Padding left and right.
    pub x: f64,
    /// Padding above and below.
    pub y: f64,
}

/// The photo as the detector sees it, as MediaPipe makes it: padded to a square about its
/// centre and sampled to 128 x 128 RGB bytes (`[y][x][rgb]`) the way OpenCV's bilinear
/// `warpPerspective` samples 8-bit images (source positions in 32ths of a pixel, weights in
/// fixed point, black outside the photo).
pub fn letterbox(image: &RgbImage) -> (Vec<u8>, Letterbox) {
    let (w, h) = (image.width as i64, image.height as i64);
    let side = w.max(h) as f64;
    let scale = side / INPUT as f64;
    let (x0, y0) = ((w as f64 - side) / 2.0, (h as f64 - side) / 2.0);
    // In 32ths of a pixel, rounded as OpenCV's cvRound does (half to even).
    let at = |origin: f64, i: usize| ((origin + i as f64 * scale) * 32.0).round_ties_even() as i64;
    let pixel = |x: i64, y: i64, c: usize| i64::from(image.at_or_black(x, y, c));
    let mut out = vec![0u8; INPUT * INPUT * 3];
    for v in 0..INPUT {
        let sy = at(y0, v);
        let (iy, fy) = (sy >> 5, sy & 31);
        for u in 0..INPUT {
            let sx = at(x0, u);
            let (ix, fx) = (sx >> 5, sx & 31);
            // Bilinear weights summing to 2^15.
            let weights = [
                (32 - fx) * (32 - fy) * 32,
                fx * (32 - fy) * 32,
                (32 - fx) * fy * 32,
                fx * fy * 32,
            ];
            for c in 0..3 {
                let sum = weights[0] * pixel(ix, iy, c)
                    + weights[1] * pixel(ix + 1, iy, c)
                    + weights[2] * pixel(ix, iy + 1, c)
                    + weights[3] * pixel(ix + 1, iy + 1, c);
                out[(v * INPUT + u) * 3 + c] = ((sum + (1 << 14)) >> 15).clamp(0, 255) as u8;
            }
        }
    }
    let pad = |size: i64| (side - size as f64) / 2.0 / side;
    (
        out,
        Letterbox {
            x: pad(w),
            y: pad(h),
        },
    )
}

/// The anchors' centres in the input square, in [0, 1]: 2 per cell of the 16 x 16 grid, then
/// 6 per cell of the 8 x 8 grid (MediaPipe's SSD anchors for this model, all of size 1).
fn anchors() -> Vec<[f64; 2]> {
    let mut out = Vec::with_capacity(ANCHORS);
    for (cells, per_cell) in [(16, 2), (8, 6)] {
        for y in 0..cells {
            for x in 0..cells {
                let centre = [
                    (x as f64 + 0.5) / cells as f64,
                    (y as f64 + 0.5) / cells as f64,
                ];
                out.extend(std::iter::repeat_n(centre, per_cell));
            }
        }
    }
    out
}

/// The network's raw outputs (`[896, 16]` regressors, `[896]` logits) to faces in the photo's
/// pixels: MediaPipe's TensorsToDetections (sigmoid scores, offsets in input pixels from the
/// anchors), weighted non-maximum suppression (overlapping boxes averaged by score, keeping
/// the best one's score) and letterbox removal.
pub fn decode(
    regressors: &[f32],
    logits: &[f32],
    letterbox: Letterbox,
    width: usize,
    height: usize,
) -> Vec<Face> {
    struct Candidate {
        score: f64,
        bbox: [f64; 4],
        keypoints: [[f64; 2]; 6],
    }
    let side = INPUT as f64;
    let mut candidates: Vec<Candidate> = anchors()
        .iter()
        .zip(regressors.chunks_exact(COORDS).zip(logits))
        .filter_map(|(a, (r, &logit))| {
            let score = 1.0 / (1.0 + (-f64::from(logit).clamp(-100.0, 100.0)).exp());
            if score < f64::from(MIN_SCORE) {
                return None;
            }
            let r: Vec<f64> = r.iter().map(|&v| f64::from(v) / side).collect();
            let (cx, cy, w, h) = (r[0] + a[0], r[1] + a[1], r[2], r[3]);
            let mut keypoints = [[0.0; 2]; 6];
            for (k, p) in keypoints.iter_mut().enumerate() {
                *p = [r[4 + 2 * k] + a[0], r[5 + 2 * k] + a[1]];
            }
            Some(Candidate {
                score,
                bbox: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
                keypoints,
            })
        })
        .collect();
    // Stable: equal scores keep the anchors' order, as MediaPipe's sort does.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let (sx, sy) = (1.0 - 2.0 * letterbox.x, 1.0 - 2.0 * letterbox.y);
    let to_photo = |[x, y]: [f64; 2]| {
        [
            ((x - letterbox.x) / sx * width as f64) as f32,
            ((y - letterbox.y) / sy * height as f64) as f32,
        ]
    };
    let mut faces = Vec::new();
    while !candidates.is_empty() {
        // The best candidate and those overlapping it (itself always, even if degenerate).
        let mut rest = candidates.split_off(1);
        let best = candidates[0].bbox;
        let mut merged = candidates;
        (candidates, rest) = rest
            .drain(..)
            .partition(|c| iou(&best, &c.bbox) <= MERGE_IOU);
        merged.extend(rest);
        let total: f64 = merged.iter().map(|c| c.score).sum();
        let mut bbox = [0.0; 4];
        let mut keypoints = [[0.0; 2]; 6];
        for c in &merged {
            let w = c.score / total;
            for (b, v) in bbox.iter_mut().zip(c.bbox) {
                *b += v * w;
            }
            for (k, p) in keypoints.iter_mut().zip(c.keypoints) {
                k[0] += p[0] * w;
                k[1] += p[1] * w;
            }
        }
        let [x0, y0] = to_photo([bbox[0], bbox[1]]);
        let [x1, y1] = to_photo([bbox[2], bbox[3]]);
        faces.push(Face {
            score: merged[0].score as f32,
            bbox: [x0, y0, x1, y1],
            keypoints: keypoints.map(to_photo),
        });
    }
    faces
}

/// Intersection over union of two `[x_min, y_min, x_max, y_max]` boxes (0 for empty ones).
fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}
