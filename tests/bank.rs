//! The feature bank on the CPU backend: exact search against an f64 brute force, the device
//! path, cluster members, a bank built by training, save/load, and the neighbours report.

use std::sync::Arc;

use burn::tensor::Device;
use picie::bank::{
    BankError, BankInfo, FeatureBank, MemberOrder, Neighbour, NeighboursRequest,
    contact_sheet_size, write_contact_sheet, write_neighbours,
};
use picie::config::TrainConfig;
use picie::data::{DemoOptions, write_demo_dataset};
use picie::device::{ComputeDevice, DeviceChoice};
use picie::model::BackboneKind;
use picie::train::{ExistingRun, NullObserver, RunFolder, TrainControl, Trainer, TrainingData};
use rand::{Rng, SeedableRng};

/// Similarities of the same f16 vectors in f32 and in f64 differ by about 1e-6.
const TOLERANCE: f64 = 1e-5;

fn random_bank(rows: usize, dim: usize, seed: u64) -> FeatureBank {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * dim)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    bank_of(values, dim)
}

fn bank_of(values: Vec<f32>, dim: usize) -> FeatureBank {
    let rows = values.len() / dim;
    let info = BankInfo {
        dim,
        patch: 8,
        input_size: 8,
        base_size: 16,
        grid: 1,
        epoch: 0,
        names: (0..rows).map(|index| format!("image-{index}")).collect(),
    };
    FeatureBank::from_features(info, &values).unwrap()
}

fn random_query(dim: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..dim).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Cosine of every stored feature with `query`, in f64.
fn reference_similarities(bank: &FeatureBank, query: &[f32]) -> Vec<f64> {
    let norm = query
        .iter()
        .map(|&v| f64::from(v).powi(2))
        .sum::<f64>()
        .sqrt();
    (0..bank.len())
        .map(|patch| {
            let feature = bank.feature(patch);
            let feature_norm = feature
                .iter()
                .map(|&v| f64::from(v).powi(2))
                .sum::<f64>()
                .sqrt();
            let dot: f64 = feature
                .iter()
                .zip(query)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            if feature_norm == 0.0 {
                0.0
            } else {
                dot / (norm * feature_norm)
            }
        })
        .collect()
}

/// The f64 brute force: every patch by similarity, ties to the lower index.
fn reference_order(similarities: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..similarities.len()).collect();
    order.sort_by(|&a, &b| similarities[b].total_cmp(&similarities[a]).then(a.cmp(&b)));
    order
}

/// `got` is the exact top-k: right length, sorted, distinct, each similarity right, nothing
/// better left out; and exactly the reference's patches where no two similarities are close.
fn assert_exact_top_k(bank: &FeatureBank, query: &[f32], k: usize, got: &[Neighbour]) {
    let similarities = reference_similarities(bank, query);
    let order = reference_order(&similarities);
    let expected = k.min(bank.len());
    assert_eq!(got.len(), expected, "k = {k}, len = {}", bank.len());
    let mut seen = std::collections::HashSet::new();
    for (rank, hit) in got.iter().enumerate() {
        assert!(seen.insert(hit.patch), "patch {} twice", hit.patch);
        let exact = similarities[hit.patch];
        assert!(
            (f64::from(hit.similarity) - exact).abs() < TOLERANCE,
            "patch {}: {} vs {exact}",
            hit.patch,
            hit.similarity
        );
        if rank > 0 {
            let previous = &got[rank - 1];
            assert!(
                previous.similarity > hit.similarity
                    || (previous.similarity == hit.similarity && previous.patch < hit.patch),
                "not in rank order at {rank}"
            );
        }
    }
    if expected == 0 {
        return;
    }
    let kth = similarities[order[expected - 1]];
    for hit in got {
        assert!(similarities[hit.patch] >= kth - 2.0 * TOLERANCE);
    }
    // Nothing clearly better than the worst returned was left out.
    let worst = f64::from(got[expected - 1].similarity);
    for (patch, &similarity) in similarities.iter().enumerate() {
        if similarity > worst + 2.0 * TOLERANCE {
            assert!(
                seen.contains(&patch),
                "patch {patch} ({similarity}) missing"
            );
        }
    }
    let separated = order
        .windows(2)
        .take(expected)
        .all(|pair| similarities[pair[0]] - similarities[pair[1]] > 4.0 * TOLERANCE);
    if separated {
        let patches: Vec<usize> = got.iter().map(|hit| hit.patch).collect();
        assert_eq!(patches, order[..expected].to_vec());
    }
}

