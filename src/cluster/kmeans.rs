//! Spherical k-means streamed over a [`FeatureStore`] on the training device.
//!
//! As faiss with `spherical=True` (the reference): assignment by largest inner product,
//! centroids re-normalised to unit length after each update. Each pass uploads one chunk of
//! points at a time and keeps only `[chunk, K]` similarities, so memory does not grow with N.

use std::ops::Range;

use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::device_pass::{
    HostTotals, PassTotals, chunk_totals, cluster_id_row, lloyd_pass, read_totals, resident_chunks,
};
use super::init::{init_plus_plus, init_random};
use super::store::FeatureStore;
use super::{Centroids, ClusterError, check_clusters, host, normalize};

/// Points per chunk of a mini-batch pass (each chunk is one running-mean update) unless
/// configured otherwise.
pub const DEFAULT_CHUNK_POINTS: usize = 16_384;
/// Points per chunk of a full Lloyd pass on a device unless configured otherwise. On an H200,
/// 10^6 points x 128, a pass took 3.9 ms (K = 27) and 6.2 ms (K = 100) in chunks of 262,144
/// points against 12.7 and 14.0 ms in chunks of 16,384 (fewer, larger kernels).
pub const DEFAULT_DEVICE_PASS_POINTS: usize = 262_144;
/// Largest f32 matrix of a device pass, in bytes: WebGPU's default limit on one storage
/// buffer (128 MiB), which every adapter offers. Chunks shrink below
/// [`KMeansConfig::device_pass_points`] when `D` or `K` would exceed it.
const DEVICE_BUFFER_BYTES: usize = 128 << 20;
/// Lloyd iterations, as the reference's faiss call (`niter=20`).
pub const DEFAULT_ITERATIONS: usize = 20;
/// Points sampled for the k-means++ initialisation.
pub const DEFAULT_INIT_SAMPLE: usize = 50_000;
/// [`KMeansMode::Auto`] runs full Lloyd passes up to this many points, mini-batch above.
pub const AUTO_FULL_MAX_POINTS: usize = 4_000_000;
/// Points [`KMeansMode::Auto`] clusters with full k-means before its mini-batch pass.
pub const AUTO_SEED_POINTS: usize = 1 << 20;

/// How far (relative to a unit centroid) the two halves of a split cluster are pushed apart
/// when an empty cluster is re-seeded; far above f32 rounding, small against cluster spread.
const SPLIT_EPSILON: f32 = 1e-2;

/// Which k-means variant runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KMeansMode {
    /// [`KMeansMode::Full`] up to [`AUTO_FULL_MAX_POINTS`] points, else
    /// [`KMeansMode::MiniBatch`] seeded with [`AUTO_SEED_POINTS`] points.
    #[default]
    Auto,
    /// Lloyd iterations over all points, exactly like the reference.
    Full,
    /// The paper's variant: full k-means on the first `seed_points` points, then one pass over
    /// the rest in chunks, each updating the centroids by running means
    /// `mu_k += (n_k / count_k) * (mean_of_chunk_k - mu_k)`.
    MiniBatch {
        /// Points clustered with full k-means first (at least K are used).
        seed_points: usize,
    },
}

impl KMeansMode {
    /// The mode that runs for `points` points: [`KMeansMode::Auto`] resolved, others as they are.
    pub fn resolve(self, points: usize) -> Self {
        match self {
            Self::Auto if points <= AUTO_FULL_MAX_POINTS => Self::Full,
            Self::Auto => Self::MiniBatch {
                seed_points: AUTO_SEED_POINTS,
            },
            other => other,
        }
    }
}

/// How the first centroids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KMeansInit {
    /// K distinct points drawn uniformly, as faiss (the reference's k-means) does.
    Random,
    /// Greedy k-means++ on a sample of [`KMeansConfig::init_sample`] points: spreads the first
    /// centroids out, so well-separated groups are rarely merged.
    #[default]
    PlusPlus,
}

