//! Direct convolutions on host memory (f32, NCHW) with AVX-512: the forward pass and both
//! gradients read activations in place, with no im2col columns.
//!
//! The im2col + GEMM path writes every activation `kh * kw` times into a column buffer (tens of
//! MB per layer, far beyond the caches) that the GEMM then packs again; for ResNet-18's 3x3
//! layers that traffic cost as much as a third of their time. Here each image is copied once
//! into a zero-padded grid, after which output pixel `(y, x)` reads tap `(i, j)` at grid
//! position `(y * stride + i, x * stride + j)`: a kernel tap is a fixed offset into the grid.
//! The register tiles are those of a GEMM micro-kernel (24 accumulators), fed straight from
//! the grid, in one of two orientations:
//! - vectors along the pixels of a row (stride 1, rows of whole vectors): 16 neighbouring
//!   output pixels read 16 neighbouring grid values, one unaligned load; the weights are
//!   broadcast (8 output channels x 3 vectors of pixels);
//! - vectors along the output channels (any width or stride): each pixel's input is broadcast
//!   and multiplies a row of `W^T` (6 pixels x 4 vectors of channels), then one transpose.
//!
//! The input gradient of a stride-1 convolution is itself such a correlation: of the output
//! gradient, padded by `k - 1 - padding`, with the kernel flipped and its channel axes swapped.
//! The weight gradient `dW^T [(ci, tap), Co]` sums `grid x dY^T` over pixels, with vectors along
//! the output channels (6 (channel, tap) rows x 4 vectors per tile).
//!
//! Every sum runs over the depth or over the images and pixels in order, and tiles and tasks
//! split outputs, never a sum, so results do not depend on the number of threads. Used when the
//! CPU has AVX-512 and the layer runs faster so ([`applies_to_forward`],
//! [`applies_to_input_grad`], [`applies_to_weight_grad`]); every other case keeps im2col.
//!
//! One concern, in one file: the direct kernels, their layouts (about 560 lines) and their
//! AVX-512 tiles (about 330). Their tests sit with the other paths' in `conv_grad`.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::conv_grad::{ConvKind, ConvShape, transpose_into};
use super::host_buffers::{par_filled, par_zeros, write_copy};

/// Pixels per vector (AVX-512, f32).
const LANES: usize = 16;
/// Output channels per forward tile.
const TILE_CHANNELS: usize = 8;
/// 16-pixel segments per forward tile.
const TILE_SEGMENTS: usize = 3;
/// Output channels per forward task (a task is one image and this many channels).
const TASK_CHANNELS: usize = 4 * TILE_CHANNELS;
/// Output pixels per channel-vectorised tile (6 pixels x 4 vectors of 16 channels: 24
/// accumulators).
const BROADCAST_PIXELS: usize = 6;
/// Vectors of 16 output channels per channel-vectorised tile.
const BROADCAST_VECTORS: usize = 4;
/// Weight rows per pass of a channel-vectorised task: 256 rows of 64 channels (64 KiB) stay in
/// L2 while the task's pixels go through them.
const BROADCAST_DEPTH: usize = 256;
/// Least weight depth (input channels x taps) for the channel-vectorised kernels.
const MIN_BROADCAST_DEPTH: usize = 256;
/// Most weights (output channels x depth) for the channel-vectorised kernels.
const MAX_BROADCAST_WEIGHTS: usize = 1 << 20;
/// Output channels per block of the channel-vectorised layouts (4 vectors).
const CHANNEL_BLOCK: usize = BROADCAST_VECTORS * LANES;
/// (input channel, tap) rows per weight-gradient tile.
const GRAD_ROWS: usize = 6;
/// Pixels per block (whole output rows, at least one): every tile of a task runs over a block
/// of output gradients (64 KiB for 64 channels, in L2) before the next; 64-pixel blocks made
/// four times as many tile calls and ran 10-15 % slower.
const GRAD_BLOCK_PIXELS: usize = 256;

/// Whether the direct kernels can take `shape` at all on this CPU (whether they are faster
/// than im2col there is [`applies_to_forward`] and the like): one group, dilation 1, a kernel
/// larger than 1x1 (pointwise convolutions are plain GEMMs already) and wider than its
/// padding, at least one output pixel, and AVX-512 at run time.
pub fn supports(shape: &ConvShape) -> bool {
    shape.kind() == Some(ConvKind::Dense)
        && shape.dilation == [1, 1]
        && shape.kernel != [1, 1]
        && shape.padding[0] < shape.kernel[0]
        && shape.padding[1] < shape.kernel[1]
        && shape.batch > 0
        && shape.output[0] > 0
        && shape.output[1] > 0
        && cpu_supported()
}

