//! Evaluation against ground-truth labels, as the reference: predictions at label resolution
//! (logits upsampled bilinearly, argmax), a cluster x class confusion matrix ignoring label 255,
//! Hungarian matching of clusters to classes maximising matched pixels, then pixel accuracy and
//! mean IoU over the classes present in the labels.

use burn::tensor::Tensor;
use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;
use serde::{Deserialize, Serialize};

use crate::cluster::{MAX_CLUSTERS, PixelLabels};

mod bilateral;
pub mod masks;
mod stored;
pub use bilateral::{BilateralParams, bilateral_upsample_argmax};
pub use masks::{ScoreError, score_mask_folder};
pub use stored::confusion_from_store;

/// The label value of pixels that are not scored.
pub const IGNORE_LABEL: u8 = 255;

/// Errors of the evaluation module.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Predictions and labels of different lengths.
    #[error("{predictions} predictions for {labels} labels")]
    LengthMismatch {
        /// Number of predictions.
        predictions: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A prediction that names no cluster of the matrix.
    #[error("prediction {prediction} is not one of the {clusters} clusters")]
    PredictionOutOfRange {
        /// The prediction.
        prediction: usize,
        /// Clusters of the confusion matrix.
        clusters: usize,
    },
    /// Two confusion matrices of different shapes merged.
    #[error(
        "cannot merge a {other_clusters}x{other_classes} confusion matrix into a {clusters}x{classes} one"
    )]
    ShapeMismatch {
        /// Clusters of the receiving matrix.
        clusters: usize,
        /// Classes of the receiving matrix.
        classes: usize,
        /// Clusters of the other matrix.
        other_clusters: usize,
        /// Classes of the other matrix.
        other_classes: usize,
    },
    /// Features and centroids of different dimensions.
    #[error("features have {features} channels but centroids {centroids}")]
    DimensionMismatch {
        /// Channels of the features.
        features: usize,
        /// Dimension of the centroids.
        centroids: usize,
    },
    /// More centroids than pixel labels can hold.
    #[error("{0} centroids is more than the {MAX_CLUSTERS} pixel labels can hold")]
    TooManyClusters(usize),
    /// Logits with no cluster or no pixel cannot be upsampled to a non-empty size.
    #[error("cannot upsample {clusters} logit maps of {height}x{width} pixels")]
    NothingToUpsample {
        /// Clusters (logit channels).
        clusters: usize,
        /// Feature map height.
        height: usize,
        /// Feature map width.
        width: usize,
    },
    /// The device failed to run or read back a computation.
    #[error("device error while evaluating: {0}")]
    Device(String),
}

/// Pixel counts of (predicted cluster, ground-truth class) pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Number of clusters K (rows).
    pub clusters: usize,
    /// Number of classes C (columns).
    pub classes: usize,
    /// `K * C` counts, row-major: `counts[k * classes + c]`.
    pub counts: Vec<u64>,
}

impl ConfusionMatrix {
    /// An all-zero `clusters x classes` matrix.
    pub fn new(clusters: usize, classes: usize) -> Self {
        Self {
            clusters,
            classes,
            counts: vec![0; clusters * classes],
        }
    }

    /// Counts the pixels of one or more images: `predictions[i]` is the cluster of the pixel
    /// labelled `labels[i]`. Labels [`IGNORE_LABEL`] and any label `>= classes` are skipped.
    /// Nothing is counted when an error is returned.
    pub fn add<P: Copy + Into<usize>>(
        &mut self,
        predictions: &[P],
        labels: &[u8],
    ) -> Result<(), EvalError> {
        if predictions.len() != labels.len() {
            return Err(EvalError::LengthMismatch {
                predictions: predictions.len(),
                labels: labels.len(),
            });
        }
        // Checked before counting so a bad call leaves the matrix untouched.
        if let Some(&prediction) = predictions.iter().find(|&&p| p.into() >= self.clusters) {
            return Err(EvalError::PredictionOutOfRange {
                prediction: prediction.into(),
                clusters: self.clusters,
            });
        }
        for (&prediction, &label) in predictions.iter().zip(labels) {
            let class = usize::from(label);
            if label != IGNORE_LABEL && class < self.classes {
                self.counts[prediction.into() * self.classes + class] += 1;
            }
        }
        Ok(())
    }

