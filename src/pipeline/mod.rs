//! Text-to-image: prompts to conditioning, classifier-free guidance, the sampling loop with
//! progress events and cancellation, and decoding to RGB images.

pub mod png;

#[cfg(feature = "compute")]
mod run;

use serde::{Deserialize, Serialize};

use crate::identity::prompt::UnknownPlaceholder;
use crate::schedule::{Sampler, ScheduleError};

#[cfg(feature = "compute")]
pub use run::*;

pub use crate::rgb::RgbImage;

/// Latents on the host, `[batch, channels, height, width]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostLatents {
    /// `[batch, channels, height, width]`, the height and width the image's divided by the
    /// VAE's latent scale (8 for every published VAE).
    pub shape: [usize; 4],
    /// The values, as many as the product of `shape`.
    pub data: Vec<f32>,
}

/// What to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The prompt; `<name>` puts a loaded identity there.
    pub prompt: String,
    /// What to steer away from (empty: the empty prompt); it cannot hold identities.
    pub negative_prompt: String,
    /// Number of sampling steps, at least 1 (the scheduler sets the maximum).
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance (and the negative prompt) off.
    pub guidance: f64,
    /// The sampling method.
    pub sampler: Sampler,
    /// Image `i` uses seed `seed + i`.
    pub seed: u64,
    /// Image width in pixels, a positive multiple of 8.
    pub width: usize,
    /// Image height in pixels, a positive multiple of 8.
    pub height: usize,
    /// Number of images generated together, at least 1.
    pub num_images: usize,
    /// Send a preview of the current latents with every n-th step event at most (0: never).
    /// Each preview is a readback, a wait for the GPU: where steps are fast, previews come
    /// about four times a second instead (see `run::preview_spacing`).
    pub preview_every: usize,
}

impl Default for GenerateRequest {
    /// The defaults users get: DPM-Solver++ 2M Karras, 25 steps, guidance 7.5, 512 px.
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 25,
            guidance: crate::weights::Family::Sd1.default_guidance(),
            sampler: Sampler::DpmPp2mKarras,
            seed: 0,
            width: 512,
            height: 512,
            num_images: 1,
            preview_every: 0,
        }
    }
}

/// Noise given from outside instead of drawn from the seed (reproducing another
/// implementation's run).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GivenNoise {
    /// Initial latents, before the scheduler's `init_noise_sigma` (diffusers' `latents=`).
    pub initial: Option<HostLatents>,
    /// Ancestral samplers: the noise of every step.
    pub steps: Option<Vec<HostLatents>>,
}

/// Progress of a generation.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Text encoded; `warnings` says what users should know (e.g. a long prompt).
    Encoded {
        /// The warnings, also returned with the images.
        warnings: Vec<String>,
    },
    /// A step finished.
    Step {
        /// Steps done (1 to `total`).
        step: usize,
        /// Sampling steps in all.
        total: usize,
        /// A cheap preview of the first image (1/8 size), every `preview_every` steps or
        /// more, and on the last.
        preview: Option<RgbImage>,
    },
}

/// Whether to go on after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop: the generation ends with [`PipelineError::Cancelled`].
    Cancel,
}

/// Why a generation did not produce images.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PipelineError {
    /// The request cannot be met (size, steps, number of images, guidance, given noise, or an
    /// identity in the negative prompt); the message says what to change.
    #[error("{0}")]
    Request(String),
    /// The sampler, its number of steps or the model's scheduler settings are not supported.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The prompt names an identity that is not loaded.
    #[error(transparent)]
    UnknownPlaceholder(#[from] UnknownPlaceholder),
    /// The event handler returned [`Flow::Cancel`].
    #[error("cancelled")]
    Cancelled,
    /// Reading a tensor back from the device failed.
    #[error("reading results back from the device failed: {0}")]
    Read(String),
}

impl GenerateRequest {
    /// Checks what can be checked before any work.
    pub fn validate(&self) -> Result<(), PipelineError> {
        let bad = |m: String| Err(PipelineError::Request(m));
        if self.width == 0
            || self.height == 0
            || !self.width.is_multiple_of(8)
            || !self.height.is_multiple_of(8)
        {
            return bad(format!(
                "width and height must be positive multiples of 8, got {}x{}",
                self.width, self.height
            ));
        }
        if self.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if self.num_images == 0 {
            return bad("the number of images must be at least 1".into());
        }
        if !self.guidance.is_finite() {
            return bad(format!("guidance must be a number, got {}", self.guidance));
        }
        Ok(())
    }
}
