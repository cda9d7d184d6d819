//! k-means' passes on a device (a GPU, or wgpu on the CPU): chunks of points kept on the
//! device for all iterations when they fit, each assigned by one matrix product and totalled
//! per cluster by batched products, with one read-back per pass. The host path is `host.rs`.

use std::ops::Range;

use burn::tensor::{Device, Int, Tensor, Transaction};

use super::kmeans::{KMeansConfig, chunks};
use super::store::FeatureStore;
use super::{Centroids, ClusterError, host};

/// Per-cluster sums, counts and the summed best similarity of one chunk, on the device.
pub(super) struct ChunkTotals {
    /// `[K, D]`
    pub(super) sums: Tensor<2>,
    /// `[1, K]`
    pub(super) counts: Tensor<2, Int>,
    /// `[1]`
    pub(super) similarity: Tensor<1>,
}

/// Points per group when a chunk's members are totalled (see [`chunk_totals`]).
const TOTAL_GROUP: usize = 256;

/// Assigns the points of `chunk` to their most similar centroid and totals them per cluster.
/// `centroids_t` is `[D, K]`, `cluster_ids` the row `[0, 1, .., K-1]` as `[1, K]`.
pub(super) fn chunk_totals(
    chunk: Tensor<2>,
    centroids_t: Tensor<2>,
    cluster_ids: Tensor<2, Int>,
) -> ChunkTotals {
    let [points, dim] = chunk.dims();
    let [_, clusters] = cluster_ids.dims();
    let device = chunk.device();
    // [C, D] x [D, K] -> [C, K]
    let similarities = chunk.clone().matmul(centroids_t);
    // [C, K] -> [C, 1] each
    let (best, labels) = similarities.max_dim_with_indices(1);
    // One-hot of the labels, [C, K]; a matmul totals it faster than a scatter-add, and needs
    // no float atomics on the GPU.
    let one_hot = labels
        .expand([points, clusters])
        .equal(cluster_ids.expand([points, clusters]))
        .float();
    // Totalled per group of TOTAL_GROUP points, then over the groups. One `[K, C] x [C, D]`
    // product has only K x D outputs to share out and walks all C points for each: with it a
    // pass over 10^6 points took 0.19 s on an H200 whatever the chunk size, in groups
    // 12.7 ms. As a batch of `[K, S] x [S, D]` products every group runs in parallel. Padding rows are zero in both
    // factors, so they add nothing.
    let groups = points.div_ceil(TOTAL_GROUP);
    let padding = groups * TOTAL_GROUP - points;
    let (one_hot, chunk) = if padding > 0 {
        (
            Tensor::cat(
                vec![one_hot, Tensor::<2>::zeros([padding, clusters], &device)],
                0,
            ),
            Tensor::cat(vec![chunk, Tensor::<2>::zeros([padding, dim], &device)], 0),
        )
    } else {
        (one_hot, chunk)
    };
    let one_hot = one_hot.reshape([groups, TOTAL_GROUP, clusters]);
    // [G, K, S] x [G, S, D] -> [G, K, D] -> [K, D]
    let sums = one_hot
        .clone()
        .swap_dims(1, 2)
        .matmul(chunk.reshape([groups, TOTAL_GROUP, dim]))
        .sum_dim(0)
        .reshape([clusters, dim]);
    // [G, S, K] -> [G, 1, K], exact in f32 (at most S per group), then summed as integers so
    // counts stay exact past 2^24 points.
    let counts = one_hot.sum_dim(1).int().sum_dim(0).reshape([1, clusters]);
    ChunkTotals {
        sums,
        counts,
        similarity: best.sum(),
    }
}

/// Totals of one assignment pass over a range of the store.
pub(super) struct PassTotals {
    /// `K * D` per-cluster sums of the assigned points.
    pub(super) sums: Vec<f32>,
    pub(super) counts: Vec<u64>,
    pub(super) similarity_sum: f64,
    pub(super) points: usize,
}

/// The `[1, K]` integer row `0..K` on `device`.
pub(super) fn cluster_id_row(clusters: usize, device: &Device) -> Tensor<2, Int> {
    Tensor::<1, Int>::arange(0..clusters as i64, device).reshape([1, clusters])
}

/// Bytes of f32 rows k-means keeps on a device for all its iterations; larger stores are
/// uploaded again chunk by chunk on every iteration.
const RESIDENT_BUDGET_BYTES: usize = 2 << 30;