    /// [`ConfusionMatrix::add`] for predictions held as [`PixelLabels`].
    pub fn add_labels(
        &mut self,
        predictions: &PixelLabels,
        labels: &[u8],
    ) -> Result<(), EvalError> {
        match predictions {
            PixelLabels::U8(predictions) => self.add(predictions, labels),
            PixelLabels::U16(predictions) => self.add(predictions, labels),
        }
    }

    /// Adds another matrix of the same shape (e.g. one counted on another thread).
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<(), EvalError> {
        if (self.clusters, self.classes) != (other.clusters, other.classes) {
            return Err(EvalError::ShapeMismatch {
                clusters: self.clusters,
                classes: self.classes,
                other_clusters: other.clusters,
                other_classes: other.classes,
            });
        }
        for (count, &more) in self.counts.iter_mut().zip(&other.counts) {
            *count += more;
        }
        Ok(())
    }

    /// Pixels of cluster `cluster` labelled `class` (0 outside the matrix).
    pub fn get(&self, cluster: usize, class: usize) -> u64 {
        if cluster < self.clusters && class < self.classes {
            self.counts[cluster * self.classes + class]
        } else {
            0
        }
    }

    /// All counted (labelled, not ignored) pixels.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Pixels per class in the ground truth (column sums).
    pub fn class_totals(&self) -> Vec<u64> {
        (0..self.classes)
            .map(|c| (0..self.clusters).map(|k| self.get(k, c)).sum())
            .collect()
    }

    /// Pixels per predicted cluster (row sums).
    pub fn cluster_totals(&self) -> Vec<u64> {
        (0..self.clusters)
            .map(|k| (0..self.classes).map(|c| self.get(k, c)).sum())
            .collect()
    }
}

/// Scores of a clustering against ground truth after Hungarian matching.
///
/// Serialises as `{"acc": .., "miou": .., "per_class_iou": [..]}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Pixel accuracy in percent: matched pixels over all labelled pixels.
    #[serde(rename = "acc")]
    pub accuracy: f64,
    /// Mean IoU in percent over the classes present in the labels.
    #[serde(rename = "miou")]
    pub mean_iou: f64,
    /// IoU of each class in percent; `None` for classes absent from the labels.
    pub per_class_iou: Vec<Option<f64>>,
    /// The class each cluster is matched to; `None` for clusters left unmatched (when there
    /// are more clusters than classes), whose pixels all count as wrong.
    #[serde(skip)]
    pub assignment: Vec<Option<usize>>,
    /// The confusion matrix scored.
    #[serde(skip)]
    pub confusion: ConfusionMatrix,
}

impl Evaluation {
    /// Matches clusters to classes one-to-one maximising the matched pixels (Hungarian
    /// algorithm, as `linear_sum_assignment(-hist)` in the reference) and scores the match.
    ///
    /// `IoU_c = tp / (gt + pred - tp)`. With fewer clusters than classes a class present in
    /// the labels but matched to no cluster scores IoU 0 and counts in the mean (the
    /// reference would leave it out); with K >= C, PiCIE's setting, both agree. With no
    /// labelled pixels accuracy and mIoU are 0 (the reference gives NaN).
    pub fn from_confusion(confusion: &ConfusionMatrix) -> Self {
        let assignment = match_clusters(confusion);
        debug_assert_eq!(assignment.len(), confusion.clusters);
        score_assignment(confusion, assignment)
    }
}

