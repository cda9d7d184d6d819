//! Max pooling on host memory (f32, NCHW), for burn's Flex backend: ResNet's 3x3, stride-2
//! pooling after the stem.
//!
//! Flex pools through its 3-D kernel (bounds worked out per output pixel and tap, 64-bit
//! indices, then a cast to the index type the device asks for). Here each plane is pooled in
//! one pass with plane-local 32-bit indices, and the gradient is scattered back plane by
//! plane, in order (results do not depend on the number of threads).

use rayon::prelude::*;

use super::host_buffers::par_filled;

/// A max pooling of `planes` planes (batch x channels), dilation 1, output size rounded down,
/// padding at most half the window (so that every window covers some input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    /// Batch x channels.
    pub planes: usize,
    /// Input `[height, width]`.
    pub input: [usize; 2],
    /// Window `[height, width]`.
    pub kernel: [usize; 2],
    /// Step between windows.
    pub stride: [usize; 2],
    /// Implicit `-inf` border on each side.
    pub padding: [usize; 2],
}

impl PoolShape {
    /// Output `[height, width]` (PyTorch's floor mode), `None` when no window fits or the
    /// padding is more than half the window (PyTorch's rule, which keeps every window on the
    /// input: an empty window would have no index to pass its gradient to).
    pub fn output(&self) -> Option<[usize; 2]> {
        if (0..2).any(|axis| 2 * self.padding[axis] > self.kernel[axis]) {
            return None;
        }
        let side = |axis: usize| {
            (self.input[axis] + 2 * self.padding[axis])
                .checked_sub(self.kernel[axis])
                .map(|reach| reach / self.stride[axis] + 1)
        };
        match (side(0), side(1)) {
            (Some(rows), Some(cols)) if self.stride.iter().all(|&step| step > 0) => {
                Some([rows, cols])
            }
            _ => None,
        }
    }

    fn input_plane(&self) -> usize {
        self.input[0] * self.input[1]
    }

    /// Input positions `[start, end)` that output position `out` covers along `axis`.
    fn window(&self, axis: usize, out: usize) -> [usize; 2] {
        let (padding, start) = (self.padding[axis], out * self.stride[axis]);
        [
            start.saturating_sub(padding),
            (start + self.kernel[axis])
                .saturating_sub(padding)
                .min(self.input[axis]),
        ]
    }
}

/// `(output, indices)`: each window's largest value and its plane-local position (the first
/// largest; a NaN wins, as in PyTorch).
///
/// # Panics
/// If `x` does not match `shape`, no window fits, or a plane has more than `u32::MAX` values.
pub fn forward(shape: &PoolShape, x: &[f32]) -> (Vec<f32>, Vec<u32>) {
    let [out_rows, out_cols] = shape.output().expect("a pooling window that fits");
    let in_plane = shape.input_plane();
    assert_eq!(x.len(), shape.planes * in_plane, "input size");
    assert!(
        u32::try_from(in_plane).is_ok(),
        "plane too large for 32-bit indices"
    );
    let [_, in_cols] = shape.input;
    let out_plane = out_rows * out_cols;
    let mut output = vec![0.0; shape.planes * out_plane];
    let mut indices = vec![0u32; shape.planes * out_plane];
    output
        .par_chunks_mut(out_plane.max(1))
        .zip(indices.par_chunks_mut(out_plane.max(1)))
        .zip(x.par_chunks(in_plane.max(1)))
        .for_each_init(Stride2Rows::default, |rows, ((values, at), plane)| {
            if shape.kernel == [3, 3] && shape.stride == [2, 2] && shape.padding == [1, 1] {
                rows.pool(plane, shape.input, [out_rows, out_cols], values, at);
                return;
            }
            for oy in 0..out_rows {
                let [y0, y1] = shape.window(0, oy);
                for ox in 0..out_cols {
                    let [x0, x1] = shape.window(1, ox);
                    let mut best = f32::NEG_INFINITY;
                    let mut best_at = y0 * in_cols + x0;
                    for y in y0..y1 {
                        let row = &plane[y * in_cols..][x0..x1];
                        for (x, &value) in (x0..).zip(row) {
                            if value > best || value.is_nan() {
                                best = value;
                                best_at = y * in_cols + x;
                            }
                        }
                    }
                    values[oy * out_cols + ox] = best;
                    // In range: asserted above.
                    at[oy * out_cols + ox] = best_at as u32;
                }
            }
        });
    (output, indices)
}

