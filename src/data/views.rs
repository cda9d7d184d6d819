//! The two views of PiCIE: photometric changes P1, P2 (invariance) and one geometric change G
//! (equivariance) per image per epoch.
//!
//! - view 1 = `f(G(P1(x)))`: [`build_views`] applies P1 to the base image, cuts G's crop box
//!   out of it, resizes the crop to the network input and flips it when G says so;
//! - view 2 = `G(f(P2(x)))`: [`build_views`] applies P2 to the whole base image and resizes it;
//!   after the network, [`geometric_on_features`] cuts the same box out of its feature map.
//!
//! The parameters come from [`draw_view_params`], a pure function of (seed, epoch, image), so the
//! clustering pass and the training pass of an epoch see the same views whatever the batch
//! order or the number of threads.
//!
//! The photometric operations follow torchvision's tensor semantics (`adjust_brightness`,
//! `adjust_contrast`, `adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`, `gaussian_blur`),
//! applied in that order. Unlike the authors' code, greyscale is applied and the blur kernel
//! has size `2 * ceil(3 sigma) + 1`, as the paper meant.
//!
//! One concern, in one file: the two views and their geometry (about 730 lines).

use std::ops::Range;

use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::fpn::l2_normalize_channels;
use crate::model::resize::{AxisWindow, resample_windows};
use crate::model::{FEATURE_STRIDE, IMAGENET_MEAN, IMAGENET_STD};

/// Probability of each colour-jitter change (brightness, contrast, saturation, hue).
pub const JITTER_PROBABILITY: f64 = 0.8;
/// Range of the brightness, contrast and saturation factors.
pub const JITTER_FACTORS: Range<f32> = 0.7..1.3;
/// Range of the hue shift, in turns of the colour wheel.
pub const HUE_SHIFTS: Range<f32> = -0.1..0.1;
/// Probability of turning the image grey.
pub const GRAYSCALE_PROBABILITY: f64 = 0.2;
/// Probability of a Gaussian blur.
pub const BLUR_PROBABILITY: f64 = 0.5;
/// Range of the blur's standard deviation, in base-image pixels.
pub const BLUR_SIGMAS: Range<f32> = 0.1..2.0;
/// Range of the crop side as a fraction of the image side.
pub const CROP_SCALES: Range<f64> = 0.5..1.0;
/// Probability of a horizontal flip.
pub const FLIP_PROBABILITY: f64 = 0.5;

/// torchvision's luma weights for `rgb_to_grayscale`.
const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

/// Tells the view generator's random stream apart from other users of the same seed.
const VIEW_STREAM_TAG: u64 = u64::from_le_bytes(*b"pcviews1");

/// One photometric draw; `None` / `false` leaves that property unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PhotometricParams {
    /// Brightness factor: the image is multiplied by it.
    pub brightness: Option<f32>,
    /// Contrast factor: blends the image with the mean of its greyscale version.
    pub contrast: Option<f32>,
    /// Saturation factor: blends the image with its greyscale version.
    pub saturation: Option<f32>,
    /// Hue shift in turns (added to H in HSV, modulo 1).
    pub hue: Option<f32>,
    /// Replace every channel by the luma.
    pub grayscale: bool,
    /// Standard deviation of a Gaussian blur in pixels (kernel `2 * ceil(3 sigma) + 1`).
    pub blur_sigma: Option<f32>,
}

impl PhotometricParams {
    /// No change at all.
    pub const IDENTITY: Self = Self {
        brightness: None,
        contrast: None,
        saturation: None,
        hue: None,
        grayscale: false,
        blur_sigma: None,
    };

    /// Whether these parameters leave every image unchanged.
    pub fn is_identity(&self) -> bool {
        *self == Self::IDENTITY
    }

    /// Draws the parameters as the reference does: each factor with its own probability, in
    /// the order brightness, contrast, saturation, hue, greyscale, blur.
    fn draw(rng: &mut impl Rng) -> Self {
        Self {
            brightness: maybe_uniform(rng, JITTER_PROBABILITY, JITTER_FACTORS),
            contrast: maybe_uniform(rng, JITTER_PROBABILITY, JITTER_FACTORS),
            saturation: maybe_uniform(rng, JITTER_PROBABILITY, JITTER_FACTORS),
            hue: maybe_uniform(rng, JITTER_PROBABILITY, HUE_SHIFTS),
            grayscale: rng.random::<f64>() < GRAYSCALE_PROBABILITY,
            blur_sigma: maybe_uniform(rng, BLUR_PROBABILITY, BLUR_SIGMAS),
        }
    }
}

