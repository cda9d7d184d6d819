//! The networks: ResNet-18 and MobileNetV2 backbones (torchvision layout) with the PiCIE FPN.

pub mod conv;
pub mod conv_direct;
pub mod conv_grad;
pub mod conv_winograd;
pub mod elementwise;
pub mod fpn;
mod host_buffers;
pub mod layers;
pub mod mobilenet;
pub mod norm_host;
pub mod pool_host;
pub mod resize;
pub mod resnet;
mod torch_zip;
pub mod weights;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use fpn::Fpn;
pub use mobilenet::MobileNetV2;
pub use resnet::ResNet18;
pub use weights::{StateDict, WeightsError};

use weights::{ParamVisitor, Prefixed, StateDictLoader, StateDictWriter};

/// Channels of the pixel features the FPN outputs.
pub const FEATURE_DIM: usize = 128;
/// Output stride of the FPN: a 320x320 input gives an 80x80 feature map.
pub const FEATURE_STRIDE: usize = 4;
/// Number of ImageNet classes of the torchvision classifiers.
pub const IMAGENET_CLASSES: usize = 1000;
/// ImageNet channel means used by torchvision's weights.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations used by torchvision's weights.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The identifier written into our checkpoints' metadata.
const CHECKPOINT_FORMAT: &str = "picie-explorer-network-v1";

/// The backbone outputs at strides 4, 8, 16 and 32.
#[derive(Debug, Clone)]
pub struct BackboneTaps {
    /// Stride 4.
    pub c2: Tensor<4>,
    /// Stride 8.
    pub c3: Tensor<4>,
    /// Stride 16.
    pub c4: Tensor<4>,
    /// Stride 32.
    pub c5: Tensor<4>,
}

impl BackboneTaps {
    fn from_vec(taps: Vec<Tensor<4>>) -> Self {
        let [c2, c3, c4, c5]: [Tensor<4>; 4] = taps
            .try_into()
            .unwrap_or_else(|_| unreachable!("backbones push exactly four taps"));
        Self { c2, c3, c4, c5 }
    }
}

/// Which backbone a network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// ResNet-18, the paper's backbone.
    #[default]
    Resnet18,
    /// MobileNetV2, lighter and with real ImageNet weights available offline.
    MobilenetV2,
}

impl BackboneKind {
    /// Both backbones.
    pub const ALL: [BackboneKind; 2] = [BackboneKind::Resnet18, BackboneKind::MobilenetV2];

    /// The name used on the command line, in files and in torchvision's file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Resnet18 => "resnet18",
            Self::MobilenetV2 => "mobilenet_v2",
        }
    }

    /// A human-readable name.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::Resnet18 => "ResNet-18",
            Self::MobilenetV2 => "MobileNetV2",
        }
    }

    /// Channels of C2..C5.
    pub fn tap_channels(self) -> [usize; 4] {
        match self {
            Self::Resnet18 => resnet::RESNET18_TAP_CHANNELS,
            Self::MobilenetV2 => mobilenet::MOBILENET_V2_TAP_CHANNELS,
        }
    }
}

impl fmt::Display for BackboneKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for BackboneKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().replace('-', "_").as_str() {
            "resnet18" => Ok(Self::Resnet18),
            "mobilenet_v2" | "mobilenetv2" => Ok(Self::MobilenetV2),
            other => Err(format!(
                "unknown backbone '{other}': use resnet18 or mobilenet_v2"
            )),
        }
    }
}

/// One of the two backbones.
// A network holds exactly one backbone, so the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone {
    /// ResNet-18.
    Resnet18(ResNet18),
    /// MobileNetV2.
    MobilenetV2(MobileNetV2),
}

impl Backbone {
    /// A randomly initialised backbone of `kind`.
    pub fn new(kind: BackboneKind, device: &Device) -> Self {
        match kind {
            BackboneKind::Resnet18 => Self::Resnet18(ResNet18::new(device)),
            BackboneKind::MobilenetV2 => Self::MobilenetV2(MobileNetV2::new(device)),
        }
    }

    /// Which backbone this is.
    pub fn kind(&self) -> BackboneKind {
        match self {
            Self::Resnet18(_) => BackboneKind::Resnet18,
            Self::MobilenetV2(_) => BackboneKind::MobilenetV2,
        }
    }

    /// The taps C2..C5 of a normalised image batch `[B, 3, H, W]`.
    pub fn forward(&self, input: Tensor<4>) -> BackboneTaps {
        match self {
            Self::Resnet18(net) => net.forward(input),
            Self::MobilenetV2(net) => net.forward(input),
        }
    }

    /// ImageNet logits from C5, when the classifier was loaded with the weights.
    pub fn logits(&self, c5: Tensor<4>) -> Option<Tensor<2>> {
        match self {
            Self::Resnet18(net) => net.logits(c5),
            Self::MobilenetV2(net) => net.logits(c5),
        }
    }

    /// Visits every weight under torchvision's names.
    pub fn visit_weights(&mut self, visitor: &mut dyn ParamVisitor) -> Result<(), WeightsError> {
        match self {
            Self::Resnet18(net) => net.visit_weights(visitor),
            Self::MobilenetV2(net) => net.visit_weights(visitor),
        }
    }