/// Whether the weights suit the channel-vectorised kernels: deep enough that a pass over a
/// task's pixels outweighs the transposes (a 7x7 stem of 3 channels is not), small enough to
/// stay in the caches (512 x 512 x 3 x 3 layers ran at 65-75 % of im2col's speed).
fn suits_channel_vectors(depth: usize, channels_out: usize) -> bool {
    depth >= MIN_BROADCAST_DEPTH && depth * channels_out <= MAX_BROADCAST_WEIGHTS
}

/// Whether the direct kernels compute `shape`'s forward pass (see `benches/conv.rs` for the
/// layer-by-layer figures behind the choice).
pub fn applies_to_forward(shape: &ConvShape) -> bool {
    supports(shape) && Correlation::forward(shape).worthwhile()
}

/// Whether they compute its input gradient: stride 1 (strided input gradients keep the GEMM
/// + col2im path).
pub fn applies_to_input_grad(shape: &ConvShape) -> bool {
    supports(shape) && shape.stride == [1, 1] && Correlation::input_grad(shape).worthwhile()
}

/// Whether they compute its weight gradient.
pub fn applies_to_weight_grad(shape: &ConvShape) -> bool {
    supports(shape)
        && suits_channel_vectors(
            shape.channels_in * shape.kernel[0] * shape.kernel[1],
            shape.channels_out,
        )
}

/// Whether this CPU runs the direct kernels (AVX-512, checked at run time) and they are not
/// turned off with `PICIE_DIRECT_CONV=0` (which benchmarks use to compare against im2col).
#[cfg(target_arch = "x86_64")]
pub fn cpu_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::env::var_os("PICIE_DIRECT_CONV").is_none_or(|value| value != "0")
    })
}

/// Whether this CPU runs the direct kernels: never off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub fn cpu_supported() -> bool {
    false
}

/// A correlation `out[n, co, y, x] = sum w[co, ci, i, j] * grid[n, ci, y * sy + i, x * sx + j]`
/// where `grid` is the input placed at `offset` in a zero grid of
/// `[(out_h - 1) * sy + kh, (out_w - 1) * sx + kw]` (rows or columns of the input that fall
/// outside the grid are dropped; `[sy, sx]` is the stride).
#[derive(Debug, Clone, Copy)]
struct Correlation {
    channels_in: usize,
    channels_out: usize,
    input: [usize; 2],
    output: [usize; 2],
    kernel: [usize; 2],
    offset: [usize; 2],
    stride: [usize; 2],
}

/// 16 neighbouring output pixels of one row (one vector): where they start in the grid plane
/// and in the output plane.
#[derive(Debug, Clone, Copy, Default)]
struct Segment {
    grid: usize,
    output: usize,
}

impl Correlation {
    /// The forward pass of `shape`.
    fn forward(shape: &ConvShape) -> Self {
        Self {
            channels_in: shape.channels_in,
            channels_out: shape.channels_out,
            input: shape.input,
            output: shape.output,
            kernel: shape.kernel,
            offset: shape.padding,
            stride: shape.stride,
        }
    }

    /// The input gradient of `shape`: the output gradient padded by `k - 1 - padding`.
    fn input_grad(shape: &ConvShape) -> Self {
        Self {
            channels_in: shape.channels_out,
            channels_out: shape.channels_in,
            input: shape.output,
            output: shape.input,
            kernel: shape.kernel,
            offset: [
                shape.kernel[0] - 1 - shape.padding[0],
                shape.kernel[1] - 1 - shape.padding[1],
            ],
            stride: [1, 1],
        }
    }

    fn grid(&self) -> [usize; 2] {
        [0, 1]
            .map(|axis| self.output[axis].saturating_sub(1) * self.stride[axis] + self.kernel[axis])
    }

    fn grid_plane(&self) -> usize {
        let [rows, cols] = self.grid();
        rows * cols
    }

    fn output_plane(&self) -> usize {
        self.output[0] * self.output[1]
    }

    /// Weight depth: `channels_in * kh * kw`.
    fn depth(&self) -> usize {
        self.channels_in * self.kernel[0] * self.kernel[1]
    }

    /// Offset in an image's grid of every (input channel, tap), in weight order.
    fn tap_offsets(&self) -> Vec<usize> {
        let [_, grid_cols] = self.grid();
        let [kh, kw] = self.kernel;
        (0..self.channels_in)
            .flat_map(|channel| {
                (0..kh).flat_map(move |i| {
                    (0..kw).map(move |j| channel * self.grid_plane() + i * grid_cols + j)
                })
            })
            .collect()
    }

    /// The output pixels, row by row, in segments of 16 (rows of whole vectors,
    /// [`Self::by_pixels`]).
    fn segments(&self) -> Vec<Segment> {
        assert!(
            self.by_pixels(),
            "segments of rows that are not whole vectors"
        );
        let [_, grid_cols] = self.grid();
        let [rows, cols] = self.output;
        (0..rows)
            .flat_map(|row| {
                (0..cols).step_by(LANES).map(move |start| Segment {
                    grid: row * grid_cols + start,
                    output: row * cols + start,
                })
            })
            .collect()
    }

