//! SeFi identities: the loss and its gradients against PyTorch, stage routing, the attention
//! term, training, resuming, identity files, and the `sefi train` / `generate --identity` flow.
#![cfg(not(target_family = "wasm"))]

mod common;
use common::{fixture, load_model, load_model_in, sefi, sefi_ok};

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

use burn::tensor::{DType, Device, Tensor};
use sefi::block_on;
use sefi::identity::condition::fingerprint;
use sefi::identity::train::{
    Draw, Photo, StepReport, Term, TrainConfig, TrainError, TrainState, Trainer, decode_photo,
};
use sefi::identity::{Identity, IdentityError, stage_of};
use sefi::pipeline::{self, GenerateRequest, GivenNoise};
use sefi::schedule::Sampler;
use sefi::sd::StableDiffusion;
use sefi::weights::{Checkpoint, Family};

fn astronaut() -> Photo {
    let bytes = std::fs::read(fixture("photos/astronaut.png")).unwrap();
    Photo {
        image: decode_photo(&bytes).unwrap(),
        crop: None,
    }
}

fn scalar(t: Tensor<1>) -> f64 {
    block_on(pipeline::read_f32(t)).unwrap()[0] as f64
}

#[test]
fn stages_split_the_timesteps_evenly() {
    assert_eq!(stage_of(0.0, 5, 1000), 0);
    assert_eq!(stage_of(199.0, 5, 1000), 0);
    assert_eq!(stage_of(200.0, 5, 1000), 1);
    assert_eq!(stage_of(999.0, 5, 1000), 4);
    assert_eq!(stage_of(500.0, 1, 1000), 0);
    assert_eq!(stage_of(957.375, 10, 1000), 9);
}

/// An identity with distinct random vectors per stage.
fn random_identity(sd: &StableDiffusion, token: &str, seed: u64) -> Identity {
    let fp = block_on(fingerprint(sd)).unwrap();
    let d = fp.dim;
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    Identity {
        token: token.into(),
        class_word: "person".into(),
        stages: 5,
        family: sd.family.base(),
        dim: d,
        key: (0..5 * d).map(|_| next()).collect(),
        value: (0..5 * d).map(|_| next()).collect(),
        fingerprint: fp,
        training: serde_json::Value::Null,
        faces: Vec::new(),
    }
}

#[test]
fn each_timestep_uses_its_stages_vectors() {
    let device = Device::flex();
    let (_, sd) = load_model("tiny-sd1", &device);
    // Two Euler steps at t = 999 and 0 (SD's own scheduler config: linspace spacing): stages
    // 4 and 0 only.
    let scheduler =
        sefi::schedule::SchedulerConfig::for_prediction(sefi::config::Prediction::Epsilon);
    assert_eq!(
        sefi::schedule::Plan::new(Sampler::Euler, &scheduler, 2)
            .unwrap()
            .timesteps,
        [999.0, 0.0]
    );
    let req = GenerateRequest {
        prompt: "a photo of <x>".into(),
        steps: 2,
        sampler: Sampler::Euler,
        width: 64,
        height: 64,
        seed: 5,
        ..Default::default()
    };
    let run = |id: &Identity| {
        let g = common::generate(
            &sd,
            &scheduler,
            &req,
            std::slice::from_ref(id),
            &GivenNoise::default(),
            &device,
        )
        .unwrap();
        block_on(pipeline::read_f32(g.latents)).unwrap()
    };
    let a = random_identity(&sd, "x", 1);
    let base = run(&a);
    let d = a.dim;
    // Stages 1-3 are never used...
    let mut other = a.clone();
    for i in d..4 * d {
        other.key[i] += 1.0;
        other.value[i] -= 1.0;
    }
    // (The CPU backend's threaded sums may differ in the last bits between runs.)
    assert!(
        max_diff(&run(&other), &base) < 1e-5,
        "stages 1-3 must not be used at t = 999 and 0"
    );
    // ...the key and the value of stages 4 and 0 each are.
    for (stage, is_key) in [(4, true), (4, false), (0, true), (0, false)] {
        let mut changed = a.clone();
        let v = if is_key {
            &mut changed.key
        } else {
            &mut changed.value
        };
        v[stage * d..(stage + 1) * d]
            .iter_mut()
            .for_each(|x| *x *= -3.0);
        let effect = max_diff(&run(&changed), &base);
        assert!(
            effect > 1e-4,
            "stage {stage}'s {} must be used ({effect})",
            if is_key { "key" } else { "value" }
        );
    }
}

