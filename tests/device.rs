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