/// Settings of one k-means run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KMeansConfig {
    /// Number of clusters K.
    pub clusters: usize,
    /// Lloyd iterations (of the seed phase in mini-batch mode).
    pub iterations: usize,
    /// Seed of the initialisation sample, k-means++ and empty-cluster re-seeding.
    pub seed: u64,
    /// Points per chunk of a mini-batch pass (one running-mean update each).
    pub chunk_points: usize,
    /// Points per chunk of a full Lloyd pass on a device (no effect on the host path, which
    /// streams the store itself); lowered to keep every matrix within 128 MiB.
    #[serde(default = "default_device_pass_points")]
    pub device_pass_points: usize,
    /// Full or mini-batch.
    pub mode: KMeansMode,
    /// Points sampled (without replacement) for k-means++.
    pub init_sample: usize,
    /// How the first centroids are chosen.
    pub init: KMeansInit,
    /// Independent runs from different initial centroids; the one with the lowest inertia
    /// (highest mean similarity) is kept. At least 1.
    pub restarts: usize,
}

/// [`DEFAULT_DEVICE_PASS_POINTS`], for settings written before the field existed.
fn default_device_pass_points() -> usize {
    DEFAULT_DEVICE_PASS_POINTS
}

impl KMeansConfig {
    /// Defaults for `clusters` clusters: 20 iterations, seed 0, automatic mode.
    pub fn new(clusters: usize) -> Self {
        Self {
            clusters,
            iterations: DEFAULT_ITERATIONS,
            seed: 0,
            chunk_points: DEFAULT_CHUNK_POINTS,
            device_pass_points: DEFAULT_DEVICE_PASS_POINTS,
            mode: KMeansMode::Auto,
            init_sample: DEFAULT_INIT_SAMPLE,
            init: KMeansInit::PlusPlus,
            restarts: 1,
        }
    }

    /// With initialisation `init`.
    pub fn with_init(mut self, init: KMeansInit) -> Self {
        self.init = init;
        self
    }

    /// With `restarts` runs (at least 1), keeping the lowest inertia.
    pub fn with_restarts(mut self, restarts: usize) -> Self {
        self.restarts = restarts.max(1);
        self
    }

    /// With `iterations` Lloyd iterations.
    pub fn with_iterations(mut self, iterations: usize) -> Self {
        self.iterations = iterations;
        self
    }

    /// With seed `seed`.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// With mini-batch chunks of `chunk_points` points.
    pub fn with_chunk_points(mut self, chunk_points: usize) -> Self {
        self.chunk_points = chunk_points;
        self
    }

    /// With chunks of `device_pass_points` points in full passes on a device.
    pub fn with_device_pass_points(mut self, device_pass_points: usize) -> Self {
        self.device_pass_points = device_pass_points;
        self
    }

    /// Points per chunk of a full pass on a device over `dim`-dimensional points:
    /// [`KMeansConfig::device_pass_points`], fewer when a `[chunk, D]` or `[chunk, K]` f32
    /// matrix would pass 128 MiB; at least 1.
    pub fn device_pass_chunk(&self, dim: usize) -> usize {
        let widest_row = dim.max(self.clusters).max(1) * std::mem::size_of::<f32>();
        self.device_pass_points
            .min(DEVICE_BUFFER_BYTES / widest_row)
            .max(1)
    }

    /// With mode `mode`.
    pub fn with_mode(mut self, mode: KMeansMode) -> Self {
        self.mode = mode;
        self
    }

    /// With a k-means++ sample of `init_sample` points.
    pub fn with_init_sample(mut self, init_sample: usize) -> Self {
        self.init_sample = init_sample;
        self
    }
}

/// What a step of k-means was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A Lloyd iteration (assignment of every point, then centroid update).
    Lloyd,
    /// The mini-batch pass over the points after the seed points.
    MiniBatchPass,
}

/// Statistics of one k-means step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationStats {
    /// What the step was.
    pub kind: StepKind,
    /// Points the step assigned.
    pub points: usize,
    /// Mean inner product of each point with the centroid it was assigned to (before this
    /// step's update); for unit vectors `1 - mean_similarity` is half the mean squared
    /// distance, i.e. the inertia per point.
    pub mean_similarity: f64,
    /// Points assigned to each cluster in this step.
    pub counts: Vec<u64>,
    /// Clusters that got no points and were re-seeded by splitting the largest cluster.
    pub reseeded: Vec<usize>,
}

