//! Faces: the BlazeFace network against the TensorFlow Lite runtime, and whole detections
//! against MediaPipe's face detection, on real photos (`tests/fixtures/face/generate.py`), on
//! the CPU and on wgpu (lavapipe).
#![cfg(not(target_family = "wasm"))]

mod common;
use common::fixture;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::SafeTensors;
use sefi::block_on;
use sefi::face::{Face, FaceDetector, blazeface::BlazeFace, letterbox};
use sefi::identity::train::decode_photo;
use sefi::rgb::RgbImage;

fn weights() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("www/models/face_detection_short_range.safetensors");
    std::fs::read(path).unwrap()
}

fn references() -> (Vec<u8>, serde_json::Value) {
    let tensors = std::fs::read(fixture("face/blazeface.safetensors")).unwrap();
    let json = std::fs::read_to_string(fixture("face/detections.json")).unwrap();
    (tensors, serde_json::from_str(&json).unwrap())
}

fn photo(file: &str) -> RgbImage {
    decode_photo(&std::fs::read(fixture(file)).unwrap()).unwrap()
}

fn floats(file: &SafeTensors, name: &str) -> Vec<f32> {
    let view = file.tensor(name).unwrap();
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn devices() -> Vec<(&'static str, Device)> {
    let gpu = block_on(sefi::device::DeviceChoice::Wgpu.open())
        .expect("no wgpu adapter: run ./scripts/setup.sh test");
    vec![("cpu", Device::flex()), ("wgpu", gpu.device)]
}

fn cases(json: &serde_json::Value) -> Vec<(String, &serde_json::Value)> {
    let cases = json["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 5, "astronaut, small, rotated, camera, cat");
    cases.iter().map(|(k, v)| (k.clone(), v)).collect()
}

/// The input the network sees is MediaPipe's, byte for byte: the photo padded to a square and
/// sampled as OpenCV's warpPerspective does.
#[test]
fn photos_are_letterboxed_as_mediapipe_does() {
    let (tensors, json) = references();
    let tensors = SafeTensors::deserialize(&tensors).unwrap();
    for (name, case) in cases(&json) {
        let (input, _) = letterbox(&photo(case["file"].as_str().unwrap()));
        let want = tensors.tensor(&format!("{name}.input")).unwrap();
        assert_eq!(want.shape(), [128, 128, 3]);
        assert!(
            input == want.data(),
            "{name}: the letterboxed input differs"
        );
    }
}

/// The network's raw outputs on the same input as the TensorFlow Lite runtime's.
#[test]
fn the_network_matches_tensorflow_lite() {
    let (tensors, json) = references();
    let tensors = SafeTensors::deserialize(&tensors).unwrap();
    for (what, device) in devices() {
        let net = BlazeFace::from_safetensors(&weights(), &device).unwrap();
        for (name, _) in cases(&json) {
            let input: Vec<f32> = tensors
                .tensor(&format!("{name}.input"))
                .unwrap()
                .data()
                .iter()
                .map(|&v| f32::from(v) / 127.5 - 1.0)
                .collect();
            let x = Tensor::<4>::from_data(TensorData::new(input, [1, 128, 128, 3]), &device)
                .permute([0, 3, 1, 2]);
            let (regressors, logits) = net.forward(x);
            for (out, key) in [
                (regressors.reshape([896 * 16]), "regressors"),
                (logits.reshape([896]), "classificators"),
            ] {
                let got = block_on(sefi::nn::read_f32(out)).unwrap();
                let want = floats(&tensors, &format!("{name}.{key}"));
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                eprintln!("{what} {name} {key}: max abs error {err:.2e} (values up to {scale:.1})");
                assert!(
                    err <= 1e-4 * scale,
                    "{what} {name} {key}: {err} (scale {scale})"
                );
            }
        }
    }
}

/// Whole detections as MediaPipe's face detection finds them: the same faces, boxes and
/// keypoints within a pixel, the same scores; no face on the cat.
#[test]
fn faces_are_found_as_mediapipe_finds_them() {
    let (_, json) = references();
    for (what, device) in devices() {
        let detector = FaceDetector::from_safetensors(&weights(), &device).unwrap();
        for (name, case) in cases(&json) {
            let faces: Vec<Face> =
                block_on(detector.detect(&photo(case["file"].as_str().unwrap()))).unwrap();
            let want = case["faces"].as_array().unwrap();
            assert_eq!(faces.len(), want.len(), "{what} {name}: {faces:?}");
            if name == "chelsea" {
                assert!(faces.is_empty(), "no face on the cat photo: {faces:?}");
            } else {
                assert_eq!(faces.len(), 1, "{what} {name}: one face");
            }
            for (face, want) in faces.iter().zip(want) {
                let want_points: Vec<f64> = want["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .chain(
                        want["keypoints"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .flat_map(|p| p.as_array().unwrap()),
                    )
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                let points = face.bbox.iter().chain(face.keypoints.iter().flatten());
                let err = points
                    .zip(&want_points)
                    .fold(0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
                let score_err = (f64::from(face.score) - want["score"].as_f64().unwrap()).abs();
                eprintln!("{what} {name}: {err:.4} px, score {score_err:.1e}");
                assert!(err < 1.0, "{what} {name}: {err} px from MediaPipe's");
                assert!(score_err < 1e-3, "{what} {name}: score off by {score_err}");
            }
        }
    }
}
