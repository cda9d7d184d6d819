//! Clustering of pixel features: spherical k-means on the training device.
//!
//! PiCIE clusters, every epoch and for each view separately, the L2-normalised pixel features
//! of the whole dataset. The features go into a [`FeatureStore`] (f16, optionally spilled to
//! disk); [`kmeans`] streams it chunk by chunk through the device, so no `N x K` matrix ever
//! exists for all points at once; [`assign`] then labels every pixel with its nearest centroid
//! (largest inner product) as a compact [`PixelLabels`].

mod align;
mod assign;
mod device_pass;
mod edit;
mod host;
mod init;
mod kmeans;
mod store;

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

pub use align::{match_to_previous, permute_centroids, permute_labels, permute_per_cluster};
pub use assign::{Assignment, assign, assign_chunked};
pub use edit::{ClusterEdit, EditedClusters, edit_centroids};
pub use host::runs_on_host;
pub use init::{init_plus_plus, init_random};
pub use kmeans::{
    AUTO_FULL_MAX_POINTS, AUTO_SEED_POINTS, DEFAULT_CHUNK_POINTS, DEFAULT_DEVICE_PASS_POINTS,
    DEFAULT_INIT_SAMPLE, DEFAULT_ITERATIONS, IterationStats, KMeansConfig, KMeansInit, KMeansMode,
    KMeansResult, LloydStep, StepKind, kmeans, kmeans_with, lloyd_step,
};
pub use store::{FeatureStore, SpillConfig};

/// Largest number of clusters whose labels fit a `u8` (255 stays free as an "ignore" value).
pub const MAX_U8_CLUSTERS: usize = 255;
/// Largest number of clusters [`PixelLabels`] can hold at all.
pub const MAX_CLUSTERS: usize = u16::MAX as usize;

/// Errors of the clustering module.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Reading or writing the feature spill file failed.
    #[error("could not {action} the feature spill file {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", ...).
        action: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A store or centroid set with zero-dimensional rows.
    #[error("the feature dimension must be at least 1")]
    ZeroDimension,
    /// Values pushed that are not a whole number of rows.
    #[error("{values} values are not a whole number of {dim}-dimensional rows")]
    RowLength {
        /// The row length of the store.
        dim: usize,
        /// How many values were given.
        values: usize,
    },
    /// A tensor or centroid set whose feature dimension differs from the store's.
    #[error("expected {expected}-dimensional features, got {got}")]
    DimensionMismatch {
        /// The dimension expected.
        expected: usize,
        /// The dimension given.
        got: usize,
    },
    /// A row range outside the store.
    #[error("rows {start}..{end} are outside the store of {len} rows")]
    OutOfRange {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows in the store.
        len: usize,
    },
    /// K-means asked for no clusters.
    #[error("k-means needs at least one cluster")]
    NoClusters,
    /// More clusters than the pixel labels can represent.
    #[error("{clusters} clusters is more than the {MAX_CLUSTERS} pixel labels can hold")]
    TooManyClusters {
        /// The number asked for.
        clusters: usize,
    },
    /// Fewer points than clusters.
    #[error("k-means with {clusters} clusters needs at least {clusters} points, got {points}")]
    TooFewPoints {
        /// The number of clusters.
        clusters: usize,
        /// The points available.
        points: usize,
    },
    /// Centroid values that are not `clusters x dim` finite numbers.
    #[error("invalid centroids: {0}")]
    InvalidCentroids(String),
    /// Two label vectors of different lengths compared.
    #[error("label vectors of different lengths: {left} and {right}")]
    LengthMismatch {
        /// Length of the first.
        left: usize,
        /// Length of the second.
        right: usize,
    },
    /// The device failed to run or read back a computation.
    #[error("device error while clustering: {0}")]
    Device(String),
    /// A cluster edit that cannot be applied.
    #[error("{0}")]
    Invalid(String),
}

impl ClusterError {
    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Checks a cluster count for k-means and labelling.
fn check_clusters(clusters: usize) -> Result<(), ClusterError> {
    match clusters {
        0 => Err(ClusterError::NoClusters),
        k if k > MAX_CLUSTERS => Err(ClusterError::TooManyClusters { clusters: k }),
        _ => Ok(()),
    }
}

/// `K` unit-length centroids of dimension `D`, row-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Centroids {
    /// `clusters * dim` values, row `k` is centroid `k`; every row has unit length (or is zero
    /// if it was given as zero).
    pub values: Vec<f32>,
    /// Number of centroids `K`.
    pub clusters: usize,
    /// Dimension `D`.
    pub dim: usize,
}

