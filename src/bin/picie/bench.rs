//! `picie bench`: figures for training steps, k-means, the forward pass and neighbour search.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use picie::bank::IndexConfig;
use picie::bench::{peak_memory_mib, time_forward, time_index, time_kmeans, time_training_step};
use picie::device::{DeviceChoice, select_device};

use crate::common::parse_backbones;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Exact k-nearest-neighbour queries in feature banks of random unit vectors (latency).
    Neighbours {
        /// Bank sizes in patches (comma-separated).
        #[arg(long, default_value = "10000,100000,1000000", value_delimiter = ',')]
        sizes: Vec<usize>,
        /// cpu: the CPU path only; gpu, wgpu or auto: also the device path.
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
        /// Neighbours per query.
        #[arg(short = 'k', long, default_value_t = 20)]
        k: usize,
        /// Timed queries per path and size.
        #[arg(long, default_value_t = 20)]
        queries: usize,
    },
    /// The inverted-file index of a feature bank against its exact search: build time,
    /// latency per query and recall@k, per number of lists probed.
    Index {
        /// Run folder whose bank is indexed.
        #[arg(long)]
        run: Option<PathBuf>,
        /// Without --run: a bank of this many random unit vectors (for latency: random vectors
        /// have no clusters, the worst case for recall).
        #[arg(long, default_value_t = 10_000_000)]
        patches: usize,
        /// Lists probed per query (comma-separated settings; default: the window's setting).
        #[arg(long, value_delimiter = ',')]
        probes: Vec<usize>,
        /// Coarse lists (default: about sqrt(patches) / 4).
        #[arg(long)]
        lists: Option<usize>,
        /// Neighbours per query.
        #[arg(short = 'k', long, default_value_t = 20)]
        k: usize,
        /// Queries (patches spread evenly over the bank).
        #[arg(long, default_value_t = 200)]
        queries: usize,
    },
    /// PiCIE training steps on random data (images/s).
    Train {
        /// resnet18, mobilenet_v2, or all.
        #[arg(long, default_value = "all")]
        backbone: String,
        /// auto, gpu, cpu, wgpu or remote:ws://HOST:PORT.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// Input side in pixels.
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// Images per step.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Timed steps after one warm-up step.
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
    /// k-means on random unit vectors (point-iterations/s).
    Kmeans {
        /// Number of points.
        #[arg(long, default_value_t = 1_000_000)]
        points: usize,
        /// Clusters (comma-separated for several runs).
        #[arg(long, default_value = "27,100", value_delimiter = ',')]
        clusters: Vec<usize>,
        /// Lloyd iterations.
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// auto, gpu, cpu or wgpu.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// Points per chunk of a full pass on a device (default: k-means' own).
        #[arg(long)]
        chunk: Option<usize>,
    },
    /// Forward time of backbone + FPN on a random batch.
    Forward {
        /// resnet18, mobilenet_v2, or all.
        #[arg(long, default_value = "all")]
        backbone: String,
        /// auto, gpu, cpu or wgpu.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
        /// Input side in pixels.
        #[arg(long, default_value_t = 320)]
        size: usize,
        /// Batch size.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed runs after one warm-up run.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Weights file (default: the downloaded ImageNet file, else random init).
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

fn bench_forward(
    backbone: &str,
    device: DeviceChoice,
    size: usize,
    batch: usize,
    runs: usize,
    weights: Option<PathBuf>,
) -> Result<()> {
    let kinds = parse_backbones(backbone)?;
    let compute = select_device(&device)?;
    println!("device: {}", compute.description);
    for kind in kinds {
        let timing = time_forward(kind, weights.as_deref(), &compute, batch, size, runs)
            .with_context(|| format!("benchmarking {}", kind.display_name()))?;
        println!("{timing}");
    }
    if let Some(peak) = peak_memory_mib() {
        println!("peak resident memory: {peak:.0} MiB");
    }
    Ok(())
}

fn bench_neighbours(sizes: &[usize], device: DeviceChoice, k: usize, queries: usize) -> Result<()> {
    let compute = (device != DeviceChoice::Cpu)
        .then(|| select_device(&device))
        .transpose()?;
    println!(
        "CPU path: {} rayon threads{}",
        rayon::current_num_threads(),
        compute
            .as_ref()
            .map(|compute| format!("; device path: {}", compute.description))
            .unwrap_or_default()
    );
    for &size in sizes {
        let timing = picie::bench::time_neighbours(
            size,
            picie::model::FEATURE_DIM,
            k,
            queries,
            compute.as_ref().map(|compute| &compute.device),
        )?;
        println!("{timing}");
        if let Some(peak) = peak_memory_mib() {
            println!("  peak resident memory so far: {peak:.0} MiB");
        }
    }
    Ok(())
}

fn bench_index(
    run: Option<PathBuf>,
    patches: usize,
    probes: Vec<usize>,
    lists: Option<usize>,
    k: usize,
    queries: usize,
) -> Result<()> {
    let bank = match &run {
        Some(run_dir) => picie::bank::FeatureBank::load(run_dir)?,
        None => picie::bench::synthetic_bank(patches, picie::model::FEATURE_DIM, 0)?,
    };
    let mut config = IndexConfig::for_patches(bank.len());
    if let Some(lists) = lists {
        config.lists = lists.max(1);
    }
    let probes = if probes.is_empty() {
        vec![config.probes]
    } else {
        probes
    };
    println!(
        "{} ({} rayon threads)",
        match &run {
            Some(run_dir) => format!("bank of {}", run_dir.display()),
            None => "random unit vectors".to_owned(),
        },
        rayon::current_num_threads()
    );
    print!("{}", time_index(&bank, &config, &probes, k, queries)?);
    if let Some(peak) = peak_memory_mib() {
        println!("peak resident memory: {peak:.0} MiB");
    }
    Ok(())
}

/// `picie bench ...`.
pub(crate) fn run(which: BenchCommand) -> Result<()> {
    match which {
        BenchCommand::Neighbours {
            sizes,
            device,
            k,
            queries,
        } => bench_neighbours(&sizes, device, k, queries),
        BenchCommand::Index {
            run,
            patches,
            probes,
            lists,
            k,
            queries,
        } => bench_index(run, patches, probes, lists, k, queries),
        BenchCommand::Train {
            backbone,
            device,
            size,
            batch,
            steps,
        } => {
            let compute = select_device(&device)?;
            println!("device: {}", compute.description);
            for kind in parse_backbones(&backbone)? {
                println!("{}", time_training_step(kind, &compute, batch, size, steps));
            }
            if let Some(peak) = peak_memory_mib() {
                println!("peak resident memory: {peak:.0} MiB");
            }
            Ok(())
        }
        BenchCommand::Kmeans {
            points,
            clusters,
            iterations,
            device,
            chunk,
        } => {
            let compute = select_device(&device)?;
            println!("device: {}", compute.description);
            for k in clusters {
                let timing = time_kmeans(points, 128, k, iterations, chunk, &compute)?;
                println!(
                    "k-means {points} x 128, K = {k}, {iterations} iterations: {:.2} s ({:.2e} point-iterations/s)",
                    timing.seconds, timing.throughput
                );
                println!(
                    "  k-means++ {:.2} s, first pass {:.3} s, later passes {:.1} ms each (median)",
                    timing.init_seconds,
                    timing.first_pass_seconds,
                    timing.later_pass_seconds * 1e3
                );
            }
            if let Some(peak) = peak_memory_mib() {
                println!("peak resident memory: {peak:.0} MiB");
            }
            Ok(())
        }
        BenchCommand::Forward {
            backbone,
            device,
            size,
            batch,
            runs,
            weights,
        } => bench_forward(&backbone, device, size, batch, runs, weights),
    }
}
