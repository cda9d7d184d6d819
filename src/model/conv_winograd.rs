//! Winograd F(2x2, 3x3) for stride-1 3x3 convolutions with padding 1 (most of ResNet-18's
//! multiply-adds): the forward pass, the input gradient and the weight gradient.
//!
//! Each 2x2 block of output pixels ("tile") comes from a 4x4 patch of input. Transformed,
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`, the patch and kernel meet in 16 element-wise products
//! where the direct correlation takes 36; summed over input channels, each of the 16 positions
//! is a plain GEMM `V_p [tiles, Ci] x U_p [Ci, Co]`. That is 2.25 times fewer multiply-adds
//! than any direct kernel for the price of the transforms, which are additions only (the
//! constants are 0, ±1 and ±1/2, so f32 rounding stays at the level of a direct sum).
//!
//! Tiles go in blocks of [`BLOCK_TILES`]. Where there are enough blocks, each task transforms
//! one block's input and runs its 16 GEMMs while the block is still in the core's cache; where
//! there are few, every block is transformed once and tasks take a block and a slice of the
//! output channels. Either way a task transforms its products straight into the output. The
//! transforms are written as loops along the tiles, which the compiler vectorises. Blocks and
//! slices follow the shape only, never the number of threads, so the results do not depend on
//! it. `benches/conv.rs` prints the figures beside the direct kernels and im2col.
//!
//! The input gradient of such a convolution is the same correlation of the output gradient
//! with the kernel flipped and its channel axes swapped; flipping the kernel permutes the
//! transformed positions (`G R = P G`, `R` reversing the three taps and `P` swapping rows 0
//! and 3), so the input gradient reads the forward's transformed kernels with its positions
//! permuted (each call transforms the kernels afresh: they change with every step).
//!
//! The weight gradient is the gradient of the transformed form: each position's `dU_p` is a
//! GEMM summing, over the tiles, the transformed input times the lifted output gradient
//! `A dY Aᵀ`, and `Gᵀ dU G` folds the 16 positions back into the 3x3 taps.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv_grad::{ConvKind, ConvShape};
use super::host_buffers::par_filled;
use crate::linalg::{MatRef, Threads, matmul_strided};

/// Positions of a transformed 4x4 tile.
const POSITIONS: usize = 16;
/// Tiles (2x2 output pixels) per block: the GEMMs' rows. A block's transformed input (`16 x Ci
/// x 128` values, 1 MiB at 128 channels) and products stay in L2 and L3 while a task uses
/// them.
const BLOCK_TILES: usize = 128;
/// Parallel tasks to aim for: with fewer tile blocks, output channels are split too.
const MIN_TASKS: usize = 8;
/// Fewest output channels in a task's slice.
const MIN_SLICE_CHANNELS: usize = 32;
/// Fewest `Ci x Co` products a thread takes in each chunk of the weight gradient (in units of
/// 128 tiles): 4 blocks a thread at 64 channels, 1 from 128.
const MIN_CHUNK_PRODUCTS: usize = 128 * 128;
/// Output channels per task of the weight transform (one 64-byte run per position and input
/// channel).
const KERNEL_BLOCK: usize = 16;
/// Fewest input and output channels (`benches/conv.rs`, ResNet-18's first layer at 128 px,
/// batch 16: forward 5.4-5.5 ms against the direct kernel's 6.1, weight gradient 6.1-6.4
/// against 6.8; when every block was transformed before the GEMMs, 6.2 against 6.3 forward).
const MIN_CHANNELS: usize = 64;
/// Fewest tiles: with fewer, the GEMMs are too small to pay for the transforms (512 channels on
/// 4x4 images, batch 16, 64 tiles: 10.6 ms against im2col's 7.0, before the transforms were
/// vectorised; on 10x10 images, batch 8, 200 tiles: 16.3 against 19.8).
const MIN_TILES: usize = 128;
/// `P`: the transformed position of row (or column) `a` once the kernel is flipped.
const FLIPPED: [usize; 4] = [3, 1, 2, 0];

