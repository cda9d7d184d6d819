//! End-to-end training on the CPU backend: PiCIE learns something on the demo data, a run
//! folder is complete, and a resumed run reproduces the uninterrupted one.

use std::sync::Arc;

use picie::config::TrainConfig;
use picie::data::{DecodedStorage, DemoOptions, write_demo_dataset};
use picie::device::{ComputeDevice, DeviceChoice};
use picie::model::BackboneKind;
use picie::train::{
    ExistingRun, NullObserver, RunFolder, TrainControl, TrainEvent, Trainer, TrainingData,
};

fn demo_config(epochs: usize) -> TrainConfig {
    TrainConfig {
        backbone: BackboneKind::MobilenetV2,
        device: DeviceChoice::Cpu,
        base_size: 128,
        input_size: 64,
        batch_size: 8,
        learning_rate: 1e-3,
        epochs,
        kmeans_iterations: 10,
        preview_images: 2,
        seed: 7,
        ..TrainConfig::default()
    }
}

fn demo_data(folder: &std::path::Path, images: usize) -> Arc<TrainingData> {
    demo_data_in(folder, images, &DecodedStorage::Memory)
}

fn demo_data_in(
    folder: &std::path::Path,
    images: usize,
    storage: &DecodedStorage,
) -> Arc<TrainingData> {
    let summary = write_demo_dataset(
        folder,
        &DemoOptions {
            images,
            size: 128,
            seed: 3,
        },
    )
    .unwrap();
    Arc::new(
        TrainingData::load_into(
            &summary.images_dir,
            Some(&summary.labels_dir),
            128,
            64,
            storage,
            &|_, _| {},
        )
        .unwrap(),
    )
}

#[test]
fn training_beats_the_untrained_network_and_writes_a_complete_run() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo_data(&folder.path().join("demo"), 32);
    let config = TrainConfig {
        preview_every_steps: 2,
        ..demo_config(4)
    };
    let run_dir = folder.path().join("run");
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let input = config.input_size as usize;
    let mut trainer = Trainer::new(config, run, data, TrainControl::new(), false).unwrap();
    let mut steps = 0;
    let mut previews = 0;
    // Feature cells (4 x 4 pixels) whose pixels fall in more than one cluster: only a map
    // upsampled before the argmax has boundaries inside a cell.
    let mut cells_with_a_boundary = 0;
    let mut previews_within_epochs = 0;
    let mut observer = |event: &TrainEvent| match event {
        TrainEvent::Step(_) => steps += 1,
        TrainEvent::Preview { maps, step, .. } => {
            previews += maps.len();
            previews_within_epochs += usize::from(*step > 0);
            for map in maps {
                assert_eq!(
                    (map.width, map.height),
                    (input, input),
                    "maps at input size"
                );
                for cell_y in (0..input).step_by(4) {
                    for cell_x in (0..input).step_by(4) {
                        let first = map.labels[cell_y * input + cell_x];
                        let mixed = (0..16).any(|i| {
                            map.labels[(cell_y + i / 4) * input + cell_x + i % 4] != first
                        });
                        cells_with_a_boundary += usize::from(mixed);
                    }
                }
                assert_eq!(map.labels.len(), map.width * map.height);
                assert_eq!(map.similarity.len(), map.labels.len());
                assert!(map.labels.iter().all(|&label| label < 8));
                assert!(map.similarity.iter().all(|s| (-1.01..=1.01).contains(s)));
            }
        }
        _ => {}
    };
    let outcome = trainer.run(&ComputeDevice::cpu(), &mut observer).unwrap();
    assert_eq!(outcome.last_epoch, 4);
    assert_eq!(steps, 4 * 4);
    assert!(previews >= 4 * 2);
    assert!(
        cells_with_a_boundary > 0,
        "boundaries only on the feature grid"
    );
    // Four steps an epoch, a preview every two steps: one inside each epoch.
    assert_eq!(previews_within_epochs, 4);

    let metrics = &outcome.metrics;
    let baseline = metrics.no_train.as_ref().unwrap().acc;
    let best = metrics
        .epochs
        .iter()
        .filter_map(|record| record.acc)
        .fold(f64::MIN, f64::max);
    println!("no-train Acc {baseline:.2}, best trained Acc {best:.2}");
    assert!(
        best > baseline + 5.0,
        "training should beat the untrained network clearly: {baseline:.2} -> {best:.2}"
    );

    // The run folder holds what eval/segment and the app need.
    for file in [
        "config.json",
        "metrics.json",
        "latest.json",
        "segmentation.json",
    ] {
        assert!(run_dir.join(file).is_file(), "{file} missing");
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("metrics.json")).unwrap())
            .unwrap();
    assert!(written["no_train"]["acc"].is_number());
    assert_eq!(written["epochs"].as_array().unwrap().len(), 4);
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_run() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo_data(&folder.path().join("demo"), 16);

    let straight_dir = folder.path().join("straight");
    let config = demo_config(2);
    let run = RunFolder::create(&straight_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let straight = Trainer::new(
        config.clone(),
        run,
        data.clone(),
        TrainControl::new(),
        false,
    )
    .unwrap()
    .run(&ComputeDevice::cpu(), &mut NullObserver)
    .unwrap();

    // The same run, stopped after its first epoch and resumed, with the images decoded to
    // cache files (as a dataset too large for memory is) instead of memory.
    let split_dir = folder.path().join("split");
    let cache = folder.path().join("decoded");
    let data = demo_data_in(
        &folder.path().join("demo"),
        16,
        &DecodedStorage::Disk(cache.clone()),
    );
    assert!(
        data.cache_file()
            .is_some_and(|file| file.starts_with(&cache))
    );
    let run = RunFolder::create(&split_dir, &demo_config(1), ExistingRun::Refuse)
        .unwrap()
        .0;
    Trainer::new(
        demo_config(1),
        run,
        data.clone(),
        TrainControl::new(),
        false,
    )
    .unwrap()
    .run(&ComputeDevice::cpu(), &mut NullObserver)
    .unwrap();
    let run = RunFolder::open(&split_dir).unwrap();
    let data_kept = data.clone();
    let resumed = Trainer::new(config, run, data, TrainControl::new(), true)
        .unwrap()
        .run(&ComputeDevice::cpu(), &mut NullObserver)
        .unwrap();

    drop(data_kept);
    assert!(!cache.exists(), "the cache files go with the data");
    assert_eq!(resumed.last_epoch, 2);
    let a = &straight.metrics.epochs;
    let b = &resumed.metrics.epochs;
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.acc, y.acc, "epoch {} accuracy differs", x.epoch);
        assert_eq!(x.loss.total, y.loss.total, "epoch {} loss differs", x.epoch);
    }
}

