//! Samplers and the text-to-image pipeline against diffusers: the timestep and sigma tables
//! of every sampler, and whole generations on the tiny models from the same initial latents
//! (goldens from `tests/fixtures/pipeline/generate.py`).
#![cfg(not(target_family = "wasm"))]

use burn::tensor::{DType, Device, Tensor};
use sefi::block_on;
use sefi::pipeline::{self, Flow, GenerateRequest, GivenNoise, HostLatents};
use sefi::schedule::{Plan, Sampler, SchedulerConfig, TrainSchedule};
use sefi::sd::StableDiffusion;
use sefi::weights::Checkpoint;
use sefi::weights::open::Variant;
use serde_json::Value;

mod common;
use common::{Goldens, assert_close, fixture, load_model, sd_fixture};

fn json(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(path)).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Largest |a - b| relative to the largest |b|.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn the_training_schedule_is_diffusers() {
    let tables = json("pipeline/schedulers.json");
    let train = TrainSchedule::new(&SchedulerConfig::for_prediction(
        sefi::config::Prediction::Epsilon,
    ));
    let err = rel_err(
        &train.alphas_cumprod,
        &floats(&tables["alphas_cumprod"]["values"]),
    );
    assert!(err < 1e-5, "alphas_cumprod: {err:e}");
}

