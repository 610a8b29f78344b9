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
