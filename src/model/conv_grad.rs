//! Gradients of 2-D convolutions on host memory (f32, NCHW), for burn's Flex backend.
//!
//! Flex has no native convolution backward: burn's generic fallback computes the weight
//! gradient as a convolution with the output gradient as kernel (one small GEMM per kernel
//! position), the input gradient through a transposed convolution, and loops over every group
//! for depthwise convolutions. Here both gradients are a few large GEMMs on im2col columns
//! (dense convolutions) or direct loops (depthwise ones), as PyTorch's CPU kernels do.
//!
//! Results do not depend on the number of threads: every sum runs in a fixed order (GEMMs
//! split their output, never their depth; depthwise loops split channels or image planes).
//!
//! Dense shapes the direct kernels of `conv_direct` run faster go there (3x3 layers with
//! AVX-512); the rest stay here.
//!
//! One concern, in one file: the host convolution kernels and their dispatch (about 950 lines)
//! and the tests of every path, direct kernels included, against a loop-by-loop reference
//! (about 330).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv_direct;
use super::conv_winograd;
use super::host_buffers::par_zeros;
use crate::linalg::{MatRef, Threads, lane_sum, matmul, matmul_strided};

/// im2col columns per GEMM the dense path aims for: deep layers have few output pixels per
/// image, so several images share one GEMM to keep it large enough to run well in parallel.
const TARGET_COLUMNS: usize = 4096;
/// Upper bound on the im2col buffer, in floats (32 MiB).
const COLUMN_BUDGET: usize = 8 << 20;
/// From this many im2col columns on, the forward pass runs the transposed product.
const TRANSPOSED_FORWARD_COLUMNS: usize = 2048;
/// From this many output pixels per image on, the transposed product writes each image's
/// output directly (one product per image); smaller images share one product and a transpose.
const DIRECT_TRANSPOSED_PIXELS: usize = 4096;

/// Shape and hyper-parameters of one 2-D convolution `x [N, Ci, H, W] -> y [N, Co, Ho, Wo]`
/// with weights `[Co, Ci / groups, kh, kw]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Images in the batch (N).
    pub batch: usize,
    /// Input channels (Ci).
    pub channels_in: usize,
    /// Output channels (Co).
    pub channels_out: usize,
    /// Input height and width.
    pub input: [usize; 2],
    /// Output height and width (they carry any asymmetric end padding).
    pub output: [usize; 2],
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride per direction.
    pub stride: [usize; 2],
    /// Padding before the first row and column.
    pub padding: [usize; 2],
    /// Dilation per direction.
    pub dilation: [usize; 2],
    /// Convolution groups.
    pub groups: usize,
}

/// Which gradient kernels a convolution can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// One group: im2col + GEMM.
    Dense,
    /// One input and one output channel per group: direct loops.
    Depthwise,
}

impl ConvShape {
    /// The kernels for this shape, or `None` for grouped convolutions that are neither dense
    /// nor depthwise (those keep burn's generic backward).
    pub fn kind(&self) -> Option<ConvKind> {
        if self.groups == 1 {
            Some(ConvKind::Dense)
        } else if self.groups == self.channels_in && self.groups == self.channels_out {
            Some(ConvKind::Depthwise)
        } else {
            None
        }
    }

    fn input_plane(&self) -> usize {
        self.input[0] * self.input[1]
    }

    fn output_plane(&self) -> usize {
        self.output[0] * self.output[1]
    }

    fn kernel_area(&self) -> usize {
        self.kernel[0] * self.kernel[1]
    }

    /// Elements of the input (and of its gradient).
    pub fn input_len(&self) -> usize {
        self.batch * self.channels_in * self.input_plane()
    }

    /// Elements of the output gradient.
    pub fn output_len(&self) -> usize {
        self.batch * self.channels_out * self.output_plane()
    }

    /// Elements of the weight (and of its gradient).
    pub fn weight_len(&self) -> usize {
        self.channels_out * (self.channels_in / self.groups.max(1)) * self.kernel_area()
    }

    /// The output positions `o` along `axis` whose input index `o * stride + offset - padding`
    /// falls inside the input, for kernel offset `offset` (already multiplied by dilation).
    fn valid_outputs(&self, axis: usize, offset: usize) -> std::ops::Range<usize> {
        let (stride, padding) = (self.stride[axis], self.padding[axis]);
        let (input, output) = (self.input[axis], self.output[axis]);
        let end = if input + padding <= offset {
            0
        } else {
            ((input - 1 + padding - offset) / stride + 1).min(output)
        };
        let start = padding.saturating_sub(offset).div_ceil(stride).min(end);
        start..end
    }

    fn check(&self, x: Option<&[f32]>, weight: Option<&[f32]>, output_grad: &[f32]) {
        assert_eq!(output_grad.len(), self.output_len(), "output gradient size");
        if let Some(x) = x {
            assert_eq!(x.len(), self.input_len(), "input size");
        }
        if let Some(weight) = weight {
            assert_eq!(weight.len(), self.weight_len(), "weight size");
        }
    }
}

/// The gradient of the loss with respect to the weight, `[Co, Ci / groups, kh, kw]`.
///
/// # Panics
/// On slices that do not match `shape`, or a grouped shape without kernels ([`ConvShape::kind`]).
pub fn weight_grad(shape: &ConvShape, x: &[f32], output_grad: &[f32]) -> Vec<f32> {
    shape.check(Some(x), None, output_grad);
    match shape.kind() {
        Some(ConvKind::Dense) if conv_winograd::applies(shape) => {
            conv_winograd::weight_grad(shape, x, output_grad)
        }
        Some(ConvKind::Dense) if conv_direct::applies_to_weight_grad(shape) => {
            conv_direct::weight_grad(shape, x, output_grad)
        }
        Some(ConvKind::Dense) => dense_grads(shape, x, None, output_grad, true).1,
        Some(ConvKind::Depthwise) => depthwise_weight_grad(shape, x, output_grad),
        None => panic!(
            "no gradient kernel for a convolution with {} groups",
            shape.groups
        ),
    }
}

/// The gradient of the loss with respect to the input, `[N, Ci, H, W]`.
///
/// # Panics
/// On slices that do not match `shape`, or a grouped shape without kernels ([`ConvShape::kind`]).
pub fn input_grad(shape: &ConvShape, weight: &[f32], output_grad: &[f32]) -> Vec<f32> {
    shape.check(None, Some(weight), output_grad);
    match shape.kind() {
        Some(ConvKind::Dense) if conv_winograd::applies(shape) => {
            conv_winograd::input_grad(shape, weight, output_grad)
        }
        Some(ConvKind::Dense) if conv_direct::applies_to_input_grad(shape) => {
            conv_direct::input_grad(shape, weight, output_grad)
        }
        Some(ConvKind::Dense) => dense_grads(shape, &[], Some(weight), output_grad, false).0,
        Some(ConvKind::Depthwise) => depthwise_input_grad(shape, weight, output_grad),
        None => panic!(
            "no gradient kernel for a convolution with {} groups",
            shape.groups
        ),
    }
}

