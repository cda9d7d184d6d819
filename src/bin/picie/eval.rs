//! `picie eval`: a run's network scored on labelled images, or exported masks scored.

use std::path::PathBuf;

use anyhow::{Result, bail};

use picie::data::{ImageFolder, TrainingData};
use picie::device::{DeviceChoice, select_device};
use picie::eval::score_mask_folder;
use picie::train::{RunFolder, evaluate_network};

use crate::common::{InferenceArgs, progress_bar};
use crate::train::TerminalObserver;

/// Options of `picie eval`.
#[derive(clap::Args)]
pub(crate) struct EvalArgs {
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
}

/// `picie eval`.
pub(crate) fn run(args: EvalArgs) -> Result<()> {
    match (&args.run, &args.masks) {
        (Some(run), None) => eval(
            run,
            &args.images,
            &args.labels,
            args.json,
            args.device.clone(),
            args.kmeans_restarts,
            &args.inference,
        ),
        (None, Some(masks)) => {
            if args.device.is_some() {
                eprintln!("note: --device is not used when scoring --masks");
            }
            eval_masks(masks, &args.images, &args.labels, args.json)
        }
        (Some(_), Some(_)) => bail!(
            "give either --run RUN_DIR (score a run's network) or --masks DIR (score exported \
             index masks), not both"
        ),
        (None, None) => bail!(
            "nothing to score: give --run RUN_DIR (a trained run) or --masks DIR (the `index` \
             folder written by `picie export`)"
        ),
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
    // Past the memory budget they go to a cache folder of this process, removed at the end.
    let bar = progress_bar(0, "decoding images");
    let data = TrainingData::load_into(
        images,
        Some(labels),
        config.input_size,
        config.input_size,
        &picie::data::DecodedStorage::auto(picie::run::paths::decoded_for_eval(run_dir)),
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
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
        Some(&picie::run::paths::feature_spill(run_dir, "eval")),
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
