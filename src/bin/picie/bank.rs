//! `picie bank` and `picie neighbours`: a run's feature bank and the patches most like one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use picie::device::{DeviceChoice, select_device};

use crate::common::{device_for_run, progress_bar};

/// Options of `picie bank`.
#[derive(clap::Args)]
pub(crate) struct BankArgs {
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
}

/// Options of `picie neighbours`.
#[derive(clap::Args)]
pub(crate) struct NeighboursArgs {
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
    /// cpu (default) searches on the CPU; gpu, wgpu, auto or remote:ws://HOST:PORT search on
    /// that device.
    #[arg(long)]
    device: Option<DeviceChoice>,
}

/// `picie bank`.
pub(crate) fn run_bank(args: BankArgs) -> Result<()> {
    build_bank_command(&args.run, &args.images, args.patch, args.device)
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

/// `picie neighbours`.
pub(crate) fn run_neighbours(args: NeighboursArgs) -> Result<()> {
    let NeighboursArgs {
        run: run_dir,
        image,
        x,
        y,
        k,
        out,
        images,
        device,
    } = args;
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