/// Both gradients, `(input, weight)`, sharing the im2col columns of the dense path.
///
/// # Panics
/// On slices that do not match `shape`, or a grouped shape without kernels ([`ConvShape::kind`]).
pub fn input_and_weight_grads(
    shape: &ConvShape,
    x: &[f32],
    weight: &[f32],
    output_grad: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    shape.check(Some(x), Some(weight), output_grad);
    match shape.kind() {
        // Where either gradient has its own kernel, each takes its own path (im2col shares
        // nothing with them).
        Some(ConvKind::Dense)
            if conv_winograd::applies(shape)
                || conv_direct::applies_to_input_grad(shape)
                || conv_direct::applies_to_weight_grad(shape) =>
        {
            (
                input_grad(shape, weight, output_grad),
                weight_grad(shape, x, output_grad),
            )
        }
        Some(ConvKind::Dense) => dense_grads(shape, x, Some(weight), output_grad, true),
        Some(ConvKind::Depthwise) => (
            depthwise_input_grad(shape, weight, output_grad),
            depthwise_weight_grad(shape, x, output_grad),
        ),
        None => panic!(
            "no gradient kernel for a convolution with {} groups",
            shape.groups
        ),
    }
}

/// The input gradient of a dense convolution by GEMM + col2im, whatever [`input_grad`] would
/// choose (for benchmarks and tests that compare the paths).
///
/// # Panics
/// On slices that do not match `shape`, or a grouped shape.
pub fn im2col_input_grad(shape: &ConvShape, weight: &[f32], output_grad: &[f32]) -> Vec<f32> {
    shape.check(None, Some(weight), output_grad);
    assert_eq!(
        shape.kind(),
        Some(ConvKind::Dense),
        "im2col of a grouped convolution"
    );
    dense_grads(shape, &[], Some(weight), output_grad, false).0
}

/// The weight gradient of a dense convolution by im2col + GEMM, whatever [`weight_grad`]
/// would choose.
///
/// # Panics
/// On slices that do not match `shape`, or a grouped shape.
pub fn im2col_weight_grad(shape: &ConvShape, x: &[f32], output_grad: &[f32]) -> Vec<f32> {
    shape.check(Some(x), None, output_grad);
    assert_eq!(
        shape.kind(),
        Some(ConvKind::Dense),
        "im2col of a grouped convolution"
    );
    dense_grads(shape, x, None, output_grad, true).1
}

/// Images per GEMM in the dense path.
fn images_per_group(shape: &ConvShape) -> usize {
    let pixels = shape.output_plane().max(1);
    let rows = shape.channels_in * shape.kernel_area();
    let by_work = TARGET_COLUMNS.div_ceil(pixels);
    let by_memory = (COLUMN_BUDGET / (rows * pixels).max(1)).max(1);
    by_work.min(by_memory).clamp(1, shape.batch.max(1))
}

/// Dense (one group) convolution gradients by im2col + GEMM. The batch is cut into groups of
/// images (a fixed cut, so sums do not depend on scheduling), handled in parallel: each group
/// unfolds its images into columns `cols [K, g*P]`, computes its share of the weight gradient
/// as `cols x dY^T` (`[K, Co]`, the orientation the GEMM runs fastest for these shapes) and
/// its images' input gradient as col2im of `W^T x dY`. The shares are summed in group order.
/// Returns `(input gradient or empty, weight gradient or empty)`.
fn dense_grads(
    shape: &ConvShape,
    x: &[f32],
    weight: Option<&[f32]>,
    output_grad: &[f32],
    want_weight: bool,
) -> (Vec<f32>, Vec<f32>) {
    let rows = shape.channels_in * shape.kernel_area();
    let channels_out = shape.channels_out;
    let group = images_per_group(shape);
    let image_in = shape.channels_in * shape.input_plane();
    // The GEMM runs `dW^T = cols x dY^T` (then one transpose) two to three times faster than
    // `dW = dY x cols^T` when few output channels make `dW` a short, wide matrix; with many,
    // the direct form is as fast and saves the transpose. For 1x1 convolutions the product
    // whose result has more rows than columns ran 1.3-2.6 times faster (`benches/conv.rs`:
    // MobileNetV2's expansions `16 -> 96` want `dW`, its projections `96 -> 24` `dW^T`).
    let weight_grad_transposed = if shape.kernel == [1, 1] {
        shape.channels_in >= channels_out
    } else {
        channels_out < 256
    };
    // 1x1, stride 1, no padding: the im2col columns are the images themselves.
    let pointwise = shape.kernel == [1, 1] && shape.stride == [1, 1] && shape.padding == [0, 0];
    let input_grad_by_image = pointwise && shape.output_plane() >= POINTWISE_IMAGE_PIXELS;
    let process = |first: usize, count: usize, input_grad: Option<&mut [f32]>| {
        let pointwise_share = (pointwise && want_weight).then(|| {
            pointwise_weight_share(
                shape,
                [first, count],
                x,
                output_grad,
                weight_grad_transposed,
            )
        });
        let input_grad = match (weight, input_grad) {
            (Some(weight), Some(target)) if input_grad_by_image => {
                pointwise_input_grad(shape, first, weight, output_grad, target);
                None
            }
            (_, target) => target,
        };
        let columns_share = want_weight && !pointwise;
        if !columns_share && (input_grad.is_none() || weight.is_none()) {
            return pointwise_share;
        }
        let width = count * shape.output_plane();
        let grouped;
        let grad = if count == 1 {
            output_image(shape, output_grad, first)
        } else {
            grouped = gather_output_rows(shape, output_grad, first, count);
            &grouped
        };
        let grad = MatRef::row_major(grad, channels_out, width);
        let mut columns = if columns_share {
            im2col(
                shape,
                &x[first * image_in..(first + count) * image_in],
                count,
            )
        } else {
            par_zeros(rows * width)
        };
        let share = columns_share.then(|| {
            let mut share = vec![0.0; rows * channels_out];
            let columns = MatRef::row_major(&columns, rows, width);
            if weight_grad_transposed {
                matmul(&mut share, columns, grad.transposed(), false, Threads::Pool);
            } else {
                matmul(&mut share, grad, columns.transposed(), false, Threads::Pool);
            }
            share
        });
        if let (Some(weight), Some(input_grad)) = (weight, input_grad) {
            let weight_t = MatRef::row_major(weight, channels_out, rows).transposed();
            matmul(&mut columns, weight_t, grad, false, Threads::Pool);
            col2im(shape, &columns, count, input_grad);
        }
        pointwise_share.or(share)
    };
    let count_from = |first: usize| group.min(shape.batch - first);
    let mut input_grad = Vec::new();
    let shares: Vec<Option<Vec<f32>>> = if weight.is_some() {
        input_grad = par_zeros(shape.input_len());
        input_grad
            .par_chunks_mut(group * image_in)
            .enumerate()
            .map(|(index, slice)| process(index * group, count_from(index * group), Some(slice)))
            .collect()
    } else {
        (0..shape.batch.div_ceil(group))
            .into_par_iter()
            .map(|index| process(index * group, count_from(index * group), None))
            .collect()
    };
    let weight_grad = if want_weight {
        let mut total = vec![0.0f32; rows * channels_out];
        for share in shares.into_iter().flatten() {
            for (sum, value) in total.iter_mut().zip(share) {
                *sum += value;
            }
        }
        if weight_grad_transposed {
            transpose(&total, rows, channels_out)
        } else {
            total
        }
    } else {
        Vec::new()
    };
    (input_grad, weight_grad)
}

