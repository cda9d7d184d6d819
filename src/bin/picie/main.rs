//! `picie`: the headless command line of PiCIE Explorer. This file holds the command list and
//! the dispatch; each subcommand lives in its own module with its clap arguments and its `run`.

/// See `mimalloc` in Cargo.toml: faster training on the CPU backend.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bank;
mod bench;
mod common;
mod data;
mod eval;
mod export;
mod serve;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    Train(Box<train::TrainArgs>),
    /// Score a run's network on labelled images (fresh clustering, Hungarian matching), or
    /// score exported index masks (--masks) against the labels.
    Eval(eval::EvalArgs),
    /// Write index PNGs (cluster per pixel, original resolution) for a folder of images.
    Segment(export::SegmentArgs),
    /// Export segmentations with the run's label map (names, merges, ignores): index masks,
    /// colour masks, overlays, legend.json and a CVAT labelmap.txt, at original resolution.
    Export(export::ExportArgs),
    /// Write the procedural demo dataset (images, labels, classes.txt) into OUT_DIR.
    DemoData(data::DemoDataArgs),
    /// Read an image folder (and optional label folder) and report what was found.
    Scan(data::ScanArgs),
    /// List the GPU adapters and say which device `--device auto` picks.
    Devices,
    /// Download torchvision's ImageNet weights for a backbone into the cache folder.
    DownloadWeights(data::DownloadArgs),
    /// Build the feature bank (pooled patch features for nearest-neighbour search) of a run.
    Bank(bank::BankArgs),
    /// Find the patches most like the one at (X, Y) of an image; writes neighbours.png (a
    /// contact sheet) and neighbours.json into --out.
    Neighbours(bank::NeighboursArgs),
    /// Serve this machine's device (its GPU if it has one) to `--device remote:ws://HOST:PORT`
    /// clients on other machines, until Ctrl-C. Clients must present the token read from
    /// --token-file or $PICIE_REMOTE_TOKEN.
    Serve(serve::ServeArgs),
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
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
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Segment(args) => export::run_segment(args),
        Command::Export(args) => export::run_export(args),
        Command::DemoData(args) => data::run_demo_data(args),
        Command::Scan(args) => data::run_scan(args),
        Command::Devices => data::run_devices(),
        Command::DownloadWeights(args) => data::run_download(args),
        Command::Bank(args) => bank::run_bank(args),
        Command::Neighbours(args) => bank::run_neighbours(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench { which } => bench::run(which),
    }
}