    /// `count` images `[C, H, W]` copied into zero-padded grids `[count, C, grid]`; each grid is
    /// written once (zeros around the copied rows), never cleared first.
    fn pad(&self, images: &[f32], count: usize) -> Vec<f32> {
        let [in_rows, in_cols] = self.input;
        let [_, grid_cols] = self.grid();
        let [top, left] = self.offset;
        let in_plane = in_rows * in_cols;
        // The input columns that land inside the grid (`left` is below the kernel width, so
        // inside the grid too).
        let kept_cols = in_cols.min(grid_cols.saturating_sub(left));
        let zero = MaybeUninit::new(0.0);
        let fill = |plane: usize, grid: &mut [MaybeUninit<f32>]| {
            let plane = &images[plane * in_plane..][..in_plane];
            for (grid_row, row) in grid.chunks_exact_mut(grid_cols).enumerate() {
                match grid_row.checked_sub(top).filter(|&in_row| in_row < in_rows) {
                    Some(in_row) => {
                        let (before, rest) = row.split_at_mut(left);
                        let (copied, after) = rest.split_at_mut(kept_cols);
                        before.fill(zero);
                        write_copy(copied, &plane[in_row * in_cols..][..kept_cols]);
                        after.fill(zero);
                    }
                    None => row.fill(zero),
                }
            }
        };
        assert_eq!(
            images.len(),
            count * self.channels_in * in_plane,
            "input size"
        );
        // SAFETY: the grid plane is whole rows of `grid_cols`, and `fill` writes every value of
        // every row (zeros, copied columns, zeros).
        unsafe {
            par_filled(
                count * self.channels_in * self.grid_plane(),
                self.grid_plane(),
                fill,
            )
        }
    }

    /// Whether rows are whole vectors of pixels (stride 1).
    fn by_pixels(&self) -> bool {
        self.stride == [1, 1] && self.output[1].is_multiple_of(LANES)
    }

    /// Whether one of the kernels beats im2col here.
    fn worthwhile(&self) -> bool {
        self.by_pixels() || suits_channel_vectors(self.depth(), self.channels_out)
    }

    /// `out [count, Co, output]` for grids `[count, Ci, grid]` and weights `[Co, Ci, kh, kw]`:
    /// pixels along the vectors where rows are whole vectors, output channels elsewhere.
    fn run(&self, grids: &[f32], weight: &[f32], count: usize) -> Vec<f32> {
        if self.by_pixels() {
            self.run_by_pixels(grids, weight, count)
        } else {
            self.run_by_channels(grids, weight, count)
        }
    }

    /// Grid offset of every output pixel of `count` images (tap `(0, 0)` of channel 0).
    fn pixel_bases(&self, count: usize) -> Vec<usize> {
        let [_, grid_cols] = self.grid();
        let [rows, cols] = self.output;
        let [row_step, col_step] = self.stride;
        let image_grid = self.channels_in * self.grid_plane();
        (0..count)
            .flat_map(|image| {
                (0..rows).flat_map(move |row| {
                    (0..cols).map(move |col| {
                        image * image_grid + row * row_step * grid_cols + col * col_step
                    })
                })
            })
            .collect()
    }

    /// [`Self::run`] with vectors along the output channels: `out^T [pixel, Co]` in tiles of
    /// 6 pixels x 64 channels, each pixel's inputs broadcast from the grid, then one
    /// transpose per image. No lane idles whatever the image width or stride.
    fn run_by_channels(&self, grids: &[f32], weight: &[f32], count: usize) -> Vec<f32> {
        let depth = self.depth();
        let channels_out = self.channels_out;
        assert_eq!(weight.len(), channels_out * depth, "weight size");
        let width = channels_out.next_multiple_of(LANES);
        let packed = pack_transposed(weight, channels_out, depth);
        let offsets = self.tap_offsets();
        let bases = self.pixel_bases(count);
        let pixels = bases.len();
        let tasks = 2 * rayon::current_num_threads();
        let per_task = pixels.div_ceil(tasks).next_multiple_of(BROADCAST_PIXELS);
        let mut output_t = par_zeros(pixels * width);
        output_t
            .par_chunks_mut(per_task * width)
            .zip(bases.par_chunks(per_task))
            .for_each(|(output_t, bases)| {
                for (block, block_weights) in packed.chunks_exact(depth * CHANNEL_BLOCK).enumerate()
                {
                    for first_row in (0..depth).step_by(BROADCAST_DEPTH) {
                        let rows = first_row..(first_row + BROADCAST_DEPTH).min(depth);
                        for (tile, tile_bases) in output_t
                            .chunks_mut(BROADCAST_PIXELS * width)
                            .zip(bases.chunks(BROADCAST_PIXELS))
                        {
                            kernels::broadcast_tile(
                                &block_weights
                                    [rows.start * CHANNEL_BLOCK..rows.end * CHANNEL_BLOCK],
                                &offsets[rows.clone()],
                                grids,
                                tile_bases,
                                tile,
                                block * CHANNEL_BLOCK,
                                first_row > 0,
                            );
                        }
                    }
                }
            });
        let out_plane = self.output_plane();
        let mut output = par_zeros(count * channels_out * out_plane);
        output
            .par_chunks_mut(channels_out * out_plane)
            .zip(output_t.par_chunks(out_plane * width))
            .for_each(|(output, output_t)| {
                if width == channels_out {
                    transpose_into(output_t, out_plane, width, output, out_plane);
                } else {
                    let mut all = vec![0.0f32; width * out_plane];
                    transpose_into(output_t, out_plane, width, &mut all, out_plane);
                    output.copy_from_slice(&all[..channels_out * out_plane]);
                }
            });
        output
    }