impl Centroids {
    /// Centroids from `clusters * dim` row-major values; each row is scaled to unit length.
    pub fn new(values: Vec<f32>, clusters: usize, dim: usize) -> Result<Self, ClusterError> {
        check_clusters(clusters)?;
        if dim == 0 {
            return Err(ClusterError::ZeroDimension);
        }
        if values.len() != clusters * dim {
            return Err(ClusterError::InvalidCentroids(format!(
                "{} values for {clusters} x {dim} centroids",
                values.len()
            )));
        }
        if values.iter().any(|value| !value.is_finite()) {
            return Err(ClusterError::InvalidCentroids(
                "a value is not finite".to_owned(),
            ));
        }
        let mut centroids = Self {
            values,
            clusters,
            dim,
        };
        for k in 0..clusters {
            normalize(centroids.row_mut(k));
        }
        Ok(centroids)
    }

    /// Centroids from a `[K, D]` tensor (read back to the host, rows normalised).
    pub fn from_tensor(tensor: Tensor<2>) -> Result<Self, ClusterError> {
        let [clusters, dim] = tensor.dims();
        Self::new(store::read_f32(tensor)?, clusters, dim)
    }

    /// Centroid `k`.
    ///
    /// # Panics
    /// If `k >= clusters`.
    pub fn row(&self, k: usize) -> &[f32] {
        &self.values[k * self.dim..(k + 1) * self.dim]
    }

    fn row_mut(&mut self, k: usize) -> &mut [f32] {
        &mut self.values[k * self.dim..(k + 1) * self.dim]
    }

    /// The centroids as a `[K, D]` tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(self.values.clone(), [self.clusters, self.dim]),
            device,
        )
    }
}

/// Scales `row` to unit L2 norm (left as is when it is zero, as `F.normalize` with its eps).
fn normalize(row: &mut [f32]) {
    let norm = row
        .iter()
        .map(|&value| f64::from(value) * f64::from(value))
        .sum::<f64>()
        .sqrt();
    if norm > 1e-12 {
        for value in row {
            *value = (f64::from(*value) / norm) as f32;
        }
    }
}

/// One cluster label per pixel, as compact as the number of clusters allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PixelLabels {
    /// Labels of at most [`MAX_U8_CLUSTERS`] clusters.
    U8(Vec<u8>),
    /// Labels of more clusters.
    U16(Vec<u16>),
}

