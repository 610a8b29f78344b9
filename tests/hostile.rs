//! Hostile input: every parser of bytes a user or a website supplies (and the single-file key
//! mapper behind one of them), fed random and mutated
//! data (property-based, on stable Rust). The property is always the same: a typed error or a
//! valid result, never a panic, and no allocation a file's claims alone would cause. Each
//! property runs a fixed number of cases (`PROPTEST_CASES`, 256 by default; more for a longer
//! search); proptest keeps failing inputs in a regressions file beside this one, which is
//! committed and replayed first.
#![cfg(not(target_family = "wasm"))]

use std::path::Path;
use std::sync::LazyLock;

use proptest::prelude::*;
use sefi::app::catalog::Manifest;
use sefi::app::view::RunRecord;
use sefi::block_on;
use sefi::clip::tokenizer::{CONTEXT_LENGTH, ClipTokenizer, is_placeholder_name};
use sefi::config::{TextConfig, UNetConfig, VaeConfig, from_json};
use sefi::identity::settings::TrainConfig;
use sefi::identity::train::decode_photo;
use sefi::identity::{Fingerprint, Identity};
use sefi::pipeline::png::{MAX_PARAMETERS, Parameters, encode, parameters_text, read_parameters};
use sefi::pipeline::{GenerateRequest, RgbImage};
use sefi::schedule::Sampler;
use sefi::weights::Family;
use sefi::weights::{MemorySource, SafetensorsFile};

/// A stored training run's record, as the page writes it.
static RUN_RECORD: LazyLock<Vec<u8>> = LazyLock::new(|| {
    serde_json::to_vec(&RunRecord {
        config: TrainConfig::new("alice", "person", 512),
        model_id: "d269fcd2b55104ee".into(),
        model_name: "tiny-sd1-2022".into(),
        photos: 2,
        step: 30,
    })
    .unwrap()
});

/// A generated image as SeFi Studio writes it: with an ASCII prompt, and with a non-ASCII one.
static GENERATED_PNG: LazyLock<(Vec<u8>, Vec<u8>)> = LazyLock::new(|| {
    let image = RgbImage {
        width: 8,
        height: 8,
        data: (0..192).map(|i| i as u8).collect(),
    };
    let mut req = GenerateRequest {
        prompt: "a photo of <alice>, smiling".into(),
        negative_prompt: "blurry".into(),
        ..GenerateRequest::default()
    };
    let ascii = encode(&image, &parameters_text(&req, 42, "tiny-sd1")).unwrap();
    req.prompt = "ein Foto von <alice> am Mittelmeer, Sonnenuntergang — 夕日".into();
    let utf8 = encode(&image, &parameters_text(&req, 42, "tiny-sd1")).unwrap();
    (ascii, utf8)
});

/// Built once: the vocabulary takes a while to read.
static TOKENIZER: LazyLock<ClipTokenizer> =
    LazyLock::new(|| ClipTokenizer::openai("<|endoftext|>"));

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