/// Scratch rows for ResNet's pooling (3x3 windows, stride 2, padding 1), vectorised along the
/// output columns: each input row is split into its even and odd columns (with the `-inf`
/// border), so that each of the 9 taps is one compare-and-select over a whole output row. On
/// ResNet-18's pooling at 128 px, batch 16, the window loop in [`forward`] took 16 ms a call,
/// these rows 2.5 ms.
#[derive(Default)]
struct Stride2Rows {
    /// Columns `-1, 1, 3, ...` of an input row (`-inf` outside it).
    even: Vec<f32>,
    /// Columns `0, 2, 4, ...`.
    odd: Vec<f32>,
    best: Vec<f32>,
    best_at: Vec<u32>,
}

impl Stride2Rows {
    /// Pools one `[rows, cols]` plane into `values` and `at` (`[out_rows, out_cols]`), with the
    /// same values and indices as the window loop: taps in row-major order, a larger value or
    /// a NaN taking over, the window's first input position where nothing does.
    fn pool(
        &mut self,
        plane: &[f32],
        [rows, cols]: [usize; 2],
        [out_rows, out_cols]: [usize; 2],
        values: &mut [f32],
        at: &mut [u32],
    ) {
        // Padded column `p` is input column `p - 1`; window `ox` covers padded `2 ox ..= 2 ox
        // + 2`, so even entries `ox` and `ox + 1` and odd entry `ox`.
        let half = out_cols + 1;
        self.even.resize(half, f32::NEG_INFINITY);
        self.odd.resize(half, f32::NEG_INFINITY);
        self.best.resize(out_cols, f32::NEG_INFINITY);
        self.best_at.resize(out_cols, 0);
        for oy in 0..out_rows {
            let first_row = (2 * oy).saturating_sub(1);
            self.best.fill(f32::NEG_INFINITY);
            for (ox, start) in self.best_at.iter_mut().enumerate() {
                // In range: the plane has at most `u32::MAX` values (asserted by the caller).
                *start = (first_row * cols + (2 * ox).saturating_sub(1)) as u32;
            }
            for y in first_row..(2 * oy + 2).min(rows) {
                let row = &plane[y * cols..][..cols];
                // Input column `2 j` is odd entry `j`, column `2 j + 1` even entry `j + 1`.
                self.even[0] = f32::NEG_INFINITY;
                let pairs = row.chunks_exact(2);
                let last = pairs.remainder().first().copied();
                let full = cols / 2;
                for ((pair, odd), even) in pairs
                    .zip(&mut self.odd[..full])
                    .zip(&mut self.even[1..=full])
                {
                    *odd = pair[0];
                    *even = pair[1];
                }
                self.odd[full..].fill(f32::NEG_INFINITY);
                self.even[full + 1..].fill(f32::NEG_INFINITY);
                if let Some(value) = last {
                    self.odd[full] = value;
                }
                let taps = [
                    (&self.even[..out_cols], 0),
                    (&self.odd[..out_cols], 1),
                    (&self.even[1..], 2),
                ];
                for (candidates, padded_offset) in taps {
                    // Input position of window `ox`'s tap: `y cols + 2 ox + offset - 1` (a
                    // wrapped value on the left border, where the tap is `-inf` and never
                    // taken).
                    let base = ((y * cols + padded_offset) as u32).wrapping_sub(1);
                    for (ox, ((&value, best), best_at)) in candidates
                        .iter()
                        .zip(&mut self.best)
                        .zip(&mut self.best_at)
                        .enumerate()
                    {
                        let take = value > *best || value.is_nan();
                        *best = if take { value } else { *best };
                        *best_at = if take {
                            base.wrapping_add(2 * ox as u32)
                        } else {
                            *best_at
                        };
                    }
                }
            }
            values[oy * out_cols..][..out_cols].copy_from_slice(&self.best);
            at[oy * out_cols..][..out_cols].copy_from_slice(&self.best_at);
        }
    }
}

