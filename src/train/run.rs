//! The run folder: config, checkpoints (written atomically), metrics and the final centroids.
//!
//! ```text
//! RUN_DIR/config.json            the TrainConfig of the run
//! RUN_DIR/metrics.json           {"no_train": {...}, "epochs": [...]}
//! RUN_DIR/latest.json            {"epoch": N, "directory": "checkpoints/epoch-000N"}
//! RUN_DIR/checkpoints/epoch-000N/ network.safetensors, optimizer.bpk, state.json, labels.bin
//! RUN_DIR/segmentation.json      centroids of the un-augmented images, for segment/export
//! ```
//! A checkpoint is written into a temporary folder that is renamed into place, and
//! `latest.json` is replaced only after that, so a crash never leaves a half checkpoint
//! behind as the latest one.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::events::EpochRecord;
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
    #[error("run {0} has no checkpoint yet; train it first")]
    NoCheckpoint(PathBuf),
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A network file problem.
    #[error(transparent)]
    Weights(#[from] WeightsError),
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
    /// One record per trained epoch.
    pub epochs: Vec<EpochRecord>,
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

/// A run folder on disk.
#[derive(Debug, Clone)]
pub struct RunFolder {
    root: PathBuf,
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
    /// Creates (or reuses) a run folder and saves `config` in it.
    pub fn create(root: &Path, config: &TrainConfig) -> Result<Self, RunError> {
        fs::create_dir_all(root.join("checkpoints")).map_err(write_error(root))?;
        let run = Self {
            root: root.to_owned(),
        };
        config.save(&run.config_path())?;
        Ok(run)
    }

    /// Opens an existing run folder.
    pub fn open(root: &Path) -> Result<Self, RunError> {
        let run = Self {
            root: root.to_owned(),
        };
        if !run.config_path().is_file() {
            return Err(RunError::NotARun(root.to_owned()));
        }
        Ok(run)
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// `metrics.json`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.json")
    }

    /// The run's configuration.
    pub fn config(&self) -> Result<TrainConfig, RunError> {
        Ok(TrainConfig::load(&self.config_path())?)
    }

    /// The metrics so far (empty if none were written).
    pub fn metrics(&self) -> Result<Metrics, RunError> {
        let path = self.metrics_path();
        if !path.exists() {
            return Ok(Metrics::default());
        }
        read_json(&path)
    }

    /// Replaces `metrics.json`.
    pub fn write_metrics(&self, metrics: &Metrics) -> Result<(), RunError> {
        write_json(&self.metrics_path(), metrics)
    }

    /// Writes the checkpoint of an epoch atomically and makes it the latest; keeps the
    /// previous one and deletes older ones.
    pub fn write_checkpoint(
        &self,
        state: &CheckpointState,
        network: &PicieNet,
        optimizer: &burn::optim::ModuleOptimizer,
        labels_first: &[u8],
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
        let labels_path = partial.join("labels.bin");
        fsutil::write_bytes_atomic(&labels_path, labels_first)
            .map_err(write_error(&labels_path))?;
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
        // Keep this checkpoint and the one before; older ones only cost disk.
        if let Ok(entries) = fs::read_dir(&checkpoints) {
            let mut epochs: Vec<(usize, PathBuf)> = entries
                .filter_map(Result::ok)
                .filter_map(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let epoch = name.strip_prefix("epoch-")?.parse().ok()?;
                    Some((epoch, entry.path()))
                })
                .collect();
            epochs.sort();
            let keep_from = epochs.len().saturating_sub(2);
            for (_, path) in &epochs[..keep_from] {
                let _ = fs::remove_dir_all(path);
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

    /// The view-1 labels saved with a checkpoint.
    pub fn checkpoint_labels(directory: &Path) -> Result<Vec<u8>, RunError> {
        let path = directory.join("labels.bin");
        fs::read(&path).map_err(|error| RunError::Read {
            path,
            reason: error.to_string(),
        })
    }

    /// The network of the latest checkpoint.
    pub fn latest_network(
        &self,
        device: &burn::tensor::Device,
    ) -> Result<(PicieNet, usize), RunError> {
        let (directory, state) = self
            .latest_checkpoint()?
            .ok_or_else(|| RunError::NoCheckpoint(self.root.clone()))?;
        let (network, _) = PicieNet::load(&directory.join("network.safetensors"), device)?;
        Ok((network, state.epoch))
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
