//! The SeFi loss and its gradients against PyTorch autograd with diffusers' UNet and
//! transformers' text encoders, for SD 1.x, 2.x and XL (goldens from
//! `tests/fixtures/sefi/generate.py`).
#![cfg(not(target_family = "wasm"))]

use burn::tensor::{DType, Device, Tensor};
use sefi::block_on;
use sefi::identity::condition::encode_spliced;
use sefi::identity::loss::{LossInputs, Objective, TrainPrompt, loss_scale, sefi_loss};
use sefi::pipeline::read_f32;
use sefi::schedule::TrainSchedule;

mod common;
use common::{Goldens, load_model_in};

/// Largest |a - b| relative to the largest |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    block_on(read_f32(t)).unwrap()
}

/// Relative tolerances: contexts, loss, attention loss, total gradients, attention-term
/// gradients.
struct Tol {
    context: f32,
    loss: f32,
    attn: f32,
    grad: f32,
    attn_grad: f32,
    attn_grad_cosine: f32,
}

const F32: Tol = Tol {
    context: 1e-4,
    loss: 1e-4,
    attn: 1e-3,
    grad: 1e-3,
    attn_grad: 2e-3,
    attn_grad_cosine: 0.999_99,
};

/// F16 weights and activations against PyTorch's F32: the learned vectors, the loss and the
/// gradients stay F32, so only the model's rounding shows. The attention term's value gradient
/// cancels heavily (PyTorch's own F32 and F64 differ by 2e-4 there) and amplifies F16 rounding
/// the same way, so for it the direction is what is checked.
const F16: Tol = Tol {
    context: 5e-3,
    loss: 1e-2,
    attn: 5e-2,
    grad: 5e-2,
    attn_grad: 5e-1,
    attn_grad_cosine: 0.9,
};

fn check(model: &str, dtype: DType, tol: Tol) {
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model_in(model, &device, dtype);
    let g = Goldens::open(&format!("sefi/{model}.safetensors"));
    let objective = Objective {
        schedule: TrainSchedule::new(&ckpt.scheduler),
        prediction: ckpt.scheduler.prediction_type,
        attn_weight: 0.003,
    };
    for case in ["one", "two", "zero"] {
        let name = |n: &str| format!("{case}.{n}");
        let what = format!("{model} {case} {dtype:?}");
        let prompt = TrainPrompt {
            ids: g.ints(&name("ids")).into_iter().map(|i| i as u32).collect(),
            positions: g
                .ints(&name("positions"))
                .into_iter()
                .map(|i| i as usize)
                .collect(),
        };
        let leaf = |n: &str| g.tensor::<2>(&name(n), &device).require_grad();
        let inputs = LossInputs {
            latents: g.tensor(&name("z0"), &device),
            noise: g.tensor(&name("noise"), &device),
            timestep: g.f32(&name("timestep")).0[0] as usize,
        };

        // The spliced contexts.
        let c_k = encode_spliced(
            &sd,
            &prompt.ids,
            &prompt.positions,
            g.tensor(&name("key"), &device),
            &device,
        )
        .states;
        let err = rel(&values(c_k), &g.f32(&name("c_k")).0);
        assert!(err < tol.context, "{what}: c_k off by {err:e}");

        // Loss and gradients of the whole objective.
        let (key, value) = (leaf("key"), leaf("value"));
        let loss = sefi_loss(
            &sd,
            &objective,
            &prompt,
            key.clone(),
            value.clone(),
            &inputs,
            &device,
        );
        for (n, t) in [
            ("loss", loss.total.clone()),
            ("noise_loss", loss.noise.clone()),
        ] {
            let err = rel(&values(t), &g.f32(&name(n)).0);
            eprintln!("{what}: {n} relative error {err:e}");
            assert!(err < tol.loss, "{what}: {n} off by {err:e}");
        }
        let want_attn = g.f32(&name("attn_loss")).0[0];
        let got_attn = values(loss.attention.clone())[0];
        if case == "zero" {
            assert_eq!(
                got_attn, 0.0,
                "{what}: the attention loss starts at exactly zero"
            );
        } else {
            let err = (got_attn - want_attn).abs() / want_attn.abs();
            eprintln!("{what}: attention loss {got_attn:e} vs {want_attn:e} ({err:e})");
            assert!(err < tol.attn, "{what}: attention loss off by {err:e}");
            let layers: Vec<f32> = loss.layers.iter().map(|l| values(l.clone())[0]).collect();
            let err = rel(&layers, &g.f32(&name("attn_layers")).0);
            assert!(
                err < tol.attn,
                "{what}: per-layer attention losses off by {err:e}"
            );
        }
        let scale = loss_scale(dtype);
        let grads = loss.total.mul_scalar(scale).backward();
        for (n, t) in [("grad_key", &key), ("grad_value", &value)] {
            let grad = t.grad(&grads).unwrap().div_scalar(scale);
            assert_eq!(grad.dtype(), DType::F32, "{what}: {n} is kept in F32");
            let err = rel(&values(grad), &g.f32(&name(n)).0);
            eprintln!("{what}: {n} relative error {err:e}");
            assert!(err < tol.grad, "{what}: {n} off by {err:e}");
        }

        // Gradients of the attention term alone (it is ~1e-8 of the total in f32, invisible in
        // the total's gradients). Its value gradient flows only through later layers' queries
        // and cancels heavily; PyTorch's own f32 and f64 runs differ by up to 2e-4 there.
        if case != "zero" {
            let (key, value) = (leaf("key"), leaf("value"));
            let loss = sefi_loss(
                &sd,
                &objective,
                &prompt,
                key.clone(),
                value.clone(),
                &inputs,
                &device,
            );
            let grads = loss.attention.mul_scalar(scale).backward();
            for (n, t) in [("attn_grad_key", &key), ("attn_grad_value", &value)] {
                let got = values(t.grad(&grads).unwrap().div_scalar(scale));
                let want = g.f32(&name(n)).0;
                let err = rel(&got, &want);
                let cos = cosine(&got, &want);
                eprintln!("{what}: {n} relative error {err:e}, cosine {cos}");
                assert!(
                    cos > tol.attn_grad_cosine,
                    "{what}: {n} points elsewhere ({cos})"
                );
                assert!(err < tol.attn_grad, "{what}: {n} off by {err:e}");
            }
        }
    }
}

#[test]
fn tiny_sd1_loss_and_gradients_match_pytorch() {
    check("tiny-sd1", DType::F32, F32);
}

#[test]
fn tiny_sd2_loss_and_gradients_match_pytorch() {
    check("tiny-sd2", DType::F32, F32);
}

/// SDXL: vectors for both text encoders, the pooled embedding from the value prompt, the
/// training size as micro-conditioning, 28 cross-attention layers.
#[test]
fn tiny_sdxl_loss_and_gradients_match_pytorch() {
    check("tiny-sdxl", DType::F32, F32);
}

#[test]
fn half_precision_weights_give_close_losses_and_gradients() {
    check("tiny-sd1", DType::F16, F16);
    check("tiny-sd2", DType::F16, F16);
    check("tiny-sdxl", DType::F16, F16);
}