    /// [`Self::run`] with vectors along the pixels of a row (stride 1, rows of whole vectors):
    /// tiles of 8 output channels x 3 vectors of 16 pixels, the weights broadcast.
    fn run_by_pixels(&self, grids: &[f32], weight: &[f32], count: usize) -> Vec<f32> {
        let depth = self.depth();
        let channels_out = self.channels_out;
        assert_eq!(weight.len(), channels_out * depth, "weight size");
        // Weights as tiles of 8 output channels, `[block][depth][8]`, zero past the last channel.
        let blocks = channels_out.div_ceil(TILE_CHANNELS);
        let mut packed = vec![0.0f32; blocks * depth * TILE_CHANNELS];
        for (channel, row) in weight.chunks_exact(depth).enumerate() {
            let (block, lane) = (channel / TILE_CHANNELS, channel % TILE_CHANNELS);
            let tile = &mut packed[block * depth * TILE_CHANNELS..][..depth * TILE_CHANNELS];
            for (k, value) in row.iter().enumerate() {
                tile[k * TILE_CHANNELS + lane] = *value;
            }
        }
        let offsets = self.tap_offsets();
        let segments = self.segments();
        let out_plane = self.output_plane();
        let image_grid = self.channels_in * self.grid_plane();
        let mut output = par_zeros(count * channels_out * out_plane);
        output
            .par_chunks_mut(channels_out * out_plane)
            .enumerate()
            .for_each(|(image, output)| {
                let grid = &grids[image * image_grid..][..image_grid];
                output
                    .par_chunks_mut(TASK_CHANNELS * out_plane)
                    .enumerate()
                    .for_each(|(task, output)| {
                        for (block_in_task, output) in
                            output.chunks_mut(TILE_CHANNELS * out_plane).enumerate()
                        {
                            let block = task * (TASK_CHANNELS / TILE_CHANNELS) + block_in_task;
                            let tile =
                                &packed[block * depth * TILE_CHANNELS..][..depth * TILE_CHANNELS];
                            for chunk in segments.chunks(TILE_SEGMENTS) {
                                kernels::forward_tile(
                                    tile, &offsets, grid, chunk, output, out_plane,
                                );
                            }
                        }
                    });
            });
        output
    }
}

/// The forward pass of a dense convolution without bias, `[N, Co, Ho, Wo]`.
///
/// # Panics
/// On slices that do not match `shape`, or a shape the kernels cannot take ([`supports`]).
pub fn forward(shape: &ConvShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    assert!(supports(shape), "no direct kernel for {shape:?}");
    assert_eq!(x.len(), shape.input_len(), "input size");
    let correlation = Correlation::forward(shape);
    let grids = correlation.pad(x, shape.batch);
    correlation.run(&grids, weight, shape.batch)
}

/// The input gradient, `[N, Ci, H, W]`: the output gradient correlated with the flipped kernel.
///
/// # Panics
/// On slices that do not match `shape`, a stride other than 1, or a shape the kernels cannot
/// take ([`supports`]).
pub fn input_grad(shape: &ConvShape, weight: &[f32], output_grad: &[f32]) -> Vec<f32> {
    assert!(
        supports(shape) && shape.stride == [1, 1],
        "no direct input gradient for {shape:?}"
    );
    assert_eq!(
        output_grad.len(),
        shape.output_len(),
        "output gradient size"
    );
    assert_eq!(weight.len(), shape.weight_len(), "weight size");
    let correlation = Correlation::input_grad(shape);
    let [kh, kw] = shape.kernel;
    let taps = kh * kw;
    // flipped[ci, co, i, j] = weight[co, ci, kh - 1 - i, kw - 1 - j]
    let mut flipped = vec![0.0f32; weight.len()];
    for co in 0..shape.channels_out {
        for ci in 0..shape.channels_in {
            let source = &weight[(co * shape.channels_in + ci) * taps..][..taps];
            let target = &mut flipped[(ci * shape.channels_out + co) * taps..][..taps];
            for (t, value) in target.iter_mut().enumerate() {
                *value = source[taps - 1 - t];
            }
        }
    }
    let grids = correlation.pad(output_grad, shape.batch);
    correlation.run(&grids, &flipped, shape.batch)
}

