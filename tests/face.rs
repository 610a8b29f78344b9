//! Faces: the BlazeFace network against the TensorFlow Lite runtime, and whole detections
//! against MediaPipe's face detection, on real photos (`tests/fixtures/face/generate.py`), on
//! the CPU and on wgpu (lavapipe).
#![cfg(not(target_family = "wasm"))]

mod common;
use common::fixture;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::SafeTensors;
use sefi::block_on;
use sefi::face::{
    Descriptor, Face, FaceDetector, FaceRecognizer, SAME_PERSON, blazeface::BlazeFace, chip,
    letterbox, recognition::FaceRecognitionNet,
};
use sefi::identity::train::decode_photo;
use sefi::rgb::RgbImage;

fn site_model(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("www/models")
            .join(name),
    )
    .unwrap()
}

fn weights() -> Vec<u8> {
    site_model("face_detection_short_range.safetensors")
}

fn recognizer(device: &Device) -> FaceRecognizer {
    let manifest = site_model("face_recognition_model-weights_manifest.json");
    FaceRecognizer::from_tfjs(
        std::str::from_utf8(&manifest).unwrap(),
        &site_model("face_recognition_model.bin"),
        device,
    )
    .unwrap()
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
    assert_eq!(
        cases.len(),
        7,
        "astronaut (128 and 256 px), small, rotated, camera, cat, Grace Hopper"
    );
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

fn recognition_references() -> Vec<u8> {
    std::fs::read(fixture("face/recognition.safetensors")).unwrap()
}

/// The chips cut around the faces found here are the reference's (cut around MediaPipe's
/// keypoints, which the detector matches to 1e-4 px): at most one level apart in a few pixels.
#[test]
fn face_chips_are_cut_as_the_reference_cuts_them() {
    let (_, json) = references();
    let tensors = recognition_references();
    let tensors = SafeTensors::deserialize(&tensors).unwrap();
    let detector = FaceDetector::from_safetensors(&weights(), &Device::flex()).unwrap();
    for (name, case) in cases(&json) {
        let image = photo(case["file"].as_str().unwrap());
        let faces = block_on(detector.detect(&image)).unwrap();
        let Some(face) = faces.first() else { continue };
        let got = chip(&image, face);
        let want = tensors.tensor(&format!("{name}.chip")).unwrap();
        assert_eq!(want.shape(), [150, 150, 3]);
        let off: Vec<i32> = got
            .iter()
            .zip(want.data())
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .filter(|&d| d > 0)
            .collect();
        eprintln!(
            "{name}: {} of 67500 values differ, by at most {:?}",
            off.len(),
            off.iter().max()
        );
        assert!(off.iter().all(|&d| d <= 1), "{name}: {off:?}");
        assert!(off.len() < 200, "{name}: {} values differ", off.len());
    }
}

/// The recognition network's descriptors of the reference chips as face-api's (tfjs, float32).
#[test]
fn the_recognition_network_matches_face_api() {
    let tensors = recognition_references();
    let tensors = SafeTensors::deserialize(&tensors).unwrap();
    let manifest = site_model("face_recognition_model-weights_manifest.json");
    let names: Vec<String> = tensors
        .names()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".chip").map(str::to_string))
        .collect();
    assert_eq!(names.len(), 6, "the photos with a face");
    for (what, device) in devices() {
        let net = FaceRecognitionNet::from_tfjs(
            std::str::from_utf8(&manifest).unwrap(),
            &site_model("face_recognition_model.bin"),
            &device,
        )
        .unwrap();
        for name in &names {
            let chip: Vec<f32> = tensors
                .tensor(&format!("{name}.chip"))
                .unwrap()
                .data()
                .iter()
                .map(|&v| f32::from(v))
                .collect();
            let x = Tensor::<4>::from_data(TensorData::new(chip, [1, 150, 150, 3]), &device);
            let got = block_on(sefi::nn::read_f32(net.forward(x))).unwrap();
            let want = floats(&tensors, &format!("{name}.descriptor"));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("{what} {name}: max abs error {err:.2e}");
            assert!(err <= 1e-3, "{what} {name}: descriptor off by {err}");
        }
    }
}

