//! A training run's settings and per-step numbers: plain data that the browser page sends to
//! and receives from the worker, so it is built without a compute backend.

use serde::{Deserialize, Serialize};

/// Default number of training steps (docs/METHOD.md).
pub const DEFAULT_STEPS: usize = 600;
/// Default AdamW learning rate.
pub const DEFAULT_LR: f64 = 5e-3;
/// The paper's weight of the attention loss.
pub const DEFAULT_ATTN_WEIGHT: f64 = 0.003;
/// The class word offered first.
pub const DEFAULT_CLASS_WORD: &str = "person";

/// Training settings; the defaults and where each comes from: docs/METHOD.md.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The placeholder name (`<token>` in prompts).
    pub token: String,
    pub class_word: String,
    pub steps: usize,
    pub lr: f64,
    /// Weight of the attention loss.
    pub attn_weight: f64,
    pub stages: usize,
    /// Side of the square training images, in pixels (a multiple of 8).
    pub resolution: usize,
    pub seed: u64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Training prompt with `<id>` for the identity; the reference prompt has the class word
    /// there. Default: "a photo of the face of <id>" for people, "a photo of a <id>" otherwise.
    pub template: Option<String>,
}

impl TrainConfig {
    pub fn new(token: &str, class_word: &str, resolution: usize) -> Self {
        Self {
            token: token.into(),
            class_word: class_word.into(),
            steps: DEFAULT_STEPS,
            lr: DEFAULT_LR,
            attn_weight: DEFAULT_ATTN_WEIGHT,
            stages: super::STAGES,
            resolution,
            seed: 0,
            weight_decay: 0.01,
            template: None,
        }
    }

    pub fn template(&self) -> String {
        self.template
            .clone()
            .unwrap_or_else(|| match self.class_word.as_str() {
                "person" | "man" | "woman" | "boy" | "girl" | "child" => {
                    "a photo of the face of <id>".into()
                }
                _ => "a photo of a <id>".into(),
            })
    }
}

/// One step's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub noise_loss: f64,
    pub attn_loss: f64,
    pub timestep: usize,
    pub stage: usize,
    /// Speed of this step.
    pub steps_per_second: f64,
}