impl PixelLabels {
    /// An empty label vector suited to `clusters` clusters, with room for `capacity` labels.
    pub fn with_capacity(clusters: usize, capacity: usize) -> Self {
        if clusters <= MAX_U8_CLUSTERS {
            Self::U8(Vec::with_capacity(capacity))
        } else {
            Self::U16(Vec::with_capacity(capacity))
        }
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(labels) => labels.len(),
            Self::U16(labels) => labels.len(),
        }
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Label `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<usize> {
        match self {
            Self::U8(labels) => labels.get(index).map(|&label| usize::from(label)),
            Self::U16(labels) => labels.get(index).map(|&label| usize::from(label)),
        }
    }

    /// Appends a label; it must be below the cluster count this vector was made for.
    pub(crate) fn push_label(&mut self, label: usize) {
        match self {
            Self::U8(labels) => labels.push(label as u8),
            Self::U16(labels) => labels.push(label as u16),
        }
    }

    /// The labels as `u8`, if they are stored so.
    pub fn as_u8(&self) -> Option<&[u8]> {
        match self {
            Self::U8(labels) => Some(labels),
            Self::U16(_) => None,
        }
    }

    /// The labels as `u16`, if they are stored so.
    pub fn as_u16(&self) -> Option<&[u16]> {
        match self {
            Self::U8(_) => None,
            Self::U16(labels) => Some(labels),
        }
    }

    /// All labels, widened to `usize`.
    pub fn iter(&self) -> Box<dyn Iterator<Item = usize> + '_> {
        match self {
            Self::U8(labels) => Box::new(labels.iter().map(|&label| usize::from(label))),
            Self::U16(labels) => Box::new(labels.iter().map(|&label| usize::from(label))),
        }
    }

    /// Labels `range` as widened `usize`s.
    pub fn slice_usize(&self, range: Range<usize>) -> Result<Vec<usize>, ClusterError> {
        let len = self.len();
        if range.start > range.end || range.end > len {
            return Err(ClusterError::OutOfRange {
                start: range.start,
                end: range.end,
                len,
            });
        }
        Ok(match self {
            Self::U8(labels) => labels[range].iter().map(|&l| usize::from(l)).collect(),
            Self::U16(labels) => labels[range].iter().map(|&l| usize::from(l)).collect(),
        })
    }

    /// Labels `range` as a `[range.len()]` integer tensor on `device` (cross-entropy targets).
    pub fn to_tensor(
        &self,
        range: Range<usize>,
        device: &Device,
    ) -> Result<Tensor<1, Int>, ClusterError> {
        let values: Vec<i64> = self
            .slice_usize(range)?
            .into_iter()
            .map(|label| label as i64)
            .collect();
        let len = values.len();
        Ok(Tensor::from_data(TensorData::new(values, [len]), device))
    }
}

/// Each cluster's share of the pixels (fractions summing to 1; all zero when there are none).
pub fn pixel_share(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return vec![0.0; counts.len()];
    }
    counts
        .iter()
        .map(|&count| count as f64 / total as f64)
        .collect()
}

/// The fraction of pixels whose label differs between two labellings of the same pixels
/// (0 for two empty labellings). Cluster indices are compared as they are: k-means from scratch
/// each epoch permutes them, so this measures stability only between related labellings.
pub fn label_change_fraction(
    before: &PixelLabels,
    after: &PixelLabels,
) -> Result<f64, ClusterError> {
    if before.len() != after.len() {
        return Err(ClusterError::LengthMismatch {
            left: before.len(),
            right: after.len(),
        });
    }
    if before.is_empty() {
        return Ok(0.0);
    }
    let changed = match (before, after) {
        (PixelLabels::U8(a), PixelLabels::U8(b)) => a.iter().zip(b).filter(|(x, y)| x != y).count(),
        (PixelLabels::U16(a), PixelLabels::U16(b)) => {
            a.iter().zip(b).filter(|(x, y)| x != y).count()
        }
        _ => before
            .iter()
            .zip(after.iter())
            .filter(|(x, y)| x != y)
            .count(),
    };
    Ok(changed as f64 / before.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centroids_are_normalised_and_checked() {
        let centroids = Centroids::new(vec![3.0, 4.0, 0.0, 0.0], 2, 2).unwrap();
        assert_eq!(centroids.row(0), &[0.6, 0.8]);
        assert_eq!(centroids.row(1), &[0.0, 0.0]);
        assert!(Centroids::new(vec![1.0; 3], 2, 2).is_err());
        assert!(Centroids::new(vec![f32::NAN, 1.0], 1, 2).is_err());
        assert!(matches!(
            Centroids::new(vec![], 0, 2),
            Err(ClusterError::NoClusters)
        ));
    }

    #[test]
    fn label_statistics() {
        let a = PixelLabels::U8(vec![0, 1, 2, 2]);
        let b = PixelLabels::U8(vec![0, 1, 1, 2]);
        assert_eq!(label_change_fraction(&a, &b).unwrap(), 0.25);
        let wide = PixelLabels::U16(vec![0, 1, 2, 3]);
        assert_eq!(label_change_fraction(&a, &wide).unwrap(), 0.25);
        assert!(label_change_fraction(&a, &PixelLabels::U8(vec![0])).is_err());
        assert_eq!(pixel_share(&[1, 3]), vec![0.25, 0.75]);
        assert_eq!(pixel_share(&[0, 0]), vec![0.0, 0.0]);
        assert_eq!(a.slice_usize(1..3).unwrap(), vec![1, 2]);
        assert!(a.slice_usize(3..5).is_err());
    }

    #[test]
    fn store_reads_back_across_spill() {
        let folder = std::env::temp_dir().join(format!("picie-store-test-{}", std::process::id()));
        let spill = SpillConfig::new(&folder, 3 * 4 * 2);
        let mut store = FeatureStore::new(4, Some(spill)).unwrap();
        let values: Vec<f32> = (0..40).map(|i| i as f32 * 0.25).collect();
        for rows in values.chunks(8) {
            store.push_slice(rows).unwrap();
            // Never more than the budget in memory, even for a moment.
            assert!(
                store.memory_bytes() <= 3 * 4 * 2,
                "{}",
                store.memory_bytes()
            );
        }
        assert_eq!(store.len(), 10);
        assert!(store.spilled_rows() > 0 && store.spilled_rows() < 10);
        let path = store.spill_path().unwrap().to_path_buf();
        let mut out = Vec::new();
        store.read_into(1..9, &mut out).unwrap();
        assert_eq!(out, values[4..36]);
        assert_eq!(store.gather(&[7, 0, 7]).unwrap()[..4], values[28..32]);
        assert!(store.read_into(5..11, &mut out).is_err());
        assert!(store.push_slice(&[1.0; 3]).is_err());
        store.clear().unwrap();
        assert!(store.is_empty());
        store.push_slice(&values[..4]).unwrap();
        store.read_into(0..1, &mut out).unwrap();
        assert_eq!(out, values[..4]);
        drop(store);
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&folder);
    }
}