/// With probability `probability` a uniform draw from `range`, else `None`.
fn maybe_uniform(rng: &mut impl Rng, probability: f64, range: Range<f32>) -> Option<f32> {
    (rng.random::<f64>() < probability).then(|| rng.random_range(range))
}

/// The geometric change G: a square box on the feature grid (stride-4 cells), and a flip.
///
/// On the image side one cell is `base_size / grid` base pixels; on the feature side it is one
/// feature-map cell, so both sides cut exactly the same region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GeometricParams {
    /// Left edge of the box, in cells.
    pub x0: usize,
    /// Top edge of the box, in cells.
    pub y0: usize,
    /// Side of the box, in cells.
    pub side: usize,
    /// Flip horizontally after cropping.
    pub flip: bool,
}

impl GeometricParams {
    /// The whole grid, unflipped: no geometric change.
    pub fn identity(grid: usize) -> Self {
        Self {
            x0: 0,
            y0: 0,
            side: grid,
            flip: false,
        }
    }

    /// Draws a box as the reference does: side `round(s * grid)` with `s ~ U(0.5, 1)` (at least
    /// one cell), a uniform position that keeps it inside the grid, then a flip with p = 0.5.
    fn draw(rng: &mut impl Rng, grid: usize) -> Self {
        let grid = grid.max(1);
        let scale = rng.random_range(CROP_SCALES);
        // Python's round() rounds halves to even.
        let side = ((scale * grid as f64).round_ties_even() as usize).clamp(1, grid);
        let x0 = rng.random_range(0..=grid - side);
        let y0 = rng.random_range(0..=grid - side);
        let flip = rng.random::<f64>() < FLIP_PROBABILITY;
        Self { x0, y0, side, flip }
    }

    /// The box clamped into a `width` x `height` grid: `(x0, y0, side_x, side_y)`, each side at
    /// least one cell (when the grid has any), so slicing never goes out of bounds.
    fn clamped(&self, width: usize, height: usize) -> (usize, usize, usize, usize) {
        let side_x = self.side.clamp(1, width.max(1));
        let side_y = self.side.clamp(1, height.max(1));
        let x0 = self.x0.min(width.saturating_sub(side_x));
        let y0 = self.y0.min(height.saturating_sub(side_y));
        (x0, y0, side_x, side_y)
    }
}

/// Everything random about one image in one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ViewParams {
    /// P1, the photometric change of view 1.
    pub first: PhotometricParams,
    /// P2, the photometric change of view 2.
    pub second: PhotometricParams,
    /// G, the geometric change shared by both views.
    pub geometric: GeometricParams,
}

impl ViewParams {
    /// No photometric or geometric change: both views are the plain resized image.
    pub fn identity(grid: usize) -> Self {
        Self {
            first: PhotometricParams::IDENTITY,
            second: PhotometricParams::IDENTITY,
            geometric: GeometricParams::identity(grid),
        }
    }
}

/// Draws the view parameters of one image in one epoch; `grid` is the side of the feature map
/// (input size / 4) in cells (0 is treated as 1).
///
/// A pure function of `(seed, epoch, image_index)`: the three go straight into the 256-bit
/// ChaCha key, so distinct triples get independent streams and the result does not depend on
/// batch order or thread count.
pub fn draw_view_params(seed: u64, epoch: usize, image_index: usize, grid: usize) -> ViewParams {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    key[16..24].copy_from_slice(&(image_index as u64).to_le_bytes());
    key[24..].copy_from_slice(&VIEW_STREAM_TAG.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(key);
    // Same order as the reference: P1, P2, then G.
    let first = PhotometricParams::draw(&mut rng);
    let second = PhotometricParams::draw(&mut rng);
    let geometric = GeometricParams::draw(&mut rng, grid);
    ViewParams {
        first,
        second,
        geometric,
    }
}

/// [`draw_view_params`] for images `0..count` of an epoch.
pub fn draw_epoch_view_params(
    seed: u64,
    epoch: usize,
    count: usize,
    grid: usize,
) -> Vec<ViewParams> {
    (0..count)
        .map(|index| draw_view_params(seed, epoch, index, grid))
        .collect()
}

/// An RGB image as three planes of `f32` in [0, 1] (CHW), the layout the photometric
/// operations and the network want.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbPlanes {
    width: usize,
    height: usize,
    // [3, height, width]
    data: Vec<f32>,
}

