//! Winograd convolutions for stride-1 3x3 layers with padding 1 (most of ResNet-18's
//! multiply-adds): the forward pass, the input gradient and the weight gradient, in two
//! tilings.
//!
//! Each `m x m` block of output pixels ("tile") comes from an `(m + 2) x (m + 2)` patch of
//! input. Transformed, `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, the patch and kernel meet in
//! `(m + 2)²` element-wise products where the direct correlation takes `9 m²`; summed over
//! input channels, each position is a plain GEMM `V_p [tiles, Ci] x U_p [Ci, Co]`. F(4x4, 3x3) ([`F4`], 36
//! positions) does 4 times fewer multiply-adds than any direct kernel, F(2x2, 3x3) ([`F2`], 16
//! positions) 2.25 times fewer. F4 takes the larger images; on small ones (few tiles, deep
//! layers) its kernel transform, 36 values per weight triple, outweighs its savings and F2 runs
//! instead (`benches/conv.rs`: ResNet-18 at 128 px, batch 16, 64 channels on 32x32 forward 4.5
//! ms against F2's 5.4, 128 on 16x16 3.5 against 4.3, 256 on 8x8 4.7-5.0 against 4.5). The
//! constants are small (the points 0, ±1, ±2 and infinity for F4, 0, ±1 and infinity for F2),
//! so the f32 rounding stays within a few units of the direct sum's (the tests hold every pass
//! to 1e-4 of the largest value, as the direct kernels).
//!
//! Tiles go in blocks. Where there are enough blocks, each task transforms one block's input
//! and runs its GEMMs while the block is still in the core's cache; where there are few, every
//! block is transformed once and tasks take a block and a slice of the output channels. Either
//! way a task transforms its products straight into the output. The transforms are written as
//! loops along the tiles, which the compiler vectorises. Blocks and slices follow the shape
//! only, never the number of threads, so the results do not depend on it.
//!
//! The input gradient of such a convolution is the same correlation of the output gradient
//! with the kernel flipped and its channel axes swapped: it transforms the flipped kernels
//! (each call transforms the kernels afresh: they change with every step).
//!
//! The weight gradient is the gradient of the transformed form: each position's `dU_p` is a
//! GEMM summing, over the tiles, the transformed input times the lifted output gradient
//! `A dY Aᵀ`, and `Gᵀ dU G` folds the positions back into the 3x3 taps.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv_grad::{ConvKind, ConvShape};
use super::host_buffers::par_filled;
use crate::linalg::{MatRef, Threads, matmul_strided};

/// Parallel tasks to aim for: with fewer tile blocks, output channels are split too.
const MIN_TASKS: usize = 8;
/// Fewest output channels in a task's slice.
const MIN_SLICE_CHANNELS: usize = 32;
/// Fewest `Ci x Co` products a thread takes in each chunk of the weight gradient (in units of
/// a block of tiles): 4 blocks a thread at 64 channels, 1 from 128.
const MIN_CHUNK_PRODUCTS: usize = 128 * 128;
/// Output channels per task of the weight transform (one 64-byte run per position and input
/// channel).
const KERNEL_BLOCK: usize = 16;
/// Fewest input and output channels (`benches/conv.rs`, ResNet-18's first layer at 128 px,
/// batch 16, beats the direct kernels from 64).
const MIN_CHANNELS: usize = 64;
/// Fewest tiles of either tiling: with fewer, the GEMMs are too small to pay for the
/// transforms. 512 channels on 4x4 images, batch 16, F2's 64 tiles: in training steps 58-61
/// ms a step forward against im2col's 56 and 117-122 for the gradients against 122 (nearly
/// half of F2's forward time was its kernel transform); on 10x10 images, batch 8, 200 tiles:
/// 44.7 ms for the three passes against 60.4. F4 on 8x8 images, batch 16 (64 of its tiles):
/// 4.7-5.0 ms forward against F2's 4.5.
const MIN_TILES: usize = 128;

/// The output tile side of the Winograd kernels that compute `shape`: 4 (F(4x4, 3x3)) where
/// its tiles number at least [`MIN_TILES`], else 2 where those do, `None` where these kernels
/// do not take it ([`applies`]).
pub fn tile_side(shape: &ConvShape) -> Option<usize> {
    let eligible = shape.kind() == Some(ConvKind::Dense)
        && shape.kernel == [3, 3]
        && shape.stride == [1, 1]
        && shape.padding == [1, 1]
        && shape.dilation == [1, 1]
        && shape.output == shape.input
        && shape.batch > 0
        && shape.input[0] > 0
        && shape.input[1] > 0
        && shape.channels_in >= MIN_CHANNELS
        && shape.channels_out >= MIN_CHANNELS
        && enabled();
    let tiles =
        |side: usize| shape.batch * shape.input[0].div_ceil(side) * shape.input[1].div_ceil(side);
    [4, 2]
        .into_iter()
        .find(|&side| eligible && tiles(side) >= MIN_TILES)
}