/// `bytes` with some positions overwritten, some cut off, or some inserted: the damage real
/// files suffer (a truncated download, a flipped byte, a tool that appended something).
fn mutated(original: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = original.len();
    (
        prop::collection::vec((0..len.max(1), any::<u8>()), 0..16),
        prop::option::of(0..len + 1),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(move |(writes, cut, tail)| {
            let mut b = original.clone();
            for (at, v) in writes {
                if at < b.len() {
                    b[at] = v;
                }
            }
            if let Some(cut) = cut {
                b.truncate(cut);
            }
            b.extend(tail);
            b
        })
}

/// A safetensors file: every tensor of it, read in full.
fn read_safetensors(bytes: Vec<u8>) {
    let Ok(file) = block_on(SafetensorsFile::open(Box::new(MemorySource::new(
        "hostile.safetensors",
        bytes,
    )))) else {
        return;
    };
    for (name, _, _) in file.tensors() {
        let _ = block_on(file.read(&name));
    }
}

/// A safetensors header of `n` bytes claimed, then `body`.
fn with_header(n: u64, body: &[u8]) -> Vec<u8> {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(body);
    b
}

proptest! {
    #[test]
    fn safetensors_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        read_safetensors(bytes);
    }

    /// Headers that claim any size, up to gigabytes, over a short body: refused before
    /// anything that size is allocated.
    #[test]
    fn safetensors_header_claims(n in any::<u64>(), body in prop::collection::vec(any::<u8>(), 0..64)) {
        read_safetensors(with_header(n, &body));
    }

    /// JSON headers with hostile offsets, shapes and dtypes.
    #[test]
    fn safetensors_hostile_tensor_entries(
        dtype in prop::sample::select(vec!["F32", "F16", "BF16", "I64", "U8", "F64", "X"]),
        shape in prop::collection::vec(any::<u32>(), 0..5),
        start in any::<u32>(),
        end in any::<u32>(),
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let header = format!(
            r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}}}"#
        );
        let mut bytes = with_header(header.len() as u64, header.as_bytes());
        bytes.extend(data);
        read_safetensors(bytes);
    }

    #[test]
    fn safetensors_damaged_identity_file(bytes in mutated(fixture("sefi/tiny-sd1.safetensors"))) {
        read_safetensors(bytes);
    }

    /// Identity files and their metadata: damaged copies of a real one.
    #[test]
    fn identity_files(bytes in mutated(fixture("sefi/tiny-sd1.safetensors"))) {
        if let Ok(id) = block_on(Identity::from_bytes("hostile.safetensors", bytes)) {
            // What loads is consistent: the vectors have the shape the metadata states.
            prop_assert_eq!(id.key.len(), id.stages * id.dim);
            prop_assert_eq!(id.value.len(), id.stages * id.dim);
            prop_assert!(is_placeholder_name(&id.token), "{:?}", id.token);
        }
    }

    /// diffusers config.json readers: damaged copies of real configs and arbitrary text.
    #[test]
    fn config_files(
        unet in mutated(fixture("sd/tiny-sd1/unet/config.json")),
        vae in mutated(fixture("sd/tiny-sd1/vae/config.json")),
        text in mutated(fixture("sd/tiny-sd1/text_encoder/config.json")),
        any_text in ".*",
    ) {
        let s = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let _ = from_json::<UNetConfig>("unet/config.json", &s(unet));
        let _ = from_json::<VaeConfig>("vae/config.json", &s(vae));
        let _ = from_json::<TextConfig>("text_encoder/config.json", &s(text));
        let _ = from_json::<UNetConfig>("unet/config.json", &any_text);
    }

    /// Stored model manifests (the page reads them back from the browser's storage).
    #[test]
    fn stored_manifests(text in ".*") {
        let _ = serde_json::from_str::<Manifest>(&text);
    }

    /// A training run's record (`runs/current/run.json`): damaged copies of a real one.
    #[test]
    fn stored_run_records(bytes in mutated(RUN_RECORD.clone())) {
        if let Ok(r) = serde_json::from_slice::<RunRecord>(&bytes) {
            // What is read is what is written back when its step moves on.
            let again: RunRecord = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
            prop_assert_eq!(again, r);
        }
    }

    /// Photos: damaged copies of a real PNG, and random bytes.
    #[test]
    fn photos(
        png in mutated(fixture("photos/astronaut.png")),
        random in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        for bytes in [png, random] {
            if let Ok(image) = decode_photo(&bytes) {
                prop_assert_eq!(image.data.len(), image.width * image.height * 3);
            }
        }
    }

    /// PNG `parameters` reading: damaged copies of a generated image (text in `tEXt`, and in
    /// `iTXt` for non-ASCII prompts), and random bytes. A text read is never beyond its bound.
    #[test]
    fn png_parameters(
        ascii in mutated(GENERATED_PNG.0.clone()),
        utf8 in mutated(GENERATED_PNG.1.clone()),
        random in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        for bytes in [ascii, utf8, random] {
            if let Ok(text) = read_parameters("hostile.png", &bytes) {
                prop_assert!(text.len() <= MAX_PARAMETERS);
                let mut req = GenerateRequest::default();
                Parameters::parse(&text).apply(&mut req);
            }
        }
    }

    /// Any `parameters` text reads, and what it applies to a request is a request that can run.
    #[test]
    fn any_parameters_text(text in "(.{0,40}(\n|, |: |\"|Steps: |Size: |Negative prompt: )?){0,8}") {
        let mut req = GenerateRequest::default();
        Parameters::parse(&text).apply(&mut req);
        prop_assert!(req.steps >= 1 && req.width % 8 == 0 && req.height % 8 == 0);
        prop_assert!(req.guidance.is_finite());
    }

    /// What an image's parameters say is what made it: the prompts and every setting come back.
    #[test]
    fn parameters_round_trip(
        prompt in "[^\n]{0,60}(\n[^\n]{1,30}){0,2}",
        negative in "[^\n]{0,30}",
        model in ".{1,20}",
        steps in 1usize..200,
        guidance in 0.0f64..30.0,
        sampler in prop::sample::select(Sampler::ALL.to_vec()),
        seed in any::<u64>(),
        (w, h) in (1usize..128, 1usize..128),
    ) {
        // The format cannot tell a prompt line that starts as the negative prompt does.
        prop_assume!(!prompt.lines().any(|l| l.starts_with("Negative prompt:")));
        let model = model.replace(['\n', '\r'], " ");
        let req = GenerateRequest {
            prompt: prompt.trim().into(),
            negative_prompt: negative.trim().into(),
            steps,
            guidance,
            sampler,
            seed,
            width: w * 8,
            height: h * 8,
            ..GenerateRequest::default()
        };
        let image = RgbImage { width: 1, height: 1, data: vec![0; 3] };
        let png = encode(&image, &parameters_text(&req, seed, &model)).unwrap();
        let p = Parameters::parse(&read_parameters("round-trip.png", &png).unwrap());
        let mut back = GenerateRequest::default();
        prop_assert_eq!(p.apply(&mut back), Vec::<String>::new());
        prop_assert_eq!(back, req);
        prop_assert_eq!(p.get("Model"), Some(model.as_str()));
    }

    /// The tokenizer on arbitrary Unicode: always 77 ids from the vocabulary, ending where
    /// it says.
    #[test]
    fn tokenizer_on_any_text(text in ".*") {
        let tok = &*TOKENIZER;
        let t = tok.tokenize(&text);
        prop_assert_eq!(t.ids.len(), CONTEXT_LENGTH);
        prop_assert!(t.ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    }
}

