//! Noise schedules and samplers, step for step as diffusers computes them: the DDPM training
//! schedule, DDIM, Euler, Euler ancestral and DPM-Solver++ 2M (optionally with Karras sigmas),
//! for epsilon and v-prediction models.
//!
//! Coefficients are computed on the host in f64; tensors only see scalars and additions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::Prediction;

#[cfg(feature = "compute")]
mod step;
#[cfg(feature = "compute")]
pub use step::Scheduler;

/// How inference timesteps are spread over the training range (diffusers'
/// `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    /// Evenly spaced over the training range, starting at its last timestep.
    Linspace,
    /// Multiples of an integer stride counted up from 0 (`num_train_timesteps / steps` for
    /// DDIM and Euler), plus `steps_offset`.
    Leading,
    /// Evenly spaced, counted down from the last training timestep.
    Trailing,
}

/// `scheduler/scheduler_config.json`: the fields that decide the schedule. As in diffusers'
/// `from_config`, a field absent from the file takes the default of the sampler's own class;
/// those defaults differ between classes (`None` here).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Timesteps of the training forward process (1000).
    pub num_train_timesteps: usize,
    /// Noise variance (beta) added at the first training timestep.
    pub beta_start: f64,
    /// Noise variance (beta) added at the last training timestep.
    pub beta_end: f64,
    /// How the betas go from `beta_start` to `beta_end`: `linear`, or `scaled_linear`
    /// (linear in their square roots: SD's).
    pub beta_schedule: String,
    /// What the UNet predicts.
    pub prediction_type: Prediction,
    /// Added to every `leading`-spaced inference timestep (1 for SD).
    pub steps_offset: usize,
    /// Default: `leading` for DDIM, `linspace` for the others.
    pub timestep_spacing: Option<Spacing>,
    /// DDIM: use alpha_bar = 1 after the last step (default true); else alpha_bar_0.
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clip the predicted clean latents to +-`clip_sample_range` (default true).
    pub clip_sample: Option<bool>,
    /// DDIM: the bound `clip_sample` clips to (default 1).
    pub clip_sample_range: f64,
    /// Explicit betas in place of a schedule; not supported, so refused when set.
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale the betas to zero terminal SNR; not supported, so refused when true.
    pub rescale_betas_zero_snr: bool,
    /// Dynamic thresholding of the predicted clean latents; not supported, so refused when true.
    pub thresholding: bool,
}

impl Default for SchedulerConfig {
    /// The defaults of diffusers' scheduler classes.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            prediction_type: Prediction::Epsilon,
            steps_offset: 0,
            timestep_spacing: None,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            trained_betas: None,
            rescale_betas_zero_snr: false,
            thresholding: false,
        }
    }
}

/// Why a schedule cannot be made.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A sampler name that none of [`Sampler::ALL`] has.
    #[error("unknown sampler `{0}`: use ddim, euler, euler-a, dpmpp-2m or dpmpp-2m-karras")]
    UnknownSampler(String),
    /// A step count of 0, or more than the training timesteps.
    #[error("the number of steps must be at least 1 and at most {max}, got {steps}")]
    Steps {
        /// The step count asked for.
        steps: usize,
        /// The most steps possible: `num_train_timesteps`.
        max: usize,
    },
    /// A `scheduler_config.json` setting that is not implemented, named.
    #[error("scheduler_config.json: {0} is not supported")]
    Unsupported(String),
}

impl SchedulerConfig {
    /// Stable Diffusion's own `scheduler_config.json` (SD 1.5, SD 2.1): for models that
    /// carry none.
    pub fn for_prediction(prediction: Prediction) -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: prediction,
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Self::default()
        }
    }

    fn check(&self) -> Result<(), ScheduleError> {
        if self.trained_betas.is_some() {
            return Err(ScheduleError::Unsupported("trained_betas".into()));
        }
        if self.thresholding {
            return Err(ScheduleError::Unsupported("thresholding: true".into()));
        }
        if self.rescale_betas_zero_snr {
            return Err(ScheduleError::Unsupported(
                "rescale_betas_zero_snr: true".into(),
            ));
        }
        if !matches!(self.beta_schedule.as_str(), "scaled_linear" | "linear") {
            return Err(ScheduleError::Unsupported(format!(
                "beta_schedule `{}`",
                self.beta_schedule
            )));
        }
        Ok(())
    }
}

/// The DDPM forward process the model was trained with.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSchedule {
    /// `beta_t`: the noise variance added at each training timestep.
    pub betas: Vec<f64>,
    /// `alpha_bar_t`: the fraction of signal variance left at timestep t.
    pub alphas_cumprod: Vec<f64>,
}

