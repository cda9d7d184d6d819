//! Bilinear resizing (`align_corners = false`, PyTorch's `F.interpolate` default) written as
//! two matrix products, `rows @ x @ cols^T`.
//!
//! Why not burn's `interpolate`: burn 0.22's wgpu (CubeCL) backend has no backward kernel for
//! bilinear interpolation, so training on a GPU would panic. Matrix products differentiate on
//! every backend, and the same matrices also carry a crop and a horizontal flip, which turns
//! the per-image crops of G on the feature side into one batched product.

use burn::tensor::{Device, Tensor, TensorData};

/// A window `[start, start + len)` along one axis of the source, resized to `out_len` samples
/// and optionally mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxisWindow {
    /// First source sample of the window.
    pub start: usize,
    /// Number of source samples in the window (at least 1).
    pub len: usize,
    /// Mirror the output (a horizontal flip when this is the x axis).
    pub flip: bool,
}

impl AxisWindow {
    /// The whole axis of `len` samples, not mirrored.
    pub fn whole(len: usize) -> Self {
        Self {
            start: 0,
            len,
            flip: false,
        }
    }
}

/// The `[out_len, in_len]` row-major matrix that resamples `window` of an axis of `in_len`
/// samples to `out_len` samples with PyTorch's bilinear rule: source position
/// `(o + 0.5) * len / out_len - 0.5`, clamped at 0, blended between its two neighbours
/// (the upper one clamped to the window's last sample).
///
/// # Panics
///
/// When the window is empty or does not fit in `in_len`.
pub fn bilinear_axis_matrix(in_len: usize, window: AxisWindow, out_len: usize) -> Vec<f32> {
    let mut matrix = vec![0f32; out_len * in_len];
    for (out, tap) in bilinear_taps(in_len, window, out_len)
        .into_iter()
        .enumerate()
    {
        let row = &mut matrix[out * in_len..(out + 1) * in_len];
        row[tap.lower] += 1.0 - tap.upper_weight;
        row[tap.upper] += tap.upper_weight;
    }
    matrix
}

/// The two source samples an output sample of a bilinear resize blends, and the weight of the
/// upper one (the lower one has `1 - upper_weight`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BilinearTap {
    /// Index of the lower source sample on the whole axis.
    pub lower: usize,
    /// Index of the upper source sample (the lower one at the window's end).
    pub upper: usize,
    /// Weight of the upper sample.
    pub upper_weight: f32,
}

/// One [`BilinearTap`] per output sample, with the rule of [`bilinear_axis_matrix`].
///
/// # Panics
///
/// When the window is empty or does not fit in `in_len`.
pub fn bilinear_taps(in_len: usize, window: AxisWindow, out_len: usize) -> Vec<BilinearTap> {
    assert!(
        window.len > 0 && window.start + window.len <= in_len,
        "bilinear_taps: window {window:?} outside an axis of {in_len}"
    );
    let scale = window.len as f64 / out_len as f64;
    (0..out_len)
        .map(|out| {
            // A flipped output reads the sample the unflipped one would have at the mirror
            // position.
            let unflipped = if window.flip { out_len - 1 - out } else { out };
            let source = ((unflipped as f64 + 0.5) * scale - 0.5).max(0.0);
            let lower = (source.floor() as usize).min(window.len - 1);
            let upper = (lower + 1).min(window.len - 1);
            BilinearTap {
                lower: window.start + lower,
                upper: window.start + upper,
                upper_weight: (source - lower as f64) as f32,
            }
        })
        .collect()
}

/// Bilinear resize of `input` `[B, C, h, w]` to `size` `[H, W]`, differentiable on every
/// backend. Returns `input` itself when the size does not change.
pub fn resize_bilinear(input: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    let [batch, _, height, width] = input.dims();
    if [height, width] == size || batch == 0 {
        return input;
    }
    let windows = vec![(AxisWindow::whole(height), AxisWindow::whole(width)); 1];
    resample_windows(input, &windows, size)
}