/// Tensor names as single-file checkpoints hold them, recombined: the real prefixes of SD 1.x,
/// 2.x and XL files, block names and numbers in any order, any shapes.
fn single_file_keys() -> impl Strategy<Value = Vec<(String, Vec<usize>)>> {
    let prefix = prop::sample::select(vec![
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.transformer.text_model.",
        "cond_stage_model.model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
        "conditioner.embedders.0.model.",
        "model_ema.",
        "",
    ]);
    let part = prop::sample::select(vec![
        "input_blocks",
        "output_blocks",
        "middle_block",
        "0",
        "1",
        "2",
        "3",
        "9",
        "12",
        "op",
        "conv",
        "weight",
        "bias",
        "transformer",
        "resblocks",
        "attn",
        "in_proj_weight",
        "text_projection",
        "label_emb",
        "encoder",
        "decoder",
        "up",
        "down",
        "block",
        "mid",
        "attn_1",
        "q",
        "proj_out",
        "embeddings",
        "position_ids",
        "layers",
        "ln_final",
        "token_embedding",
        "positional_embedding",
        "18446744073709551616",
    ]);
    let key = (prefix, prop::collection::vec(part, 0..8))
        .prop_map(|(p, parts)| format!("{p}{}", parts.join(".")));
    prop::collection::vec((key, prop::collection::vec(0usize..5, 0..5)), 0..40)
}

