//! Every hyperparameter of a run, with the seed, in one struct saved in the run folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::{KMeansConfig, KMeansInit};
use crate::device::DeviceChoice;
use crate::loss::BalanceMode;
use crate::model::BackboneKind;

/// Default side of a feature-bank patch in input pixels.
pub const DEFAULT_BANK_PATCH: usize = 8;

/// How BatchNorm behaves while features are computed for clustering.
///
/// Batch statistics need the autodiff graph, which burn only frees on a backward pass, so the
/// modes with train-mode features cost an extra (empty) backward per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterBatchNorm {
    /// Batch statistics (the network in train mode) for centroids and labels, as our compact
    /// PyTorch version (`torch_picie_train.py --cluster-bn train`).
    Train,
    /// Running statistics for centroids and labels.
    #[default]
    Eval,
    /// As the authors' code: centroids from train-mode features, labels from a second pass
    /// in eval mode (twice the forward passes of the clustering phase).
    Reference,
}

/// How the learning rate changes over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LearningRateSchedule {
    /// The same rate for every step, as the reference.
    #[default]
    Constant,
    /// Half a cosine from the set rate at the first step down to zero after the last epoch:
    /// early epochs move fast and the last ones settle (the from-scratch demo's clusters rose
    /// and fell again at a constant rate).
    Cosine,
}

impl LearningRateSchedule {
    /// The rate for a step `progress` of the way through the run (0 at the first step, 1
    /// after the last), for a set rate of `base`.
    pub fn rate(self, base: f64, progress: f64) -> f64 {
        match self {
            Self::Constant => base,
            Self::Cosine => {
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos())
            }
        }
    }
}

/// How the logits at feature resolution become a per-pixel map for evaluation, `segment` and
/// export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Upsampling {
    /// Bilinear, as the reference.
    Bilinear,
    /// Joint bilateral upsampling guided by the image: cluster borders follow colour edges
    /// (on CamVid, 3 seeds: +2.7 Acc / +1.1 mIoU on the training images, +0.8 / +0.3 held out).
    #[default]
    Bilateral,
}