impl Evaluation {
    /// [`Evaluation::from_confusion`] where the clusters (rows) listed in `unmatchable` may
    /// never be matched to a class: the Hungarian matching runs over the other rows only, and
    /// the labelled pixels of an unmatchable row always count as wrong (they stay in the
    /// accuracy's denominator and in their class's ground truth, so they lower its IoU as
    /// misses). Used to score exported masks, whose ignored clusters are written as one value
    /// (255) that names no class. With `unmatchable` empty this equals `from_confusion`.
    pub fn from_confusion_unmatchable(confusion: &ConfusionMatrix, unmatchable: &[usize]) -> Self {
        let classes = confusion.classes;
        let matchable: Vec<usize> = (0..confusion.clusters)
            .filter(|cluster| !unmatchable.contains(cluster))
            .collect();
        let mut reduced = ConfusionMatrix::new(matchable.len(), classes);
        for (row, &cluster) in matchable.iter().enumerate() {
            for class in 0..classes {
                reduced.counts[row * classes + class] = confusion.get(cluster, class);
            }
        }
        let reduced_assignment = match_clusters(&reduced);
        let mut assignment = vec![None; confusion.clusters];
        for (row, &cluster) in matchable.iter().enumerate() {
            assignment[cluster] = reduced_assignment[row];
        }
        score_assignment(confusion, assignment)
    }
}

/// Accuracy and IoU of a given cluster -> class matching (`IoU_c = tp / (gt + pred - tp)`,
/// mean over the classes present in the labels).
fn score_assignment(confusion: &ConfusionMatrix, assignment: Vec<Option<usize>>) -> Evaluation {
    let classes = confusion.classes;
    let mut cluster_of_class = vec![None; classes];
    for (cluster, class) in assignment.iter().enumerate() {
        if let Some(class) = *class
            && class < classes
        {
            cluster_of_class[class] = Some(cluster);
        }
    }
    let class_totals = confusion.class_totals();
    let cluster_totals = confusion.cluster_totals();
    let mut matched = 0u64;
    let per_class_iou: Vec<Option<f64>> = (0..classes)
        .map(|class| {
            let (tp, predicted) = cluster_of_class[class].map_or((0, 0), |cluster| {
                (confusion.get(cluster, class), cluster_totals[cluster])
            });
            matched += tp;
            let truth = class_totals[class];
            (truth > 0).then(|| {
                let union = (truth + predicted - tp).max(1);
                100.0 * tp as f64 / union as f64
            })
        })
        .collect();
    let total = confusion.total();
    let accuracy = if total == 0 {
        0.0
    } else {
        100.0 * matched as f64 / total as f64
    };
    let present: Vec<f64> = per_class_iou.iter().flatten().copied().collect();
    let mean_iou = if present.is_empty() {
        0.0
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    };
    Evaluation {
        accuracy,
        mean_iou,
        per_class_iou,
        assignment,
        confusion: confusion.clone(),
    }
}

/// The maximum-weight one-to-one matching of clusters to classes: `result[k]` is the class of
/// cluster `k`. `kuhn_munkres` wants no more rows than columns, so the smaller side is rows.
fn match_clusters(confusion: &ConfusionMatrix) -> Vec<Option<usize>> {
    let clusters = confusion.clusters;
    let classes = confusion.classes;
    let mut assignment = vec![None; clusters];
    if clusters == 0 || classes == 0 {
        return assignment;
    }
    // Pixel counts fit i64: no image set has 2^63 pixels.
    let weight = |k: usize, c: usize| i64::try_from(confusion.get(k, c)).unwrap_or(i64::MAX / 4);
    let clusters_are_rows = clusters <= classes;
    let (rows, columns) = if clusters_are_rows {
        (clusters, classes)
    } else {
        (classes, clusters)
    };
    let values = (0..rows)
        .flat_map(|row| {
            (0..columns).map(move |column| {
                if clusters_are_rows {
                    weight(row, column)
                } else {
                    weight(column, row)
                }
            })
        })
        .collect();
    let Ok(matrix) = Matrix::from_vec(rows, columns, values) else {
        // Unreachable: rows * columns values and columns >= 1.
        return assignment;
    };
    let (_, row_to_column) = kuhn_munkres(&matrix);
    for (row, column) in row_to_column.into_iter().enumerate() {
        if clusters_are_rows {
            assignment[row] = Some(column);
        } else {
            assignment[column] = Some(row);
        }
    }
    assignment
}