impl RgbPlanes {
    /// Converts an interleaved RGB u8 image (HWC); `None` when `rgb` is not `3 * width * height`
    /// bytes long.
    pub fn from_rgb8(rgb: &[u8], width: usize, height: usize) -> Option<Self> {
        let pixels = width.checked_mul(height)?;
        if rgb.len() != pixels.checked_mul(3)? {
            return None;
        }
        let mut data = vec![0f32; 3 * pixels];
        let (red, rest) = data.split_at_mut(pixels);
        let (green, blue) = rest.split_at_mut(pixels);
        for (index, pixel) in rgb.chunks_exact(3).enumerate() {
            red[index] = f32::from(pixel[0]) / 255.0;
            green[index] = f32::from(pixel[1]) / 255.0;
            blue[index] = f32::from(pixel[2]) / 255.0;
        }
        Some(Self {
            width,
            height,
            data,
        })
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// All values, channel-major: `[3, height, width]`.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The (r, g, b) values of one pixel; `None` outside the image.
    pub fn pixel(&self, x: usize, y: usize) -> Option<[f32; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let plane = self.width * self.height;
        let index = y * self.width + x;
        Some([
            self.data[index],
            self.data[plane + index],
            self.data[2 * plane + index],
        ])
    }

    /// The three planes, mutably.
    fn channels_mut(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        let plane = self.width * self.height;
        let (red, rest) = self.data.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        (red, green, blue)
    }
}

/// Applies a photometric draw in torchvision's order and semantics: brightness, contrast,
/// saturation, hue, greyscale, blur; values stay in [0, 1].
pub fn apply_photometric(image: &mut RgbPlanes, params: &PhotometricParams) {
    if let Some(factor) = params.brightness {
        // torchvision blends with black.
        for value in &mut image.data {
            *value = (factor * *value).clamp(0.0, 1.0);
        }
    }
    if let Some(factor) = params.contrast {
        adjust_contrast(image, factor);
    }
    if let Some(factor) = params.saturation {
        adjust_saturation(image, factor);
    }
    if let Some(shift) = params.hue {
        adjust_hue(image, shift);
    }
    if params.grayscale {
        let (red, green, blue) = image.channels_mut();
        for ((r, g), b) in red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut()) {
            let luma = luma(*r, *g, *b);
            (*r, *g, *b) = (luma, luma, luma);
        }
    }
    if let Some(sigma) = params.blur_sigma {
        gaussian_blur(image, sigma);
    }
}

fn luma(r: f32, g: f32, b: f32) -> f32 {
    LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
}

/// Blends with the mean luma of the whole image.
fn adjust_contrast(image: &mut RgbPlanes, factor: f32) {
    let plane = image.width * image.height;
    if plane == 0 {
        return;
    }
    let (red, green, blue) = image.channels_mut();
    // f64 sum: a 640x640 image would lose digits in f32.
    let sum: f64 = red
        .iter()
        .zip(green.iter())
        .zip(blue.iter())
        .map(|((&r, &g), &b)| f64::from(luma(r, g, b)))
        .sum();
    let offset = (1.0 - factor) * (sum / plane as f64) as f32;
    for value in &mut image.data {
        *value = (factor * *value + offset).clamp(0.0, 1.0);
    }
}

/// Blends each pixel with its own luma.
fn adjust_saturation(image: &mut RgbPlanes, factor: f32) {
    let (red, green, blue) = image.channels_mut();
    for ((r, g), b) in red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut()) {
        let grey = (1.0 - factor) * luma(*r, *g, *b);
        *r = (factor * *r + grey).clamp(0.0, 1.0);
        *g = (factor * *g + grey).clamp(0.0, 1.0);
        *b = (factor * *b + grey).clamp(0.0, 1.0);
    }
}

/// Rotates the hue in HSV space, with torchvision's `_rgb2hsv` / `_hsv2rgb` formulas.
fn adjust_hue(image: &mut RgbPlanes, shift: f32) {
    // Python's `(h + shift) % 1.0`: with the shift brought into [0, 1) once, one conditional
    // subtraction per pixel does it.
    let shift = shift.rem_euclid(1.0);
    let (red, green, blue) = image.channels_mut();
    for ((r, g), b) in red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut()) {
        let [hue, saturation, value] = rgb_to_hsv(*r, *g, *b);
        let hue = hue + shift;
        let hue = if hue >= 1.0 { hue - 1.0 } else { hue };
        [*r, *g, *b] = hsv_to_rgb(hue, saturation, value);
    }
}