/// The configuration of a training run. Missing fields in a config file take the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Backbone network.
    pub backbone: BackboneKind,
    /// Starting weights (torchvision .pth or our checkpoint); `None`: the downloaded ImageNet
    /// file if present, else random init.
    pub weights: Option<PathBuf>,
    /// Start the backbone from random weights even when torchvision's ImageNet file is in the
    /// cache (`weights` must then be `None`).
    pub random_init: bool,
    /// Where to train.
    pub device: DeviceChoice,
    /// Clusters K; `None`: the number of label classes when labels are given, else 27.
    pub clusters: Option<usize>,
    /// Optional overclustering head K2 (PiCIE + H); `None` disables it.
    pub overclusters: Option<usize>,
    /// Base image side: shorter side resized to this, then centre-cropped.
    pub base_size: u32,
    /// Network input side for training views and evaluation.
    pub input_size: u32,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Adam's epsilon (PyTorch's and the authors' 1e-8; burn's own default is 1e-5).
    pub adam_epsilon: f64,
    /// How the learning rate changes over the run.
    pub learning_rate_schedule: LearningRateSchedule,
    /// Epochs of (cluster both views, label, optimise).
    pub epochs: usize,
    /// Class weights of the cross-entropy.
    pub balance: BalanceMode,
    /// Lloyd iterations of k-means.
    pub kmeans_iterations: usize,
    /// How k-means picks its first centroids (random points, as faiss in the reference).
    pub kmeans_init: KMeansInit,
    /// Start each epoch's k-means of the training views from the previous epoch's centroids
    /// instead of afresh (the reference starts afresh), so clusters keep their meaning from
    /// epoch to epoch.
    pub kmeans_warm_start: bool,
    /// k-means runs when the un-augmented images are clustered (evaluation, and the centroids
    /// `segment` and export use), keeping the lowest inertia. The clustering of the training
    /// views runs once, as the reference.
    pub eval_kmeans_restarts: usize,
    /// BatchNorm mode during the clustering pass.
    pub cluster_batch_norm: ClusterBatchNorm,
    /// Clusters for evaluation; `None`: the number of label classes.
    pub eval_clusters: Option<usize>,
    /// Images whose relative path starts with this are not trained on but scored beside the
    /// training images after every epoch (a held-out split); `None`: train on every image.
    pub held_out_prefix: Option<String>,
    /// Average the features of each image and of its mirror image before clustering and
    /// labelling in evaluation, `segment` and export (test-time flip; twice the forward passes).
    pub test_time_flip: bool,
    /// How logits are brought to pixel resolution in evaluation, `segment` and export.
    pub upsampling: Upsampling,
    /// Images whose cluster maps are sent to observers.
    pub preview_images: usize,
    /// Also send preview maps every this many steps (0: once per epoch).
    pub preview_every_steps: usize,
    /// The one seed of the run: views, batch order, k-means and initial weights.
    pub seed: u64,
    /// Build the feature bank (pooled patch features of every image, for nearest-neighbour
    /// search) into the run folder after every epoch's checkpoint.
    pub feature_bank: bool,
    /// Side of a feature-bank patch in input pixels: a multiple of 4 dividing `input_size`.
    pub bank_patch: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneKind::Resnet18,
            weights: None,
            random_init: false,
            device: DeviceChoice::Auto,
            clusters: None,
            overclusters: None,
            base_size: 320,
            input_size: 160,
            batch_size: 16,
            learning_rate: 1e-4,
            adam_epsilon: 1e-8,
            learning_rate_schedule: LearningRateSchedule::Constant,
            epochs: 10,
            balance: BalanceMode::Reference,
            kmeans_iterations: 20,
            kmeans_init: KMeansInit::Random,
            kmeans_warm_start: false,
            eval_kmeans_restarts: 5,
            cluster_batch_norm: ClusterBatchNorm::Eval,
            eval_clusters: None,
            held_out_prefix: None,
            test_time_flip: false,
            upsampling: Upsampling::Bilateral,
            preview_images: 8,
            preview_every_steps: 0,
            seed: 0,
            feature_bank: true,
            bank_patch: DEFAULT_BANK_PATCH,
        }
    }
}

