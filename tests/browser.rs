//! In-browser tests: the worker's GPU check on WebGPU, run inside a dedicated worker in
//! headless Chromium (see webdriver.json and scripts/test.sh).
#![cfg(target_family = "wasm")]

use gloo_worker::Codec;
use sefi::app::protocol::{BUILD, JsCodec, Request, Response, Versioned};
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
    let stamped = Versioned::Ours(response.clone());
    let back: Versioned<Response> = JsCodec::decode(JsCodec::encode(stamped.clone()));
    assert_eq!(back, stamped);
}

#[wasm_bindgen_test]
fn messages_of_another_build_or_shape_arrive_as_foreign() {
    use wasm_bindgen::JsValue;
    // Another build's message, whatever its body.
    let theirs = Versioned::<Request>::Foreign {
        build: "sefi-0000000000000000".into(),
    };
    let back: Versioned<Request> = JsCodec::decode(JsCodec::encode(theirs.clone()));
    assert_eq!(back, theirs);
    // A message of this build that this build cannot read.
    let odd = js_sys::Object::new();
    js_sys::Reflect::set(&odd, &"build".into(), &BUILD.into()).unwrap();
    js_sys::Reflect::set(&odd, &"body".into(), &"NoSuchRequest".into()).unwrap();
    let back: Versioned<Request> = JsCodec::decode(odd.into());
    assert!(matches!(back, Versioned::Foreign { build } if build.starts_with(BUILD)));
    // A message of a build from before builds were stamped, and plain garbage.
    for old in [
        JsCodec::encode(Request::GpuCheck),
        JsValue::from(42),
        JsValue::NULL,
    ] {
        let back: Versioned<Request> = JsCodec::decode(old);
        assert!(matches!(back, Versioned::Foreign { .. }), "{back:?}");
    }
    assert!(BUILD.starts_with("sefi-") && BUILD.len() == 21, "{BUILD}");
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

/// What makes the app's storage crash-safe: a file changes only when its writer is closed, so a
/// tab that dies while writing (a checkpoint, a download part) leaves the old file; and a model
/// stored in parts opens only with every byte there.
#[wasm_bindgen_test]
async fn an_interrupted_write_leaves_the_old_file() {
    use js_sys::Uint8Array;
    use sefi::store::{PartsSource, Store};

    let s = Store::open().await.expect("OPFS in the test browser");
    let path = "tests/atomic/checkpoint.bin";
    s.write(path, b"old checkpoint").await.unwrap();

    // Mid-write (a tab that dies now never closes its writer), the file is the old one; a write
    // given up leaves it so.
    let mut w = s.writer(path).await.unwrap();
    w.write_js(&Uint8Array::from(&b"new checkpoint, half"[..]))
        .await
        .unwrap();
    assert_eq!(s.read(path).await.unwrap(), b"old checkpoint");
    w.abort().await;
    assert_eq!(s.read(path).await.unwrap(), b"old checkpoint");

    // A finished write replaces the file whole.
    s.write(path, b"new").await.unwrap();
    assert_eq!(s.read(path).await.unwrap(), b"new");

    // A model file in two parts of 4 bytes, the second cut short: it does not open.
    s.write("tests/atomic/w.0", b"abcd").await.unwrap();
    s.write("tests/atomic/w.1", b"e").await.unwrap();
    let short = PartsSource::open(&s, "w", "tests/atomic/w", 8, 4).await;
    assert!(short.is_err(), "a short download opened");
    s.write("tests/atomic/w.1", b"efgh").await.unwrap();
    assert!(
        PartsSource::open(&s, "w", "tests/atomic/w", 8, 4)
            .await
            .is_ok()
    );
    s.remove("tests/atomic").await.unwrap();
}