/// For each image `b` of `input` `[B, C, h, w]`, cuts the window `windows[b]` (rows, columns)
/// and resizes it bilinearly to `size` `[H, W]`, mirroring where the window says so. A single
/// entry in `windows` applies to every image.
///
/// # Panics
///
/// When `windows` has neither one entry nor one per image, or a window does not fit.
pub fn resample_windows(
    input: Tensor<4>,
    windows: &[(AxisWindow, AxisWindow)],
    size: [usize; 2],
) -> Tensor<4> {
    let [batch, channels, height, width] = input.dims();
    assert!(
        windows.len() == 1 || windows.len() == batch,
        "resample_windows: {} windows for {batch} images",
        windows.len()
    );
    let [out_height, out_width] = size;
    let device = input.device();
    let mut rows = Vec::with_capacity(windows.len() * out_height * height);
    let mut cols_transposed = Vec::with_capacity(windows.len() * width * out_width);
    for (row_window, col_window) in windows {
        rows.extend(bilinear_axis_matrix(height, *row_window, out_height));
        let cols = bilinear_axis_matrix(width, *col_window, out_width);
        // [W, w] -> [w, W]
        for source in 0..width {
            cols_transposed.extend((0..out_width).map(|out| cols[out * width + source]));
        }
    }
    let matrices = windows.len();
    let rows = matrix_tensor(rows, [matrices, 1, out_height, height], &device)
        .expand([batch, channels, out_height, height]);
    let cols_transposed = matrix_tensor(cols_transposed, [matrices, 1, width, out_width], &device)
        .expand([batch, channels, width, out_width]);
    // [B, C, H, h] @ [B, C, h, w] @ [B, C, w, W] -> [B, C, H, W]
    rows.matmul(input).matmul(cols_transposed)
}

fn matrix_tensor(values: Vec<f32>, shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

    fn reference(input: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        interpolate(
            input,
            InterpolateOptions::new(InterpolateMode::Bilinear)
                .with_align_corners(false)
                .with_output_size(size),
        )
    }

    fn max_abs_difference(left: Tensor<4>, right: Tensor<4>) -> f32 {
        (left - right).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn matches_burn_interpolate_up_and_down() {
        let device = Device::flex();
        let input = Tensor::<4>::random([2, 3, 5, 7], Distribution::Uniform(-1.0, 1.0), &device);
        for size in [[10, 14], [20, 28], [3, 4], [5, 9], [1, 1], [8, 7]] {
            let difference = max_abs_difference(
                resize_bilinear(input.clone(), size),
                reference(input.clone(), size),
            );
            assert!(
                difference < 1e-5,
                "size {size:?}: max difference {difference}"
            );
        }
    }

    #[test]
    fn windows_match_slice_resize_flip() {
        let device = Device::flex();
        let input = Tensor::<4>::random([2, 4, 9, 9], Distribution::Uniform(-1.0, 1.0), &device);
        let windows = [
            (
                AxisWindow {
                    start: 2,
                    len: 5,
                    flip: false,
                },
                AxisWindow {
                    start: 1,
                    len: 5,
                    flip: true,
                },
            ),
            (
                AxisWindow {
                    start: 0,
                    len: 9,
                    flip: false,
                },
                AxisWindow {
                    start: 0,
                    len: 9,
                    flip: false,
                },
            ),
        ];
        let batched = resample_windows(input.clone(), &windows, [9, 9]);
        let first = reference(input.clone().slice([0..1, 0..4, 2..7, 1..6]), [9, 9]).flip([3]);
        let second = input.slice([1..2, 0..4, 0..9, 0..9]);
        let expected = Tensor::cat(vec![first, second], 0);
        let difference = max_abs_difference(batched, expected);
        assert!(difference < 1e-5, "max difference {difference}");
    }
}