fn rgb_to_hsv(r: f32, g: f32, b: f32) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let chroma = max - min;
    if chroma == 0.0 {
        // Grey: torchvision gives hue 0 and saturation 0.
        return [0.0, 0.0, max];
    }
    let saturation = chroma / max;
    // One division for the three (max - c) / chroma terms: this runs on every pixel.
    let inverse = 1.0 / chroma;
    let rc = (max - r) * inverse;
    let gc = (max - g) * inverse;
    let bc = (max - b) * inverse;
    let hue = if max == r {
        bc - gc
    } else if max == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    // torchvision's fmod(h / 6 + 1, 1) with h / 6 in [-1/6, 1): a branch instead of a libm call.
    let hue = hue / 6.0;
    [if hue < 0.0 { hue + 1.0 } else { hue }, saturation, max]
}

fn hsv_to_rgb(hue: f32, saturation: f32, value: f32) -> [f32; 3] {
    // hue is in [0, 1], so truncation is floor.
    let sector = (hue * 6.0) as i64;
    let fraction = hue * 6.0 - sector as f32;
    let p = (value * (1.0 - saturation)).clamp(0.0, 1.0);
    let q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0);
    let t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0);
    match sector % 6 {
        0 => [value, t, p],
        1 => [q, value, p],
        2 => [p, value, t],
        3 => [p, q, value],
        4 => [t, p, value],
        _ => [value, p, q],
    }
}

/// The normalised 1-D Gaussian of torchvision: size `2 * ceil(3 sigma) + 1`, taps at integer
/// offsets.
fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let sigma = f64::from(sigma.max(1e-3));
    let radius = (3.0 * sigma).ceil() as i64;
    let taps: Vec<f64> = (-radius..=radius)
        .map(|offset| (-0.5 * (offset as f64 / sigma).powi(2)).exp())
        .collect();
    let total: f64 = taps.iter().sum();
    taps.iter().map(|&tap| (tap / total) as f32).collect()
}

/// Index into `0..len` of position `index` under reflect padding (the edge is not repeated),
/// folding again for paddings wider than the image.
fn reflect(index: isize, len: usize) -> usize {
    if len <= 1 {
        return 0;
    }
    let period = 2 * (len as isize - 1);
    let folded = index.rem_euclid(period);
    if folded >= len as isize {
        (period - folded) as usize
    } else {
        folded as usize
    }
}

/// Separable Gaussian blur with reflect padding; equal to torchvision's 2-D convolution with
/// the outer-product kernel because reflect padding is separable too.
fn gaussian_blur(image: &mut RgbPlanes, sigma: f32) {
    let (width, height) = (image.width, image.height);
    if width == 0 || height == 0 {
        return;
    }
    let kernel = gaussian_kernel(sigma);
    let radius = (kernel.len() / 2) as isize;
    let plane = width * height;
    let mut padded = vec![0f32; width.max(height) + 2 * radius as usize];
    let mut scratch = vec![0f32; plane];
    for channel in image.data.chunks_exact_mut(plane) {
        // Horizontal pass, channel -> scratch.
        for (row_in, row_out) in channel
            .chunks_exact(width)
            .zip(scratch.chunks_exact_mut(width))
        {
            for (position, slot) in padded[..width + 2 * radius as usize].iter_mut().enumerate() {
                *slot = row_in[reflect(position as isize - radius, width)];
            }
            // Tap-major accumulation over the whole row: contiguous and vectorisable.
            row_out.fill(0.0);
            for (tap, weight) in kernel.iter().enumerate() {
                for (out, value) in row_out.iter_mut().zip(&padded[tap..tap + width]) {
                    *out += weight * value;
                }
            }
        }
        // Vertical pass, scratch -> channel, accumulating whole rows (cache friendly).
        for (y, row_out) in channel.chunks_exact_mut(width).enumerate() {
            row_out.fill(0.0);
            for (tap, weight) in kernel.iter().enumerate() {
                let source = reflect(y as isize + tap as isize - radius, height);
                let row_in = &scratch[source * width..(source + 1) * width];
                for (out, value) in row_out.iter_mut().zip(row_in) {
                    *out += weight * value;
                }
            }
        }
    }
}

