//! Forward-pass benchmark of both backbones + FPN: prints figures, asserts nothing.
//!
//! `cargo bench --bench forward` (CPU backend, 1x3x320x320). Set `PICIE_BENCH_DEVICE=auto|gpu|wgpu`
//! for another device and `PICIE_BENCH_SIZE` / `PICIE_BENCH_BATCH` / `PICIE_BENCH_RUNS` to vary it.

use picie::bench::{peak_memory_mib, time_forward};
use picie::device::{DeviceChoice, select_device};
use picie::model::BackboneKind;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let choice: DeviceChoice = std::env::var("PICIE_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    let device = select_device(&choice)?;
    println!("device: {}", device.description);
    let (size, batch, runs) = (
        setting("PICIE_BENCH_SIZE", 320),
        setting("PICIE_BENCH_BATCH", 1),
        setting("PICIE_BENCH_RUNS", 5),
    );
    for backbone in BackboneKind::ALL {
        println!(
            "{}",
            time_forward(backbone, None, &device, batch, size, runs)?
        );
    }
    if let Some(peak) = peak_memory_mib() {
        println!("peak resident memory: {peak:.0} MiB");
    }
    Ok(())
}