#[test]
fn two_identities_in_one_prompt_each_get_their_vectors() {
    let device = Device::flex();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let (a, b) = (random_identity(&sd, "a", 1), random_identity(&sd, "b", 2));
    let req = GenerateRequest {
        prompt: "a photo of <a> and <b>".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let run = |ids: &[Identity]| {
        let g = common::generate(
            &sd,
            &ckpt.scheduler,
            &req,
            ids,
            &GivenNoise::default(),
            &device,
        )
        .unwrap();
        block_on(pipeline::read_f32(g.latents)).unwrap()
    };
    let ab = run(&[a.clone(), b.clone()]);
    assert_eq!(
        ab,
        run(&[b.clone(), a.clone()]),
        "identities are found by name, not order"
    );
    let mut b2 = b.clone();
    b2.key.iter_mut().for_each(|x| *x = -*x);
    assert!(
        max_diff(&ab, &run(&[a.clone(), b2])) > 1e-3,
        "<b>'s vectors are used"
    );
    let err = common::generate(
        &sd,
        &ckpt.scheduler,
        &req,
        &[a],
        &GivenNoise::default(),
        &device,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("<b>") && err.to_string().contains("loaded: <a>"),
        "{err}"
    );
}

#[test]
fn identity_files_round_trip_and_refuse_other_models() {
    let device = Device::flex();
    let (_, sd1) = load_model("tiny-sd1", &device);
    let (_, sd2) = load_model("tiny-sd2", &device);
    let id = random_identity(&sd1, "alice", 3);
    let bytes = id.to_bytes().unwrap();
    let back = block_on(Identity::from_bytes("alice.safetensors", bytes)).unwrap();
    assert_eq!(back, id);
    let fp1 = block_on(fingerprint(&sd1)).unwrap();
    assert!(back.check_model(Family::Sd1, &fp1).is_ok());
    let fp2 = block_on(fingerprint(&sd2)).unwrap();
    let err = back.check_model(Family::Sd2V, &fp2).unwrap_err();
    assert!(matches!(err, IdentityError::WrongFamily { .. }), "{err:?}");
    assert!(
        err.to_string().contains("learned on a sd1 model") && err.to_string().contains("sd2-v"),
        "{err}"
    );
    // Same family, other weights.
    let mut other = fp1.clone();
    other.samples[0] += 0.5;
    assert!(matches!(
        back.check_model(Family::Sd1, &other),
        Err(IdentityError::OtherModel { .. })
    ));
    // Not an identity file at all.
    let model = std::fs::read(fixture(
        "sd/tiny-sd1/vae/diffusion_pytorch_model.safetensors",
    ))
    .unwrap();
    let err = block_on(Identity::from_bytes("vae.safetensors", model)).unwrap_err();
    assert!(matches!(err, IdentityError::NotIdentity { .. }), "{err:?}");
}

/// A trainer on the astronaut photo with `config`.
fn astronaut_trainer<'a>(
    ckpt: &Checkpoint,
    sd: &'a StableDiffusion,
    config: TrainConfig,
    device: &Device,
) -> Trainer<'a> {
    block_on(Trainer::new(
        sd,
        &ckpt.scheduler,
        &[astronaut()],
        config,
        device,
    ))
    .unwrap()
}

fn trainer_config(steps: usize) -> TrainConfig {
    let mut c = TrainConfig::new("alice", "person", 64);
    c.steps = steps;
    c.seed = 11;
    c
}