/// Whether these kernels compute `shape`: one group, 3x3, stride 1, padding 1, dilation 1, the
/// output the size of the input, at least [`MIN_CHANNELS`] channels in and out and
/// [`MIN_TILES`] tiles (where they run faster than the direct kernels and im2col), and not
/// switched off with `PICIE_WINOGRAD=0` (which benchmarks use to compare).
pub fn applies(shape: &ConvShape) -> bool {
    tile_side(shape).is_some()
}

fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("PICIE_WINOGRAD").is_none_or(|value| value != "0"))
}

/// The forward pass, `[N, Co, H, W]`.
///
/// # Panics
/// On slices that do not match `shape`, or a shape these kernels do not take ([`applies`]).
pub fn forward(shape: &ConvShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let side = tile_side(shape);
    assert!(side.is_some(), "no Winograd kernel for {shape:?}");
    assert_eq!(x.len(), shape.input_len(), "input size");
    assert_eq!(weight.len(), shape.weight_len(), "weight size");
    if side == Some(4) {
        let kernel = TransformedKernel::new::<F4, 4, 6>(weight, shape, false);
        correlate::<F4, 4, 6>(shape, x, &kernel)
    } else {
        let kernel = TransformedKernel::new::<F2, 2, 4>(weight, shape, false);
        correlate::<F2, 2, 4>(shape, x, &kernel)
    }
}

/// The input gradient, `[N, Ci, H, W]`: the output gradient correlated with the flipped
/// kernel (its channel axes swapped).
///
/// # Panics
/// On slices that do not match `shape`, or a shape these kernels do not take ([`applies`]).
pub fn input_grad(shape: &ConvShape, weight: &[f32], output_grad: &[f32]) -> Vec<f32> {
    let side = tile_side(shape);
    assert!(side.is_some(), "no Winograd kernel for {shape:?}");
    assert_eq!(
        output_grad.len(),
        shape.output_len(),
        "output gradient size"
    );
    assert_eq!(weight.len(), shape.weight_len(), "weight size");
    let swapped = ConvShape {
        channels_in: shape.channels_out,
        channels_out: shape.channels_in,
        ..*shape
    };
    if side == Some(4) {
        let kernel = TransformedKernel::new::<F4, 4, 6>(weight, shape, true);
        correlate::<F4, 4, 6>(&swapped, output_grad, &kernel)
    } else {
        let kernel = TransformedKernel::new::<F2, 2, 4>(weight, shape, true);
        correlate::<F2, 2, 4>(&swapped, output_grad, &kernel)
    }
}

/// The weight gradient, `[Co, Ci, 3, 3]`: the gradient of the Winograd form itself, which
/// equals the convolution's. With `dM = A dY Aᵀ` the output gradient of each tile lifted to
/// the positions, `dU_p = V_pᵀ dM_p` summed over the tiles (a GEMM `[Ci, tiles] x [tiles, Co]`
/// a position) and `dg = Gᵀ dU G`.
///
/// # Panics
/// On slices that do not match `shape`, or a shape these kernels do not take ([`applies`]).
pub fn weight_grad(shape: &ConvShape, x: &[f32], output_grad: &[f32]) -> Vec<f32> {
    let side = tile_side(shape);
    assert!(side.is_some(), "no Winograd kernel for {shape:?}");
    assert_eq!(x.len(), shape.input_len(), "input size");
    assert_eq!(
        output_grad.len(),
        shape.output_len(),
        "output gradient size"
    );
    if side == Some(4) {
        weight_grad_tiled::<F4, 4, 6>(shape, x, output_grad)
    } else {
        weight_grad_tiled::<F2, 2, 4>(shape, x, output_grad)
    }
}

/// A Winograd tiling F(TILE x TILE, 3x3), patches `PATCH = TILE + 2` wide: its transforms
/// along one axis, which the two-dimensional ones apply along rows, then columns.
trait Tiling<const TILE: usize, const PATCH: usize> {
    /// Tiles per block, the GEMMs' rows: a block's transformed input (`PATCH² x Ci x
    /// BLOCK_TILES` values, about 1 MiB at 128 channels) and products stay in L2 and L3 while
    /// a task uses them.
    const BLOCK_TILES: usize;
    /// `Bᵀ d`: a patch's row (or column) at the interpolation points.
    fn input(d: [f32; PATCH]) -> [f32; PATCH];
    /// `A y`: a tile's row of output gradient lifted to the points (the gradient of
    /// [`Tiling::output`]).
    fn gradient(y: [f32; TILE]) -> [f32; PATCH];
    /// `Aᵀ m`: a tile's row of outputs from the products at the points.
    fn output(m: [f32; PATCH]) -> [f32; TILE];
    /// `G g`: a kernel row at the points, scaled so that [`Tiling::output`] divides by
    /// nothing.
    fn kernel(g: [f32; 3]) -> [f32; PATCH];
    /// `Gᵀ u`: the gradient of [`Tiling::kernel`].
    fn fold(u: [f32; PATCH]) -> [f32; 3];
}

