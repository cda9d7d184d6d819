//! Benchmarks that print figures: shared by the `picie bench` subcommand and `benches/`.
//! Speed is measured here, never asserted in tests.

use std::time::Instant;

use crate::bank::{BankError, BankInfo, FeatureBank};
use crate::device::ComputeDevice;
use crate::model::{BackboneKind, WeightsError, build_network, images_to_tensor};

/// Timings of the network's forward pass on one backend.
#[derive(Debug, Clone)]
pub struct ForwardTiming {
    /// The backbone measured (with the FPN).
    pub backbone: BackboneKind,
    /// Images per batch.
    pub batch: usize,
    /// Input side in pixels.
    pub size: usize,
    /// The first run, which includes kernel compilation on wgpu.
    pub warm_up_seconds: f64,
    /// Median of the timed runs.
    pub median_seconds: f64,
    /// Fastest timed run.
    pub min_seconds: f64,
    /// Number of timed runs.
    pub runs: usize,
}

impl ForwardTiming {
    /// Images per second at the median.
    pub fn images_per_second(&self) -> f64 {
        self.batch as f64 / self.median_seconds
    }
}

impl std::fmt::Display for ForwardTiming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} + FPN, {}x3x{}x{}: median {:.1} ms, min {:.1} ms over {} runs ({:.2} images/s; warm-up {:.1} ms)",
            self.backbone.display_name(),
            self.batch,
            self.size,
            self.size,
            self.median_seconds * 1e3,
            self.min_seconds * 1e3,
            self.runs,
            self.images_per_second(),
            self.warm_up_seconds * 1e3
        )
    }
}

/// Times `runs` forward passes (after one warm-up) of backbone + FPN on a constant batch.
pub fn time_forward(
    backbone: BackboneKind,
    weights: Option<&std::path::Path>,
    device: &ComputeDevice,
    batch: usize,
    size: usize,
    runs: usize,
) -> Result<ForwardTiming, WeightsError> {
    let (net, _) = build_network(backbone, weights, 0, &device.device)?;
    let pixels = vec![128u8; size * size * 3];
    let images: Vec<&[u8]> = (0..batch).map(|_| pixels.as_slice()).collect();
    let input = images_to_tensor(&images, size, &device.device);
    let mut timings = Vec::with_capacity(runs);
    let mut warm_up_seconds = 0.0;
    for run in 0..=runs {
        let started = Instant::now();
        // Reading the result back waits for the device to finish.
        crate::parallel::on_pool_thread(|| {
            let _ = net.forward(input.clone()).into_data();
        });
        let seconds = started.elapsed().as_secs_f64();
        if run == 0 {
            warm_up_seconds = seconds;
        } else {
            timings.push(seconds);
        }
    }
    timings.sort_by(f64::total_cmp);
    Ok(ForwardTiming {
        backbone,
        batch,
        size,
        warm_up_seconds,
        median_seconds: timings.get(timings.len() / 2).copied().unwrap_or(f64::NAN),
        min_seconds: timings.first().copied().unwrap_or(f64::NAN),
        runs,
    })
}

/// Resident memory of this process now, in MiB (Linux; `None` elsewhere).
pub fn current_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Peak resident memory of this process in MiB (Linux; `None` elsewhere).
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Throughput of full PiCIE training steps (two views, four loss terms, backward, Adam).
#[derive(Debug, Clone)]
pub struct TrainStepTiming {
    /// The backbone.
    pub backbone: BackboneKind,
    /// Images per step.
    pub batch: usize,
    /// Input side.
    pub size: usize,
    /// Median seconds per step after the warm-up step.
    pub median_seconds: f64,
    /// The first step (kernel compilation on wgpu).
    pub warm_up_seconds: f64,
    /// Timed steps.
    pub steps: usize,
}