/// A name that prompts could never refer to is refused before training, saying what a name
/// may be (it used to train an identity that no `<name>` found).
#[test]
fn names_that_prompts_cannot_hold_are_refused() {
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model_in("tiny-sd1", &device, DType::F32);
    for token in ["élise", "-bob", "two words"] {
        let mut config = trainer_config(1);
        config.token = token.into();
        let err = block_on(Trainer::new(
            &sd,
            &ckpt.scheduler,
            &[astronaut()],
            config,
            &device,
        ))
        .err()
        .unwrap_or_else(|| panic!("`{token}` was accepted"));
        assert!(
            matches!(&err, TrainError::Token(t) if t == token)
                && err.to_string().contains("letters a-z"),
            "{err:?}"
        );
    }
}

/// Three training steps on the tiny SD 1 model with its weights in `dtype`: the state before and
/// after, and the step reports.
fn three_steps(device: Device, dtype: DType) -> (TrainState, TrainState, Vec<StepReport>) {
    let (ckpt, sd) = load_model_in("tiny-sd1", &device, dtype);
    let trainer = astronaut_trainer(&ckpt, &sd, trainer_config(3), &device);
    let start = trainer.initial_state();
    let mut state = start.clone();
    let reports = (0..3)
        .map(|_| block_on(trainer.step(&mut state)).unwrap())
        .collect();
    (start, state, reports)
}

#[test]
fn the_attention_term_is_zero_at_the_class_word_and_pulls_back() {
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let trainer = astronaut_trainer(&ckpt, &sd, trainer_config(1), &device);
    let start = trainer.initial_state();
    let noise: Vec<f32> = (0..4 * 8 * 8).map(|i| ((i as f32) * 0.37).sin()).collect();
    let at_start = scalar(trainer.evaluate(&start, 500, &noise).attention);
    assert!(
        at_start.abs() < 1e-12,
        "attention loss at the class word: {at_start}"
    );
    // Pushed away, it grows...
    let mut pushed = start.clone();
    for (i, x) in pushed.key.iter_mut().enumerate() {
        *x += 0.3 * ((i as f32) * 1.3).cos();
    }
    let loss = trainer.evaluate(&pushed, 500, &noise);
    let away = scalar(loss.attention.clone());
    assert!(
        away > 1e-8,
        "attention loss away from the class word: {away}"
    );
    // ...and its gradient points away from the class word, so descending it pulls back.
    let draw = Draw {
        photo: 0,
        flip: 0,
        timestep: 500,
        noise: noise.clone(),
    };
    let g = block_on(trainer.gradients(&pushed, &draw, Term::Attention)).unwrap();
    assert!((g.attn_loss - away).abs() < 1e-9 * (1.0 + away));
    let d = trainer.dim();
    let rows = g.stage * d..(g.stage + 1) * d;
    let offset: Vec<f32> = rows.clone().map(|i| pushed.key[i] - start.key[i]).collect();
    let dot: f32 = g.key.iter().zip(&offset).map(|(a, b)| a * b).sum();
    assert!(
        dot > 0.0,
        "the gradient points away from the class word ({dot})"
    );
    let norm = g.key.iter().map(|x| x * x).sum::<f32>().sqrt();
    let mut back = pushed.clone();
    for (i, r) in rows.enumerate() {
        back.key[r] -= 0.05 * g.key[i] / norm;
    }
    let after = scalar(trainer.evaluate(&back, 500, &noise).attention);
    assert!(
        after < away,
        "one step down the gradient lowers it: {after} vs {away}"
    );
}

#[test]
fn resuming_reproduces_the_uninterrupted_run() {
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let trainer = astronaut_trainer(&ckpt, &sd, trainer_config(6), &device);
    let mut straight = trainer.initial_state();
    for _ in 0..6 {
        block_on(trainer.step(&mut straight)).unwrap();
    }
    let mut first = trainer.initial_state();
    for _ in 0..3 {
        block_on(trainer.step(&mut first)).unwrap();
    }
    let saved = trainer.checkpoint(&first).unwrap();
    let restored = block_on(Identity::from_bytes("ckpt", saved)).unwrap();
    let mut resumed: TrainState = trainer.resume_state(&restored).unwrap();
    assert_eq!(resumed, first);
    for _ in 0..3 {
        block_on(trainer.step(&mut resumed)).unwrap();
    }
    assert_eq!(resumed, straight);
    assert_ne!(
        straight.key,
        trainer.initial_state().key,
        "training moved the vectors"
    );
}