/// Output pixels per image from which a 1x1 convolution's input gradient is one product per
/// image, written in place; below it one product for a group of images and a copy ran faster
/// (`benches/conv.rs`: MobileNetV2 at 10x10, `96 -> 576`, 1.2 against 2.0 ms).
const POINTWISE_IMAGE_PIXELS: usize = 1024;

/// The share of a group of images (`[first, count]`) in the weight gradient of a 1x1, stride-1
/// convolution without padding, whose im2col columns are the images themselves: one product
/// per image on the inputs and output gradients where they lie, summed in order (`dW^T` when
/// `transposed`). Copying the columns first was most of these layers' gradient time
/// (ResNet-18's FPN laterals ran at 50-60 GFLOP/s).
fn pointwise_weight_share(
    shape: &ConvShape,
    [first, count]: [usize; 2],
    x: &[f32],
    output_grad: &[f32],
    transposed: bool,
) -> Vec<f32> {
    let (channels_in, channels_out) = (shape.channels_in, shape.channels_out);
    let pixels = shape.output_plane();
    let image_in = channels_in * pixels;
    let mut share = vec![0.0; channels_in * channels_out];
    for image in first..first + count {
        let input = MatRef::row_major(&x[image * image_in..][..image_in], channels_in, pixels);
        let grad = MatRef::row_major(
            output_image(shape, output_grad, image),
            channels_out,
            pixels,
        );
        let accumulate = image > first;
        if transposed {
            matmul(
                &mut share,
                input,
                grad.transposed(),
                accumulate,
                Threads::Pool,
            );
        } else {
            matmul(
                &mut share,
                grad,
                input.transposed(),
                accumulate,
                Threads::Pool,
            );
        }
    }
    share
}

/// The input gradient of the images of `target` (from `first`) for a 1x1, stride-1
/// convolution without padding: `W^T x dY` per image, straight into its place (no col2im).
fn pointwise_input_grad(
    shape: &ConvShape,
    first: usize,
    weight: &[f32],
    output_grad: &[f32],
    target: &mut [f32],
) {
    let (channels_in, channels_out) = (shape.channels_in, shape.channels_out);
    let pixels = shape.output_plane();
    let weight_t = MatRef::row_major(weight, channels_out, channels_in).transposed();
    for (index, image) in target.chunks_exact_mut(channels_in * pixels).enumerate() {
        let grad = MatRef::row_major(
            output_image(shape, output_grad, first + index),
            channels_out,
            pixels,
        );
        matmul(image, weight_t, grad, false, Threads::Pool);
    }
}

/// The forward pass of a dense (one group) convolution without bias, `[N, Co, Ho, Wo]`: per
/// group of images, `W [Co, K] x cols [K, g*P]`.
///
/// # Panics
/// On slices that do not match `shape`, or a shape with more than one group.
pub fn dense_forward(shape: &ConvShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    assert_eq!(
        shape.kind(),
        Some(ConvKind::Dense),
        "dense_forward of a grouped convolution"
    );
    assert_eq!(x.len(), shape.input_len(), "input size");
    assert_eq!(weight.len(), shape.weight_len(), "weight size");
    if conv_winograd::applies(shape) {
        return conv_winograd::forward(shape, x, weight);
    }
    if conv_direct::applies_to_forward(shape) {
        return conv_direct::forward(shape, x, weight);
    }
    im2col_forward(shape, x, weight)
}

/// [`dense_forward`] by im2col + GEMM (any dense shape).
pub fn im2col_forward(shape: &ConvShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let rows = shape.channels_in * shape.kernel_area();
    let pixels = shape.output_plane();
    let (channels_in, channels_out) = (shape.channels_in, shape.channels_out);
    let image_in = channels_in * shape.input_plane();
    let image_out = channels_out * pixels;
    let group = images_per_group(shape);
    let pointwise = shape.kernel == [1, 1] && shape.stride == [1, 1] && shape.padding == [0, 0];
    let weight = MatRef::row_major(weight, channels_out, rows);
    let mut output = par_zeros(shape.output_len());
    if pointwise {
        // No unfolding at all: `Y_n = W x X_n` per image, the images spread over the threads
        // (each product on one thread) when there are enough of them.
        let threads = if shape.batch >= rayon::current_num_threads() {
            Threads::Current
        } else {
            Threads::Pool
        };
        output
            .par_chunks_mut(image_out)
            .zip(x.par_chunks(image_in))
            .for_each(|(output, image)| {
                let image = MatRef::row_major(image, channels_in, pixels);
                matmul(output, weight, image, false, threads);
            });
        return output;
    }
    output
        .par_chunks_mut(group * image_out)
        .enumerate()
        .for_each(|(index, output)| {
            let first = index * group;
            let count = output.len() / image_out;
            let images = &x[first * image_in..(first + count) * image_in];
            let width = count * pixels;
            let unfolded = im2col(shape, images, count);
            let columns = MatRef::row_major(&unfolded, rows, width);
            if width >= TRANSPOSED_FORWARD_COLUMNS {
                // Many columns: `Y^T = cols^T x W^T` runs up to twice as fast as `W x cols`
                // (its long side is the one the GEMM vectorises).
                if pixels < DIRECT_TRANSPOSED_PIXELS {
                    // Small images: one product for the group, then a blocked transpose.
                    let mut transposed = vec![0.0; width * channels_out];
                    matmul(
                        &mut transposed,
                        columns.transposed(),
                        weight.transposed(),
                        false,
                        Threads::Pool,
                    );
                    scatter_transposed(&transposed, channels_out, pixels, count, output);
                    return;
                }
                // Large images: each image's product lands transposed, straight in its
                // `[Co, P]` block, through the destination strides; the transpose pass took
                // about 40 % of a 7x7 stem's forward time.
                for (image, output) in output.chunks_exact_mut(image_out).enumerate() {
                    let image_columns =
                        MatRef::strided(&unfolded[image * pixels..], pixels, rows, 1, width);
                    matmul_strided(
                        output,
                        [1, pixels],
                        image_columns,
                        weight.transposed(),
                        false,
                        Threads::Pool,
                    );
                }
                return;
            }
            if count == 1 {
                matmul(output, weight, columns, false, Threads::Pool);
                return;
            }
            let mut grouped = par_zeros(channels_out * width);
            matmul(&mut grouped, weight, columns, false, Threads::Pool);
            // [Co, g*P] -> g images of [Co, P]
            for (channel, row) in grouped.chunks_exact(width).enumerate() {
                for (image, part) in row.chunks_exact(pixels).enumerate() {
                    let start = image * image_out + channel * pixels;
                    output[start..start + pixels].copy_from_slice(part);
                }
            }
        });
    output
}

/// The output gradient of image `index`, `[Co, P]`.
fn output_image<'a>(shape: &ConvShape, output_grad: &'a [f32], index: usize) -> &'a [f32] {
    let image_out = shape.channels_out * shape.output_plane();
    &output_grad[index * image_out..(index + 1) * image_out]
}

