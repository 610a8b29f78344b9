//! Native device tests: the autodiff check on the CPU backend and on wgpu (lavapipe on
//! machines without a GPU), and the `sefi device` command.
#![cfg(not(target_family = "wasm"))]

use std::process::Command;

use sefi::block_on;
use sefi::check::{TOLERANCE, autodiff_check};
use sefi::device::{Backend, DeviceChoice, DeviceError};

const WGPU_HELP: &str = "no wgpu adapter: install Mesa's Vulkan driver \
    (`apt-get install mesa-vulkan-drivers libvulkan1`) or run ./scripts/setup.sh test";

#[test]
fn cpu_autodiff_matches_the_f64_reference() {
    let dev = block_on(DeviceChoice::Cpu.open()).unwrap();
    assert_eq!(dev.info.backend, Backend::Cpu);
    let report = block_on(autodiff_check(&dev.device)).unwrap();
    assert!(report.passed, "{report:#?}");
    assert!(report.max_rel_error <= TOLERANCE);
    assert_eq!(report.grad.len(), report.expected_grad.len());
}

#[test]
fn wgpu_autodiff_matches_the_reference_and_the_cpu() {
    let gpu = block_on(DeviceChoice::Wgpu.open()).expect(WGPU_HELP);
    assert_eq!(gpu.info.backend, Backend::Wgpu);
    let limits = gpu.info.limits.as_ref().expect("wgpu reports its limits");
    assert!(limits.max_buffer_size > 0 && limits.max_storage_buffer_binding_size > 0);

    let on_gpu = block_on(autodiff_check(&gpu.device)).unwrap();
    assert!(on_gpu.passed, "{on_gpu:#?}");

    let cpu = block_on(DeviceChoice::Cpu.open()).unwrap();
    let on_cpu = block_on(autodiff_check(&cpu.device)).unwrap();
    let pairs = std::iter::once((on_gpu.loss, on_cpu.loss))
        .chain(on_gpu.grad.iter().copied().zip(on_cpu.grad.iter().copied()));
    for (g, c) in pairs {
        let rel = (g - c).abs() / c.abs().max(1e-3);
        assert!(
            rel <= 1e-4,
            "wgpu {g} vs cpu {c}: relative difference {rel:e}"
        );
    }
}

#[test]
fn wgpu_is_opened_once_and_reused() {
    let a = block_on(DeviceChoice::Wgpu.open()).expect(WGPU_HELP);
    let b = block_on(DeviceChoice::Wgpu.open()).expect(WGPU_HELP);
    assert_eq!(a.device, b.device);
    assert_eq!(a.info, b.info);
}

