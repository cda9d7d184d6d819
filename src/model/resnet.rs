//! ResNet-18 in torchvision's layout, with the four taps C2..C5 (outputs of layer1..layer4).

use burn::module::Module;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use super::layers::{ConvBn, ConvBnSpec};
use super::weights::{ParamVisitor, WeightsError};
use super::{BackboneTaps, IMAGENET_CLASSES};

/// torchvision's BasicBlock: two 3x3 conv-bn pairs and a shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// First 3x3 conv + bn (carries the block's stride).
    pub first: ConvBn,
    /// Second 3x3 conv + bn.
    pub second: ConvBn,
    /// 1x1 conv + bn on the shortcut when the shape changes.
    pub downsample: Option<ConvBn>,
}

impl BasicBlock {
    fn new(channels_in: usize, channels_out: usize, stride: usize, device: &Device) -> Self {
        let downsample = (stride != 1 || channels_in != channels_out)
            .then(|| ConvBnSpec::new(channels_in, channels_out, 1, stride).init(device));
        Self {
            first: ConvBnSpec::new(channels_in, channels_out, 3, stride).init(device),
            second: ConvBnSpec::new(channels_out, channels_out, 3, 1).init(device),
            downsample,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward(input.clone()),
            None => input.clone(),
        };
        let out = relu(self.first.forward(input));
        relu(self.second.forward(out) + shortcut)
    }

    fn visit_weights(
        &mut self,
        prefix: &str,
        visitor: &mut dyn ParamVisitor,
    ) -> Result<(), WeightsError> {
        self.first
            .visit_weights(&format!("{prefix}conv1"), &format!("{prefix}bn1"), visitor)?;
        self.second
            .visit_weights(&format!("{prefix}conv2"), &format!("{prefix}bn2"), visitor)?;
        if let Some(downsample) = &mut self.downsample {
            downsample.visit_weights(
                &format!("{prefix}downsample.0"),
                &format!("{prefix}downsample.1"),
                visitor,
            )?;
        }
        Ok(())
    }
}

/// ResNet-18 without its classifier (kept optional, for ImageNet logits checks).
#[derive(Module, Debug)]
pub struct ResNet18 {
    /// 7x7 stride-2 stem conv + bn.
    pub stem: ConvBn,
    /// 3x3 stride-2 max pool after the stem.
    pub max_pool: MaxPool2d,
    /// layer1..layer4, two BasicBlocks each.
    pub layers: Vec<Vec<BasicBlock>>,
    /// Global average pool for the classifier.
    pub pool: AdaptiveAvgPool2d,
    /// torchvision's `fc`, present when loaded from an ImageNet state_dict.
    pub classifier: Option<Linear>,
}

/// Output channels of layer1..layer4.
pub const RESNET18_TAP_CHANNELS: [usize; 4] = [64, 128, 256, 512];

impl ResNet18 {
    /// A randomly initialised ResNet-18 (torchvision's default init scheme is not reproduced:
    /// burn's Kaiming-uniform defaults are used, as PyTorch's layer defaults).
    pub fn new(device: &Device) -> Self {
        let mut channels_in = 64;
        let layers = RESNET18_TAP_CHANNELS
            .iter()
            .enumerate()
            .map(|(index, &channels_out)| {
                let stride = if index == 0 { 1 } else { 2 };
                let blocks = vec![
                    BasicBlock::new(channels_in, channels_out, stride, device),
                    BasicBlock::new(channels_out, channels_out, 1, device),
                ];
                channels_in = channels_out;
                blocks
            })
            .collect();
        Self {
            stem: ConvBnSpec::new(3, 64, 7, 2).init(device),
            max_pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layers,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            classifier: None,
        }
    }

    /// The four taps for an input `[B, 3, H, W]`: strides 4, 8, 16, 32.
    pub fn forward(&self, input: Tensor<4>) -> BackboneTaps {
        let mut x = super::conv::max_pool_forward(&self.max_pool, relu(self.stem.forward(input)));
        let mut taps = Vec::with_capacity(4);
        for layer in &self.layers {
            for block in layer {
                x = block.forward(x);
            }
            taps.push(x.clone());
        }
        BackboneTaps::from_vec(taps)
    }

    /// ImageNet logits `[B, 1000]` from C5, if the classifier was loaded.
    pub fn logits(&self, c5: Tensor<4>) -> Option<Tensor<2>> {
        let classifier = self.classifier.as_ref()?;
        let pooled: Tensor<2> = self.pool.forward(c5).flatten(1, 3);
        Some(classifier.forward(pooled))
    }

    /// Visits every weight under torchvision's key names.
    pub fn visit_weights(&mut self, visitor: &mut dyn ParamVisitor) -> Result<(), WeightsError> {
        self.stem.visit_weights("conv1", "bn1", visitor)?;
        for (layer_index, layer) in self.layers.iter_mut().enumerate() {
            for (block_index, block) in layer.iter_mut().enumerate() {
                block
                    .visit_weights(&format!("layer{}.{block_index}.", layer_index + 1), visitor)?;
            }
        }
        if self.classifier.is_none() && visitor.provides("fc.weight") {
            let device = self.stem.conv.weight.device();
            self.classifier = Some(LinearConfig::new(512, IMAGENET_CLASSES).init(&device));
        }
        match &mut self.classifier {
            Some(classifier) => visitor.linear("fc", classifier),
            None => Ok(()),
        }
    }
}