/// The output gradients of `count` images from `first` as one `[Co, count * P]` matrix.
fn gather_output_rows(
    shape: &ConvShape,
    output_grad: &[f32],
    first: usize,
    count: usize,
) -> Vec<f32> {
    let pixels = shape.output_plane();
    let width = count * pixels;
    let mut grouped = vec![0.0; shape.channels_out * width];
    for (channel, row) in grouped.chunks_exact_mut(width).enumerate() {
        for (image, part) in row.chunks_exact_mut(pixels).enumerate() {
            let start = ((first + image) * shape.channels_out + channel) * pixels;
            part.copy_from_slice(&output_grad[start..start + pixels]);
        }
    }
    grouped
}

/// Side of the tiles of [`transpose_into`]: 32 x 32 floats, 4 KiB, stay in L1.
const TILE: usize = 32;

/// `dst[c * dst_stride + r] = src[r * cols + c]` for a row-major `rows x cols` source,
/// tile by tile so both sides stay in cache.
///
/// Each tile is written one destination row at a time (a contiguous run of floats). Writing it
/// source row by source row instead touches 32 destination rows per source row; when the
/// destination stride is a multiple of 4 KiB those rows share cache sets and evict each other.
pub(super) fn transpose_into(
    src: &[f32],
    rows: usize,
    cols: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    for row_start in (0..rows).step_by(TILE) {
        let row_end = (row_start + TILE).min(rows);
        for col_start in (0..cols).step_by(TILE) {
            for col in col_start..(col_start + TILE).min(cols) {
                let target = &mut dst[col * dst_stride + row_start..col * dst_stride + row_end];
                for (value, row) in target.iter_mut().zip(row_start..) {
                    *value = src[row * cols + col];
                }
            }
        }
    }
}

/// The transpose of a row-major `rows x cols` matrix.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    transpose_into(values, rows, cols, &mut out, rows);
    out
}

/// `Y^T [count * P, Co]` into `count` images of `[Co, P]`.
fn scatter_transposed(
    transposed: &[f32],
    channels: usize,
    pixels: usize,
    count: usize,
    output: &mut [f32],
) {
    output
        .par_chunks_mut(channels * pixels)
        .take(count)
        .enumerate()
        .for_each(|(image, out)| {
            let rows = &transposed[image * pixels * channels..(image + 1) * pixels * channels];
            transpose_into(rows, pixels, channels, out, pixels);
        });
}

/// Unfolds `count` images into columns `[Ci * kh * kw, count * Ho * Wo]` (zeros for padding).
///
/// The buffer is written once, never zeroed first: these columns are the largest buffers of a
/// training step (tens of MB per layer), and clearing them was a whole extra pass over them
/// (a ResNet-18 step ran about 3 % faster without it).
fn im2col(shape: &ConvShape, images: &[f32], count: usize) -> Vec<f32> {
    let len = shape.channels_in * shape.kernel_area() * count * shape.output_plane();
    let mut columns = Vec::with_capacity(len);
    im2col_into(
        shape,
        images,
        count,
        &mut columns.spare_capacity_mut()[..len],
    );
    // SAFETY: `im2col_into` writes all `len` elements: every row of every image's output
    // plane is either filled with zeros or written as zeros, copied values and zeros.
    unsafe { columns.set_len(len) };
    columns
}

/// [`im2col`] into uninitialised memory; writes every element of `columns`.
fn im2col_into(shape: &ConvShape, images: &[f32], count: usize, columns: &mut [MaybeUninit<f32>]) {
    let zero = |values: &mut [MaybeUninit<f32>]| {
        for value in values {
            value.write(0.0);
        }
    };
    let [_, width] = shape.input;
    let [out_rows, out_cols] = shape.output;
    let [kernel_h, kernel_w] = shape.kernel;
    let plane = shape.input_plane();
    let pixels = shape.output_plane();
    columns
        .par_chunks_mut(count * pixels)
        .enumerate()
        .for_each(|(row, out)| {
            let channel = row / (kernel_h * kernel_w);
            let (i, j) = ((row / kernel_w) % kernel_h, row % kernel_w);
            let (offset_h, offset_w) = (i * shape.dilation[0], j * shape.dilation[1]);
            let valid_h = shape.valid_outputs(0, offset_h);
            let valid_w = shape.valid_outputs(1, offset_w);
            for (image, dst) in out.chunks_mut(pixels).enumerate() {
                let source = &images[(image * shape.channels_in + channel) * plane..][..plane];
                for (o_row, dst_row) in dst.chunks_mut(out_cols).enumerate().take(out_rows) {
                    if !valid_h.contains(&o_row) {
                        zero(dst_row);
                        continue;
                    }
                    let in_row = o_row * shape.stride[0] + offset_h - shape.padding[0];
                    let src_row = &source[in_row * width..(in_row + 1) * width];
                    zero(&mut dst_row[..valid_w.start]);
                    zero(&mut dst_row[valid_w.end..]);
                    let first_col = valid_w.start * shape.stride[1] + offset_w - shape.padding[1];
                    if shape.stride[1] == 1 {
                        dst_row[valid_w.clone()]
                            .write_copy_of_slice(&src_row[first_col..first_col + valid_w.len()]);
                    } else {
                        for (value, o_col) in dst_row[valid_w.clone()].iter_mut().zip(0..) {
                            value.write(src_row[first_col + o_col * shape.stride[1]]);
                        }
                    }
                }
            }
        });
}

/// Folds columns `[Ci * kh * kw, count * Ho * Wo]` back onto `count` image gradients,
/// adding overlapping contributions (each plane in a fixed order).
fn col2im(shape: &ConvShape, columns: &[f32], count: usize, images: &mut [f32]) {
    let [_, width] = shape.input;
    let [_, out_cols] = shape.output;
    let [kernel_h, kernel_w] = shape.kernel;
    let pixels = shape.output_plane();
    let columns_width = count * pixels;
    images
        .par_chunks_mut(shape.input_plane())
        .enumerate()
        .for_each(|(plane_index, plane)| {
            let (image, channel) = (
                plane_index / shape.channels_in,
                plane_index % shape.channels_in,
            );
            for i in 0..kernel_h {
                for j in 0..kernel_w {
                    let row = (channel * kernel_h + i) * kernel_w + j;
                    let source = &columns[row * columns_width + image * pixels..][..pixels];
                    let (offset_h, offset_w) = (i * shape.dilation[0], j * shape.dilation[1]);
                    let valid_w = shape.valid_outputs(1, offset_w);
                    let first_col = valid_w.start * shape.stride[1] + offset_w;
                    for o_row in shape.valid_outputs(0, offset_h) {
                        let in_row = o_row * shape.stride[0] + offset_h - shape.padding[0];
                        let src = &source[o_row * out_cols..][..out_cols][valid_w.clone()];
                        let dst = &mut plane[in_row * width..(in_row + 1) * width];
                        scatter_add(dst, first_col - shape.padding[1], shape.stride[1], src);
                    }
                }
            }
        });
}

