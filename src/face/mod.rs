//! Faces on the device: found by MediaPipe's BlazeFace short-range detector (with MediaPipe's
//! own letterboxing, anchor decoding and weighted non-maximum suppression, so that a photo gives
//! the boxes MediaPipe gives), aligned to dlib's face chip by the eyes, and described by
//! face-api's face recognition network (dlib's), whose descriptors of one person lie close
//! together. `tests/face.rs` checks each against its original runtime on real photos. The
//! weights ship with the site (`www/models/`: 209 kB and 6.4 MB). What the page shows of them
//! (faces, scores, the crop suggested around a face) needs no compute backend.

#[cfg(feature = "compute")]
pub mod blazeface;
#[cfg(feature = "compute")]
mod describe;
#[cfg(feature = "compute")]
mod detect;
#[cfg(feature = "compute")]
pub mod recognition;
#[cfg(feature = "compute")]
pub mod score;

#[cfg(feature = "compute")]
pub use describe::{FaceRecognizer, chip};
#[cfg(feature = "compute")]
pub use detect::{FaceDetector, Letterbox, MIN_SCORE, decode, letterbox};

use serde::{Deserialize, Serialize};

/// A face in a photo, in the photo's pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Face {
    /// The detector's confidence (0.5 to 1).
    pub score: f32,
    /// `[x_min, y_min, x_max, y_max]`.
    pub bbox: [f32; 4],
    /// `[x, y]` of the right eye, left eye, nose tip, mouth centre, right ear and left ear (the
    /// person's right and left), in MediaPipe's order.
    pub keypoints: [[f32; 2]; 6],
}

/// Why faces could not be looked for.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FaceError {
    /// The detector's weights file is damaged or is not the detector's.
    #[error("the face detector's weights cannot be used: {0}")]
    Weights(String),
    /// Reading the detector's output back from the device failed.
    #[error("reading from the device failed: {0}")]
    Read(String),
}

/// What a face looks like to the recognition network: its descriptor scaled to length 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Descriptor(pub Vec<f32>);

/// Cosine similarity at and above which two faces are taken for the same person: dlib's
/// threshold (a distance of 0.6 between descriptors) at their usual length, about 1.44.
pub const SAME_PERSON: f32 = 0.91;

impl Descriptor {
    /// Cosine similarity, -1 to 1: 1 for the same chip.
    pub fn similarity(&self, other: &Descriptor) -> f32 {
        self.0.iter().zip(&other.0).map(|(a, b)| a * b).sum()
    }
}

/// One face in an image and how much it looks like the references.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaceScore {
    /// Where the face is.
    pub face: Face,
    /// The most similar reference (none where there were no references).
    pub identity: Option<String>,
    /// Cosine similarity to that reference's closest face, -1 to 1.
    pub similarity: f32,
    /// Whether the similarity reaches [`SAME_PERSON`].
    pub same_person: bool,
}

/// The square to train on around a face, `(x, y, size)` in the photo's pixels: about three
/// face widths, the face a little above the centre (hair and chin in, some shoulders), moved
/// and shrunk to stay inside the photo.
pub fn suggest_crop(face: &Face, width: u32, height: u32) -> (u32, u32, u32) {
    let [x0, y0, x1, y1] = face.bbox;
    let side = ((x1 - x0).max(y1 - y0) * 3.0).round().max(8.0) as u32;
    let side = side.min(width).min(height);
    let cx = (x0 + x1) / 2.0;
    let cy = (y0 + y1) / 2.0 + (y1 - y0) * 0.25;
    let place = |centre: f32, limit: u32| {
        ((centre - side as f32 / 2.0).round().max(0.0) as u32).min(limit - side)
    };
    (place(cx, width), place(cy, height), side)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(bbox: [f32; 4]) -> Face {
        Face {
            score: 0.9,
            bbox,
            keypoints: [[0.0; 2]; 6],
        }
    }

    #[test]
    fn the_suggested_square_holds_the_face_and_stays_in_the_photo() {
        // A 40 px face in the middle of a large photo: 120 px, the face a little above centre.
        assert_eq!(
            suggest_crop(&face([480.0, 380.0, 520.0, 420.0]), 1000, 800),
            (440, 350, 120)
        );
        // Near the top-left corner: moved inside.
        assert_eq!(
            suggest_crop(&face([0.0, 0.0, 40.0, 40.0]), 1000, 800),
            (0, 0, 120)
        );
        // Near the bottom-right corner of a small photo: shrunk to it and moved inside.
        assert_eq!(
            suggest_crop(&face([60.0, 40.0, 100.0, 80.0]), 100, 90),
            (10, 0, 90)
        );
    }
}
