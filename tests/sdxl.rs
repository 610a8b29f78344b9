//! SDXL against diffusers on the tiny SDXL model (`tests/fixtures/sd/sdxl.py`): both text
//! encoders, the UNet with its added text/time conditioning, the VAE, whole generations, and
//! every file layout (diffusers folder, sharded weights, the sgm single file).
#![cfg(not(target_family = "wasm"))]

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use sefi::block_on;
use sefi::config::SdConfig;
use sefi::pipeline::{self, GenerateRequest, GivenNoise, HostLatents};
use sefi::schedule::Sampler;
use sefi::sd::{StableDiffusion, param_counts, validate};
use sefi::unet::{AddedCond, AttentionCapture, Context};
use sefi::weights::open::Variant;
use sefi::weights::{Checkpoint, Component, Family, Format, HostTensor, WeightsError};

mod common;
use common::{Goldens, assert_close, fixture, sd_fixture, sefi, sefi_ok, values};

/// f32 on the CPU, as for SD 1.x/2.x.
const TOL: f32 = 1e-4;

fn open(path: &Path, config: Option<SdConfig>) -> Result<Checkpoint, WeightsError> {
    block_on(Checkpoint::open_path(path, Variant::Auto, config))
}

fn load(ckpt: &Checkpoint, device: &Device) -> StableDiffusion {
    block_on(StableDiffusion::load(ckpt, device, DType::F32, &mut |_| {})).unwrap()
}

fn goldens() -> Goldens {
    Goldens::open("sd/tiny-sdxl/goldens.safetensors")
}

#[test]
fn the_tiny_folder_is_sdxl_with_its_config() {
    let ckpt = open(&sd_fixture("tiny-sdxl"), None).unwrap();
    assert_eq!(ckpt.family, Family::Sdxl);
    assert_eq!(ckpt.format, Format::Diffusers);
    let want = SdConfig::tiny_sdxl();
    let c = &ckpt.config;
    assert_eq!(c.unet.block_out_channels, want.unet.block_out_channels);
    assert_eq!(
        c.unet.transformer_layers_per_block,
        want.unet.transformer_layers_per_block
    );
    assert_eq!(
        (
            c.unet.addition_time_embed_dim,
            c.unet.projection_class_embeddings_input_dim
        ),
        (Some(8), Some(80))
    );
    assert_eq!(c.text_encoder_2, want.text_encoder_2);
    assert_eq!(c.vae.scaling_factor, 0.13025);
    assert!(c.vae.force_upcast && c.force_zeros_for_empty_prompt);
    validate(&ckpt, &Device::flex()).unwrap();
    let counts = param_counts(c, &Device::flex()).unwrap();
    assert_eq!(
        counts,
        [
            ckpt.params(Component::Unet),
            ckpt.params(Component::TextEncoder),
            ckpt.params(Component::Vae),
            ckpt.params(Component::TextEncoder2),
        ]
    );
}

#[test]
fn full_size_sdxl_has_the_real_parameter_counts() {
    let counts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("sd/param_counts_sdxl.json")).unwrap(),
    )
    .unwrap();
    let expected = ["unet", "text_encoder", "vae", "text_encoder_2"]
        .map(|c| counts["sdxl"][c].as_u64().unwrap());
    let got = param_counts(&SdConfig::sdxl_base(), &Device::flex()).unwrap();
    assert_eq!(got, expected);
    // The numbers diffusers and transformers report for stable-diffusion-xl-base-1.0.
    assert_eq!(got, [2_567_463_684, 123_060_480, 83_653_863, 694_659_840]);
    // And the Hub's config files read as the constructor.
    let ckpt_config = |part: &str| {
        std::fs::read_to_string(fixture(&format!("sd/configs/sdxl/{part}/config.json"))).unwrap()
    };
    let unet: sefi::config::UNetConfig = serde_json::from_str(&ckpt_config("unet")).unwrap();
    assert_eq!(unet, SdConfig::sdxl_base().unet);
    let te2: sefi::config::TextConfig =
        serde_json::from_str(&ckpt_config("text_encoder_2")).unwrap();
    assert_eq!(Some(te2), SdConfig::sdxl_base().text_encoder_2);
    let vae: sefi::config::VaeConfig = serde_json::from_str(&ckpt_config("vae")).unwrap();
    assert_eq!(vae, SdConfig::sdxl_base().vae);
}

