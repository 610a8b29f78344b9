//! `sefi device`: which device runs the work, what it can do, and a correctness check.

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use crate::check::{CheckReport, TOLERANCE, autodiff_check};
use crate::device::{DeviceChoice, DeviceInfo};

#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Which backend to use: auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto", value_parser = super::parse_device)]
    pub device: DeviceChoice,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    device: &'a DeviceInfo,
    check: &'a CheckReport,
}

pub fn run(args: DeviceArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dev = crate::block_on(args.device.open())?;
    let check = crate::block_on(autodiff_check(&dev.device))?;
    if args.json {
        let report = Report {
            device: &dev.info,
            check: &check,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&dev.info, &check);
    }
    Ok(if check.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