/// `dst[start + k * stride] += src[k]`.
fn scatter_add(dst: &mut [f32], start: usize, stride: usize, src: &[f32]) {
    if stride == 1 {
        for (d, s) in dst[start..start + src.len()].iter_mut().zip(src) {
            *d += s;
        }
    } else {
        for (k, s) in src.iter().enumerate() {
            dst[start + k * stride] += s;
        }
    }
}

/// `dst[k] += scale * src[k]`.
fn axpy(dst: &mut [f32], scale: f32, src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += scale * s;
    }
}

/// An input plane with its columns split by phase modulo the horizontal stride, so that the
/// columns one kernel tap reads (every `stride`-th) are contiguous: row `r`, phase `q`, index
/// `m` holds column `m * stride + q`. With stride 1 it is the plane itself.
struct Phases {
    stride: usize,
    /// Values per (row, phase).
    len: usize,
}

impl Phases {
    fn new(width: usize, stride: usize) -> Self {
        Self {
            stride,
            len: width.div_ceil(stride),
        }
    }

    /// Values of a phased plane of `height` rows.
    fn plane_len(&self, height: usize) -> usize {
        height * self.stride * self.len
    }

    /// Splits `plane` (`height x width`) into `out` (zero past the last column).
    fn split(&self, plane: &[f32], width: usize, out: &mut [f32]) {
        for (row, phased) in plane
            .chunks_exact(width)
            .zip(out.chunks_exact_mut(self.stride * self.len))
        {
            for (phase, part) in phased.chunks_exact_mut(self.len).enumerate() {
                for (m, value) in part.iter_mut().enumerate() {
                    *value = row.get(m * self.stride + phase).copied().unwrap_or(0.0);
                }
            }
        }
    }

    /// Adds a phased plane back onto `plane` (`height x width`).
    fn merge_add(&self, phased: &[f32], width: usize, plane: &mut [f32]) {
        for (row, phased) in plane
            .chunks_exact_mut(width)
            .zip(phased.chunks_exact(self.stride * self.len))
        {
            for (phase, part) in phased.chunks_exact(self.len).enumerate() {
                for (m, &value) in part.iter().enumerate() {
                    if let Some(target) = row.get_mut(m * self.stride + phase) {
                        *target += value;
                    }
                }
            }
        }
    }

    /// Where the input columns `o * stride + offset - padding` of the output columns
    /// `outputs` start in a phased row of row `row`: `(row * stride + phase) * len + first`.
    fn start(
        &self,
        row: usize,
        outputs: &std::ops::Range<usize>,
        offset: usize,
        padding: usize,
    ) -> usize {
        let first_column = outputs.start * self.stride + offset - padding;
        let (phase, first) = (first_column % self.stride, first_column / self.stride);
        (row * self.stride + phase) * self.len + first
    }
}

/// The stride-1 depthwise case whose output is the size of its input, as long vectors: a plane
/// lies in a zero-bordered grid `width + 2 padding` wide, so that each tap is one offset into
/// it and covers every output row in one pass (two border columns a row computed and dropped).
/// Row by row, the rows of MobileNetV2's late layers (5 to 20 pixels) were too short to run
/// fast.
struct SameGrid {
    height: usize,
    width: usize,
    padding: [usize; 2],
    kernel_w: usize,
    /// The grid's row length.
    wide: usize,
}

impl SameGrid {
    /// The grid of `shape`, where it applies.
    fn new(shape: &ConvShape) -> Option<Self> {
        let [kernel_h, kernel_w] = shape.kernel;
        let same = shape.stride == [1, 1]
            && shape.dilation == [1, 1]
            && shape.output == shape.input
            && kernel_h % 2 == 1
            && kernel_w % 2 == 1
            && shape.padding == [kernel_h / 2, kernel_w / 2];
        same.then(|| Self {
            height: shape.input[0],
            width: shape.input[1],
            padding: shape.padding,
            kernel_w,
            wide: shape.input[1] + 2 * shape.padding[1],
        })
    }

    /// Values of the output on the grid (`height` rows of `wide`).
    fn span(&self) -> usize {
        self.height * self.wide
    }

    /// Where tap `tap` reads the grid for the first output.
    fn offset(&self, tap: usize) -> usize {
        (tap / self.kernel_w) * self.wide + tap % self.kernel_w
    }

    /// A grid of zeros (with enough zeros after it for the last tap's pass).
    fn zeros(&self, grid: &mut Vec<f32>) {
        grid.clear();
        grid.resize(
            (self.height + 2 * self.padding[0]) * self.wide + 2 * self.padding[1],
            0.0,
        );
    }

    /// `plane` inside a zero border.
    fn bordered(&self, plane: &[f32], grid: &mut Vec<f32>) {
        self.zeros(grid);
        for (y, row) in plane.chunks_exact(self.width).enumerate() {
            grid[(y + self.padding[0]) * self.wide + self.padding[1]..][..self.width]
                .copy_from_slice(row);
        }
    }

    /// An output-sized `plane` on the output's rows of the grid, zeros in the border columns.
    fn widened(&self, plane: &[f32], rows: &mut Vec<f32>) {
        rows.clear();
        rows.resize(self.span(), 0.0);
        for (y, row) in plane.chunks_exact(self.width).enumerate() {
            rows[y * self.wide..][..self.width].copy_from_slice(row);
        }
    }
}

/// Runs `per_tap(i, j, tap_index, valid output columns, output rows with their input rows)`
/// over the kernel of a depthwise convolution.
fn for_each_tap(
    shape: &ConvShape,
    mut per_tap: impl FnMut(usize, std::ops::Range<usize>, usize, usize, usize),
) {
    let [kernel_h, kernel_w] = shape.kernel;
    for i in 0..kernel_h {
        let offset_h = i * shape.dilation[0];
        for j in 0..kernel_w {
            let offset_w = j * shape.dilation[1];
            let valid_w = shape.valid_outputs(1, offset_w);
            for o_row in shape.valid_outputs(0, offset_h) {
                let in_row = o_row * shape.stride[0] + offset_h - shape.padding[0];
                per_tap(i * kernel_w + j, valid_w.clone(), offset_w, o_row, in_row);
            }
        }
    }
}