#[test]
fn nearest_is_exact_on_random_banks() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (rows, dim) in [(1, 3), (7, 5), (300, 16), (5000, 128)] {
        let bank = random_bank(rows, dim, rows as u64);
        for k in [1, 5, 20, rows, rows + 5] {
            let query = random_query(dim, &mut rng);
            let got = bank.nearest(&query, k);
            assert_exact_top_k(&bank, &query, k, &got);
        }
        assert!(bank.nearest(&random_query(dim, &mut rng), 0).is_empty());
    }
}

#[test]
fn device_path_returns_exactly_the_cpu_result() {
    let device = Device::flex();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    // 70 000 rows: two chunks of the device path.
    for (rows, dim) in [(7, 5), (1000, 32), (70_000, 16)] {
        let bank = random_bank(rows, dim, 100 + rows as u64);
        let on_device = bank.to_device(&device);
        assert_eq!(on_device.len(), rows);
        for k in [1, 10, rows + 1] {
            let query = random_query(dim, &mut rng);
            let cpu = bank.nearest(&query, k);
            assert_eq!(on_device.try_nearest(&query, k).unwrap(), cpu);
            assert_eq!(bank.nearest_on_device(&query, k, &device), cpu);
            if rows <= 1000 {
                assert_exact_top_k(&bank, &query, k, &cpu);
            }
        }
    }
}

#[test]
fn device_path_is_exact_when_the_best_patches_repeat_across_many_blocks() {
    // Three directions repeated over 3000 patches (12 of the device's blocks and a padded
    // one): every block ties for the best score, so the device must keep them all and the
    // lowest patch indices win, as on the CPU.
    let directions = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]];
    let values: Vec<f32> = (0..3000).flat_map(|row| directions[row % 3]).collect();
    let bank = bank_of(values, 3);
    let on_device = bank.to_device(&Device::flex());
    for (query, k) in [(vec![1.0, 0.0, 0.0], 5), (vec![0.5, 0.9, 0.0], 40)] {
        let cpu = bank.nearest(&query, k);
        assert_exact_top_k(&bank, &query, k, &cpu);
        assert_eq!(on_device.try_nearest(&query, k).unwrap(), cpu);
    }
}

#[test]
fn ties_go_to_the_lower_patch_on_both_paths() {
    let a = [1.0, 0.0, 0.0, 0.0];
    let b = [0.0, 1.0, 0.0, 0.0];
    let c = [0.6, 0.8, 0.0, 0.0];
    let d = [0.0, 0.0, 1.0, 0.0];
    // a at 1, 3, 4 and 6; b at 0 and 5.
    let rows = [b, a, c, a, a, b, a, d];
    let bank = bank_of(rows.concat(), 4);
    let device = Device::flex();
    let on_device = bank.to_device(&device);
    for query in [a.to_vec(), vec![2.0, 0.0, 0.0, 0.0]] {
        let patches = |hits: Vec<Neighbour>| hits.iter().map(|hit| hit.patch).collect::<Vec<_>>();
        assert_eq!(patches(bank.nearest(&query, 3)), vec![1, 3, 4]);
        assert_eq!(patches(on_device.nearest(&query, 3)), vec![1, 3, 4]);
        assert_eq!(patches(bank.nearest(&query, 5)), vec![1, 3, 4, 6, 2]);
        assert_eq!(patches(on_device.nearest(&query, 5)), vec![1, 3, 4, 6, 2]);
        // Then b, b and d at 0: lower index first.
        assert_eq!(
            patches(bank.nearest(&query, 100)),
            vec![1, 3, 4, 6, 2, 0, 5, 7]
        );
        let hits = bank.nearest(&query, 4);
        assert!(hits.iter().all(|hit| (hit.similarity - 1.0).abs() < 1e-6));
    }
}

/// The f64 nearest centroid of every patch (ties to the lower cluster) and its similarity.
fn reference_assignment(bank: &FeatureBank, centroids: &[f32], dim: usize) -> Vec<Vec<f64>> {
    centroids
        .chunks(dim)
        .map(|centroid| reference_similarities(bank, centroid))
        .collect()
}

