//! Likeness scores: the faces of a generated image against the faces an identity was learned
//! from, each face matched to its most similar identity.

use super::{Descriptor, Face, FaceDetector, FaceError, FaceRecognizer, FaceScore, SAME_PERSON};
use crate::rgb::RgbImage;

/// The face models together: the detector and the recognition network.
pub struct FaceModels {
    /// Finds faces.
    pub detector: FaceDetector,
    /// Describes them.
    pub recognizer: FaceRecognizer,
}

/// Whose face a reference is, and what it looks like.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    /// The identity's name (its token), or the photo's.
    pub name: String,
    /// Descriptors of its photos' faces.
    pub faces: Vec<Descriptor>,
}

impl FaceModels {
    /// The descriptor of the subject's face in a training photo: of the most confident face
    /// whose centre lies in `crop` (`x, y, size`; the whole photo if none), or `None` where
    /// no face is found there.
    pub async fn photo_face(
        &self,
        image: &RgbImage,
        crop: Option<(u32, u32, u32)>,
    ) -> Result<Option<Descriptor>, FaceError> {
        let faces = self.detector.detect(image).await?;
        let inside = |f: &&Face| {
            crop.is_none_or(|(x, y, s)| {
                let cx = (f.bbox[0] + f.bbox[2]) / 2.0;
                let cy = (f.bbox[1] + f.bbox[3]) / 2.0;
                (x as f32..(x + s) as f32).contains(&cx) && (y as f32..(y + s) as f32).contains(&cy)
            })
        };
        let Some(face) = faces.iter().find(inside) else {
            return Ok(None);
        };
        let mut d = self
            .recognizer
            .describe(image, std::slice::from_ref(face))
            .await?;
        Ok(d.pop())
    }

    /// Every face in an image, the most confident first, with its most similar reference.
    pub async fn score(
        &self,
        image: &RgbImage,
        references: &[Reference],
    ) -> Result<Vec<FaceScore>, FaceError> {
        let faces = self.detector.detect(image).await?;
        let descriptors = self.recognizer.describe(image, &faces).await?;
        Ok(faces
            .into_iter()
            .zip(descriptors)
            .map(|(face, d)| {
                let d = &d;
                let best = references
                    .iter()
                    .flat_map(|r| r.faces.iter().map(move |f| (r, d.similarity(f))))
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                let similarity = best.map_or(0.0, |b| b.1);
                FaceScore {
                    face,
                    identity: best.map(|b| b.0.name.clone()),
                    similarity,
                    same_person: best.is_some() && similarity >= SAME_PERSON,
                }
            })
            .collect())
    }
}

/// Each scored face's identity and similarity, for the PNG's parameters
/// ([`crate::pipeline::png::with_likeness`]).
pub fn likeness(scores: &[FaceScore]) -> Vec<(String, f32)> {
    scores
        .iter()
        .filter_map(|s| s.identity.clone().map(|name| (name, s.similarity)))
        .collect()
}