/// The forward pass of a depthwise convolution without bias, `[N, C, Ho, Wo]`: each output
/// plane accumulates its kernel's taps over shifted rows of its input plane.
///
/// # Panics
/// On slices that do not match `shape`, or a shape that is not depthwise.
pub fn depthwise_forward(shape: &ConvShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    assert_eq!(
        shape.kind(),
        Some(ConvKind::Depthwise),
        "depthwise_forward of a dense convolution"
    );
    assert_eq!(x.len(), shape.input_len(), "input size");
    assert_eq!(weight.len(), shape.weight_len(), "weight size");
    let channels = shape.channels_in;
    let area = shape.kernel_area();
    let [height, width] = shape.input;
    let out_cols = shape.output[1];
    let phases = Phases::new(width, shape.stride[1]);
    let plane = shape.input_plane();
    let same = SameGrid::new(shape);
    let mut output = par_zeros(shape.output_len());
    output
        .par_chunks_mut(shape.output_plane().max(1))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(phased, sums), (plane_index, out)| {
                let taps = &weight[(plane_index % channels) * area..][..area];
                if let Some(grid) = &same {
                    grid.bordered(&x[plane_index * plane..][..plane], phased);
                    sums.clear();
                    sums.resize(grid.span(), 0.0);
                    for (tap, &scale) in taps.iter().enumerate() {
                        axpy(sums, scale, &phased[grid.offset(tap)..][..grid.span()]);
                    }
                    for (row, sums) in out.chunks_exact_mut(width).zip(sums.chunks(grid.wide)) {
                        row.copy_from_slice(&sums[..width]);
                    }
                    return;
                }
                let source = phased_plane(
                    &phases,
                    &x[plane_index * plane..][..plane],
                    height,
                    width,
                    phased,
                );
                for_each_tap(shape, |tap, valid_w, offset_w, o_row, in_row| {
                    let start = phases.start(in_row, &valid_w, offset_w, shape.padding[1]);
                    let out_row = &mut out[o_row * out_cols..][..out_cols][valid_w.clone()];
                    axpy(out_row, taps[tap], &source[start..start + out_row.len()]);
                });
            },
        );
    output
}

/// `plane` split by [`Phases`] into `buffer`, or `plane` itself for stride 1.
fn phased_plane<'a>(
    phases: &Phases,
    plane: &'a [f32],
    height: usize,
    width: usize,
    buffer: &'a mut Vec<f32>,
) -> &'a [f32] {
    if phases.stride == 1 {
        return plane;
    }
    buffer.resize(phases.plane_len(height), 0.0);
    phases.split(plane, width, buffer);
    buffer
}

/// Depthwise weight gradient `[C, 1, kh, kw]`: for each channel, the correlation of its input
/// planes with its output-gradient planes, summed over the batch.
fn depthwise_weight_grad(shape: &ConvShape, x: &[f32], output_grad: &[f32]) -> Vec<f32> {
    let channels = shape.channels_in;
    let area = shape.kernel_area();
    let [height, width] = shape.input;
    let out_cols = shape.output[1];
    let phases = Phases::new(width, shape.stride[1]);
    let (plane, pixels) = (shape.input_plane(), shape.output_plane());
    let same = SameGrid::new(shape);
    let mut grad = par_zeros(channels * area);
    grad.par_chunks_mut(area).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(phased, widened), (channel, taps)| {
            for image in 0..shape.batch {
                let plane_index = image * channels + channel;
                if let Some(grid) = &same {
                    grid.bordered(&x[plane_index * plane..][..plane], phased);
                    grid.widened(&output_grad[plane_index * pixels..][..pixels], widened);
                    for (tap, sum) in taps.iter_mut().enumerate() {
                        *sum += lane_sum(
                            widened,
                            &phased[grid.offset(tap)..][..grid.span()],
                            |a, b| a * b,
                        );
                    }
                    continue;
                }
                let source = phased_plane(
                    &phases,
                    &x[plane_index * plane..][..plane],
                    height,
                    width,
                    phased,
                );
                let grad_plane = &output_grad[plane_index * pixels..][..pixels];
                for_each_tap(shape, |tap, valid_w, offset_w, o_row, in_row| {
                    let start = phases.start(in_row, &valid_w, offset_w, shape.padding[1]);
                    let g = &grad_plane[o_row * out_cols..][..out_cols][valid_w.clone()];
                    taps[tap] += lane_sum(g, &source[start..][..g.len()], |a, b| a * b);
                });
            }
        },
    );
    grad
}

