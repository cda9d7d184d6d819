//! The wgpu backend computes what the CPU backend computes. On machines without a GPU this
//! runs on a software Vulkan adapter (lavapipe), so the input is tiny; without any adapter the
//! test reports that it cannot run here.

use std::path::Path;

use burn::tensor::{Device, DeviceKind, Tensor};
use picie::device::{configure_gpu_runtime, list_adapters};
use picie::model::{BackboneKind, PicieNet, build_network, images_to_tensor};

/// The first wgpu adapter (configured as the app does) and the CPU backend; `None`, with a
/// line saying why, on a machine without any adapter.
fn wgpu_and_cpu() -> Option<(Device, Device)> {
    let adapters = list_adapters();
    let Some(adapter) = adapters.first() else {
        eprintln!("no wgpu adapter on this machine: install mesa-vulkan-drivers to run this test");
        return None;
    };
    eprintln!("wgpu adapter: {} [{:?}]", adapter.name, adapter.device_type);
    configure_gpu_runtime(adapter.is_real_gpu());
    let gpu = if adapter.is_real_gpu() {
        Device::wgpu(DeviceKind::DefaultDevice)
    } else {
        Device::wgpu(DeviceKind::Cpu)
    };
    Some((gpu, Device::flex()))
}

/// The shared torchvision MobileNetV2 file.
fn mobilenet_weights() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/weights/mobilenet_v2-imagenet.pth")
}

