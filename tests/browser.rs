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

/// A future given up after `polls` polls: a tab that dies at that point of its work. Each poll
/// after the first follows one browser operation's completion, so `polls = 0, 1, 2, ...` cuts
/// the work between each pair of its operations in turn.
struct Cut<F: std::future::Future> {
    inner: std::pin::Pin<Box<F>>,
    polls: usize,
}

impl<F: std::future::Future> std::future::Future for Cut<F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.polls == 0 {
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        self.inner.as_mut().poll(cx).map(Some)
    }
}

/// Runs `work(n)` cut after `n` = 0, 1, 2, ... polls until it runs to its end, calling
/// `check(n)` after each cut (and after the whole run); `setup(n)` makes the state before each
/// attempt. Each attempt should keep to its own folder: a cut leaves the browser's handles of
/// its files open (a closed tab's are discarded), which would stop the next attempt from
/// writing them. Returns the last `n`.
async fn cut_everywhere<W, F, S, SF, C, CF>(mut setup: S, mut work: W, mut check: C) -> usize
where
    S: FnMut(usize) -> SF,
    SF: std::future::Future<Output = ()>,
    W: FnMut(usize) -> F,
    F: std::future::Future,
    C: FnMut(usize) -> CF,
    CF: std::future::Future<Output = ()>,
{
    for polls in 0.. {
        setup(polls).await;
        let done = Cut {
            inner: Box::pin(work(polls)),
            polls,
        }
        .await
        .is_some();
        check(polls).await;
        if done {
            return polls;
        }
    }
    unreachable!()
}

async fn sleep(ms: i32) {
    use wasm_bindgen::{JsCast, JsValue};
    let p = js_sys::Promise::new(&mut |resolve, _| {
        let set = js_sys::Reflect::get(&js_sys::global(), &"setTimeout".into()).unwrap();
        set.unchecked_ref::<js_sys::Function>()
            .call2(&JsValue::NULL, &resolve, &ms.into())
            .unwrap();
    });
    wasm_bindgen_futures::JsFuture::from(p).await.unwrap();
}

/// A checkpoint as the trainer writes it: an identity file whose metadata counts its steps.
fn checkpoint(steps: usize) -> Vec<u8> {
    use sefi::identity::{Fingerprint, Identity};
    use sefi::weights::Family;
    Identity {
        token: "alice".into(),
        class_word: "person".into(),
        stages: 5,
        family: Family::Sd1,
        dim: 4,
        key: vec![steps as f32; 20],
        value: vec![-(steps as f32); 20],
        fingerprint: Fingerprint {
            vocab: 49408,
            dim: 4,
            widths: Vec::new(),
            samples: vec![0.25; 3],
        },
        training: serde_json::json!({ "steps_done": steps }),
        faces: Vec::new(),
    }
    .to_bytes()
    .unwrap()
}

