//! K-means on the Flex CPU device: recovery of synthetic blobs, agreement of one Lloyd
//! iteration with a plain f64 reference, determinism, label width and empty-cluster re-seeding.

use burn::tensor::Device;
use half::f16;
use picie::cluster::{
    self, Centroids, ClusterError, FeatureStore, KMeansConfig, KMeansInit, KMeansMode, PixelLabels,
    SpillConfig, StepKind,
};
use picie::model::FEATURE_DIM;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = FEATURE_DIM;

/// A standard normal draw (Box-Muller), to keep the test free of extra crates.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

fn unit(values: &mut [f64]) {
    let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
    values.iter_mut().for_each(|v| *v /= norm);
}

/// A random unit vector rounded to f16, as the store keeps it (so CPU references see exactly
/// the values the device sees).
fn random_unit(rng: &mut ChaCha8Rng, dim: usize) -> Vec<f32> {
    let mut values: Vec<f64> = (0..dim).map(|_| normal(rng)).collect();
    unit(&mut values);
    values
        .into_iter()
        .map(|v| f16::from_f64(v).to_f32())
        .collect()
}

/// `blobs * per_blob` unit vectors around random centres (noise `spread` per coordinate),
/// shuffled, with their blob index.
fn blobs(blobs: usize, per_blob: usize, spread: f64, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..blobs).map(|_| random_unit(&mut rng, DIM)).collect();
    let mut order: Vec<usize> = (0..blobs * per_blob).map(|i| i % blobs).collect();
    // Fisher-Yates, so every prefix of the data holds every blob (mini-batch seeds on one).
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let mut data = Vec::with_capacity(order.len() * DIM);
    for &blob in &order {
        let mut point: Vec<f64> = centres[blob]
            .iter()
            .map(|&c| f64::from(c) + spread * normal(&mut rng))
            .collect();
        unit(&mut point);
        data.extend(point.into_iter().map(|v| v as f32));
    }
    (data, order)
}

/// Adjusted Rand index of two labellings (Hubert and Arabie).
fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
    assert_eq!(a.len(), b.len());
    let rows = a.iter().max().map_or(0, |m| m + 1);
    let columns = b.iter().max().map_or(0, |m| m + 1);
    let mut table = vec![0u64; rows * columns];
    for (&x, &y) in a.iter().zip(b) {
        table[x * columns + y] += 1;
    }
    let pairs = |n: u64| (n * n.saturating_sub(1)) as f64 / 2.0;
    let index: f64 = table.iter().map(|&n| pairs(n)).sum();
    let row_pairs: f64 = (0..rows)
        .map(|x| pairs((0..columns).map(|y| table[x * columns + y]).sum()))
        .sum();
    let column_pairs: f64 = (0..columns)
        .map(|y| pairs((0..rows).map(|x| table[x * columns + y]).sum()))
        .sum();
    let expected = row_pairs * column_pairs / pairs(a.len() as u64);
    let maximum = (row_pairs + column_pairs) / 2.0;
    (index - expected) / (maximum - expected)
}

fn labels_of(labels: &PixelLabels) -> Vec<usize> {
    labels.iter().collect()
}

fn store_of(data: &[f32], spill: Option<SpillConfig>) -> FeatureStore {
    let mut store = FeatureStore::new(DIM, spill).unwrap();
    // Pushed in pieces, as training pushes batch by batch.
    for piece in data.chunks(DIM * 1000) {
        store.push_slice(piece).unwrap();
    }
    store
}

#[test]
fn adjusted_rand_index_sanity() {
    assert!((adjusted_rand_index(&[0, 0, 1, 1], &[1, 1, 0, 0]) - 1.0).abs() < 1e-12);
    assert!(adjusted_rand_index(&[0, 0, 1, 1], &[0, 1, 0, 1]) < 0.0);
}

