//! Checkpoint reading: full-size parameter counts, real config files, format detection, the
//! errors for bad files, and `sefi inspect`.
#![cfg(not(target_family = "wasm"))]

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::Device;
use safetensors::tensor::{SafeTensors, TensorView};
use sefi::block_on;
use sefi::config::{SdConfig, TextConfig, UNetConfig, VaeConfig, from_json};
use sefi::sd::{param_counts, validate};
use sefi::weights::checkpoint::DiffusersParts;
use sefi::weights::open::{Variant, config_from_dir};
use sefi::weights::{
    ByteSource, Checkpoint, Component, Family, FileSource, Format, MemorySource, SafetensorsFile,
    WeightsError,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd")
        .join(name)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn full_size_configs_have_the_real_parameter_counts() {
    let counts = json(&fixture("param_counts.json"));
    let device = Device::flex();
    for (key, config) in [
        ("sd15", SdConfig::v1_5()),
        ("sd21", SdConfig::v2_1()),
        ("sd21-base", SdConfig::v2_1_base()),
    ] {
        let mut expected: Vec<u64> = ["unet", "text_encoder", "vae"]
            .iter()
            .map(|c| counts[key][c].as_u64().unwrap())
            .collect();
        expected.push(0); // no second text encoder
        assert_eq!(
            param_counts(&config, &device).unwrap().to_vec(),
            expected,
            "{key}"
        );
    }
    // The numbers diffusers reports for SD 1.5.
    assert_eq!(
        param_counts(&SdConfig::v1_5(), &device).unwrap(),
        [859_520_964, 123_060_480, 83_653_863, 0]
    );
}

#[test]
fn real_config_files_read_as_the_constructors() {
    for (dir, sd) in [
        ("sd15", SdConfig::v1_5()),
        ("sd21", SdConfig::v2_1()),
        ("sd21-base", SdConfig::v2_1_base()),
    ] {
        let read = |c: &str| {
            std::fs::read_to_string(fixture(&format!("configs/{dir}/{c}/config.json"))).unwrap()
        };
        assert_eq!(
            from_json::<UNetConfig>("unet", &read("unet")).unwrap(),
            sd.unet,
            "{dir} unet"
        );
        let text: TextConfig = from_json("text_encoder", &read("text_encoder")).unwrap();
        assert_eq!(text, sd.text_encoder, "{dir} text encoder");
        assert_eq!(
            from_json::<VaeConfig>("vae", &read("vae")).unwrap(),
            sd.vae,
            "{dir} vae"
        );
    }
}

#[test]
fn tiny_configs_are_the_fixture_models() {
    assert_eq!(
        block_on(config_from_dir(&fixture("tiny-sd1"))).unwrap(),
        SdConfig::tiny_sd1()
    );
    assert_eq!(
        block_on(config_from_dir(&fixture("tiny-sd2"))).unwrap(),
        SdConfig::tiny_sd2()
    );
}

#[test]
fn unsupported_unet_variants_are_named() {
    let text = std::fs::read_to_string(fixture("tiny-sd1/unet/config.json")).unwrap();
    assert!(sefi::config::check_unet_json("unet/config.json", &text).is_ok());
    let lcm = text.replace(
        "\"time_cond_proj_dim\": null",
        "\"time_cond_proj_dim\": 256",
    );
    assert_ne!(lcm, text);
    let err = sefi::config::check_unet_json("unet/config.json", &lcm).unwrap_err();
    assert!(err.to_string().contains("time_cond_proj_dim"), "{err}");
}

fn open_bytes(name: &str, bytes: Vec<u8>) -> Result<SafetensorsFile, WeightsError> {
    block_on(SafetensorsFile::open(Box::new(MemorySource::new(
        name, bytes,
    ))))
}

#[test]
fn a_truncated_file_says_so() {
    let bytes = std::fs::read(fixture("tiny-sd1/vae/diffusion_pytorch_model.safetensors")).unwrap();
    let cut = bytes[..bytes.len() - 1000].to_vec();
    match open_bytes("vae.safetensors", cut) {
        Err(WeightsError::Truncated { needed, actual, .. }) => assert_eq!(needed - actual, 1000),
        other => panic!("expected Truncated, got {other:?}"),
    }
    // Cut inside the header.
    let err = open_bytes("vae.safetensors", bytes[..100].to_vec()).unwrap_err();
    assert!(matches!(err, WeightsError::Truncated { .. }), "{err:?}");
    assert!(err.to_string().contains("interrupted"), "{err}");
}

#[test]
fn a_corrupt_header_says_so() {
    let mut bytes =
        std::fs::read(fixture("tiny-sd1/vae/diffusion_pytorch_model.safetensors")).unwrap();
    bytes[8] = b'#';
    let err = open_bytes("vae.safetensors", bytes).unwrap_err();
    assert!(matches!(err, WeightsError::CorruptHeader { .. }), "{err:?}");
    assert!(
        err.to_string().contains("not a valid safetensors file"),
        "{err}"
    );
    let err = open_bytes(
        "junk.safetensors",
        b"\xff\xff\xff\xff\xff\xff\xff\x7fhello".to_vec(),
    )
    .unwrap_err();
    assert!(matches!(err, WeightsError::CorruptHeader { .. }), "{err:?}");
}

#[test]
fn pickle_checkpoints_are_refused_with_the_reason() {
    let err = block_on(Checkpoint::open_path(
        &fixture("not-safetensors.ckpt"),
        Variant::Auto,
        None,
    ))
    .unwrap_err();
    assert!(matches!(err, WeightsError::Pickle { .. }), "{err:?}");
    assert!(err.to_string().contains("safetensors"), "{err}");
    // Recognised by content too, whatever the name.
    let bytes = std::fs::read(fixture("not-safetensors.ckpt")).unwrap();
    let err = open_bytes("model.safetensors", bytes).unwrap_err();
    assert!(matches!(err, WeightsError::Pickle { .. }), "{err:?}");
}

/// A copy of a safetensors file with tensors removed, renamed or added.
fn rewrite(path: &Path, edit: impl Fn(&mut Vec<(String, TensorView)>)) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, TensorView)> = st.tensors();
    edit(&mut tensors);
    safetensors::serialize(tensors, None).unwrap()
}

