//! The run folder, and the one place that knows its layout ([`paths`]): config, checkpoints
//! (written atomically, with the metrics), the final centroids, the writer's lock.
//!
//! ```text
//! RUN_DIR/config.json            the TrainConfig of the run
//! RUN_DIR/metrics.json           {"no_train": {...}, "epochs": [...]}
//! RUN_DIR/latest.json            {"epoch": N, "directory": "checkpoints/epoch-000N"}
//! RUN_DIR/checkpoints/epoch-000N/ network.safetensors, optimizer.bpk, state.json,
//!                                metrics.json (the run's metrics up to this epoch)
//! RUN_DIR/segmentation.json      centroids of the un-augmented images, for segment/export
//! RUN_DIR/.lock                  held by the one process writing the run (pid and command)
//! RUN_DIR/decoded/               decoded images of a dataset too large for memory, while
//!                                a training runs
//! ```
//! A checkpoint is written into a temporary folder that is renamed into place, and
//! `latest.json` is replaced only after that, so a crash never leaves a half checkpoint
//! behind as the latest one. The metrics travel inside the checkpoint, so an epoch's
//! checkpoint and its metrics are committed by the same rename; the top-level
//! `metrics.json` is a copy for readers. Only one process writes a run folder at a time: the
//! writer holds an operating-system lock on `.lock`, which the system releases when the
//! process ends, however it ends.

use std::fmt;
use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, TrainConfig};
use crate::fsutil;
use crate::loss::LossTerms;
use crate::model::{PicieNet, WeightsError};

/// Errors of reading and writing a run folder; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file or folder could not be written.
    #[error("cannot write {path}: {source}. Check free disk space and write permission")]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The folder is not a run folder.
    #[error(
        "{0} is not a PiCIE run folder (no config.json); train one with `picie train --out DIR`"
    )]
    NotARun(PathBuf),
    /// The run has no checkpoint yet.
    #[error(
        "run {0} has no checkpoint yet (it was stopped or failed before its first epoch \
         ended); train it again with `picie train --out {0}` and the same settings"
    )]
    NoCheckpoint(PathBuf),
    /// Another process is writing the run folder.
    #[error(
        "run folder {root} is in use by another PiCIE process ({holder}); wait for it to \
         finish or stop it, or choose another folder"
    )]
    Busy {
        /// The run folder.
        root: PathBuf,
        /// Who holds it: pid and command line, as the holder wrote them.
        holder: String,
    },
    /// A new run was asked for in a folder that already holds one.
    #[error(
        "{root} already holds a run (trained to epoch {epoch}); continue it with --resume, \
         choose another --out, or pass --overwrite to move the old run aside"
    )]
    Exists {
        /// The run folder.
        root: PathBuf,
        /// The epoch of its latest checkpoint.
        epoch: usize,
    },
    /// A resumed run was given settings that differ from the recorded ones.
    #[error(
        "run {root} continues with its recorded settings, but these differ: {changes}. Leave \
         them out to continue the run, or start a new run (another --out) to change them"
    )]
    ResumeChanges {
        /// The run folder.
        root: PathBuf,
        /// The settings that differ, each as `name recorded -> asked`.
        changes: String,
    },
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A network file problem.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// One line of `metrics.json`'s `epochs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Pixel accuracy in percent (with labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc: Option<f64>,
    /// Mean IoU in percent (with labels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miou: Option<f64>,
    /// Scores on the held-out images, when the run holds some out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<Score>,
    /// Seconds spent computing features and clustering.
    pub seconds_clustering: f64,
    /// Seconds spent optimising.
    pub seconds_training: f64,
    /// Seconds spent evaluating (and collecting the feature bank from the same pass).
    pub seconds_evaluation: f64,
    /// Seconds the view thread spent building the two views, in both passes (beside the
    /// network's work, so part of it overlaps clustering and training).
    #[serde(default)]
    pub seconds_views: f64,
    /// Seconds of the clustering phase spent in k-means and labelling (the rest computes
    /// the features of both views).
    #[serde(default)]
    pub seconds_kmeans: f64,
    /// Seconds spent writing the checkpoint, the feature bank and the metrics.
    #[serde(default)]
    pub seconds_saving: f64,
    /// Training throughput.
    pub images_per_second: f64,
    /// Mean loss terms over the epoch.
    pub loss: LossTerms,
    /// Share of the preview images' pixels whose cluster changed since the previous epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_change: Option<f64>,
}

