//! CLIP with both towers against transformers' `CLIPModel` and `CLIPImageProcessor`
//! (`tests/fixtures/clip/generate.py`): a tiny random model saved as today's transformers saves
//! it and as the folders of 2021-2023 were laid out, on the CPU and on wgpu (lavapipe); and the
//! errors a wrong folder gets.
#![cfg(not(target_family = "wasm"))]

mod common;
use common::{Goldens, assert_close, fixture};

use burn::tensor::{DType, Device, Int, Tensor};
use sefi::block_on;
use sefi::clip::{ClipFolder, ImageProcessor, PromptFidelity, end_positions, plain_prompt};
use sefi::identity::train::decode_photo;
use sefi::rgb::RgbImage;
use sefi::weights::WeightsError;

const FOLDERS: [&str; 2] = ["tiny-clip", "tiny-clip-2022"];
const PHOTOS: [&str; 3] = ["astronaut.png", "astronaut-256.png", "chelsea.png"];
/// f32 on either backend: the largest error measured is below 2e-6 (values of order 1-10).
const F32_TOL: f32 = 2e-5;

fn goldens() -> Goldens {
    Goldens::open("clip/goldens.safetensors")
}

fn folder(name: &str) -> ClipFolder {
    block_on(ClipFolder::open_dir(&fixture("clip").join(name))).unwrap()
}

fn photo(name: &str) -> RgbImage {
    decode_photo(&std::fs::read(fixture("photos").join(name)).unwrap()).unwrap()
}

fn devices() -> Vec<Device> {
    let gpu = block_on(sefi::device::DeviceChoice::Wgpu.open())
        .expect("no wgpu adapter: run ./scripts/setup.sh test");
    vec![Device::flex(), gpu.device]
}

/// Each row's ids as the tokenizer gave them, and where the text tower pools.
fn ids(g: &Goldens, prefix: &str, device: &Device) -> (Tensor<2, Int>, Tensor<1, Int>) {
    let ids = g.ids(&format!("{prefix}.input_ids"), device);
    let [rows, len] = ids.dims();
    let flat = g.ints(&format!("{prefix}.input_ids"));
    let windows: Vec<Vec<u32>> = flat
        .chunks(len)
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    assert_eq!(windows.len(), rows);
    (ids, end_positions(&windows, device))
}

#[test]
fn both_towers_match_transformers_in_either_layout() {
    let g = goldens();
    for name in FOLDERS {
        let folder = folder(name);
        for device in devices() {
            let model = block_on(sefi::clip::ClipModel::load(
                &folder,
                &device,
                DType::F32,
                &mut |_| {},
            ))
            .unwrap();
            let what = |t: &str| format!("{name} {t} on {device:?}");
            let (ids, eos) = ids(&g, name, &device);
            let embeds = model.text_model.embed_tokens(ids.clone());
            let text = model.text_model.forward_embeds(embeds, eos.clone());
            let golden = |t: &str| g.f32(&format!("{name}.{t}"));
            assert_close(
                text.last_hidden_state,
                golden("text_last_hidden_state"),
                F32_TOL,
                &what("text last_hidden_state"),
            );
            assert_close(
                model.text_embeds(ids, eos),
                golden("text_embeds"),
                F32_TOL,
                &what("text_embeds"),
            );
            let pixels = g.tensor::<4>(&format!("{name}.pixel_values"), &device);
            assert_close(
                model.vision(pixels.clone()).last_hidden_state,
                golden("vision_last_hidden_state"),
                F32_TOL,
                &what("vision last_hidden_state"),
            );
            assert_close(
                model.image_embeds(pixels),
                golden("image_embeds"),
                F32_TOL,
                &what("image_embeds"),
            );
        }
    }
}