/// The run driver the CLI and the browser share: events in order, a pause that hands back a
/// checkpoint, and a resumed run that ends where the uninterrupted one does.
#[test]
fn a_paused_run_resumes_to_the_same_identity() {
    use sefi::identity::session::{self, Due, Finished, Schedule, Stop, TrainEvent};
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let trainer = astronaut_trainer(&ckpt, &sd, trainer_config(4), &device);
    let schedule = Schedule {
        checkpoint: Due {
            every: 1,
            ..Due::default()
        },
        maps: Due {
            every: 2,
            last_step: true,
            ..Due::default()
        },
        maps_before_training: true,
        read_every: std::time::Duration::ZERO,
    };
    let run = |state: &mut TrainState, pause_before: usize, events: &mut Vec<String>| {
        let mut asked = 0;
        let mut stop = || {
            asked += 1;
            (asked == pause_before).then_some(Stop::Pause)
        };
        block_on(session::run(
            &trainer,
            state,
            &schedule,
            None,
            &mut stop,
            &mut |e| -> Result<(), Box<dyn std::error::Error>> {
                events.push(match e {
                    TrainEvent::Step(r) => format!("step {}", r.step),
                    TrainEvent::Checkpoint { step, .. } => format!("checkpoint {step}"),
                    TrainEvent::Maps { step, maps, .. } => {
                        assert_eq!((maps.width, maps.height), (16, 8));
                        format!("maps {step}")
                    }
                    TrainEvent::Preview { step, .. } => format!("preview {step}"),
                    TrainEvent::PreviewStep { step, .. } => format!("preview step {step}"),
                });
                Ok(())
            },
        ))
        .unwrap()
    };

    let mut straight = trainer.initial_state();
    let mut events = Vec::new();
    let Finished::Done(whole) = run(&mut straight, 0, &mut events) else {
        panic!("nothing stopped it")
    };
    assert_eq!(
        events,
        [
            "maps 0",
            "step 1",
            "checkpoint 1",
            "step 2",
            "checkpoint 2",
            "maps 2",
            "step 3",
            "checkpoint 3",
            "step 4",
            "maps 4"
        ]
    );

    let mut first = trainer.initial_state();
    let mut events = Vec::new();
    let Finished::Stopped {
        step: 2,
        checkpoint: Some(bytes),
    } = run(&mut first, 3, &mut events)
    else {
        panic!("paused after two steps")
    };
    assert_eq!(events.last().unwrap(), "maps 2");
    let restored = block_on(Identity::from_bytes("checkpoint", bytes)).unwrap();
    let mut resumed = trainer.resume_state(&restored).unwrap();
    let Finished::Done(identity) = run(&mut resumed, 0, &mut Vec::new()) else {
        panic!("nothing stopped it")
    };
    assert_eq!(resumed, straight);
    assert_eq!((&identity.key, &identity.value), (&whole.key, &whole.value));
}

/// Several steps a readback: the vectors and AdamW's moments stay on the device, and the
/// result is the same as one step a readback.
#[test]
fn steps_in_one_readback_train_as_single_steps() {
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let trainer = astronaut_trainer(&ckpt, &sd, trainer_config(5), &device);
    let before = sefi::nn::readbacks();
    let mut single = trainer.initial_state();
    let single_reports: Vec<StepReport> = (0..5)
        .map(|_| block_on(trainer.step(&mut single)).unwrap())
        .collect();
    assert_eq!(sefi::nn::readbacks() - before, 5);
    let before = sefi::nn::readbacks();
    let mut batched = trainer.initial_state();
    let batched_reports = block_on(trainer.steps(&mut batched, 5)).unwrap();
    assert_eq!(
        sefi::nn::readbacks() - before,
        1,
        "one readback for five steps"
    );
    assert_eq!(batched, single);
    let numbers = |r: &StepReport| {
        (
            r.step,
            r.timestep,
            r.stage,
            r.loss,
            r.noise_loss,
            r.attn_loss,
        )
    };
    assert_eq!(
        batched_reports.iter().map(numbers).collect::<Vec<_>>(),
        single_reports.iter().map(numbers).collect::<Vec<_>>()
    );
    // The five draws hit more than one stage, so the batch carried several stages' rows.
    let stages: std::collections::BTreeSet<_> = batched_reports.iter().map(|r| r.stage).collect();
    assert!(stages.len() > 1, "{stages:?}");
}