/// Score on the labels, as written to `metrics.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Score {
    /// Pixel accuracy in percent.
    pub acc: f64,
    /// Mean IoU in percent.
    pub miou: f64,
}

/// The contents of `metrics.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// The untrained network, scored with the same code path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_train: Option<Score>,
    /// The untrained network on the held-out images, when the run holds some out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_train_held_out: Option<Score>,
    /// One record per trained epoch.
    pub epochs: Vec<EpochRecord>,
}

/// Mean and spread of a score over runs with different seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Mean over the runs.
    pub mean: f64,
    /// Sample standard deviation (0 for one run).
    pub std: f64,
    /// Lowest value.
    pub min: f64,
    /// Highest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let count = values.len() as f64;
        let mean = values.iter().sum::<f64>() / count;
        let variance = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (count - 1.0)
        } else {
            0.0
        };
        Some(Self {
            mean,
            std: variance.sqrt(),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} ± {:.2}", self.mean, self.std)
    }
}

/// One epoch (0: the untrained network) of a [`SeedSummary`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedRow {
    /// Epoch, 0 for no training.
    pub epoch: usize,
    /// Runs that reached this epoch.
    pub runs: usize,
    /// Pixel accuracy on the training images.
    pub acc: Option<Spread>,
    /// Mean IoU on the training images.
    pub miou: Option<Spread>,
    /// Pixel accuracy on the held-out images.
    pub held_out_acc: Option<Spread>,
    /// Mean IoU on the held-out images.
    pub held_out_miou: Option<Spread>,
}

/// One run's scores at one epoch.
struct EpochScores {
    acc: Option<f64>,
    miou: Option<f64>,
    held_out: Option<Score>,
}

/// Scores of runs that differ only in their seed, epoch by epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedSummary {
    /// The seeds, in run order.
    pub seeds: Vec<u64>,
    /// One row per epoch that any run reached, from 0.
    pub rows: Vec<SeedRow>,
}

impl SeedSummary {
    /// The summary of `(seed, metrics)` of each run.
    pub fn new(runs: &[(u64, Metrics)]) -> Self {
        let last = runs
            .iter()
            .flat_map(|(_, metrics)| metrics.epochs.iter().map(|record| record.epoch))
            .max()
            .unwrap_or(0);
        let rows = (0..=last)
            .map(|epoch| {
                // Each run's scores at this epoch.
                let scores: Vec<EpochScores> = runs
                    .iter()
                    .filter_map(|(_, metrics)| {
                        if epoch == 0 {
                            Some(EpochScores {
                                acc: metrics.no_train.as_ref().map(|s| s.acc),
                                miou: metrics.no_train.as_ref().map(|s| s.miou),
                                held_out: metrics.no_train_held_out.clone(),
                            })
                        } else {
                            metrics
                                .epochs
                                .iter()
                                .find(|record| record.epoch == epoch)
                                .map(|record| EpochScores {
                                    acc: record.acc,
                                    miou: record.miou,
                                    held_out: record.held_out.clone(),
                                })
                        }
                    })
                    .collect();
                let collect = |pick: fn(&EpochScores) -> Option<f64>| {
                    Spread::of(&scores.iter().filter_map(pick).collect::<Vec<_>>())
                };
                SeedRow {
                    epoch,
                    runs: scores.len(),
                    acc: collect(|s| s.acc),
                    miou: collect(|s| s.miou),
                    held_out_acc: collect(|s| s.held_out.as_ref().map(|h| h.acc)),
                    held_out_miou: collect(|s| s.held_out.as_ref().map(|h| h.miou)),
                }
            })
            .collect();
        Self {
            seeds: runs.iter().map(|(seed, _)| *seed).collect(),
            rows,
        }
    }