/// The taps of one output sample of an antialiased linear resize.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// Antialiased linear (triangle) resampling weights from `input` to `output` samples, as
/// PyTorch's `interpolate(mode="bilinear", antialias=True, align_corners=False)` (and PIL):
/// the triangle is widened by the scale when shrinking, and renormalised at the borders.
fn resize_taps(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f64 / output as f64;
    let support = scale.max(1.0);
    let inverse = 1.0 / support;
    (0..output)
        .map(|index| {
            let centre = scale * (index as f64 + 0.5);
            // Truncation toward zero, as PyTorch's int64 cast.
            let start = ((centre - support + 0.5) as i64).max(0) as usize;
            let end = ((centre + support + 0.5) as i64).clamp(0, input as i64) as usize;
            let mut weights: Vec<f64> = (start..end.max(start))
                .map(|source| {
                    let distance = (source as f64 - centre + 0.5) * inverse;
                    (1.0 - distance.abs()).max(0.0)
                })
                .collect();
            let total: f64 = weights.iter().sum();
            if total > 0.0 {
                weights.iter_mut().for_each(|weight| *weight /= total);
            }
            Taps {
                start,
                weights: weights.into_iter().map(|weight| weight as f32).collect(),
            }
        })
        .collect()
}

/// A crop box in pixels.
#[derive(Debug, Clone, Copy)]
struct PixelBox {
    x0: usize,
    y0: usize,
    width: usize,
    height: usize,
}

/// Resizes `crop` of `image` to `size` x `size` (antialiased), flips it when asked, and writes
/// it ImageNet-normalised into `out` (`[3, size, size]`).
fn crop_resize_normalise(
    image: &RgbPlanes,
    crop: PixelBox,
    size: usize,
    flip: bool,
    out: &mut [f32],
) {
    let horizontal = resize_taps(crop.width, size);
    let vertical = resize_taps(crop.height, size);
    let plane = image.width * image.height;
    let mut rows = vec![0f32; crop.height * size];
    let mut row_out = vec![0f32; size];
    for channel in 0..3 {
        let source = &image.data[channel * plane..(channel + 1) * plane];
        // Horizontal pass over the crop's rows: [crop.height, crop.width] -> [crop.height, size].
        for (y, row) in rows.chunks_exact_mut(size).enumerate() {
            let offset = (crop.y0 + y) * image.width + crop.x0;
            let line = &source[offset..offset + crop.width];
            for (value, taps) in row.iter_mut().zip(&horizontal) {
                *value = taps
                    .weights
                    .iter()
                    .zip(&line[taps.start..])
                    .map(|(weight, value)| weight * value)
                    .sum();
            }
        }
        // Vertical pass: [crop.height, size] -> [size, size], then normalise and flip.
        let target = &mut out[channel * size * size..(channel + 1) * size * size];
        let (mean, std) = (IMAGENET_MEAN[channel], IMAGENET_STD[channel]);
        for (y, taps) in vertical.iter().enumerate() {
            row_out.fill(0.0);
            for (tap, weight) in taps.weights.iter().enumerate() {
                let row = &rows[(taps.start + tap) * size..(taps.start + tap + 1) * size];
                for (out, value) in row_out.iter_mut().zip(row) {
                    *out += weight * value;
                }
            }
            let line = &mut target[y * size..(y + 1) * size];
            for (x, value) in row_out.iter().enumerate() {
                let column = if flip { size - 1 - x } else { x };
                line[column] = (value - mean) / std;
            }
        }
    }
}

/// Builds both network inputs of a batch: view 1 = G(P1(x)) and view 2 = P2(x), each
/// `[B, 3, input_size, input_size]` and ImageNet-normalised.
///
/// `bases` are RGB HWC u8 images of `base_size`² pixels; `params[i]` belongs to `bases[i]`. The
/// feature grid is `input_size / 4` cells and one cell is `base_size / grid` base pixels, as in
/// the reference; boxes that do not fit are clamped into the image.
///
/// # Panics
///
/// When `params` and `bases` differ in length or a base image is not `3 * base_size²` bytes:
/// both come from the trainer, never from user input.
//
// Per-image CPU work with rayon rather than tensor ops: every image has its own blur kernel
// size and crop size, so on a device this would be dozens of tiny, unbatchable launches per
// image; on the CPU one base image (320² x 3 floats) stays in cache through all steps and the
// batch is uploaded once. It also runs while the accelerator trains on the previous batch.
pub fn build_views(
    bases: &[&[u8]],
    base_size: usize,
    input_size: usize,
    params: &[ViewParams],
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    build_view_batch(bases, base_size, input_size, params).into_tensors(device)
}