/// A run reads back once a batch: the first step alone (to time it), then as many steps as
/// fit in `read_every`, at most 16, up to the next event due.
#[test]
fn a_run_reads_back_once_a_batch() {
    use sefi::identity::session::{self, Due, Finished, Schedule, TrainEvent};
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let trainer = astronaut_trainer(&ckpt, &sd, trainer_config(40), &device);
    let schedule = Schedule {
        checkpoint: Due {
            every: 30,
            ..Due::default()
        },
        read_every: std::time::Duration::from_secs(3600),
        ..Schedule::default()
    };
    let before = sefi::nn::readbacks();
    let mut events = Vec::new();
    let mut state = trainer.initial_state();
    let finished = block_on(session::run(
        &trainer,
        &mut state,
        &schedule,
        None,
        &mut || None,
        &mut |e| -> Result<(), Box<dyn std::error::Error>> {
            events.push(match e {
                TrainEvent::Step(r) => format!("step {}", r.step),
                TrainEvent::Checkpoint { step, .. } => format!("checkpoint {step}"),
                TrainEvent::Maps { step, .. } => format!("maps {step}"),
                TrainEvent::Preview { step, .. } => format!("preview {step}"),
                TrainEvent::PreviewStep { step, .. } => format!("preview step {step}"),
            });
            Ok(())
        },
    ))
    .unwrap();
    assert!(matches!(finished, Finished::Done(_)));
    // Batches of 1, 16, 13 (to the checkpoint at 30) and 10.
    assert_eq!(sefi::nn::readbacks() - before, 4);
    let steps = events.iter().filter(|e| e.starts_with("step")).count();
    assert_eq!(steps, 40);
    assert_eq!(events[30], "checkpoint 30");
}

/// An f16 loss scale that overflows ends a batch at that step, which is redone alone at lower
/// scales; the run goes on as it would one step a readback.
#[test]
fn an_overflowing_loss_scale_ends_the_batch_and_is_lowered() {
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model_in("tiny-sd1", &device, DType::F16);
    let trainer = || {
        astronaut_trainer(&ckpt, &sd, trainer_config(4), &device)
            // Far beyond f16's range: the first backward pass overflows.
            .with_loss_scale(2f32.powi(24))
    };
    let single_trainer = trainer();
    let mut single = single_trainer.initial_state();
    for _ in 0..4 {
        block_on(single_trainer.step(&mut single)).unwrap();
    }
    let batched_trainer = trainer();
    let mut batched = batched_trainer.initial_state();
    let first = block_on(batched_trainer.steps(&mut batched, 4)).unwrap();
    assert_eq!(
        first.len(),
        1,
        "the overflow ends the batch at its first step"
    );
    // Later steps may overflow the scale found for the first again: ask until all are done.
    while batched.step < 4 {
        let left = 4 - batched.step;
        let reports = block_on(batched_trainer.steps(&mut batched, left)).unwrap();
        assert!(!reports.is_empty());
    }
    assert_eq!(batched, single);
    assert!(
        batched
            .key
            .iter()
            .chain(&batched.value)
            .all(|x| x.is_finite())
    );
}