/// Depthwise input gradient `[N, C, H, W]`: each output gradient spread back over the
/// inputs it read, weighted by the channel's kernel.
fn depthwise_input_grad(shape: &ConvShape, weight: &[f32], output_grad: &[f32]) -> Vec<f32> {
    let channels = shape.channels_in;
    let area = shape.kernel_area();
    let [height, width] = shape.input;
    let out_cols = shape.output[1];
    let phases = Phases::new(width, shape.stride[1]);
    let pixels = shape.output_plane();
    let same = SameGrid::new(shape);
    let mut grad = par_zeros(shape.input_len());
    grad.par_chunks_mut(shape.input_plane().max(1))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(phased, widened), (plane_index, plane)| {
                let taps = &weight[(plane_index % channels) * area..][..area];
                let grad_plane = &output_grad[plane_index * pixels..][..pixels];
                if let Some(grid) = &same {
                    grid.widened(grad_plane, widened);
                    // The gradient of the bordered grid, then its inside.
                    grid.zeros(phased);
                    for (tap, &scale) in taps.iter().enumerate() {
                        axpy(
                            &mut phased[grid.offset(tap)..][..grid.span()],
                            scale,
                            widened,
                        );
                    }
                    for (y, row) in plane.chunks_exact_mut(width).enumerate() {
                        row.copy_from_slice(
                            &phased[(y + grid.padding[0]) * grid.wide + grid.padding[1]..][..width],
                        );
                    }
                    return;
                }
                let target: &mut [f32] = if phases.stride == 1 {
                    plane
                } else {
                    phased.clear();
                    phased.resize(phases.plane_len(height), 0.0);
                    phased
                };
                for_each_tap(shape, |tap, valid_w, offset_w, o_row, in_row| {
                    let start = phases.start(in_row, &valid_w, offset_w, shape.padding[1]);
                    let g = &grad_plane[o_row * out_cols..][..out_cols][valid_w.clone()];
                    axpy(&mut target[start..start + g.len()], taps[tap], g);
                });
                if phases.stride != 1 {
                    phases.merge_add(phased, width, plane);
                }
            },
        );
    grad
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, in f64: every output gradient times every input it read.
    fn naive(shape: &ConvShape, x: &[f32], weight: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let per_group_in = shape.channels_in / shape.groups;
        let per_group_out = shape.channels_out / shape.groups;
        let [height, width] = shape.input;
        let [out_h, out_w] = shape.output;
        let [kh, kw] = shape.kernel;
        let mut dx = vec![0.0f64; x.len()];
        let mut dw = vec![0.0f64; weight.len()];
        for n in 0..shape.batch {
            for co in 0..shape.channels_out {
                let g = co / per_group_out;
                for oh in 0..out_h {
                    for ow in 0..out_w {
                        let dy = f64::from(
                            grad[((n * shape.channels_out + co) * out_h + oh) * out_w + ow],
                        );
                        for cig in 0..per_group_in {
                            let ci = g * per_group_in + cig;
                            for i in 0..kh {
                                for j in 0..kw {
                                    let ih = (oh * shape.stride[0] + i * shape.dilation[0])
                                        as isize
                                        - shape.padding[0] as isize;
                                    let iw = (ow * shape.stride[1] + j * shape.dilation[1])
                                        as isize
                                        - shape.padding[1] as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= height as isize
                                        || iw >= width as isize
                                    {
                                        continue;
                                    }
                                    let xi = ((n * shape.channels_in + ci) * height + ih as usize)
                                        * width
                                        + iw as usize;
                                    let wi = ((co * per_group_in + cig) * kh + i) * kw + j;
                                    dx[xi] += dy * f64::from(weight[wi]);
                                    dw[wi] += dy * f64::from(x[xi]);
                                }
                            }
                        }
                    }
                }
            }
        }
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|value| value as f32).collect();
        (to_f32(dx), to_f32(dw))
    }

    /// The forward pass by definition, in f64.
    fn naive_forward(shape: &ConvShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let per_group_in = shape.channels_in / shape.groups;
        let per_group_out = shape.channels_out / shape.groups;
        let [height, width] = shape.input;
        let [out_h, out_w] = shape.output;
        let [kh, kw] = shape.kernel;
        let mut y = vec![0.0f32; shape.output_len()];
        for n in 0..shape.batch {
            for co in 0..shape.channels_out {
                for oh in 0..out_h {
                    for ow in 0..out_w {
                        let mut sum = 0.0f64;
                        let group = co / per_group_out;
                        for cig in 0..per_group_in {
                            let ci = group * per_group_in + cig;
                            for i in 0..kh {
                                for j in 0..kw {
                                    let ih = (oh * shape.stride[0] + i) as isize
                                        - shape.padding[0] as isize;
                                    let iw = (ow * shape.stride[1] + j) as isize
                                        - shape.padding[1] as isize;
                                    if ih < 0
                                        || iw < 0
                                        || ih >= height as isize
                                        || iw >= width as isize
                                    {
                                        continue;
                                    }
                                    let xi = ((n * shape.channels_in + ci) * height + ih as usize)
                                        * width
                                        + iw as usize;
                                    sum += f64::from(x[xi])
                                        * f64::from(
                                            weight[((co * per_group_in + cig) * kh + i) * kw + j],
                                        );
                                }
                            }
                        }
                        y[((n * shape.channels_out + co) * out_h + oh) * out_w + ow] = sum as f32;
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97));
                ((h >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn shape(
        batch: usize,
        channels: [usize; 2],
        input: [usize; 2],
        kernel: usize,
        stride: usize,
        padding: [usize; 2],
        groups: usize,
    ) -> ConvShape {
        let end_padding = padding;
        let out =
            |axis: usize| (input[axis] + padding[axis] + end_padding[axis] - kernel) / stride + 1;
        ConvShape {
            batch,
            channels_in: channels[0],
            channels_out: channels[1],
            input,
            output: [out(0), out(1)],
            kernel: [kernel, kernel],
            stride: [stride, stride],
            padding,
            dilation: [1, 1],
            groups,
        }
    }

    fn assert_close(found: &[f32], expected: &[f32], what: &str) {
        assert_eq!(found.len(), expected.len(), "{what}: length");
        let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (index, (a, b)) in found.iter().zip(expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{what}[{index}]: {a} against {b}"
            );
        }
    }

    fn check(shape: ConvShape) {
        let x = values(shape.input_len(), 1);
        let weight = values(shape.weight_len(), 2);
        let grad = values(shape.output_len(), 3);
        let (dx, dw) = naive(&shape, &x, &weight, &grad);
        let (found_dx, found_dw) = input_and_weight_grads(&shape, &x, &weight, &grad);
        let forward = if shape.groups == 1 {
            dense_forward(&shape, &x, &weight)
        } else {
            depthwise_forward(&shape, &x, &weight)
        };
        let expected_forward = naive_forward(&shape, &x, &weight);
        assert_close(&forward, &expected_forward, "forward");
        if conv_direct::supports(&shape) {
            // The direct kernels, whether or not the shape takes them by default.
            assert_close(
                &conv_direct::forward(&shape, &x, &weight),
                &expected_forward,
                "direct forward",
            );
            assert_close(
                &conv_direct::weight_grad(&shape, &x, &grad),
                &dw,
                "direct weight gradient",
            );
            if shape.stride == [1, 1] {
                assert_close(
                    &conv_direct::input_grad(&shape, &weight, &grad),
                    &dx,
                    "direct input gradient",
                );
            }
        }
        if conv_winograd::applies(&shape) {
            assert_close(
                &conv_winograd::forward(&shape, &x, &weight),
                &expected_forward,
                "Winograd forward",
            );
            assert_close(
                &conv_winograd::input_grad(&shape, &weight, &grad),
                &dx,
                "Winograd input gradient",
            );
            assert_close(
                &conv_winograd::weight_grad(&shape, &x, &grad),
                &dw,
                "Winograd weight gradient",
            );
        }
        if shape.groups == 1 {
            // Both dense paths, whichever of them the shape takes by default.
            assert_close(
                &im2col_forward(&shape, &x, &weight),
                &expected_forward,
                "im2col forward",
            );
            assert_close(
                &im2col_input_grad(&shape, &weight, &grad),
                &dx,
                "im2col input gradient",
            );
            assert_close(
                &im2col_weight_grad(&shape, &x, &grad),
                &dw,
                "im2col weight gradient",
            );
        }
        assert_close(&found_dx, &dx, "input gradient");
        assert_close(&found_dw, &dw, "weight gradient");
        assert_close(
            &input_grad(&shape, &weight, &grad),
            &dx,
            "input gradient alone",
        );
        assert_close(
            &weight_grad(&shape, &x, &grad),
            &dw,
            "weight gradient alone",
        );
    }

    #[test]
    fn dense_gradients_match_the_definition() {
        // 3x3 stride 1 and 2, a 7x7 stem, 1x1 with stride 2, odd sizes, one image per GEMM
        // and several.
        check(shape(2, [3, 4], [9, 7], 3, 1, [1, 1], 1));
        check(shape(3, [5, 6], [11, 10], 3, 2, [1, 1], 1));
        check(shape(2, [3, 8], [16, 15], 7, 2, [3, 3], 1));
        check(shape(2, [3, 8], [19, 16], 7, 2, [3, 3], 1));
        check(shape(4, [6, 5], [7, 9], 1, 2, [0, 0], 1));
        check(shape(1, [4, 4], [32, 32], 1, 1, [0, 0], 1));
        // 1x1 products image by image: one group of five images, two groups (4 + 2).
        check(shape(5, [3, 6], [8, 8], 1, 1, [0, 0], 1));
        check(shape(6, [3, 5], [32, 32], 1, 1, [0, 0], 1));
        check(shape(5, [2, 3], [4, 4], 3, 1, [0, 0], 1));
        // Forward products written transposed: one product per image straight into its
        // output (64x64 outputs), and one product for four 32x32 images, then a transpose.
        check(shape(2, [2, 3], [64, 64], 3, 1, [1, 1], 1));
        check(shape(4, [2, 5], [32, 32], 3, 1, [1, 1], 1));
    }

    #[test]
    fn direct_kernels_match_the_definition() {
        // Both orientations of the direct kernels (`check` runs them on every shape they can
        // take): rows of exactly one vector, rows ending in a partial vector (20, 33),
        // output channels that fill no tile (5, 11, 17), a depth that fills no weight-gradient
        // tile (27), 5x5 and 7x7 kernels, strides of 2, one-sided padding, end padding.
        check(shape(2, [3, 5], [16, 16], 3, 1, [1, 1], 1));
        check(shape(3, [4, 11], [7, 33], 3, 1, [1, 1], 1));
        check(shape(5, [3, 9], [20, 20], 3, 1, [1, 1], 1));
        check(shape(1, [2, 17], [12, 21], 5, 1, [2, 2], 1));
        check(shape(2, [3, 4], [10, 18], 3, 1, [0, 1], 1));
        check(shape(2, [3, 8], [19, 16], 7, 2, [3, 3], 1));
        let mut end_padded = shape(2, [3, 6], [9, 17], 3, 1, [1, 1], 1);
        end_padded.output = [8, 16];
        check(end_padded);
        // Deep enough for the default choice to take them (depth 29 x 9 = 261: two passes
        // over the depth), and two blocks of output channels (70 = 64 + 6).
        let deep = shape(1, [29, 70], [10, 18], 3, 1, [1, 1], 1);
        let deep_strided = shape(2, [29, 20], [11, 9], 3, 2, [1, 1], 1);
        if conv_direct::cpu_supported() {
            assert!(conv_direct::applies_to_forward(&deep));
            assert!(conv_direct::applies_to_input_grad(&deep));
            assert!(conv_direct::applies_to_weight_grad(&deep));
            assert!(conv_direct::applies_to_forward(&deep_strided));
            assert!(!conv_direct::applies_to_input_grad(&deep_strided));
            assert!(conv_direct::applies_to_weight_grad(&deep_strided));
        }
        check(deep);
        check(deep_strided);
    }

    #[test]
    fn winograd_matches_the_definition() {
        // Both tilings (F(4x4, 3x3) from 128 of its tiles, else F(2x2, 3x3) from 128 of
        // its): odd sides (tiles cut by the image's edge), 1x1 and 2x1 images, tile blocks that
        // cross rows and images (F2: 11 x 5 x 4 tiles in blocks of 128; F4: 3 x 9 x 8 in
        // blocks of 64), output channels that do not split evenly (130 = 3 x 33 + 31 with 2
        // blocks of 64 tiles), and 192 output channels in slices of 32.
        let shapes = [
            (shape(11, [128, 128], [9, 7], 3, 1, [1, 1], 1), 2),
            (shape(128, [128, 130], [1, 1], 3, 1, [1, 1], 1), 4),
            (shape(128, [130, 128], [2, 1], 3, 1, [1, 1], 1), 4),
            (shape(3, [128, 128], [33, 31], 3, 1, [1, 1], 1), 4),
            (shape(4, [160, 192], [16, 16], 3, 1, [1, 1], 1), 2),
            // Eight blocks (the last of 42 tiles): each task transforms its own block.
            (shape(14, [64, 72], [20, 26], 3, 1, [1, 1], 1), 4),
        ];
        for (shape, side) in shapes {
            assert_eq!(conv_winograd::tile_side(&shape), Some(side), "{shape:?}");
            check(shape);
        }
        // Few channels or few tiles keep the direct kernels or im2col.
        assert!(!conv_winograd::applies(&shape(
            16,
            [32, 128],
            [8, 8],
            3,
            1,
            [1, 1],
            1
        )));
        assert!(!conv_winograd::applies(&shape(
            16,
            [512, 512],
            [4, 4],
            3,
            1,
            [1, 1],
            1
        )));
        // Strided, unpadded and 5x5 convolutions keep the other kernels.
        let deep = |kernel, stride, padding, groups| {
            shape(16, [128, 128], [16, 16], kernel, stride, padding, groups)
        };
        assert!(!conv_winograd::applies(&deep(3, 2, [1, 1], 1)));
        assert!(!conv_winograd::applies(&deep(3, 1, [0, 0], 1)));
        assert!(!conv_winograd::applies(&deep(5, 1, [1, 1], 1)));
        assert!(!conv_winograd::applies(&deep(3, 1, [1, 1], 2)));
    }

    #[test]
    fn depthwise_gradients_match_the_definition() {
        // Stride 1 with the output the size of the input (3x3 and 5x5) on the bordered grid;
        // stride 2, and stride 1 without padding, row by row.
        let same = [
            shape(2, [6, 6], [9, 8], 3, 1, [1, 1], 6),
            shape(1, [3, 3], [5, 5], 5, 1, [2, 2], 3),
        ];
        let row_by_row = [
            shape(3, [4, 4], [11, 10], 3, 2, [1, 1], 4),
            shape(2, [4, 4], [7, 6], 3, 1, [0, 0], 4),
        ];
        for shape in same {
            assert!(SameGrid::new(&shape).is_some(), "{shape:?}");
            check(shape);
        }
        for shape in row_by_row {
            assert!(SameGrid::new(&shape).is_none(), "{shape:?}");
            check(shape);
        }
    }

    #[test]
    fn asymmetric_end_padding_follows_the_output_size() {
        // One extra column of padding at the end: the output is one column wider.
        let mut padded = shape(2, [3, 4], [6, 6], 3, 2, [1, 1], 1);
        padded.output = [3, 4];
        let mut input = padded;
        input.input = [6, 7];
        // The same as an input one column wider whose last column is zero.
        let x = values(padded.input_len(), 4);
        let weight = values(padded.weight_len(), 5);
        let grad = values(padded.output_len(), 6);
        let mut widened = vec![0.0; input.input_len()];
        for (row_in, row_out) in x.chunks(6).zip(widened.chunks_mut(7)) {
            row_out[..6].copy_from_slice(row_in);
        }
        let (_, expected_dw) = naive(&input, &widened, &weight, &grad);
        let (expected_dx_wide, _) = naive(&input, &widened, &weight, &grad);
        let expected_dx: Vec<f32> = expected_dx_wide
            .chunks(7)
            .flat_map(|row| row[..6].to_vec())
            .collect();
        let (dx, dw) = input_and_weight_grads(&padded, &x, &weight, &grad);
        assert_close(&dx, &expected_dx, "input gradient");
        assert_close(&dw, &expected_dw, "weight gradient");
    }

    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        // With AVX-512: the channel-vectorised kernels (depth 261), pixel vectors for the
        // forward pass and im2col for the gradients (16x16, depth 144), im2col throughout;
        // then Winograd F(4x4, 3x3) with a task per block (8 blocks, the weight gradient's
        // chunks following the thread count) and F(2x2, 3x3) with channel slices (2 blocks).
        for (channels, input) in [
            ([29, 40], [20, 20]),
            ([16, 32], [16, 16]),
            ([16, 32], [14, 14]),
            ([128, 128], [52, 34]),
            ([128, 128], [16, 16]),
        ] {
            gradients_on_one_and_three_threads_agree(shape(4, channels, input, 3, 1, [1, 1], 1));
        }
        let deep = |input| shape(4, [128, 128], input, 3, 1, [1, 1], 1);
        assert_eq!(conv_winograd::tile_side(&deep([52, 34])), Some(4));
        assert_eq!(conv_winograd::tile_side(&deep([16, 16])), Some(2));
    }

    fn gradients_on_one_and_three_threads_agree(shape: ConvShape) {
        let x = values(shape.input_len(), 7);
        let weight = values(shape.weight_len(), 8);
        let grad = values(shape.output_len(), 9);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool")
                .install(|| {
                    (
                        dense_forward(&shape, &x, &weight),
                        input_and_weight_grads(&shape, &x, &weight, &grad),
                    )
                })
        };
        assert_eq!(run(1), run(3));
    }
}