#[test]
fn full_kmeans_recovers_blobs() {
    let device = Device::flex();
    let (data, truth) = blobs(8, 2000, 0.02, 11);
    let store = store_of(&data, None);
    let config = KMeansConfig::new(8)
        .with_mode(KMeansMode::Full)
        .with_seed(3)
        .with_chunk_points(4096);
    let result = cluster::kmeans(&store, &config, &device).unwrap();
    assert_eq!(result.mode, KMeansMode::Full);
    assert_eq!(result.steps.len(), config.iterations);
    assert!(result.steps.iter().all(|step| step.kind == StepKind::Lloyd));
    for k in 0..8 {
        let norm: f32 = result.centroids.row(k).iter().map(|v| v * v).sum();
        assert!(
            (norm - 1.0).abs() < 1e-5,
            "centroid {k} has squared norm {norm}"
        );
    }
    let assignment = cluster::assign(&store, &result.centroids, &device).unwrap();
    let ari = adjusted_rand_index(&labels_of(&assignment.labels), &truth);
    assert!(ari >= 0.99, "ARI {ari}");
    assert_eq!(assignment.counts.iter().sum::<u64>(), 16_000);
    assert!(assignment.mean_similarity > 0.9);
    assert!(
        assignment
            .compactness
            .iter()
            .all(|c| c.is_some_and(|c| c > 0.9))
    );
    let last = result.steps.last().unwrap();
    assert!((last.mean_similarity - assignment.mean_similarity).abs() < 1e-3);
}

#[test]
fn minibatch_kmeans_recovers_blobs_from_a_spilled_store() {
    let device = Device::flex();
    let folder = tempfile::tempdir().unwrap();
    let (data, truth) = blobs(8, 2000, 0.02, 12);
    // 16000 x 128 f16 = 4 MiB; a 1 MiB budget spills most of it.
    let store = store_of(&data, Some(SpillConfig::new(folder.path(), 1 << 20)));
    assert!(store.spilled_rows() > 0, "the store should have spilled");
    let spill_file = store.spill_path().unwrap().to_path_buf();
    assert!(spill_file.starts_with(folder.path()));
    let config = KMeansConfig::new(8)
        .with_mode(KMeansMode::MiniBatch { seed_points: 4000 })
        .with_seed(5)
        .with_chunk_points(2048);
    let result = cluster::kmeans(&store, &config, &device).unwrap();
    let pass = result.steps.last().unwrap();
    assert_eq!(pass.kind, StepKind::MiniBatchPass);
    assert_eq!(pass.points, 12_000);
    assert_eq!(result.steps[0].points, 4000);
    let assignment = cluster::assign(&store, &result.centroids, &device).unwrap();
    let ari = adjusted_rand_index(&labels_of(&assignment.labels), &truth);
    assert!(ari >= 0.99, "ARI {ari}");
    drop(store);
    assert!(!spill_file.exists(), "the spill file should be removed");
}

#[test]
fn one_lloyd_iteration_matches_a_cpu_reference() {
    let device = Device::flex();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (points, clusters) = (500, 5);
    let data: Vec<f32> = (0..points)
        .flat_map(|_| random_unit(&mut rng, DIM))
        .collect();
    let init: Vec<f32> = (0..clusters)
        .flat_map(|_| random_unit(&mut rng, DIM))
        .collect();
    let init = Centroids::new(init, clusters, DIM).unwrap();

    // The reference in f64: label = argmax inner product, centroid = normalised member sum.
    let mut expected_labels = Vec::new();
    let mut sums = vec![0f64; clusters * DIM];
    for point in data.chunks(DIM) {
        let similarity = |k: usize| -> f64 {
            point
                .iter()
                .zip(init.row(k))
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum()
        };
        let best = (0..clusters)
            .max_by(|&a, &b| similarity(a).total_cmp(&similarity(b)))
            .unwrap();
        expected_labels.push(best);
        for (sum, &value) in sums[best * DIM..(best + 1) * DIM].iter_mut().zip(point) {
            *sum += f64::from(value);
        }
    }
    for k in 0..clusters {
        unit(&mut sums[k * DIM..(k + 1) * DIM]);
    }

    let store = store_of(&data, None);
    // Chunks of 128 so the pass really accumulates over several chunks.
    let assignment = cluster::assign_chunked(&store, &init, 128, &device).unwrap();
    assert_eq!(labels_of(&assignment.labels), expected_labels);
    let step = cluster::lloyd_step(&store, &init, 128, 0, &device).unwrap();
    assert!(step.stats.reseeded.is_empty(), "no cluster should be empty");
    assert_eq!(step.stats.counts, assignment.counts);
    for (got, want) in step.centroids.values.iter().zip(&sums) {
        assert!(
            (f64::from(*got) - want).abs() < 1e-4,
            "centroid value {got} != {want}"
        );
    }
}

