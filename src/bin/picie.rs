//! `picie`: the headless command line of PiCIE Explorer.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use picie::bench::{peak_memory_mib, time_forward};
use picie::data::{BaseTransform, DemoOptions, ImageFolder, write_demo_dataset};
use picie::device::{DeviceChoice, list_adapters, select_device};
use picie::model::BackboneKind;

/// PiCIE Explorer, headless: unsupervised semantic segmentation of a folder of images.
#[derive(Parser)]
#[command(name = "picie", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
                select_device(DeviceChoice::Auto)?.description
            );
            Ok(())
        }
        Command::DownloadWeights { backbone } => download(backbone),
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
    let kinds: Vec<BackboneKind> = if backbone == "all" {
        BackboneKind::ALL.to_vec()
    } else {
        vec![backbone.parse().map_err(anyhow::Error::msg)?]
    };
    let compute = select_device(device)?;
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