/// Every file of the stored training run is written whole, so a tab that dies at any moment
/// of starting a run, storing a checkpoint or finishing leaves a run that continues from a
/// checkpoint that loads, or (when finished) the identity, and never a half-written file.
#[wasm_bindgen_test]
async fn a_training_run_cut_at_any_moment_continues_from_a_checkpoint_that_loads() {
    use sefi::app::run::Run;
    use sefi::app::view::RunRecord;
    use sefi::identity::settings::TrainConfig;
    use sefi::store::{Store, UNFINISHED};

    let store = Store::open().await.expect("OPFS in the test browser");
    let s = &store;
    let record = &RunRecord {
        config: TrainConfig::new("alice", "person", 64),
        model_id: "m".into(),
        model_name: "tiny".into(),
        photos: 2,
        step: 0,
    };
    let earlier = &RunRecord {
        photos: 1,
        ..record.clone()
    };
    let photos = &vec![b"photo 0".to_vec(), b"photo 1".to_vec()];
    let (old, new) = (&checkpoint(10), &checkpoint(20));
    let run = |case: &str, n: usize| Run::at(s, &format!("tests/cut/{case}-{n}/run"));
    // Settles what a cut left running in the browser (an operation already started).
    let settle = || sleep(20);
    let no_unfinished = |names: Vec<String>| {
        assert!(
            names.iter().all(|n| !n.ends_with(UNFINISHED)),
            "an unfinished file is listed: {names:?}"
        )
    };

    // Starting a run over an old one: the old run whole, no run, or the whole new one (all
    // photos, step 0).
    let points = cut_everywhere(
        |n| async move {
            let r = run("begin", n);
            r.begin(earlier, &photos[..1]).await.unwrap();
            r.save_checkpoint(10, old).await.unwrap();
        },
        |n| async move { run("begin", n).begin(record, photos).await },
        |n| async move {
            settle().await;
            match run("begin", n).load().await.unwrap() {
                None => {}
                Some(stored) if stored.record.photos == 1 => {
                    assert_eq!(stored.photos, photos[..1], "cut at {n}");
                    assert_eq!(stored.checkpoint.as_ref(), Some(old), "cut at {n}");
                    assert_eq!(stored.record.step, 10, "cut at {n}");
                }
                Some(stored) => {
                    assert_eq!(&stored.photos, photos, "cut at {n}");
                    assert_eq!(
                        (stored.checkpoint, stored.record.step),
                        (None, 0),
                        "cut at {n}"
                    );
                }
            }
            no_unfinished(s.list(&format!("tests/cut/begin-{n}/run")).await.unwrap());
        },
    )
    .await;
    assert!(points >= 4, "starting a run took only {points} operations");
    console_log!("starting a run: cut at each of {} points", points + 1);

    // Storing a checkpoint over the last one: the old or the new, each with its own step.
    let points = cut_everywhere(
        |n| async move {
            let r = run("again", n);
            r.begin(record, photos).await.unwrap();
            r.save_checkpoint(10, old).await.unwrap();
        },
        |n| async move { run("again", n).save_checkpoint(20, new).await },
        |n| async move {
            settle().await;
            let stored = run("again", n).load().await.unwrap().expect("the run");
            let cp = stored.checkpoint.expect("a checkpoint");
            assert!(
                cp == *old || cp == *new,
                "cut at {n}: a checkpoint of {} bytes",
                cp.len()
            );
            let steps = if cp == *old { 10 } else { 20 };
            assert_eq!(stored.record.step, steps, "cut at {n}");
            assert_eq!(&stored.photos, photos);
            no_unfinished(s.list(&format!("tests/cut/again-{n}/run")).await.unwrap());
        },
    )
    .await;
    assert!(
        points >= 4,
        "storing a checkpoint took only {points} operations"
    );
    console_log!("storing a checkpoint: cut at each of {} points", points + 1);

    // The first checkpoint of a run: none (the run starts again) or the whole one.
    let points = cut_everywhere(
        |n| async move { run("first", n).begin(record, photos).await.unwrap() },
        |n| async move { run("first", n).save_checkpoint(20, new).await },
        |n| async move {
            settle().await;
            let stored = run("first", n).load().await.unwrap().expect("the run");
            match stored.checkpoint {
                None => assert_eq!(stored.record.step, 0, "cut at {n}"),
                Some(cp) => {
                    assert_eq!(cp, *new, "cut at {n}");
                    assert_eq!(stored.record.step, 20, "cut at {n}");
                }
            }
        },
    )
    .await;
    console_log!("the first checkpoint: cut at each of {} points", points + 1);

    // Finishing: the identity is stored before the run goes, so one of them is always there.
    let identity = |n: usize| format!("tests/cut/done-{n}/identities/alice.safetensors");
    let points = cut_everywhere(
        |n| async move {
            let r = run("done", n);
            r.begin(record, photos).await.unwrap();
            r.save_checkpoint(20, new).await.unwrap();
        },
        |n| async move {
            s.write(&identity(n), new).await?;
            run("done", n).remove().await
        },
        |n| async move {
            settle().await;
            let stored = s.size(&identity(n)).await.unwrap();
            let left = run("done", n).load().await.unwrap();
            assert!(stored.is_some() || left.is_some(), "cut at {n}: both gone");
            if stored.is_some() {
                assert_eq!(s.read(&identity(n)).await.unwrap(), *new, "cut at {n}");
            }
            no_unfinished(
                s.list(&format!("tests/cut/done-{n}/identities"))
                    .await
                    .unwrap(),
            );
        },
    )
    .await;
    console_log!("finishing: cut at each of {} points", points + 1);
    // Files that cuts left open cannot be removed until the browser collects their handles.
    let _ = s.remove("tests/cut").await;
}