/// The input gradient: each output gradient added at its window's index, plane by plane in
/// output order.
///
/// # Panics
/// If the slices do not match `shape`, or an index lies outside its plane.
pub fn backward(shape: &PoolShape, output_grad: &[f32], indices: &[u32]) -> Vec<f32> {
    let [out_rows, out_cols] = shape.output().expect("a pooling window that fits");
    let (in_plane, out_plane) = (shape.input_plane(), out_rows * out_cols);
    assert_eq!(output_grad.len(), shape.planes * out_plane, "gradient size");
    assert_eq!(indices.len(), output_grad.len(), "index count");
    let fill = |plane: usize, grad: &mut [std::mem::MaybeUninit<f32>]| {
        grad.fill(std::mem::MaybeUninit::new(0.0));
        let range = plane * out_plane..(plane + 1) * out_plane;
        for (&at, &value) in indices[range.clone()].iter().zip(&output_grad[range]) {
            // SAFETY: the whole plane was initialised just above.
            unsafe { *grad[at as usize].assume_init_mut() += value };
        }
    };
    // SAFETY: `fill` writes every value of its plane before adding to any.
    unsafe { par_filled(shape.planes * in_plane, in_plane, fill) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pooling by its definition (every window, `-inf` padding) on odd sizes, with ties
    /// and a NaN, for ResNet's 3x3 stride-2 windows (the row-vectorised path) and two others
    /// (the window loop); the gradient by finite sums of the output gradients per input
    /// position.
    #[test]
    fn pooling_matches_the_definition() {
        let shape = PoolShape {
            planes: 3,
            input: [7, 9],
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
        };
        assert_eq!(shape.output(), Some([4, 5]));
        let overpadded = PoolShape {
            padding: [2, 1],
            ..shape
        };
        assert_eq!(overpadded.output(), None, "padding over half the window");
        let mut x: Vec<f32> = (0..3 * 63).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        x[70] = f32::NAN;
        check(shape, &x);
        // Even sides (the last windows end on the border) and another NaN.
        let even = PoolShape {
            input: [6, 8],
            ..shape
        };
        let mut y: Vec<f32> = (0..3 * 48).map(|i| ((i * 29) % 13) as f32 - 6.0).collect();
        y[50] = f32::NAN;
        check(even, &y);
        check(
            PoolShape {
                stride: [1, 1],
                ..shape
            },
            &x,
        );
        check(
            PoolShape {
                kernel: [2, 2],
                padding: [0, 0],
                ..shape
            },
            &x,
        );
    }

    fn check(shape: PoolShape, x: &[f32]) {
        let [rows, cols] = shape.output().expect("fits");
        let [height, width] = shape.input;
        let plane = height * width;
        let (output, indices) = forward(&shape, x);
        for p in 0..shape.planes {
            for oy in 0..rows {
                for ox in 0..cols {
                    let mut best = (f32::NEG_INFINITY, usize::MAX);
                    let span = |axis: usize, out: usize| {
                        let start = out * shape.stride[axis];
                        let end = (start + shape.kernel[axis]).saturating_sub(shape.padding[axis]);
                        start.saturating_sub(shape.padding[axis])..end.min(shape.input[axis])
                    };
                    for y in span(0, oy) {
                        for x_ in span(1, ox) {
                            let value = x[p * plane + y * width + x_];
                            if value > best.0 || value.is_nan() || best.1 == usize::MAX {
                                best = (value, y * width + x_);
                            }
                        }
                    }
                    let at = p * rows * cols + oy * cols + ox;
                    assert_eq!(indices[at] as usize, best.1, "{shape:?}: index of {at}");
                    assert!(output[at] == best.0 || output[at].is_nan() && best.0.is_nan());
                }
            }
        }
        let grad: Vec<f32> = (0..output.len()).map(|i| i as f32 * 0.5).collect();
        let input_grad = backward(&shape, &grad, &indices);
        let mut expected = vec![0.0f32; x.len()];
        for (at, &index) in indices.iter().enumerate() {
            expected[at / (rows * cols) * plane + index as usize] += grad[at];
        }
        assert_eq!(input_grad, expected);
    }
}