#[test]
fn sampler_tables_match_diffusers() {
    let tables = json("pipeline/schedulers.json");
    let mut checked = 0;
    for (setup, t) in tables["setups"].as_object().unwrap() {
        let (base, sampler) = setup.split_once('/').unwrap();
        let config: SchedulerConfig =
            serde_json::from_value(tables["base_configs"][base].clone()).unwrap();
        let sampler: Sampler = sampler.parse().unwrap();
        for (steps, want) in t["steps"].as_object().unwrap() {
            let plan = Plan::new(sampler, &config, steps.parse().unwrap()).unwrap();
            let what = format!("{setup} {steps} steps");
            assert!(
                rel_err(&plan.timesteps, &floats(&want["timesteps"])) < 1e-6,
                "{what}: timesteps {:?}",
                plan.timesteps
            );
            if let Some(sigmas) = want.get("sigmas") {
                let err = rel_err(&plan.sigmas, &floats(sigmas));
                assert!(
                    err < 1e-5,
                    "{what}: sigmas off by {err:e}: {:?}",
                    plan.sigmas
                );
            }
            let init = want["init_noise_sigma"].as_f64().unwrap();
            assert!(
                (plan.init_noise_sigma - init).abs() < 1e-5 * init,
                "{what}: init_noise_sigma {}",
                plan.init_noise_sigma
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 5 * 3 * 3, "5 samplers x 3 configs x 3 step counts");
}

fn latents(g: &Goldens, name: &str) -> HostLatents {
    let (data, shape) = g.f32(name);
    HostLatents {
        shape: shape.try_into().unwrap(),
        data,
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    block_on(pipeline::read_f32(t))
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn run(
    sd: &StableDiffusion,
    ckpt: &Checkpoint,
    req: &GenerateRequest,
    given: &GivenNoise,
    device: &Device,
) -> pipeline::Generated {
    common::generate(sd, &ckpt.scheduler, req, &[], given, device).unwrap()
}

fn check_model(model: &str) {
    let device = Device::flex();
    let (ckpt, sd) = load_model(model, &device);
    let g = Goldens::open(&format!("pipeline/{model}.safetensors"));
    let inputs = &json("pipeline/pipeline.json")["inputs"];
    let base = GenerateRequest {
        prompt: inputs["prompt"].as_str().unwrap().into(),
        negative_prompt: inputs["negative_prompt"].as_str().unwrap().into(),
        steps: 10,
        guidance: 7.5,
        width: 64,
        height: 64,
        ..GenerateRequest::default()
    };

    // The conditioning: negative first, as diffusers concatenates it.
    let (cond, uncond, warnings) =
        pipeline::encode_prompts(&sd, &base.prompt, &base.negative_prompt, &device).unwrap();
    assert!(warnings.is_empty());
    let embeds = values(Tensor::cat(vec![uncond, cond], 0));
    let want: Vec<f64> = g
        .f32("prompt_embeds")
        .0
        .into_iter()
        .map(f64::from)
        .collect();
    assert!(rel_err(&embeds, &want) < 1e-4, "{model} prompt embeddings");

    let initial = GivenNoise {
        initial: Some(latents(&g, "latents.init")),
        steps: None,
    };
    for sampler in Sampler::ALL {
        let req = GenerateRequest {
            sampler,
            ..base.clone()
        };
        let given = if sampler.is_ancestral() {
            let (data, shape) = g.f32("noise.euler-a");
            let per = data.len() / shape[0];
            let steps = data
                .chunks(per)
                .map(|c| HostLatents {
                    shape: [1, 4, 8, 8],
                    data: c.to_vec(),
                })
                .collect();
            GivenNoise {
                steps: Some(steps),
                ..initial.clone()
            }
        } else {
            initial.clone()
        };
        let out = run(&sd, &ckpt, &req, &given, &device);
        let want: Vec<f64> = g
            .f32(&format!("final.{sampler}"))
            .0
            .into_iter()
            .map(f64::from)
            .collect();
        let err = rel_err(&values(out.latents), &want);
        eprintln!("{model} {sampler}: final latents relative error {err:e}");
        assert!(
            err < 1e-3,
            "{model} {sampler}: final latents off by {err:e} (relative)"
        );
        let pixels = g.u8(&format!("image_u8.{sampler}"));
        let diff = out.images[0]
            .data
            .iter()
            .zip(&pixels)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("{model} {sampler}: image max difference {diff}/255");
        assert!(diff <= 2, "{model} {sampler}: image differs by {diff}/255");
    }

    // Guidance off: no negative prompt, batch of one.
    let req = GenerateRequest {
        sampler: Sampler::Euler,
        guidance: 1.0,
        ..base.clone()
    };
    let out = run(&sd, &ckpt, &req, &initial, &device);
    let want: Vec<f64> = g
        .f32("final.euler.no_cfg")
        .0
        .into_iter()
        .map(f64::from)
        .collect();
    assert!(
        rel_err(&values(out.latents), &want) < 1e-3,
        "{model} without guidance"
    );

    // Two images per prompt.
    let req = GenerateRequest {
        sampler: Sampler::Euler,
        num_images: 2,
        ..base
    };
    let two = GivenNoise {
        initial: Some(latents(&g, "latents.init2")),
        steps: None,
    };
    let out = run(&sd, &ckpt, &req, &two, &device);
    assert_eq!(out.images.len(), 2);
    let want: Vec<f64> = g.f32("multi.euler").0.into_iter().map(f64::from).collect();
    assert!(
        rel_err(&values(out.latents), &want) < 1e-3,
        "{model} two images"
    );
}

#[test]
fn tiny_sd1_generations_match_diffusers() {
    check_model("tiny-sd1");
}

#[test]
fn tiny_sd2_generations_match_diffusers() {
    check_model("tiny-sd2");
}

#[test]
fn long_prompts_are_encoded_in_windows_with_a_warning() {
    let device = Device::flex();
    let (ckpt, sd) = load_model("tiny-sd1", &device);
    let long = "a very detailed photo of a red car ".repeat(12);
    let windows = pipeline::prompt_windows(&sd, &long).unwrap();
    assert_eq!(windows.len(), 2);
    assert!(windows.iter().all(|w| w.len() == 77 && w[0] == 49406));
    let (cond, uncond, warnings) = pipeline::encode_prompts(&sd, &long, "", &device).unwrap();
    assert_eq!(cond.dims(), [1, 154, 16]);
    assert_eq!(
        uncond.dims(),
        [1, 154, 16],
        "the negative prompt is padded to as many windows"
    );
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("2 windows"), "{}", warnings[0]);
    // Cancelling between steps stops the run.
    let req = GenerateRequest {
        prompt: long,
        steps: 5,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let mut seen = 0;
    let err = block_on(pipeline::generate(
        &sd,
        &ckpt.scheduler,
        &req,
        &[],
        &GivenNoise::default(),
        &device,
        &mut |e| {
            if let pipeline::Event::Step { step, .. } = e {
                seen = step;
                if step == 2 {
                    return Flow::Cancel;
                }
            }
            Flow::Continue
        },
    ))
    .unwrap_err();
    assert_eq!(err, pipeline::PipelineError::Cancelled);
    assert_eq!(seen, 2);
}

/// A VAE with three levels (`tiny-vae3`, latents a quarter of the image's size): its encoder
/// and decoder match diffusers, and a generation with it takes latents of diffusers' shape
/// (`2 ** (levels - 1)` from the config, not 8) and makes an image of the size asked for.
#[test]
fn a_three_level_vae_sets_the_latent_size() {
    let device = Device::flex();
    let tiny = block_on(Checkpoint::open_path(
        &sd_fixture("tiny-sd1"),
        Variant::Auto,
        None,
    ))
    .unwrap();
    let ckpt = block_on(tiny.with_vae_dir(&sd_fixture("tiny-vae3"))).unwrap();
    assert_eq!(ckpt.config.vae.latent_scale(), 4);
    let sd = block_on(StableDiffusion::load(
        &ckpt,
        &device,
        DType::F32,
        &mut |_| {},
    ))
    .unwrap();

    let g = Goldens::open("sd/tiny-vae3/goldens.safetensors");
    let posterior = sd.vae.encode(g.tensor("vae.image", &device));
    let mean = g.f32("vae.posterior_mean");
    assert_close(posterior.mean, mean, 1e-4, "3-level vae posterior mean");
    let decoded = sd.vae.decode(g.tensor("vae.latents", &device));
    assert_close(decoded, g.f32("vae.decoded"), 1e-4, "3-level vae decode");

    // 64 x 96 px: latents of 16 x 24, given as diffusers' `latents=` would be.
    let req = GenerateRequest {
        prompt: "a photo of a person".into(),
        steps: 2,
        width: 64,
        height: 96,
        ..GenerateRequest::default()
    };
    let initial = HostLatents {
        shape: [1, 4, 24, 16],
        data: (0..4 * 24 * 16)
            .map(|i| ((i % 7) as f32 - 3.0) / 3.0)
            .collect(),
    };
    let given = GivenNoise {
        initial: Some(initial),
        steps: None,
    };
    let out = run(&sd, &ckpt, &req, &given, &device);
    assert_eq!(out.latents.dims(), [1, 4, 24, 16]);
    assert_eq!((out.images[0].width, out.images[0].height), (64, 96));
}
