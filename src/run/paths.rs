//! Where each file of a run folder lives: the one place that joins a name onto a run folder.
//! Functions, not methods, because the app and the bank address folders they have not
//! opened as a [`RunFolder`](super::RunFolder).

use std::path::{Path, PathBuf};

/// The app's folder inside a run folder.
pub const EXPLORER_DIR: &str = "explorer";
/// The app's session record, inside [`EXPLORER_DIR`].
pub const SESSION_FILE: &str = "session.json";
/// The app's snapshot log, inside [`EXPLORER_DIR`].
pub const SNAPSHOTS_FILE: &str = "snapshots.jsonl";
/// Cluster names, colours and merges.
pub const LABELMAP_FILE: &str = "labelmap.json";
/// The feature bank's folder.
pub const BANK_DIR: &str = "bank";

/// A new run folder in `runs` for a dataset called `dataset_name`:
/// `<runs>/<name>-<YYYYMMDD-HHMMSS>` (UTC), the name kept to letters, digits and `-`.
pub fn timestamped(runs: &Path, dataset_name: &str) -> PathBuf {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S");
    let name: String = dataset_name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    runs.join(format!("{name}-{stamp}"))
}

/// A checkpoint folder's network (`checkpoints/epoch-000N/network.safetensors`).
pub fn checkpoint_network(checkpoint: &Path) -> PathBuf {
    checkpoint.join("network.safetensors")
}

/// A checkpoint folder's optimiser state (`checkpoints/epoch-000N/optimizer.bpk`).
pub fn checkpoint_optimizer(checkpoint: &Path) -> PathBuf {
    checkpoint.join("optimizer.bpk")
}

/// `config.json`: marks a run folder.
pub fn config(root: &Path) -> PathBuf {
    root.join("config.json")
}

/// `explorer/session.json`.
pub fn session(root: &Path) -> PathBuf {
    root.join(EXPLORER_DIR).join(SESSION_FILE)
}

/// `explorer/snapshots.jsonl`.
pub fn snapshots(root: &Path) -> PathBuf {
    root.join(EXPLORER_DIR).join(SNAPSHOTS_FILE)
}

/// `labelmap.json`.
pub fn label_map(root: &Path) -> PathBuf {
    root.join(LABELMAP_FILE)
}

/// `bank/`.
pub fn bank(root: &Path) -> PathBuf {
    root.join(BANK_DIR)
}

/// `.bank.partial-PID/`: where a new bank is written before it is renamed into place.
pub fn bank_partial(root: &Path) -> PathBuf {
    root.join(format!(".{BANK_DIR}.partial-{}", std::process::id()))
}

/// `.bank.streaming-PID/`: where the trainer writes an epoch's bank as its features are
/// computed, before it is renamed into place with the epoch's checkpoint.
pub fn bank_streaming(root: &Path) -> PathBuf {
    root.join(format!(".{BANK_DIR}.streaming-{}", std::process::id()))
}

/// `.bank.old-PID/`: where the previous bank waits while the new one is renamed in.
pub fn bank_old(root: &Path) -> PathBuf {
    root.join(format!(".{BANK_DIR}.old-{}", std::process::id()))
}

/// `decoded/`: the cache files of a dataset too large to keep decoded in memory, while a
/// training runs (removed when it ends).
pub fn decoded(root: &Path) -> PathBuf {
    root.join("decoded")
}

/// `.decoded-eval-PID/`: [`decoded`] for `picie eval` of a large dataset, which reads the
/// run (perhaps while it trains) and keeps its cache to itself.
pub fn decoded_for_eval(root: &Path) -> PathBuf {
    root.join(format!(".decoded-eval-{}", std::process::id()))
}

/// `decoded-bank/`: [`decoded`] for a bank built after training (by `picie bank` or the
/// app), which may run beside a training of the same folder.
pub fn decoded_for_bank(root: &Path) -> PathBuf {
    root.join("decoded-bank")
}

/// `features/NAME/`: where a view's pixel features spill past the memory budget.
pub fn feature_spill(root: &Path, name: &str) -> PathBuf {
    root.join("features").join(name)
}