/// A copy of the tensor of a rewritten file named `name`.
fn tensor<'a>(tensors: &[(String, TensorView<'a>)], name: &str) -> TensorView<'a> {
    tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .1
        .clone()
}

fn tiny_sd1_with_vae(vae: Vec<u8>) -> Result<Checkpoint, WeightsError> {
    let dir = fixture("tiny-sd1");
    let file =
        |p: &str| -> Box<dyn ByteSource> { Box::new(FileSource::open(&dir.join(p)).unwrap()) };
    let text = |p: &str| Some(std::fs::read_to_string(dir.join(p)).unwrap());
    let parts = DiffusersParts {
        unet: vec![file("unet/diffusion_pytorch_model.safetensors")],
        text_encoder: vec![file("text_encoder/model.safetensors")],
        vae: vec![Box::new(MemorySource::new(
            "vae/diffusion_pytorch_model.safetensors",
            vae,
        ))],
        text_encoder_2: Vec::new(),
        unet_config: text("unet/config.json"),
        text_encoder_config: text("text_encoder/config.json"),
        text_encoder_2_config: None,
        model_index: text("model_index.json"),
        vae_config: text("vae/config.json"),
        scheduler_config: text("scheduler/scheduler_config.json"),
        tokenizer: None,
        tokenizer_2: None,
    };
    block_on(Checkpoint::diffusers("tiny-sd1", parts))
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let vae = fixture("tiny-sd1/vae/diffusion_pytorch_model.safetensors");
    let device = Device::flex();

    let missing = rewrite(&vae, |t| t.retain(|(n, _)| n != "decoder.conv_out.bias"));
    let err = validate(&tiny_sd1_with_vae(missing).unwrap(), &device).unwrap_err();
    assert_eq!(
        err,
        WeightsError::Missing {
            path: "tiny-sd1".into(),
            component: Component::Vae,
            name: "decoder.conv_out.bias".into()
        }
    );
    assert!(err.to_string().contains("decoder.conv_out.bias"));

    let extra = rewrite(&vae, |t| {
        let copy = tensor(t, "decoder.conv_out.bias");
        t.push(("decoder.extra_head.bias".into(), copy));
    });
    let err = validate(&tiny_sd1_with_vae(extra).unwrap(), &device).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Unexpected { first, count: 1, .. } if first == "decoder.extra_head.bias"),
        "{err:?}"
    );

    let swapped = rewrite(&vae, |t| {
        for (n, _) in t.iter_mut() {
            *n = match n.as_str() {
                "decoder.conv_out.bias" => "decoder.conv_in.bias".into(),
                "decoder.conv_in.bias" => "decoder.conv_out.bias".into(),
                _ => n.clone(),
            };
        }
    });
    let err = validate(&tiny_sd1_with_vae(swapped).unwrap(), &device).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Shape { name, .. } if name.starts_with("decoder.conv_")),
        "{err:?}"
    );
}

/// The VAE of the published SD 1.5 folder, edited.
fn published_vae(
    edit: impl Fn(&mut Vec<(String, TensorView)>),
) -> Result<Checkpoint, WeightsError> {
    tiny_sd1_with_vae(rewrite(
        &fixture("tiny-sd1-2022/vae/diffusion_pytorch_model.safetensors"),
        edit,
    ))
}