#[test]
fn folders_of_2022_are_read_as_transformers_reads_them() {
    let old = folder("tiny-clip-2022");
    let new = folder("tiny-clip");
    // `text_config_dict` and `vision_config_dict` win over the stale full configs beside them.
    let mut text = old.config.text.clone();
    // Ids of the old convention (pooling at the largest id, as the tokenizer's end token is).
    assert_eq!((text.bos_token_id, text.eos_token_id), (0, 2));
    (text.bos_token_id, text.eos_token_id) = (49406, 49407);
    assert_eq!(text, new.config.text);
    assert_eq!(old.config.vision, new.config.vision);
    assert_eq!(old.config.projection_dim, new.config.projection_dim);
    assert_eq!(old.processor, new.processor);
    assert_eq!(old.processor.shortest_edge, 32);
    // Both towers' position_ids buffers are skipped, and the loss temperature in both.
    let skipped: Vec<&str> = old
        .adaptations
        .iter()
        .filter(|a| a.loaded_as.is_none())
        .map(|a| a.stored.as_str())
        .collect();
    assert_eq!(
        skipped.len(),
        3,
        "position_ids of both towers and logit_scale: {skipped:?}"
    );
    assert!(skipped.contains(&"vision_model.embeddings.position_ids"));
    // Without tokenizer files, the bundled vocabulary gives transformers' ids.
    let g = goldens();
    let ids = g.ints("tiny-clip-2022.input_ids");
    let len = ids.len() / 2;
    let tokens = old.tokenizer.tokenize("a photo of a woman in a spacesuit");
    let ours: Vec<i64> = tokens.ids[..=tokens.end_position]
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(ours, ids[..len]);
}

/// The resized and cropped pixels against `CLIPImageProcessor` (PIL's bicubic): the image
/// crate's Catmull-Rom filter rounds once where PIL rounds after each pass, so a level or two
/// may differ; the measured worst is given in the message.
#[test]
fn images_are_resized_and_cropped_as_transformers_does() {
    let g = goldens();
    let openai = ImageProcessor::default();
    for name in PHOTOS {
        let ours = openai.resized(&photo(name));
        assert_eq!((ours.width, ours.height), (224, 224), "{name}");
        let theirs = g.u8(&format!("openai.resized.{name}"));
        // Theirs is channels first.
        let plane = 224 * 224;
        let mut worst = 0u8;
        let mut off = 0usize;
        for (i, px) in ours.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let d = px[c].abs_diff(theirs[c * plane + i]);
                worst = worst.max(d);
                off += (d > 1) as usize;
            }
        }
        eprintln!(
            "{name}: worst {worst} levels, {off} of {} values off by more than 1",
            3 * plane
        );
        assert!(worst <= 16, "{name}: {worst} levels off");
        assert!(
            off * 200 < 3 * plane,
            "{name}: {off} values off by more than 1"
        );
    }
    // The tiny model's 32 px input, normalised, against transformers' pixel values.
    let tiny = folder("tiny-clip").processor;
    let (theirs, _) = g.f32("tiny-clip.pixel_values");
    let ours: Vec<f32> = PHOTOS
        .iter()
        .flat_map(|p| tiny.pixel_values(&photo(p)))
        .collect();
    let worst = ours
        .iter()
        .zip(&theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // Measured: 5 levels of 255 (0.073 after normalising); allowed: 8 levels over the
    // smallest standard deviation (0.261).
    eprintln!("tiny pixel values: worst {worst}");
    assert!(worst <= 8.0 / 255.0 / 0.26, "{worst}");
}

#[test]
fn prompt_fidelity_is_the_cosine_of_both_embeddings() {
    let g = goldens();
    let device = Device::flex();
    let scorer = block_on(PromptFidelity::load(
        folder("tiny-clip"),
        &device,
        DType::F32,
    ))
    .unwrap();
    let images: Vec<RgbImage> = PHOTOS.iter().map(|p| photo(p)).collect();
    let scores = block_on(scorer.scores("a cat", &images)).unwrap();
    let (text, _) = g.f32("tiny-clip.text_embeds");
    let (image, _) = g.f32("tiny-clip.image_embeds");
    let p = text.len() / 2;
    let cat = &text[p..];
    for (i, s) in scores.iter().enumerate() {
        let v = &image[i * p..(i + 1) * p];
        let dot: f32 = v.iter().zip(cat).map(|(a, b)| a * b).sum();
        let norm = |x: &[f32]| x.iter().map(|a| a * a).sum::<f32>().sqrt();
        let expected = dot / (norm(v) * norm(cat));
        // Our resize differs from PIL's by a level here and there (see above).
        eprintln!("{}: {s} vs transformers' {expected}", PHOTOS[i]);
        assert!(
            (s - expected).abs() < 5e-3,
            "{}: {s} vs transformers' {expected}",
            PHOTOS[i]
        );
    }
    assert!(block_on(scorer.scores("a cat", &[])).unwrap().is_empty());
}

#[test]
fn the_prompt_is_scored_without_its_placeholders() {
    let alice = [("alice", "woman")];
    assert_eq!(
        plain_prompt("a photo of <alice> holding a basketball", &alice),
        "a photo of woman holding a basketball"
    );
    assert_eq!(
        plain_prompt("<bob> and <alice> at the beach", &alice),
        "and woman at the beach"
    );
}