impl std::fmt::Display for TrainStepTiming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} + FPN training step, batch {} at {}x{}: median {:.2} s ({:.2} images/s) over {} steps; warm-up {:.1} s",
            self.backbone.display_name(),
            self.batch,
            self.size,
            self.size,
            self.median_seconds,
            self.batch as f64 / self.median_seconds,
            self.steps,
            self.warm_up_seconds
        )
    }
}

/// Times PiCIE training steps on random data: both views through the network, G on view 2's
/// features, the four-term loss against random unit centroids (K = 27), backward and Adam.
pub fn time_training_step(
    backbone: BackboneKind,
    device: &ComputeDevice,
    batch: usize,
    size: usize,
    steps: usize,
) -> TrainStepTiming {
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use burn::tensor::{Distribution, Int, Tensor};

    use crate::data::views::{GeometricParams, geometric_on_features};
    use crate::loss::picie_loss;
    use crate::model::{FEATURE_STRIDE, PicieNet};

    const CLUSTERS: usize = 27;
    let training_device = device.device.clone().autodiff();
    device.device.seed(0);
    let mut network = PicieNet::new(backbone, &device.device)
        .fork(&training_device)
        .train();
    // PyTorch's epsilon, as the training it is compared with.
    let mut optimizer = crate::train::FusedAdam::new(1e-8).init();
    let grid = size / FEATURE_STRIDE;
    let geometric: Vec<GeometricParams> = (0..batch)
        .map(|index| GeometricParams {
            x0: index % (grid / 4).max(1),
            y0: 0,
            side: grid * 3 / 4,
            flip: index % 2 == 0,
        })
        .collect();
    let centroids = |seed_shift: f64| {
        let values = Tensor::<2>::random(
            [CLUSTERS, crate::model::FEATURE_DIM],
            Distribution::Normal(seed_shift, 1.0),
            &training_device,
        );
        let norm = values.clone().square().sum_dim(1).sqrt();
        values / norm
    };
    let (mu_first, mu_second) = (centroids(0.0), centroids(0.1));
    let labels = || {
        Tensor::<3, Int>::random(
            [batch, grid, grid],
            Distribution::Uniform(0.0, CLUSTERS as f64),
            &training_device,
        )
    };
    let mut timings = Vec::with_capacity(steps);
    let mut warm_up_seconds = 0.0;
    for step in 0..=steps {
        let view = || {
            Tensor::<4>::random(
                [batch, 3, size, size],
                Distribution::Normal(0.0, 1.0),
                &training_device,
            )
        };
        let started = Instant::now();
        // As the trainer runs its steps.
        crate::parallel::on_pool_thread(|| {
            let features_first = network.forward(view());
            let features_second = geometric_on_features(network.forward(view()), &geometric);
            let loss = picie_loss(
                features_first,
                features_second,
                mu_first.clone(),
                mu_second.clone(),
                labels(),
                labels(),
                None,
                None,
            );
            let gradients = GradientsParams::from_grads(loss.total.backward(), &network);
            network = optimizer.step(1e-4, network.clone(), gradients);
            // Reading a value waits for the device.
            let _ = loss.terms();
        });
        let seconds = started.elapsed().as_secs_f64();
        if step == 0 {
            warm_up_seconds = seconds;
        } else {
            timings.push(seconds);
        }
    }
    timings.sort_by(f64::total_cmp);
    TrainStepTiming {
        backbone,
        batch,
        size,
        median_seconds: timings.get(timings.len() / 2).copied().unwrap_or(f64::NAN),
        warm_up_seconds,
        steps,
    }
}

/// Where the time of one k-means run went.
#[derive(Debug, Clone)]
pub struct KMeansTiming {
    /// The whole run: initialisation and every iteration.
    pub seconds: f64,
    /// Point-iterations per second over the whole run.
    pub throughput: f64,
    /// k-means++ on its sample (on the host).
    pub init_seconds: f64,
    /// The first Lloyd pass, with (on a device) the upload of the points it keeps there.
    pub first_pass_seconds: f64,
    /// Median of the later passes, each with its one read-back of the totals.
    pub later_pass_seconds: f64,
}

