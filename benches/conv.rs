//! Host convolution kernels on ResNet-18's stride-1 3x3 layers: the direct kernels against
//! im2col + GEMM, forward and both gradients, and Winograd's three passes (in the tiling the
//! shape takes, F(4x4, 3x3) or F(2x2, 3x3)) where it applies. Prints figures, asserts nothing.
//!
//! `cargo bench --bench conv` (release profile). `PICIE_BENCH_RUNS` sets the runs per figure
//! (best of them is printed; default 5).

use std::time::Instant;

// The binaries' allocator and settings, so that buffers are recycled as in training.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use picie::model::conv_grad::{self, ConvShape};
use picie::model::{conv_direct, conv_winograd};

/// A convolution `[batch, channels_in, side, side] -> [batch, channels_out, ...]`.
fn shape(
    batch: usize,
    channels: [usize; 2],
    side: usize,
    kernel: usize,
    stride: usize,
) -> ConvShape {
    let padding = kernel / 2;
    let output = (side + 2 * padding - kernel) / stride + 1;
    ConvShape {
        batch,
        channels_in: channels[0],
        channels_out: channels[1],
        input: [side, side],
        output: [output, output],
        kernel: [kernel, kernel],
        stride: [stride, stride],
        padding: [padding, padding],
        dilation: [1, 1],
        groups: 1,
    }
}

/// Best wall time of `runs` calls, in milliseconds.
fn best_ms<T>(runs: usize, mut work: impl FnMut() -> T) -> f64 {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(work());
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
        .collect()
}

fn main() {
    picie::allocator::configure();
    let runs = std::env::var("PICIE_BENCH_RUNS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5);
    println!(
        "threads: {}, direct kernels on this CPU: {}",
        rayon::current_num_threads(),
        conv_direct::cpu_supported()
    );
    println!("ms direct / im2col (GFLOP/s direct / im2col), * where the direct kernels are chosen");
    println!(
        "batch x channels in -> out, input side, kernel/stride | forward | input gradient | \
         weight gradient"
    );
    // ResNet-18's 7x7 stem and 3x3 layers (stride 1 and 2) at 128 px, batch 16, its 1x1
    // convolutions there, and its stem and stride-1 layers at 320 px, batch 8.
    let layers = [
        (16, [3, 64], 128, 7, 2),
        (16, [64, 64], 32, 3, 1),
        (16, [64, 128], 32, 3, 2),
        (16, [128, 128], 16, 3, 1),
        (16, [128, 256], 16, 3, 2),
        (16, [256, 256], 8, 3, 1),
        (16, [256, 512], 8, 3, 2),
        (16, [512, 512], 4, 3, 1),
        // 1x1: downsampling shortcuts and the FPN's lateral convolutions.
        (16, [64, 128], 32, 1, 2),
        (16, [64, 128], 32, 1, 1),
        (16, [128, 128], 16, 1, 1),
        (16, [256, 128], 8, 1, 1),
        (16, [32, 16], 80, 1, 1),
        (16, [16, 96], 80, 1, 1),
        (16, [96, 24], 40, 1, 1),
        (16, [24, 144], 40, 1, 1),
        (16, [144, 24], 40, 1, 1),
        (16, [144, 32], 20, 1, 1),
        (16, [32, 192], 20, 1, 1),
        (16, [192, 32], 20, 1, 1),
        (16, [192, 64], 10, 1, 1),
        (16, [64, 384], 10, 1, 1),
        (16, [384, 64], 10, 1, 1),
        (16, [384, 96], 10, 1, 1),
        (16, [96, 576], 10, 1, 1),
        (16, [576, 96], 10, 1, 1),
        (16, [576, 160], 5, 1, 1),
        (16, [160, 960], 5, 1, 1),
        (16, [960, 160], 5, 1, 1),
        (16, [960, 320], 5, 1, 1),
        (16, [320, 1280], 5, 1, 1),
        (8, [3, 64], 320, 7, 2),
        (8, [64, 64], 80, 3, 1),
        (8, [128, 128], 40, 3, 1),
        (8, [256, 256], 20, 3, 1),
        (8, [512, 512], 10, 3, 1),
    ];
    for (batch, channels, side, kernel, stride) in layers {
        let shape = shape(batch, channels, side, kernel, stride);
        let x = values(shape.input_len(), 1);
        let weight = values(shape.weight_len(), 2);
        let grad = values(shape.output_len(), 3);
        let gflop = 2.0 * (shape.output_len() * shape.weight_len() / channels[1]) as f64 / 1e9;
        let gflops = |ms: f64| gflop / ms * 1e3;
        let direct = conv_direct::supports(&shape);
        let pair = |direct_ms: Option<f64>, im2col_ms: f64, chosen: bool| {
            let direct_ms = direct_ms.unwrap_or(f64::NAN);
            format!(
                "{direct_ms:6.2} / {im2col_ms:6.2} ({:3.0} / {:3.0}){}",
                gflops(direct_ms),
                gflops(im2col_ms),
                if chosen { " *" } else { "  " }
            )
        };
        let forward = pair(
            direct.then(|| best_ms(runs, || conv_direct::forward(&shape, &x, &weight))),
            best_ms(runs, || conv_grad::im2col_forward(&shape, &x, &weight)),
            conv_direct::applies_to_forward(&shape),
        );
        let input_grad = pair(
            (direct && shape.stride == [1, 1])
                .then(|| best_ms(runs, || conv_direct::input_grad(&shape, &weight, &grad))),
            best_ms(runs, || {
                conv_grad::im2col_input_grad(&shape, &weight, &grad)
            }),
            conv_direct::applies_to_input_grad(&shape),
        );
        let weight_grad = pair(
            direct.then(|| best_ms(runs, || conv_direct::weight_grad(&shape, &x, &grad))),
            best_ms(runs, || conv_grad::im2col_weight_grad(&shape, &x, &grad)),
            conv_direct::applies_to_weight_grad(&shape),
        );
        println!(
            "{batch:>2} x {:>3} -> {:>3} {side:>3} {kernel}/{stride} | {forward} | {input_grad} | {weight_grad}",
            channels[0], channels[1],
        );
        if let Some(tile) = conv_winograd::tile_side(&shape) {
            let forward_ms = best_ms(runs, || conv_winograd::forward(&shape, &x, &weight));
            let input_grad_ms = best_ms(runs, || conv_winograd::input_grad(&shape, &weight, &grad));
            let weight_grad_ms = best_ms(runs, || conv_winograd::weight_grad(&shape, &x, &grad));
            println!(
                "            Winograd F({tile}x{tile}, 3x3) | {forward_ms:6.2} ({:3.0}) | {input_grad_ms:6.2} ({:3.0}) \
                 | {weight_grad_ms:6.2} ({:3.0}) (GFLOP/s of the direct sum's work)",
                gflops(forward_ms),
                gflops(input_grad_ms),
                gflops(weight_grad_ms),
            );
        }
    }
}
