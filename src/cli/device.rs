//! `sefi device`: which device runs the work, what it can do, and a correctness check.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::DType;
use clap::Args;
use serde::Serialize;

use super::shared;
use crate::check::reference::{ReferenceReport, reference_check};
use crate::check::{CheckReport, TOLERANCE, autodiff_check};
use crate::device::{DeviceChoice, DeviceInfo};
use crate::sd::StableDiffusion;
use crate::weights::open::Variant;
use crate::weights::{FileSource, SafetensorsFile};

/// Where a model folder keeps the reference implementation's outputs.
const GOLDENS: &str = "goldens.safetensors";

#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Which backend to use: auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto", value_parser = shared::parse_device)]
    pub device: DeviceChoice,
    /// Also run a model folder that holds diffusers' outputs for fixed inputs
    /// (`goldens.safetensors`, as the test models under `tests/fixtures/sd` do) and compare
    /// the text encoder, UNet and VAE with them in f32. Repeatable.
    #[arg(long, value_name = "MODEL_DIR")]
    pub reference: Vec<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    device: &'a DeviceInfo,
    check: &'a CheckReport,
    references: &'a [(String, ReferenceReport)],
}

pub fn run(args: DeviceArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dev = crate::block_on(args.device.open())?;
    let check = crate::block_on(autodiff_check(&dev.device))?;
    let mut references = Vec::new();
    for dir in &args.reference {
        let report = run_reference(dir, &dev.device)?;
        references.push((dir.display().to_string(), report));
    }
    if args.json {
        let report = Report {
            device: &dev.info,
            check: &check,
            references: &references,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&dev.info, &check);
        for (dir, report) in &references {
            print_reference(dir, report);
        }
    }
    Ok(
        if check.passed && references.iter().all(|(_, r)| r.passed) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// Loads the model in `dir` in f32 and compares it with the goldens beside it.
fn run_reference(
    dir: &std::path::Path,
    device: &burn::tensor::Device,
) -> Result<ReferenceReport, Box<dyn std::error::Error>> {
    let path = dir.join(GOLDENS);
    let source = FileSource::open(&path).map_err(|e| {
        format!(
            "{}: {e} (--reference takes a model folder with diffusers' outputs in {GOLDENS}, such as tests/fixtures/sd/tiny-sd1)",
            path.display()
        )
    })?;
    let goldens = crate::block_on(SafetensorsFile::open(Box::new(source)))?;
    let ckpt = shared::open_checkpoint(dir, None, Variant::Auto)?;
    let sd = crate::block_on(StableDiffusion::load(
        &ckpt,
        device,
        DType::F32,
        &mut |_| {},
    ))?;
    Ok(crate::block_on(reference_check(&sd, &goldens, device))?)
}

fn print_reference(dir: &str, report: &ReferenceReport) {
    println!(
        "reference    {} ({dir}, f32, tolerance {:.0e}, {:.0} ms)",
        if report.passed { "ok" } else { "WRONG RESULTS" },
        report.tolerance,
        report.millis
    );
    for o in &report.outputs {
        println!(
            "  {:<22} max abs error {:.1e} (values up to {:.2}){}",
            o.name,
            o.max_abs_error,
            o.scale,
            if o.max_abs_error <= report.tolerance {
                ""
            } else {
                "  <- too large"
            }
        );
    }
}

fn print_text(info: &DeviceInfo, check: &CheckReport) {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!("backend      {}", info.backend);
    println!("adapter      {}", info.adapter);
    println!("api          {}", info.api);
    println!(
        "type         {}{}",
        info.device_type,
        if info.software { " (software)" } else { "" }
    );
    if !info.driver.is_empty() {
        println!("driver       {}", info.driver);
    }
    if let Some(bytes) = info.memory_bytes {
        println!("memory       {}", human_bytes(bytes));
    }
    if let Some(l) = &info.limits {
        println!("max buffer   {}", human_bytes(l.max_buffer_size));
        println!(
            "max binding  {}",
            human_bytes(l.max_storage_buffer_binding_size)
        );
        println!(
            "workgroup    {} invocations, {} shared",
            l.max_compute_invocations_per_workgroup,
            human_bytes(u64::from(l.max_compute_workgroup_storage_size))
        );
    }
    println!("f16          {}", yes_no(info.f16));
    println!("bf16         {}", yes_no(info.bf16));
    println!(
        "autodiff     {} (loss {:.7} vs {:.7} expected, max relative error {:.1e}, tolerance {:.0e}, {:.1} ms)",
        if check.passed { "ok" } else { "WRONG RESULTS" },
        check.loss,
        check.expected_loss,
        check.max_rel_error,
        TOLERANCE,
        check.millis
    );
}

/// Bytes in binary units, as GPU limits are usually powers of two.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(128 << 20), "128.0 MiB");
        assert_eq!(super::human_bytes(3 << 29), "1.5 GiB");
    }
}
