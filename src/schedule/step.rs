//! The samplers' update rules on latent tensors (diffusers' `step()` functions).

use burn::tensor::Tensor;

use super::{Plan, Sampler};
use crate::config::Prediction;

/// A plan being executed: the sampler's state between steps.
#[derive(Debug)]
pub struct Scheduler {
    plan: Plan,
    next: usize,
    /// DPM-Solver++: the previous step's data prediction.
    previous_x0: Option<Tensor<4>>,
}

/// VP coefficients of a variance-exploding sigma: `x = alpha * x0 + sigma * eps`.
fn alpha_sigma(s: f64) -> (f64, f64) {
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    (alpha, s * alpha)
}

/// `log(alpha) - log(sigma)`; +inf at sigma 0.
fn lambda(s: f64) -> f64 {
    let (a, sg) = alpha_sigma(s);
    a.ln() - sg.ln()
}

impl Scheduler {
    /// Starts executing `plan` at its first step.
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            next: 0,
            previous_x0: None,
        }
    }

    /// The plan being executed.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The UNet input at step `i` (Euler samplers divide by `sqrt(sigma^2 + 1)`).
    pub fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        match self.plan.sampler {
            Sampler::Euler | Sampler::EulerAncestral => {
                let s = self.plan.sigmas[i];
                sample.div_scalar((s * s + 1.0).sqrt())
            }
            _ => sample,
        }
    }

    /// Advances `sample` by step `i` given the model's prediction. `noise` (same shape as
    /// `sample`) is required by ancestral samplers and ignored by the others.
    ///
    /// # Panics
    /// If steps are taken out of order, or an ancestral step gets no noise.
    pub fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Tensor<4> {
        assert_eq!(i, self.next, "scheduler steps must be taken in order");
        self.next += 1;
        let p = &self.plan;
        match p.sampler {
            Sampler::Ddim => {
                let t = p.timesteps[i] as usize;
                let ac = &p.train().alphas_cumprod;
                let a = ac[t];
                let ap = t
                    .checked_sub(p.step_ratio)
                    .map_or(p.final_alpha_cumprod, |prev| ac[prev]);
                let (sqrt_alpha, sqrt_one_minus_alpha) = (a.sqrt(), (1.0 - a).sqrt());
                let (x0, eps) = match p.prediction {
                    Prediction::Epsilon => (
                        (sample - model_output.clone().mul_scalar(sqrt_one_minus_alpha))
                            .div_scalar(sqrt_alpha),
                        model_output,
                    ),
                    Prediction::VPrediction => (
                        sample.clone().mul_scalar(sqrt_alpha)
                            - model_output.clone().mul_scalar(sqrt_one_minus_alpha),
                        model_output.mul_scalar(sqrt_alpha)
                            + sample.mul_scalar(sqrt_one_minus_alpha),
                    ),
                };
                let x0 = match p.clip {
                    Some(r) => x0.clamp(-r, r),
                    None => x0,
                };
                x0.mul_scalar(ap.sqrt()) + eps.mul_scalar((1.0 - ap).sqrt())
            }
            Sampler::Euler | Sampler::EulerAncestral => {
                let (s, s_next) = (p.sigmas[i], p.sigmas[i + 1]);
                let x0 = match p.prediction {
                    Prediction::Epsilon => sample.clone() - model_output.mul_scalar(s),
                    Prediction::VPrediction => {
                        model_output.mul_scalar(-s / (s * s + 1.0).sqrt())
                            + sample.clone().div_scalar(s * s + 1.0)
                    }
                };
                let derivative = (sample.clone() - x0).div_scalar(s);
                if p.sampler == Sampler::Euler {
                    sample + derivative.mul_scalar(s_next - s)
                } else {
                    let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s)).sqrt();
                    let down = (s_next * s_next - up * up).sqrt();
                    let noise = noise.expect("ancestral sampling needs noise at every step");
                    sample + derivative.mul_scalar(down - s) + noise.mul_scalar(up)
                }
            }
            Sampler::DpmPp2m | Sampler::DpmPp2mKarras => {
                let (s0, s_next) = (p.sigmas[i], p.sigmas[i + 1]);
                let (alpha_s0, sigma_s0) = alpha_sigma(s0);
                let (alpha_t, sigma_t) = alpha_sigma(s_next);
                let x0 = match p.prediction {
                    Prediction::Epsilon => {
                        (sample.clone() - model_output.mul_scalar(sigma_s0)).div_scalar(alpha_s0)
                    }
                    Prediction::VPrediction => {
                        sample.clone().mul_scalar(alpha_s0) - model_output.mul_scalar(sigma_s0)
                    }
                };
                let h = lambda(s_next) - lambda(s0);
                // exp(-h) - 1, which is -1 at the final sigma of 0 (h = inf).
                let exp_neg_h_minus_1 = (-h).exp_m1();
                // The last step is first order (final sigma 0), as is the first.
                let last = i + 1 == p.len();
                let out = match (&self.previous_x0, last) {
                    (Some(prev), false) => {
                        let h0 = lambda(s0) - lambda(p.sigmas[i - 1]);
                        let r0 = h0 / h;
                        let d1 = (x0.clone() - prev.clone()).div_scalar(r0);
                        sample.mul_scalar(sigma_t / sigma_s0)
                            - x0.clone().mul_scalar(alpha_t * exp_neg_h_minus_1)
                            - d1.mul_scalar(0.5 * alpha_t * exp_neg_h_minus_1)
                    }
                    _ => {
                        sample.mul_scalar(sigma_t / sigma_s0)
                            - x0.clone().mul_scalar(alpha_t * exp_neg_h_minus_1)
                    }
                };
                self.previous_x0 = Some(x0);
                out
            }
        }
    }
}