#[test]
fn zero_epochs_makes_a_valid_run_of_the_untrained_network() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo_data(&folder.path().join("demo"), 8);
    let run_dir = folder.path().join("run");
    let config = demo_config(0);
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let outcome = Trainer::new(config, run, data, TrainControl::new(), false)
        .unwrap()
        .run(&ComputeDevice::cpu(), &mut NullObserver)
        .unwrap();
    assert_eq!(outcome.last_epoch, 0);
    assert!(outcome.metrics.no_train.is_some());
    let run = RunFolder::open(&run_dir).unwrap();
    let segmentation = run.segmentation().unwrap();
    assert_eq!(segmentation.clusters, 8);
    let (_, epoch, _) = run.latest_network(&burn::tensor::Device::flex()).unwrap();
    assert_eq!(epoch, 0);
}

#[test]
fn overclustering_head_trains_alongside_the_main_one() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo_data(&folder.path().join("demo"), 8);
    let config = TrainConfig {
        overclusters: Some(20),
        ..demo_config(1)
    };
    let run = RunFolder::create(&folder.path().join("run"), &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let mut clustering_units = 0;
    let mut losses = Vec::new();
    let mut observer = |event: &TrainEvent| match event {
        TrainEvent::Phase {
            phase: picie::train::TrainPhase::Clustering,
            total,
            ..
        } => clustering_units = *total,
        TrainEvent::Step(progress) => losses.push(progress.loss.total),
        _ => {}
    };
    let outcome = Trainer::new(config, run, data, TrainControl::new(), false)
        .unwrap()
        .run(&ComputeDevice::cpu(), &mut observer)
        .unwrap();
    assert_eq!(outcome.last_epoch, 1);
    // Both views clustered with K and with K2.
    assert_eq!(clustering_units, 4);
    assert!(!losses.is_empty() && losses.iter().all(|loss| loss.is_finite() && *loss > 0.0));
}

