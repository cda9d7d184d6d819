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

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, TrainConfig};
use crate::fsutil;
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

mod metrics;
pub mod paths;

pub use metrics::{EpochRecord, Metrics, Score, SeedRow, SeedSummary, Spread};

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
        network.save(&paths::checkpoint_network(&partial), &Default::default())?;
        let optimizer_path = paths::checkpoint_optimizer(&partial);
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
            Ok(PicieNet::load(&paths::checkpoint_network(directory), device)?.0)
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
