//! The PiCIE FPN decoder: 1x1 laterals to 128 channels, bilinear top-down sum, stride-4 output.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};

use super::conv::conv2d_forward;
use super::weights::{ParamVisitor, WeightsError};
use super::{BackboneTaps, FEATURE_DIM};

/// The decoder of the reference: no 3x3 smoothing, no concatenation.
#[derive(Module, Debug)]
pub struct Fpn {
    /// 1x1 convs with bias, one per tap, C2 first.
    pub laterals: Vec<Conv2d>,
}

impl Fpn {
    /// A decoder for taps with `tap_channels` (C2..C5).
    pub fn new(tap_channels: [usize; 4], device: &Device) -> Self {
        let laterals = tap_channels
            .iter()
            .map(|&channels| Conv2dConfig::new([channels, FEATURE_DIM], [1, 1]).init(device))
            .collect();
        Self { laterals }
    }

    /// `p = lat5(C5); p = up(p, size of C4) + lat4(C4); ...; + lat2(C2)`, then L2-normalised
    /// over channels: `[B, 128, H/4, W/4]`.
    pub fn forward(&self, taps: BackboneTaps) -> Tensor<4> {
        let taps = [taps.c2, taps.c3, taps.c4, taps.c5];
        let mut pyramid = conv2d_forward(&self.laterals[3], taps[3].clone());
        for level in (0..3).rev() {
            let [_, _, height, width] = taps[level].dims();
            pyramid = upsample_bilinear(pyramid, [height, width])
                + conv2d_forward(&self.laterals[level], taps[level].clone());
        }
        l2_normalize_channels(pyramid)
    }

    /// Visits the laterals as `lateral2` .. `lateral5`.
    pub fn visit_weights(&mut self, visitor: &mut dyn ParamVisitor) -> Result<(), WeightsError> {
        for (index, lateral) in self.laterals.iter_mut().enumerate() {
            visitor.conv2d(&format!("lateral{}", index + 2), lateral)?;
        }
        Ok(())
    }
}

/// Bilinear resize with `align_corners = false`, as PyTorch's `F.interpolate` default, in a
/// form that differentiates on every backend (see [`super::resize`]).
pub fn upsample_bilinear(input: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    super::resize::resize_bilinear(input, size)
}

/// Divides each pixel's feature vector by its L2 norm (clamped like `F.normalize`).
pub fn l2_normalize_channels(input: Tensor<4>) -> Tensor<4> {
    let norm = input.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    input / norm
}