/// The weight gradient, `[Co, Ci, kh, kw]`, as `dW^T [(ci, tap), Co]`: vectors run along the
/// output channels (16 per vector, so no lane is wasted whatever the image width), each
/// pixel's output gradients `dY^T [p, Co]` are loaded once per tile and each of the tile's six
/// (channel, tap) inputs is broadcast from the grid. Every sum runs over the images, rows and
/// columns in order, whatever the tiles and threads.
///
/// # Panics
/// On slices that do not match `shape`, or a shape the kernels cannot take ([`supports`]).
pub fn weight_grad(shape: &ConvShape, x: &[f32], output_grad: &[f32]) -> Vec<f32> {
    assert!(supports(shape), "no direct kernel for {shape:?}");
    assert_eq!(x.len(), shape.input_len(), "input size");
    assert_eq!(
        output_grad.len(),
        shape.output_len(),
        "output gradient size"
    );
    let correlation = Correlation::forward(shape);
    let grids = correlation.pad(x, shape.batch);
    let depth = correlation.depth();
    let channels_out = shape.channels_out;
    let blocks = channels_out.div_ceil(CHANNEL_BLOCK);
    let out_plane = correlation.output_plane();
    let image_grid = correlation.channels_in * correlation.grid_plane();
    let pixels = shape.batch * out_plane;
    // dY^T in blocks of 64 output channels, `[block, pixel, 64]`, zero past the last channel:
    // a pixel's gradients are one contiguous 256-byte run.
    let mut grads_t = par_zeros(blocks * pixels * CHANNEL_BLOCK);
    grads_t
        .par_chunks_mut(out_plane * CHANNEL_BLOCK)
        .enumerate()
        .for_each(|(index, transposed)| {
            let (block, image) = (index / shape.batch, index % shape.batch);
            let first = block * CHANNEL_BLOCK;
            let channels = CHANNEL_BLOCK.min(channels_out - first);
            let grad =
                &output_grad[(image * channels_out + first) * out_plane..][..channels * out_plane];
            transpose_into(grad, channels, out_plane, transposed, CHANNEL_BLOCK);
        });
    let [out_rows, out_cols] = correlation.output;
    let [_, grid_cols] = correlation.grid();
    let [row_step, col_step] = shape.stride;
    // Grid offset of the first pixel of every output row of every image.
    let row_bases: Vec<usize> = (0..shape.batch)
        .flat_map(|image| {
            (0..out_rows).map(move |row| image * image_grid + row * row_step * grid_cols)
        })
        .collect();
    let block_rows = (GRAD_BLOCK_PIXELS / out_cols.max(1)).max(1);
    // Tasks: a block of channels and a run of rows; each sums over every pixel in order.
    let task_rows = depth
        .div_ceil(2 * rayon::current_num_threads())
        .next_multiple_of(GRAD_ROWS);
    let rows = depth.next_multiple_of(task_rows);
    // Padding rows read the grid's first value; their sums are dropped.
    let mut offsets = correlation.tap_offsets();
    offsets.resize(rows, 0);
    let mut total_t = vec![0.0f32; blocks * rows * CHANNEL_BLOCK];
    total_t
        .par_chunks_mut(task_rows * CHANNEL_BLOCK)
        .enumerate()
        .for_each(|(task, part)| {
            let tasks_per_block = rows / task_rows;
            let block = task / tasks_per_block;
            let first_row = (task % tasks_per_block) * task_rows;
            let block_grads = &grads_t[block * pixels * CHANNEL_BLOCK..][..pixels * CHANNEL_BLOCK];
            for (index, block_bases) in row_bases.chunks(block_rows).enumerate() {
                let first_pixel = index * block_rows * out_cols;
                let grads = &block_grads[first_pixel * CHANNEL_BLOCK..]
                    [..block_bases.len() * out_cols * CHANNEL_BLOCK];
                for (tile_index, tile) in part.chunks_mut(GRAD_ROWS * CHANNEL_BLOCK).enumerate() {
                    let taps = &offsets[first_row + tile_index * GRAD_ROWS..][..GRAD_ROWS];
                    kernels::weight_grad_tile(
                        tile,
                        taps,
                        &grids,
                        grads,
                        block_bases,
                        [out_cols, col_step],
                    );
                }
            }
        });
    // dW^T blocks back to `[Co, depth]`.
    let mut weight_grad = vec![0.0f32; blocks * CHANNEL_BLOCK * depth];
    for (block, part) in total_t.chunks_exact(rows * CHANNEL_BLOCK).enumerate() {
        transpose_into(
            &part[..depth * CHANNEL_BLOCK],
            depth,
            CHANNEL_BLOCK,
            &mut weight_grad[block * CHANNEL_BLOCK * depth..],
            depth,
        );
    }
    weight_grad.truncate(channels_out * depth);
    weight_grad
}