/// Every component of the tiny SDXL model against the goldens.
#[test]
fn components_match_diffusers() {
    let device = Device::flex();
    let ckpt = open(&sd_fixture("tiny-sdxl"), None).unwrap();
    let sd = load(&ckpt, &device);
    let g = goldens();

    // Text: CLIP-L's and bigG's penultimate states, bigG's pooled and projected outputs.
    let ids = g.ids("text.input_ids", &device);
    let ids_2 = g.ids("text.input_ids_2", &device);
    let l = sd.text_encoder.forward(ids);
    assert_close(
        l.penultimate,
        g.f32("text.l.penultimate"),
        TOL,
        "CLIP-L penultimate",
    );
    let big_g = sd.text_encoder_2.as_ref().unwrap().forward(ids_2);
    assert_close(
        big_g.penultimate,
        g.f32("text.g.penultimate"),
        TOL,
        "bigG penultimate",
    );
    assert_close(big_g.pooled, g.f32("text.g.pooled"), TOL, "bigG pooled");
    assert_close(
        big_g.text_embeds.unwrap(),
        g.f32("text.g.text_embeds"),
        TOL,
        "bigG text_embeds",
    );

    // The pipeline's encoding from the prompts' text, through both tokenizers.
    let prompts: Vec<String> = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(sd_fixture("tiny-sdxl/goldens.json")).unwrap(),
    )
    .unwrap()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let (context, pooled) = g.f32("text.context");
    let (text_embeds, _) = g.f32("text.g.text_embeds");
    for (i, prompt) in prompts.iter().enumerate() {
        let windows = pipeline::prompt_windows(&sd, prompt).unwrap();
        let encoded = pipeline::encode_windows(&sd, &windows[..1], &device);
        let n = 77 * 48;
        assert_close(
            encoded.states,
            (context[i * n..(i + 1) * n].to_vec(), vec![1, 77, 48]),
            TOL,
            &format!("prompt {i} context"),
        );
        assert_close(
            encoded.pooled.unwrap(),
            (text_embeds[i * 32..(i + 1) * 32].to_vec(), vec![1, 32]),
            TOL,
            &format!("prompt {i} pooled"),
        );
    }
    drop(pooled);

    // UNet with the added conditioning, with split key/value contexts, and its maps.
    let sample: Tensor<4> = g.tensor("unet.sample", &device);
    let t: Tensor<1> = g.tensor("unet.timesteps", &device);
    let added = AddedCond {
        text_embeds: g.tensor("unet.text_embeds", &device),
        time_ids: g.tensor("unet.time_ids", &device),
    };
    let context = Context::new(g.tensor("unet.context", &device)).with_added(Some(added.clone()));
    assert_close(
        sd.unet.forward(sample.clone(), t.clone(), &context, None),
        g.f32("unet.out"),
        TOL,
        "unet out",
    );
    let kv = Context::split(context.key.clone(), g.tensor("unet.value_context", &device))
        .with_added(Some(added));
    assert_close(
        sd.unet.forward(sample.clone(), t.clone(), &kv, None),
        g.f32("unet.out_kv"),
        TOL,
        "unet out, split K/V",
    );
    let positions = Tensor::<1, Int>::from_data(TensorData::new(vec![2i64, 5], [2]), &device);
    let mut capture = AttentionCapture::new(positions);
    sd.unet.forward(sample, t, &context, Some(&mut capture));
    // Levels 1 and 2 hold 2 x 1 and 2 x 2 transformer layers, the mid block 3, the up blocks
    // 3 x 2 and 3 x 1: 28 cross-attention layers.
    assert_eq!(capture.maps.len(), 28);
    for (i, map) in capture.maps.into_iter().enumerate() {
        assert_close(
            map,
            g.f32(&format!("attn.{i}")),
            TOL,
            &format!("attention probabilities {i}"),
        );
    }

    // VAE.
    let posterior = sd.vae.encode(g.tensor("vae.image", &device));
    assert_close(posterior.mean, g.f32("vae.posterior_mean"), TOL, "vae mean");
    assert_close(
        posterior.logvar,
        g.f32("vae.posterior_logvar"),
        TOL,
        "vae logvar",
    );
    assert_close(
        sd.vae.decode(g.tensor("vae.latents", &device)),
        g.f32("vae.decoded"),
        TOL,
        "vae decode",
    );
}

