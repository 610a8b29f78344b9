//! `sefi generate`: images with their parameters, reproducible seeds, and clear errors.
#![cfg(not(target_family = "wasm"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd")
        .join(name)
        .display()
        .to_string()
}

fn sefi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sefi"))
        .arg("generate")
        .args(args)
        .output()
        .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sefi-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `parameters` text chunk of a PNG, and its size.
fn png_parameters(path: &Path) -> (String, (u32, u32)) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|t| t.keyword == "parameters")
                .map(|t| t.get_text().unwrap())
        })
        .expect("a parameters chunk");
    (text, (info.width, info.height))
}

#[test]
fn every_model_and_sampler_writes_a_png_with_its_parameters() {
    let models: [(&str, Vec<String>); 4] = [
        ("tiny-sd1", vec![]),
        ("tiny-sd2", vec![]),
        (
            "tiny-sd1.safetensors",
            vec!["--config".into(), fixture("tiny-sd1")],
        ),
        (
            "tiny-sd2.safetensors",
            vec!["--config".into(), fixture("tiny-sd2")],
        ),
    ];
    for (model, extra) in &models {
        for sampler in ["ddim", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras"] {
            let out = tmp(&format!("{model}-{sampler}.png"));
            let path = fixture(model);
            let mut args = vec![
                "--model",
                &path,
                "--prompt",
                "a photo of sks person",
                "--negative-prompt",
                "blurry",
                "--steps",
                "4",
                "--scheduler",
                sampler,
                "--seed",
                "42",
                "--device",
                "cpu",
                "--out",
                out.to_str().unwrap(),
            ];
            args.extend(extra.iter().map(String::as_str));
            let o = sefi(&args);
            assert!(o.status.success(), "{model} {sampler}: {}", stderr(&o));
            let (text, size) = png_parameters(&out);
            assert_eq!(size, (64, 64));
            assert!(
                text.starts_with(
                    "a photo of sks person\nNegative prompt: blurry\nSteps: 4, Sampler: "
                ),
                "{text}"
            );
            let stem = model.trim_end_matches(".safetensors");
            assert!(
                text.contains(&format!(
                    "CFG scale: 7.5, Seed: 42, Size: 64x64, Model: {stem}"
                )),
                "{text}"
            );
        }
    }
}

/// `--latents` in, `--save-latents` out: the command reproduces diffusers' run.
#[test]
fn given_latents_reproduce_diffusers() {
    let goldens = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/tiny-sd1.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&goldens).unwrap();
    let init = tmp("init.safetensors");
    std::fs::write(
        &init,
        safetensors::serialize([("latents", st.tensor("latents.init").unwrap())], None).unwrap(),
    )
    .unwrap();
    let saved = tmp("final.safetensors");
    let out = tmp("given.png");
    let o = sefi(&[
        "--model",
        &fixture("tiny-sd1"),
        "--prompt",
        "a photo of sks person, oil painting",
        "--negative-prompt",
        "blurry, low quality",
        "--steps",
        "10",
        "--guidance",
        "7.5",
        "--scheduler",
        "dpmpp-2m-karras",
        "--width",
        "64",
        "--height",
        "64",
        "--device",
        "cpu",
        "--latents",
        init.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&saved).unwrap();
    let got = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    let (a, b) = (
        f32s(got.tensor("latents").unwrap().data()),
        f32s(st.tensor("final.dpmpp-2m-karras").unwrap().data()),
    );
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale;
    assert!(err < 1e-3, "relative error {err}");
}

