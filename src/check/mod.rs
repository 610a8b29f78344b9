//! Checks that a device computes what it should.
//!
//! The quick one, here, is a short autodiff computation: it runs the operations identity
//! training leans on (matmul, softmax, tanh, reductions and their backward pass) on small fixed
//! inputs, reads the loss and the gradient back asynchronously, and compares them with the same
//! maths done in f64 on the host. The `reference` module runs a whole tiny model against diffusers.

#[cfg(feature = "compute")]
use burn::tensor::{Device, Tensor, TensorData, activation::softmax};
use serde::{Deserialize, Serialize};

#[cfg(feature = "compute")]
pub mod reference;

/// Rows of X (think: query positions).
pub const M: usize = 8;
/// Inner width (think: channels).
pub const K: usize = 16;
/// Columns of W (think: tokens).
pub const N: usize = 4;

/// Relative tolerance of f32 device results against the f64 host reference.
pub const TOLERANCE: f64 = 1e-4;

/// Inputs of the check. The formulas are simple so that other implementations (the
/// browser end-to-end test, in JavaScript) can rebuild them.
pub fn inputs() -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let x = (0..M * K).map(|i| (0.37 * i as f64 + 0.1).sin()).collect();
    let w = (0..K * N).map(|i| 0.5 * (0.23 * i as f64).cos()).collect();
    let c = (0..M * N).map(|i| (i % 5) as f64 / 4.0 - 0.5).collect();
    (x, w, c)
}

/// What the device computed next to what it should have computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    /// loss = mean(softmax(XW) * C) + mean(tanh(XW)^2), as computed on the device.
    pub loss: f64,
    /// The same loss computed in f64 on the host ([`reference()`]).
    pub expected_loss: f64,
    /// dloss/dW, row-major [K, N], as computed on the device.
    pub grad: Vec<f64>,
    /// The same gradient computed in f64 on the host, row-major [K, N].
    pub expected_grad: Vec<f64>,
    /// Largest relative error over the loss and every gradient entry.
    pub max_rel_error: f64,
    /// True when the gradient has [K, N] entries and `max_rel_error` is within [`TOLERANCE`].
    pub passed: bool,
    /// Wall time of the computation including the read-back (first use includes shader
    /// compilation).
    pub millis: f64,
}

/// Why the check could not run at all (a wrong result is a report with `passed: false`).
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("reading results back from the device failed: {0}")]
pub struct CheckError(pub String);

/// Runs the computation on `device` with autodiff and compares it with the host reference.
#[cfg(feature = "compute")]
pub async fn autodiff_check(device: &Device) -> Result<CheckReport, CheckError> {
    let (x, w, c) = inputs();
    let start = web_time::Instant::now();
    let ad = device.clone().autodiff();
    let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<_>>();
    let x_t = Tensor::<2>::from_data(TensorData::new(f32s(&x), [M, K]), &ad);
    let w_t = Tensor::<2>::from_data(TensorData::new(f32s(&w), [K, N]), &ad).require_grad();
    let c_t = Tensor::<2>::from_data(TensorData::new(f32s(&c), [M, N]), &ad);

    let z = x_t.matmul(w_t.clone());
    let loss = (softmax(z.clone(), 1) * c_t).mean() + z.tanh().powi_scalar(2).mean();
    let grads = loss.backward();
    let grad = w_t
        .grad(&grads)
        .ok_or_else(|| CheckError("the backward pass produced no gradient for W".into()))?;

    let loss = read(loss).await?;
    let grad = read(grad).await?;
    let millis = start.elapsed().as_secs_f64() * 1e3;

    let (expected_loss, expected_grad) = reference(&x, &w, &c);
    let max_rel_error = std::iter::once((loss[0], expected_loss))
        .chain(grad.iter().copied().zip(expected_grad.iter().copied()))
        .map(|(got, want)| (got - want).abs() / want.abs().max(1e-3))
        .fold(0.0, f64::max);
    Ok(CheckReport {
        loss: loss[0],
        expected_loss,
        passed: grad.len() == K * N && max_rel_error <= TOLERANCE,
        grad,
        expected_grad,
        max_rel_error,
        millis,
    })
}

#[cfg(feature = "compute")]
async fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f64>, CheckError> {
    let data = t
        .into_data_async()
        .await
        .map_err(|e| CheckError(e.to_string()))?;
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| CheckError(format!("{e:?}")))?;
    Ok(values.into_iter().map(f64::from).collect())
}

/// The same loss and gradient by hand, in f64.
pub fn reference(x: &[f64], w: &[f64], c: &[f64]) -> (f64, Vec<f64>) {
    let mut z = vec![0.0; M * N];
    for i in 0..M {
        for j in 0..N {
            z[i * N + j] = (0..K).map(|k| x[i * K + k] * w[k * N + j]).sum();
        }
    }
    let count = (M * N) as f64;
    let mut loss = 0.0;
    // dloss/dz
    let mut dz = vec![0.0; M * N];
    for i in 0..M {
        let row = &z[i * N..(i + 1) * N];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let p: Vec<f64> = exps.iter().map(|e| e / sum).collect();
        let pc: f64 = (0..N).map(|j| p[j] * c[i * N + j]).sum();
        for j in 0..N {
            let t = row[j].tanh();
            loss += (p[j] * c[i * N + j] + t * t) / count;
            // softmax backward: p * (c - sum(p c)); tanh^2 backward: 2 t (1 - t^2)
            dz[i * N + j] = (p[j] * (c[i * N + j] - pc) + 2.0 * t * (1.0 - t * t)) / count;
        }
    }
    let mut dw = vec![0.0; K * N];
    for k in 0..K {
        for j in 0..N {
            dw[k * N + j] = (0..M).map(|i| x[i * K + k] * dz[i * N + j]).sum();
        }
    }
    (loss, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written gradient agrees with central finite differences of the hand-written
    /// loss, so the reference itself can be trusted.
    #[test]
    fn reference_gradient_matches_finite_differences() {
        let (x, w, c) = inputs();
        let (_, grad) = reference(&x, &w, &c);
        let h = 1e-6;
        for idx in 0..K * N {
            let mut wp = w.clone();
            wp[idx] += h;
            let mut wm = w.clone();
            wm[idx] -= h;
            let fd = (reference(&x, &wp, &c).0 - reference(&x, &wm, &c).0) / (2.0 * h);
            assert!(
                (fd - grad[idx]).abs() < 1e-8,
                "entry {idx}: fd {fd} vs {}",
                grad[idx]
            );
        }
    }
}