fn request(negative: &str, guidance: f64, sampler: Sampler) -> GenerateRequest {
    GenerateRequest {
        prompt: "a photo of sks person, oil painting".into(),
        negative_prompt: negative.into(),
        steps: 10,
        guidance,
        sampler,
        seed: 0,
        width: 64,
        height: 64,
        num_images: 1,
        preview_every: 0,
    }
}

/// Whole generations from diffusers' starting latents, compared on the final latents.
#[test]
fn generations_match_stable_diffusion_xl_pipeline() {
    let device = Device::flex();
    let ckpt = open(&sd_fixture("tiny-sdxl"), None).unwrap();
    let sd = load(&ckpt, &device);
    let g = goldens();
    let (latents, shape) = g.f32("pipe.latents");
    let given = GivenNoise {
        initial: Some(HostLatents {
            shape: shape.try_into().unwrap(),
            data: latents,
        }),
        steps: None,
    };
    let cases = [
        // An empty negative prompt is zeros (force_zeros_for_empty_prompt).
        ("pipe.euler.no_negative", request("", 5.0, Sampler::Euler)),
        (
            "pipe.euler.negative",
            request("blurry, low quality", 5.0, Sampler::Euler),
        ),
        ("pipe.euler.no_guidance", request("", 1.0, Sampler::Euler)),
        (
            "pipe.dpmpp_2m.no_negative",
            request("", 5.0, Sampler::DpmPp2m),
        ),
    ];
    for (name, req) in cases {
        let out = common::generate(&sd, &ckpt.scheduler, &req, &[], &given, &device).unwrap();
        assert_close(out.latents.clone(), g.f32(name), 1e-3, name);
        if name == "pipe.euler.no_negative" {
            // The decoded image, before 8-bit rounding: latents / 0.13025 through the VAE.
            let image = sd.vae.decode(out.latents.div_scalar(0.13025));
            assert_close(image, g.f32("pipe.euler.no_negative.image"), 1e-3, "image");
        }
    }
}

/// Every tensor of a component, read through the checkpoint (transforms applied).
fn tensors(ckpt: &Checkpoint, c: Component) -> BTreeMap<String, HostTensor> {
    ckpt.entries(c)
        .keys()
        .map(|name| (name.clone(), block_on(ckpt.read(c, name)).unwrap()))
        .collect()
}

fn assert_same_weights(a: &Checkpoint, b: &Checkpoint) {
    for c in Component::ALL {
        let (x, y) = (tensors(a, c), tensors(b, c));
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{c}: tensor names"
        );
        for (name, t) in &x {
            let u = &y[name];
            assert_eq!(t.shape, u.shape, "{c} {name}");
            assert_eq!(t.to_f32(), u.to_f32(), "{c} {name}");
        }
    }
}

#[test]
fn sharded_weights_load_as_the_single_files() {
    let folder = open(&sd_fixture("tiny-sdxl"), None).unwrap();
    let sharded = open(&sd_fixture("tiny-sdxl-sharded"), None).unwrap();
    assert_eq!(sharded.family, Family::Sdxl);
    validate(&sharded, &Device::flex()).unwrap();
    assert_same_weights(&folder, &sharded);

    // A shard that goes missing is named.
    let tmp = TempDir::new("sharded");
    let copy = tmp.0.join("m");
    copy_tree(&sd_fixture("tiny-sdxl-sharded"), &copy);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(copy.join("unet/diffusion_pytorch_model.safetensors.index.json"))
            .unwrap(),
    )
    .unwrap();
    let shard = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(copy.join("unet").join(&shard)).unwrap();
    let err = open(&copy, None).unwrap_err().to_string();
    assert!(err.contains(&shard) && err.contains("incomplete"), "{err}");
}

/// A folder removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sefi-sdxl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies a folder, following links.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let path = e.path();
        if path.is_dir() {
            copy_tree(&path, &to.join(e.file_name()));
        } else {
            std::fs::copy(&path, to.join(e.file_name())).unwrap();
        }
    }
}