#[test]
fn cluster_members_match_the_brute_force() {
    let dim = 8;
    let bank = random_bank(3000, dim, 21);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(22);
    let clusters = 5;
    let centroids: Vec<f32> = (0..clusters)
        .flat_map(|_| random_query(dim, &mut rng))
        .collect();
    let per_cluster = reference_assignment(&bank, &centroids, dim);
    let mut total = 0;
    for cluster in 0..clusters {
        let (all, members) =
            bank.cluster_members(&centroids, cluster, MemberOrder::Typical, 0, usize::MAX);
        assert_eq!(all.len(), members);
        total += members;
        for hit in &all {
            // Its nearest centroid by the brute force (up to rounding), and `assign` agrees.
            let best = (0..clusters)
                .map(|other| per_cluster[other][hit.patch])
                .fold(f64::MIN, f64::max);
            assert!(per_cluster[cluster][hit.patch] >= best - TOLERANCE);
            assert!(
                (f64::from(hit.similarity) - per_cluster[cluster][hit.patch]).abs() < TOLERANCE
            );
            assert_eq!(
                bank.assign(hit.patch, &centroids),
                (cluster, hit.similarity)
            );
        }
        assert!(all.windows(2).all(|pair| {
            pair[0].similarity > pair[1].similarity
                || (pair[0].similarity == pair[1].similarity && pair[0].patch < pair[1].patch)
        }));
        // Outliers: the same members, least similar first.
        let (outliers, count) =
            bank.cluster_members(&centroids, cluster, MemberOrder::Outliers, 0, usize::MAX);
        assert_eq!(count, members);
        let mut reversed = all.clone();
        reversed.sort_by(|a, b| {
            a.similarity
                .total_cmp(&b.similarity)
                .then(a.patch.cmp(&b.patch))
        });
        assert_eq!(outliers, reversed);
        // Pages put together give the whole list.
        let mut paged = Vec::new();
        for offset in (0..members + 7).step_by(7) {
            let (page, count) =
                bank.cluster_members(&centroids, cluster, MemberOrder::Typical, offset, 7);
            assert_eq!(count, members);
            paged.extend(page);
        }
        assert_eq!(paged, all);
    }
    assert_eq!(total, bank.len());
    assert_eq!(
        bank.cluster_members(&centroids, clusters, MemberOrder::Typical, 0, 10),
        (Vec::new(), 0)
    );
}

fn demo_data(folder: &std::path::Path, images: usize) -> (Arc<TrainingData>, std::path::PathBuf) {
    let summary = write_demo_dataset(
        folder,
        &DemoOptions {
            images,
            size: 128,
            seed: 5,
        },
    )
    .unwrap();
    let data = TrainingData::load(
        &summary.images_dir,
        Some(&summary.labels_dir),
        128,
        64,
        &|_, _| {},
    )
    .unwrap();
    (Arc::new(data), summary.images_dir)
}

fn demo_config() -> TrainConfig {
    TrainConfig {
        backbone: BackboneKind::MobilenetV2,
        device: DeviceChoice::Cpu,
        base_size: 128,
        input_size: 64,
        batch_size: 4,
        epochs: 0,
        kmeans_iterations: 5,
        preview_images: 0,
        seed: 3,
        ..TrainConfig::default()
    }
}