/// Times k-means (Lloyd, all points, after one untimed warm-up iteration) on random unit
/// vectors, a device's passes in chunks of `chunk_points` (the default when `None`).
pub fn time_kmeans(
    points: usize,
    dim: usize,
    clusters: usize,
    iterations: usize,
    chunk_points: Option<usize>,
    device: &ComputeDevice,
) -> Result<KMeansTiming, crate::cluster::ClusterError> {
    use rand::{Rng, SeedableRng};

    use crate::cluster::{FeatureStore, KMeansConfig, KMeansMode, init_plus_plus, kmeans_with};

    let mut store = FeatureStore::in_memory(dim)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut row = vec![0f32; dim];
    let mut chunk = Vec::with_capacity(65_536 * dim);
    for index in 0..points {
        for value in row.iter_mut() {
            *value = rng.random::<f32>() - 0.5;
        }
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        chunk.extend(row.iter().map(|v| v / norm));
        if chunk.len() == 65_536 * dim || index + 1 == points {
            store.push_slice(&chunk)?;
            chunk.clear();
        }
    }
    let mut config = KMeansConfig::new(clusters)
        .with_iterations(iterations)
        .with_mode(KMeansMode::Full);
    if let Some(chunk_points) = chunk_points {
        config = config.with_device_pass_points(chunk_points);
    }
    // One untimed iteration first: on a GPU the first pass compiles and autotunes its kernels
    // (tens of seconds on a new machine, then cached), which is not the k-means being timed.
    kmeans_with(
        &store,
        &config.clone().with_iterations(1),
        None,
        &device.device,
        &mut |_| {},
    )?;
    let started = Instant::now();
    let init = init_plus_plus(&store, 0..points, clusters, config.init_sample, config.seed)?;
    let init_seconds = started.elapsed().as_secs_f64();
    let mut pass_ends = vec![started.elapsed().as_secs_f64()];
    kmeans_with(&store, &config, Some(init), &device.device, &mut |_| {
        pass_ends.push(started.elapsed().as_secs_f64());
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut passes: Vec<f64> = pass_ends.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let first_pass_seconds = passes.first().copied().unwrap_or(f64::NAN);
    let later = passes.split_off(1.min(passes.len()));
    let mut later = later;
    later.sort_by(f64::total_cmp);
    Ok(KMeansTiming {
        seconds,
        throughput: (points * iterations) as f64 / seconds,
        init_seconds,
        first_pass_seconds,
        later_pass_seconds: later.get(later.len() / 2).copied().unwrap_or(f64::NAN),
    })
}

/// Query latency of exact nearest-neighbour search in a feature bank.
#[derive(Debug, Clone)]
pub struct NeighbourTiming {
    /// Patches in the bank.
    pub patches: usize,
    /// Feature dimension.
    pub dim: usize,
    /// Neighbours per query.
    pub k: usize,
    /// Timed queries per path.
    pub queries: usize,
    /// Bytes of the stored (f16) features.
    pub bank_bytes: usize,
    /// Median seconds per query of the CPU path ([`FeatureBank::nearest`]).
    pub cpu_median_seconds: f64,
    /// Seconds to upload the bank to the device, when a device was given.
    pub upload_seconds: Option<f64>,
    /// Median seconds per query of the [`crate::bank::DeviceBank`] path (after one warm-up).
    pub device_median_seconds: Option<f64>,
    /// Whether the device path returned exactly the CPU path's neighbours for every query.
    pub device_agrees: Option<bool>,
}

impl std::fmt::Display for NeighbourTiming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} patches x {} ({:.0} MiB f16), k = {}: CPU median {:.2} ms/query",
            self.patches,
            self.dim,
            self.bank_bytes as f64 / (1 << 20) as f64,
            self.k,
            self.cpu_median_seconds * 1e3
        )?;
        if let (Some(upload), Some(median)) = (self.upload_seconds, self.device_median_seconds) {
            write!(
                formatter,
                "; device median {:.2} ms/query (upload {:.2} s{})",
                median * 1e3,
                upload,
                match self.device_agrees {
                    Some(true) => ", same neighbours as the CPU",
                    Some(false) => ", NEIGHBOURS DIFFER from the CPU",
                    None => "",
                }
            )?;
        }
        write!(formatter, " over {} queries", self.queries)
    }
}

