//! Building blocks shared by the backbones.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use super::weights::{ParamVisitor, WeightsError};

/// A bias-free convolution followed by BatchNorm (torchvision's conv + bn pairs).
#[derive(Module, Debug)]
pub struct ConvBn {
    /// The convolution, without bias (the BatchNorm shift replaces it).
    pub conv: Conv2d,
    /// BatchNorm with PyTorch's defaults (eps 1e-5, momentum 0.1).
    pub norm: BatchNorm,
}

/// Shape of a [`ConvBn`]: channels in and out, square kernel, stride and groups.
#[derive(Debug, Clone, Copy)]
pub struct ConvBnSpec {
    /// Input channels.
    pub channels_in: usize,
    /// Output channels.
    pub channels_out: usize,
    /// Square kernel side; padding is `kernel / 2` as in torchvision.
    pub kernel: usize,
    /// Stride in both directions.
    pub stride: usize,
    /// Convolution groups (`channels_in` for a depthwise convolution).
    pub groups: usize,
}

impl ConvBnSpec {
    /// A plain (ungrouped) convolution spec.
    pub fn new(channels_in: usize, channels_out: usize, kernel: usize, stride: usize) -> Self {
        Self {
            channels_in,
            channels_out,
            kernel,
            stride,
            groups: 1,
        }
    }

    /// The same spec as a depthwise convolution (one group per channel).
    pub fn depthwise(channels: usize, kernel: usize, stride: usize) -> Self {
        Self {
            groups: channels,
            ..Self::new(channels, channels, kernel, stride)
        }
    }

    /// Creates the layer with random weights on `device`.
    pub fn init(self, device: &Device) -> ConvBn {
        let padding = self.kernel / 2;
        let conv = Conv2dConfig::new(
            [self.channels_in, self.channels_out],
            [self.kernel, self.kernel],
        )
        .with_stride([self.stride, self.stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_groups(self.groups)
        .with_bias(false)
        .init(device);
        ConvBn {
            conv,
            norm: batch_norm(self.channels_out, device),
        }
    }
}

/// BatchNorm with PyTorch's defaults.
pub fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels)
        .with_epsilon(1e-5)
        .with_momentum(0.1)
        .init(device)
}

impl ConvBn {
    /// Convolution then BatchNorm, no activation.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let output = super::conv::conv2d_forward(&self.conv, input);
        super::conv::batch_norm_forward(&self.norm, output)
    }

    /// Visits the weights under torchvision's names: `{conv_key}.weight` and the BatchNorm's
    /// four tensors under `norm_key`.
    pub fn visit_weights(
        &mut self,
        conv_key: &str,
        norm_key: &str,
        visitor: &mut dyn ParamVisitor,
    ) -> Result<(), WeightsError> {
        visitor.conv2d(conv_key, &mut self.conv)?;
        visitor.batch_norm(norm_key, &mut self.norm)
    }
}

/// ReLU6, as MobileNetV2 uses it.
pub fn relu6(input: Tensor<4>) -> Tensor<4> {
    super::conv::clamp_forward(input, 0.0, 6.0)
}
