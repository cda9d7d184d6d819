//! `picie`: the headless command line of PiCIE Explorer.

/// See `mimalloc` in Cargo.toml: faster training on the CPU backend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use picie::bench::{peak_memory_mib, time_forward, time_kmeans, time_training_step};
use picie::config::TrainConfig;
use picie::data::{BaseTransform, DemoOptions, ImageFolder, write_demo_dataset};
use picie::device::{DeviceChoice, list_adapters, select_device};
use picie::export::{
    ExportOptions, export_segmentations, mask_paths, score_mask_folder, segmenter_for_run,
};
use picie::labelmap::LabelMap;
use picie::model::BackboneKind;
use picie::segment::write_index_png;
use picie::train::{
    ExistingRun, RunFolder, TrainControl, TrainEvent, TrainObserver, TrainOutcome, TrainPhase,
    Trainer, TrainingData, evaluate_network,
};

/// PiCIE Explorer, headless: unsupervised semantic segmentation of a folder of images.
#[derive(Parser)]
#[command(name = "picie", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// File whose first line is the token of a `picie serve` server (for --device
    /// remote:ws://HOST:PORT, and for `picie serve` itself); default: $PICIE_REMOTE_TOKEN.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Train PiCIE on a folder of images into a run folder.
    Train(Box<TrainArgs>),
    /// Score a run's network on labelled images (fresh clustering, Hungarian matching), or
    /// score exported index masks (--masks) against the labels.
    Eval {
        /// Run folder written by `picie train` (not with --masks).
        #[arg(long)]
        run: Option<PathBuf>,
        /// Folder of index masks to score instead of a run: the `index` folder of
        /// `picie export` (255 = ignored, counted as wrong where labelled).
        #[arg(long)]
        masks: Option<PathBuf>,
        /// Folder of images.
        #[arg(long)]
        images: PathBuf,
        /// Folder of index-PNG labels (255 = ignore) with classes.txt.
        #[arg(long)]
        labels: PathBuf,
        /// Print {"acc", "miou", "per_class_iou"} as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// auto, gpu, cpu, wgpu or remote:ws://HOST:PORT (default: the run's; only with --run).
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// k-means runs of the fresh clustering, keeping the lowest inertia (default: the
        /// run's; only with --run).
        #[arg(long)]
        kmeans_restarts: Option<usize>,
        #[command(flatten)]
        inference: InferenceArgs,
    },
    /// Write index PNGs (cluster per pixel, original resolution) for a folder of images.
    Segment {
        /// Run folder written by `picie train`.
        #[arg(long)]
        run: PathBuf,
        /// Folder of images.
        #[arg(long)]
        images: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// auto, gpu, cpu, wgpu or remote:ws://HOST:PORT (default: the run's).
        #[arg(long)]
        device: Option<DeviceChoice>,
        #[command(flatten)]
        inference: InferenceArgs,
    },
    /// Export segmentations with the run's label map (names, merges, ignores): index masks,
    /// colour masks, overlays, legend.json and a CVAT labelmap.txt, at original resolution.
    Export {
        /// Run folder written by `picie train` (its labelmap.json is applied if present).
        #[arg(long)]
        run: PathBuf,
        /// Folder of images (searched recursively).
        #[arg(long)]
        images: PathBuf,
        /// Output folder (created if missing; files of the same names are replaced).
        #[arg(long)]
        out: PathBuf,
        /// What to write, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "index,colour,overlay,cvat"
        )]
        format: Vec<ExportFormat>,
        /// auto, gpu, cpu, wgpu or remote:ws://HOST:PORT (default: the run's).
        #[arg(long)]
        device: Option<DeviceChoice>,
        #[command(flatten)]
        inference: InferenceArgs,
    },
    /// Write the procedural demo dataset (images, labels, classes.txt) into OUT_DIR.
    DemoData {
        /// Folder to write into (created if missing).
        out_dir: PathBuf,
        /// Number of images.
        #[arg(long, default_value_t = 48)]
        images: usize,
        /// Side of the square images in pixels.
        #[arg(long, default_value_t = 160)]
        size: u32,
        /// Seed: the same seed writes the same files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Read an image folder (and optional label folder) and report what was found.
    Scan {
        /// Folder of images (searched recursively).
        #[arg(long)]
        images: PathBuf,
        /// Folder of index-PNG labels matched by file stem (255 = ignore).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Base size: shorter side resized to this, then centre-cropped square.
        #[arg(long, default_value_t = 320)]
        size: u32,
    },
    /// List the GPU adapters and say which device `--device auto` picks.
    Devices,
    /// Download torchvision's ImageNet weights for a backbone into the cache folder.
    DownloadWeights {
        /// resnet18 or mobilenet_v2.
        #[arg(long, default_value = "resnet18")]
        backbone: BackboneKind,
    },
    /// Build the feature bank (pooled patch features for nearest-neighbour search) of a run.
    Bank {
        /// Run folder written by `picie train`.
        #[arg(long)]
        run: PathBuf,
        /// Folder of images (the run's dataset).
        #[arg(long)]
        images: PathBuf,
        /// Patch side in input pixels, a multiple of 4 dividing the input size (default: the
        /// run's bank_patch).
        #[arg(long)]
        patch: Option<usize>,
        /// auto, gpu, cpu, wgpu or remote:ws://HOST:PORT (default: the run's).
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Find the patches most like the one at (X, Y) of an image; writes neighbours.png (a
    /// contact sheet) and neighbours.json into --out.
    Neighbours {
        /// Run folder with a feature bank (`picie bank`).
        #[arg(long)]
        run: PathBuf,
        /// The query image: its name in the dataset (relative path), or its unique file name.
        #[arg(long)]
        image: String,
        /// x of the query point in the original image, in pixels.
        #[arg(long)]
        x: u32,
        /// y of the query point in the original image, in pixels.
        #[arg(long)]
        y: u32,
        /// Number of neighbours (at most 1000; the query patch itself is left out).
        #[arg(short = 'k', long, default_value_t = 20)]
        k: usize,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Folder of images the bank was built from (default: the one the app recorded).
        #[arg(long)]
        images: Option<PathBuf>,
        /// cpu (default) searches on the CPU; gpu, wgpu or auto search on that device.
        #[arg(long)]
        device: Option<DeviceChoice>,
    },
    /// Serve this machine's device (its GPU if it has one) to `--device remote:ws://HOST:PORT`
    /// clients on other machines, until Ctrl-C. Clients must present the token read from
    /// --token-file or $PICIE_REMOTE_TOKEN.
    Serve {
        /// Address to listen on, HOST:PORT (0.0.0.0 listens on every interface).
        #[arg(long, default_value = "0.0.0.0:3000")]
        address: String,
        /// auto, gpu, cpu or wgpu.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

/// One kind of file `picie export` writes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    /// 8-bit index masks in index/ (id per pixel, 255 = ignored).
    Index,
    /// RGB colour masks in colour/.
    #[value(alias = "color")]
    Colour,
    /// The images blended with their colour masks in overlay/.
    Overlay,
    /// labelmap.txt for CVAT's "Segmentation mask 1.1" import of colour/.
    Cvat,
}

#[derive(Subcommand)]
enum BenchCommand {
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

/// Options of `picie train`; flags override the config file, which overrides the defaults.
#[derive(clap::Args)]
struct TrainArgs {
    /// Folder of images (searched recursively).
    #[arg(long)]
    images: PathBuf,
    /// Folder of index-PNG labels for scoring (255 = ignore), matched by file stem.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Run folder to write (config, checkpoints, metrics).
    #[arg(long)]
    out: PathBuf,
    /// JSON config file (see config.json in any run folder).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in --out from its latest checkpoint, with its recorded settings.
    #[arg(long)]
    resume: bool,
    /// If --out already holds a run, move it aside (to OUT.replaced-N) and start a new one.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// resnet18 or mobilenet_v2.
    #[arg(long)]
    backbone: Option<BackboneKind>,
    /// Backbone weights: torchvision .pth or a network checkpoint.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Start from random weights even when ImageNet weights were downloaded.
    #[arg(long, conflicts_with = "weights")]
    random_init: bool,
    /// auto, gpu, cpu, wgpu or remote:ws://HOST:PORT (a `picie serve` server; its token from
    /// --token-file or $PICIE_REMOTE_TOKEN).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// Epochs (0: only cluster and save the untrained network).
    #[arg(long)]
    epochs: Option<usize>,
    /// Clusters K (default: number of label classes, else 27).
    #[arg(long)]
    clusters: Option<usize>,
    /// Images per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Adam learning rate.
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Network input side.
    #[arg(long)]
    input_size: Option<u32>,
    /// Base image side the views are cut from.
    #[arg(long)]
    base_size: Option<u32>,
    /// reference, inverse or none.
    #[arg(long)]
    balance: Option<String>,
    /// The run's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Train this many runs, seeds SEED, SEED+1, ..., into OUT/seed-N each, then print the mean
    /// and spread of their scores per epoch (and write them to OUT/seeds.json).
    #[arg(long, conflicts_with = "resume")]
    seeds: Option<usize>,
    /// Hold out the images whose path (relative to --images) starts with this: they are not
    /// trained on, and are scored beside the training images after every epoch.
    #[arg(long)]
    held_out_prefix: Option<String>,
    /// How k-means starts: random (K random points, as faiss and the reference) or plus_plus.
    #[arg(long)]
    kmeans_init: Option<String>,
    /// k-means runs when the un-augmented images are clustered (evaluation, segmentation
    /// centroids), keeping the lowest inertia (default 5).
    #[arg(long)]
    eval_kmeans_restarts: Option<usize>,
    /// BatchNorm while clustering: eval (running statistics), train (batch statistics) or
    /// reference (train-mode centroids, eval-mode labels, as the authors).
    #[arg(long)]
    cluster_bn: Option<String>,
    /// Adam's epsilon (default 1e-8, as PyTorch).
    #[arg(long)]
    adam_epsilon: Option<f64>,
    /// Start each epoch's k-means from the previous epoch's centroids (the reference starts
    /// afresh), so clusters keep their meaning from epoch to epoch
    #[arg(long)]
    kmeans_warm_start: bool,
    /// Learning rate over the run: constant (as the reference) or cosine (down to zero after
    /// the last epoch, so the clusters settle)
    #[arg(long)]
    lr_schedule: Option<String>,
    #[command(flatten)]
    inference: InferenceArgs,
}

/// How a trained network turns images into cluster maps (evaluation, segment, export).
#[derive(clap::Args, Clone, Default)]
struct InferenceArgs {
    /// Average each image's features with its mirror image's, true or false (default: the
    /// run's setting, off unless set).
    #[arg(long)]
    test_time_flip: Option<bool>,
    /// bilinear, or bilateral (cluster borders follow the image's edges) (default: the run's).
    #[arg(long)]
    upsampling: Option<String>,
}

impl InferenceArgs {
    /// Overrides the config's inference settings with the flags given.
    fn apply(&self, config: &mut TrainConfig) -> Result<()> {
        if let Some(flip) = self.test_time_flip {
            config.test_time_flip = flip;
        }
        if let Some(value) = &self.upsampling {
            config.upsampling = parse_choice("upsampling", value, "bilinear or bilateral")?;
        }
        Ok(())
    }
}

/// A config enum from its snake_case name, or an error listing the choices.
fn parse_choice<T: serde::de::DeserializeOwned>(
    flag: &str,
    value: &str,
    choices: &str,
) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| anyhow::anyhow!("unknown --{flag} '{value}': use {choices}"))
}

fn main() {
    picie::allocator::configure();
    picie::device::prepare_runtime_folder();
    if let Err(error) = run(Cli::parse()) {
        // The chain of causes, leaving out a cause whose text a message already includes
        // (most of ours name their OS error themselves).
        let mut message = error.to_string();
        for cause in error.chain().skip(1) {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
        }
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(path) = &cli.token_file {
        picie::device::set_default_remote_token(picie::device::read_token_file(path)?);
    }
    match cli.command {
        Command::Train(args) => train(*args),
        Command::Eval {
            run,
            masks,
            images,
            labels,
            json,
            device,
            kmeans_restarts,
            inference,
        } => match (run, masks) {
            (Some(run), None) => eval(
                &run,
                &images,
                &labels,
                json,
                device,
                kmeans_restarts,
                &inference,
            ),
            (None, Some(masks)) => {
                if device.is_some() {
                    eprintln!("note: --device is not used when scoring --masks");
                }
                eval_masks(&masks, &images, &labels, json)
            }
            (Some(_), Some(_)) => bail!(
                "give either --run RUN_DIR (score a run's network) or --masks DIR (score exported \
                 index masks), not both"
            ),
            (None, None) => bail!(
                "nothing to score: give --run RUN_DIR (a trained run) or --masks DIR (the `index` \
                 folder written by `picie export`)"
            ),
        },
        Command::Export {
            run,
            images,
            out,
            format,
            device,
            inference,
        } => export(&run, &images, &out, &format, device, &inference),
        Command::Segment {
            run,
            images,
            out,
            device,
            inference,
        } => segment(&run, &images, &out, device, &inference),
        Command::DemoData {
            out_dir,
            images,
            size,
            seed,
        } => {
            let summary = write_demo_dataset(&out_dir, &DemoOptions { images, size, seed })?;
            println!(
                "wrote {} demo images with labels ({} classes) to {}",
                summary.images,
                summary.class_names.len(),
                out_dir.display()
            );
            Ok(())
        }
        Command::Scan {
            images,
            labels,
            size,
        } => scan(images, labels, size),
        Command::Devices => {
            let adapters = list_adapters();
            if adapters.is_empty() {
                println!("no wgpu adapters");
            }
            for adapter in &adapters {
                println!(
                    "{} [{:?}, {:?}]{}",
                    adapter.name,
                    adapter.device_type,
                    adapter.backend,
                    if adapter.is_real_gpu() {
                        ""
                    } else {
                        " (not a GPU)"
                    }
                );
            }
            println!(
                "--device auto uses: {}",
                select_device(&DeviceChoice::Auto)?.description
            );
            Ok(())
        }
        Command::Bank {
            run,
            images,
            patch,
            device,
        } => build_bank_command(&run, &images, patch, device),
        Command::Neighbours {
            run,
            image,
            x,
            y,
            k,
            out,
            images,
            device,
        } => neighbours_command(run, image, x, y, k, out, images, device),
        Command::Bench {
            which:
                BenchCommand::Neighbours {
                    sizes,
                    device,
                    k,
                    queries,
                },
        } => bench_neighbours(&sizes, device, k, queries),
        Command::DownloadWeights { backbone } => download(backbone),
        Command::Serve { address, device } => serve(&address, &device),
        Command::Bench {
            which:
                BenchCommand::Train {
                    backbone,
                    device,
                    size,
                    batch,
                    steps,
                },
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
        Command::Bench {
            which:
                BenchCommand::Kmeans {
                    points,
                    clusters,
                    iterations,
                    device,
                },
        } => {
            let compute = select_device(&device)?;
            println!("device: {}", compute.description);
            for k in clusters {
                let (seconds, throughput) = time_kmeans(points, 128, k, iterations, &compute)?;
                println!(
                    "k-means {points} x 128, K = {k}, {iterations} iterations: {seconds:.2} s ({:.2e} point-iterations/s)",
                    throughput
                );
            }
            if let Some(peak) = peak_memory_mib() {
                println!("peak resident memory: {peak:.0} MiB");
            }
            Ok(())
        }
        Command::Bench {
            which:
                BenchCommand::Forward {
                    backbone,
                    device,
                    size,
                    batch,
                    runs,
                    weights,
                },
        } => bench_forward(&backbone, device, size, batch, runs, weights),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    let mut config = if args.resume {
        RunFolder::open(&args.out)?.config()?
    } else if let Some(path) = &args.config {
        TrainConfig::load(path)?
    } else {
        TrainConfig::default()
    };
    if let Some(value) = args.backbone {
        config.backbone = value;
    }
    if let Some(value) = args.weights.clone() {
        config.weights = Some(value);
        config.random_init = false;
    }
    if args.random_init {
        config.random_init = true;
        config.weights = None;
    }
    if let Some(value) = args.device.clone() {
        config.device = value;
    }
    if let Some(value) = args.epochs {
        config.epochs = value;
    }
    if let Some(value) = args.clusters {
        config.clusters = Some(value);
    }
    if let Some(value) = args.batch {
        config.batch_size = value;
    }
    if let Some(value) = args.lr {
        config.learning_rate = value;
    }
    if let Some(value) = args.input_size {
        config.input_size = value;
    }
    if let Some(value) = args.base_size {
        config.base_size = value;
    }
    if let Some(value) = &args.balance {
        config.balance =
            serde_json::from_value(serde_json::Value::String(value.clone())).map_err(|_| {
                anyhow::anyhow!("unknown balance mode '{value}': use reference, inverse or none")
            })?;
    }
    if let Some(value) = args.seed {
        config.seed = value;
    }
    if let Some(value) = &args.held_out_prefix {
        config.held_out_prefix = Some(value.clone());
    }
    if let Some(value) = &args.kmeans_init {
        config.kmeans_init = parse_choice("kmeans-init", value, "random or plus_plus")?;
    }
    if let Some(value) = args.eval_kmeans_restarts {
        config.eval_kmeans_restarts = value;
    }
    if let Some(value) = &args.cluster_bn {
        config.cluster_batch_norm = parse_choice("cluster-bn", value, "eval, train or reference")?;
    }
    if let Some(value) = args.adam_epsilon {
        config.adam_epsilon = value;
    }
    if args.kmeans_warm_start {
        config.kmeans_warm_start = true;
    }
    if let Some(value) = &args.lr_schedule {
        config.learning_rate_schedule = parse_choice("lr-schedule", value, "constant or cosine")?;
    }
    args.inference.apply(&mut config)?;
    config.validate()?;
    match args.seeds {
        None => {
            let run = claim_run_folder(&config, &args.out, &args)?;
            let data = load_training_data(&args, &config)?;
            let control = stop_on_ctrl_c();
            train_into(config, run, data, &control, &args.out, args.resume)?;
            Ok(())
        }
        Some(0) => bail!("--seeds must be at least 1"),
        Some(count) => train_seeds(config, &args, count),
    }
}

/// Claims a run folder before the slow dataset decoding, so a refusal comes at once and
/// nothing in a folder that holds another run is touched.
fn claim_run_folder(
    config: &TrainConfig,
    out: &std::path::Path,
    args: &TrainArgs,
) -> Result<RunFolder> {
    if args.resume {
        return Ok(RunFolder::open_for_writing(out)?);
    }
    let existing = if args.overwrite {
        ExistingRun::MoveAside
    } else {
        ExistingRun::Refuse
    };
    let (run, moved_to) = RunFolder::create(out, config, existing)?;
    if let Some(moved_to) = moved_to {
        eprintln!(
            "moved the run that was in {} to {}",
            out.display(),
            moved_to.display()
        );
    }
    Ok(run)
}

fn load_training_data(
    args: &TrainArgs,
    config: &TrainConfig,
) -> Result<std::sync::Arc<TrainingData>> {
    let bar = progress_bar(0, "decoding images");
    let data = TrainingData::load(
        &args.images,
        args.labels.as_deref(),
        config.base_size,
        config.input_size,
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    for skipped in &data.skipped {
        eprintln!("skipped {}: {}", skipped.path.display(), skipped.reason);
    }
    eprintln!(
        "{} images{}",
        data.len(),
        if data.eval_labels.is_some() {
            " with labels"
        } else {
            ""
        }
    );
    Ok(std::sync::Arc::new(data))
}

/// A stop control that Ctrl-C triggers: the current batch finishes, the last checkpoint is
/// kept and the command exits cleanly.
fn stop_on_ctrl_c() -> TrainControl {
    let control = TrainControl::new();
    let handler_control = control.clone();
    let _ = ctrlc::set_handler(move || {
        eprintln!("\nstopping after this batch…");
        handler_control.stop();
    });
    control
}

/// Trains one run and says how it ended.
fn train_into(
    config: TrainConfig,
    run: RunFolder,
    data: std::sync::Arc<TrainingData>,
    control: &TrainControl,
    out: &std::path::Path,
    resume: bool,
) -> Result<TrainOutcome> {
    if config.device.is_remote() {
        eprintln!("connecting to {} ...", config.device);
    }
    let compute = select_device(&config.device)?;
    let mut trainer = Trainer::new(config, run, data, control.clone(), resume)?;
    let mut observer = TerminalObserver::new();
    let outcome = trainer.run(&compute, &mut observer)?;
    observer.bar.finish_and_clear();
    if outcome.stopped && outcome.last_epoch == 0 {
        println!(
            "stopped before epoch 1 ended, so the run has no checkpoint yet; run the same \
             command again to start it over (run folder {})",
            out.display()
        );
    } else {
        println!(
            "{} after epoch {}; run folder {}{}",
            if outcome.stopped {
                "stopped"
            } else {
                "finished"
            },
            outcome.last_epoch,
            out.display(),
            if outcome.stopped {
                "; continue it with --resume"
            } else {
                ""
            }
        );
    }
    Ok(outcome)
}

/// `picie train --seeds N`: N runs of the same settings with seeds SEED.., one folder each,
/// then the mean and spread of their scores per epoch.
fn train_seeds(config: TrainConfig, args: &TrainArgs, count: usize) -> Result<()> {
    let seeds: Vec<u64> = (0..count as u64).map(|i| config.seed + i).collect();
    let mut runs = Vec::with_capacity(count);
    for &seed in &seeds {
        let out = args.out.join(format!("seed-{seed}"));
        let seeded = TrainConfig {
            seed,
            ..config.clone()
        };
        let run = claim_run_folder(&seeded, &out, args)?;
        runs.push((seeded, run, out));
    }
    let data = load_training_data(args, &config)?;
    let control = stop_on_ctrl_c();
    let mut finished = Vec::with_capacity(count);
    for (seeded, run, out) in runs {
        eprintln!("seed {} of {:?}: {}", seeded.seed, seeds, out.display());
        let seed = seeded.seed;
        let outcome = train_into(seeded, run, data.clone(), &control, &out, false)?;
        let stopped = outcome.stopped;
        finished.push((seed, outcome.metrics));
        if stopped {
            break;
        }
    }
    let summary = picie::run::SeedSummary::new(&finished);
    println!("{}", summary.table());
    let path = args.out.join("seeds.json");
    let text = serde_json::to_string_pretty(&summary)?;
    picie::fsutil::write_bytes_atomic(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "mean and spread of {} seeds written to {}",
        finished.len(),
        path.display()
    );
    Ok(())
}

/// `epoch 3<place>: Acc .. mIoU ..` (`no training` for epoch 0).
fn score_line(epoch: usize, place: &str, evaluation: &picie::eval::Evaluation) -> String {
    let when = if epoch == 0 {
        "no training".to_owned()
    } else {
        format!("epoch {epoch}")
    };
    format!(
        "{when}{place}: Acc {:.2}  mIoU {:.2}",
        evaluation.accuracy, evaluation.mean_iou
    )
}

/// Prints the trainer's events with a progress bar.
struct TerminalObserver {
    bar: ProgressBar,
    phase: Option<(usize, TrainPhase)>,
}

impl TerminalObserver {
    fn new() -> Self {
        Self {
            bar: progress_bar(0, ""),
            phase: None,
        }
    }

    /// A line above the bar, or on stderr when the bar is hidden (not a terminal), so logs of
    /// headless runs still get every figure.
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn enter(&mut self, epoch: usize, phase: TrainPhase, total: usize) {
        if self.phase != Some((epoch, phase)) {
            self.phase = Some((epoch, phase));
            self.bar.reset();
            self.bar.set_length(total as u64);
            self.bar
                .set_message(format!("epoch {epoch} {}", phase.describe().to_lowercase()));
        }
    }
}

impl TrainObserver for TerminalObserver {
    fn on_event(&mut self, event: &TrainEvent) {
        match event {
            TrainEvent::Started {
                device,
                weights,
                images,
                clusters,
                first_epoch,
                epochs,
                steps_per_epoch,
            } => self.say(format!(
                "device: {device}\nweights: {weights}\ntraining epochs {first_epoch}..={epochs} on {images} images, K = {clusters}, {steps_per_epoch} steps an epoch"
            )),
            TrainEvent::Phase {
                epoch,
                phase,
                done,
                total,
            } => {
                self.enter(*epoch, *phase, *total);
                self.bar.set_position(*done as u64);
            }
            TrainEvent::Step(progress) => {
                self.enter(progress.epoch, TrainPhase::Training, progress.steps);
                self.bar.set_position(progress.step as u64);
                self.bar.set_message(format!(
                    "epoch {} training, loss {:.4}, {:.1} images/s, ETA {:.0} s",
                    progress.epoch, progress.loss.total, progress.images_per_second, progress.eta_seconds
                ));
            }
            TrainEvent::Evaluated { epoch, evaluation } => {
                self.say(score_line(*epoch, "", evaluation))
            }
            TrainEvent::HeldOutEvaluated { epoch, evaluation } => {
                self.say(score_line(*epoch, " on the held-out images", evaluation))
            }
            TrainEvent::EpochFinished(record) => self.say(format!(
                "epoch {} done: clustering {:.1} s (k-means {:.1} s), training {:.1} s ({:.2} images/s), evaluation and bank {:.1} s, saving {:.1} s; views {:.1} s on their own thread; loss {:.4}",
                record.epoch,
                record.seconds_clustering,
                record.seconds_kmeans,
                record.seconds_training,
                record.images_per_second,
                record.seconds_evaluation,
                record.seconds_saving,
                record.seconds_views,
                record.loss.total
            )),
            TrainEvent::Paused(paused) => {
                self.say(if *paused { "paused" } else { "resumed" }.to_owned());
            }
            TrainEvent::Warning(message) => self.say(format!("warning: {message}")),
            _ => {}
        }
    }
}

fn eval(
    run_dir: &std::path::Path,
    images: &std::path::Path,
    labels: &std::path::Path,
    json: bool,
    device: Option<DeviceChoice>,
    kmeans_restarts: Option<usize>,
    inference: &InferenceArgs,
) -> Result<()> {
    let run = RunFolder::open(run_dir)?;
    let mut config = run.config()?;
    if let Some(device) = device {
        config.device = device;
    }
    if let Some(restarts) = kmeans_restarts {
        config.eval_kmeans_restarts = restarts;
    }
    inference.apply(&mut config)?;
    config.validate()?;
    let compute = select_device(&config.device)?;
    let (network, epoch, note) = run.latest_network(&compute.device)?;
    if let Some(note) = note {
        eprintln!("warning: {note}");
    }
    // Evaluation images are the un-augmented inputs: decode them straight at the input size.
    let data = TrainingData::load(
        images,
        Some(labels),
        config.input_size,
        config.input_size,
        &|_, _| {},
    )?;
    for skipped in &data.skipped {
        eprintln!("skipped {}: {}", skipped.path.display(), skipped.reason);
    }
    let mut observer = TerminalObserver::new();
    let evaluation = evaluate_network(
        &network,
        &data,
        &config,
        &compute.device,
        epoch,
        None,
        &mut observer,
    )?
    .ok_or_else(|| {
        anyhow::anyhow!(
            "no labels were found for the images in {}",
            labels.display()
        )
    })?;
    observer.bar.finish_and_clear();
    print_scores(
        &format!("epoch {epoch}"),
        &evaluation,
        data.class_names.as_deref(),
        json,
    );
    Ok(())
}

/// Prints Acc / mIoU and the IoU of each class, or the JSON form.
fn print_scores(
    heading: &str,
    evaluation: &picie::eval::Evaluation,
    class_names: Option<&[String]>,
    json: bool,
) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "acc": evaluation.accuracy,
                "miou": evaluation.mean_iou,
                "per_class_iou": evaluation.per_class_iou,
            })
        );
        return;
    }
    println!(
        "{heading}: Acc {:.2}  mIoU {:.2}",
        evaluation.accuracy, evaluation.mean_iou
    );
    if let Some(names) = class_names {
        for (name, iou) in names.iter().zip(&evaluation.per_class_iou) {
            match iou {
                Some(iou) => println!("  {name:>16}: IoU {iou:.2}"),
                None => println!("  {name:>16}: absent"),
            }
        }
    }
}

/// `picie eval --masks`: scores exported index masks exactly as the app scores an export.
fn eval_masks(
    masks: &std::path::Path,
    images: &std::path::Path,
    labels: &std::path::Path,
    json: bool,
) -> Result<()> {
    let folder = ImageFolder::scan(images, Some(labels))?;
    let evaluation = score_mask_folder(masks, &folder)?;
    print_scores(
        &format!("masks {}", masks.display()),
        &evaluation,
        folder.class_names(),
        json,
    );
    Ok(())
}

/// `device` if given, else the device the run was trained with.
fn device_for_run(run_dir: &std::path::Path, device: Option<DeviceChoice>) -> Result<DeviceChoice> {
    Ok(match device {
        Some(device) => device,
        None => RunFolder::open(run_dir)?.config()?.device,
    })
}

/// `picie serve` in a build without the remote backend.
#[cfg(not(feature = "remote"))]
fn serve(_address: &str, _device: &DeviceChoice) -> Result<()> {
    Err(picie::device::DeviceError::RemoteNotBuilt.into())
}

/// `picie serve`: burn's remote server on this machine's device, until Ctrl-C.
#[cfg(feature = "remote")]
fn serve(address: &str, device: &DeviceChoice) -> Result<()> {
    let Some(token) = picie::device::default_remote_token() else {
        bail!(
            "a server needs a token that clients must present: put one in a file and pass \
             --token-file FILE, or set {}",
            picie::device::REMOTE_TOKEN_VARIABLE
        );
    };
    let served = picie::serve::RemoteService::bind(address, device, &token)?;
    println!(
        "serving {} on ws://{} to clients with the token; Ctrl-C stops",
        served.device_description(),
        served.local_address()
    );
    served.serve_until_interrupted()?;
    println!("server stopped");
    Ok(())
}

/// The run's segmenter with the inference flags applied over the run's settings.
fn segmenter_with(
    run_dir: &std::path::Path,
    device: Option<DeviceChoice>,
    inference: &InferenceArgs,
) -> Result<picie::segment::Segmenter> {
    let compute = select_device(&device_for_run(run_dir, device)?)?;
    let (segmenter, mut config) = segmenter_for_run(run_dir, &compute)?;
    inference.apply(&mut config)?;
    Ok(segmenter.with_inference(config.test_time_flip, config.upsampling))
}

/// `picie export`: the run's segmentations with its label map, Ctrl-C cancels cleanly.
fn export(
    run_dir: &std::path::Path,
    images: &std::path::Path,
    out: &std::path::Path,
    formats: &[ExportFormat],
    device: Option<DeviceChoice>,
    inference: &InferenceArgs,
) -> Result<()> {
    let segmenter = segmenter_with(run_dir, device, inference)?;
    let labelmap = LabelMap::load_or_new(run_dir, segmenter.clusters())?;
    let folder = ImageFolder::scan(images, None)?;
    let options = ExportOptions {
        index: formats.contains(&ExportFormat::Index),
        colour: formats.contains(&ExportFormat::Colour),
        overlay: formats.contains(&ExportFormat::Overlay),
        cvat: formats.contains(&ExportFormat::Cvat),
        only: None,
    };
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        // Ctrl-C lets the current image finish (its files are written whole), then stops.
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            eprintln!("\ncancelling after this image…");
            cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let bar = progress_bar(folder.len() as u64, "exporting");
    let report = export_segmentations(
        &segmenter,
        &folder,
        &labelmap,
        out,
        &options,
        &mut |progress| {
            bar.set_length(progress.total as u64);
            bar.set_position(progress.done as u64);
            bar.set_message(format!("exporting {}", progress.current));
        },
        &cancel,
    )?;
    bar.finish_and_clear();
    for (name, reason) in &report.failed {
        eprintln!("failed {name}: {reason}");
    }
    if report.cancelled {
        println!("cancelled: the images done so far are complete");
    }
    let mut written: Vec<String> = [
        (options.index, "index/"),
        (options.colour, "colour/"),
        (options.overlay, "overlay/"),
    ]
    .into_iter()
    .filter(|(wanted, _)| *wanted)
    .map(|(_, name)| name.to_owned())
    .collect();
    if report.written > 0 {
        written.push(picie::export::LEGEND_FILE.to_owned());
        if options.cvat {
            written.push(picie::export::CVAT_LABELMAP_FILE.to_owned());
        }
    }
    println!(
        "exported {} of {} images to {} ({}); {} failed",
        report.written,
        folder.len(),
        out.display(),
        written.join(", "),
        report.failed.len()
    );
    if let (Ok(out), Ok(images)) = (std::fs::canonicalize(out), std::fs::canonicalize(images))
        && out.starts_with(&images)
    {
        eprintln!(
            "note: the output folder is inside the image folder; a later scan of {} will take \
             the exported PNGs for images",
            images.display()
        );
    }
    if report.written == 0 {
        bail!("no image could be exported");
    }
    println!("legend (id, name, colour, pixel share, clusters):");
    for entry in &report.legend {
        let [r, g, b] = entry.colour;
        let clusters: Vec<String> = entry.clusters.iter().map(ToString::to_string).collect();
        println!(
            "  {:>3}  {:<20} #{r:02x}{g:02x}{b:02x}  {:>6.2} %  [{}]",
            entry.id,
            entry.name,
            100.0 * entry.pixel_share,
            clusters.join(", ")
        );
    }
    Ok(())
}

fn segment(
    run_dir: &std::path::Path,
    images: &std::path::Path,
    out: &std::path::Path,
    device: Option<DeviceChoice>,
    inference: &InferenceArgs,
) -> Result<()> {
    let segmenter = segmenter_with(run_dir, device, inference)?;
    let folder = ImageFolder::scan(images, None)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let bar = progress_bar(folder.len() as u64, "segmenting");
    let mut failures = 0usize;
    // Named like export's index masks: sub-folders kept, names never collide.
    let targets = mask_paths(folder.entries());
    for (entry, target) in folder.entries().iter().zip(&targets) {
        let target = out.join(target);
        let result = segmenter
            .segment_file(&entry.path)
            .map_err(anyhow::Error::from)
            .and_then(|segmentation| Ok(write_index_png(&target, &segmentation)?));
        if let Err(error) = result {
            failures += 1;
            bar.println(format!("{}: {error:#}", entry.path.display()));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "wrote {} index masks to {} ({failures} failed)",
        folder.len() - failures,
        out.display()
    );
    if failures == folder.len() {
        bail!("no image could be segmented");
    }
    Ok(())
}

fn scan(images: PathBuf, labels: Option<PathBuf>, size: u32) -> Result<()> {
    let folder = ImageFolder::scan(&images, labels.as_deref())?;
    let bar = progress_bar(folder.len() as u64, "decoding");
    let started = Instant::now();
    let loaded = folder.load(&BaseTransform { size }, &|done, _total| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    for skipped in &loaded.skipped {
        eprintln!("skipped {}: {}", skipped.path.display(), skipped.reason);
    }
    let labelled = loaded
        .images
        .iter()
        .filter(|image| image.label.is_some())
        .count();
    println!(
        "{} images read in {:.1} s ({} with labels, {} skipped) at base size {size}",
        loaded.images.len(),
        started.elapsed().as_secs_f64(),
        labelled,
        loaded.skipped.len()
    );
    if let Some(classes) = folder.class_names() {
        println!("classes: {}", classes.join(", "));
    }
    Ok(())
}

fn download(backbone: BackboneKind) -> Result<()> {
    let Some(weights) = picie::download::known_weights(backbone.name()) else {
        bail!("no known download for {backbone}");
    };
    let bar = progress_bar(0, weights.file_name);
    let path = picie::download::download_known_weights(weights, &mut |progress| {
        if let Some(total) = progress.total {
            bar.set_length(total);
        }
        bar.set_position(progress.downloaded);
    })?;
    bar.finish_and_clear();
    println!(
        "{} ImageNet weights: {}",
        backbone.display_name(),
        path.display()
    );
    Ok(())
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

fn parse_backbones(text: &str) -> Result<Vec<BackboneKind>> {
    if text == "all" {
        return Ok(BackboneKind::ALL.to_vec());
    }
    Ok(vec![text.parse().map_err(anyhow::Error::msg)?])
}

fn progress_bar(length: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

fn build_bank_command(
    run_dir: &std::path::Path,
    images: &std::path::Path,
    patch: Option<usize>,
    device: Option<DeviceChoice>,
) -> Result<()> {
    let compute = select_device(&device_for_run(run_dir, device)?)?;
    let bar = progress_bar(0, "decoding images");
    let started = Instant::now();
    let built = picie::bank::build_run_bank(
        run_dir,
        images,
        patch,
        &compute,
        &mut |stage, done, total| {
            bar.set_message(stage.to_string());
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    eprintln!("device: {}", built.device);
    for skipped in &built.skipped {
        eprintln!("skipped {skipped}");
    }
    let bank = built.bank;
    let epoch = bank.info.epoch;
    println!(
        "feature bank of epoch {epoch}: {} patches ({} images, {}x{} patches of {} input pixels, {:.1} MiB) in {:.1} s, written to {}",
        bank.len(),
        bank.info.names.len(),
        bank.info.grid,
        bank.info.grid,
        bank.info.patch,
        (bank.len() * bank.info.dim * 2) as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64(),
        picie::bank::bank_dir(run_dir).display()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn neighbours_command(
    run_dir: PathBuf,
    image: String,
    x: u32,
    y: u32,
    k: usize,
    out: PathBuf,
    images: Option<PathBuf>,
    device: Option<DeviceChoice>,
) -> Result<()> {
    let images_dir = images
        .or_else(|| picie::bank::recorded_images_dir(&run_dir))
        .ok_or_else(|| {
            anyhow::anyhow!("the run does not record its image folder; pass it with --images DIR")
        })?;
    // One query is fastest on the CPU; a device only pays off for many queries.
    let device = match device {
        None | Some(DeviceChoice::Cpu) => None,
        Some(choice) => {
            let compute = select_device(&choice)?;
            eprintln!("device: {}", compute.description);
            Some(compute.device)
        }
    };
    let report = picie::bank::write_neighbours(&picie::bank::NeighboursRequest {
        run_dir,
        images_dir,
        image,
        x,
        y,
        k,
        out_dir: out.clone(),
        device,
    })?;
    let query = &report.query;
    println!(
        "query: {} patch at ({:.0}, {:.0}){}",
        query.image,
        query.x,
        query.y,
        query
            .cluster
            .map(|cluster| format!(", cluster {cluster}"))
            .unwrap_or_default()
    );
    for hit in &report.neighbours {
        println!(
            "{:>3}. {} ({:.0}, {:.0}) similarity {:.4}{}",
            hit.rank,
            hit.image,
            hit.x,
            hit.y,
            hit.similarity,
            hit.cluster
                .map(|cluster| format!(" cluster {cluster}"))
                .unwrap_or_default()
        );
    }
    println!(
        "wrote {} ({}x{}) and {}",
        report.sheet.display(),
        report.sheet_size.0,
        report.sheet_size.1,
        out.join("neighbours.json").display()
    );
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