    /// Loads a torchvision state_dict of this backbone (e.g. `resnet18-f37072fd.pth`).
    pub fn load_torchvision(&mut self, path: &Path, device: &Device) -> Result<(), WeightsError> {
        let dict = StateDict::read(path)?;
        let network = self.kind().display_name();
        let mut loader = StateDictLoader::new(&dict, device, network);
        self.visit_weights(&mut loader)
    }
}

/// The PiCIE network: a backbone and the FPN, giving unit-length 128-d pixel features.
#[derive(Module, Debug)]
pub struct PicieNet {
    /// ResNet-18 or MobileNetV2.
    pub backbone: Backbone,
    /// The decoder.
    pub fpn: Fpn,
}

impl PicieNet {
    /// A randomly initialised network.
    pub fn new(kind: BackboneKind, device: &Device) -> Self {
        Self {
            backbone: Backbone::new(kind, device),
            fpn: Fpn::new(kind.tap_channels(), device),
        }
    }

    /// Pixel features `[B, 128, H/4, W/4]`, unit length over channels, of a normalised image
    /// batch `[B, 3, H, W]` (see [`images_to_tensor`]).
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        self.fpn.forward(self.backbone.forward(input))
    }

    /// [`PicieNet::forward`] averaged with the features of the mirrored batch (mirrored
    /// back), renormalised to unit length: test-time flip augmentation.
    pub fn forward_flip_averaged(&self, input: Tensor<4>) -> Tensor<4> {
        let plain = self.forward(input.clone());
        let mirrored = self.forward(input.flip([3])).flip([3]);
        fpn::l2_normalize_channels(plain + mirrored)
    }

    /// Which backbone this network uses.
    pub fn kind(&self) -> BackboneKind {
        self.backbone.kind()
    }

    /// Visits all weights: the backbone under `backbone.`, the decoder under `fpn.`.
    pub fn visit_weights(&mut self, visitor: &mut dyn ParamVisitor) -> Result<(), WeightsError> {
        self.backbone
            .visit_weights(&mut Prefixed::new("backbone.", visitor))?;
        self.fpn.visit_weights(&mut Prefixed::new("fpn.", visitor))
    }

    /// Saves the network as a safetensors checkpoint (atomically), with `metadata` added to
    /// the file's own (format and backbone).
    pub fn save(
        &self,
        path: &Path,
        metadata: &HashMap<String, String>,
    ) -> Result<(), WeightsError> {
        let mut writer = StateDictWriter::default();
        // Visiting needs `&mut` for the loader; writing only reads, so a clone is cheap
        // (tensors are reference-counted).
        self.clone().visit_weights(&mut writer)?;
        let mut dict = writer.finish();
        dict.metadata.extend(metadata.clone());
        dict.metadata
            .insert("format".into(), CHECKPOINT_FORMAT.into());
        dict.metadata
            .insert("backbone".into(), self.kind().name().into());
        dict.write_safetensors(path)
    }

    /// Loads a checkpoint written by [`PicieNet::save`], returning the network and the file's
    /// metadata.
    pub fn load(
        path: &Path,
        device: &Device,
    ) -> Result<(Self, HashMap<String, String>), WeightsError> {
        let dict = StateDict::read_safetensors(path)?;
        let corrupt = |reason: String| WeightsError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if dict.metadata.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(corrupt(format!(
                "it is not a PiCIE Explorer network checkpoint (format '{CHECKPOINT_FORMAT}' expected)"
            )));
        }
        let kind: BackboneKind = dict
            .metadata
            .get("backbone")
            .ok_or_else(|| corrupt("its metadata names no backbone".into()))?
            .parse()
            .map_err(corrupt)?;
        let mut net = Self::new(kind, device);
        let mut loader = StateDictLoader::new(&dict, device, "the PiCIE network");
        net.visit_weights(&mut loader)?;
        Ok((net, dict.metadata))
    }
}

/// Turns RGB images (HWC, u8, all `size` x `size`) into a normalised batch `[B, 3, size, size]`
/// with ImageNet statistics.
pub fn images_to_tensor(images: &[&[u8]], size: usize, device: &Device) -> Tensor<4> {
    images_to_tensor_rect(images, size, size, device)
}

/// Like [`images_to_tensor`] for images of `width` x `height`: `[B, 3, height, width]`.
pub fn images_to_tensor_rect(
    images: &[&[u8]],
    width: usize,
    height: usize,
    device: &Device,
) -> Tensor<4> {
    let plane = width * height;
    let mut values = vec![0f32; images.len() * 3 * plane];
    for (index, image) in images.iter().enumerate() {
        let batch_offset = index * 3 * plane;
        for (pixel, rgb) in image.chunks_exact(3).take(plane).enumerate() {
            for channel in 0..3 {
                let value = f32::from(rgb[channel]) / 255.0;
                values[batch_offset + channel * plane + pixel] =
                    (value - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel];
            }
        }
    }
    Tensor::from_data(
        TensorData::new(values, [images.len(), 3, height, width]),
        device,
    )
}

