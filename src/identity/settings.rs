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
    /// What the subject is: a single CLIP token such as "person" or "dog". The vectors start
    /// from its embedding, and the reference prompt holds it.
    pub class_word: String,
    /// Optimisation steps in the run (default [`DEFAULT_STEPS`]).
    pub steps: usize,
    /// AdamW learning rate (default [`DEFAULT_LR`]).
    pub lr: f64,
    /// Weight of the attention loss.
    pub attn_weight: f64,
    /// Number of timestep stages, each with its own key and value vector (default 5).
    pub stages: usize,
    /// Side of the square training images, in pixels (a multiple of 8).
    pub resolution: usize,
    /// Seeds each step's draws (photo, flip, timestep, noise) together with the step index.
    pub seed: u64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Training prompt with `<id>` for the identity; the reference prompt has the class word
    /// there. Default: `"a photo of the face of <id>"` for people, `"a photo of a <id>"` otherwise.
    pub template: Option<String>,
}

impl TrainConfig {
    /// The default settings (docs/METHOD.md) for an identity `token` of `class_word`, trained
    /// at `resolution` pixels (usually the model's native size).
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

    /// The training prompt template: `template` if set, otherwise the default for the class
    /// word (the face template for person, man, woman, boy, girl and child).
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
    /// Steps done, this one included (1 to `total`).
    pub step: usize,
    /// Steps in the run ([`TrainConfig::steps`]).
    pub total: usize,
    /// The total loss: `noise_loss + attn_weight * attn_loss`.
    pub loss: f64,
    /// The noise-prediction term: mean squared error of the UNet's prediction.
    pub noise_loss: f64,
    /// The attention term `L_attn`, before weighting.
    pub attn_loss: f64,
    /// The timestep drawn for this step (0 to 999 for SD's 1000-step schedule).
    pub timestep: usize,
    /// The stage of that timestep: the one whose vectors this step updated.
    pub stage: usize,
    /// Speed of this step.
    pub steps_per_second: f64,
}

/// Everything that changes during training: what a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps done.
    pub step: usize,
    /// `[stages, dim]` each.
    pub key: Vec<f32>,
    /// The value vectors, `[stages, dim]` flattened like `key`.
    pub value: Vec<f32>,
    /// AdamW moments, same layout.
    pub m_key: Vec<f32>,
    /// AdamW's second moment (squared gradients) of the key vectors.
    pub v_key: Vec<f32>,
    /// AdamW's first moment of the value vectors.
    pub m_value: Vec<f32>,
    /// AdamW's second moment of the value vectors.
    pub v_value: Vec<f32>,
    /// Updates applied to each stage (its AdamW step count; a stage is updated only when
    /// its timesteps are drawn).
    pub stage_steps: Vec<u32>,
}

/// What an identity file's `training` metadata says of the run that made it: the settings, the
/// steps done and, in a checkpoint, the state to resume from. One type writes and reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// The run's settings.
    pub config: TrainConfig,
    /// Steps done when the file was written.
    pub steps_done: usize,
    /// The vectors and AdamW's moments, in checkpoints only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TrainState>,
}

impl TrainingRecord {
    /// The record an identity file carries; `None` where its metadata holds none (a file
    /// written by another tool).
    pub fn read(training: &serde_json::Value) -> Option<Self> {
        Self::deserialize(training).ok()
    }

    /// The metadata to store.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a training record is plain data")
    }

    /// The steps done, from a record whose settings may no longer read (written before a
    /// setting was added).
    pub fn steps_done_in(training: &serde_json::Value) -> Option<usize> {
        #[derive(Deserialize)]
        struct Steps {
            steps_done: usize,
        }
        Steps::deserialize(training).ok().map(|s| s.steps_done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record goes to JSON and back unchanged, with and without a state; an identity keeps
    /// no state key, and a record with unreadable settings still tells its steps.
    #[test]
    fn a_training_record_round_trips() {
        let state = TrainState {
            step: 7,
            key: vec![0.5, -1.0],
            value: vec![0.25, 2.0],
            m_key: vec![0.0; 2],
            v_key: vec![1e-8; 2],
            m_value: vec![0.1; 2],
            v_value: vec![0.2; 2],
            stage_steps: vec![7],
        };
        let mut record = TrainingRecord {
            config: TrainConfig::new("alice", "person", 512),
            steps_done: 7,
            state: Some(state),
        };
        assert_eq!(
            TrainingRecord::read(&record.to_json()),
            Some(record.clone())
        );
        record.state = None;
        let json = record.to_json();
        assert!(json.get("state").is_none());
        assert_eq!(json["steps_done"], 7);
        assert_eq!(TrainingRecord::read(&json), Some(record));
        let old = serde_json::json!({ "config": { "token": "alice" }, "steps_done": 300 });
        assert_eq!(TrainingRecord::read(&old), None);
        assert_eq!(TrainingRecord::steps_done_in(&old), Some(300));
        assert_eq!(TrainingRecord::steps_done_in(&serde_json::json!({})), None);
    }
}
