//! `picie export` and `picie segment`: a run's segmentations of a folder of images.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use picie::data::ImageFolder;
use picie::device::{DeviceChoice, select_device};
use picie::export::{ExportOptions, export_segmentations, mask_paths, segmenter_for_run};
use picie::labelmap::LabelMap;
use picie::segment::write_index_png;

use crate::common::{InferenceArgs, device_for_run, progress_bar};

/// Options of `picie segment`.
#[derive(clap::Args)]
pub(crate) struct SegmentArgs {
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
}

/// Options of `picie export`.
#[derive(clap::Args)]
pub(crate) struct ExportArgs {
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
}

/// `picie segment`.
pub(crate) fn run_segment(args: SegmentArgs) -> Result<()> {
    segment(
        &args.run,
        &args.images,
        &args.out,
        args.device,
        &args.inference,
    )
}

/// `picie export`.
pub(crate) fn run_export(args: ExportArgs) -> Result<()> {
    export(
        &args.run,
        &args.images,
        &args.out,
        &args.format,
        args.device,
        &args.inference,
    )
}

/// One kind of file `picie export` writes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ExportFormat {
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