/// `W^T` in blocks of 64 output channels, `[block, depth, 64]`, zero past the last channel, for
/// weights `[Co, depth]`: one row of a block is 256 contiguous bytes.
fn pack_transposed(weight: &[f32], channels_out: usize, depth: usize) -> Vec<f32> {
    let blocks = channels_out.div_ceil(CHANNEL_BLOCK);
    let mut packed = vec![0.0f32; blocks * depth * CHANNEL_BLOCK];
    for (block, target) in packed.chunks_exact_mut(depth * CHANNEL_BLOCK).enumerate() {
        let first = block * CHANNEL_BLOCK;
        let channels = CHANNEL_BLOCK.min(channels_out - first);
        transpose_into(
            &weight[first * depth..(first + channels) * depth],
            channels,
            depth,
            target,
            CHANNEL_BLOCK,
        );
    }
    packed
}

/// The AVX-512 tiles. Each entry point checks its slices' bounds, then runs the loads without
/// further checks.
#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{
        BROADCAST_PIXELS, BROADCAST_VECTORS, CHANNEL_BLOCK, GRAD_ROWS, LANES, Segment,
        TILE_CHANNELS, TILE_SEGMENTS,
    };
    use std::arch::x86_64::*;

    /// One tile of output channels (up to 8, the rows of `output`) x up to 3 segments:
    /// `output[c, p] = sum_k tile[k, c] * grid[offsets[k] + p]`.
    pub(super) fn forward_tile(
        tile: &[f32],
        offsets: &[usize],
        grid: &[f32],
        segments: &[Segment],
        output: &mut [f32],
        out_plane: usize,
    ) {
        assert!((1..=TILE_SEGMENTS).contains(&segments.len()));
        assert_eq!(tile.len(), offsets.len() * TILE_CHANNELS);
        let channels = output.len() / out_plane;
        assert!((1..=TILE_CHANNELS).contains(&channels));
        let max_offset = offsets.iter().copied().max().unwrap_or(0);
        for segment in segments {
            assert!(segment.grid + max_offset + LANES <= grid.len());
            assert!(segment.output + LANES <= out_plane);
        }
        // SAFETY: `supports` checked AVX-512 before any caller got here, and every vector
        // lies inside `grid` and `output` (asserted above).
        unsafe { forward_tile_avx512(tile, offsets, grid, segments, output, out_plane, channels) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn forward_tile_avx512(
        tile: &[f32],
        offsets: &[usize],
        grid: &[f32],
        segments: &[Segment],
        output: &mut [f32],
        out_plane: usize,
        channels: usize,
    ) {
        // Missing segments repeat the last one; they are not stored.
        let mut bases = [0usize; TILE_SEGMENTS];
        for (index, base) in bases.iter_mut().enumerate() {
            *base = segments[index.min(segments.len() - 1)].grid;
        }
        let grid = grid.as_ptr();
        let mut weights = tile.as_ptr();
        let mut sums = [[_mm512_setzero_ps(); TILE_SEGMENTS]; TILE_CHANNELS];
        for &offset in offsets {
            let mut inputs = [_mm512_setzero_ps(); TILE_SEGMENTS];
            for s in 0..TILE_SEGMENTS {
                // SAFETY: the vector is inside `grid` (asserted by the caller).
                inputs[s] = unsafe { _mm512_loadu_ps(grid.add(bases[s] + offset)) };
            }
            for (c, row) in sums.iter_mut().enumerate() {
                // SAFETY: the tile holds `TILE_CHANNELS` weights per offset.
                let weight = _mm512_set1_ps(unsafe { *weights.add(c) });
                for s in 0..TILE_SEGMENTS {
                    row[s] = _mm512_fmadd_ps(weight, inputs[s], row[s]);
                }
            }
            // SAFETY: stays within the tile (one step per offset).
            weights = unsafe { weights.add(TILE_CHANNELS) };
        }
        let output = output.as_mut_ptr();
        for (c, row) in sums.iter().enumerate().take(channels) {
            for (s, segment) in segments.iter().enumerate() {
                // SAFETY: channel `c` exists and the vector is inside its plane.
                unsafe { _mm512_storeu_ps(output.add(c * out_plane + segment.output), row[s]) };
            }
        }
    }

    /// Up to 6 output pixels x up to 64 output channels from `first_channel`:
    /// `tile[i, first_channel + c] (+)= sum_k grids[bases[i] + offsets[k]] * weight_t[k, c]`,
    /// where `tile` holds the pixels' `out^T` rows (`[pixels, width]`) and `weight_t` this
    /// pass's rows of one packed block (`[k, 64]`); `accumulate` adds to what the tile holds.
    pub(super) fn broadcast_tile(
        weight_t: &[f32],
        offsets: &[usize],
        grids: &[f32],
        bases: &[usize],
        tile: &mut [f32],
        first_channel: usize,
        accumulate: bool,
    ) {
        let pixels = bases.len();
        assert!((1..=BROADCAST_PIXELS).contains(&pixels));
        let width = tile.len() / pixels;
        assert_eq!(tile.len(), pixels * width);
        assert!(width.is_multiple_of(LANES));
        assert!(first_channel < width);
        assert_eq!(weight_t.len(), offsets.len() * CHANNEL_BLOCK);
        let max_offset = offsets.iter().copied().max().unwrap_or(0);
        let max_base = bases.iter().copied().max().unwrap_or(0);
        assert!(offsets.is_empty() || max_base + max_offset < grids.len());
        let vectors = ((width - first_channel) / LANES).min(BROADCAST_VECTORS);
        let mut pixel_bases = [0usize; BROADCAST_PIXELS];
        for (index, base) in pixel_bases.iter_mut().enumerate() {
            // Missing pixels repeat the last one; they are not stored.
            *base = bases[index.min(pixels - 1)];
        }
        // SAFETY: AVX-512 was checked by `supports`; the weight rows hold 64 columns and the tile
        // rows `width`, from which `first_channel + 16 * vectors` fit, and every grid index
        // is below `max_base + max_offset` (asserted above).
        unsafe {
            let run = BroadcastRun {
                weight_t: weight_t.as_ptr(),
                width,
                offsets,
                grids: grids.as_ptr(),
                bases: pixel_bases,
                pixels,
                tile: tile.as_mut_ptr().add(first_channel),
                accumulate,
            };
            match vectors {
                4 => broadcast_avx512::<4>(run),
                3 => broadcast_avx512::<3>(run),
                2 => broadcast_avx512::<2>(run),
                _ => broadcast_avx512::<1>(run),
            }
        }
    }

    /// One channel-vectorised tile's pointers, already offset to its first output channel.
    struct BroadcastRun<'a> {
        weight_t: *const f32,
        width: usize,
        offsets: &'a [usize],
        grids: *const f32,
        bases: [usize; BROADCAST_PIXELS],
        pixels: usize,
        tile: *mut f32,
        accumulate: bool,
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn broadcast_avx512<const VECTORS: usize>(run: BroadcastRun<'_>) {
        let mut sums = [[_mm512_setzero_ps(); VECTORS]; BROADCAST_PIXELS];
        if run.accumulate {
            for (i, row) in sums.iter_mut().enumerate().take(run.pixels) {
                for (v, sum) in row.iter_mut().enumerate() {
                    // SAFETY: pixel `i`'s row of the tile, inside its width.
                    *sum = unsafe { _mm512_loadu_ps(run.tile.add(i * run.width + v * LANES)) };
                }
            }
        }
        let mut inputs = [std::ptr::null::<f32>(); BROADCAST_PIXELS];
        for (input, base) in inputs.iter_mut().zip(run.bases) {
            *input = run.grids.wrapping_add(base);
        }
        let mut weights_row = run.weight_t;
        for &offset in run.offsets {
            let mut weights = [_mm512_setzero_ps(); VECTORS];
            for (v, weight) in weights.iter_mut().enumerate() {
                // SAFETY: row `k` of the block, 64 columns.
                *weight = unsafe { _mm512_loadu_ps(weights_row.add(v * LANES)) };
            }
            for (row, input) in sums.iter_mut().zip(&inputs) {
                // SAFETY: inside the grids (asserted by the caller).
                let value = _mm512_set1_ps(unsafe { *input.add(offset) });
                for (sum, weight) in row.iter_mut().zip(&weights) {
                    *sum = _mm512_fmadd_ps(value, *weight, *sum);
                }
            }
            weights_row = weights_row.wrapping_add(CHANNEL_BLOCK);
        }
        for (i, row) in sums.iter().enumerate().take(run.pixels) {
            for (v, sum) in row.iter().enumerate() {
                // SAFETY: as the loads above.
                unsafe { _mm512_storeu_ps(run.tile.add(i * run.width + v * LANES), *sum) };
            }
        }
    }

    /// Adds to `tile` (`[6, width]`, `dW^T` rows) the products of a block of output rows:
    /// `tile[r, c] += sum grids[row_bases[b] + x * col_step + taps[r]] * grads[b * out_cols + x, c]`
    /// over the block's rows `b` and columns `x < out_cols`, in that order.
    pub(super) fn weight_grad_tile(
        tile: &mut [f32],
        taps: &[usize],
        grids: &[f32],
        grads: &[f32],
        row_bases: &[usize],
        [out_cols, col_step]: [usize; 2],
    ) {
        assert_eq!(taps.len(), GRAD_ROWS);
        let width = tile.len() / GRAD_ROWS;
        assert_eq!(tile.len(), GRAD_ROWS * width);
        assert!(width.is_multiple_of(LANES));
        if row_bases.is_empty() || out_cols == 0 {
            return;
        }
        let max_tap = taps.iter().copied().max().unwrap_or(0);
        let max_base = row_bases.iter().copied().max().unwrap_or(0);
        assert!(max_base + (out_cols - 1) * col_step + max_tap < grids.len());
        assert!(row_bases.len() * out_cols * width <= grads.len());
        for first in (0..width).step_by(BROADCAST_VECTORS * LANES) {
            let vectors = ((width - first) / LANES).min(BROADCAST_VECTORS);
            // SAFETY: AVX-512 was checked by `supports`; the tile's columns
            // `first..first + 16 * vectors` exist, and every grid and gradient index is in
            // bounds (asserted above).
            unsafe {
                let run = WeightGradRun {
                    tile: tile.as_mut_ptr().add(first),
                    width,
                    taps,
                    grids: grids.as_ptr(),
                    grads: grads.as_ptr().add(first),
                    row_bases,
                    out_cols,
                    col_step,
                };
                match vectors {
                    4 => weight_grad_avx512::<4>(run),
                    3 => weight_grad_avx512::<3>(run),
                    2 => weight_grad_avx512::<2>(run),
                    _ => weight_grad_avx512::<1>(run),
                }
            }
        }
    }

    /// One weight-gradient tile's pointers, already offset to its first output channel.
    struct WeightGradRun<'a> {
        tile: *mut f32,
        width: usize,
        taps: &'a [usize],
        grids: *const f32,
        grads: *const f32,
        row_bases: &'a [usize],
        out_cols: usize,
        col_step: usize,
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn weight_grad_avx512<const VECTORS: usize>(run: WeightGradRun<'_>) {
        let mut sums = [[_mm512_setzero_ps(); VECTORS]; GRAD_ROWS];
        for (r, row) in sums.iter_mut().enumerate() {
            for (v, sum) in row.iter_mut().enumerate() {
                // SAFETY: row `r` of the tile, columns inside its width.
                *sum = unsafe { _mm512_loadu_ps(run.tile.add(r * run.width + v * LANES)) };
            }
        }
        let mut pixel = run.grads;
        for &row_base in run.row_bases {
            let mut taps = [std::ptr::null::<f32>(); GRAD_ROWS];
            for (tap, offset) in taps.iter_mut().zip(run.taps) {
                *tap = run.grids.wrapping_add(row_base + offset);
            }
            for x in 0..run.out_cols {
                let mut grads = [_mm512_setzero_ps(); VECTORS];
                for (v, value) in grads.iter_mut().enumerate() {
                    // SAFETY: this pixel's gradients, inside `grads` (asserted).
                    *value = unsafe { _mm512_loadu_ps(pixel.add(v * LANES)) };
                }
                let column = x * run.col_step;
                for (row, tap) in sums.iter_mut().zip(&taps) {
                    // SAFETY: inside the grids (asserted).
                    let input = _mm512_set1_ps(unsafe { *tap.add(column) });
                    for (sum, grad) in row.iter_mut().zip(&grads) {
                        *sum = _mm512_fmadd_ps(input, *grad, *sum);
                    }
                }
                pixel = pixel.wrapping_add(run.width);
            }
        }
        for (r, row) in sums.iter().enumerate() {
            for (v, sum) in row.iter().enumerate() {
                // SAFETY: as the loads above.
                unsafe { _mm512_storeu_ps(run.tile.add(r * run.width + v * LANES), *sum) };
            }
        }
    }
}

/// No direct kernels off x86-64: [`supports`] is always false there.
#[cfg(not(target_arch = "x86_64"))]
mod kernels {
    use super::Segment;

    pub(super) fn forward_tile(
        _: &[f32],
        _: &[usize],
        _: &[f32],
        _: &[Segment],
        _: &mut [f32],
        _: usize,
    ) {
        unreachable!("direct convolutions need AVX-512")
    }

    pub(super) fn broadcast_tile(
        _: &[f32],
        _: &[usize],
        _: &[f32],
        _: &[usize],
        _: &mut [f32],
        _: usize,
        _: bool,
    ) {
        unreachable!("direct convolutions need AVX-512")
    }

    pub(super) fn weight_grad_tile(
        _: &mut [f32],
        _: &[usize],
        _: &[f32],
        _: &[f32],
        _: &[usize],
        _: [usize; 2],
    ) {
        unreachable!("direct convolutions need AVX-512")
    }
}