#[test]
fn wgpu_forward_matches_the_cpu_backend() {
    let Some((gpu, cpu)) = wgpu_and_cpu() else {
        return;
    };
    let weights = mobilenet_weights();

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
    use picie::train::{ExistingRun, RunFolder, TrainControl, TrainEvent, Trainer, TrainingData};

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
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let compute = picie::device::select_device(&config.device).unwrap();
    let mut trainer = Trainer::new(config, run, data, TrainControl::new(), false).unwrap();
    let mut losses = Vec::new();
    let mut observer = |event: &TrainEvent| {
        if let TrainEvent::Step(progress) = event {
            losses.push(progress.loss.total);
        }
    };
    let outcome = trainer.run(&compute, &mut observer).unwrap();
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

/// One PiCIE training step (two views, G on the features, the four-term loss, backward and an
/// Adam update) gives the same loss on the wgpu backend, with burn's autotune and kernel
/// fusion, as on the CPU backend, before and after the update.
///
/// Tolerances: the loss is a mean of cross-entropies of about ln K = 1.6 over 2 x 2 x 256
/// pixels; both backends compute in f32 but sum in different orders, which moves such a mean
/// by about 1e-7 relative (lavapipe: identical to 7 digits). 2e-5 relative before the step
/// leaves room for other GPUs' orders and transcendental functions and still catches a wrong
/// kernel. The update's gradients are checked through the change of the loss it causes
/// (about 1e-3 here, at least 20 times the tolerance): the two backends' changes must agree
/// within 5 % (lavapipe: 0.8 %, from Adam's first step amplifying tiny gradients alike).
#[test]
fn one_training_step_gives_the_same_loss_on_wgpu_and_on_the_cpu() {
    use burn::module::Module;
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::tensor::{Int, TensorData};
    use picie::data::views::{GeometricParams, geometric_on_features};
    use picie::loss::picie_loss;

    let Some((gpu, cpu)) = wgpu_and_cpu() else {
        return;
    };
    let weights = mobilenet_weights();
    let (net_on_cpu, _) =
        build_network(BackboneKind::MobilenetV2, Some(&weights), 0, &cpu).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let checkpoint = folder.path().join("network.safetensors");
    net_on_cpu.save(&checkpoint, &Default::default()).unwrap();

    let (batch, size, clusters) = (2, 64, 5);
    let grid = size / 4;
    let image = |shift: usize| -> Vec<u8> {
        (0..size * size)
            .flat_map(|index| {
                let (x, y) = (index % size, index / size);
                [
                    ((x * 4 + shift) % 256) as u8,
                    (y * 4) as u8,
                    ((x + y + shift) * 2 % 256) as u8,
                ]
            })
            .collect()
    };
    let pictures = [image(0), image(37)];
    let flipped: Vec<Vec<u8>> = pictures
        .iter()
        .map(|picture| {
            picture
                .chunks(size * 3)
                .flat_map(|row| row.chunks(3).rev().flatten().copied().collect::<Vec<u8>>())
                .collect()
        })
        .collect();
    let geometric = [
        GeometricParams {
            x0: 2,
            y0: 1,
            side: 12,
            flip: true,
        },
        GeometricParams::identity(grid),
    ];
    let centroid_values: Vec<f32> = (0..clusters * 128)
        .map(|i| ((i * 7919 % 61) as f32 - 30.0) / 30.0)
        .collect();
    // Fixed pseudo-labels, the same for both backends.
    let labels: Vec<i64> = (0..2 * batch * grid * grid)
        .map(|i| ((i * 31 + i / 17) % clusters) as i64)
        .collect();

    let step = |device: &Device| -> (f32, f32) {
        let training = device.clone().autodiff();
        let (network, _) = PicieNet::load(&checkpoint, &training).unwrap();
        let mut network = network.train();
        let mut optimizer = AdamConfig::new().init();
        let views = |images: &[Vec<u8>]| {
            let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
            images_to_tensor(&refs, size, &training)
        };
        let mu = || {
            let values = Tensor::<2>::from_data(
                TensorData::new(centroid_values.clone(), [clusters, 128]),
                &training,
            );
            let norm = values.clone().square().sum_dim(1).sqrt();
            values / norm
        };
        let label_tensor = |half: usize| {
            let count = batch * grid * grid;
            Tensor::<3, Int>::from_data(
                TensorData::new(
                    labels[half * count..(half + 1) * count].to_vec(),
                    [batch, grid, grid],
                ),
                &training,
            )
        };
        let loss_of = |network: &PicieNet| {
            let first = network.forward(views(&pictures));
            let second = geometric_on_features(network.forward(views(&flipped)), &geometric);
            picie_loss(
                first,
                second,
                mu(),
                mu(),
                label_tensor(0),
                label_tensor(1),
                None,
                None,
            )
        };
        let loss = loss_of(&network);
        let before = loss.terms().total;
        let gradients = GradientsParams::from_grads(loss.total.backward(), &network);
        network = optimizer.step(1e-3, network.clone(), gradients);
        let after = loss_of(&network).terms().total;
        (before, after)
    };
    let (cpu_before, cpu_after) = step(&cpu);
    let (gpu_before, gpu_after) = step(&gpu);
    eprintln!("loss on the CPU {cpu_before} -> {cpu_after}, on wgpu {gpu_before} -> {gpu_after}");
    let tolerance = 2e-5 * cpu_before.abs();
    let (cpu_change, gpu_change) = (cpu_after - cpu_before, gpu_after - gpu_before);
    assert!(
        cpu_change.abs() > 20.0 * tolerance,
        "the update should move the loss well past the tolerance (moved {cpu_change})"
    );
    assert!(
        (gpu_before - cpu_before).abs() <= tolerance,
        "loss before the step: {gpu_before} on wgpu, {cpu_before} on the CPU"
    );
    assert!(
        (gpu_change - cpu_change).abs() <= 0.05 * cpu_change.abs(),
        "change of the loss by the update: {gpu_change} on wgpu, {cpu_change} on the CPU"
    );
}

/// k-means' device pass (chunks totalled in groups, the last group padded) on wgpu gives the
/// CPU backend's Lloyd step: the same counts, centroids equal to f32 rounding.
#[test]
fn one_lloyd_step_on_wgpu_matches_the_cpu_backend() {
    use picie::cluster::{Centroids, FeatureStore, lloyd_step};
    use rand::{Rng, SeedableRng};

    let Some((gpu, cpu)) = wgpu_and_cpu() else {
        return;
    };
    let (points, clusters, dim) = (1000, 7, 16);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut unit_rows = |rows: usize| -> Vec<f32> {
        (0..rows)
            .flat_map(|_| {
                let row: Vec<f32> = (0..dim).map(|_| rng.random::<f32>() - 0.5).collect();
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                row.into_iter().map(move |v| v / norm)
            })
            .collect()
    };
    let mut store = FeatureStore::in_memory(dim).unwrap();
    store.push_slice(&unit_rows(points)).unwrap();
    let init = Centroids::new(unit_rows(clusters), clusters, dim).unwrap();
    // Chunks of 300 points: neither they nor the last one (100) fill whole groups.
    let on_cpu = lloyd_step(&store, &init, 300, 0, &cpu).unwrap();
    let on_wgpu = lloyd_step(&store, &init, 300, 0, &gpu).unwrap();
    assert_eq!(on_wgpu.stats.counts, on_cpu.stats.counts);
    assert_eq!(on_cpu.stats.counts.iter().sum::<u64>(), points as u64);
    let worst = on_cpu
        .centroids
        .values
        .iter()
        .zip(&on_wgpu.centroids.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "largest centroid difference {worst}");
}