/// Text encoders saved by transformers before 4.31 (SDXL 0.9 and fine-tunes of its time) carry
/// the `position_ids` buffer, in `text_encoder_2/` too: skipped and said, as transformers does.
#[test]
fn older_text_encoder_files_with_position_ids_load() {
    let tmp = TempDir::new("position-ids");
    let copy = tmp.0.join("m");
    copy_tree(&sd_fixture("tiny-sdxl"), &copy);
    for dir in ["text_encoder", "text_encoder_2"] {
        let path = copy.join(dir).join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ids: Vec<u8> = (0..77i64).flat_map(|i| i.to_le_bytes()).collect();
        let mut views: Vec<(String, safetensors::tensor::TensorView)> = file.tensors();
        views.push((
            "text_model.embeddings.position_ids".into(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 77], &ids)
                .unwrap(),
        ));
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    }
    let old = open(&copy, None).unwrap();
    let skipped: Vec<Component> = old
        .adaptations
        .iter()
        .filter(|a| a.stored == "text_model.embeddings.position_ids" && a.loaded_as.is_none())
        .map(|a| a.component)
        .collect();
    assert_eq!(
        skipped,
        [Component::TextEncoder, Component::TextEncoder2],
        "{:?}",
        old.adaptations
    );
    validate(&old, &Device::flex()).unwrap();
    assert_same_weights(&open(&sd_fixture("tiny-sdxl"), None).unwrap(), &old);
}

#[test]
fn the_sgm_single_file_loads_as_the_folder() {
    let folder = open(&sd_fixture("tiny-sdxl"), None).unwrap();
    let config = folder.config.clone();
    let single = open(&sd_fixture("tiny-sdxl.safetensors"), Some(config)).unwrap();
    assert_eq!(
        (single.family, single.format),
        (Family::Sdxl, Format::SingleFile)
    );
    validate(&single, &Device::flex()).unwrap();
    assert_same_weights(&folder, &single);

    // Without a config it is read as the full-size model, whose shapes it does not have.
    let full = open(&sd_fixture("tiny-sdxl.safetensors"), None).unwrap();
    assert_eq!(full.config, SdConfig::sdxl_base());
    assert!(validate(&full, &Device::flex()).is_err());

    // An SD 1.x config for an SDXL file is refused.
    let err = open(
        &sd_fixture("tiny-sdxl.safetensors"),
        Some(SdConfig::tiny_sd1()),
    )
    .unwrap_err();
    assert!(matches!(err, WeightsError::WrongFamily { .. }), "{err}");
}

#[test]
fn refiners_are_refused_by_name() {
    // A folder without text_encoder/, as stable-diffusion-xl-refiner-1.0.
    let tmp = TempDir::new("refiner");
    let copy = tmp.0.join("refiner");
    copy_tree(&sd_fixture("tiny-sdxl"), &copy);
    std::fs::remove_dir_all(copy.join("text_encoder")).unwrap();
    std::fs::remove_dir_all(copy.join("tokenizer")).unwrap();
    let err = open(&copy, None).unwrap_err();
    assert!(err.to_string().contains("SDXL refiner"), "{err}");

    // A single file with bigG as the only embedder.
    let mut tensors = BTreeMap::new();
    let zeros = vec![0u8; 8];
    for key in [
        "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
    ] {
        tensors.insert(key.to_string(), zeros.clone());
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], v).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let path = tmp.0.join("refiner.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let err = open(&path, None).unwrap_err();
    assert!(err.to_string().contains("SDXL refiner"), "{err}");
}

