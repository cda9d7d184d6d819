//! Numeric parity of both backbones with PyTorch, and the errors a user gets for bad weight
//! files. Runs on the CPU backend with the shared fixtures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use picie::model::{Backbone, BackboneKind, PicieNet, StateDict, WeightsError};

fn shared(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(relative)
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn relative_l2_error(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "element counts differ");
    let (mut difference, mut reference) = (0f64, 0f64);
    for (a, e) in actual.iter().zip(expected) {
        difference += f64::from(a - e).powi(2);
        reference += f64::from(*e).powi(2);
    }
    (difference / reference).sqrt()
}

fn check_backbone(kind: BackboneKind, weights: &str, prefix: &str) -> Vec<f32> {
    let device = Device::flex();
    let fixtures = StateDict::read_safetensors(&shared("fixtures/parity.safetensors")).unwrap();
    let input: Tensor<4> = fixtures.tensor("input", &device).unwrap();

    let mut backbone = Backbone::new(kind, &device);
    backbone
        .load_torchvision(&shared(weights), &device)
        .unwrap();
    let taps = backbone.forward(input);
    let logits = backbone.logits(taps.c5.clone()).expect("classifier loaded");
    let outputs = [
        ("c2", values(taps.c2)),
        ("c3", values(taps.c3)),
        ("c4", values(taps.c4)),
        ("c5", values(taps.c5)),
        ("logits", values(logits)),
    ];
    for (name, actual) in &outputs {
        let key = format!("{prefix}.{name}");
        let expected = &fixtures.tensors[&key].values;
        let error = relative_l2_error(actual, expected);
        println!("{key}: relative L2 error {error:.2e}");
        assert!(error < 1e-4, "{key}: relative L2 error {error:.3e} >= 1e-4");
    }
    outputs[4].1.clone()
}

#[test]
fn resnet18_matches_pytorch() {
    check_backbone(
        BackboneKind::Resnet18,
        "weights/resnet18-seeded.pth",
        "resnet18",
    );
}

#[test]
fn mobilenet_v2_matches_pytorch_and_sees_a_cat() {
    let logits = check_backbone(
        BackboneKind::MobilenetV2,
        "weights/mobilenet_v2-imagenet.pth",
        "mobilenet_v2",
    );
    let top1 = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(index, _)| index)
        .unwrap();
    assert_eq!(top1, 285, "ImageNet class 285 is 'Egyptian cat'");
}

#[test]
fn bad_weight_files_give_errors_naming_file_and_key() {
    let device = Device::flex();
    let folder = tempfile::tempdir().unwrap();

    // A missing file.
    let missing = folder.path().join("nope.pth");
    let error = Backbone::new(BackboneKind::Resnet18, &device)
        .load_torchvision(&missing, &device)
        .unwrap_err();
    assert!(matches!(error, WeightsError::Unreadable { .. }), "{error}");
    assert!(error.to_string().contains("nope.pth"), "{error}");

    // A truncated download.
    let truncated = folder.path().join("resnet18-truncated.pth");
    let bytes = std::fs::read(shared("weights/resnet18-seeded.pth")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let error = Backbone::new(BackboneKind::Resnet18, &device)
        .load_torchvision(&truncated, &device)
        .unwrap_err();
    assert!(matches!(error, WeightsError::Corrupt { .. }), "{error}");
    assert!(
        error.to_string().contains("resnet18-truncated.pth"),
        "{error}"
    );

    // Not a weights file at all.
    let text = folder.path().join("notes.pth");
    std::fs::write(&text, "these are not weights").unwrap();
    let error = Backbone::new(BackboneKind::Resnet18, &device)
        .load_torchvision(&text, &device)
        .unwrap_err();
    assert!(error.to_string().contains("notes.pth"), "{error}");

    // The other backbone's file.
    let error = Backbone::new(BackboneKind::Resnet18, &device)
        .load_torchvision(&shared("weights/mobilenet_v2-imagenet.pth"), &device)
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(error, WeightsError::MissingKey { .. }),
        "{message}"
    );
    assert!(message.contains("conv1.weight"), "{message}");
    assert!(message.contains("mobilenet_v2-imagenet.pth"), "{message}");
}

#[test]
fn checkpoint_round_trip_keeps_the_network() {
    let device = Device::flex();
    let net = PicieNet::new(BackboneKind::MobilenetV2, &device);
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("network.safetensors");
    let metadata = HashMap::from([("epoch".to_owned(), "3".to_owned())]);
    net.save(&path, &metadata).unwrap();

    let (loaded, read_metadata) = PicieNet::load(&path, &device).unwrap();
    assert_eq!(read_metadata["epoch"], "3");
    assert_eq!(loaded.kind(), BackboneKind::MobilenetV2);

    let input = Tensor::<4>::random(
        [1, 3, 64, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &device,
    );
    let before = values(net.forward(input.clone()));
    let after = values(loaded.forward(input));
    assert_eq!(before.len(), 128 * 16 * 16);
    assert_eq!(before, after);
    // Unit-length features.
    let norm: f32 = (0..128)
        .map(|c| before[c * 256].powi(2))
        .sum::<f32>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "feature norm {norm}");
}