/// A bank of `patches` random unit vectors (seeded), laid out as images of `grid²` patches
/// with the largest of 100, 50, 20, 10, 5, 4, 2, 1 for `grid` whose square divides `patches`.
pub fn synthetic_bank(patches: usize, dim: usize, seed: u64) -> Result<FeatureBank, BankError> {
    use half::f16;
    use half::slice::HalfFloatSliceExt;
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;

    let grid = [100, 50, 20, 10, 5, 4, 2, 1]
        .into_iter()
        .find(|grid| patches.is_multiple_of(grid * grid))
        .unwrap_or(1);
    let info = BankInfo {
        dim,
        patch: 8,
        input_size: (grid * 8) as u32,
        base_size: (grid * 8) as u32,
        grid,
        epoch: 0,
        names: (0..patches / (grid * grid))
            .map(|index| format!("synthetic-{index:07}.png"))
            .collect(),
    };
    // Generated straight into f16 in parallel pieces (each seeded by its index), so a bank of
    // 10^6 patches costs its 256 MB and no f32 copy.
    const PIECE_ROWS: usize = 4096;
    let mut values = vec![f16::ZERO; patches * dim];
    values
        .par_chunks_mut(PIECE_ROWS * dim.max(1))
        .enumerate()
        .for_each(|(piece, out)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ ((piece as u64) << 20));
            let mut row = vec![0f32; dim];
            for out_row in out.chunks_mut(dim.max(1)) {
                for value in row.iter_mut() {
                    *value = rng.random::<f32>() - 0.5;
                }
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|value| *value /= norm);
                out_row.convert_from_f32_slice(&row);
            }
        });
    FeatureBank::from_f16(info, values)
}

/// Times exact k-nearest-neighbour queries (random bank rows as queries) on a synthetic bank
/// of `patches` unit vectors: the CPU path and, with `device`, a [`crate::bank::DeviceBank`].
pub fn time_neighbours(
    patches: usize,
    dim: usize,
    k: usize,
    queries: usize,
    device: Option<&burn::tensor::Device>,
) -> Result<NeighbourTiming, BankError> {
    use rand::{Rng, SeedableRng};

    let bank = synthetic_bank(patches, dim, 0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let queries = queries.max(1);
    let picks: Vec<Vec<f32>> = (0..queries)
        .map(|_| bank.feature(rng.random_range(0..patches.max(1))))
        .collect();
    let median = |mut timings: Vec<f64>| {
        timings.sort_by(f64::total_cmp);
        timings.get(timings.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut cpu_results = Vec::with_capacity(queries);
    let mut cpu_timings = Vec::with_capacity(queries);
    let _ = bank.nearest(&picks[0], k);
    for query in &picks {
        let started = Instant::now();
        cpu_results.push(bank.nearest(query, k));
        cpu_timings.push(started.elapsed().as_secs_f64());
    }
    let (mut upload_seconds, mut device_median_seconds, mut device_agrees) = (None, None, None);
    if let Some(device) = device {
        let started = Instant::now();
        let on_device = bank.to_device(device);
        // The first query waits for the upload to finish and compiles the kernels.
        let warm_up = on_device.try_nearest(&picks[0], k)?;
        upload_seconds = Some(started.elapsed().as_secs_f64());
        let mut agrees = warm_up == cpu_results[0];
        let mut timings = Vec::with_capacity(queries);
        for (query, expected) in picks.iter().zip(&cpu_results) {
            let started = Instant::now();
            let found = on_device.try_nearest(query, k)?;
            timings.push(started.elapsed().as_secs_f64());
            agrees &= &found == expected;
        }
        device_median_seconds = Some(median(timings));
        device_agrees = Some(agrees);
    }
    Ok(NeighbourTiming {
        patches: bank.len(),
        dim,
        k,
        queries,
        bank_bytes: bank.len() * dim * 2,
        cpu_median_seconds: median(cpu_timings),
        upload_seconds,
        device_median_seconds,
        device_agrees,
    })
}

/// Latency and recall of the inverted-file index ([`crate::bank::BankIndex`]) against the
/// exact search, on one bank.
#[derive(Debug, Clone)]
pub struct IndexTiming {
    /// Patches in the bank.
    pub patches: usize,
    /// Coarse lists.
    pub lists: usize,
    /// Patches in the largest list.
    pub largest_list: usize,
    /// Seconds to build the index.
    pub build_seconds: f64,
    /// Median seconds per exact query.
    pub exact_median_seconds: f64,
    /// Per probes setting: (probes, median seconds per query, recall@k against the exact
    /// search: the share of the exact `k` neighbours the index also returned).
    pub probed: Vec<(usize, f64, f64)>,
    /// Neighbours per query.
    pub k: usize,
    /// Queries.
    pub queries: usize,
}

impl std::fmt::Display for IndexTiming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            formatter,
            "{} patches, {} lists (largest {}), built in {:.1} s; exact search median {:.2} ms/query; k = {}, {} queries",
            self.patches,
            self.lists,
            self.largest_list,
            self.build_seconds,
            self.exact_median_seconds * 1e3,
            self.k,
            self.queries
        )?;
        for (probes, seconds, recall) in &self.probed {
            writeln!(
                formatter,
                "  {probes:>5} probes: median {:.2} ms/query, recall@{} {:.3}",
                seconds * 1e3,
                self.k,
                recall
            )?;
        }
        Ok(())
    }
}