#[test]
fn older_names_are_accepted_and_nothing_else() {
    let device = Device::flex();
    let ckpt = published_vae(|_| {}).unwrap();
    validate(&ckpt, &device).unwrap();
    let renamed: Vec<_> = ckpt
        .adaptations
        .iter()
        .filter_map(|a| a.loaded_as.as_deref())
        .collect();
    assert_eq!(renamed.len(), 16, "{renamed:?}");
    assert!(renamed.contains(&"encoder.mid_block.attentions.0.to_q.weight"));

    // An unknown tensor beside the old names is still refused, by name.
    let err = validate(
        &published_vae(|t| {
            let bias = tensor(t, "decoder.mid_block.attentions.0.query.bias");
            t.push(("decoder.mid_block.attentions.0.query.scale".into(), bias));
        })
        .unwrap(),
        &device,
    )
    .unwrap_err();
    assert!(
        matches!(&err, WeightsError::Unexpected { first, count: 1, .. } if first == "decoder.mid_block.attentions.0.query.scale"),
        "{err:?}"
    );
    assert!(err.to_string().contains("query.scale"), "{err}");

    // An old name of the wrong shape is named as stored would be loaded.
    let err = validate(
        &published_vae(|t| {
            let bias = tensor(t, "decoder.mid_block.attentions.0.key.bias");
            for (n, v) in t.iter_mut() {
                if n == "decoder.mid_block.attentions.0.key.weight" {
                    *v = bias.clone();
                }
            }
        })
        .unwrap(),
        &device,
    )
    .unwrap_err();
    assert!(
        matches!(&err, WeightsError::Shape { name, .. } if name == "decoder.mid_block.attentions.0.to_k.weight"),
        "{err:?}"
    );

    // The same tensor under both names is ambiguous: refused, naming both.
    let err = published_vae(|t| {
        let q = tensor(t, "decoder.mid_block.attentions.0.query.weight");
        t.push(("decoder.mid_block.attentions.0.to_q.weight".into(), q));
    })
    .unwrap_err();
    assert!(
        matches!(&err, WeightsError::UnknownModel { reason, .. } if reason.contains("to_q.weight") && reason.contains("query.weight")),
        "{err:?}"
    );
}

#[test]
fn a_folder_with_only_pickles_says_so() {
    let dir = std::env::temp_dir().join(format!("sefi-pickles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let published = fixture("tiny-sd1-2022");
    for f in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ] {
        std::fs::create_dir_all(dir.join(f).parent().unwrap()).unwrap();
        std::fs::copy(published.join(f), dir.join(f)).unwrap();
    }
    let err = block_on(Checkpoint::open_path(&dir, Variant::Auto, None)).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        matches!(&err, WeightsError::Pickle { file } if file.ends_with("text_encoder/pytorch_model.bin")),
        "{err:?}"
    );
    assert!(err.to_string().contains(".safetensors"), "{err}");
}

#[test]
fn the_wrong_family_or_size_is_explained() {
    // A single file read with the sizes of another model.
    let ckpt = block_on(Checkpoint::open_path(
        &fixture("tiny-sd1.safetensors"),
        Variant::Auto,
        None,
    ))
    .unwrap();
    assert_eq!(ckpt.family, Family::Sd1);
    let err = validate(&ckpt, &Device::flex()).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Shape { expected, found, .. } if expected[0] == 320 && found[0] == 32),
        "{err:?}"
    );

    // An sgm file is recognised as SDXL; one that holds only a text layer lacks the rest.
    let sdxl = safetensors::serialize(
        [(
            "conditioner.embedders.1.model.ln_final.weight".to_string(),
            TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap(),
        )],
        None,
    )
    .unwrap();
    let ckpt = block_on(Checkpoint::single_file(
        Box::new(MemorySource::new("sdxl.safetensors", sdxl)),
        None,
    ))
    .unwrap();
    assert_eq!(ckpt.family, Family::Sdxl);
    let err = validate(&ckpt, &Device::flex()).unwrap_err();
    assert!(matches!(err, WeightsError::Missing { .. }), "{err:?}");

    // A safetensors file that is not Stable Diffusion at all.
    let other = safetensors::serialize(
        [(
            "encoder.layer.0.weight".to_string(),
            TensorView::new(safetensors::Dtype::F32, vec![1], &[0u8; 4]).unwrap(),
        )],
        None,
    )
    .unwrap();
    let err = block_on(Checkpoint::single_file(
        Box::new(MemorySource::new("bert.safetensors", other)),
        None,
    ))
    .unwrap_err();
    assert!(matches!(err, WeightsError::UnknownModel { .. }), "{err:?}");
}