/// A split and then a merge sent to a running trainer: each next epoch clusters from the
/// edited centroids, K follows, and the run folder records it so a resume continues alike.
#[test]
fn splits_and_merges_sent_to_the_trainer_change_the_next_epochs_clusters() {
    use picie::cluster::ClusterEdit;

    let folder = tempfile::tempdir().unwrap();
    let data = demo_data(&folder.path().join("demo"), 16);
    let run_dir = folder.path().join("run");
    let config = demo_config(3);
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let control = TrainControl::new();
    let mut trainer = Trainer::new(config, run, data, control.clone(), false).unwrap();
    let mut edited = Vec::new();
    let mut clusters_per_epoch = Vec::new();
    let mut largest = 0;
    let mut observer = |event: &TrainEvent| match event {
        TrainEvent::EpochFinished(record) if record.epoch == 1 => {
            control.request_edit(ClusterEdit::Split { cluster: largest });
        }
        TrainEvent::EpochFinished(record) if record.epoch == 2 => {
            control.request_edit(ClusterEdit::Merge {
                sources: vec![8],
                into: 3,
            });
        }
        TrainEvent::ClustersEdited { epoch, origin } => edited.push((*epoch, origin.clone())),
        TrainEvent::Clustered(statistics) => {
            clusters_per_epoch.push((statistics.epoch, statistics.pixel_share.len()));
            let shares = &statistics.pixel_share;
            largest = (0..shares.len())
                .max_by(|&a, &b| shares[a].total_cmp(&shares[b]))
                .unwrap_or(0);
        }
        TrainEvent::EditRefused(reason) => panic!("edit refused: {reason}"),
        _ => {}
    };
    let outcome = trainer.run(&ComputeDevice::cpu(), &mut observer).unwrap();
    assert_eq!(outcome.last_epoch, 3);
    assert_eq!(clusters_per_epoch, vec![(1, 8), (2, 9), (3, 8)]);
    assert_eq!(edited.len(), 2);
    let (epoch, split) = &edited[0];
    assert_eq!(*epoch, 2);
    assert_eq!(split.len(), 9);
    assert_eq!(split[8], None, "the new half of the split is new");
    assert_eq!(split[0], Some(0));
    assert!(
        split[..8]
            .iter()
            .enumerate()
            .all(|(id, from)| *from == Some(id))
    );
    let (epoch, merge) = &edited[1];
    assert_eq!(*epoch, 3);
    assert_eq!(merge, &(0..8).map(Some).collect::<Vec<_>>());
    // The run folder knows the new K.
    let run = RunFolder::open(&run_dir).unwrap();
    assert_eq!(run.config().unwrap().clusters, Some(8));
    assert_eq!(run.latest_checkpoint().unwrap().unwrap().1.clusters, 8);
}

/// The three BatchNorm modes of the clustering pass. `reference` (the authors') takes its
/// centroids from train-mode features, exactly as `train` does, and its pseudo-labels from a
/// second pass in eval mode, so its centroids equal `train`'s and its cluster sizes do not.
#[test]
fn batch_norm_modes_of_the_clustering_pass_take_centroids_and_labels_as_documented() {
    use picie::config::ClusterBatchNorm;
    let folder = tempfile::tempdir().unwrap();
    let data = demo_data(&folder.path().join("demo"), 8);
    let first_epoch = |mode: ClusterBatchNorm| {
        let config = TrainConfig {
            cluster_batch_norm: mode,
            ..demo_config(1)
        };
        let run_dir = folder.path().join(format!("{mode:?}"));
        let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
            .unwrap()
            .0;
        let mut clustered = None;
        let mut losses = Vec::new();
        let mut observer = |event: &TrainEvent| match event {
            TrainEvent::Clustered(statistics) => clustered = Some(statistics.clone()),
            TrainEvent::Step(progress) => losses.push(progress.loss.total),
            _ => {}
        };
        let outcome = Trainer::new(config, run, data.clone(), TrainControl::new(), false)
            .unwrap()
            .run(&ComputeDevice::cpu(), &mut observer)
            .unwrap();
        assert_eq!(outcome.last_epoch, 1, "{mode:?}");
        assert!(losses.iter().all(|loss| loss.is_finite()), "{mode:?}");
        clustered.expect("epoch 1 was clustered")
    };
    let train = first_epoch(ClusterBatchNorm::Train);
    let reference = first_epoch(ClusterBatchNorm::Reference);
    let eval = first_epoch(ClusterBatchNorm::Eval);
    assert_eq!(reference.centroids, train.centroids);
    assert_ne!(reference.pixel_share, train.pixel_share);
    assert_ne!(eval.centroids, train.centroids);
}

/// "Pixels that changed cluster since the last epoch" is over the same pixels of the same
/// images: with a network that does not move and k-means started from the last epoch's
/// centroids, few of them change (comparing the training views' own cells, which are new
/// random crops every epoch, said ~80 %).
#[test]
fn label_change_is_small_when_the_network_does_not_move() {
    let folder = tempfile::tempdir().unwrap();
    let data = demo_data(&folder.path().join("demo"), 16);
    let config = TrainConfig {
        weights: Some("../shared/weights/mobilenet_v2-imagenet.pth".into()),
        // Too small to change the network: only the clustering is new each epoch.
        learning_rate: 1e-12,
        kmeans_warm_start: true,
        preview_images: 4,
        feature_bank: false,
        ..demo_config(3)
    };
    let run_dir = folder.path().join("run");
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let mut trainer = Trainer::new(config, run, data, TrainControl::new(), false).unwrap();
    let mut changes = Vec::new();
    let mut observer = |event: &TrainEvent| {
        if let TrainEvent::Clustered(statistics) = event
            && statistics.epoch >= 1
        {
            changes.push(statistics.label_change);
        }
    };
    trainer.run(&ComputeDevice::cpu(), &mut observer).unwrap();
    println!("label change per epoch: {changes:?}");
    assert_eq!(changes.len(), 3);
    assert_eq!(
        changes[0], None,
        "nothing to compare with in the first epoch"
    );
    for change in &changes[1..] {
        let change = change.expect("a label change from the second epoch on");
        assert!(change < 0.25, "{:.1} % changed", change * 100.0);
    }
}