/// The face test photos with MediaPipe's detections of each (`tests/fixtures/face`).
const FACE_PHOTOS: [(&str, &[u8]); 7] = [
    ("astronaut", include_bytes!("fixtures/photos/astronaut.png")),
    (
        "astronaut-256",
        include_bytes!("fixtures/photos/astronaut-256.png"),
    ),
    (
        "astronaut-small",
        include_bytes!("fixtures/photos/astronaut-small.png"),
    ),
    (
        "astronaut-rotated",
        include_bytes!("fixtures/photos/astronaut-rotated.png"),
    ),
    ("camera", include_bytes!("fixtures/photos/camera.png")),
    ("chelsea", include_bytes!("fixtures/photos/chelsea.png")),
    ("hopper", include_bytes!("fixtures/photos/hopper.png")),
];

fn tensor_f32(file: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    let view = file.tensor(name).unwrap();
    match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::U8 => view.data().iter().map(|&v| f32::from(v)).collect(),
        other => panic!("{name}: {other:?}"),
    }
}

fn max_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
}

/// The face models on the browser's WebGPU, from the bytes the site serves: every test photo's
/// faces where MediaPipe finds them (within a pixel, as natively), the recognition network's
/// descriptors as face-api's (1e-3), and how long a photo takes here.
#[wasm_bindgen_test]
async fn faces_are_found_and_described_on_webgpu_as_their_references() {
    use sefi::face::recognition::FaceRecognitionNet;
    use sefi::face::{FaceDetector, FaceRecognizer};
    use sefi::identity::train::decode_photo;
    use web_time::Instant;

    let device = DeviceChoice::Wgpu.open().await.unwrap().device;
    let detector = FaceDetector::from_safetensors(
        include_bytes!("../www/models/face_detection_short_range.safetensors"),
        &device,
    )
    .unwrap();
    let manifest = include_str!("../www/models/face_recognition_model-weights_manifest.json");
    let weights = include_bytes!("../www/models/face_recognition_model.bin");
    let json: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/face/detections.json")).unwrap();
    for (name, bytes) in FACE_PHOTOS {
        let faces = detector
            .detect(&decode_photo(bytes).unwrap())
            .await
            .unwrap();
        let want = json["cases"][name]["faces"].as_array().unwrap();
        assert_eq!(faces.len(), want.len(), "{name}: {faces:?}");
        for (face, want) in faces.iter().zip(want) {
            let want: Vec<f64> = want["box"]
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
            let got = face.bbox.iter().chain(face.keypoints.iter().flatten());
            let err = got
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
            console_log!("{name}: {err:.4} px from MediaPipe's");
            assert!(err < 1.0, "{name}: {err} px from MediaPipe's");
        }
    }

    let references = include_bytes!("fixtures/face/recognition.safetensors");
    let references = safetensors::SafeTensors::deserialize(references).unwrap();
    let net = FaceRecognitionNet::from_tfjs(manifest, weights, &device).unwrap();
    for name in ["astronaut-256", "hopper"] {
        let chip = tensor_f32(&references, &format!("{name}.chip"));
        let x = burn::tensor::Tensor::<4>::from_data(
            burn::tensor::TensorData::new(chip, [1, 150, 150, 3]),
            &device,
        );
        let got = sefi::nn::read_f32(net.forward(x)).await.unwrap();
        let err = max_error(
            &got,
            &tensor_f32(&references, &format!("{name}.descriptor")),
        );
        console_log!("{name}: descriptor within {err:.2e} of face-api's");
        assert!(err <= 1e-3, "{name}: descriptor off by {err}");
    }

    // The whole path on one photo (detect, cut, describe), as the gallery scores an image.
    let recognizer = FaceRecognizer::from_tfjs(manifest, weights, &device).unwrap();
    let photo = decode_photo(FACE_PHOTOS[1].1).unwrap();
    for run in 1..=3 {
        let started = Instant::now();
        let faces = detector.detect(&photo).await.unwrap();
        let described = recognizer.describe(&photo, &faces).await.unwrap();
        assert_eq!(described.len(), 1);
        console_log!(
            "a photo's faces found and described in the browser, run {run}: {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// The tiny CLIP model on the browser's WebGPU, read from its folder's bytes as the worker
/// reads a stored one: both towers' projected features as transformers' (2e-5, as natively).
#[wasm_bindgen_test]
async fn clip_scores_on_webgpu_as_transformers() {
    use sefi::clip::{ClipFolder, ClipModel, ClipParts, end_positions, ids_tensor};
    use sefi::weights::{MemorySource, TokenizerSource};

    let device = DeviceChoice::Wgpu.open().await.unwrap().device;
    let parts = ClipParts {
        config: include_str!("fixtures/clip/tiny-clip/config.json").into(),
        preprocessor: Some(include_str!("fixtures/clip/tiny-clip/preprocessor_config.json").into()),
        tokenizer: TokenizerSource::Texts {
            vocab: include_str!("fixtures/clip/tiny-clip/vocab.json").into(),
            merges: include_str!("fixtures/clip/tiny-clip/merges.txt").into(),
            pad_token: "<|endoftext|>".into(),
        },
        weights: vec![Box::new(MemorySource::new(
            "model.safetensors",
            include_bytes!("fixtures/clip/tiny-clip/model.safetensors").to_vec(),
        ))],
    };
    let folder = ClipFolder::open("tiny-clip", parts).await.unwrap();
    let model = ClipModel::load(&folder, &device, burn::tensor::DType::F32, &mut |_| {})
        .await
        .unwrap();
    let goldens = include_bytes!("fixtures/clip/goldens.safetensors");
    let goldens = safetensors::SafeTensors::deserialize(goldens).unwrap();
    let view = goldens.tensor("tiny-clip.pixel_values").unwrap();
    let shape: [usize; 4] = view.shape().try_into().unwrap();
    let pixels = burn::tensor::Tensor::<4>::from_data(
        burn::tensor::TensorData::new(tensor_f32(&goldens, "tiny-clip.pixel_values"), shape),
        &device,
    );
    let image = sefi::nn::read_f32(model.image_embeds(pixels))
        .await
        .unwrap();
    let err = max_error(&image, &tensor_f32(&goldens, "tiny-clip.image_embeds"));
    console_log!("image_embeds within {err:.2e} of transformers'");
    assert!(err <= 2e-5, "image_embeds off by {err}");

    let ids = goldens.tensor("tiny-clip.input_ids").unwrap();
    let len = ids.shape()[1];
    let rows: Vec<Vec<u32>> = ids
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
        .collect::<Vec<_>>()
        .chunks(len)
        .map(<[u32]>::to_vec)
        .collect();
    let flat: Vec<u32> = rows.concat();
    let text = model.text_embeds(
        ids_tensor(&flat, rows.len(), &device),
        end_positions(&rows, &device),
    );
    let text = sefi::nn::read_f32(text).await.unwrap();
    let err = max_error(&text, &tensor_f32(&goldens, "tiny-clip.text_embeds"));
    console_log!("text_embeds within {err:.2e} of transformers'");
    assert!(err <= 2e-5, "text_embeds off by {err}");
}