#[test]
fn training_lowers_the_noise_loss_on_fixed_draws() {
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let mut config = trainer_config(200);
    config.lr = 2e-2;
    let trainer = astronaut_trainer(&ckpt, &sd, config, &device);
    // The per-step loss is too noisy to show progress: measure on fixed (timestep, noise) pairs.
    let fixed: Vec<Draw> = (0..16)
        .map(|i| Draw {
            photo: 0,
            flip: 0,
            ..trainer.draw(100_000 + i)
        })
        .collect();
    let measure = |state: &TrainState| {
        fixed
            .iter()
            .map(|d| scalar(trainer.evaluate(state, d.timestep, &d.noise).noise))
            .sum::<f64>()
            / fixed.len() as f64
    };
    let mut state = trainer.initial_state();
    let before = measure(&state);
    for _ in 0..200 {
        block_on(trainer.step(&mut state)).unwrap();
    }
    let after = measure(&state);
    eprintln!("noise loss on fixed draws: {before:.6} -> {after:.6}");
    assert!(
        after < before,
        "training should lower the noise loss: {before} -> {after}"
    );
}

#[test]
fn training_on_wgpu_agrees_with_the_cpu() {
    let gpu = block_on(sefi::device::DeviceChoice::Wgpu.open())
        .expect("no wgpu adapter: run ./scripts/setup.sh test");
    let (_, cpu, cpu_reports) = three_steps(Device::flex().autodiff(), DType::F32);
    // Checkpointed, as the page trains.
    let checkpointed = gpu.device.autodiff().gradient_checkpointing();
    let (_, wgpu, wgpu_reports) = three_steps(checkpointed, DType::F32);
    for (a, b) in cpu_reports.iter().zip(&wgpu_reports) {
        assert_eq!((a.timestep, a.stage), (b.timestep, b.stage));
        assert!(
            (a.loss - b.loss).abs() <= 1e-3 * a.loss.abs().max(1e-3),
            "loss {} vs {}",
            a.loss,
            b.loss
        );
    }
    let scale = cpu.key.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        max_diff(&cpu.key, &wgpu.key) <= 1e-3 * scale,
        "keys differ by {}",
        max_diff(&cpu.key, &wgpu.key)
    );
    assert!(max_diff(&cpu.value, &wgpu.value) <= 1e-3 * scale);
}

