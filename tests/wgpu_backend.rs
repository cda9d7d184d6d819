//! The wgpu backend computes what the CPU backend computes. On machines without a GPU this
//! runs on a software Vulkan adapter (lavapipe), so the input is tiny; without any adapter the
//! test reports that it cannot run here.

use std::path::Path;

use burn::tensor::{Device, DeviceKind, Tensor};
use picie::device::list_adapters;
use picie::model::{BackboneKind, PicieNet, build_network, images_to_tensor};

#[test]
fn wgpu_forward_matches_the_cpu_backend() {
    let adapters = list_adapters();
    let Some(adapter) = adapters.first() else {
        eprintln!("no wgpu adapter on this machine: install mesa-vulkan-drivers to run this test");
        return;
    };
    eprintln!("wgpu adapter: {} [{:?}]", adapter.name, adapter.device_type);
    let gpu = if adapter.is_real_gpu() {
        Device::wgpu(DeviceKind::DefaultDevice)
    } else {
        Device::wgpu(DeviceKind::Cpu)
    };
    let cpu = Device::flex();
    let weights =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/weights/mobilenet_v2-imagenet.pth");

    // A 64x64 crop of a smooth colour ramp: tiny, so lavapipe finishes quickly.
    let size = 64;
    let pixels: Vec<u8> = (0..size * size)
        .flat_map(|index| {
            let (x, y) = (index % size, index / size);
            [(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8]
        })
        .collect();

    // The FPN starts random, so the network goes to the wgpu device through a checkpoint.
    let (net_on_cpu, _) =
        build_network(BackboneKind::MobilenetV2, Some(&weights), 0, &cpu).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let checkpoint = folder.path().join("network.safetensors");
    net_on_cpu.save(&checkpoint, &Default::default()).unwrap();

    let features = |device: &Device| -> Vec<f32> {
        let (net, _) = PicieNet::load(&checkpoint, device).unwrap();
        let input: Tensor<4> = images_to_tensor(&[&pixels], size, device);
        net.forward(input)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let on_cpu = features(&cpu);
    let on_wgpu = features(&gpu);
    assert_eq!(on_cpu.len(), 128 * 16 * 16);
    let worst = on_cpu
        .iter()
        .zip(&on_wgpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "largest difference {worst}");
}

/// A whole PiCIE epoch on the wgpu backend: clustering, the four-term loss, backward through
/// the FPN's bilinear upsampling and G on the features, Adam, a checkpoint and an evaluation.
#[test]
fn wgpu_trains_an_epoch_and_writes_a_checkpoint() {
    use std::sync::Arc;

    use picie::config::TrainConfig;
    use picie::data::{DemoOptions, write_demo_dataset};
    use picie::device::DeviceChoice;
    use picie::train::{RunFolder, TrainControl, TrainEvent, Trainer, TrainingData};

    if list_adapters().is_empty() {
        eprintln!("no wgpu adapter on this machine: install mesa-vulkan-drivers to run this test");
        return;
    }
    let folder = tempfile::tempdir().unwrap();
    let demo = write_demo_dataset(
        &folder.path().join("demo"),
        &DemoOptions {
            images: 4,
            size: 64,
            seed: 1,
        },
    )
    .unwrap();
    // Tiny on purpose: lavapipe runs the kernels on one CPU core.
    let data = Arc::new(
        TrainingData::load(&demo.images_dir, Some(&demo.labels_dir), 64, 32, &|_, _| {}).unwrap(),
    );
    let config = TrainConfig {
        backbone: BackboneKind::MobilenetV2,
        device: DeviceChoice::Wgpu,
        base_size: 64,
        input_size: 32,
        batch_size: 2,
        epochs: 1,
        kmeans_iterations: 3,
        preview_images: 1,
        seed: 5,
        ..TrainConfig::default()
    };
    let run_dir = folder.path().join("run");
    let run = RunFolder::create(&run_dir, &config).unwrap();
    let mut trainer = Trainer::new(config, run, data, TrainControl::new(), false).unwrap();
    let mut losses = Vec::new();
    let mut observer = |event: &TrainEvent| {
        if let TrainEvent::Step(progress) = event {
            losses.push(progress.loss.total);
        }
    };
    let outcome = trainer.run(&mut observer).unwrap();
    assert_eq!(outcome.last_epoch, 1);
    assert_eq!(losses.len(), 2, "two batches of two images");
    assert!(
        losses.iter().all(|loss| loss.is_finite() && *loss > 0.0),
        "losses {losses:?}"
    );
    let accuracy = outcome.metrics.epochs[0].acc.expect("labels were given");
    assert!((0.0..=100.0).contains(&accuracy), "accuracy {accuracy}");
    let reopened = RunFolder::open(&run_dir).unwrap();
    assert_eq!(reopened.latest_checkpoint().unwrap().unwrap().1.epoch, 1);
}