/// Whether these kernels compute `shape`: one group, 3x3, stride 1, padding 1, dilation 1, the
/// output the size of the input, at least [`MIN_CHANNELS`] channels in and out and
/// [`MIN_TILES`] tiles (where they run faster than the direct kernels and im2col), and not
/// switched off with `PICIE_WINOGRAD=0` (which benchmarks use to compare).
pub fn applies(shape: &ConvShape) -> bool {
    shape.kind() == Some(ConvKind::Dense)
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
        && shape.batch * shape.input[0].div_ceil(2) * shape.input[1].div_ceil(2) >= MIN_TILES
        && enabled()
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
    assert!(applies(shape), "no Winograd kernel for {shape:?}");
    assert_eq!(x.len(), shape.input_len(), "input size");
    assert_eq!(weight.len(), shape.weight_len(), "weight size");
    let kernel = TransformedKernel::new(weight, shape.channels_out, shape.channels_in);
    correlate(shape, x, &kernel, false)
}

/// The input gradient, `[N, Ci, H, W]`: the output gradient correlated with the flipped
/// kernel (its channel axes swapped).
///
/// # Panics
/// On slices that do not match `shape`, or a shape these kernels do not take ([`applies`]).
pub fn input_grad(shape: &ConvShape, weight: &[f32], output_grad: &[f32]) -> Vec<f32> {
    assert!(applies(shape), "no Winograd kernel for {shape:?}");
    assert_eq!(
        output_grad.len(),
        shape.output_len(),
        "output gradient size"
    );
    assert_eq!(weight.len(), shape.weight_len(), "weight size");
    let kernel = TransformedKernel::new(weight, shape.channels_out, shape.channels_in);
    let swapped = ConvShape {
        channels_in: shape.channels_out,
        channels_out: shape.channels_in,
        ..*shape
    };
    correlate(&swapped, output_grad, &kernel, true)
}