fn inspect(args: &[&str]) -> (serde_json::Value, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_sefi"))
        .arg("inspect")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}")),
        out.status.success(),
    )
}

#[test]
fn inspect_tells_each_fixture() {
    let device = Device::flex();
    let sd1 = param_counts(&SdConfig::tiny_sd1(), &device).unwrap();
    let sd2 = param_counts(&SdConfig::tiny_sd2(), &device).unwrap();
    let dir = |m: &str| fixture(m).display().to_string();
    let cases = [
        (
            vec![dir("tiny-sd1")],
            "sd1",
            "diffusers",
            "F32",
            sd1,
            "files",
        ),
        (
            vec![dir("tiny-sd1"), "--fp16".into()],
            "sd1",
            "diffusers",
            "F16",
            sd1,
            "files",
        ),
        (
            vec![dir("tiny-sd2")],
            "sd2-v",
            "diffusers",
            "F16",
            sd2,
            "bundled",
        ),
        (
            vec![dir("tiny-sd1-2022")],
            "sd1",
            "diffusers",
            "F32",
            sd1,
            "files",
        ),
        (
            vec![dir("tiny-sd1-2022"), "--fp16".into()],
            "sd1",
            "diffusers",
            "F16",
            sd1,
            "files",
        ),
        (
            vec![dir("tiny-sd2-2022")],
            "sd2-v",
            "diffusers",
            "F16",
            sd2,
            "files",
        ),
        (
            vec![
                dir("tiny-sd1.safetensors"),
                "--config".into(),
                dir("tiny-sd1"),
            ],
            "sd1",
            "single-file",
            "F16",
            sd1,
            "bundled",
        ),
        (
            vec![
                dir("tiny-sd2.safetensors"),
                "--config".into(),
                dir("tiny-sd2"),
            ],
            "sd2-v",
            "single-file",
            "BF16",
            sd2,
            "bundled",
        ),
    ];
    for (args, family, format, dtype, params, tokenizer) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (r, ok) = inspect(&args);
        assert!(ok, "{args:?}: {r}");
        assert_eq!(r["family"], family, "{args:?}");
        assert_eq!(r["format"], format, "{args:?}");
        assert_eq!(r["dtype"], dtype, "{args:?}");
        assert_eq!(r["tokenizer"]["kind"], tokenizer, "{args:?}");
        assert_eq!(r["layout"], "ok", "{args:?}");
        let got = ["unet", "text_encoder", "vae"].map(|c| r["params"][c].as_u64().unwrap());
        assert_eq!(got[..], params[..3], "{args:?}");
        assert!(r["params"].get("text_encoder_2").is_none(), "{args:?}");
    }
    // The published layouts say what was adapted.
    let (r, _) = inspect(&[&dir("tiny-sd1-2022")]);
    let adapted = r["adapted"].as_array().unwrap();
    assert_eq!(adapted.len(), 17, "{r}");
    assert!(adapted.contains(&serde_json::json!({
        "component": "text_encoder",
        "stored": "text_model.embeddings.position_ids",
        "loaded_as": null
    })));
    assert!(adapted.contains(&serde_json::json!({
        "component": "vae",
        "stored": "decoder.mid_block.attentions.0.proj_attn.weight",
        "loaded_as": "decoder.mid_block.attentions.0.to_out.0.weight"
    })));
    let (r, _) = inspect(&[&dir("tiny-sd1")]);
    assert_eq!(
        r["adapted"],
        serde_json::json!([]),
        "today's layout needs nothing adapted"
    );

    // Without the sizes, a tiny single file does not fit SD 1.5's layout: said, with a failing status.
    let (r, ok) = inspect(&[&dir("tiny-sd1.safetensors")]);
    assert!(!ok);
    assert!(
        r["layout"].as_str().unwrap().contains("expects [320]"),
        "{r}"
    );
}

#[test]
fn formats_are_detected() {
    let folder = block_on(Checkpoint::open_path(
        &fixture("tiny-sd1"),
        Variant::Auto,
        None,
    ))
    .unwrap();
    assert_eq!(folder.format, Format::Diffusers);
    let single = block_on(Checkpoint::open_path(
        &fixture("tiny-sd2.safetensors"),
        Variant::Auto,
        None,
    ))
    .unwrap();
    assert_eq!(
        (single.format, single.family),
        (Format::SingleFile, Family::Sd2V)
    );
    // The last OpenCLIP block is dropped: the text encoder has the diffusers folder's tensors.
    let sd2 = block_on(Checkpoint::open_path(
        &fixture("tiny-sd2"),
        Variant::Auto,
        None,
    ))
    .unwrap();
    let names = |c: &Checkpoint| {
        c.entries(Component::TextEncoder)
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&single), names(&sd2));
}
