//! What `metrics.json` holds: every epoch's losses, timings and scores, and the summary of
//! scores over several seeds.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::loss::LossTerms;

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