/// Errors of reading, writing or checking a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid JSON for a config.
    #[error("config file {path} is not valid: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The file could not be written.
    #[error("cannot write config file {path}: {source}. Check free disk space and permissions")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl TrainConfig {
    /// The settings a resumed run cannot change, each as `name recorded -> asked`, where
    /// `self` is what was asked and `recorded` the run's config. The epochs, the device, the
    /// starting weights and the previews may change.
    pub fn resume_conflicts(&self, recorded: &TrainConfig) -> Vec<String> {
        let mut conflicts = Vec::new();
        macro_rules! compare {
            ($($field:ident),*) => {$(
                if self.$field != recorded.$field {
                    conflicts.push(format!(
                        "{} {:?} -> {:?}",
                        stringify!($field).replace('_', " "),
                        recorded.$field,
                        self.$field
                    ));
                }
            )*};
        }
        compare!(
            backbone,
            clusters,
            overclusters,
            base_size,
            input_size,
            batch_size,
            learning_rate,
            adam_epsilon,
            learning_rate_schedule,
            balance,
            kmeans_iterations,
            kmeans_init,
            kmeans_warm_start,
            cluster_batch_norm,
            eval_clusters,
            held_out_prefix,
            seed,
            feature_bank,
            bank_patch
        );
        conflicts
    }

    /// Reads a JSON config file; fields it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            reason: error.to_string(),
        })
    }

    /// Writes the config as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|error| ConfigError::Invalid(error.to_string()))?;
        crate::fsutil::write_bytes_atomic(path, text.as_bytes()).map_err(|source| {
            ConfigError::Write {
                path: path.to_owned(),
                source,
            }
        })
    }

    /// Checks the values that would otherwise fail deep inside training.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.input_size < 32 || !self.input_size.is_multiple_of(32) {
            return invalid(format!(
                "input_size {} must be a multiple of 32 and at least 32",
                self.input_size
            ));
        }
        if self.base_size < self.input_size {
            return invalid(format!(
                "base_size {} must be at least input_size {}",
                self.base_size, self.input_size
            ));
        }
        if self.random_init && self.weights.is_some() {
            return invalid("random_init and weights exclude each other: choose one".into());
        }
        if self.batch_size == 0 {
            return invalid("batch_size must be at least 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return invalid(format!(
                "learning_rate {} must be positive",
                self.learning_rate
            ));
        }
        for (name, value) in [
            ("clusters", self.clusters),
            ("overclusters", self.overclusters),
            ("eval_clusters", self.eval_clusters),
        ] {
            if let Some(k) = value
                && !(2..=u16::MAX as usize).contains(&k)
            {
                return invalid(format!("{name} {k} must be between 2 and 65535"));
            }
        }
        if self.kmeans_iterations == 0 {
            return invalid("kmeans_iterations must be at least 1".into());
        }
        if self.eval_kmeans_restarts == 0 {
            return invalid("eval_kmeans_restarts must be at least 1".into());
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            return invalid(format!(
                "adam_epsilon {} must be positive",
                self.adam_epsilon
            ));
        }
        if self.held_out_prefix.as_deref() == Some("") {
            return invalid(
                "held_out_prefix is empty, which would hold out every image: name a file name \
                 prefix such as 0006R0_"
                    .into(),
            );
        }
        if self.feature_bank
            && (self.bank_patch == 0
                || !self.bank_patch.is_multiple_of(crate::model::FEATURE_STRIDE)
                || !(self.input_size as usize).is_multiple_of(self.bank_patch))
        {
            return invalid(format!(
                "bank_patch {} must be a multiple of 4 that divides input_size {} (or set feature_bank to false)",
                self.bank_patch, self.input_size
            ));
        }
        Ok(())
    }

    /// K for a dataset with `classes` label classes (if labelled).
    pub fn clusters_for(&self, classes: Option<usize>) -> usize {
        self.clusters.or(classes).unwrap_or(27)
    }

    /// The k-means settings of the training clustering for `clusters` clusters, seeded with
    /// `seed`.
    pub fn kmeans(&self, clusters: usize, seed: u64) -> KMeansConfig {
        KMeansConfig::new(clusters)
            .with_iterations(self.kmeans_iterations)
            .with_init(self.kmeans_init)
            .with_seed(seed)
    }

    /// The k-means settings of the clustering of un-augmented images: [`TrainConfig::kmeans`]
    /// with [`TrainConfig::eval_kmeans_restarts`] runs.
    pub fn eval_kmeans(&self, clusters: usize, seed: u64) -> KMeansConfig {
        self.kmeans(clusters, seed)
            .with_restarts(self.eval_kmeans_restarts)
    }

    /// The Adam optimiser settings of the run.
    pub fn adam(&self) -> crate::train::FusedAdam {
        crate::train::FusedAdam::new(self.adam_epsilon as f32)
    }

    /// Side of the stride-4 feature grid of the training input.
    pub fn feature_grid(&self) -> usize {
        self.input_size as usize / crate::model::FEATURE_STRIDE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cosine_schedule_falls_from_the_set_rate_to_zero_and_constant_stays() {
        let cosine = LearningRateSchedule::Cosine;
        assert_eq!(cosine.rate(1e-3, 0.0), 1e-3);
        assert!((cosine.rate(1e-3, 0.5) - 5e-4).abs() < 1e-12);
        assert!(cosine.rate(1e-3, 1.0).abs() < 1e-12);
        assert!(cosine.rate(1e-3, 0.25) > cosine.rate(1e-3, 0.75));
        assert_eq!(LearningRateSchedule::Constant.rate(1e-3, 0.9), 1e-3);
        // Old run folders have no schedule: they read as constant.
        let old: TrainConfig = serde_json::from_str(r#"{"learning_rate": 0.001}"#).unwrap();
        assert_eq!(old.learning_rate_schedule, LearningRateSchedule::Constant);
    }
}