impl TrainSchedule {
    /// The schedule of `c`: `scaled_linear` betas, or linear ones for any other
    /// `beta_schedule` ([`Plan::new`] refuses the unsupported ones first).
    pub fn new(c: &SchedulerConfig) -> Self {
        let n = c.num_train_timesteps;
        let lin = |a: f64, b: f64, i: usize| {
            if n == 1 {
                a
            } else {
                a + (b - a) * i as f64 / (n - 1) as f64
            }
        };
        let betas: Vec<f64> = match c.beta_schedule.as_str() {
            // linspace(sqrt(start), sqrt(end))**2: SD's schedule.
            "scaled_linear" => (0..n)
                .map(|i| lin(c.beta_start.sqrt(), c.beta_end.sqrt(), i).powi(2))
                .collect(),
            _ => (0..n).map(|i| lin(c.beta_start, c.beta_end, i)).collect(),
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Self {
            betas,
            alphas_cumprod,
        }
    }

    /// The noise level of timestep t in the variance-exploding view: sqrt((1 - a) / a).
    pub fn sigma(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        ((1.0 - a) / a).sqrt()
    }

    /// `alpha_bar` at a fractional timestep, interpolated linearly in sigma as diffusers'
    /// `np.interp` does for the sigma tables.
    fn sigma_at(&self, t: f64) -> f64 {
        let n = self.alphas_cumprod.len();
        let t = t.clamp(0.0, (n - 1) as f64);
        let lo = t.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        let w = t - lo as f64;
        self.sigma(lo) * (1.0 - w) + self.sigma(hi) * w
    }

    /// The fractional timestep of a sigma (diffusers' `_sigma_to_t`: linear in log sigma).
    fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigmas: Vec<f64> = (0..self.alphas_cumprod.len())
            .map(|t| self.sigma(t).ln())
            .collect();
        let log_sigma = sigma.max(1e-10).ln();
        let n = log_sigmas.len();
        let low = log_sigmas
            .iter()
            .take_while(|&&l| log_sigma - l >= 0.0)
            .count()
            .saturating_sub(1)
            .min(n - 2);
        let (l, h) = (log_sigmas[low], log_sigmas[low + 1]);
        let w = ((l - log_sigma) / (l - h)).clamp(0.0, 1.0);
        (1.0 - w) * low as f64 + w * (low + 1) as f64
    }
}

/// A sampler, as users pick them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sampler {
    /// DDIM, deterministic (diffusers' `DDIMScheduler`).
    #[serde(rename = "ddim")]
    Ddim,
    /// Euler on the sigma schedule (`EulerDiscreteScheduler`).
    #[serde(rename = "euler")]
    Euler,
    /// Euler ancestral: fresh noise at every step (`EulerAncestralDiscreteScheduler`).
    #[serde(rename = "euler-a")]
    EulerAncestral,
    /// DPM-Solver++ 2M (`DPMSolverMultistepScheduler`).
    #[serde(rename = "dpmpp-2m")]
    DpmPp2m,
    /// DPM-Solver++ 2M with Karras et al.'s sigma spacing (`use_karras_sigmas`).
    #[serde(rename = "dpmpp-2m-karras")]
    DpmPp2mKarras,
}

impl Sampler {
    /// Every sampler, in the order they are offered.
    pub const ALL: [Sampler; 5] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpmpp-2m",
            Self::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The name the popular web UIs write into PNG metadata.
    pub fn webui_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mKarras => "DPM++ 2M Karras",
        }
    }

    /// Draws fresh noise at every step.
    pub fn is_ancestral(self) -> bool {
        self == Self::EulerAncestral
    }

    fn default_spacing(self) -> Spacing {
        match self {
            Self::Ddim => Spacing::Leading,
            _ => Spacing::Linspace,
        }
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sampler {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s.to_ascii_lowercase())
            .ok_or_else(|| ScheduleError::UnknownSampler(s.into()))
    }
}

/// The timesteps (and, for sigma samplers, the noise levels) of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The sampler the plan is for.
    pub sampler: Sampler,
    /// What the UNet predicts (the config's `prediction_type`).
    pub prediction: Prediction,
    /// Timesteps handed to the UNet, one per step.
    pub timesteps: Vec<f64>,
    /// Euler and DPM-Solver: noise level per step plus the final one (0); empty for DDIM.
    pub sigmas: Vec<f64>,
    /// The factor the initial noise is multiplied by.
    pub init_noise_sigma: f64,
    /// DDIM: the training-timestep stride between steps.
    step_ratio: usize,
    train: TrainSchedule,
    final_alpha_cumprod: f64,
    /// DDIM: clip the predicted clean latents to +-this.
    clip: Option<f64>,
}