/// The same person scores high through flips, crops, colour changes, JPEG compression, a
/// rotation and a small face; two other people score low, against her and each other. The whole path: detect, cut, describe.
#[test]
fn one_person_scores_high_and_another_low() {
    use image::{ImageEncoder, RgbImage as Image, codecs::jpeg::JpegEncoder, imageops};
    let device = Device::flex();
    let detector = FaceDetector::from_safetensors(&weights(), &device).unwrap();
    let recognizer = recognizer(&device);
    let describe = |image: &RgbImage| -> Descriptor {
        let faces = block_on(detector.detect(image)).unwrap();
        assert_eq!(faces.len(), 1, "one face");
        block_on(recognizer.describe(image, &faces[..1]))
            .unwrap()
            .remove(0)
    };
    let to_image =
        |p: &RgbImage| Image::from_raw(p.width as u32, p.height as u32, p.data.clone()).unwrap();
    let from_image = |i: Image| RgbImage {
        width: i.width() as usize,
        height: i.height() as usize,
        data: i.into_raw(),
    };
    let reference = photo("photos/astronaut-256.png");
    let base = to_image(&reference);
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, 30)
        .write_image(base.as_raw(), 256, 256, image::ExtendedColorType::Rgb8)
        .unwrap();
    let mut recoloured = base.clone();
    for p in recoloured.pixels_mut() {
        // Warmer and darker: red up, blue down.
        p.0 = [
            (f32::from(p.0[0]) * 1.1).min(255.0) as u8,
            (f32::from(p.0[1]) * 0.9) as u8,
            (f32::from(p.0[2]) * 0.7) as u8,
        ];
    }
    let same = [
        ("mirrored", from_image(imageops::flip_horizontal(&base))),
        (
            "cropped",
            from_image(imageops::crop_imm(&base, 40, 0, 140, 150).to_image()),
        ),
        ("recoloured", from_image(recoloured)),
        ("JPEG quality 30", decode_photo(&jpeg).unwrap()),
        ("rotated 30 degrees", photo("photos/astronaut-rotated.png")),
        ("small, letterboxed", photo("photos/astronaut-small.png")),
        ("128 px", photo("photos/astronaut.png")),
    ];
    let identity = describe(&reference);
    eprintln!("| photo | similarity to astronaut-256 |\n|---|---|");
    for (what, image) in &same {
        let s = identity.similarity(&describe(image));
        eprintln!("| astronaut, {what} | {s:.3} |");
        assert!(s >= SAME_PERSON, "{what}: {s}");
    }
    let camera = describe(&photo("photos/camera.png"));
    let hopper = photo("photos/hopper.png");
    let hopper_face = describe(&hopper);
    for (who, other) in [("camera", &camera), ("Grace Hopper", &hopper_face)] {
        let s = identity.similarity(other);
        eprintln!("| another person ({who}) | {s:.3} |");
        assert!(s < SAME_PERSON, "{who}: {s}");
    }
    // The other two people are told apart too, and each stays itself through a mirror.
    let s = camera.similarity(&hopper_face);
    eprintln!("| camera vs Grace Hopper | {s:.3} |");
    assert!(s < SAME_PERSON, "camera vs Grace Hopper: {s}");
    let mirrored = from_image(imageops::flip_horizontal(&to_image(&hopper)));
    let s = hopper_face.similarity(&describe(&mirrored));
    eprintln!("| Grace Hopper, mirrored | {s:.3} |");
    assert!(s >= SAME_PERSON, "Grace Hopper, mirrored: {s}");
}

/// `sefi score` against a photo: the same person, someone else, and no face.
#[test]
fn sefi_score_compares_faces_with_a_photo() {
    let path = |p: &str| fixture(p).display().to_string();
    let out = common::sefi_ok(&[
        "score",
        "--photo",
        &path("photos/astronaut-256.png"),
        "--image",
        &path("photos/astronaut-rotated.png"),
        &path("photos/camera.png"),
        &path("photos/chelsea.png"),
        "--device",
        "cpu",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("astronaut-rotated.png: face 1") && lines[0].ends_with("(same person)"),
        "{text}"
    );
    assert!(
        lines[1].contains("camera.png: face 1") && lines[1].ends_with("(someone else)"),
        "{text}"
    );
    assert!(lines[2].ends_with("chelsea.png: no face found"), "{text}");
    // The models come from $SEFI_FACE_MODELS where it names a folder that holds them: a
    // damaged one is a clear error.
    let damaged = std::env::temp_dir().join(format!("sefi-face-models-{}", std::process::id()));
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::write(
        damaged.join("face_detection_short_range.safetensors"),
        b"not weights",
    )
    .unwrap();
    for name in [
        "face_recognition_model-weights_manifest.json",
        "face_recognition_model.bin",
    ] {
        std::fs::write(damaged.join(name), site_model(name)).unwrap();
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sefi"))
        .args([
            "score",
            "--photo",
            &path("photos/camera.png"),
            "--image",
            &path("photos/camera.png"),
        ])
        .args(["--device", "cpu"])
        .env("SEFI_FACE_MODELS", &damaged)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the face detector's weights cannot be used"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&damaged).unwrap();
    // Nothing to compare with is a clear error.
    let o = common::sefi(&[
        "score",
        "--image",
        &path("photos/camera.png"),
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to compare with"));
}

/// A generated image's PNG carries its faces' likeness and its CLIP-T after the other
/// settings, and reads them back.
#[test]
fn scores_travel_in_the_png_parameters() {
    use sefi::pipeline::png::{Parameters, with_likeness};
    let text = with_likeness(
        "a photo of <alice>\nSteps: 20, Seed: 1".into(),
        &[("<alice>".into(), 0.9724), ("<bob>".into(), 0.5)],
    );
    assert_eq!(
        text,
        "a photo of <alice>\nSteps: 20, Seed: 1, Likeness: <alice> 0.972; <bob> 0.500"
    );
    let parsed = Parameters::parse(&text);
    assert_eq!(parsed.prompt, "a photo of <alice>");
    assert_eq!(
        parsed.settings.last().unwrap(),
        &(
            "Likeness".to_string(),
            "<alice> 0.972; <bob> 0.500".to_string()
        )
    );
    // No scored face, no entry.
    assert_eq!(
        with_likeness("p\nSteps: 20, Seed: 1".into(), &[]),
        "p\nSteps: 20, Seed: 1"
    );
    // Prompt fidelity comes last, where a CLIP model scored the image.
    let text = sefi::pipeline::png::with_clip_t(text, Some(0.31234));
    assert!(text.ends_with("<bob> 0.500, CLIP-T: 0.312"), "{text}");
    let parsed = Parameters::parse(&text);
    assert_eq!(
        parsed.settings.last().unwrap(),
        &("CLIP-T".to_string(), "0.312".to_string())
    );
    assert_eq!(
        sefi::pipeline::png::with_clip_t("p\nSteps: 20".into(), None),
        "p\nSteps: 20"
    );
}