/// The result of [`kmeans`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansResult {
    /// Unit-length centroids.
    pub centroids: Centroids,
    /// The mode that ran ([`KMeansMode::Auto`] resolved).
    pub mode: KMeansMode,
    /// One entry per step, in order.
    pub steps: Vec<IterationStats>,
}

/// One Lloyd iteration: the updated centroids and what the assignment saw.
#[derive(Debug, Clone, PartialEq)]
pub struct LloydStep {
    /// Centroids after the update (and any re-seeding).
    pub centroids: Centroids,
    /// Statistics of the assignment.
    pub stats: IterationStats,
}

/// Spherical k-means over every row of `store`, initialised as the config says.
pub fn kmeans(
    store: &FeatureStore,
    config: &KMeansConfig,
    device: &Device,
) -> Result<KMeansResult, ClusterError> {
    kmeans_with(store, config, None, device, &mut |_| {})
}

/// [`kmeans`] from the given initial centroids (the config's initialisation when `None`),
/// calling `on_step` after every step (for progress displays). With given centroids there is
/// one run whatever [`KMeansConfig::restarts`] says.
pub fn kmeans_with(
    store: &FeatureStore,
    config: &KMeansConfig,
    init: Option<Centroids>,
    device: &Device,
    on_step: &mut dyn FnMut(&IterationStats),
) -> Result<KMeansResult, ClusterError> {
    if init.is_some() || config.restarts <= 1 {
        return kmeans_once(store, config, init, device, on_step);
    }
    let mut best: Option<(f64, KMeansResult)> = None;
    for restart in 0..config.restarts as u64 {
        // Restart 0 is the single run's seed, so one restart reproduces a plain run.
        let seeded = KMeansConfig {
            seed: config
                .seed
                .wrapping_add(restart.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ..config.clone()
        };
        let result = kmeans_once(store, &seeded, None, device, on_step)?;
        let similarity = result
            .steps
            .iter()
            .rev()
            .find(|step| step.kind == StepKind::Lloyd)
            .map_or(f64::NEG_INFINITY, |step| step.mean_similarity);
        if best
            .as_ref()
            .is_none_or(|(best_similarity, _)| similarity > *best_similarity)
        {
            best = Some((similarity, result));
        }
    }
    Ok(best.expect("at least two restarts ran").1)
}

fn kmeans_once(
    store: &FeatureStore,
    config: &KMeansConfig,
    init: Option<Centroids>,
    device: &Device,
    on_step: &mut dyn FnMut(&IterationStats),
) -> Result<KMeansResult, ClusterError> {
    let clusters = config.clusters;
    check_clusters(clusters)?;
    let points = store.len();
    if points < clusters {
        return Err(ClusterError::TooFewPoints { clusters, points });
    }
    let mode = config.mode.resolve(points);
    let seed_end = match mode {
        KMeansMode::MiniBatch { seed_points } => seed_points.clamp(clusters, points),
        _ => points,
    };
    let mut centroids = match init {
        Some(init) => {
            check_centroids(&init, clusters, store.dim())?;
            init
        }
        None => match config.init {
            KMeansInit::PlusPlus => init_plus_plus(
                store,
                0..seed_end,
                clusters,
                config.init_sample,
                config.seed,
            )?,
            KMeansInit::Random => init_random(store, 0..seed_end, clusters, config.seed)?,
        },
    };
    // A stream apart from the initialisation's, so changing one does not shift the other.
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5DEE_CE66_D1CE_4E5B);
    let mut steps = Vec::with_capacity(config.iterations + 1);
    let mut last_counts = None;
    let pass_chunk = config.device_pass_chunk(store.dim());
    let resident = resident_chunks(store, 0..seed_end, config, pass_chunk, device)?;
    for _ in 0..config.iterations {
        let totals = lloyd_pass(
            store,
            0..seed_end,
            &centroids,
            pass_chunk,
            device,
            resident.as_deref(),
        )?;
        let step = update(&totals, &centroids, &mut rng);
        on_step(&step.stats);
        last_counts = Some(step.split_counts);
        centroids = step.centroids;
        steps.push(step.stats);
    }
    if seed_end < points {
        let counts = match last_counts {
            Some(counts) => counts,
            // No seed iterations: the seed points' counts under the initial centroids.
            None => {
                lloyd_pass(
                    store,
                    0..seed_end,
                    &centroids,
                    pass_chunk,
                    device,
                    resident.as_deref(),
                )?
                .counts
            }
        };
        let (updated, stats) = minibatch_pass(
            store,
            seed_end..points,
            centroids,
            counts,
            config.chunk_points,
            device,
        )?;
        on_step(&stats);
        centroids = updated;
        steps.push(stats);
    }
    Ok(KMeansResult {
        centroids,
        mode,
        steps,
    })
}