/// `sefi train` on the tiny SDXL model, the identity file's layout, and generation with two
/// SDXL identities in one prompt; identities of other families are refused.
#[test]
fn train_then_generate_with_sdxl_identities() {
    let tmp = TempDir::new("identities");
    let model = sd_fixture("tiny-sdxl").display().to_string();
    let photo = fixture("photos/astronaut.png").display().to_string();
    let out = |n: &str| tmp.0.join(n).display().to_string();
    for (token, class) in [("alice", "person"), ("rex", "dog")] {
        sefi_ok(&[
            "train",
            "--model",
            &model,
            "--image",
            &photo,
            "--token",
            token,
            "--class-word",
            class,
            "--steps",
            "3",
            "--device",
            "cpu",
            "--out",
            &out(&format!("{token}.safetensors")),
        ]);
    }
    // Each encoder's part apart, as `clip_l` / `clip_g` embeddings are.
    let bytes = std::fs::read(out("alice.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<(String, Vec<usize>)> = file
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("key_g".to_string(), vec![5, 32]),
            ("key_l".to_string(), vec![5, 16]),
            ("value_g".to_string(), vec![5, 32]),
            ("value_l".to_string(), vec![5, 16]),
        ]
    );
    let alice = block_on(sefi::identity::Identity::from_bytes("alice", bytes.clone())).unwrap();
    assert_eq!((alice.family, alice.dim), (Family::Sdxl, 48));
    assert_eq!(alice.fingerprint.widths, [16, 32]);
    assert_eq!(
        block_on(sefi::identity::Identity::from_bytes(
            "alice",
            alice.to_bytes().unwrap()
        ))
        .unwrap(),
        alice,
        "round trip"
    );
    // Training moved the vectors away from the class word's embedding, in both encoders' parts.
    let device = Device::flex();
    let sd = load(&open(&sd_fixture("tiny-sdxl"), None).unwrap(), &device);
    let class = sd.tokenizer.single_token("person").unwrap();
    let start = values(sd.token_embedding(class)).0;
    let moved = |range: std::ops::Range<usize>| {
        (0..5).any(|s| {
            range
                .clone()
                .any(|i| (alice.key[s * 48 + i] - start[i]).abs() > 1e-6)
        })
    };
    assert!(moved(0..16) && moved(16..48));

    sefi_ok(&[
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
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--out",
        &out("both.png"),
    ]);
    assert!(tmp.0.join("both.png").exists());

    // Families do not mix, either way.
    let fingerprint = block_on(sefi::identity::condition::fingerprint(&sd)).unwrap();
    let sd1 = load(&open(&sd_fixture("tiny-sd1"), None).unwrap(), &device);
    let fingerprint_1 = block_on(sefi::identity::condition::fingerprint(&sd1)).unwrap();
    assert!(alice.check_model(Family::Sdxl, &fingerprint).is_ok());
    let err = alice.check_model(Family::Sd1, &fingerprint_1).unwrap_err();
    assert!(err.to_string().contains("learned on a sdxl model"), "{err}");
    let mut sd1_identity = alice.clone();
    sd1_identity.family = Family::Sd1;
    sd1_identity.fingerprint = fingerprint_1;
    let err = sd1_identity
        .check_model(Family::Sdxl, &fingerprint)
        .unwrap_err();
    assert!(err.to_string().contains("this sdxl model"), "{err}");
}

/// The presets' sizes, which size the fit estimate before any download, are the configs'.
#[test]
fn presets_state_their_models_sizes() {
    for p in sefi::app::catalog::PRESETS {
        let config = p.family.full_size();
        let counts = param_counts(&config, &Device::flex()).unwrap();
        assert_eq!(p.params, counts.iter().sum::<u64>(), "{}", p.name);
        assert_eq!(
            p.largest_tensor,
            sefi::sd::largest_whole_tensor(&config, &Device::flex()).unwrap(),
            "{}",
            p.name
        );
        assert_eq!(p.resolution, config.unet.sample_size * 8, "{}", p.name);
    }
}