/// Predictions at label resolution, as the reference: logits `<z, mu_k>` `[B, K, h, w]` of
/// `features` `[B, D, h, w]` against `centroids` `[K, D]`, bilinearly upsampled
/// (`align_corners = false`) to `out_size` `[H, W]`, argmax over K. Returns one row-major
/// `H * W` label vector per image.
pub fn upsample_logits_argmax(
    features: Tensor<4>,
    centroids: Tensor<2>,
    out_size: [usize; 2],
) -> Result<Vec<PixelLabels>, EvalError> {
    let [batch, dim, height, width] = features.dims();
    let [clusters, centroid_dim] = centroids.dims();
    if dim != centroid_dim {
        return Err(EvalError::DimensionMismatch {
            features: dim,
            centroids: centroid_dim,
        });
    }
    if clusters > MAX_CLUSTERS {
        return Err(EvalError::TooManyClusters(clusters));
    }
    let pixels = out_size[0] * out_size[1];
    if batch == 0 {
        return Ok(Vec::new());
    }
    if pixels == 0 {
        return Ok((0..batch)
            .map(|_| PixelLabels::with_capacity(clusters, 0))
            .collect());
    }
    if clusters == 0 || height * width == 0 {
        return Err(EvalError::NothingToUpsample {
            clusters,
            height,
            width,
        });
    }
    // [B, D, h, w] -> [B, h, w, D] -> [B*h*w, D]
    let flat =
        crate::model::permute_axes(features, [0, 2, 3, 1]).reshape([batch * height * width, dim]);
    // [B*h*w, D] x [D, K] -> [B*h*w, K] -> [B, h, w, K] -> [B, K, h, w]
    let logits = crate::model::permute_axes(
        flat.matmul(centroids.transpose())
            .reshape([batch, height, width, clusters]),
        [0, 3, 1, 2],
    );
    // [B, K, h, w] -> [B, K, H, W]
    let logits = if [height, width] == out_size {
        logits
    } else {
        crate::model::resize::resize_bilinear(logits, out_size)
    };
    // [B, K, H, W] -> [B, 1, H, W]
    let labels = logits
        .argmax(1)
        .try_into_data()
        .map_err(|error| EvalError::Device(format!("{error:?}")))?
        .try_into_vec_as::<i64>()
        .map_err(|error| EvalError::Device(error.to_string()))?;
    labels
        .chunks(pixels)
        .map(|image| {
            let mut out = PixelLabels::with_capacity(clusters, pixels);
            for &label in image {
                let label = usize::try_from(label)
                    .ok()
                    .filter(|&label| label < clusters)
                    .ok_or_else(|| EvalError::Device(format!("argmax {label} out of range")))?;
                out.push_label(label);
            }
            Ok(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmatchable_rows_are_never_matched_and_count_as_wrong() {
        // Rows: cluster 0, cluster 1, and "ignored" (row 2), which holds the most pixels of
        // class 1 and would win it in a free matching.
        let mut confusion = ConfusionMatrix::new(3, 2);
        confusion.counts = vec![50, 0, 0, 10, 0, 40];
        let free = Evaluation::from_confusion(&confusion);
        assert_eq!(free.assignment[2], Some(1));
        let fixed = Evaluation::from_confusion_unmatchable(&confusion, &[2]);
        assert_eq!(fixed.assignment, vec![Some(0), Some(1), None]);
        assert!((fixed.accuracy - 60.0).abs() < 1e-12);
        // Class 1: tp 10, truth 50 (40 of them ignored), predicted 10 -> 20 %.
        assert_eq!(fixed.per_class_iou, vec![Some(100.0), Some(20.0)]);
        // With nothing unmatchable it is from_confusion, whatever the shape.
        for (clusters, classes) in [(3, 2), (2, 3), (4, 4)] {
            let mut matrix = ConfusionMatrix::new(clusters, classes);
            for (index, count) in matrix.counts.iter_mut().enumerate() {
                *count = (index as u64 * 7919) % 97;
            }
            assert_eq!(
                Evaluation::from_confusion_unmatchable(&matrix, &[]),
                Evaluation::from_confusion(&matrix)
            );
        }
    }
}