/// One Lloyd iteration over every row of `store` from `centroids`; `seed` seeds the
/// perturbation used if a cluster comes out empty.
pub fn lloyd_step(
    store: &FeatureStore,
    centroids: &Centroids,
    chunk_points: usize,
    seed: u64,
    device: &Device,
) -> Result<LloydStep, ClusterError> {
    check_centroids(centroids, centroids.clusters, store.dim())?;
    let totals = lloyd_pass(store, 0..store.len(), centroids, chunk_points, device, None)?;
    let step = update(&totals, centroids, &mut ChaCha8Rng::seed_from_u64(seed));
    Ok(LloydStep {
        centroids: step.centroids,
        stats: step.stats,
    })
}

fn check_centroids(centroids: &Centroids, clusters: usize, dim: usize) -> Result<(), ClusterError> {
    check_clusters(centroids.clusters)?;
    if centroids.dim != dim {
        return Err(ClusterError::DimensionMismatch {
            expected: dim,
            got: centroids.dim,
        });
    }
    if centroids.clusters != clusters || centroids.values.len() != clusters * dim {
        return Err(ClusterError::InvalidCentroids(format!(
            "{} centroids ({} values) where {clusters} of dimension {dim} were expected",
            centroids.clusters,
            centroids.values.len()
        )));
    }
    Ok(())
}

/// The consecutive chunks of `range`, `chunk_points` (at least 1) long except the last.
pub(super) fn chunks(
    range: Range<usize>,
    chunk_points: usize,
) -> impl Iterator<Item = Range<usize>> {
    let step = chunk_points.max(1);
    range
        .clone()
        .step_by(step)
        .map(move |start| start..(start + step).min(range.end))
}

/// The outcome of a centroid update.
struct Update {
    centroids: Centroids,
    stats: IterationStats,
    /// Counts after re-seeding split the largest clusters (what the mini-batch pass starts
    /// from).
    split_counts: Vec<u64>,
}

