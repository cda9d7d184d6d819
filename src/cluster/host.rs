//! Assignment passes of k-means on the host, for the CPU backend.
//!
//! On a GPU the passes run as tensor operations (one matmul for the similarities, a one-hot
//! matmul for the sums). On the CPU the same work is cheaper done directly: blocks of rows
//! that stay in cache, one small GEMM each for the similarities, an argmax, and the rows
//! added to their cluster's sum, with the blocks spread over rayon's threads. The blocks'
//! totals are combined in block order, so results do not depend on the number of threads.

use std::ops::Range;

use burn::backend::DispatchDevice;
use burn::tensor::Device;
use rayon::prelude::*;

use super::kmeans::chunks;
use super::store::FeatureStore;
use super::{Centroids, ClusterError};
use crate::linalg::{MatRef, Threads, matmul};

/// Rows per block: 4096 rows of 128 f32 are 2 MiB, with their `[rows, K]` similarities.
const BLOCK_ROWS: usize = 4096;
/// Blocks handled per parallel wave, bounding the per-block results held at once.
const WAVE_BLOCKS: usize = 64;

/// Whether k-means and the assignment of labels should run their passes here rather than as
/// tensor operations on `device`: on burn's Flex CPU backend, where the host is the device, and
/// on a remote server's device, because the features are already in this process (read back
/// once per batch) and sending them back every epoch costs about what clustering them here
/// does (and burn 0.22's remote backend mixes up an integer handle in the device passes).
pub fn runs_on_host(device: &Device) -> bool {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "remote")]
        DispatchDevice::Remote(_) => true,
        _ => false,
    }
}

/// The nearest centroid of every row of one block, and its similarity.
struct BlockAssignment {
    labels: Vec<u32>,
    similarities: Vec<f32>,
}

/// Assigns the rows of `rows` (row-major, `dim` wide) to their most similar centroid (the
/// first on ties).
fn assign_block(rows: &[f32], centroids: &Centroids, scratch: &mut Vec<f32>) -> BlockAssignment {
    let (dim, clusters) = (centroids.dim, centroids.clusters);
    let count = rows.len() / dim;
    scratch.clear();
    scratch.resize(count * clusters, 0.0);
    // [rows, D] x [D, K]
    matmul(
        scratch,
        MatRef::row_major(rows, count, dim),
        MatRef::row_major(&centroids.values, clusters, dim).transposed(),
        false,
        Threads::Current,
    );
    let mut labels = Vec::with_capacity(count);
    let mut similarities = Vec::with_capacity(count);
    for row in scratch.chunks_exact(clusters) {
        let (mut best, mut label) = (row[0], 0);
        for (k, &value) in row.iter().enumerate().skip(1) {
            if value > best {
                best = value;
                label = k;
            }
        }
        labels.push(label as u32);
        similarities.push(best);
    }
    BlockAssignment {
        labels,
        similarities,
    }
}

/// Runs `per_block` on every block of `range` in parallel waves and hands the results to
/// `combine` in block order.
fn for_each_block<T: Send>(
    store: &FeatureStore,
    range: Range<usize>,
    per_block: impl Fn(&[f32]) -> T + Sync,
    mut combine: impl FnMut(T),
) -> Result<(), ClusterError> {
    let blocks: Vec<Range<usize>> = chunks(range, BLOCK_ROWS).collect();
    for wave in blocks.chunks(WAVE_BLOCKS) {
        let results: Vec<T> = wave
            .par_iter()
            .map_init(Vec::new, |rows, block| -> Result<T, ClusterError> {
                store.read_into(block.clone(), rows)?;
                Ok(per_block(rows))
            })
            .collect::<Result<_, ClusterError>>()?;
        results.into_iter().for_each(&mut combine);
    }
    Ok(())
}

/// Per-cluster sums and counts of an assignment of rows, with the summed best similarity.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct HostTotals {
    /// `K * D` sums of the rows assigned to each cluster.
    pub sums: Vec<f32>,
    /// Rows assigned to each cluster.
    pub counts: Vec<u64>,
    /// Sum over rows of the similarity to their centroid.
    pub similarity_sum: f64,
}

/// Assigns the rows `range` of `store` to `centroids` and totals them per cluster.
pub(super) fn totals(
    store: &FeatureStore,
    range: Range<usize>,
    centroids: &Centroids,
) -> Result<HostTotals, ClusterError> {
    let (dim, clusters) = (centroids.dim, centroids.clusters);
    let mut sums = vec![0f64; clusters * dim];
    let mut counts = vec![0u64; clusters];
    let mut similarity_sum = 0f64;
    let per_block = |rows: &[f32]| {
        let assignment = assign_block(rows, centroids, &mut Vec::new());
        let mut block_sums = vec![0f32; clusters * dim];
        let mut block_counts = vec![0u64; clusters];
        for (row, &label) in rows.chunks_exact(dim).zip(&assignment.labels) {
            let label = label as usize;
            block_counts[label] += 1;
            for (sum, value) in block_sums[label * dim..(label + 1) * dim]
                .iter_mut()
                .zip(row)
            {
                *sum += value;
            }
        }
        let similarity: f64 = assignment.similarities.iter().map(|&s| f64::from(s)).sum();
        (block_sums, block_counts, similarity)
    };
    for_each_block(
        store,
        range,
        per_block,
        |(block_sums, block_counts, similarity)| {
            for (sum, value) in sums.iter_mut().zip(block_sums) {
                *sum += f64::from(value);
            }
            for (count, value) in counts.iter_mut().zip(block_counts) {
                *count += value;
            }
            similarity_sum += similarity;
        },
    )?;
    Ok(HostTotals {
        sums: sums.into_iter().map(|sum| sum as f32).collect(),
        counts,
        similarity_sum,
    })
}

/// The label of every row of `store` (in order) and its similarity to that centroid.
pub(super) fn labels(
    store: &FeatureStore,
    centroids: &Centroids,
    mut on_row: impl FnMut(usize, f32),
) -> Result<(), ClusterError> {
    let per_block = |rows: &[f32]| assign_block(rows, centroids, &mut Vec::new());
    for_each_block(store, 0..store.len(), per_block, |assignment| {
        for (&label, &similarity) in assignment.labels.iter().zip(&assignment.similarities) {
            on_row(label as usize, similarity);
        }
    })
}