    /// A plain-text table: mean ± sample standard deviation per epoch.
    pub fn table(&self) -> String {
        let cell = |spread: &Option<Spread>| spread.map_or("-".to_owned(), |s| s.to_string());
        let mut out = format!(
            "{:<8} {:>5} {:>15} {:>15} {:>17} {:>17}\n",
            "epoch", "runs", "Acc", "mIoU", "held-out Acc", "held-out mIoU"
        );
        for row in &self.rows {
            let epoch = if row.epoch == 0 {
                "no train".to_owned()
            } else {
                row.epoch.to_string()
            };
            out.push_str(&format!(
                "{:<8} {:>5} {:>15} {:>15} {:>17} {:>17}\n",
                epoch,
                row.runs,
                cell(&row.acc),
                cell(&row.miou),
                cell(&row.held_out_acc),
                cell(&row.held_out_miou)
            ));
        }
        out
    }
}

/// What a checkpoint holds besides the network and the optimiser.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The epoch this checkpoint ends.
    pub epoch: usize,
    /// The run's seed. With the epoch it determines every later random draw (views, batch
    /// order, k-means init are seeded per epoch), so it is the whole RNG state.
    pub seed: u64,
    /// Clusters K.
    pub clusters: usize,
    /// Feature dimension.
    pub dim: usize,
    /// View-1 centroids of this epoch, K x dim row-major.
    pub centroids_first: Vec<f32>,
    /// View-2 centroids of this epoch.
    pub centroids_second: Vec<f32>,
}

/// Centroids of the un-augmented images, used to segment and export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentationCentroids {
    /// The epoch of the network they were computed with (0: untrained).
    pub epoch: usize,
    /// Clusters K.
    pub clusters: usize,
    /// Feature dimension.
    pub dim: usize,
    /// K x dim row-major unit vectors.
    pub centroids: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Latest {
    epoch: usize,
    directory: String,
}

/// The writer's lock on a run folder: an operating-system file lock on `RUN_DIR/.lock`,
/// released when this value is dropped or the process ends (a kill included), so a lock is
/// never left stale by a dead process.
#[derive(Debug)]
pub struct RunLock {
    // Held open for the lock; the lock goes with the handle.
    _file: fs::File,
}

impl RunLock {
    /// Takes the lock of `root` (created if missing), or says who holds it.
    pub fn acquire(root: &Path) -> Result<Self, RunError> {
        fs::create_dir_all(root).map_err(write_error(root))?;
        let path = root.join(".lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(write_error(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(RunError::Busy {
                    root: root.to_owned(),
                    holder: if holder.is_empty() {
                        "a process that is starting".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(RunError::Write { path, source });
            }
        }
        // Who holds it, for the message a second writer gets.
        let command: Vec<String> = std::env::args().collect();
        let holder = format!("pid {}: {}", std::process::id(), command.join(" "));
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(holder.as_bytes()))
            .and_then(|()| file.flush());
        written.map_err(write_error(&path))?;
        Ok(Self { _file: file })
    }
}

/// What a new run does when its folder already holds a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExistingRun {
    /// Refuse with [`RunError::Exists`].
    #[default]
    Refuse,
    /// Move the old run's files into a new sibling folder `NAME.replaced-N` first.
    MoveAside,
}

/// Where each file of a run folder lives: the one place that joins a name onto a run folder.
/// Functions, not methods, because the app and the bank address folders they have not
/// opened as a [`RunFolder`].
pub mod paths {
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
}