/// `sefi inspect --json` on every SDXL layout, and on a refiner.
#[test]
fn inspect_says_sdxl() {
    let inspect = |args: &[&str]| {
        let out = sefi(&[&["inspect"], args, &["--json"]].concat());
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let counts = param_counts(&SdConfig::tiny_sdxl(), &Device::flex()).unwrap();
    let folder = sd_fixture("tiny-sdxl").display().to_string();
    let sharded = sd_fixture("tiny-sdxl-sharded").display().to_string();
    let single = sd_fixture("tiny-sdxl.safetensors").display().to_string();
    for (args, format, dtype) in [
        (vec![folder.as_str()], "diffusers", "F32"),
        (vec![sharded.as_str()], "diffusers", "F32"),
        (
            vec![single.as_str(), "--config", folder.as_str()],
            "single-file",
            "F16",
        ),
    ] {
        let (ok, stdout, stderr) = inspect(&args);
        assert!(ok, "{args:?}: {stdout} {stderr}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(r["family"], "sdxl", "{args:?}");
        assert_eq!(r["format"], format, "{args:?}");
        assert_eq!(r["dtype"], dtype, "{args:?}");
        assert_eq!(r["layout"], "ok", "{args:?}");
        let params = ["unet", "text_encoder", "vae", "text_encoder_2"]
            .map(|c| r["params"][c].as_u64().unwrap());
        assert_eq!(params, counts, "{args:?}");
        assert_eq!(r["tokenizer_2"]["pad_token"], "!", "{args:?}");
    }
    // A refiner folder: refused, and said why.
    let tmp = TempDir::new("inspect-refiner");
    let refiner = tmp.0.join("refiner");
    copy_tree(&sd_fixture("tiny-sdxl"), &refiner);
    std::fs::remove_dir_all(refiner.join("text_encoder")).unwrap();
    let out = sefi(&["inspect", refiner.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SDXL refiner") && stderr.contains("base"),
        "{stderr}"
    );
}

/// Another VAE in place of the model's (`--vae`): its weights and config are used, and a VAE
/// without `force_upcast` (SDXL's fp16-fix VAE) runs in f16 while the stock one stays in f32.
#[test]
fn another_vae_replaces_the_models() {
    let device = Device::flex();
    // tiny-sd1's VAE has the tiny SDXL VAE's shapes but other weights and scaling factor.
    let ckpt = block_on(
        open(&sd_fixture("tiny-sdxl"), None)
            .unwrap()
            .with_vae_dir(&sd_fixture("tiny-sd1")),
    )
    .unwrap();
    assert_eq!(ckpt.config.vae.scaling_factor, 0.18215);
    validate(&ckpt, &Device::flex()).unwrap();
    let sd = load(&ckpt, &device);
    let sd1 = Goldens::open("sd/tiny-sd1/goldens.safetensors");
    assert_close(
        sd.vae.decode(sd1.tensor("vae.latents", &device)),
        sd1.f32("vae.decoded"),
        TOL,
        "tiny-sd1's VAE in the SDXL model",
    );

    // The stock VAE asks for f32; an fp16-fix VAE (force_upcast false) computes in f16.
    let f16 = |ckpt: &Checkpoint| {
        block_on(StableDiffusion::load(
            ckpt,
            &device,
            DType::F16,
            &mut |_| {},
        ))
        .unwrap()
        .vae
        .dtype()
    };
    let stock = open(&sd_fixture("tiny-sdxl"), None).unwrap();
    assert_eq!(f16(&stock), DType::F32);
    let tmp = TempDir::new("fp16-vae");
    let fixed = tmp.0.join("sdxl-vae-fp16-fix");
    std::fs::create_dir_all(&fixed).unwrap();
    let vae = sd_fixture("tiny-sdxl/vae");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae.join("config.json")).unwrap()).unwrap();
    config["force_upcast"] = false.into();
    std::fs::write(fixed.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        vae.join("diffusion_pytorch_model.safetensors"),
        fixed.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let with_fix = block_on(stock.with_vae_dir(&fixed)).unwrap();
    assert_eq!(f16(&with_fix), DType::F16);

    // The command line takes it as --vae.
    sefi_ok(&[
        "generate",
        "--model",
        sd_fixture("tiny-sdxl").to_str().unwrap(),
        "--vae",
        fixed.to_str().unwrap(),
        "--prompt",
        "a red car",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp.0.join("car.png").to_str().unwrap(),
    ]);
    assert!(tmp.0.join("car.png").exists());
    // A folder that holds no VAE is refused, named.
    let err = block_on(
        open(&sd_fixture("tiny-sdxl"), None)
            .unwrap()
            .with_vae_dir(&sd_fixture("tiny-sdxl/scheduler")),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a diffusers VAE"), "{err}");
}

/// SDXL with a three-level VAE (`tiny-vae3`): the latents are a quarter of the image's size,
/// read from the VAE's config as diffusers reads it, and the image is the size asked for.
#[test]
fn sdxl_with_a_three_level_vae_makes_the_size_asked_for() {
    let device = Device::flex();
    let ckpt = open(&sd_fixture("tiny-sdxl"), None).unwrap();
    let ckpt = block_on(ckpt.with_vae_dir(&sd_fixture("tiny-vae3"))).unwrap();
    assert_eq!(ckpt.config.vae.latent_scale(), 4);
    let sd = load(&ckpt, &device);
    let req = GenerateRequest {
        steps: 2,
        width: 64,
        height: 96,
        ..request("", 5.0, Sampler::Euler)
    };
    let out = common::generate(
        &sd,
        &ckpt.scheduler,
        &req,
        &[],
        &GivenNoise::default(),
        &device,
    )
    .unwrap();
    assert_eq!(out.latents.dims(), [1, 4, 24, 16]);
    assert_eq!((out.images[0].width, out.images[0].height), (64, 96));
}