/// The chunks of `range` uploaded once, when k-means runs on a device (not on the host) and
/// they fit [`RESIDENT_BUDGET_BYTES`]: converting and uploading every chunk again on each
/// iteration would cost more than the pass itself on a GPU.
pub(super) fn resident_chunks(
    store: &FeatureStore,
    range: Range<usize>,
    config: &KMeansConfig,
    chunk_points: usize,
    device: &Device,
) -> Result<Option<Vec<Tensor<2>>>, ClusterError> {
    let bytes = range.len() * store.dim() * std::mem::size_of::<f32>();
    if host::runs_on_host(device) || config.iterations < 2 || bytes > RESIDENT_BUDGET_BYTES {
        return Ok(None);
    }
    chunks(range, chunk_points)
        .map(|chunk| store.chunk(chunk, device))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// One assignment pass over `range` (read from `resident` when its chunks are already on the
/// device), accumulating the totals on the device and reading them back once at the end, so
/// the device is never stalled between chunks.
pub(super) fn lloyd_pass(
    store: &FeatureStore,
    range: Range<usize>,
    centroids: &Centroids,
    chunk_points: usize,
    device: &Device,
    resident: Option<&[Tensor<2>]>,
) -> Result<PassTotals, ClusterError> {
    if host::runs_on_host(device) {
        let totals = host::totals(store, range.clone(), centroids)?;
        return Ok(PassTotals {
            sums: totals.sums,
            counts: totals.counts,
            similarity_sum: totals.similarity_sum,
            points: range.len(),
        });
    }
    let clusters = centroids.clusters;
    let dim = centroids.dim;
    // [K, D] -> [D, K]
    let centroids_t = centroids.to_tensor(device).transpose();
    let cluster_ids = cluster_id_row(clusters, device);
    let mut sums = Tensor::<2>::zeros([clusters, dim], device);
    let mut counts = Tensor::<2, Int>::zeros([1, clusters], device);
    let mut similarities = Vec::new();
    for (index, chunk) in chunks(range.clone(), chunk_points).enumerate() {
        let points = match resident {
            Some(resident) => resident[index].clone(),
            None => store.chunk(chunk, device)?,
        };
        let totals = chunk_totals(points, centroids_t.clone(), cluster_ids.clone());
        sums = sums + totals.sums;
        counts = counts + totals.counts;
        // Kept per chunk and summed in f64 on the host: an f32 running total of 10^8 terms
        // would drift.
        similarities.push(totals.similarity);
    }
    let similarity = if similarities.is_empty() {
        Tensor::<1>::zeros([1], device)
    } else {
        Tensor::cat(similarities, 0)
    };
    let HostTotals {
        sums,
        counts,
        similarity,
    } = read_totals(sums, counts, similarity)?;
    Ok(PassTotals {
        sums,
        counts,
        similarity_sum: similarity.iter().map(|&s| f64::from(s)).sum(),
        points: range.len(),
    })
}

/// Reads `[K, D]` sums, `[1, K]` counts and per-chunk similarity sums back in one transaction.
pub(super) fn read_totals(
    sums: Tensor<2>,
    counts: Tensor<2, Int>,
    similarity: Tensor<1>,
) -> Result<HostTotals, ClusterError> {
    let device_error = |error: String| ClusterError::Device(error);
    let data = Transaction::default()
        .register(sums)
        .register(counts)
        .register(similarity)
        .try_execute()
        .map_err(|error| device_error(format!("{error:?}")))?;
    let [sums, counts, similarity]: [_; 3] = data
        .try_into()
        .map_err(|_| device_error("a read-back returned the wrong number of tensors".into()))?;
    let sums = sums
        .try_into_vec_as::<f32>()
        .map_err(|error| device_error(error.to_string()))?;
    let counts = counts
        .try_into_vec_as::<i64>()
        .map_err(|error| device_error(error.to_string()))?
        .into_iter()
        .map(|count| count.max(0) as u64)
        .collect();
    let similarity = similarity
        .try_into_vec_as::<f32>()
        .map_err(|error| device_error(error.to_string()))?;
    Ok(HostTotals {
        sums,
        counts,
        similarity,
    })
}

/// [`ChunkTotals`] (or their accumulation) read back to the host.
pub(super) struct HostTotals {
    /// `K * D` per-cluster sums.
    pub(super) sums: Vec<f32>,
    pub(super) counts: Vec<u64>,
    /// One summed best similarity per chunk.
    pub(super) similarity: Vec<f32>,
}