/// A run folder on disk. Values made by [`RunFolder::create`] and
/// [`RunFolder::open_for_writing`] hold the folder's lock (shared by clones) for as long as
/// one of them lives.
#[derive(Debug, Clone)]
pub struct RunFolder {
    root: PathBuf,
    lock: Option<Arc<RunLock>>,
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Write {
        path: path.to_owned(),
        source,
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RunError> {
    let text = fs::read_to_string(path).map_err(|error| RunError::Read {
        path: path.to_owned(),
        reason: error.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|error| RunError::Read {
        path: path.to_owned(),
        reason: error.to_string(),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RunError> {
    let text = serde_json::to_string_pretty(value).map_err(|error| RunError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(error),
    })?;
    fsutil::write_bytes_atomic(path, text.as_bytes()).map_err(write_error(path))
}

impl RunFolder {
    /// Starts a new run in `root` and saves `config` in it, holding the folder's lock.
    ///
    /// A folder that already holds a run (one with a checkpoint) is refused, or with
    /// [`ExistingRun::MoveAside`] its files are moved into a sibling folder, whose path is
    /// returned. Files of a start that never finished an epoch are replaced.
    pub fn create(
        root: &Path,
        config: &TrainConfig,
        existing: ExistingRun,
    ) -> Result<(Self, Option<PathBuf>), RunError> {
        let lock = RunLock::acquire(root)?;
        let run = Self {
            root: root.to_owned(),
            lock: Some(Arc::new(lock)),
        };
        let mut moved_to = None;
        if let Some(epoch) = run.newest_checkpoint_epoch() {
            match existing {
                ExistingRun::Refuse => {
                    return Err(RunError::Exists {
                        root: root.to_owned(),
                        epoch,
                    });
                }
                ExistingRun::MoveAside => moved_to = Some(run.move_aside()?),
            }
        } else {
            // Leftovers of a start that failed before its first checkpoint.
            for name in ["metrics.json", "segmentation.json", "latest.json"] {
                let path = root.join(name);
                if path.exists() {
                    fs::remove_file(&path).map_err(write_error(&path))?;
                }
            }
        }
        fs::create_dir_all(root.join("checkpoints")).map_err(write_error(root))?;
        config.save(&run.config_path())?;
        Ok((run, moved_to))
    }

    /// Opens an existing run folder to continue it, holding the folder's lock.
    pub fn open_for_writing(root: &Path) -> Result<Self, RunError> {
        let mut run = Self::open(root)?;
        run.lock = Some(Arc::new(RunLock::acquire(root)?));
        Ok(run)
    }

    /// Opens an existing run folder for reading.
    pub fn open(root: &Path) -> Result<Self, RunError> {
        let run = Self {
            root: root.to_owned(),
            lock: None,
        };
        if !run.config_path().is_file() {
            return Err(RunError::NotARun(root.to_owned()));
        }
        Ok(run)
    }

    /// Whether this value holds the folder's writer lock.
    pub fn is_locked(&self) -> bool {
        self.lock.is_some()
    }

    /// The epoch of the newest checkpoint folder, whatever `latest.json` says.
    fn newest_checkpoint_epoch(&self) -> Option<usize> {
        let latest = self
            .latest_checkpoint()
            .ok()
            .flatten()
            .map(|(_, state)| state.epoch);
        let folders = self
            .checkpoint_folders()
            .into_iter()
            .map(|(epoch, _)| epoch)
            .max();
        latest.max(folders)
    }

    /// Checkpoint folders `(epoch, path)`, oldest first (temporary ones left out).
    fn checkpoint_folders(&self) -> Vec<(usize, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.root.join("checkpoints")) else {
            return Vec::new();
        };
        let mut folders: Vec<(usize, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let epoch = name.strip_prefix("epoch-")?.parse().ok()?;
                Some((epoch, entry.path()))
            })
            .collect();
        folders.sort();
        folders
    }

    /// Moves every file of the run but the lock into a new sibling folder `NAME.replaced-N`.
    fn move_aside(&self) -> Result<PathBuf, RunError> {
        let name = self
            .root
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".to_owned());
        let parent = self.root.parent().unwrap_or(Path::new("."));
        let mut aside = parent.join(format!("{name}.replaced-1"));
        for n in 2.. {
            if !aside.exists() {
                break;
            }
            aside = parent.join(format!("{name}.replaced-{n}"));
        }
        fs::create_dir(&aside).map_err(write_error(&aside))?;
        let entries = fs::read_dir(&self.root).map_err(write_error(&self.root))?;
        for entry in entries {
            let entry = entry.map_err(write_error(&self.root))?;
            if entry.file_name() == ".lock" {
                continue;
            }
            let target = aside.join(entry.file_name());
            fs::rename(entry.path(), &target).map_err(write_error(&target))?;
        }
        Ok(aside)
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        paths::config(&self.root)
    }

    /// `metrics.json`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.json")
    }

    /// The run's configuration.
    pub fn config(&self) -> Result<TrainConfig, RunError> {
        Ok(TrainConfig::load(&self.config_path())?)
    }

    /// The metrics so far (empty if none were written). The copy committed with the latest
    /// checkpoint wins when it has more epochs than `metrics.json` (a process killed between
    /// the two writes).
    pub fn metrics(&self) -> Result<Metrics, RunError> {
        let path = self.metrics_path();
        let top = if path.exists() {
            Some(read_json::<Metrics>(&path)?)
        } else {
            None
        };
        let committed = self
            .latest_checkpoint()
            .ok()
            .flatten()
            .map(|(directory, _)| directory.join("metrics.json"))
            .filter(|path| path.is_file())
            .and_then(|path| read_json::<Metrics>(&path).ok());
        Ok(match (top, committed) {
            (Some(top), Some(committed)) if committed.epochs.len() > top.epochs.len() => committed,
            (Some(top), _) => top,
            (None, committed) => committed.unwrap_or_default(),
        })
    }

    /// The metrics committed with a checkpoint (empty for checkpoints written before
    /// checkpoints carried them).
    pub fn checkpoint_metrics(&self, directory: &Path) -> Result<Metrics, RunError> {
        let path = directory.join("metrics.json");
        if path.is_file() {
            read_json(&path)
        } else {
            self.metrics()
        }
    }

    /// Replaces `metrics.json`.
    pub fn write_metrics(&self, metrics: &Metrics) -> Result<(), RunError> {
        write_json(&self.metrics_path(), metrics)
    }

    /// Writes the checkpoint of an epoch with the run's `metrics` atomically and makes it the
    /// latest, then copies the metrics to `metrics.json`; keeps the checkpoint it follows and
    /// deletes older ones.
    pub fn write_checkpoint(
        &self,
        state: &CheckpointState,
        network: &PicieNet,
        optimizer: &burn::optim::ModuleOptimizer,
        metrics: &Metrics,
    ) -> Result<(), RunError> {
        let checkpoints = self.root.join("checkpoints");
        let name = format!("epoch-{:04}", state.epoch);
        let partial = checkpoints.join(format!(".{name}.partial"));
        let final_dir = checkpoints.join(&name);
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(write_error(&partial))?;
        }
        fs::create_dir_all(&partial).map_err(write_error(&partial))?;
        network.save(&partial.join("network.safetensors"), &Default::default())?;
        let optimizer_path = partial.join("optimizer.bpk");
        optimizer
            .save(&optimizer_path)
            .map_err(|error| RunError::Write {
                path: optimizer_path.clone(),
                source: std::io::Error::other(format!("{error:?}")),
            })?;
        write_json(&partial.join("state.json"), state)?;
        write_json(&partial.join("metrics.json"), metrics)?;
        let previous = self
            .latest_checkpoint()
            .ok()
            .flatten()
            .map(|(directory, _)| directory);
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(write_error(&final_dir))?;
        }
        fs::rename(&partial, &final_dir).map_err(write_error(&final_dir))?;
        write_json(
            &self.root.join("latest.json"),
            &Latest {
                epoch: state.epoch,
                directory: format!("checkpoints/{name}"),
            },
        )?;
        self.write_metrics(metrics)?;
        // Keep this checkpoint and the one it follows (the fallback if this one is damaged);
        // older ones only cost disk.
        for (_, path) in self.checkpoint_folders() {
            let keep = path == final_dir || previous.as_ref() == Some(&path);
            if !keep {
                let _ = fs::remove_dir_all(&path);
            }
        }
        Ok(())
    }

