//! `picie train`: flags over the config file over the defaults, one run or several seeds,
//! progress on the terminal, Ctrl-C to stop at a checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;

use picie::config::TrainConfig;
use picie::data::DecodedStorage;
use picie::device::{DeviceChoice, select_device};
use picie::model::BackboneKind;
use picie::train::{
    ExistingRun, RunFolder, TrainControl, TrainEvent, TrainObserver, TrainOutcome, TrainPhase,
    Trainer, TrainingData,
};

use crate::common::{InferenceArgs, parse_choice, progress_bar};

/// Options of `picie train`; flags override the config file, which overrides the defaults.
#[derive(clap::Args)]
pub(crate) struct TrainArgs {
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
    /// Where the decoded images are kept while training: auto (in memory up to 1 GiB, else
    /// in cache files in OUT/decoded/, removed when training ends), memory or disk.
    #[arg(long, value_enum, default_value_t = KeepDecoded::Auto)]
    keep_decoded: KeepDecoded,
    #[command(flatten)]
    inference: InferenceArgs,
}

/// Values of `picie train --keep-decoded`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum KeepDecoded {
    /// In memory when they fit in 1 GiB, else on disk.
    Auto,
    /// In memory, whatever their size.
    Memory,
    /// In cache files in the run folder.
    Disk,
}

impl KeepDecoded {
    /// The storage for a run in `run_dir`.
    fn storage(self, run_dir: &std::path::Path) -> DecodedStorage {
        let folder = picie::run::paths::decoded(run_dir);
        match self {
            Self::Auto => DecodedStorage::auto(folder),
            Self::Memory => DecodedStorage::Memory,
            Self::Disk => DecodedStorage::Disk(folder),
        }
    }
}

/// `picie train`.
pub(crate) fn run(args: TrainArgs) -> Result<()> {
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
            let data = load_training_data(&args, &config, &args.out)?;
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
pub(crate) fn claim_run_folder(
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

pub(crate) fn load_training_data(
    args: &TrainArgs,
    config: &TrainConfig,
    run_dir: &std::path::Path,
) -> Result<std::sync::Arc<TrainingData>> {
    let bar = progress_bar(0, "decoding images");
    let data = TrainingData::load_into(
        &args.images,
        args.labels.as_deref(),
        config.base_size,
        config.input_size,
        &args.keep_decoded.storage(run_dir),
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
        "{} images{}{}",
        data.len(),
        if data.eval_labels.is_some() {
            " with labels"
        } else {
            ""
        },
        match data.cache_file().and_then(std::path::Path::parent) {
            Some(folder) => format!(
                ", decoded into {} (too large to keep in memory; removed when training ends)",
                folder.display()
            ),
            None => String::new(),
        }
    );
    Ok(std::sync::Arc::new(data))
}

/// A stop control that Ctrl-C triggers: the current batch finishes, the last checkpoint is
/// kept and the command exits cleanly.
pub(crate) fn stop_on_ctrl_c() -> TrainControl {
    let control = TrainControl::new();
    let handler_control = control.clone();
    let _ = ctrlc::set_handler(move || {
        eprintln!("\nstopping after this batch…");
        handler_control.stop();
    });
    control
}

/// Trains one run and says how it ended.
pub(crate) fn train_into(
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
pub(crate) fn train_seeds(config: TrainConfig, args: &TrainArgs, count: usize) -> Result<()> {
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
    // One decoding serves every seed, cached (when large) in the first seed's folder.
    let data = load_training_data(args, &config, &runs[0].2)?;
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
pub(crate) fn score_line(
    epoch: usize,
    place: &str,
    evaluation: &picie::eval::Evaluation,
) -> String {
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
pub(crate) struct TerminalObserver {
    pub(crate) bar: ProgressBar,
    phase: Option<(usize, TrainPhase)>,
}

impl TerminalObserver {
    pub(crate) fn new() -> Self {
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