/// F(2x2, 3x3): the points 0, 1, -1 and infinity.
struct F2;

impl Tiling<2, 4> for F2 {
    const BLOCK_TILES: usize = 128;

    #[inline(always)]
    fn input([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }

    #[inline(always)]
    fn gradient([y0, y1]: [f32; 2]) -> [f32; 4] {
        [y0, y0 + y1, y0 - y1, -y1]
    }

    #[inline(always)]
    fn output([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }

    #[inline(always)]
    fn kernel([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
        [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
    }

    #[inline(always)]
    fn fold([u0, u1, u2, u3]: [f32; 4]) -> [f32; 3] {
        let half_sum = 0.5 * (u1 + u2);
        [u0 + half_sum, 0.5 * (u1 - u2), half_sum + u3]
    }
}

/// F(4x4, 3x3): the points 0, 1, -1, 2, -2 and infinity.
struct F4;

impl Tiling<4, 6> for F4 {
    const BLOCK_TILES: usize = 64;

    #[inline(always)]
    fn input([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
        let (p, q) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
        let (r, s) = (d4 - d2, 2.0 * (d3 - d1));
        [
            4.0 * d0 - 5.0 * d2 + d4,
            p + q,
            p - q,
            r + s,
            r - s,
            4.0 * d1 - 5.0 * d3 + d5,
        ]
    }

    #[inline(always)]
    fn gradient([y0, y1, y2, y3]: [f32; 4]) -> [f32; 6] {
        let (even, odd) = (y0 + y2, y1 + y3);
        let (even2, odd2) = (y0 + 4.0 * y2, 2.0 * y1 + 8.0 * y3);
        [y0, even + odd, even - odd, even2 + odd2, even2 - odd2, y3]
    }

    #[inline(always)]
    fn output([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
        let (sum12, difference12) = (m1 + m2, m1 - m2);
        let (sum34, difference34) = (m3 + m4, m3 - m4);
        [
            m0 + sum12 + sum34,
            difference12 + 2.0 * difference34,
            sum12 + 4.0 * sum34,
            difference12 + 8.0 * difference34 + m5,
        ]
    }

    #[inline(always)]
    fn kernel([g0, g1, g2]: [f32; 3]) -> [f32; 6] {
        let even = g0 + g2;
        let quarter = 0.25 * g0 + g2;
        [
            0.25 * g0,
            -(even + g1) / 6.0,
            (g1 - even) / 6.0,
            (quarter + 0.5 * g1) / 6.0,
            (quarter - 0.5 * g1) / 6.0,
            g2,
        ]
    }

    #[inline(always)]
    fn fold([u0, u1, u2, u3, u4, u5]: [f32; 6]) -> [f32; 3] {
        let (sum12, difference12) = (u1 + u2, u2 - u1);
        let (sum34, difference34) = (u3 + u4, u3 - u4);
        [
            0.25 * u0 - sum12 / 6.0 + sum34 / 24.0,
            difference12 / 6.0 + difference34 / 12.0,
            (sum34 - sum12) / 6.0 + u5,
        ]
    }
}

/// [`weight_grad`] in the tiling `W`.
fn weight_grad_tiled<W: Tiling<T, P>, const T: usize, const P: usize>(
    shape: &ConvShape,
    x: &[f32],
    output_grad: &[f32],
) -> Vec<f32> {
    let positions = P * P;
    let (depth, channels) = (shape.channels_in, shape.channels_out);
    let grid = Grid::new(shape, T);
    let gradient_grid = Grid {
        depth: channels,
        ..grid
    };
    let tiles = grid.tiles();
    let block = W::BLOCK_TILES.min(tiles);
    let blocks = tiles.div_ceil(block);
    let matrix = depth * channels;
    let mut transformed = vec![0.0f32; positions * matrix];
    // Blocks transformed together (one per thread, more where the channels are few), then
    // added into `dU` while they are still in the caches. Each chunk brings the threads
    // together twice, so a chunk's products must outweigh that. The sums do not depend on the
    // chunks: each position adds its blocks in order.
    let per_thread = (MIN_CHUNK_PRODUCTS / (depth * channels)).max(1);
    let chunk_blocks = (rayon::current_num_threads() * per_thread).clamp(1, blocks);
    let mut input_buffer =
        vec![MaybeUninit::<f32>::uninit(); positions * depth * block * chunk_blocks];
    let mut gradient_buffer =
        vec![MaybeUninit::<f32>::uninit(); positions * channels * block * chunk_blocks];
    for chunk_start in (0..blocks).step_by(chunk_blocks) {
        let chunk_end = blocks.min(chunk_start + chunk_blocks);
        let first_tile = chunk_start * block;
        let chunk_tiles = tiles.min(chunk_end * block) - first_tile;
        rayon::join(
            || {
                input_buffer[..positions * depth * chunk_tiles]
                    .par_chunks_mut(positions * depth * block)
                    .enumerate()
                    .for_each(|(index, values)| {
                        let first = first_tile + index * block;
                        grid.transform_input::<W, T, P>(x, first, block.min(tiles - first), values);
                    })
            },
            || {
                gradient_buffer[..positions * channels * chunk_tiles]
                    .par_chunks_mut(positions * channels * block)
                    .enumerate()
                    .for_each(|(index, values)| {
                        let first = first_tile + index * block;
                        gradient_grid.transform_gradient::<W, T, P>(
                            output_grad,
                            first,
                            block.min(tiles - first),
                            values,
                        );
                    })
            },
        );
        // SAFETY: the transforms wrote the chunk's every value.
        let inputs: &[f32] = unsafe {
            std::slice::from_raw_parts(
                input_buffer.as_ptr().cast(),
                positions * depth * chunk_tiles,
            )
        };
        // SAFETY: as above.
        let gradients: &[f32] = unsafe {
            std::slice::from_raw_parts(
                gradient_buffer.as_ptr().cast(),
                positions * channels * chunk_tiles,
            )
        };
        transformed
            .par_chunks_mut(matrix)
            .enumerate()
            .for_each(|(position, sum)| {
                for index in 0..chunk_end - chunk_start {
                    let first = index * block;
                    let count = block.min(chunk_tiles - first);
                    let lhs = MatRef::strided(
                        &inputs[positions * depth * first + position * depth * count..]
                            [..depth * count],
                        depth,
                        count,
                        count,
                        1,
                    );
                    let rhs = MatRef::strided(
                        &gradients[positions * channels * first + position * channels * count..]
                            [..channels * count],
                        count,
                        channels,
                        1,
                        count,
                    );
                    matmul_strided(
                        sum,
                        [channels, 1],
                        lhs,
                        rhs,
                        chunk_start + index > 0,
                        Threads::Current,
                    );
                }
            });
    }
    // dg = Gᵀ dU G, by blocks of output channels (vectors along them).
    let mut weight_grad = vec![0.0f32; shape.weight_len()];
    weight_grad
        .par_chunks_mut(KERNEL_BLOCK * depth * 9)
        .enumerate()
        .for_each(|(block, rows)| {
            let first = block * KERNEL_BLOCK;
            let width = KERNEL_BLOCK.min(channels - first);
            for ci in 0..depth {
                let u = |position: usize| {
                    &transformed[position * matrix + ci * channels + first..][..width]
                };
                // Gᵀ along the rows: for each of the P columns, 3 rows.
                let mut left = [[[0.0f32; KERNEL_BLOCK]; 3]; P];
                for (b, folded) in left.iter_mut().enumerate() {
                    let column: [&[f32]; P] = std::array::from_fn(|a| u(P * a + b));
                    for lane in 0..width {
                        let taps = W::fold(std::array::from_fn(|a| column[a][lane]));
                        for (row, tap) in folded.iter_mut().zip(taps) {
                            row[lane] = tap;
                        }
                    }
                }
                for i in 0..3 {
                    for lane in 0..width {
                        let taps = &mut rows[(lane * depth + ci) * 9 + 3 * i..][..3];
                        taps.copy_from_slice(&W::fold(std::array::from_fn(|b| left[b][i][lane])));
                    }
                }
            }
        });
    weight_grad
}

/// `U = G g Gᵀ` of every kernel `g = weight[co, ci]`, laid out `[position][ci][co]` (each
/// position's `[Ci, Co]` matrix contiguous), or of the flipped kernels laid out
/// `[position][co][ci]` for the input gradient.
struct TransformedKernel {
    values: Vec<f32>,
    /// The correlation's input channels: `Ci`, or `Co` when flipped.
    depth: usize,
    /// The correlation's output channels: `Co`, or `Ci` when flipped.
    out: usize,
}

impl TransformedKernel {
    /// The kernels of `shape`'s `weight` in the tiling `W`.
    fn new<W: Tiling<T, P>, const T: usize, const P: usize>(
        weight: &[f32],
        shape: &ConvShape,
        flipped: bool,
    ) -> Self {
        let (channels_out, channels_in) = (shape.channels_out, shape.channels_in);
        let (depth, out) = if flipped {
            (channels_out, channels_in)
        } else {
            (channels_in, channels_out)
        };
        let matrix = depth * out;
        let len = P * P * matrix;
        let mut values: Vec<f32> = Vec::with_capacity(len);
        let target = OutputPtr(values.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        // Tasks by blocks of the correlation's output channels: for each of its input
        // channels, the block's kernels are gathered tap by tap, transformed as vectors along
        // the output channels, and written as one run per position.
        (0..out.div_ceil(KERNEL_BLOCK))
            .into_par_iter()
            .for_each(|block| {
                let first = block * KERNEL_BLOCK;
                let width = KERNEL_BLOCK.min(out - first);
                let mut taps = [[0.0f32; KERNEL_BLOCK]; 9];
                for channel in 0..depth {
                    // Kernel `[co, ci]` of a lane: the output channel is the lane unless
                    // flipped.
                    let kernel = |lane: usize| {
                        if flipped {
                            channel * channels_in + first + lane
                        } else {
                            (first + lane) * channels_in + channel
                        }
                    };
                    for (tap, row) in taps.iter_mut().enumerate() {
                        // Flipping reverses both axes: tap `k` takes `8 - k`.
                        let source = if flipped { 8 - tap } else { tap };
                        for (lane, value) in row[..width].iter_mut().enumerate() {
                            *value = weight[kernel(lane) * 9 + source];
                        }
                    }
                    // G g: P rows of 3 taps.
                    let mut left = [[[0.0f32; KERNEL_BLOCK]; 3]; P];
                    for j in 0..3 {
                        for lane in 0..KERNEL_BLOCK {
                            let points =
                                W::kernel([taps[j][lane], taps[3 + j][lane], taps[6 + j][lane]]);
                            for (a, point) in points.into_iter().enumerate() {
                                left[a][j][lane] = point;
                            }
                        }
                    }
                    // (G g) Gᵀ: P x P.
                    for (a, [t0, t1, t2]) in left.iter().enumerate() {
                        let mut rows = [[0.0f32; KERNEL_BLOCK]; P];
                        for lane in 0..KERNEL_BLOCK {
                            let points = W::kernel([t0[lane], t1[lane], t2[lane]]);
                            for (b, point) in points.into_iter().enumerate() {
                                rows[b][lane] = point;
                            }
                        }
                        for (b, row) in rows.iter().enumerate() {
                            let at = (P * a + b) * matrix + channel * out + first;
                            // SAFETY: `width` values from `at` stay inside row `channel` of the
                            // position's matrix; this task alone writes these output channels.
                            unsafe {
                                std::ptr::copy_nonoverlapping(row.as_ptr(), target.at(at), width);
                            }
                        }
                    }
                }
            });
        // SAFETY: every (position, channel, output channel) was written by the task of the
        // output channel's block.
        unsafe { values.set_len(len) };
        Self { values, depth, out }
    }

    /// `U_p` as the `[depth, out]` right-hand matrix of a correlation, for the output channels
    /// `out_channels`.
    fn matrix(&self, position: usize, out_channels: std::ops::Range<usize>) -> MatRef<'_> {
        let start = position * self.depth * self.out + out_channels.start;
        MatRef::strided(
            &self.values[start..],
            self.depth,
            out_channels.len(),
            self.out,
            1,
        )
    }
}

/// A raw pointer to the output that tasks write through, each its own tiles and channels.
#[derive(Clone, Copy)]
struct OutputPtr(*mut f32);
impl OutputPtr {
    /// The pointer `index` values on (a method, so closures capture the whole `Sync` wrapper).
    ///
    /// # Safety
    /// `index` must stay inside the buffer.
    unsafe fn at(self, index: usize) -> *mut f32 {
        // SAFETY: the caller keeps `index` inside the buffer.
        unsafe { self.0.add(index) }
    }
}

// SAFETY: tasks write disjoint elements (their tiles x their channels) and the buffer outlives
// every task (they end inside `correlate`).
unsafe impl Send for OutputPtr {}
// SAFETY: as above.
unsafe impl Sync for OutputPtr {}

/// The 3x3, stride-1, padding-1 correlation of `x` (`shape`'s input channels) with `kernel`
/// (its forward orientation, or flipped with swapped channels): `[N, shape output channels, H,
/// W]`.
fn correlate<W: Tiling<T, P>, const T: usize, const P: usize>(
    shape: &ConvShape,
    x: &[f32],
    kernel: &TransformedKernel,
) -> Vec<f32> {
    let positions = P * P;
    let (depth, channels) = (shape.channels_in, shape.channels_out);
    let grid = Grid::new(shape, T);
    let tiles = grid.tiles();
    let block = W::BLOCK_TILES.min(tiles);
    let blocks = tiles.div_ceil(block);
    let slices = (MIN_TASKS.div_ceil(blocks))
        .min(channels / MIN_SLICE_CHANNELS)
        .max(1);
    let slice = channels.div_ceil(slices);
    let len = shape.batch * channels * grid.height * grid.width;
    let mut output: Vec<f32> = Vec::with_capacity(len);
    let target = OutputPtr(output.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let block_len = positions * depth * block;
    // The products and output transform of one task: a block's transformed input
    // (`[position][channel][tile]`) and a slice of the output channels.
    let products_of = |transformed: &[f32],
                       block_index: usize,
                       out: std::ops::Range<usize>,
                       products: &mut Vec<f32>| {
        let first = block_index * block;
        let count = block.min(tiles - first);
        products.resize(positions * out.len() * count, 0.0);
        for position in 0..positions {
            let lhs = MatRef::strided(
                &transformed[position * depth * count..][..depth * count],
                count,
                depth,
                1,
                count,
            );
            let rhs = kernel.matrix(position, out.clone());
            let dst = &mut products[position * out.len() * count..][..out.len() * count];
            matmul_strided(dst, [1, count], lhs, rhs, false, Threads::Current);
        }
        // SAFETY: see `OutputPtr`; `transform_output` writes inside `len` elements.
        unsafe { grid.transform_output::<W, T, P>(products, first, count, &out, channels, target) };
    };
    if slices == 1 {
        // Enough blocks: each task transforms its own block, which its GEMMs then read while
        // it is still in the core's cache.
        (0..blocks).into_par_iter().for_each_init(
            || (Vec::<f32>::new(), Vec::new()),
            |(transformed, products), block_index| {
                let first = block_index * block;
                let count = block.min(tiles - first);
                let values = positions * depth * count;
                transformed.reserve(values);
                let spare = &mut transformed.spare_capacity_mut()[..values];
                grid.transform_input::<W, T, P>(x, first, count, spare);
                // SAFETY: `transform_input` wrote all `values` (the positions x `depth`
                // channels x the block's tiles).
                let block_values: &[f32] =
                    unsafe { std::slice::from_raw_parts(spare.as_ptr().cast(), values) };
                products_of(block_values, block_index, 0..channels, products);
            },
        );
    } else {
        // Few blocks: every block's input is transformed once, then read by the tasks of
        // all its channel slices.
        // SAFETY: `transform_input` writes every value of its block's chunk (the positions x
        // `depth` channels x the block's tiles; the chunks follow the blocks).
        let transformed = unsafe {
            par_filled(
                positions * depth * tiles,
                block_len,
                |block_index, values| {
                    let first = block_index * block;
                    grid.transform_input::<W, T, P>(x, first, block.min(tiles - first), values);
                },
            )
        };
        (0..blocks * slices)
            .into_par_iter()
            .for_each_init(Vec::new, |products, task| {
                let (block_index, slice_index) = (task / slices, task % slices);
                let out = slice_index * slice..((slice_index + 1) * slice).min(channels);
                if !out.is_empty() {
                    products_of(
                        &transformed[block_index * block_len..],
                        block_index,
                        out,
                        products,
                    );
                }
            });
    }
    // SAFETY: every output element belongs to one tile and one channel slice, and the task of
    // that pair wrote it.
    unsafe { output.set_len(len) };
    output
}

/// Splits `values` by column modulo `T` (`phases[r][t] = values[T t + r]`), so that each step
/// of a transform along the tiles reads contiguous vectors; a last partial group fills the
/// first phases.
fn deinterleave<const T: usize>(values: &[f32], phases: &mut [Vec<f32>; T]) {
    let groups = values.chunks_exact(T);
    let rest = groups.remainder();
    let full = values.len() / T;
    for (t, group) in groups.enumerate() {
        for (phase, &value) in phases.iter_mut().zip(group) {
            phase[t] = value;
        }
    }
    for (phase, &value) in phases.iter_mut().zip(rest) {
        phase[full] = value;
    }
}

/// The first `columns` values of the rows of positions `P a .. P a + P - 1` of a block's
/// transformed values (`[position][channel][tile]`, positions `position_stride` apart).
fn position_rows<const P: usize>(
    target: &mut [MaybeUninit<f32>],
    a: usize,
    position_stride: usize,
    columns: usize,
) -> [&mut [MaybeUninit<f32>]; P] {
    let mut rest = &mut target[P * a * position_stride..];
    std::array::from_fn(|b| {
        let taken = std::mem::take(&mut rest);
        // The last row may end before a whole stride.
        let (row, tail) = if b + 1 < P {
            taken.split_at_mut(position_stride)
        } else {
            (taken, &mut [][..])
        };
        rest = tail;
        &mut row[..columns]
    })
}

/// `P` lines of `len` values each, `stride` apart in `buffer`.
fn lines_mut<const P: usize>(buffer: &mut [f32], stride: usize, len: usize) -> [&mut [f32]; P] {
    let mut rest = buffer;
    std::array::from_fn(|_| {
        let taken = std::mem::take(&mut rest);
        let (line, tail) = taken.split_at_mut(stride.min(taken.len()));
        rest = tail;
        &mut line[..len]
    })
}

/// The tiling of a batch of `[depth, height, width]` inputs into square output tiles.
struct Grid {
    batch: usize,
    depth: usize,
    height: usize,
    width: usize,
    tiles_h: usize,
    tiles_w: usize,
}

impl Grid {
    /// The tiling of `shape`'s input into tiles of `side x side` output pixels.
    fn new(shape: &ConvShape, side: usize) -> Self {
        let [height, width] = shape.input;
        Self {
            batch: shape.batch,
            depth: shape.channels_in,
            height,
            width,
            tiles_h: height.div_ceil(side),
            tiles_w: width.div_ceil(side),
        }
    }

    fn tiles(&self) -> usize {
        self.batch * self.tiles_h * self.tiles_w
    }

    /// The runs of tiles `first..first + count` that share an image and a tile row:
    /// `(image, tile row, first tile column, columns, index of the run's first tile in the
    /// block)`.
    fn runs(
        &self,
        first: usize,
        count: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize, usize)> + '_ {
        let mut tile = first;
        let end = first + count;
        std::iter::from_fn(move || {
            if tile >= end {
                return None;
            }
            let (row_index, column) = (tile / self.tiles_w, tile % self.tiles_w);
            let (image, row) = (row_index / self.tiles_h, row_index % self.tiles_h);
            let columns = (self.tiles_w - column).min(end - tile);
            let run = (image, row, column, columns, tile - first);
            tile += columns;
            Some(run)
        })
    }

    /// Phase buffers for [`deinterleave`] along a row of tiles.
    fn phases<const T: usize>(&self) -> [Vec<f32>; T] {
        std::array::from_fn(|_| vec![0.0f32; self.tiles_w + 1])
    }

    /// `Bᵀ d B` of every tile's input patch (zeros outside the image), into
    /// `transformed[position][channel][tile]`.
    fn transform_input<W: Tiling<T, P>, const T: usize, const P: usize>(
        &self,
        x: &[f32],
        first: usize,
        count: usize,
        transformed: &mut [MaybeUninit<f32>],
    ) {
        // The patch of tile `(i, j)` starts one pixel above and left of its outputs.
        self.transform_windows::<T, P, P>(x, 1, first, count, transformed, W::input);
    }

    /// `A dY Aᵀ` of every tile's output gradient (zeros outside the image), into
    /// `transformed[position][channel][tile]`.
    fn transform_gradient<W: Tiling<T, P>, const T: usize, const P: usize>(
        &self,
        output_grad: &[f32],
        first: usize,
        count: usize,
        transformed: &mut [MaybeUninit<f32>],
    ) {
        self.transform_windows::<T, P, T>(output_grad, 0, first, count, transformed, W::gradient);
    }

    /// `F w Fᵀ` of every tile's `R x R` window of `values` (`[batch, depth, height, width]`),
    /// the window of tile `(i, j)` starting at row `T i - margin` and column `T j - margin`
    /// (zeros outside the image), with `transform` the one-axis `F`, into
    /// `transformed[position][channel][tile]`.
    fn transform_windows<const T: usize, const P: usize, const R: usize>(
        &self,
        values: &[f32],
        margin: usize,
        first: usize,
        count: usize,
        transformed: &mut [MaybeUninit<f32>],
        transform: impl Fn([f32; R]) -> [f32; P],
    ) {
        let (height, width) = (self.height, self.width);
        let plane = height * width;
        // The window rows of a tile row, zero-padded: `margin` zero columns on the left, zeros
        // past the right edge, zero rows above and below the image.
        let padded = T * self.tiles_w + R - T;
        let mut window_rows = vec![0.0f32; R * padded];
        // F w: the combined rows.
        let mut combined = vec![0.0f32; P * padded];
        let mut phases = self.phases::<T>();
        let position_stride = self.depth * count;
        // Channel by channel, so that each position's row of the block is written in order.
        let runs: Vec<_> = self.runs(first, count).collect();
        for channel in 0..self.depth {
            for &(image, row, column, columns, offset) in &runs {
                let source = &values[(image * self.depth + channel) * plane..][..plane];
                for (r, line) in window_rows.chunks_exact_mut(padded).enumerate() {
                    let y = (T * row + r).wrapping_sub(margin);
                    if y < height {
                        line[..margin].fill(0.0);
                        line[margin..margin + width].copy_from_slice(&source[y * width..][..width]);
                        line[margin + width..].fill(0.0);
                    } else {
                        line.fill(0.0);
                    }
                }
                // The window columns of this run: `T columns + R - T` from padded column
                // `T column`.
                let (start, span) = (T * column, T * columns + R - T);
                let w: [&[f32]; R] =
                    std::array::from_fn(|r| &window_rows[r * padded + start..][..span]);
                let mut q = lines_mut::<P>(&mut combined, padded, span);
                for p in 0..span {
                    let points = transform(std::array::from_fn(|r| w[r][p]));
                    for (line, point) in q.iter_mut().zip(points) {
                        line[p] = point;
                    }
                }
                // (F w) Fᵀ, tile by tile: columns `T t .. T t + R - 1` of each combined row,
                // read by column modulo `T` so that every step is a contiguous vector.
                let target = &mut transformed[channel * count + offset..];
                for (a, line) in q.iter().enumerate() {
                    deinterleave(line, &mut phases);
                    let mut outputs = position_rows::<P>(target, a, position_stride, columns);
                    for t in 0..columns {
                        let points = transform(std::array::from_fn(|j| {
                            if j < T {
                                phases[j][t]
                            } else {
                                phases[j - T][t + 1]
                            }
                        }));
                        for (output, point) in outputs.iter_mut().zip(points) {
                            output[t] = MaybeUninit::new(point);
                        }
                    }
                }
            }
        }
    }

    /// `Aᵀ M A` of every tile's products for the output channels `out`, written into the
    /// `[N, channels, H, W]` output at `target`.
    ///
    /// # Safety
    /// `target` must point to `batch * channels * height * width` writable values that no one
    /// else touches at the tiles `first..first + count` of the channels `out`.
    unsafe fn transform_output<W: Tiling<T, P>, const T: usize, const P: usize>(
        &self,
        products: &[f32],
        first: usize,
        count: usize,
        out: &std::ops::Range<usize>,
        channels: usize,
        target: OutputPtr,
    ) {
        let (height, width) = (self.height, self.width);
        let plane = height * width;
        let stride = out.len() * count;
        // The output rows of a run of tiles.
        let padded = T * self.tiles_w;
        let mut rows = vec![0.0f32; T * padded];
        // Aᵀ M along the rows of the products: `[k][b][tile]`.
        let mut left = vec![0.0f32; T * P * self.tiles_w];
        let mut phases = self.phases::<T>();
        // Channel by channel, so that the products are read and the output planes written in
        // order.
        let runs: Vec<_> = self.runs(first, count).collect();
        for (slot, channel) in out.clone().enumerate() {
            for &(image, row, column, columns, offset) in &runs {
                let (y0, x0) = (T * row, T * column);
                let written = (T * columns).min(width - x0);
                // Vectors along the tiles: every position's products are contiguous there.
                for b in 0..P {
                    let m: [&[f32]; P] = std::array::from_fn(|a| {
                        &products[(P * a + b) * stride + slot * count + offset..][..columns]
                    });
                    let mut sums = lines_mut::<T>(&mut left[b * columns..], P * columns, columns);
                    for tile in 0..columns {
                        let points = W::output(std::array::from_fn(|a| m[a][tile]));
                        for (line, point) in sums.iter_mut().zip(points) {
                            line[tile] = point;
                        }
                    }
                }
                for (k, line) in left[..T * P * columns]
                    .chunks_exact(P * columns)
                    .enumerate()
                {
                    let l: [&[f32]; P] = std::array::from_fn(|b| &line[b * columns..][..columns]);
                    for tile in 0..columns {
                        let pixels = W::output(std::array::from_fn(|b| l[b][tile]));
                        for (phase, pixel) in phases.iter_mut().zip(pixels) {
                            phase[tile] = pixel;
                        }
                    }
                    let target_row = &mut rows[k * padded..][..T * columns];
                    for (tile, pixels) in target_row.chunks_exact_mut(T).enumerate() {
                        for (pixel, phase) in pixels.iter_mut().zip(&phases) {
                            *pixel = phase[tile];
                        }
                    }
                }
                let base = (image * channels + channel) * plane + y0 * width + x0;
                for k in 0..T.min(height - y0) {
                    // SAFETY: `written` columns from `x0` stay inside row `y0 + k` (an image
                    // row) of this image and channel, inside the buffer; this task owns these
                    // tiles at this channel (the caller's contract).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            rows[k * padded..].as_ptr(),
                            target.at(base + k * width),
                            written,
                        );
                    }
                }
            }
        }
    }
}
