//! What the trainer tells its observers. Plain data: the engine never depends on a GUI.

use serde::{Deserialize, Serialize};

use crate::eval::Evaluation;
pub use crate::loss::LossTerms;
pub use crate::run::EpochRecord;

/// The phase of an epoch, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainPhase {
    /// Decoding the dataset.
    Loading,
    /// Computing the pixel features of both views.
    Features,
    /// Running k-means and labelling pixels.
    Clustering,
    /// Optimising the network.
    Training,
    /// Clustering the un-augmented images and scoring them against the labels.
    Evaluating,
    /// Writing the checkpoint.
    Checkpointing,
}

impl TrainPhase {
    /// The phase in words, for status lines and progress bars.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Loading => "Loading images",
            Self::Features => "Computing pixel features",
            Self::Clustering => "Clustering",
            Self::Training => "Training",
            Self::Evaluating => "Evaluating",
            Self::Checkpointing => "Writing checkpoint",
        }
    }
}

/// Progress after one optimisation step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepProgress {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Step within the epoch, from 1.
    pub step: usize,
    /// Steps in an epoch.
    pub steps: usize,
    /// Training throughput over the epoch so far.
    pub images_per_second: f64,
    /// Estimated seconds until the last epoch ends.
    pub eta_seconds: f64,
    /// This step's loss terms.
    pub loss: LossTerms,
}

/// Per-cluster statistics of one view's clustering in one epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatistics {
    /// Epoch, from 1 (0 for the clustering of the untrained network).
    pub epoch: usize,
    /// Fraction of pixels in each cluster.
    pub pixel_share: Vec<f64>,
    /// Mean cosine similarity of each cluster's pixels to its centroid.
    pub compactness: Vec<f64>,
    /// Number of images each cluster appears in.
    pub images_with_cluster: Vec<usize>,
    /// Fraction of the preview images' pixels whose cluster changed since the previous
    /// epoch's clustering (`None` for the first epoch, after an edit, or without previews).
    pub label_change: Option<f64>,
    /// The view-1 centroids, `K * dim` row-major unit vectors.
    pub centroids: Vec<f32>,
    /// Feature dimension of the centroids.
    pub dim: usize,
}

impl ClusterStatistics {
    /// Cosine similarity of every pair of centroids, `K x K` row-major (the centroids are
    /// unit vectors, so inner products).
    pub fn centroid_similarity(&self) -> Vec<f32> {
        let dim = self.dim.max(1);
        let k = self.centroids.len() / dim;
        let row = |index: usize| &self.centroids[index * dim..(index + 1) * dim];
        let mut similarity = vec![0f32; k * k];
        for a in 0..k {
            for b in 0..k {
                similarity[a * k + b] = row(a).iter().zip(row(b)).map(|(x, y)| x * y).sum();
            }
        }
        similarity
    }
}

/// The cluster map of one preview image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Index of the image in the dataset.
    pub image_index: usize,
    /// The image's path relative to the image folder.
    #[serde(default)]
    pub image_name: String,
    /// Width of the map (feature-grid cells or pixels).
    pub width: usize,
    /// Height of the map.
    pub height: usize,
    /// Cluster id per cell, row-major.
    pub labels: Vec<u16>,
    /// Cosine similarity of each cell to its centroid.
    pub similarity: Vec<f32>,
}

/// Everything the trainer reports.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Training is about to start.
    Started {
        /// The device, in words.
        device: String,
        /// Where the starting weights came from, in words (says so for random init).
        weights: String,
        /// Images in the dataset.
        images: usize,
        /// Clusters K.
        clusters: usize,
        /// The first epoch this run will train (after a resume, not 1).
        first_epoch: usize,
        /// The last epoch.
        epochs: usize,
        /// Optimisation steps per epoch.
        steps_per_epoch: usize,
    },
    /// A phase started or advanced (`done` of `total` units).
    Phase {
        /// Epoch (0 before training).
        epoch: usize,
        /// Which phase.
        phase: TrainPhase,
        /// Units done.
        done: usize,
        /// Units in all.
        total: usize,
    },
    /// One optimisation step finished.
    Step(StepProgress),
    /// An epoch's clustering of view 1 finished.
    Clustered(ClusterStatistics),
    /// Cluster maps of the preview images.
    Preview {
        /// Epoch.
        epoch: usize,
        /// Step within the epoch (0: after the clustering).
        step: usize,
        /// One map per preview image.
        maps: Vec<ClusterMap>,
    },
    /// The un-augmented images were scored against the labels.
    Evaluated {
        /// Epoch (0: the untrained network).
        epoch: usize,
        /// The scores.
        evaluation: Evaluation,
    },
    /// The held-out images ([`crate::config::TrainConfig::held_out_prefix`]) were scored.
    HeldOutEvaluated {
        /// Epoch (0: the untrained network).
        epoch: usize,
        /// The scores.
        evaluation: Evaluation,
    },
    /// An epoch ended and its checkpoint was written.
    EpochFinished(EpochRecord),
    /// The user's merges or splits were applied to this epoch's clustering: `origin[new]` is
    /// the previous epoch's cluster that id `new` continues (`None`: the new half of a split).
    ClustersEdited {
        /// Epoch.
        epoch: usize,
        /// Where each new id came from.
        origin: Vec<Option<usize>>,
    },
    /// A merge or split could not be applied (the message says why); training goes on.
    EditRefused(String),
    /// Something the user should know that does not stop training (an older checkpoint used
    /// because the latest is damaged).
    Warning(String),
    /// Training paused (true) or resumed (false) at a batch boundary.
    Paused(bool),
    /// Training ended; `stopped` when it ended on a stop request.
    Finished {
        /// Whether a stop request ended it early.
        stopped: bool,
    },
}

/// Receives the trainer's events, on the training thread: keep it quick.
pub trait TrainObserver {
    /// Called for every event.
    fn on_event(&mut self, event: &TrainEvent);
}

impl<F: FnMut(&TrainEvent)> TrainObserver for F {
    fn on_event(&mut self, event: &TrainEvent) {
        self(event)
    }
}

/// An observer that ignores everything.
pub struct NullObserver;

impl TrainObserver for NullObserver {
    fn on_event(&mut self, _event: &TrainEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centroid_similarity_is_the_cosine_of_every_pair() {
        let statistics = ClusterStatistics {
            epoch: 1,
            pixel_share: vec![0.5; 3],
            compactness: vec![1.0; 3],
            images_with_cluster: vec![1; 3],
            label_change: None,
            centroids: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8],
            dim: 2,
        };
        let similarity = statistics.centroid_similarity();
        let expected = [1.0, 0.0, 0.6, 0.0, 1.0, 0.8, 0.6, 0.8, 1.0];
        assert_eq!(similarity.len(), 9);
        for (got, want) in similarity.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{similarity:?}");
        }
    }
}
