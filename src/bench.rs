//! Benchmarks that print figures: shared by the `picie bench` subcommand and `benches/`.
//! Speed is measured here, never asserted in tests.

use std::time::Instant;

use crate::device::ComputeDevice;
use crate::model::{BackboneKind, WeightsError, build_network, images_to_tensor};

/// Timings of the network's forward pass on one backend.
#[derive(Debug, Clone)]
pub struct ForwardTiming {
    /// The backbone measured (with the FPN).
    pub backbone: BackboneKind,
    /// Images per batch.
    pub batch: usize,
    /// Input side in pixels.
    pub size: usize,
    /// The first run, which includes kernel compilation on wgpu.
    pub warm_up_seconds: f64,
    /// Median of the timed runs.
    pub median_seconds: f64,
    /// Fastest timed run.
    pub min_seconds: f64,
    /// Number of timed runs.
    pub runs: usize,
}

impl ForwardTiming {
    /// Images per second at the median.
    pub fn images_per_second(&self) -> f64 {
        self.batch as f64 / self.median_seconds
    }
}

impl std::fmt::Display for ForwardTiming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} + FPN, {}x3x{}x{}: median {:.1} ms, min {:.1} ms over {} runs ({:.2} images/s; warm-up {:.1} ms)",
            self.backbone.display_name(),
            self.batch,
            self.size,
            self.size,
            self.median_seconds * 1e3,
            self.min_seconds * 1e3,
            self.runs,
            self.images_per_second(),
            self.warm_up_seconds * 1e3
        )
    }
}

/// Times `runs` forward passes (after one warm-up) of backbone + FPN on a constant batch.
pub fn time_forward(
    backbone: BackboneKind,
    weights: Option<&std::path::Path>,
    device: &ComputeDevice,
    batch: usize,
    size: usize,
    runs: usize,
) -> Result<ForwardTiming, WeightsError> {
    let (net, _) = build_network(backbone, weights, &device.device)?;
    let pixels = vec![128u8; size * size * 3];
    let images: Vec<&[u8]> = (0..batch).map(|_| pixels.as_slice()).collect();
    let input = images_to_tensor(&images, size, &device.device);
    let mut timings = Vec::with_capacity(runs);
    let mut warm_up_seconds = 0.0;
    for run in 0..=runs {
        let started = Instant::now();
        // Reading the result back waits for the device to finish.
        let _ = net.forward(input.clone()).into_data();
        let seconds = started.elapsed().as_secs_f64();
        if run == 0 {
            warm_up_seconds = seconds;
        } else {
            timings.push(seconds);
        }
    }
    timings.sort_by(f64::total_cmp);
    Ok(ForwardTiming {
        backbone,
        batch,
        size,
        warm_up_seconds,
        median_seconds: timings.get(timings.len() / 2).copied().unwrap_or(f64::NAN),
        min_seconds: timings.first().copied().unwrap_or(f64::NAN),
        runs,
    })
}

/// Peak resident set size of this process in MiB (Linux; `None` elsewhere).
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