/// Times the index of `bank` against its exact search: queries are the features of `queries`
/// patches spread evenly over the bank (so every image region is asked about), and each
/// probes setting is scored by recall@k against the exact answer.
pub fn time_index(
    bank: &FeatureBank,
    config: &crate::bank::IndexConfig,
    probes: &[usize],
    k: usize,
    queries: usize,
) -> Result<IndexTiming, BankError> {
    let median = |mut timings: Vec<f64>| {
        timings.sort_by(f64::total_cmp);
        timings.get(timings.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let queries = queries.clamp(1, bank.len().max(1));
    let stride = (bank.len() / queries).max(1);
    let picks: Vec<Vec<f32>> = (0..queries)
        .map(|query| bank.feature((query * stride + stride / 2).min(bank.len() - 1)))
        .collect();
    let started = Instant::now();
    let index = crate::bank::BankIndex::build(bank, config)?;
    let build_seconds = started.elapsed().as_secs_f64();
    let mut exact = Vec::with_capacity(queries);
    let mut timings = Vec::with_capacity(queries);
    for query in &picks {
        let started = Instant::now();
        exact.push(bank.nearest(query, k));
        timings.push(started.elapsed().as_secs_f64());
    }
    let exact_median_seconds = median(timings);
    let mut probed = Vec::new();
    for &setting in probes {
        let index = index.clone().with_probes(setting);
        let (mut found, mut wanted) = (0usize, 0usize);
        let mut timings = Vec::with_capacity(queries);
        for (query, expected) in picks.iter().zip(&exact) {
            let started = Instant::now();
            let answer = index.nearest(bank, query, k);
            timings.push(started.elapsed().as_secs_f64());
            found += answer.iter().filter(|hit| expected.contains(hit)).count();
            wanted += expected.len();
        }
        probed.push((
            index.probes(),
            median(timings),
            found as f64 / wanted.max(1) as f64,
        ));
    }
    Ok(IndexTiming {
        patches: bank.len(),
        lists: index.lists(),
        largest_list: index.largest_list(),
        build_seconds,
        exact_median_seconds,
        probed,
        k,
        queries,
    })
}