/// A safetensors file holding `keys` (zeros, f32; repeated names once).
fn file_of(keys: &[(String, Vec<usize>)]) -> Vec<u8> {
    let mut unique = std::collections::BTreeMap::new();
    for (k, shape) in keys {
        unique.entry(k.clone()).or_insert_with(|| shape.clone());
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = unique
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            (k, shape, vec![0u8; 4 * n])
        })
        .collect();
    let views = data.iter().map(|(k, shape, bytes)| {
        (
            k.clone(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

proptest! {
    /// The single-file key mapper on any names: mapped, ignored or unknown, never a panic;
    /// and a file of them opens as a checkpoint (or is refused with a typed error) whose
    /// tensors all read back.
    #[test]
    fn single_file_key_mapper(keys in single_file_keys()) {
        use sefi::weights::ldm::{LdmFamily, map_keys};
        for family in [LdmFamily::Sd1, LdmFamily::Sd2, LdmFamily::Sdxl] {
            let map = map_keys(&keys, family);
            // Every name is accounted for, and no diffusers name is made twice.
            for (k, _) in &keys {
                prop_assert!(
                    map.mapped.iter().any(|m| &m.source == k)
                        || map.ignored.contains(k)
                        || map.unknown.contains(k),
                    "{k} vanished"
                );
            }
            let mut targets: Vec<&str> = map.mapped.iter().map(|m| m.target.as_str()).collect();
            let n = targets.len();
            targets.sort();
            targets.dedup();
            prop_assert_eq!(targets.len(), n);
        }
        let bytes = file_of(&keys);
        let opened = block_on(sefi::weights::Checkpoint::single_file(
            Box::new(MemorySource::new("fuzz.safetensors", bytes)),
            None,
        ));
        if let Ok(ckpt) = opened {
            for c in sefi::weights::Component::ALL {
                for name in ckpt.entries(c).keys() {
                    let t = block_on(ckpt.read(c, name));
                    prop_assert!(t.is_ok(), "{name}: {:?}", t.err());
                }
            }
        }
    }
}

/// A PNG whose header claims 100000 x 100000 pixels (30 GB of RGB) over a few bytes: refused
/// without allocating it.
#[test]
fn a_photo_claiming_huge_dimensions_is_refused() {
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header()
            .unwrap()
            .write_image_data(&[1, 2, 3])
            .unwrap();
    }
    // IHDR's width and height follow the 8-byte signature and the chunk's length and type.
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    let err = decode_photo(&png).expect_err("a 30 GB photo");
    assert!(!err.is_empty());
}

/// `bytes`, a safetensors file, with its metadata `key` set to `value`.
fn with_metadata(bytes: &[u8], key: &str, value: &str) -> Vec<u8> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header["__metadata__"][key] = value.into();
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = with_header(text.len() as u64, text.as_bytes());
    out.extend(&bytes[8 + len..]);
    out
}

/// An identity's name becomes a file name in storage and text on the page: one that is not a
/// name a prompt can use (markup, a path, nothing) is refused when the file is read.
#[test]
fn identity_names_that_are_markup_or_paths_are_refused() {
    let original = Identity {
        token: "alice".into(),
        class_word: "person".into(),
        stages: 5,
        family: Family::Sd1,
        dim: 4,
        key: vec![0.5; 20],
        value: vec![-0.5; 20],
        fingerprint: Fingerprint {
            vocab: 49408,
            dim: 4,
            widths: Vec::new(),
            samples: vec![0.25; 3],
        },
        training: serde_json::Value::Null,
        faces: Vec::new(),
    }
    .to_bytes()
    .unwrap();
    let same = with_metadata(&original, "token", "alice");
    assert_eq!(
        block_on(Identity::from_bytes("ok.safetensors", same))
            .unwrap()
            .token,
        "alice"
    );
    for name in [
        "<img src=x onerror=alert(1)>",
        "../models/x",
        "a/b",
        "",
        "alice\u{0}",
        "<script>",
    ] {
        let bytes = with_metadata(&original, "token", name);
        let err = block_on(Identity::from_bytes("hostile.safetensors", bytes))
            .expect_err(name)
            .to_string();
        assert!(err.contains("cannot be used"), "{name:?}: {err}");
    }
}