#[test]
fn same_seed_gives_identical_centroids() {
    let device = Device::flex();
    let (data, _) = blobs(6, 500, 0.1, 31);
    let store = store_of(&data, None);
    let config = KMeansConfig::new(6)
        .with_seed(9)
        .with_iterations(5)
        .with_chunk_points(1000)
        .with_init_sample(1000);
    let first = cluster::kmeans(&store, &config, &device).unwrap();
    let second = cluster::kmeans(&store, &config, &device).unwrap();
    assert_eq!(first.centroids, second.centroids);
    assert_eq!(first.steps, second.steps);
    let init_a = cluster::init_plus_plus(&store, 0..store.len(), 6, 1000, 4).unwrap();
    let init_b = cluster::init_plus_plus(&store, 0..store.len(), 6, 1000, 4).unwrap();
    assert_eq!(init_a, init_b);
}

#[test]
fn labels_are_u8_up_to_255_clusters_and_u16_beyond() {
    let device = Device::flex();
    let (data, _) = blobs(5, 100, 0.1, 41);
    let store = store_of(&data, None);
    let config = KMeansConfig::new(5).with_iterations(2);
    let result = cluster::kmeans(&store, &config, &device).unwrap();
    let assignment = cluster::assign(&store, &result.centroids, &device).unwrap();
    assert!(matches!(assignment.labels, PixelLabels::U8(_)));
    assert_eq!(assignment.labels.len(), 500);

    let wide = cluster::init_plus_plus(&store, 0..500, 300, 500, 1).unwrap();
    let assignment = cluster::assign(&store, &wide, &device).unwrap();
    let PixelLabels::U16(labels) = &assignment.labels else {
        panic!("300 clusters need u16 labels");
    };
    assert_eq!(labels.len(), 500);
    assert!(labels.iter().all(|&label| label < 300));
}

#[test]
fn an_empty_cluster_is_reseeded_by_splitting_the_largest() {
    let device = Device::flex();
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let a = random_unit(&mut rng, DIM);
    let b = random_unit(&mut rng, DIM);
    let mut data = Vec::new();
    for i in 0..500 {
        let centre = if i % 5 < 3 { &a } else { &b }; // 300 near a, 200 near b
        let mut point: Vec<f64> = centre
            .iter()
            .map(|&c| f64::from(c) + 0.02 * normal(&mut rng))
            .collect();
        unit(&mut point);
        data.extend(point.into_iter().map(|v| v as f32));
    }
    // Centroid 2 points away from both blobs: no point picks it.
    let away: Vec<f32> = a.iter().zip(&b).map(|(x, y)| -(x + y)).collect();
    let init = Centroids::new([a.clone(), b.clone(), away].concat(), 3, DIM).unwrap();
    let store = store_of(&data, None);

    let step = cluster::lloyd_step(&store, &init, 256, 0, &device).unwrap();
    assert_eq!(step.stats.counts, vec![300, 200, 0]);
    assert_eq!(step.stats.reseeded, vec![2]);
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
    let centroids = &step.centroids;
    // Centroid 2 is now a perturbed copy of the largest cluster's (cluster 0) centroid.
    assert!(dot(centroids.row(2), centroids.row(0)) > 0.99);
    assert!(dot(centroids.row(2), &a) > 0.99);
    assert_ne!(centroids.row(2), centroids.row(0));

    // Further iterations share blob a between clusters 0 and 2.
    let config = KMeansConfig::new(3)
        .with_mode(KMeansMode::Full)
        .with_iterations(3);
    let result = cluster::kmeans_with(&store, &config, Some(init), &device, &mut |_| {}).unwrap();
    assert_eq!(result.steps[0].reseeded, vec![2]);
    let last = result.steps.last().unwrap();
    assert!(last.reseeded.is_empty());
    assert!(
        last.counts.iter().all(|&count| count > 0),
        "{:?}",
        last.counts
    );
    assert_eq!(last.counts[1], 200);
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let device = Device::flex();
    let store = store_of(&[0.5; DIM * 3], None);
    let too_many = cluster::kmeans(&store, &KMeansConfig::new(4), &device);
    assert!(matches!(too_many, Err(ClusterError::TooFewPoints { .. })));
    let none = cluster::kmeans(&store, &KMeansConfig::new(0), &device);
    assert!(matches!(none, Err(ClusterError::NoClusters)));
    let other_dim = Centroids::new(vec![1.0; 4], 1, 4).unwrap();
    assert!(matches!(
        cluster::assign(&store, &other_dim, &device),
        Err(ClusterError::DimensionMismatch { .. })
    ));
    assert!(FeatureStore::new(0, None).is_err());
    let empty = FeatureStore::new(DIM, None).unwrap();
    let assignment = cluster::assign(
        &empty,
        &Centroids::new(vec![1.0; DIM], 1, DIM).unwrap(),
        &device,
    )
    .unwrap();
    assert!(assignment.labels.is_empty());
}

