//! Describing faces: the face chip cut around the eyes as dlib cuts it, and the recognition
//! network's descriptors of chips.

use burn::tensor::{Device, Tensor, TensorData};

use super::recognition::{CHIP, DESCRIPTOR, FaceRecognitionNet};
use super::{Descriptor, Face, FaceError};
use crate::rgb::RgbImage;

/// dlib's five-point face chip template (`get_face_chip_details`): the subject's left eye's
/// outer and inner corners, the right eye's, and the base of the nose, on the unit square.
const DLIB_TEMPLATE: [[f64; 2]; 5] = [
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
];
/// The margin around the template, as a fraction of it (dlib's face recognition example's).
const CHIP_PADDING: f64 = 0.25;

/// Where the eye centres (the mean of each eye's corners) sit on the chip, in pixels: the
/// subject's right eye, then the left.
fn chip_eyes() -> [[f64; 2]; 2] {
    let place = |x: f64| (x + CHIP_PADDING) / (1.0 + 2.0 * CHIP_PADDING) * CHIP as f64;
    let t = DLIB_TEMPLATE;
    let mid = |a: [f64; 2], b: [f64; 2]| [place((a[0] + b[0]) / 2.0), place((a[1] + b[1]) / 2.0)];
    [mid(t[2], t[3]), mid(t[0], t[1])]
}

/// The 150 x 150 face chip the recognition network takes (RGB bytes, `[y][x][rgb]`): the photo
/// under the similarity transform that puts the face's eye centres on the template's (level,
/// at dlib's scale), sampled bilinearly, black outside the photo. Pixel centres lie at +0.5.
pub fn chip(image: &RgbImage, face: &Face) -> Vec<u8> {
    let [[qrx, qry], [qlx, qly]] = chip_eyes();
    let [[prx, pry], [plx, ply]] = [face.keypoints[0], face.keypoints[1]].map(|p| p.map(f64::from));
    let (qex, qey, pex, pey) = (qlx - qrx, qly - qry, plx - prx, ply - pry);
    // The transform as one complex number a + bi: rotation and scale.
    let norm = qex * qex + qey * qey;
    let a = (pex * qex + pey * qey) / norm;
    let b = (pey * qex - pex * qey) / norm;
    let (qcx, qcy) = ((qlx + qrx) / 2.0, (qly + qry) / 2.0);
    let (pcx, pcy) = ((plx + prx) / 2.0, (ply + pry) / 2.0);
    let pixel = |x: i64, y: i64, c: usize| f64::from(image.at_or_black(x, y, c));
    let mut out = vec![0u8; CHIP * CHIP * 3];
    for v in 0..CHIP {
        for u in 0..CHIP {
            let (dx, dy) = (u as f64 + 0.5 - qcx, v as f64 + 0.5 - qcy);
            let x = a * dx - b * dy + pcx - 0.5;
            let y = b * dx + a * dy + pcy - 0.5;
            let (x0, y0) = (x.floor(), y.floor());
            let (fx, fy) = (x - x0, y - y0);
            let (ix, iy) = (x0 as i64, y0 as i64);
            for c in 0..3 {
                let value = pixel(ix, iy, c) * ((1.0 - fx) * (1.0 - fy))
                    + pixel(ix + 1, iy, c) * (fx * (1.0 - fy))
                    + pixel(ix, iy + 1, c) * ((1.0 - fx) * fy)
                    + pixel(ix + 1, iy + 1, c) * (fx * fy);
                out[(v * CHIP + u) * 3 + c] = (value + 0.5).floor().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// The face recognition network on a device.
pub struct FaceRecognizer {
    net: FaceRecognitionNet,
    device: Device,
}

impl FaceRecognizer {
    /// The network from face-api's files (`www/models/face_recognition_model*`).
    pub fn from_tfjs(manifest: &str, weights: &[u8], device: &Device) -> Result<Self, FaceError> {
        Ok(Self {
            net: FaceRecognitionNet::from_tfjs(manifest, weights, device)?,
            device: device.clone(),
        })
    }

    /// The descriptors of face chips (see [`chip`]), with one readback for all.
    pub async fn describe_chips(&self, chips: &[Vec<u8>]) -> Result<Vec<Descriptor>, FaceError> {
        if chips.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<f32> = chips.iter().flatten().map(|&v| f32::from(v)).collect();
        let x = Tensor::<4>::from_data(
            TensorData::new(values, [chips.len(), CHIP, CHIP, 3]),
            &self.device,
        );
        let raw = crate::nn::read_f32(self.net.forward(x))
            .await
            .map_err(FaceError::Read)?;
        Ok(raw
            .chunks_exact(DESCRIPTOR)
            .map(|d| {
                let norm = d
                    .iter()
                    .map(|v| v * v)
                    .sum::<f32>()
                    .sqrt()
                    .max(f32::MIN_POSITIVE);
                Descriptor(d.iter().map(|v| v / norm).collect())
            })
            .collect())
    }

    /// The descriptors of faces found in a photo.
    pub async fn describe(
        &self,
        image: &RgbImage,
        faces: &[Face],
    ) -> Result<Vec<Descriptor>, FaceError> {
        let chips: Vec<Vec<u8>> = faces.iter().map(|f| chip(image, f)).collect();
        self.describe_chips(&chips).await
    }
}
