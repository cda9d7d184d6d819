//! Labelling every stored pixel with its nearest centroid.

use std::ops::Range;

use burn::tensor::{Device, Int, Tensor, Transaction};

use super::kmeans::{DEFAULT_CHUNK_POINTS, chunks};
use super::store::FeatureStore;
use super::{Centroids, ClusterError, PixelLabels, check_clusters, host};

/// Pixel labels with per-cluster statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// The label of every row of the store, in store order.
    pub labels: PixelLabels,
    /// Pixels per cluster.
    pub counts: Vec<u64>,
    /// Compactness: mean inner product of each cluster's members with its centroid (`None`
    /// for an empty cluster).
    pub compactness: Vec<Option<f64>>,
    /// Mean inner product of every pixel with its centroid.
    pub mean_similarity: f64,
}

/// Labels every row of `store` with its most similar centroid, in chunks of
/// [`DEFAULT_CHUNK_POINTS`] points.
pub fn assign(
    store: &FeatureStore,
    centroids: &Centroids,
    device: &Device,
) -> Result<Assignment, ClusterError> {
    assign_chunked(store, centroids, DEFAULT_CHUNK_POINTS, device)
}

/// [`assign`] with chunks of `chunk_points` points.
pub fn assign_chunked(
    store: &FeatureStore,
    centroids: &Centroids,
    chunk_points: usize,
    device: &Device,
) -> Result<Assignment, ClusterError> {
    let clusters = centroids.clusters;
    check_clusters(clusters)?;
    if centroids.dim != store.dim() {
        return Err(ClusterError::DimensionMismatch {
            expected: store.dim(),
            got: centroids.dim,
        });
    }
    let mut labels = PixelLabels::with_capacity(clusters, store.len());
    let mut counts = vec![0u64; clusters];
    let mut similarity_sums = vec![0f64; clusters];
    if host::runs_on_host(device) {
        host::labels(store, centroids, |label, similarity| {
            labels.push_label(label);
            counts[label] += 1;
            similarity_sums[label] += f64::from(similarity);
        })?;
        return Ok(summarise(labels, counts, &similarity_sums, store.len()));
    }
    // [K, D] -> [D, K]
    let centroids_t = centroids.to_tensor(device).transpose();
    // One chunk in flight: the next chunk is read and queued before the previous one is read
    // back, so an asynchronous device works while the host converts.
    let mut pending: Option<(Tensor<2>, Tensor<2, Int>)> = None;
    for chunk in chunks(0..store.len(), chunk_points) {
        let queued = best_of_chunk(store, chunk, centroids_t.clone(), device)?;
        if let Some((best, indices)) = pending.replace(queued) {
            collect(
                best,
                indices,
                &mut labels,
                &mut counts,
                &mut similarity_sums,
            )?;
        }
    }
    if let Some((best, indices)) = pending {
        collect(
            best,
            indices,
            &mut labels,
            &mut counts,
            &mut similarity_sums,
        )?;
    }
    Ok(summarise(labels, counts, &similarity_sums, store.len()))
}

/// The assignment with its per-cluster compactness and mean similarity.
fn summarise(
    labels: PixelLabels,
    counts: Vec<u64>,
    similarity_sums: &[f64],
    points: usize,
) -> Assignment {
    let total: f64 = similarity_sums.iter().sum();
    let compactness = counts
        .iter()
        .zip(similarity_sums)
        .map(|(&count, &sum)| (count > 0).then(|| sum / count as f64))
        .collect();
    let mean_similarity = if points == 0 {
        0.0
    } else {
        total / points as f64
    };
    Assignment {
        labels,
        counts,
        compactness,
        mean_similarity,
    }
}

/// Queues the best similarity and its centroid index for each point of `rows`, `[C, 1]` each.
fn best_of_chunk(
    store: &FeatureStore,
    rows: Range<usize>,
    centroids_t: Tensor<2>,
    device: &Device,
) -> Result<(Tensor<2>, Tensor<2, Int>), ClusterError> {
    // [C, D] x [D, K] -> [C, K] -> [C, 1] each
    Ok(store
        .chunk(rows, device)?
        .matmul(centroids_t)
        .max_dim_with_indices(1))
}

/// Reads a queued chunk back and adds it to the labels and per-cluster totals.
fn collect(
    best: Tensor<2>,
    indices: Tensor<2, Int>,
    labels: &mut PixelLabels,
    counts: &mut [u64],
    similarity_sums: &mut [f64],
) -> Result<(), ClusterError> {
    let device_error = |error: String| ClusterError::Device(error);
    let data = Transaction::default()
        .register(best)
        .register(indices)
        .try_execute()
        .map_err(|error| device_error(format!("{error:?}")))?;
    let [best, indices]: [_; 2] = data
        .try_into()
        .map_err(|_| device_error("a read-back returned the wrong number of tensors".into()))?;
    let best = best
        .try_into_vec_as::<f32>()
        .map_err(|error| device_error(error.to_string()))?;
    let indices = indices
        .try_into_vec_as::<i64>()
        .map_err(|error| device_error(error.to_string()))?;
    for (&index, &similarity) in indices.iter().zip(&best) {
        // argmax over K columns is always in 0..K; guard anyway rather than index out of range.
        let k = usize::try_from(index)
            .ok()
            .filter(|&k| k < counts.len())
            .ok_or_else(|| device_error(format!("centroid index {index} out of range")))?;
        labels.push_label(k);
        counts[k] += 1;
        similarity_sums[k] += f64::from(similarity);
    }
    Ok(())
}