/// The weight gradient, `[Co, Ci, 3, 3]`: the gradient of the Winograd form itself, which
/// equals the convolution's. With `dM = A dY Aᵀ` the output gradient of each tile lifted to
/// the 16 positions, `dU_p = V_pᵀ dM_p` summed over the tiles (16 GEMMs `[Ci, tiles] x
/// [tiles, Co]`, 2.25 times fewer multiply-adds than the direct sum) and `dg = Gᵀ dU G`.
///
/// # Panics
/// On slices that do not match `shape`, or a shape these kernels do not take ([`applies`]).
pub fn weight_grad(shape: &ConvShape, x: &[f32], output_grad: &[f32]) -> Vec<f32> {
    assert!(applies(shape), "no Winograd kernel for {shape:?}");
    assert_eq!(x.len(), shape.input_len(), "input size");
    assert_eq!(
        output_grad.len(),
        shape.output_len(),
        "output gradient size"
    );
    let (depth, channels) = (shape.channels_in, shape.channels_out);
    let grid = Grid::new(shape);
    let gradient_grid = Grid {
        depth: channels,
        ..grid
    };
    let tiles = grid.tiles();
    let block = BLOCK_TILES.min(tiles);
    let blocks = tiles.div_ceil(block);
    let matrix = depth * channels;
    let mut transformed = vec![0.0f32; POSITIONS * matrix];
    // Blocks transformed together (one per thread, more where the channels are few), then
    // added into `dU` while they are still in the caches. Each chunk brings the threads
    // together twice, so a chunk's products must outweigh that. The sums do not depend on the
    // chunks: each position adds its blocks in order.
    let per_thread = (MIN_CHUNK_PRODUCTS / (depth * channels)).max(1);
    let chunk_blocks = (rayon::current_num_threads() * per_thread).clamp(1, blocks);
    let mut input_buffer =
        vec![MaybeUninit::<f32>::uninit(); POSITIONS * depth * block * chunk_blocks];
    let mut gradient_buffer =
        vec![MaybeUninit::<f32>::uninit(); POSITIONS * channels * block * chunk_blocks];
    for chunk_start in (0..blocks).step_by(chunk_blocks) {
        let chunk_end = blocks.min(chunk_start + chunk_blocks);
        let first_tile = chunk_start * block;
        let chunk_tiles = tiles.min(chunk_end * block) - first_tile;
        rayon::join(
            || {
                input_buffer[..POSITIONS * depth * chunk_tiles]
                    .par_chunks_mut(POSITIONS * depth * block)
                    .enumerate()
                    .for_each(|(index, values)| {
                        let first = first_tile + index * block;
                        grid.transform_input(x, first, block.min(tiles - first), values);
                    })
            },
            || {
                gradient_buffer[..POSITIONS * channels * chunk_tiles]
                    .par_chunks_mut(POSITIONS * channels * block)
                    .enumerate()
                    .for_each(|(index, values)| {
                        let first = first_tile + index * block;
                        gradient_grid.transform_gradient(
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
                POSITIONS * depth * chunk_tiles,
            )
        };
        // SAFETY: as above.
        let gradients: &[f32] = unsafe {
            std::slice::from_raw_parts(
                gradient_buffer.as_ptr().cast(),
                POSITIONS * channels * chunk_tiles,
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
                        &inputs[POSITIONS * depth * first + position * depth * count..]
                            [..depth * count],
                        depth,
                        count,
                        count,
                        1,
                    );
                    let rhs = MatRef::strided(
                        &gradients[POSITIONS * channels * first + position * channels * count..]
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
                let u: [&[f32]; POSITIONS] = std::array::from_fn(|position| {
                    &transformed[position * matrix + ci * channels + first..][..width]
                });
                // Gᵀ along the rows: 3 rows of 4 positions.
                let mut left = [[[0.0f32; KERNEL_BLOCK]; 4]; 3];
                for b in 0..4 {
                    for lane in 0..width {
                        let (u0, u1, u2, u3) =
                            (u[b][lane], u[4 + b][lane], u[8 + b][lane], u[12 + b][lane]);
                        left[0][b][lane] = u0 + 0.5 * (u1 + u2);
                        left[1][b][lane] = 0.5 * (u1 - u2);
                        left[2][b][lane] = 0.5 * (u1 + u2) + u3;
                    }
                }
                for (i, [t0, t1, t2, t3]) in left.iter().enumerate() {
                    for lane in 0..width {
                        let (t0, t1, t2, t3) = (t0[lane], t1[lane], t2[lane], t3[lane]);
                        let taps = &mut rows[(lane * depth + ci) * 9 + 3 * i..][..3];
                        taps[0] = t0 + 0.5 * (t1 + t2);
                        taps[1] = 0.5 * (t1 - t2);
                        taps[2] = 0.5 * (t1 + t2) + t3;
                    }
                }
            }
        });
    weight_grad
}

/// `U = G g Gᵀ` of every kernel `g = weight[co, ci]`, laid out `[position][ci][co]`: each
/// position's `[Ci, Co]` matrix is contiguous.
struct TransformedKernel {
    values: Vec<f32>,
    channels_out: usize,
    channels_in: usize,
}

impl TransformedKernel {
    fn new(weight: &[f32], channels_out: usize, channels_in: usize) -> Self {
        let matrix = channels_in * channels_out;
        let len = POSITIONS * matrix;
        let mut values: Vec<f32> = Vec::with_capacity(len);
        let target = OutputPtr(values.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        // Tasks by blocks of output channels: for each input channel, the block's kernels are
        // gathered tap by tap, transformed as vectors along the output channels, and written as
        // one run per position.
        (0..channels_out.div_ceil(KERNEL_BLOCK))
            .into_par_iter()
            .for_each(|block| {
                let first = block * KERNEL_BLOCK;
                let width = KERNEL_BLOCK.min(channels_out - first);
                let mut taps = [[0.0f32; KERNEL_BLOCK]; 9];
                for ci in 0..channels_in {
                    for lane in 0..width {
                        let g = &weight[((first + lane) * channels_in + ci) * 9..][..9];
                        for (tap, &value) in g.iter().enumerate() {
                            taps[tap][lane] = value;
                        }
                    }
                    // G g: 4 rows of 3 taps.
                    let mut left = [[[0.0f32; KERNEL_BLOCK]; 3]; 4];
                    for j in 0..3 {
                        for lane in 0..KERNEL_BLOCK {
                            let (g0, g1, g2) =
                                (taps[j][lane], taps[3 + j][lane], taps[6 + j][lane]);
                            left[0][j][lane] = g0;
                            left[1][j][lane] = 0.5 * (g0 + g1 + g2);
                            left[2][j][lane] = 0.5 * (g0 - g1 + g2);
                            left[3][j][lane] = g2;
                        }
                    }
                    // (G g) Gᵀ: 4 x 4.
                    for (a, [t0, t1, t2]) in left.iter().enumerate() {
                        let mut rows = [[0.0f32; KERNEL_BLOCK]; 4];
                        for lane in 0..KERNEL_BLOCK {
                            let (t0, t1, t2) = (t0[lane], t1[lane], t2[lane]);
                            rows[0][lane] = t0;
                            rows[1][lane] = 0.5 * (t0 + t1 + t2);
                            rows[2][lane] = 0.5 * (t0 - t1 + t2);
                            rows[3][lane] = t2;
                        }
                        for (b, row) in rows.iter().enumerate() {
                            let at = (4 * a + b) * matrix + ci * channels_out + first;
                            // SAFETY: `width` values from `at` stay inside row `ci` of the
                            // position's matrix; this task alone writes these output channels.
                            unsafe {
                                std::ptr::copy_nonoverlapping(row.as_ptr(), target.at(at), width);
                            }
                        }
                    }
                }
            });
        // SAFETY: every (position, ci, co) was written by the task of `co`'s block.
        unsafe { values.set_len(len) };
        Self {
            values,
            channels_out,
            channels_in,
        }
    }

    /// `U_p` as the `[depth, out]` right-hand matrix of a correlation, for the output channels
    /// `out_channels`: `[Ci, Co]` forward, `[Co, Ci]` of the flipped kernel when `flipped`.
    fn matrix(
        &self,
        position: usize,
        flipped: bool,
        out_channels: std::ops::Range<usize>,
    ) -> MatRef<'_> {
        let matrix = self.channels_in * self.channels_out;
        if flipped {
            let position = 4 * FLIPPED[position / 4] + FLIPPED[position % 4];
            let start = position * matrix + out_channels.start * self.channels_out;
            MatRef::strided(
                &self.values[start..],
                self.channels_out,
                out_channels.len(),
                1,
                self.channels_out,
            )
        } else {
            let start = position * matrix + out_channels.start;
            MatRef::strided(
                &self.values[start..],
                self.channels_in,
                out_channels.len(),
                self.channels_out,
                1,
            )
        }
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
/// (its forward orientation, or flipped with swapped channels when `flipped`): `[N, shape
/// output channels, H, W]`.
fn correlate(shape: &ConvShape, x: &[f32], kernel: &TransformedKernel, flipped: bool) -> Vec<f32> {
    let (depth, channels) = (shape.channels_in, shape.channels_out);
    let grid = Grid::new(shape);
    let tiles = grid.tiles();
    let block = BLOCK_TILES.min(tiles);
    let blocks = tiles.div_ceil(block);
    let slices = (MIN_TASKS.div_ceil(blocks))
        .min(channels / MIN_SLICE_CHANNELS)
        .max(1);
    let slice = channels.div_ceil(slices);
    let len = shape.batch * channels * grid.height * grid.width;
    let mut output: Vec<f32> = Vec::with_capacity(len);
    let target = OutputPtr(output.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let block_len = POSITIONS * depth * block;
    // The products and output transform of one task: a block's transformed input
    // (`[position][channel][tile]`) and a slice of the output channels.
    let products_of = |transformed: &[f32],
                       block_index: usize,
                       out: std::ops::Range<usize>,
                       products: &mut Vec<f32>| {
        let first = block_index * block;
        let count = block.min(tiles - first);
        products.resize(POSITIONS * out.len() * count, 0.0);
        for position in 0..POSITIONS {
            let lhs = MatRef::strided(
                &transformed[position * depth * count..][..depth * count],
                count,
                depth,
                1,
                count,
            );
            let rhs = kernel.matrix(position, flipped, out.clone());
            let dst = &mut products[position * out.len() * count..][..out.len() * count];
            matmul_strided(dst, [1, count], lhs, rhs, false, Threads::Current);
        }
        // SAFETY: see `OutputPtr`; `transform_output` writes inside `len` elements.
        unsafe { grid.transform_output(products, first, count, &out, channels, target) };
    };
    if slices == 1 {
        // Enough blocks: each task transforms its own block, which its GEMMs then read while
        // it is still in the core's cache.
        (0..blocks).into_par_iter().for_each_init(
            || (Vec::<f32>::new(), Vec::new()),
            |(transformed, products), block_index| {
                let first = block_index * block;
                let count = block.min(tiles - first);
                let values = POSITIONS * depth * count;
                transformed.reserve(values);
                let spare = &mut transformed.spare_capacity_mut()[..values];
                grid.transform_input(x, first, count, spare);
                // SAFETY: `transform_input` wrote all `values` (16 positions x `depth`
                // channels x the block's tiles).
                let block_values: &[f32] =
                    unsafe { std::slice::from_raw_parts(spare.as_ptr().cast(), values) };
                products_of(block_values, block_index, 0..channels, products);
            },
        );
    } else {
        // Few blocks: every block's input is transformed once, then read by the tasks of
        // all its channel slices.
        // SAFETY: `transform_input` writes every value of its block's chunk (16 positions x
        // `depth` channels x the block's tiles; the chunks follow the blocks).
        let transformed = unsafe {
            par_filled(
                POSITIONS * depth * tiles,
                block_len,
                |block_index, values| {
                    let first = block_index * block;
                    grid.transform_input(x, first, block.min(tiles - first), values);
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

/// Splits `pairs` into its even and odd values, so that each step of a transform along the
/// tiles reads contiguous vectors.
fn deinterleave(pairs: &[f32], even: &mut [f32], odd: &mut [f32]) {
    for (j, pair) in pairs.chunks_exact(2).enumerate() {
        even[j] = pair[0];
        odd[j] = pair[1];
    }
}

/// The first `columns` values of the rows of positions `4 a .. 4 a + 3` of a block's
/// transformed values (`[position][channel][tile]`, positions `position_stride` apart).
fn position_rows(
    target: &mut [MaybeUninit<f32>],
    a: usize,
    position_stride: usize,
    columns: usize,
) -> [&mut [MaybeUninit<f32>]; 4] {
    let rows = &mut target[4 * a * position_stride..];
    let (row0, rest) = rows.split_at_mut(position_stride);
    let (row1, rest) = rest.split_at_mut(position_stride);
    let (row2, row3) = rest.split_at_mut(position_stride);
    [
        &mut row0[..columns],
        &mut row1[..columns],
        &mut row2[..columns],
        &mut row3[..columns],
    ]
}

/// The tiling of a batch of `[depth, height, width]` inputs into 2x2 output tiles.
struct Grid {
    batch: usize,
    depth: usize,
    height: usize,
    width: usize,
    tiles_h: usize,
    tiles_w: usize,
}

impl Grid {
    /// The tiling of `shape`'s input.
    fn new(shape: &ConvShape) -> Self {
        let [height, width] = shape.input;
        Self {
            batch: shape.batch,
            depth: shape.channels_in,
            height,
            width,
            tiles_h: height.div_ceil(2),
            tiles_w: width.div_ceil(2),
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

    /// `Bᵀ d B` of every tile's 4x4 input patch (zeros outside the image), into
    /// `transformed[position][channel][tile]`.
    fn transform_input(
        &self,
        x: &[f32],
        first: usize,
        count: usize,
        transformed: &mut [MaybeUninit<f32>],
    ) {
        let (height, width) = (self.height, self.width);
        let plane = height * width;
        // The patch rows of a tile row, zero-padded: one zero column on the left, zeros past
        // the right edge, zero rows above and below the image.
        let padded = 2 * self.tiles_w + 2;
        let mut patch_rows = vec![0.0f32; 4 * padded];
        // Bᵀ d: the four combined rows.
        let mut combined = vec![0.0f32; 4 * padded];
        let (mut even, mut odd) = (vec![0.0f32; padded / 2], vec![0.0f32; padded / 2]);
        // Channel by channel, so that each position's row of the block is written in order.
        let runs: Vec<_> = self.runs(first, count).collect();
        for channel in 0..self.depth {
            for &(image, row, column, columns, offset) in &runs {
                let source = &x[(image * self.depth + channel) * plane..][..plane];
                for (r, line) in patch_rows.chunks_exact_mut(padded).enumerate() {
                    let y = (2 * row + r).wrapping_sub(1);
                    if y < height {
                        line[1..=width].copy_from_slice(&source[y * width..][..width]);
                        line[0] = 0.0;
                        line[width + 1..].fill(0.0);
                    } else {
                        line.fill(0.0);
                    }
                }
                let (d0, rest) = patch_rows.split_at(padded);
                let (d1, rest) = rest.split_at(padded);
                let (d2, d3) = rest.split_at(padded);
                let (q0, rest) = combined.split_at_mut(padded);
                let (q1, rest) = rest.split_at_mut(padded);
                let (q2, q3) = rest.split_at_mut(padded);
                for p in 0..padded {
                    q0[p] = d0[p] - d2[p];
                    q1[p] = d1[p] + d2[p];
                    q2[p] = d2[p] - d1[p];
                    q3[p] = d1[p] - d3[p];
                }
                // (Bᵀ d) B, tile by tile: columns 2 t .. 2 t + 3 of each combined row, read as
                // its even and odd columns so that every step is a contiguous vector.
                let target = &mut transformed[channel * count + offset..];
                let position_stride = self.depth * count;
                for (a, q) in [&*q0, &*q1, &*q2, &*q3].into_iter().enumerate() {
                    deinterleave(&q[2 * column..][..2 * columns + 2], &mut even, &mut odd);
                    let (e0, e1) = (&even[..columns], &even[1..=columns]);
                    let (o0, o1) = (&odd[..columns], &odd[1..=columns]);
                    let [out0, out1, out2, out3] =
                        position_rows(target, a, position_stride, columns);
                    for t in 0..columns {
                        out0[t] = MaybeUninit::new(e0[t] - e1[t]);
                        out1[t] = MaybeUninit::new(o0[t] + e1[t]);
                        out2[t] = MaybeUninit::new(e1[t] - o0[t]);
                        out3[t] = MaybeUninit::new(o0[t] - o1[t]);
                    }
                }
            }
        }
    }

    /// `A dY Aᵀ` of every tile's 2x2 output gradient (zeros outside the image), into
    /// `transformed[position][channel][tile]`.
    fn transform_gradient(
        &self,
        output_grad: &[f32],
        first: usize,
        count: usize,
        transformed: &mut [MaybeUninit<f32>],
    ) {
        let (height, width) = (self.height, self.width);
        let plane = height * width;
        let padded = 2 * self.tiles_w;
        let (mut top, mut bottom) = (vec![0.0f32; padded], vec![0.0f32; padded]);
        let mut combined = vec![0.0f32; 4 * padded];
        let (mut even, mut odd) = (vec![0.0f32; self.tiles_w], vec![0.0f32; self.tiles_w]);
        let position_stride = self.depth * count;
        let runs: Vec<_> = self.runs(first, count).collect();
        for channel in 0..self.depth {
            for &(image, row, column, columns, offset) in &runs {
                let y0 = 2 * row;
                let source = &output_grad[(image * self.depth + channel) * plane..][..plane];
                top[..width].copy_from_slice(&source[y0 * width..][..width]);
                if y0 + 1 < height {
                    bottom[..width].copy_from_slice(&source[(y0 + 1) * width..][..width]);
                } else {
                    bottom[..width].fill(0.0);
                }
                // Past the right edge (odd widths) the gradient is zero.
                top[width..].fill(0.0);
                bottom[width..].fill(0.0);
                let target = &mut transformed[channel * count + offset..];
                // A along the rows: y0, y0 + y1, y0 - y1, -y1; then along the columns.
                let (t, b) = (&top[..padded], &bottom[..padded]);
                for p in 0..padded {
                    combined[p] = t[p];
                    combined[padded + p] = t[p] + b[p];
                    combined[2 * padded + p] = t[p] - b[p];
                    combined[3 * padded + p] = -b[p];
                }
                for (a, q) in combined.chunks_exact(padded).enumerate() {
                    deinterleave(&q[2 * column..][..2 * columns], &mut even, &mut odd);
                    let [out0, out1, out2, out3] =
                        position_rows(target, a, position_stride, columns);
                    let (e, o) = (&even[..columns], &odd[..columns]);
                    for t in 0..columns {
                        out0[t] = MaybeUninit::new(e[t]);
                        out1[t] = MaybeUninit::new(e[t] + o[t]);
                        out2[t] = MaybeUninit::new(e[t] - o[t]);
                        out3[t] = MaybeUninit::new(-o[t]);
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
    unsafe fn transform_output(
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
        // The two output rows of a run of tiles, their columns interleaved.
        let mut top = vec![0.0f32; 2 * self.tiles_w];
        let mut bottom = vec![0.0f32; 2 * self.tiles_w];
        // Channel by channel, so that the products are read and the output planes written in
        // order.
        let runs: Vec<_> = self.runs(first, count).collect();
        for (slot, channel) in out.clone().enumerate() {
            for &(image, row, column, columns, offset) in &runs {
                let (y0, second_row) = (2 * row, 2 * row + 1 < height);
                let x0 = 2 * column;
                let written = (2 * columns).min(width - x0);
                let m: [&[f32]; POSITIONS] = std::array::from_fn(|position| {
                    &products[position * stride + slot * count + offset..][..columns]
                });
                // Vectors along the tiles: every position's products are contiguous there.
                for tile in 0..columns {
                    let column_sums: [f32; 4] =
                        std::array::from_fn(|b| m[b][tile] + m[4 + b][tile] + m[8 + b][tile]);
                    let column_differences: [f32; 4] =
                        std::array::from_fn(|b| m[4 + b][tile] - m[8 + b][tile] - m[12 + b][tile]);
                    let [s0, s1, s2, s3] = column_sums;
                    let [d0, d1, d2, d3] = column_differences;
                    top[2 * tile] = s0 + s1 + s2;
                    top[2 * tile + 1] = s1 - s2 - s3;
                    bottom[2 * tile] = d0 + d1 + d2;
                    bottom[2 * tile + 1] = d1 - d2 - d3;
                }
                let base = (image * channels + channel) * plane + y0 * width + x0;
                // SAFETY: `written` columns from `x0` stay inside row `y0` (and `y0 + 1` when
                // it exists) of this image and channel, inside the buffer; this task owns these
                // tiles at this channel (the caller's contract).
                unsafe {
                    std::ptr::copy_nonoverlapping(top.as_ptr(), target.at(base), written);
                    if second_row {
                        std::ptr::copy_nonoverlapping(
                            bottom.as_ptr(),
                            target.at(base + width),
                            written,
                        );
                    }
                }
            }
        }
    }
}