#[test]
fn auto_mode_resolves_by_size() {
    assert_eq!(KMeansMode::Auto.resolve(1000), KMeansMode::Full);
    assert_eq!(
        KMeansMode::Auto.resolve(cluster::AUTO_FULL_MAX_POINTS + 1),
        KMeansMode::MiniBatch {
            seed_points: cluster::AUTO_SEED_POINTS
        }
    );
}

/// Timing of the reference-sized run (750k x 128, K = 11, 20 iterations). Ignored by default;
/// run with `cargo test --release --test kmeans -- --ignored --nocapture timing`.
#[test]
#[ignore]
fn timing_750k_points_k11() {
    let device = Device::flex();
    let points = 750_000;
    let (data, _) = blobs(11, points / 11 + 1, 0.1, 61);
    let start = std::time::Instant::now();
    let store = store_of(&data[..points * DIM], None);
    let filled = start.elapsed();
    let config = KMeansConfig::new(11)
        .with_mode(KMeansMode::Full)
        .with_seed(1);
    let start = std::time::Instant::now();
    let result = cluster::kmeans(&store, &config, &device).unwrap();
    let clustered = start.elapsed();
    let start = std::time::Instant::now();
    let assignment = cluster::assign(&store, &result.centroids, &device).unwrap();
    let assigned = start.elapsed();
    let minibatch = KMeansConfig::new(11)
        .with_mode(KMeansMode::MiniBatch {
            seed_points: 100_000,
        })
        .with_seed(1);
    let start = std::time::Instant::now();
    cluster::kmeans(&store, &minibatch, &device).unwrap();
    let minibatched = start.elapsed();
    println!(
        "750k x {DIM}, K=11: fill {filled:?}, full k-means (20 it) {clustered:?}, assign {assigned:?}, \
         mini-batch (100k seed) {minibatched:?}; mean similarity {:.4}",
        assignment.mean_similarity
    );
}

/// Final inertia of a run, as `1 - mean similarity` of its last Lloyd step.
fn final_inertia(result: &cluster::KMeansResult) -> f64 {
    1.0 - result.steps.last().unwrap().mean_similarity
}

#[test]
fn random_initialisation_is_seeded_and_restarts_keep_the_lowest_inertia() {
    let device = Device::flex();
    // Overlapping blobs and few iterations: runs from different random starts end apart.
    let (data, _) = blobs(12, 300, 0.08, 5);
    let store = store_of(&data, None);
    let config = KMeansConfig::new(12)
        .with_mode(KMeansMode::Full)
        .with_init(KMeansInit::Random)
        .with_iterations(3)
        .with_seed(9);
    let once = cluster::kmeans(&store, &config, &device).unwrap();
    let again = cluster::kmeans(&store, &config, &device).unwrap();
    assert_eq!(once.centroids, again.centroids, "one seed, one result");
    let other_seed = cluster::kmeans(&store, &config.clone().with_seed(10), &device).unwrap();
    assert_ne!(once.centroids, other_seed.centroids);

    let restarted = cluster::kmeans(&store, &config.clone().with_restarts(6), &device).unwrap();
    // Restart 0 is the single run, so the best of six is never worse than it...
    assert!(final_inertia(&restarted) <= final_inertia(&once));
    // ...and no worse than any of the five other starts run on their own.
    for restart in 1..6u64 {
        let seed = 9u64.wrapping_add(restart.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let single = cluster::kmeans(&store, &config.clone().with_seed(seed), &device).unwrap();
        assert!(
            final_inertia(&restarted) <= final_inertia(&single),
            "restart {restart}: {} > {}",
            final_inertia(&restarted),
            final_inertia(&single)
        );
    }
}

#[test]
fn device_passes_keep_every_matrix_within_128_mib() {
    let limit = 128usize << 20;
    let usual = KMeansConfig::new(27);
    assert_eq!(
        usual.device_pass_chunk(128),
        cluster::DEFAULT_DEVICE_PASS_POINTS
    );
    assert!(usual.device_pass_chunk(128) * 128 * 4 <= limit);
    // Many clusters: the [chunk, K] similarities bound the chunk.
    let many = KMeansConfig::new(1000);
    let chunk = many.device_pass_chunk(128);
    assert!(chunk * 1000 * 4 <= limit && chunk > 10_000, "chunk {chunk}");
    assert_eq!(usual.with_device_pass_points(0).device_pass_chunk(128), 1);
}