#[test]
fn a_trained_run_has_a_bank_that_saves_reloads_and_finds_itself() {
    let folder = tempfile::tempdir().unwrap();
    let (data, images_dir) = demo_data(&folder.path().join("demo"), 6);
    let run_dir = folder.path().join("run");
    let config = demo_config();
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    let missing = FeatureBank::load(&run_dir).unwrap_err();
    assert!(matches!(missing, BankError::Missing { .. }));
    assert!(
        missing.to_string().contains("picie bank --run"),
        "{missing}"
    );

    Trainer::new(config, run, Arc::clone(&data), TrainControl::new(), false)
        .unwrap()
        .run(&ComputeDevice::cpu(), &mut NullObserver)
        .unwrap();
    let bank = FeatureBank::load(&run_dir).unwrap();
    assert_eq!(bank.info.grid, 64 / 8);
    assert_eq!(bank.info.patch, 8);
    assert_eq!(bank.info.dim, picie::model::FEATURE_DIM);
    assert_eq!(bank.info.epoch, 0);
    assert_eq!(bank.info.names, data.names);
    assert_eq!(bank.len(), 6 * 8 * 8);

    // The same network builds the same bank.
    let device = Device::flex();
    let (network, epoch, _) = RunFolder::open(&run_dir)
        .unwrap()
        .latest_network(&device)
        .unwrap();
    let mut calls = 0;
    let rebuilt =
        picie::bank::build_bank(&network, &data, 8, epoch, &device, &mut |_, _| calls += 1)
            .unwrap();
    assert!(calls >= 2);
    assert_eq!(rebuilt.features_f16(), bank.features_f16());
    assert_eq!(rebuilt.info, bank.info);
    assert!(matches!(
        picie::bank::build_bank(&network, &data, 12, epoch, &device, &mut |_, _| {}),
        Err(BankError::Patch { .. })
    ));
    // A coarser bank: 16-pixel patches pool 4 x 4 feature cells.
    let coarse =
        picie::bank::build_bank(&network, &data, 16, epoch, &device, &mut |_, _| {}).unwrap();
    assert_eq!(coarse.info.grid, 4);
    assert_eq!(coarse.len(), 6 * 16);

    // Saved elsewhere and read back bit for bit; saving again replaces it.
    let copy_dir = folder.path().join("copy");
    bank.save(&copy_dir).unwrap();
    coarse.save(&copy_dir).unwrap();
    assert_eq!(FeatureBank::load(&copy_dir).unwrap().len(), coarse.len());
    bank.save(&copy_dir).unwrap();
    let reloaded = FeatureBank::load(&copy_dir).unwrap();
    assert_eq!(reloaded.info, bank.info);
    assert_eq!(reloaded.features_f16(), bank.features_f16());
    let leftovers: Vec<String> = std::fs::read_dir(&copy_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec!["bank".to_owned()]);

    for patch in 0..bank.len() {
        let (image, x, y) = bank.location(patch);
        assert!(image < 6 && x < 8 && y < 8);
        let (u, v) = ((x as f32 + 0.5) / 8.0, (y as f32 + 0.5) / 8.0);
        assert_eq!(bank.patch_at(image, u, v), Some(patch));
        let feature = bank.feature(patch);
        let norm: f32 = feature.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let top = bank.nearest(&feature, 1)[0];
        assert!(top.similarity > 0.9999, "{top:?}");
        // Itself, or an identical feature with a lower index (flat demo regions).
        assert!(top.patch == patch || bank.feature(top.patch) == feature);
    }

    // A damaged feature file is refused with a message that says to rebuild.
    let features = copy_dir.join("bank").join("features.f16");
    let bytes = std::fs::read(&features).unwrap();
    std::fs::write(&features, &bytes[..bytes.len() - 2]).unwrap();
    let error = FeatureBank::load(&copy_dir).unwrap_err();
    assert!(matches!(error, BankError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("rebuild"), "{error}");

    // The neighbours report: sheet, JSON, the query left out, CPU and device alike.
    let out = folder.path().join("neighbours");
    let request = NeighboursRequest {
        run_dir: run_dir.clone(),
        images_dir: images_dir.clone(),
        image: data.names[2].clone(),
        x: 70,
        y: 20,
        k: 5,
        out_dir: out.clone(),
        device: None,
    };
    let report = write_neighbours(&request).unwrap();
    assert_eq!(report.neighbours.len(), 5);
    assert_eq!(report.query.image, data.names[2]);
    // 128-pixel demo images, 8 patches a side: 16 original pixels a patch.
    assert_eq!(
        report.query.patch,
        bank.patch_at(2, 70.5 / 128.0, 20.5 / 128.0).unwrap()
    );
    assert_eq!(report.query.bounds, [64.0, 16.0, 16.0, 16.0]);
    assert_eq!((report.query.x, report.query.y), (72.0, 24.0));
    assert!(report.query.cluster.is_some());
    assert!(
        report
            .neighbours
            .iter()
            .all(|hit| hit.patch != report.query.patch)
    );
    assert_eq!(report.sheet_size, contact_sheet_size(6));
    let sheet = image::open(out.join("neighbours.png")).unwrap();
    assert_eq!((sheet.width(), sheet.height()), contact_sheet_size(6));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("neighbours.json")).unwrap())
            .unwrap();
    assert_eq!(json["neighbours"].as_array().unwrap().len(), 5);
    assert!(json["neighbours"][0]["similarity"].is_number());
    assert!(json["neighbours"][0]["box"].is_array());
    let on_device = write_neighbours(&NeighboursRequest {
        device: Some(device.clone()),
        out_dir: folder.path().join("neighbours-device"),
        ..request.clone()
    })
    .unwrap();
    assert_eq!(on_device.neighbours, report.neighbours);

    let outside = write_neighbours(&NeighboursRequest {
        x: 128,
        ..request.clone()
    })
    .unwrap_err();
    assert!(
        matches!(outside, BankError::OutsideCrop { .. }),
        "{outside}"
    );
    assert!(
        outside
            .to_string()
            .contains("outside the centre square crop")
    );
    let too_many = write_neighbours(&NeighboursRequest {
        k: 5000,
        ..request.clone()
    })
    .unwrap_err();
    assert!(matches!(too_many, BankError::Query(_)), "{too_many}");
    let unknown = write_neighbours(&NeighboursRequest {
        image: "no-such-image.png".into(),
        ..request
    })
    .unwrap_err();
    assert!(
        matches!(unknown, BankError::UnknownImage { .. }),
        "{unknown}"
    );
}