impl Plan {
    /// Plans `steps` steps of `sampler` under `config`, as the diffusers scheduler made with
    /// `from_config(config)` does after `set_timesteps(steps)`.
    pub fn new(
        sampler: Sampler,
        config: &SchedulerConfig,
        steps: usize,
    ) -> Result<Self, ScheduleError> {
        config.check()?;
        let n = config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(ScheduleError::Steps { steps, max: n });
        }
        let train = TrainSchedule::new(config);
        let spacing = config.timestep_spacing.unwrap_or(sampler.default_spacing());
        let offset = config.steps_offset as f64;
        let linspace = |a: f64, b: f64, k: usize| -> Vec<f64> {
            (0..k)
                .map(|i| {
                    if k == 1 {
                        a
                    } else {
                        a + (b - a) * i as f64 / (k - 1) as f64
                    }
                })
                .collect()
        };
        let (timesteps, sigmas, init_noise_sigma) = match sampler {
            Sampler::Ddim => {
                let ratio = n / steps;
                let t: Vec<f64> = match spacing {
                    Spacing::Leading => (0..steps)
                        .rev()
                        .map(|i| (i * ratio) as f64 + offset)
                        .collect(),
                    Spacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                        .into_iter()
                        .rev()
                        .map(f64::round)
                        .collect(),
                    Spacing::Trailing => trailing(n, steps),
                };
                (t, vec![], 1.0)
            }
            Sampler::Euler | Sampler::EulerAncestral => {
                let t: Vec<f64> = match spacing {
                    Spacing::Linspace => linspace(0.0, (n - 1) as f64, steps)
                        .into_iter()
                        .rev()
                        .collect(),
                    Spacing::Leading => (0..steps)
                        .rev()
                        .map(|i| (i * (n / steps)) as f64 + offset)
                        .collect(),
                    Spacing::Trailing => trailing(n, steps),
                };
                let mut sigmas: Vec<f64> = t.iter().map(|&t| train.sigma_at(t)).collect();
                let max = sigmas.iter().cloned().fold(0.0, f64::max);
                sigmas.push(0.0);
                let init = match spacing {
                    Spacing::Linspace | Spacing::Trailing => max,
                    Spacing::Leading => (max * max + 1.0).sqrt(),
                };
                (t, sigmas, init)
            }
            Sampler::DpmPp2m | Sampler::DpmPp2mKarras => {
                let t: Vec<f64> = match spacing {
                    Spacing::Linspace => {
                        let mut t: Vec<f64> = linspace(0.0, (n - 1) as f64, steps + 1)
                            .into_iter()
                            .map(f64::round)
                            .collect();
                        t.reverse();
                        t.pop();
                        t
                    }
                    Spacing::Leading => {
                        let ratio = n / (steps + 1);
                        (1..=steps)
                            .rev()
                            .map(|i| (i * ratio) as f64 + offset)
                            .collect()
                    }
                    Spacing::Trailing => trailing(n, steps),
                };
                let (t, mut sigmas) = if sampler == Sampler::DpmPp2mKarras {
                    // Karras et al. (2022): rho = 7 between the schedule's extreme sigmas.
                    let (min, max) = (train.sigma(0), train.sigma(n - 1));
                    let (lo, hi) = (min.powf(1.0 / 7.0), max.powf(1.0 / 7.0));
                    let sigmas: Vec<f64> = linspace(0.0, 1.0, steps)
                        .into_iter()
                        .map(|r| (hi + r * (lo - hi)).powi(7))
                        .collect();
                    let t = sigmas
                        .iter()
                        .map(|&s| train.sigma_to_t(s).round())
                        .collect();
                    (t, sigmas)
                } else {
                    let sigmas = t.iter().map(|&t| train.sigma_at(t)).collect();
                    (t, sigmas)
                };
                sigmas.push(0.0);
                (t, sigmas, 1.0)
            }
        };
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        let clip = (sampler == Sampler::Ddim && config.clip_sample.unwrap_or(true))
            .then_some(config.clip_sample_range);
        Ok(Self {
            sampler,
            prediction: config.prediction_type,
            timesteps,
            sigmas,
            init_noise_sigma,
            step_ratio: n / steps,
            train,
            final_alpha_cumprod,
            clip,
        })
    }

    /// Number of sampling steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Whether the plan has no steps (never the case for a plan from [`Plan::new`]).
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// The training schedule the plan is drawn from.
    pub fn train(&self) -> &TrainSchedule {
        &self.train
    }
}

/// `np.arange(n, 0, -n / steps).round() - 1`.
fn trailing(n: usize, steps: usize) -> Vec<f64> {
    let ratio = n as f64 / steps as f64;
    (0..steps)
        .map(|i| (n as f64 - i as f64 * ratio).round() - 1.0)
        .collect()
}
