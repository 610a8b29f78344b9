//! In-browser tests: the worker's GPU check on WebGPU, run inside a dedicated worker in
//! headless Chromium (see webdriver.json and scripts/test.sh).
#![cfg(target_family = "wasm")]

use gloo_worker::Codec;
use sefi::app::protocol::{JsCodec, Response};
use sefi::app::worker::gpu_check;
use sefi::check::{TOLERANCE, inputs, reference};
use sefi::device::{Backend, DeviceChoice, DeviceError};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

#[wasm_bindgen_test]
async fn gpu_check_runs_autodiff_on_webgpu_in_a_worker() {
    let report = gpu_check()
        .await
        .expect("WebGPU available in the test browser (--enable-unsafe-webgpu)");
    assert_eq!(report.device.backend, Backend::Wgpu);
    assert!(report.device.limits.is_some());

    let (x, w, c) = inputs();
    let (loss, grad) = reference(&x, &w, &c);
    assert!(
        (report.check.loss - loss).abs() <= TOLERANCE * loss.abs(),
        "{:?}",
        report.check
    );
    for (got, want) in report.check.grad.iter().zip(&grad) {
        assert!(
            (got - want).abs() <= TOLERANCE * want.abs().max(1e-3),
            "{got} vs {want}"
        );
    }
    assert!(report.check.passed);
}

#[wasm_bindgen_test]
async fn messages_survive_the_worker_codec() {
    let response = Response::GpuCheck(gpu_check().await);
    let back: Response = JsCodec::decode(JsCodec::encode(response.clone()));
    assert_eq!(back, response);
}

#[wasm_bindgen_test]
async fn backends_missing_from_the_web_build_are_errors() {
    let err = DeviceChoice::Cpu.open().await.unwrap_err();
    assert_eq!(
        err,
        DeviceError::NotCompiled {
            backend: Backend::Cpu
        }
    );
    let err = DeviceChoice::Cuda.open().await.unwrap_err();
    assert_eq!(
        err,
        DeviceError::NotCompiled {
            backend: Backend::Cuda
        }
    );
}