    /// The latest checkpoint's folder and state, if there is one.
    pub fn latest_checkpoint(&self) -> Result<Option<(PathBuf, CheckpointState)>, RunError> {
        let latest_path = self.root.join("latest.json");
        if !latest_path.exists() {
            return Ok(None);
        }
        let latest: Latest = read_json(&latest_path)?;
        let directory = self.root.join(&latest.directory);
        let state: CheckpointState = read_json(&directory.join("state.json"))?;
        Ok(Some((directory, state)))
    }

    /// Loads the newest checkpoint that `load` accepts: the latest, then older ones on disk.
    /// When the latest is damaged, the returned note says so and names the one used. No
    /// usable checkpoint: the latest's problem, or [`RunError::NoCheckpoint`].
    pub fn load_newest<T>(
        &self,
        mut load: impl FnMut(&Path, &CheckpointState) -> Result<T, RunError>,
    ) -> Result<(T, PathBuf, CheckpointState, Option<String>), RunError> {
        let mut problems = Vec::new();
        let mut candidates = Vec::new();
        match self.latest_checkpoint() {
            Ok(Some(latest)) => candidates.push(latest),
            Ok(None) => {}
            Err(error) => problems.push(error),
        }
        for (_, directory) in self.checkpoint_folders().into_iter().rev() {
            if candidates.iter().any(|(path, _)| *path == directory) {
                continue;
            }
            match read_json::<CheckpointState>(&directory.join("state.json")) {
                Ok(state) => candidates.push((directory, state)),
                Err(error) => problems.push(error),
            }
        }
        for (directory, state) in candidates {
            match load(&directory, &state) {
                Ok(value) => {
                    let note = problems.first().map(|problem| {
                        format!(
                            "the latest checkpoint of {} is damaged ({problem}); using the \
                             intact checkpoint of epoch {} instead",
                            self.root.display(),
                            state.epoch
                        )
                    });
                    return Ok((value, directory, state, note));
                }
                Err(error) => problems.push(error),
            }
        }
        Err(problems
            .into_iter()
            .next()
            .unwrap_or_else(|| RunError::NoCheckpoint(self.root.clone())))
    }

    /// The network of the newest checkpoint that loads, its epoch, and a note when the
    /// latest was damaged and an older one is used.
    pub fn latest_network(
        &self,
        device: &burn::tensor::Device,
    ) -> Result<(PicieNet, usize, Option<String>), RunError> {
        let (network, _, state, note) = self.load_newest(|directory, _| {
            Ok(PicieNet::load(&directory.join("network.safetensors"), device)?.0)
        })?;
        Ok((network, state.epoch, note))
    }

    /// `segmentation.json`.
    pub fn segmentation_path(&self) -> PathBuf {
        self.root.join("segmentation.json")
    }

    /// Saves the centroids used to segment and export.
    pub fn write_segmentation(&self, centroids: &SegmentationCentroids) -> Result<(), RunError> {
        write_json(&self.segmentation_path(), centroids)
    }

    /// The centroids used to segment and export.
    pub fn segmentation(&self) -> Result<SegmentationCentroids, RunError> {
        read_json(&self.segmentation_path())
    }
}