#[test]
fn an_epochs_bank_is_written_into_the_run_folder_as_it_is_computed_and_matches_a_rebuild() {
    let folder = tempfile::tempdir().unwrap();
    let (data, _) = demo_data(&folder.path().join("demo"), 6);
    let run_dir = folder.path().join("run");
    let config = TrainConfig {
        epochs: 1,
        ..demo_config()
    };
    let run = RunFolder::create(&run_dir, &config, ExistingRun::Refuse)
        .unwrap()
        .0;
    Trainer::new(config, run, Arc::clone(&data), TrainControl::new(), false)
        .unwrap()
        .run(&ComputeDevice::cpu(), &mut NullObserver)
        .unwrap();
    let bank = FeatureBank::load(&run_dir).unwrap();
    assert_eq!(bank.info.epoch, 1);
    let device = Device::flex();
    let (network, epoch, _) = RunFolder::open(&run_dir)
        .unwrap()
        .latest_network(&device)
        .unwrap();
    assert_eq!(epoch, 1);
    let rebuilt =
        picie::bank::build_bank(&network, &data, 8, epoch, &device, &mut |_, _| {}).unwrap();
    assert_eq!(rebuilt.info, bank.info);
    assert_eq!(rebuilt.features_f16(), bank.features_f16());
    // Nothing of the streamed folder, or of the bank it replaced, is left beside it.
    let hidden: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".bank"))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

#[test]
fn contact_sheet_has_the_expected_size() {
    let bank = random_bank(40, 4, 31);
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("sheet.png");
    let query = bank.feature(3);
    let hits: Vec<Neighbour> = bank.nearest(&query, 9).into_iter().skip(1).collect();
    let centroids = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    let mut requested = Vec::new();
    let size = write_contact_sheet(
        &bank,
        3,
        &hits,
        Some(&centroids),
        &mut |image| {
            requested.push(image);
            Ok(image::RgbImage::from_pixel(
                16,
                16,
                image::Rgb([image as u8 * 6, 100, 200]),
            ))
        },
        &path,
    )
    .unwrap();
    assert_eq!(size, contact_sheet_size(9));
    let written = image::open(&path).unwrap();
    assert_eq!((written.width(), written.height()), size);
    // Each image is asked for once.
    let mut unique = requested.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), requested.len());
}

#[test]
fn config_checks_the_bank_patch() {
    let config = demo_config();
    assert!(config.feature_bank);
    assert_eq!(config.bank_patch, 8);
    assert!(config.validate().is_ok());
    for patch in [0, 6, 12, 128] {
        let bad = TrainConfig {
            bank_patch: patch,
            ..demo_config()
        };
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("bank_patch"), "{error}");
        assert!(
            TrainConfig {
                feature_bank: false,
                ..bad
            }
            .validate()
            .is_ok()
        );
    }
    // Old config files without the fields get the defaults.
    let old: TrainConfig = serde_json::from_str(r#"{"epochs": 3}"#).unwrap();
    assert!(old.feature_bank);
    assert_eq!(old.bank_patch, 8);
}

/// 10^6 patches x 128 (256 MB of f16) through save, load and a query; slow, run by hand with
/// `cargo test --test bank -- --ignored`.
#[test]
#[ignore]
fn a_million_patch_bank_saves_loads_and_answers() {
    let bank = picie::bench::synthetic_bank(1_000_000, 128, 5).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    bank.save(folder.path()).unwrap();
    let saved = started.elapsed();
    let started = std::time::Instant::now();
    let loaded = FeatureBank::load(folder.path()).unwrap();
    let load = started.elapsed();
    assert_eq!(loaded.len(), 1_000_000);
    assert_eq!(loaded.features_f16(), bank.features_f16());
    let feature = loaded.feature(123_456);
    let top = loaded.nearest(&feature, 20);
    assert_eq!(top[0].patch, 123_456);
    println!("save {saved:?}, load {load:?}");
}
