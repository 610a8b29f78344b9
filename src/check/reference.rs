//! A model's outputs beside the reference implementation's: the tiny fixture models carry
//! diffusers' and transformers' outputs for fixed inputs (`goldens.safetensors`, written by
//! `tests/fixtures/sd/generate.py`), and this runs the same inputs through the text encoder,
//! UNet and VAE on any device. It is how a GPU backend is shown to compute the model, not just
//! a matmul, correctly.

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Serialize;

use crate::nn::read_f32;
use crate::sd::StableDiffusion;
use crate::unet::{AddedCond, Context};
use crate::weights::{SafetensorsFile, WeightsError};

/// Largest absolute error allowed in f32 (the goldens' values are of order 1).
pub const TOLERANCE: f64 = 1e-3;

/// One output beside its reference.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Compared {
    /// The golden's name, such as `unet.out`.
    pub name: String,
    /// Largest absolute difference; infinite when the device produced NaN or infinity.
    pub max_abs_error: f64,
    /// Largest magnitude of the reference values, to read the error against.
    pub scale: f64,
}

/// Every output compared, and whether all are within [`TOLERANCE`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReferenceReport {
    /// Each output compared, in the order the models ran.
    pub outputs: Vec<Compared>,
    /// The largest absolute error allowed ([`TOLERANCE`]).
    pub tolerance: f64,
    /// True when every output's `max_abs_error` is within `tolerance`.
    pub passed: bool,
    /// Wall time of the model runs and read-backs (first use includes kernel compilation).
    pub millis: f64,
}

/// Why the comparison could not be made (wrong values are a report with `passed: false`).
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The goldens file could not be read (see [`WeightsError`]).
    #[error("reference outputs: {0}")]
    Goldens(#[from] WeightsError),
    /// The goldens file lacks the named input or output; it was written for another version of
    /// the fixtures.
    #[error("reference outputs: `{0}` is missing from the file")]
    Missing(String),
    /// A model output's shape differs from its reference's.
    #[error("reference output `{name}`: the model gave shape {got:?}, the reference has {want:?}")]
    Shape {
        /// The golden's name.
        name: String,
        /// The shape the model produced.
        got: Vec<usize>,
        /// The shape of the reference.
        want: Vec<usize>,
    },
    /// A result could not be read back from the device.
    #[error("reading results back from the device failed: {0}")]
    ReadBack(String),
}

/// The reference outputs and the inputs that produced them.
struct Goldens<'a>(&'a SafetensorsFile);

impl Goldens<'_> {
    async fn host(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), ReferenceError> {
        if self.0.info(name).is_none() {
            return Err(ReferenceError::Missing(name.into()));
        }
        let t = self.0.read(name).await?;
        Ok((t.to_f32(), t.shape))
    }

    async fn tensor<const D: usize>(
        &self,
        name: &str,
        device: &Device,
    ) -> Result<Tensor<D>, ReferenceError> {
        let (values, shape) = self.host(name).await?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// Token ids, stored as int64.
    async fn ids(&self, name: &str, device: &Device) -> Result<Tensor<2, Int>, ReferenceError> {
        let shape = match self.0.info(name) {
            Some(info) => info.shape.clone(),
            None => return Err(ReferenceError::Missing(name.into())),
        };
        let ids: Vec<i64> = self
            .0
            .read_bytes(name)
            .await?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Tensor::from_data(TensorData::new(ids, shape), device))
    }

    /// Reads `actual` back and compares it with the golden `name`.
    async fn compare<const D: usize>(
        &self,
        name: &str,
        actual: Tensor<D>,
    ) -> Result<Compared, ReferenceError> {
        let got_shape = actual.dims().to_vec();
        let got = read_f32(actual).await.map_err(ReferenceError::ReadBack)?;
        let (want, want_shape) = self.host(name).await?;
        if got_shape != want_shape {
            return Err(ReferenceError::Shape {
                name: name.into(),
                got: got_shape,
                want: want_shape,
            });
        }
        let scale = want.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
        let max_abs_error = got.iter().zip(&want).fold(0f64, |m, (&a, &b)| {
            let d = (f64::from(a) - f64::from(b)).abs();
            // NaN compares false: count it as an infinite error.
            if d.is_finite() {
                m.max(d)
            } else {
                f64::INFINITY
            }
        });
        Ok(Compared {
            name: name.into(),
            max_abs_error,
            scale,
        })
    }
}

/// Runs the golden inputs through `sd` (loaded from the same folder as `goldens`) on `device`
/// and compares every main output: the text encoder's hidden states and pooled output (for
/// SDXL both encoders' penultimate states and bigG's projected pooled output), the UNet's noise
/// prediction with one context and with separate key and value contexts (as identities
/// condition it; SDXL's with its added text/time conditioning), and the VAE's encoder and
/// decoder.
pub async fn reference_check(
    sd: &StableDiffusion,
    goldens: &SafetensorsFile,
    device: &Device,
) -> Result<ReferenceReport, ReferenceError> {
    let g = Goldens(goldens);
    let start = web_time::Instant::now();
    let mut outputs = Vec::new();

    let text = sd
        .text_encoder
        .forward(g.ids("text.input_ids", device).await?);
    let added = match &sd.text_encoder_2 {
        None => {
            outputs.push(
                g.compare("text.last_hidden_state", text.last_hidden_state)
                    .await?,
            );
            outputs.push(g.compare("text.pooled", text.pooled).await?);
            None
        }
        Some(encoder_2) => {
            outputs.push(g.compare("text.l.penultimate", text.penultimate).await?);
            let big_g = encoder_2.forward(g.ids("text.input_ids_2", device).await?);
            outputs.push(g.compare("text.g.penultimate", big_g.penultimate).await?);
            let text_embeds = big_g.text_embeds.expect("with projection");
            outputs.push(g.compare("text.g.text_embeds", text_embeds).await?);
            Some(AddedCond {
                text_embeds: g.tensor("unet.text_embeds", device).await?,
                time_ids: g.tensor("unet.time_ids", device).await?,
            })
        }
    };

    let sample: Tensor<4> = g.tensor("unet.sample", device).await?;
    let timesteps: Tensor<1> = g.tensor("unet.timesteps", device).await?;
    let context = Context::new(g.tensor("unet.context", device).await?).with_added(added.clone());
    let out = sd
        .unet
        .forward(sample.clone(), timesteps.clone(), &context, None);
    outputs.push(g.compare("unet.out", out).await?);
    let split = Context::split(
        context.key.clone(),
        g.tensor("unet.value_context", device).await?,
    )
    .with_added(added);
    let out = sd.unet.forward(sample, timesteps, &split, None);
    outputs.push(g.compare("unet.out_kv", out).await?);

    let posterior = sd.vae.encode(g.tensor("vae.image", device).await?);
    outputs.push(g.compare("vae.posterior_mean", posterior.mean).await?);
    let decoded = sd.vae.decode(g.tensor("vae.latents", device).await?);
    outputs.push(g.compare("vae.decoded", decoded).await?);

    Ok(ReferenceReport {
        passed: outputs.iter().all(|o| o.max_abs_error <= TOLERANCE),
        outputs,
        tolerance: TOLERANCE,
        millis: start.elapsed().as_secs_f64() * 1e3,
    })
}