#[test]
fn half_precision_weights_train_like_f32() {
    let run = |device: Device, dtype: DType| {
        let (start, state, reports) = three_steps(device, dtype);
        // What training changed: AdamW moves every component by about the learning rate, so
        // compare the displacements' directions.
        let moved: Vec<f32> = state
            .key
            .iter()
            .chain(&state.value)
            .zip(start.key.iter().chain(&start.value))
            .map(|(a, b)| a - b)
            .collect();
        (moved, reports)
    };
    let (reference, reference_reports) = run(Device::flex().autodiff(), DType::F32);
    let mut runs = vec![("cpu F16", Device::flex().autodiff())];
    let gpu = block_on(sefi::device::DeviceChoice::Wgpu.open()).expect("no wgpu adapter");
    if gpu.info.f16 {
        runs.push(("wgpu F16", gpu.device.autodiff()));
    }
    for (what, device) in runs {
        let (moved, reports) = run(device, DType::F16);
        for (a, b) in reference_reports.iter().zip(&reports) {
            assert_eq!((a.timestep, a.stage), (b.timestep, b.stage));
            assert!(
                (a.loss - b.loss).abs() <= 1e-2 * a.loss.abs(),
                "{what}: loss {} vs F32 {}",
                b.loss,
                a.loss
            );
        }
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        let cos =
            dot(&moved, &reference) / (dot(&moved, &moved) * dot(&reference, &reference)).sqrt();
        eprintln!("{what}: updates' cosine with F32's {cos}");
        assert!(
            cos > 0.95,
            "{what}: the vectors moved elsewhere than in F32 ({cos})"
        );
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_training() {
    let (_, plain, _) = three_steps(Device::flex().autodiff(), DType::F32);
    let (_, checkpointed, _) = three_steps(
        Device::flex().autodiff().gradient_checkpointing(),
        DType::F32,
    );
    assert!(max_diff(&plain.key, &checkpointed.key) < 1e-5);
    assert!(max_diff(&plain.value, &checkpointed.value) < 1e-5);
}

#[test]
fn train_then_generate_with_two_identities() {
    let dir = std::env::temp_dir().join(format!("sefi-identity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = fixture("sd/tiny-sd1").display().to_string();
    let photo = fixture("photos/astronaut.png").display().to_string();
    let out = |n: &str| dir.join(n).display().to_string();
    let log = out("alice.jsonl");
    sefi_ok(&[
        "train",
        "--model",
        &model,
        "--image",
        &photo,
        "--token",
        "alice",
        "--steps",
        "4",
        "--save-every",
        "2",
        "--device",
        "cpu",
        "--log-json",
        &log,
        "--attention-maps",
        &out("maps"),
        "--previews",
        &out("previews"),
        "--out",
        &out("alice.safetensors"),
    ]);
    let (lines, previews): (Vec<serde_json::Value>, _) = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .partition(|l| l.get("preview").is_none());
    assert_eq!(lines.len(), 4);
    // A preview every --save-every steps, unscored: the tiny model draws no face.
    assert_eq!(previews.len(), 2);
    for (p, step) in previews.iter().zip([2, 4]) {
        assert_eq!(p["step"], step);
        assert_eq!(p["likeness"], serde_json::Value::Null);
        assert!(std::path::Path::new(p["preview"].as_str().unwrap()).exists());
    }
    for key in [
        "step",
        "loss",
        "noise_loss",
        "attn_loss",
        "timestep",
        "stage",
    ] {
        assert!(
            lines.iter().all(|l| l.get(key).is_some()),
            "{key} in every log line"
        );
    }
    assert!(dir.join("alice.checkpoint.safetensors").exists());
    for step in ["step-000002.png", "step-000004.png"] {
        let file = std::fs::File::open(dir.join("maps").join(step)).unwrap();
        let info = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap()
            .info()
            .clone();
        assert_eq!(
            (info.width, info.height),
            (16, 8),
            "two 8x8 maps side by side"
        );
    }
    sefi_ok(&[
        "train",
        "--model",
        &model,
        "--image",
        &photo,
        "--token",
        "rex",
        "--class-word",
        "dog",
        "--crop",
        "10,10,100",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "f16",
        "--out",
        &out("rex.safetensors"),
    ]);
    let generated = sefi_ok(&[
        "generate",
        "--model",
        &model,
        "--identity",
        &out("alice.safetensors"),
        "--identity",
        &out("rex.safetensors"),
        "--prompt",
        "a photo of <alice> holding <rex> in front of the eiffel tower",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--dtype",
        "f16",
        "--out",
        &out("both.png"),
        "--json",
    ]);
    assert!(dir.join("both.png").exists());
    // With --json, each image's file, seed and face scores (the tiny model draws noise: no
    // face to score, but both identities keep their photo's face).
    let generated: serde_json::Value = serde_json::from_slice(&generated.stdout).unwrap();
    let image = &generated["images"][0];
    assert_eq!(image["file"], out("both.png"));
    assert!(
        image["seed"].is_u64() && image["faces"].is_array(),
        "{generated}"
    );
    // The identity keeps its photo's face, and images are scored against it.
    let alice = block_on(Identity::from_bytes(
        "alice",
        std::fs::read(out("alice.safetensors")).unwrap(),
    ))
    .unwrap();
    assert_eq!(alice.faces.len(), 1);
    assert_eq!(alice.faces[0].len(), 128);
    let scored = sefi_ok(&[
        "score",
        "--identity",
        &out("alice.safetensors"),
        "--image",
        &fixture("photos/astronaut-256.png").display().to_string(),
        &fixture("photos/camera.png").display().to_string(),
        "--json",
        "--device",
        "cpu",
    ]);
    let scored: serde_json::Value = serde_json::from_slice(&scored.stdout).unwrap();
    let verdicts: Vec<(String, bool)> = scored["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let face = &i["faces"][0];
            (
                face["identity"].as_str().unwrap().to_string(),
                face["same_person"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("<alice>".to_string(), true),
            ("<alice>".to_string(), false)
        ]
    );
    // A bad photo is a clear error.
    std::fs::write(dir.join("bad.jpg"), b"not a photo").unwrap();
    let o = sefi(&[
        "train",
        "--model",
        &model,
        "--image",
        &out("bad.jpg"),
        "--token",
        "x",
        "--device",
        "cpu",
        "--out",
        &out("x.safetensors"),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot read the photo"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Previews during a run are the images the identity so far generates (same request, same
/// seed), scored against the photos' faces; a stop asked for while one is drawn pauses the run
/// at that step.
#[test]
fn previews_show_the_identity_so_far_and_a_stop_during_one_pauses() {
    use sefi::identity::session::{self, Due, Finished, Previews, Schedule, Stop, TrainEvent};
    let device = Device::flex().autodiff();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let trainer = astronaut_trainer(&ckpt, &sd, trainer_config(4), &device);
    let faces = common::face_models(&Device::flex());
    let astronaut_face = block_on(faces.photo_face(&astronaut().image, None))
        .unwrap()
        .expect("the astronaut's face");
    let previews = Previews {
        due: Due {
            every: 2,
            last_step: true,
            ..Due::default()
        },
        request: GenerateRequest {
            steps: 3,
            ..Previews::request("alice", 64, 7.5, 5)
        },
        scheduler: &ckpt.scheduler,
        faces: Some((&faces, vec![astronaut_face])),
    };
    let schedule = Schedule {
        read_every: std::time::Duration::ZERO,
        ..Schedule::default()
    };
    let run = |state: &mut TrainState, pause_at_call: usize| {
        let mut events = Vec::new();
        let mut images = Vec::new();
        let mut denoised = Vec::new();
        let mut asked = 0;
        let finished = block_on(session::run(
            &trainer,
            state,
            &schedule,
            Some(&previews),
            &mut || {
                asked += 1;
                (asked == pause_at_call).then_some(Stop::Pause)
            },
            &mut |e| -> Result<(), Box<dyn std::error::Error>> {
                match e {
                    TrainEvent::Step(r) => events.push(format!("step {}", r.step)),
                    TrainEvent::Preview {
                        step,
                        image,
                        likeness,
                    } => {
                        // The tiny model draws no face.
                        assert_eq!(likeness, None);
                        events.push(format!("preview {step}"));
                        images.push(image);
                    }
                    TrainEvent::PreviewStep { step, total } => {
                        denoised.push(format!("{step}/{total}"))
                    }
                    _ => {}
                }
                Ok(())
            },
        ))
        .unwrap();
        (finished, events, images, denoised)
    };
    let mut state = trainer.initial_state();
    let (finished, events, images, denoised) = run(&mut state, 0);
    assert!(matches!(finished, Finished::Done(_)));
    // Each denoising step is reported: the run is busy, not stuck.
    assert_eq!(denoised, ["1/3", "2/3", "3/3", "1/3", "2/3", "3/3"]);
    assert_eq!(
        events,
        [
            "step 1",
            "step 2",
            "preview 2",
            "step 3",
            "step 4",
            "preview 4"
        ]
    );
    assert_eq!((images[0].width, images[0].height), (64, 64));
    // The preview at step 2 is what generating with the identity after two steps gives.
    let mut two = trainer.initial_state();
    block_on(trainer.steps(&mut two, 2)).unwrap();
    let generated = block_on(pipeline::generate(
        &sd,
        &ckpt.scheduler,
        &previews.request,
        &[trainer.identity(&two)],
        &GivenNoise::default(),
        &device,
        &mut |_| sefi::pipeline::Flow::Continue,
    ))
    .unwrap();
    assert_eq!(generated.images[0], images[0]);
    assert_ne!(images[0], images[1], "the identity moved between previews");
    // Asked before steps 1 and 2, then during the preview's first denoising step: the run
    // pauses at step 2 with a checkpoint, the preview left undrawn.
    let mut paused = trainer.initial_state();
    let (finished, events, _, denoised) = run(&mut paused, 3);
    assert_eq!(denoised, ["1/3"]);
    let Finished::Stopped { step, checkpoint } = finished else {
        panic!("the stop was not seen")
    };
    assert_eq!((step, checkpoint.is_some()), (2, true));
    assert_eq!(events, ["step 1", "step 2"]);
}