/// The two views of a batch on the host, `[B, 3, input, input]` each, before they go to a
/// device (so they can be built on another thread).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewBatch {
    /// View 1, `G(P1(x))`, row-major.
    pub first: Vec<f32>,
    /// View 2, `P2(x)`, row-major.
    pub second: Vec<f32>,
    /// `[B, 3, input, input]`.
    pub shape: [usize; 4],
}

impl ViewBatch {
    /// Both views as tensors on `device`.
    pub fn into_tensors(self, device: &Device) -> (Tensor<4>, Tensor<4>) {
        (
            Tensor::from_data(TensorData::new(self.first, self.shape), device),
            Tensor::from_data(TensorData::new(self.second, self.shape), device),
        )
    }
}

/// [`build_views`] without the upload: the views' values on the host.
pub fn build_view_batch(
    bases: &[&[u8]],
    base_size: usize,
    input_size: usize,
    params: &[ViewParams],
) -> ViewBatch {
    assert_eq!(
        bases.len(),
        params.len(),
        "build_views: one ViewParams per base image"
    );
    let grid = (input_size / FEATURE_STRIDE).max(1);
    let cell = (base_size / grid).max(1);
    let sample = 3 * input_size * input_size;
    let mut first = vec![0f32; bases.len() * sample];
    let mut second = vec![0f32; bases.len() * sample];
    // Nothing to draw from or into: leave zeros rather than divide by empty sizes.
    if input_size > 0 && base_size > 0 {
        first
            .par_chunks_mut(sample)
            .zip(second.par_chunks_mut(sample))
            .zip(bases.par_iter().zip(params.par_iter()))
            .for_each(|((out_first, out_second), (base, view))| {
                let image = RgbPlanes::from_rgb8(base, base_size, base_size)
                    .expect("build_views: base image is not base_size x base_size RGB");
                let (x0, y0, side_x, side_y) = view.geometric.clamped(grid, grid);
                // Cells -> base pixels; the clamps only bite when base_size < grid (cell forced to 1).
                let width = (side_x * cell).min(base_size);
                let height = (side_y * cell).min(base_size);
                let crop = PixelBox {
                    x0: (x0 * cell).min(base_size - width),
                    y0: (y0 * cell).min(base_size - height),
                    width,
                    height,
                };
                let whole = PixelBox {
                    x0: 0,
                    y0: 0,
                    width: base_size,
                    height: base_size,
                };
                // The two views are independent: run them side by side for small batches.
                let mut first_image = image.clone();
                let mut second_image = image;
                rayon::join(
                    || {
                        apply_photometric(&mut first_image, &view.first);
                        crop_resize_normalise(
                            &first_image,
                            crop,
                            input_size,
                            view.geometric.flip,
                            out_first,
                        );
                    },
                    || {
                        apply_photometric(&mut second_image, &view.second);
                        crop_resize_normalise(&second_image, whole, input_size, false, out_second);
                    },
                );
            });
    }
    ViewBatch {
        first,
        second,
        shape: [bases.len(), 3, input_size, input_size],
    }
}

/// G on a feature map: for each image cut its box (in feature cells) out of `features`
/// (`[B, D, h, w]`), resize it back to `h x w` bilinearly (align_corners = false), flip it
/// alike, and re-normalise each pixel's feature to unit length. Differentiable: on an autodiff
/// device the gradient flows back into `features`.
///
/// # Panics
///
/// When `params` does not have one entry per image of the batch.
pub fn geometric_on_features(features: Tensor<4>, params: &[GeometricParams]) -> Tensor<4> {
    let [batch, _, height, width] = features.dims();
    assert_eq!(
        batch,
        params.len(),
        "geometric_on_features: one GeometricParams per image"
    );
    if batch == 0 || height == 0 || width == 0 {
        return features;
    }
    // One batched product for all crops, flips included (see `model::resize`).
    let windows: Vec<(AxisWindow, AxisWindow)> = params
        .iter()
        .map(|geometric| {
            let (x0, y0, side_x, side_y) = geometric.clamped(width, height);
            let rows = AxisWindow {
                start: y0,
                len: side_y,
                flip: false,
            };
            let columns = AxisWindow {
                start: x0,
                len: side_x,
                flip: geometric.flip,
            };
            (rows, columns)
        })
        .collect();
    l2_normalize_channels(resample_windows(features, &windows, [height, width]))
}