#[test]
fn wrong_folders_say_what_to_give() {
    let sd = block_on(ClipFolder::open_dir(&fixture("sd/tiny-sd1")))
        .err()
        .unwrap();
    assert!(
        matches!(sd, WeightsError::NotClip { .. }),
        "an SD folder: {sd}"
    );
    let text_encoder = block_on(ClipFolder::open_dir(&fixture("sd/tiny-sd1/text_encoder")))
        .err()
        .unwrap();
    assert!(
        text_encoder.to_string().contains("clip-vit-large-patch14"),
        "a text encoder alone: {text_encoder}"
    );
    // A folder with only the pickle weights.
    let dir = tempdir("folders");
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(fixture("clip/tiny-clip").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("pytorch_model.bin"), b"PK\x03\x04").unwrap();
    let pickle = block_on(ClipFolder::open_dir(&dir)).err().unwrap();
    assert!(matches!(pickle, WeightsError::Pickle { .. }), "{pickle}");
    // Weights without the vision tower.
    std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    let bytes = std::fs::read(fixture("clip/tiny-clip/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("vision_model."))
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
    let f = block_on(ClipFolder::open_dir(&dir)).unwrap();
    let missing = block_on(sefi::clip::ClipModel::load(
        &f,
        &Device::flex(),
        DType::F32,
        &mut |_| {},
    ))
    .err()
    .unwrap();
    assert!(
        matches!(&missing, WeightsError::Missing { name, .. } if name.starts_with("vision_model.")),
        "{missing}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fresh folder of this test run's own.
fn tempdir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sefi-clip-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `sefi generate --clip` and `sefi score --clip` give the library's score: the prompt from
/// the PNG's parameters (or `--prompt`), in text and in JSON.
#[test]
fn the_command_line_scores_prompt_fidelity() {
    let dir = tempdir("cli");
    let out = dir.join("cat.png");
    let clip = fixture("clip/tiny-clip");
    let (clip, out_s) = (clip.to_str().unwrap(), out.to_str().unwrap());
    let model = fixture("sd/tiny-sd1");
    let o = common::sefi_ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--out",
        out_s,
        "--clip",
        clip,
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let generated = json["images"][0]["clip_t"].as_f64().unwrap() as f32;
    let o = common::sefi_ok(&[
        "score", "--image", out_s, "--clip", clip, "--device", "cpu", "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let scored = json["images"][0]["clip_t"].as_f64().unwrap() as f32;
    assert!((generated - scored).abs() < 1e-5, "{generated} vs {scored}");
    let scorer = block_on(PromptFidelity::load(
        folder("tiny-clip"),
        &Device::flex(),
        DType::F32,
    ))
    .unwrap();
    let image = photo("chelsea.png");
    let expected = block_on(scorer.scores("a cat", &[image])).unwrap()[0];
    let chelsea = fixture("photos/chelsea.png");
    let o = common::sefi_ok(&[
        "score",
        "--image",
        chelsea.to_str().unwrap(),
        "--clip",
        clip,
        "--prompt",
        "a cat",
        "--device",
        "cpu",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("prompt fidelity (CLIP-T) {expected:.3}")),
        "{text}"
    );
    // A photo has no prompt of its own to score against.
    let o = common::sefi(&[
        "score",
        "--image",
        chelsea.to_str().unwrap(),
        "--clip",
        clip,
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--prompt"));
    // Nor is an SD folder a CLIP model.
    let o = common::sefi(&[
        "score",
        "--image",
        out_s,
        "--clip",
        model.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a CLIP model"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// openai/clip-vit-large-patch14's config builds the model of its published size: 427,616,513
/// parameters in transformers, `logit_scale` (not needed for a cosine) included.
#[test]
fn vit_l_14_has_the_published_parameter_count() {
    let mut text = sefi::config::TextConfig::v1_5();
    text.projection_dim = 768;
    let config = sefi::clip::ClipConfig {
        text,
        vision: sefi::clip::VisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            ..Default::default()
        },
        projection_dim: 768,
    };
    let store = sefi::nn::VarStore::shapes(&Device::flex(), sefi::weights::Component::Clip);
    sefi::clip::ClipModel::new(store.root(), &config).unwrap();
    assert_eq!(store.param_count() + 1, 427_616_513);
}