/// Where a network's starting weights came from, for the one line the user is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsOrigin {
    /// A file the user named with `--weights`.
    File(std::path::PathBuf),
    /// torchvision's ImageNet file found in the download cache.
    Cache(std::path::PathBuf),
    /// No weights: random initialisation.
    RandomInit,
    /// Random initialisation, asked for (ImageNet weights in the cache are not used).
    RandomInitAsked,
}

impl fmt::Display for WeightsOrigin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(formatter, "weights from {}", path.display()),
            Self::Cache(path) => write!(formatter, "ImageNet weights from {}", path.display()),
            Self::RandomInit => formatter.write_str(
                "no weights given or downloaded: the backbone starts from random init \
                 (pass --weights PATH or run `picie download-weights`)",
            ),
            Self::RandomInitAsked => formatter.write_str("random init, as asked"),
        }
    }
}

/// A network with every weight drawn from `seed` (the backbone too): what random init means.
pub fn random_network(
    kind: BackboneKind,
    seed: u64,
    device: &Device,
) -> Result<(PicieNet, WeightsOrigin), WeightsError> {
    let mut net = PicieNet::new(kind, device);
    net.visit_weights(&mut weights::SeededInit::new(seed, device))?;
    Ok((net, WeightsOrigin::RandomInitAsked))
}

/// Builds a network: backbone weights from `weights` if given (a torchvision state_dict, or
/// one of our network checkpoints), else torchvision's ImageNet file if it was downloaded,
/// else random init. Random parts (the decoder, and the backbone without weights) come from
/// `seed`, so a run starts identically for a given seed.
pub fn build_network(
    kind: BackboneKind,
    weights: Option<&Path>,
    seed: u64,
    device: &Device,
) -> Result<(PicieNet, WeightsOrigin), WeightsError> {
    let mut net = PicieNet::new(kind, device);
    net.visit_weights(&mut weights::SeededInit::new(seed, device))?;
    let (path, origin) = match weights {
        Some(path) => (path.to_owned(), WeightsOrigin::File(path.to_owned())),
        None => match crate::download::known_weights(kind.name())
            .and_then(crate::download::cached_weights_path)
        {
            Some(path) => (path.clone(), WeightsOrigin::Cache(path)),
            None => return Ok((net, WeightsOrigin::RandomInit)),
        },
    };
    let dict = StateDict::read(&path)?;
    if dict.metadata.get("format").map(String::as_str) == Some(CHECKPOINT_FORMAT) {
        let (loaded, _) = PicieNet::load(&path, device)?;
        if loaded.kind() != kind {
            return Err(WeightsError::WrongBackbone {
                path,
                found: loaded.kind().display_name().to_owned(),
                found_flag: loaded.kind().name().to_owned(),
                asked: kind.display_name().to_owned(),
            });
        }
        return Ok((loaded, origin));
    }
    let mut loader = StateDictLoader::new(&dict, device, kind.display_name());
    net.backbone.visit_weights(&mut loader)?;
    Ok((net, origin))
}

/// `tensor.permute(axes)` (output axis `i` is input axis `axes[i]`) written as swaps of two
/// axes. burn 0.22.1's remote backend runs a float `permute` as an integer one on the server,
/// whose session then stops ("Expected int handle, got float"); `swap_dims` goes through, and
/// on the local backends both are views, so this costs nothing there.
pub fn permute_axes<const D: usize>(tensor: Tensor<D>, axes: [usize; D]) -> Tensor<D> {
    // order[position] = the input axis now at that position.
    let mut order: [usize; D] = std::array::from_fn(|axis| axis);
    let mut tensor = tensor;
    for (position, &wanted) in axes.iter().enumerate() {
        let at = order
            .iter()
            .position(|&axis| axis == wanted)
            .expect("permute_axes: axes must be a permutation");
        if at != position {
            tensor = tensor.swap_dims(position, at);
            order.swap(position, at);
        }
    }
    tensor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_axes_matches_burns_permute_for_every_order_of_four_axes() {
        let device = Device::flex();
        let values: Vec<f32> = (0..2 * 3 * 4 * 5).map(|value| value as f32).collect();
        let tensor = Tensor::<4>::from_data(TensorData::new(values, [2, 3, 4, 5]), &device);
        let mut orders = Vec::new();
        for a in 0..4 {
            for b in (0..4).filter(|&b| b != a) {
                for c in (0..4).filter(|&c| c != a && c != b) {
                    orders.push([a, b, c, 6 - a - b - c]);
                }
            }
        }
        assert_eq!(orders.len(), 24);
        for axes in orders {
            let expected = tensor.clone().permute(axes).into_data();
            let got = permute_axes(tensor.clone(), axes).into_data();
            assert_eq!(got.shape(), expected.shape(), "{axes:?}");
            assert_eq!(
                got.try_to_vec::<f32>().unwrap(),
                expected.try_to_vec::<f32>().unwrap(),
                "{axes:?}"
            );
        }
    }
}