#[test]
fn auto_prefers_the_cpu_backend_over_a_software_adapter() {
    let dev = block_on(DeviceChoice::Auto.open()).unwrap();
    if dev.info.backend == Backend::Wgpu {
        assert!(
            !dev.info.software,
            "auto chose a software adapter: {:#?}",
            dev.info
        );
    }
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    // On machines with an NVIDIA driver this opens the GPU instead; both are fine, a panic is not.
    match block_on(DeviceChoice::Cuda.open()) {
        Ok(dev) => assert_eq!(dev.info.backend, Backend::Cuda),
        Err(e) => {
            assert!(matches!(e, DeviceError::NoCuda { .. }), "{e:?}");
            assert!(e.to_string().contains("NVIDIA driver"), "{e}");
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_missing_from_the_build_is_a_clear_error() {
    let err = block_on(DeviceChoice::Cuda.open()).unwrap_err();
    assert_eq!(
        err,
        DeviceError::NotCompiled {
            backend: Backend::Cuda
        }
    );
    assert!(err.to_string().contains("--features cuda"), "{err}");
}

fn sefi(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sefi"))
        .args(args)
        .output()
        .expect("run the sefi binary")
}

#[test]
fn sefi_device_json_reports_a_passing_check() {
    let out = sefi(&["device", "--device", "cpu", "--json"]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["device"]["backend"], "cpu");
    assert_eq!(report["check"]["passed"], true);
    let loss = report["check"]["loss"].as_f64().unwrap();
    let expected = report["check"]["expected_loss"].as_f64().unwrap();
    assert!((loss - expected).abs() <= TOLERANCE * expected.abs());
}

#[test]
fn sefi_device_text_names_the_adapter_and_limits() {
    let out = sefi(&["device", "--device", "wgpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "backend      wgpu",
        "adapter",
        "max buffer",
        "f16",
        "autodiff     ok",
    ] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}");
    }
}

/// Without XDG_RUNTIME_DIR (servers, containers, sudo) probing for a GPU must not fill the
/// terminal with Mesa's complaints about it.
#[test]
fn probing_for_a_gpu_is_quiet_without_a_runtime_dir() {
    let out = Command::new(env!("CARGO_BIN_EXE_sefi"))
        .args(["device", "--device", "auto", "--json"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("run the sefi binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}

/// The `cuda` build on a machine without the NVIDIA driver: `sefi device --device cuda` says
/// what to install, and no panic message reaches the terminal.
#[cfg(feature = "cuda")]
#[test]
fn sefi_device_cuda_without_a_driver_says_what_is_missing() {
    let out = sefi(&["device", "--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !out.status.success() {
        assert!(stderr.contains("Install the NVIDIA driver"), "{stderr}");
    }
}

#[test]
fn sefi_device_rejects_an_unknown_backend() {
    let out = sefi(&["device", "--device", "tpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auto, cpu, wgpu or cuda"), "{stderr}");
}

fn sd_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd")
        .join(name)
}

/// `--reference`: the tiny models on the CPU give diffusers' outputs, each one named.
#[test]
fn sefi_device_reference_compares_each_model_output() {
    let (sd1, sd2, xl) = (
        sd_fixture("tiny-sd1"),
        sd_fixture("tiny-sd2"),
        sd_fixture("tiny-sdxl"),
    );
    let out = sefi(&[
        "device",
        "--device",
        "cpu",
        "--json",
        "--reference",
        sd1.to_str().unwrap(),
        "--reference",
        sd2.to_str().unwrap(),
        "--reference",
        xl.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let refs = report["references"].as_array().unwrap();
    assert_eq!(refs.len(), 3);
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(r[1]["passed"], true, "{r}");
        let names: Vec<_> = r[1]["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                assert!(o["max_abs_error"].as_f64().unwrap() <= 1e-4, "{o}");
                o["name"].as_str().unwrap().to_string()
            })
            .collect();
        let text = if i == 2 {
            "text.g.text_embeds"
        } else {
            "text.pooled"
        };
        for name in [text, "unet.out", "unet.out_kv", "vae.decoded"] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
    }
}

/// A reference that disagrees with the model by 0.01 in one value of the UNet's output fails
/// the check, names the output and exits with an error.
#[test]
fn sefi_device_reference_names_an_output_that_differs() {
    let sd1 = sd_fixture("tiny-sd1");
    let dir = std::env::temp_dir().join(format!("sefi-reference-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&sd1).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "goldens.safetensors" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let bytes = std::fs::read(sd1.join("goldens.safetensors")).unwrap();
    let goldens = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> =
        goldens.tensors().into_iter().collect();
    let mut changed = tensors
        .iter()
        .find(|(n, _)| n == "unet.out")
        .unwrap()
        .1
        .data()
        .to_vec();
    let first = f32::from_le_bytes(changed[..4].try_into().unwrap()) + 0.01;
    changed[..4].copy_from_slice(&first.to_le_bytes());
    for (name, view) in &mut tensors {
        if name == "unet.out" {
            *view =
                safetensors::tensor::TensorView::new(view.dtype(), view.shape().to_vec(), &changed)
                    .unwrap();
        }
    }
    std::fs::write(
        dir.join("goldens.safetensors"),
        safetensors::serialize(tensors, None).unwrap(),
    )
    .unwrap();

    let out = sefi(&[
        "device",
        "--device",
        "cpu",
        "--reference",
        dir.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("reference    WRONG RESULTS"), "{stdout}");
    let line = stdout.lines().find(|l| l.contains("unet.out ")).unwrap();
    assert!(line.ends_with("<- too large"), "{stdout}");
    assert!(
        stdout
            .lines()
            .filter(|l| l.ends_with("<- too large"))
            .count()
            == 1,
        "{stdout}"
    );
}

#[test]
fn sefi_device_reference_without_goldens_says_what_it_wants() {
    let out = sefi(&[
        "device",
        "--device",
        "cpu",
        "--reference",
        sd_fixture("tiny-sd1-2022").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("goldens.safetensors"), "{stderr}");
    assert!(stderr.contains("tests/fixtures/sd/tiny-sd1"), "{stderr}");
}

/// `--reference` on wgpu (lavapipe here): the tiny SDXL model's outputs within 1e-3 of
/// diffusers', both text encoders and the added conditioning included.
#[test]
fn sefi_device_reference_on_wgpu_covers_sdxl() {
    let xl = sd_fixture("tiny-sdxl");
    let out = sefi(&[
        "device",
        "--device",
        "wgpu",
        "--json",
        "--reference",
        xl.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let outputs = report["references"][0][1]["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 7, "{outputs:?}");
    for o in outputs {
        let err = o["max_abs_error"].as_f64().unwrap();
        eprintln!("wgpu {}: {err:e}", o["name"]);
        assert!(err <= 1e-3, "{o}");
    }
}