#[test]
fn the_same_seed_gives_the_same_image() {
    let run = |name: &str, seed: &str, n: &str| {
        let out = tmp(name);
        let o = sefi(&[
            "--model",
            &fixture("tiny-sd2"),
            "--prompt",
            "a cat",
            "--steps",
            "3",
            "--scheduler",
            "euler-a",
            "--seed",
            seed,
            "--num-images",
            n,
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        out
    };
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let a = read(run("a.png", "7", "1"));
    assert_eq!(a, read(run("b.png", "7", "1")));
    assert_ne!(a, read(run("c.png", "8", "1")));
    // Image 2 of a batch from seed 7 is the image of seed 8.
    run("batch.png", "7", "2");
    let second = tmp("batch-2.png");
    let c = read(tmp("c.png"));
    let strip = |b: Vec<u8>| {
        png::Decoder::new(std::io::Cursor::new(b))
            .read_info()
            .map(|mut r| {
                let mut buf = vec![0; r.output_buffer_size().unwrap()];
                r.next_frame(&mut buf).unwrap();
                buf
            })
            .unwrap()
    };
    // Same noise; batched arithmetic may round a few values differently.
    let (x, y) = (strip(read(second)), strip(c));
    assert_eq!(x.len(), y.len());
    let diff = x.iter().zip(&y).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(
        diff <= 2,
        "image 2 of a batch from seed 7 differs from the image of seed 8 by {diff}"
    );
}

#[test]
fn bad_requests_are_clear_errors() {
    let out = tmp("bad.png");
    let out = out.to_str().unwrap();
    let model = fixture("tiny-sd1");
    let cases: [(&[&str], &str); 4] = [
        (&["--scheduler", "plms"], "unknown sampler `plms`"),
        (&["--width", "60"], "multiples of 8"),
        (&["--steps", "0"], "steps must be at least 1"),
        (
            &["--latents", &fixture("tiny-sd1/goldens.safetensors")],
            "no tensor named `latents`",
        ),
    ];
    for (extra, message) in cases {
        let mut args = vec![
            "--model", &model, "--prompt", "x", "--device", "cpu", "--out", out,
        ];
        args.extend_from_slice(extra);
        let o = sefi(&args);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(stderr(&o).contains(message), "{extra:?}: {}", stderr(&o));
    }
    // Latents of the wrong shape.
    let wrong = tmp("wrong.safetensors");
    let zeros = vec![0u8; 4 * 4 * 4 * 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4, 4, 4], &zeros)
            .unwrap();
    std::fs::write(
        &wrong,
        safetensors::serialize([("latents", view)], None).unwrap(),
    )
    .unwrap();
    let o = sefi(&[
        "--model",
        &model,
        "--prompt",
        "x",
        "--device",
        "cpu",
        "--out",
        out,
        "--latents",
        wrong.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("[1, 4, 8, 8]"), "{}", stderr(&o));
}

/// Images made by other tools (Pillow's `PngInfo`, as the popular web UIs write them): their
/// settings read back as written, from `tEXt`, compressed `zTXt` and `iTXt` chunks.
#[test]
fn parameters_written_by_other_tools_read_back() {
    use sefi::pipeline::GenerateRequest;
    use sefi::pipeline::png::{Parameters, PngError, read_parameters};
    use sefi::schedule::Sampler;

    let read = |name: &str| {
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/png")
                .join(name),
        )
        .unwrap();
        read_parameters(name, &bytes).map(|t| Parameters::parse(&t))
    };
    let taken = |p: &Parameters| {
        let mut req = GenerateRequest::default();
        let unused = p.apply(&mut req);
        (req, unused)
    };

    let p = read("webui.png").unwrap();
    assert_eq!(
        p.prompt,
        "a photo of <alice> holding a basketball, in front of the Eiffel Tower\ngolden hour"
    );
    assert_eq!(p.negative_prompt, "blurry, lowres");
    assert_eq!(p.get("Lora hashes"), Some("alice: 0a1b2c3d, bob: 4e5f6a7b"));
    assert_eq!(p.get("Version"), Some("v1.10.1"));
    let (req, unused) = taken(&p);
    assert!(unused.is_empty(), "{unused:?}");
    assert_eq!(
        (
            req.steps,
            req.sampler,
            req.guidance,
            req.seed,
            req.width,
            req.height
        ),
        (30, Sampler::DpmPp2mKarras, 6.5, 1234567890, 512, 768)
    );

    let p = read("webui-old-compressed.png").unwrap();
    assert_eq!(
        (p.prompt.as_str(), p.negative_prompt.as_str()),
        ("portrait of <bob>, oil painting", "")
    );
    let (req, unused) = taken(&p);
    assert!(unused.is_empty(), "{unused:?}");
    assert_eq!(
        (req.steps, req.sampler, req.guidance, req.seed),
        (20, Sampler::EulerAncestral, 7.0, 42)
    );

    let p = read("webui-unicode.png").unwrap();
    assert_eq!(p.prompt, "ein Foto von <alice> am Meer — 夕日");
    let (req, _) = taken(&p);
    assert_eq!(
        (req.sampler, req.width, req.height),
        (Sampler::Ddim, 768, 512)
    );

    assert!(matches!(
        read("plain.png"),
        Err(PngError::NoParameters { .. })
    ));
    assert!(matches!(
        read_parameters("a.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
        Err(PngError::NotPng { .. })
    ));
}
