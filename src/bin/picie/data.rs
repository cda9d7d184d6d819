//! The small commands around data: the demo dataset, scanning a folder, the devices seen, and
//! downloading ImageNet weights.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};

use picie::data::{BaseTransform, DemoOptions, ImageFolder, write_demo_dataset};
use picie::device::{DeviceChoice, list_adapters, select_device};
use picie::model::BackboneKind;

use crate::common::progress_bar;

/// Options of `picie demo-data`.
#[derive(clap::Args)]
pub(crate) struct DemoDataArgs {
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
}

/// Options of `picie scan`.
#[derive(clap::Args)]
pub(crate) struct ScanArgs {
    /// Folder of images (searched recursively).
    #[arg(long)]
    images: PathBuf,
    /// Folder of index-PNG labels matched by file stem (255 = ignore).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Base size: shorter side resized to this, then centre-cropped square.
    #[arg(long, default_value_t = 320)]
    size: u32,
}

/// Options of `picie download-weights`.
#[derive(clap::Args)]
pub(crate) struct DownloadArgs {
    /// resnet18 or mobilenet_v2.
    #[arg(long, default_value = "resnet18")]
    backbone: BackboneKind,
}

/// `picie demo-data`.
pub(crate) fn run_demo_data(args: DemoDataArgs) -> Result<()> {
    let options = DemoOptions {
        images: args.images,
        size: args.size,
        seed: args.seed,
    };
    let summary = write_demo_dataset(&args.out_dir, &options)?;
    println!(
        "wrote {} demo images with labels ({} classes) to {}",
        summary.images,
        summary.class_names.len(),
        args.out_dir.display()
    );
    Ok(())
}

/// `picie scan`.
pub(crate) fn run_scan(args: ScanArgs) -> Result<()> {
    scan(args.images, args.labels, args.size)
}

/// `picie devices`.
pub(crate) fn run_devices() -> Result<()> {
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

/// `picie download-weights`.
pub(crate) fn run_download(args: DownloadArgs) -> Result<()> {
    download(args.backbone)
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