/// The spherical update: each centroid becomes the normalised sum of its points. Empty
/// clusters are re-seeded by splitting the currently largest cluster (as faiss does): its
/// centroid `c` and the empty one become `normalise(c -+ eps * d)` for a random direction `d`
/// orthogonal to `c`, so the next assignment divides its points between the two. Chosen over
/// "move to the farthest member" because it needs no extra pass over the data.
fn update(totals: &PassTotals, old: &Centroids, rng: &mut ChaCha8Rng) -> Update {
    let clusters = old.clusters;
    let dim = old.dim;
    let mut centroids = old.clone();
    let mut empty = Vec::new();
    for k in 0..clusters {
        if totals.counts[k] == 0 {
            empty.push(k);
            continue;
        }
        let sum = &totals.sums[k * dim..(k + 1) * dim];
        let norm: f64 = sum.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        // Members that cancel out exactly leave no direction, and non-finite features no
        // usable one: keep the old centroid.
        if norm.is_finite() && norm.sqrt() > 1e-12 {
            let row = centroids.row_mut(k);
            row.copy_from_slice(sum);
            normalize(row);
        }
    }
    let mut split_counts = totals.counts.clone();
    for &target in &empty {
        let largest = (0..clusters)
            .max_by_key(|&k| (split_counts[k], std::cmp::Reverse(k)))
            .unwrap_or(0);
        let centre = centroids.row(largest).to_vec();
        let mut direction: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        let along: f32 = direction.iter().zip(&centre).map(|(d, c)| d * c).sum();
        for (d, c) in direction.iter_mut().zip(&centre) {
            *d -= along * c;
        }
        normalize(&mut direction);
        for (sign, k) in [(1.0f32, target), (-1.0, largest)] {
            let row = centroids.row_mut(k);
            for ((value, c), d) in row.iter_mut().zip(&centre).zip(&direction) {
                *value = c + sign * SPLIT_EPSILON * d;
            }
            normalize(row);
        }
        let half = split_counts[largest] / 2;
        split_counts[target] = half;
        split_counts[largest] -= half;
    }
    let stats = IterationStats {
        kind: StepKind::Lloyd,
        points: totals.points,
        mean_similarity: mean(totals.similarity_sum, totals.points),
        counts: totals.counts.clone(),
        reseeded: empty,
    };
    Update {
        centroids,
        stats,
        split_counts,
    }
}

fn mean(sum: f64, points: usize) -> f64 {
    if points == 0 {
        0.0
    } else {
        sum / points as f64
    }
}

/// The mini-batch pass: each chunk is assigned to the current (normalised) running means,
/// then `mu_k += (n_k / count_k) * (mean_of_chunk_k - mu_k)` with `count_k` the points seen
/// by cluster `k` so far. Clusters without points keep their centroid (no re-seeding: that
/// would need another pass).
fn minibatch_pass(
    store: &FeatureStore,
    range: Range<usize>,
    start: Centroids,
    mut seen: Vec<u64>,
    chunk_points: usize,
    device: &Device,
) -> Result<(Centroids, IterationStats), ClusterError> {
    let clusters = start.clusters;
    let dim = start.dim;
    let cluster_ids = cluster_id_row(clusters, device);
    let mut running = start.values.clone();
    let mut current = start;
    let mut pass_counts = vec![0u64; clusters];
    let mut similarity_sum = 0.0;
    for chunk in chunks(range.clone(), chunk_points) {
        // The next chunk's assignment depends on this update: read back every chunk.
        let (sums, counts) = if host::runs_on_host(device) {
            let totals = host::totals(store, chunk, &current)?;
            similarity_sum += totals.similarity_sum;
            (totals.sums, totals.counts)
        } else {
            // [K, D] -> [D, K]
            let centroids_t = current.to_tensor(device).transpose();
            let totals = chunk_totals(
                store.chunk(chunk, device)?,
                centroids_t,
                cluster_ids.clone(),
            );
            let HostTotals {
                sums,
                counts,
                similarity,
            } = read_totals(totals.sums, totals.counts, totals.similarity)?;
            similarity_sum += similarity.iter().map(|&s| f64::from(s)).sum::<f64>();
            (sums, counts)
        };
        for k in 0..clusters {
            let n = counts[k];
            if n == 0 {
                continue;
            }
            pass_counts[k] += n;
            seen[k] += n;
            let rate = n as f64 / seen[k] as f64;
            let mu = &mut running[k * dim..(k + 1) * dim];
            for (value, &sum) in mu.iter_mut().zip(&sums[k * dim..(k + 1) * dim]) {
                let chunk_mean = f64::from(sum) / n as f64;
                *value = (f64::from(*value) + rate * (chunk_mean - f64::from(*value))) as f32;
            }
        }
        // Assignment is by inner product, so the running means are compared normalised.
        current = Centroids::new(running.clone(), clusters, dim)?;
    }
    let stats = IterationStats {
        kind: StepKind::MiniBatchPass,
        points: range.len(),
        mean_similarity: mean(similarity_sum, range.len()),
        counts: pass_counts,
        reseeded: Vec::new(),
    };
    Ok((current, stats))
}
