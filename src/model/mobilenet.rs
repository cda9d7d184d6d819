//! MobileNetV2 in torchvision's layout, with taps after `features[3]`, `[6]`, `[13]` and
//! `[17]` (24/32/96/320 channels at strides 4/8/16/32).

use burn::module::Module;
use burn::nn::Linear;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::tensor::{Device, Tensor};

use super::layers::{ConvBn, ConvBnSpec, relu6};
use super::weights::{ParamVisitor, WeightsError};
use super::{BackboneTaps, IMAGENET_CLASSES};

/// torchvision's InvertedResidual: optional 1x1 expansion, 3x3 depthwise, 1x1 linear projection.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    /// 1x1 expansion conv + bn + ReLU6 (absent when the expansion ratio is 1).
    pub expand: Option<ConvBn>,
    /// 3x3 depthwise conv + bn + ReLU6 (carries the stride).
    pub depthwise: ConvBn,
    /// 1x1 projection conv + bn, no activation.
    pub project: ConvBn,
    /// Whether the input is added back (stride 1 and same channels).
    pub residual: bool,
}

impl InvertedResidual {
    fn new(
        channels_in: usize,
        channels_out: usize,
        stride: usize,
        expansion: usize,
        device: &Device,
    ) -> Self {
        let hidden = channels_in * expansion;
        Self {
            expand: (expansion != 1)
                .then(|| ConvBnSpec::new(channels_in, hidden, 1, 1).init(device)),
            depthwise: ConvBnSpec::depthwise(hidden, 3, stride).init(device),
            project: ConvBnSpec::new(hidden, channels_out, 1, 1).init(device),
            residual: stride == 1 && channels_in == channels_out,
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let Some(expand) = &self.expand {
            x = relu6(expand.forward(x));
        }
        x = self.project.forward(relu6(self.depthwise.forward(x)));
        if self.residual { x + input } else { x }
    }

    /// torchvision numbers the sequential `conv` children: with expansion
    /// `conv.0` (expand), `conv.1` (depthwise), `conv.2` (project conv), `conv.3` (its bn);
    /// without, `conv.0` is the depthwise pair and `conv.1`/`conv.2` the projection.
    fn visit_weights(
        &mut self,
        prefix: &str,
        visitor: &mut dyn ParamVisitor,
    ) -> Result<(), WeightsError> {
        let mut index = 0;
        if let Some(expand) = &mut self.expand {
            expand.visit_weights(
                &format!("{prefix}conv.0.0"),
                &format!("{prefix}conv.0.1"),
                visitor,
            )?;
            index = 1;
        }
        self.depthwise.visit_weights(
            &format!("{prefix}conv.{index}.0"),
            &format!("{prefix}conv.{index}.1"),
            visitor,
        )?;
        self.project.visit_weights(
            &format!("{prefix}conv.{}", index + 1),
            &format!("{prefix}conv.{}", index + 2),
            visitor,
        )
    }
}

/// The part after `features[17]` that only the ImageNet classifier uses.
#[derive(Module, Debug)]
pub struct MobileNetHead {
    /// `features[18]`: 1x1 conv 320 -> 1280 + bn + ReLU6.
    pub last_conv: ConvBn,
    /// `classifier[1]`: 1280 -> 1000.
    pub classifier: Linear,
}

/// MobileNetV2 (width 1.0) without its classifier (kept optional, for ImageNet logits checks).
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    /// `features[0]`: 3x3 stride-2 conv 3 -> 32 + bn + ReLU6.
    pub stem: ConvBn,
    /// `features[1..=17]`.
    pub blocks: Vec<InvertedResidual>,
    /// Global average pool for the classifier.
    pub pool: AdaptiveAvgPool2d,
    /// `features[18]` and the classifier, present when loaded from an ImageNet state_dict.
    pub head: Option<MobileNetHead>,
}

/// Output channels at the taps.
pub const MOBILENET_V2_TAP_CHANNELS: [usize; 4] = [24, 32, 96, 320];

/// Indices into `blocks` (= `features[i + 1]`) whose outputs are the taps C2..C5.
const TAP_BLOCKS: [usize; 4] = [2, 5, 12, 16];

/// torchvision's inverted residual settings: expansion t, channels c, repeats n, stride s.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

impl MobileNetV2 {
    /// A randomly initialised MobileNetV2.
    pub fn new(device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut channels_in = 32;
        for (expansion, channels_out, repeats, stride) in SETTINGS {
            for repeat in 0..repeats {
                let stride = if repeat == 0 { stride } else { 1 };
                blocks.push(InvertedResidual::new(
                    channels_in,
                    channels_out,
                    stride,
                    expansion,
                    device,
                ));
                channels_in = channels_out;
            }
        }
        Self {
            stem: ConvBnSpec::new(3, 32, 3, 2).init(device),
            blocks,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            head: None,
        }
    }

    /// The four taps for an input `[B, 3, H, W]`: strides 4, 8, 16, 32.
    pub fn forward(&self, input: Tensor<4>) -> BackboneTaps {
        let mut x = relu6(self.stem.forward(input));
        let mut taps = Vec::with_capacity(4);
        // Blocks after the last tap only feed the classifier.
        for (index, block) in self.blocks.iter().enumerate().take(TAP_BLOCKS[3] + 1) {
            x = block.forward(x);
            if TAP_BLOCKS.contains(&index) {
                taps.push(x.clone());
            }
        }
        BackboneTaps::from_vec(taps)
    }

    /// ImageNet logits `[B, 1000]` from C5 (= `features[17]`), if the head was loaded.
    pub fn logits(&self, c5: Tensor<4>) -> Option<Tensor<2>> {
        let head = self.head.as_ref()?;
        let x = relu6(head.last_conv.forward(c5));
        let pooled: Tensor<2> = self.pool.forward(x).flatten(1, 3);
        Some(head.classifier.forward(pooled))
    }

    /// Visits every weight under torchvision's key names.
    pub fn visit_weights(&mut self, visitor: &mut dyn ParamVisitor) -> Result<(), WeightsError> {
        self.stem
            .visit_weights("features.0.0", "features.0.1", visitor)?;
        for (index, block) in self.blocks.iter_mut().enumerate() {
            block.visit_weights(&format!("features.{}.", index + 1), visitor)?;
        }
        let device = self.stem.conv.weight.device();
        if self.head.is_none() && visitor.provides("classifier.1.weight") {
            self.head = Some(MobileNetHead {
                last_conv: ConvBnSpec::new(320, 1280, 1, 1).init(&device),
                classifier: burn::nn::LinearConfig::new(1280, IMAGENET_CLASSES).init(&device),
            });
        }
        if let Some(head) = &mut self.head {
            head.last_conv
                .visit_weights("features.18.0", "features.18.1", visitor)?;
            visitor.linear("classifier.1", &mut head.classifier)?;
        }
        Ok(())
    }
}
