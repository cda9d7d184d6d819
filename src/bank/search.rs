//! Exact search over a bank: every query scores every patch (cosine similarity), streamed in
//! blocks so no `N x N` (or even `N x 128` f32) matrix is ever built, and the best `k` are
//! kept with ties going to the lower patch index; cluster members by their nearest centroid;
//! and [`DeviceBank`], the bank on a burn device for repeated queries.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::{BankError, FeatureBank, MemberOrder, Neighbour};

/// Patches per chunk of the device path (one matrix product each; 32 MiB of f32 at dim 128,
/// below wgpu's default storage-buffer limit).
pub const SEARCH_CHUNK: usize = 65_536;
/// Rows per CPU task: small enough to balance threads, large enough to amortise the task.
const CPU_BLOCK: usize = 2048;
/// Bound on how far a device's f32 similarity may be from the host's (unit vectors, f32
/// accumulation: the real error is ~1e-6). Patches within twice this of the device's k-th best
/// are re-scored on the host, which makes the device result exact.
const DEVICE_TOLERANCE: f32 = 1e-3;
/// Scores per block of the device path: the device reduces each block to its maximum and only
/// the blocks that may hold a result are read back (at 10^7 patches, tens of thousands of
/// values instead of ten million). Divides [`SEARCH_CHUNK`], so only the last chunk is padded.
const SCORE_BLOCK: usize = 256;
/// Score of the padding that fills the last block: below any cosine similarity.
const PAD_SCORE: f32 = -4.0;

/// A bank's f16 values: built in memory, or the bank's file mapped into memory, so a loaded
/// bank costs address space rather than memory (the system keeps the pages it needs and can
/// drop them again: they are the file's).
pub(super) enum Values {
    /// Values in a buffer of their own.
    Owned(Vec<f16>),
    /// `features.f16` mapped read-only (little-endian Unix: the file is the layout).
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Values {
    type Target = [f16];

    fn deref(&self) -> &[f16] {
        match self {
            Self::Owned(values) => values,
            Self::Mapped(map) => {
                // A page-aligned map of whole f16s: the cast cannot fail on a length checked
                // when the file was opened, and an empty slice stands in if it ever did.
                let bits: &[u16] = bytemuck::try_cast_slice(&map[..]).unwrap_or(&[]);
                half::slice::HalfBitsSliceExt::reinterpret_cast(bits)
            }
        }
    }
}

/// The feature matrix with what every search needs.
pub(super) struct Rows {
    /// `[len, dim]` row-major.
    pub(super) values: Values,
    /// `1 / |row|` (0 for a zero row), so scores are cosines of the stored f16 vectors.
    pub(super) inv_norms: Vec<f32>,
    pub(super) dim: usize,
}

impl Rows {
    pub(super) fn new(values: Values, dim: usize) -> Result<Self, String> {
        if dim == 0 || !values.len().is_multiple_of(dim) {
            return Err(format!(
                "{} values are not whole rows of {dim}",
                values.len()
            ));
        }
        let inv_norms = values
            .par_chunks(dim)
            .map(|row| {
                let norm = row
                    .iter()
                    .map(|value| f64::from(value.to_f32()).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if !norm.is_finite() {
                    None
                } else if norm > 1e-12 {
                    Some((1.0 / norm) as f32)
                } else {
                    Some(0.0)
                }
            })
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| "a feature is not a finite number".to_owned())?;
        Ok(Self {
            values,
            inv_norms,
            dim,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.inv_norms.len()
    }

    pub(super) fn row(&self, index: usize) -> &[f16] {
        &self.values[index * self.dim..(index + 1) * self.dim]
    }

    /// Cosine of row `index` (already converted to f32 in `row`) with the unit vector `unit`.
    /// The one formula every path uses, so equal rows always score equally.
    fn score(&self, index: usize, row: &[f32], unit: &[f32]) -> f32 {
        // `+ 0.0` turns -0.0 into 0.0, so the total order sees one zero.
        dot(row, unit) * self.inv_norms[index] + 0.0
    }
}

/// Inner product (eight accumulators, fixed order: see [`crate::linalg::lane_sum`]).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::linalg::lane_sum(a, b, |x, y| x * y)
}

/// `values` scaled to unit length in f64; `None` for a zero, non-finite or wrong-length vector.
pub(super) fn unit_vector(values: &[f32], dim: usize) -> Option<Vec<f32>> {
    if values.len() != dim || values.iter().any(|value| !value.is_finite()) {
        return None;
    }
    let norm = values
        .iter()
        .map(|&value| f64::from(value).powi(2))
        .sum::<f64>()
        .sqrt();
    (norm > 1e-12).then(|| {
        values
            .iter()
            .map(|&value| (f64::from(value) / norm) as f32)
            .collect()
    })
}

/// Centroids (`K x dim`) with each row scaled to unit length (zero rows stay zero); `None`
/// unless they are a non-empty whole number of finite rows.
fn unit_centroids(centroids: &[f32], dim: usize) -> Option<Vec<f32>> {
    if dim == 0
        || centroids.is_empty()
        || !centroids.len().is_multiple_of(dim)
        || centroids.iter().any(|value| !value.is_finite())
    {
        return None;
    }
    Some(
        centroids
            .chunks(dim)
            .flat_map(|row| unit_vector(row, dim).unwrap_or_else(|| vec![0.0; dim]))
            .collect(),
    )
}

/// A search candidate in rank order: higher similarity first, then lower patch index.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ranked(Neighbour);

impl Ord for Ranked {
    /// `Less` ranks first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .0
            .similarity
            .total_cmp(&self.0.similarity)
            .then(self.0.patch.cmp(&other.0.patch))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// The best `k` offered so far; the heap's top is the worst kept.
pub(super) struct TopK {
    k: usize,
    heap: BinaryHeap<Ranked>,
}

impl TopK {
    pub(super) fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1),
        }
    }

    pub(super) fn offer(&mut self, patch: usize, similarity: f32) {
        let candidate = Ranked(Neighbour { patch, similarity });
        if self.heap.len() < self.k {
            self.heap.push(candidate);
        } else if let Some(mut worst) = self.heap.peek_mut()
            && candidate < *worst
        {
            *worst = candidate;
        }
    }

    pub(super) fn merge(self, other: Self) -> Self {
        let (mut keep, rest) = if self.heap.len() >= other.heap.len() {
            (self, other)
        } else {
            (other, self)
        };
        for Ranked(neighbour) in rest.heap {
            keep.offer(neighbour.patch, neighbour.similarity);
        }
        keep
    }

    pub(super) fn into_sorted(self) -> Vec<Neighbour> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|ranked| ranked.0)
            .collect()
    }
}

/// Exact top-k of every row against the unit vector `unit`, over rayon in blocks.
fn scan_top_k(rows: &Rows, unit: &[f32], k: usize) -> Vec<Neighbour> {
    if k == 0 || rows.len() == 0 {
        return Vec::new();
    }
    let dim = rows.dim;
    rows.values
        .par_chunks(CPU_BLOCK * dim)
        .enumerate()
        .map_init(
            || vec![0f32; CPU_BLOCK * dim],
            |buffer, (block, values)| {
                let buffer = &mut buffer[..values.len()];
                values.convert_to_f32_slice(buffer);
                let mut top = TopK::new(k);
                for (offset, row) in buffer.chunks_exact(dim).enumerate() {
                    let index = block * CPU_BLOCK + offset;
                    top.offer(index, rows.score(index, row, unit));
                }
                top
            },
        )
        .reduce(|| TopK::new(k), TopK::merge)
        .into_sorted()
}

/// Exact top-k among the rows `candidates`, scored as [`scan_top_k`] scores them.
pub(super) fn candidates_top_k(
    rows: &Rows,
    unit: &[f32],
    k: usize,
    candidates: &[usize],
) -> Vec<Neighbour> {
    let dim = rows.dim;
    candidates
        .par_chunks(1024)
        .map_init(
            || vec![0f32; dim],
            |buffer, chunk| {
                let mut top = TopK::new(k);
                for &index in chunk {
                    rows.row(index).convert_to_f32_slice(buffer);
                    top.offer(index, rows.score(index, buffer, unit));
                }
                top
            },
        )
        .reduce(|| TopK::new(k), TopK::merge)
        .into_sorted()
}

/// The nearest of the unit `centroids` to row `index` (converted into `row`): ties go to the
/// lower cluster index.
fn best_centroid(rows: &Rows, index: usize, row: &[f32], centroids: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    for (cluster, centroid) in centroids.chunks_exact(rows.dim).enumerate() {
        let similarity = rows.score(index, row, centroid);
        if similarity > best.1 {
            best = (cluster, similarity);
        }
    }
    best
}

/// Every patch's nearest centroid, for one set of centroids.
pub(super) struct Assignments {
    /// The centroids as given, bit for bit, to recognise them.
    key: Vec<u32>,
    /// `(cluster, similarity)` per patch.
    labels: Vec<(u32, f32)>,
}

impl FeatureBank {
    /// The `k` patches most similar (cosine) to `query`, best first, exact, on the CPU: every
    /// patch is scored in blocks over rayon. Ties go to the lower patch index. Empty for
    /// `k = 0` or a query that is not `dim` finite values of non-zero length.
    pub fn nearest(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        match unit_vector(query, self.rows.dim) {
            Some(unit) => scan_top_k(&self.rows, &unit, k),
            None => Vec::new(),
        }
    }

    /// [`FeatureBank::nearest`] by chunked matrix products on `device` (the bank is uploaded
    /// for this one query; keep a [`DeviceBank`] for repeated queries).
    pub fn nearest_on_device(&self, query: &[f32], k: usize, device: &Device) -> Vec<Neighbour> {
        self.to_device(device).nearest(query, k)
    }

    /// Uploads the bank to `device` in chunks of [`SEARCH_CHUNK`] patches (f32, unit rows).
    pub fn to_device(&self, device: &Device) -> DeviceBank {
        let dim = self.rows.dim;
        let chunks = (0..self.len())
            .step_by(SEARCH_CHUNK)
            .map(|start| {
                let end = (start + SEARCH_CHUNK).min(self.len());
                let mut values = vec![0f32; (end - start) * dim];
                values
                    .par_chunks_mut(dim)
                    .enumerate()
                    .for_each(|(offset, out)| {
                        let index = start + offset;
                        self.rows.row(index).convert_to_f32_slice(out);
                        let scale = self.rows.inv_norms[index];
                        out.iter_mut().for_each(|value| *value *= scale);
                    });
                Tensor::<2>::from_data(TensorData::new(values, [end - start, dim]), device)
            })
            .collect();
        DeviceBank {
            rows: Arc::clone(&self.rows),
            chunks,
            device: device.clone(),
        }
    }

    /// The centroid (of `centroids`, `K x dim` row-major) nearest to `patch`, with its cosine
    /// similarity; ties go to the lower cluster. `(0, NaN)` for a patch outside the bank or
    /// centroids that are not a whole number of finite rows.
    pub fn assign(&self, patch: usize, centroids: &[f32]) -> (usize, f32) {
        let dim = self.rows.dim;
        let (Some(centroids), true) = (unit_centroids(centroids, dim), patch < self.len()) else {
            return (0, f32::NAN);
        };
        let mut row = vec![0f32; dim];
        self.rows.row(patch).convert_to_f32_slice(&mut row);
        best_centroid(&self.rows, patch, &row, &centroids)
    }

    /// Members of `cluster` (patches whose nearest centroid it is, as [`FeatureBank::assign`]
    /// decides), with their similarity to its centroid: `count` of them from `offset` in
    /// `order` (ties by patch index), and the number of members. The assignment of the last
    /// centroids asked about is kept, so paging is cheap. `(empty, 0)` for invalid centroids.
    pub fn cluster_members(
        &self,
        centroids: &[f32],
        cluster: usize,
        order: MemberOrder,
        offset: usize,
        count: usize,
    ) -> (Vec<Neighbour>, usize) {
        let Some(assignments) = self.assignments(centroids) else {
            return (Vec::new(), 0);
        };
        let mut members: Vec<Ranked> = assignments
            .labels
            .par_iter()
            .enumerate()
            .filter(|(_, (label, _))| *label as usize == cluster)
            .map(|(patch, &(_, similarity))| Ranked(Neighbour { patch, similarity }))
            .collect();
        let total = members.len();
        match order {
            MemberOrder::Typical => members.par_sort_unstable(),
            MemberOrder::Outliers => members.par_sort_unstable_by(|a, b| {
                a.0.similarity
                    .total_cmp(&b.0.similarity)
                    .then(a.0.patch.cmp(&b.0.patch))
            }),
        }
        let page = members
            .into_iter()
            .skip(offset)
            .take(count)
            .map(|ranked| ranked.0)
            .collect();
        (page, total)
    }

    /// Every patch's nearest centroid, cached for the last centroids given.
    fn assignments(&self, centroids: &[f32]) -> Option<Arc<Assignments>> {
        let dim = self.rows.dim;
        let unit = unit_centroids(centroids, dim)?;
        let key: Vec<u32> = centroids.iter().map(|value| value.to_bits()).collect();
        let mut cache = self
            .assignments
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(cached) = cache.as_ref().filter(|cached| cached.key == key) {
            return Some(Arc::clone(cached));
        }
        let rows = &self.rows;
        let labels: Vec<(u32, f32)> = rows
            .values
            .par_chunks(CPU_BLOCK * dim)
            .enumerate()
            .flat_map_iter(|(block, values)| {
                let mut buffer = vec![0f32; values.len()];
                values.convert_to_f32_slice(&mut buffer);
                let unit = &unit;
                buffer
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(offset, row)| {
                        let (cluster, similarity) =
                            best_centroid(rows, block * CPU_BLOCK + offset, row, unit);
                        (cluster as u32, similarity)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let assignments = Arc::new(Assignments { key, labels });
        *cache = Some(Arc::clone(&assignments));
        Some(assignments)
    }
}

/// A [`FeatureBank`] uploaded to a burn device once, for repeated queries.
pub struct DeviceBank {
    rows: Arc<Rows>,
    /// `[≤ SEARCH_CHUNK, dim]` unit rows.
    chunks: Vec<Tensor<2>>,
    device: Device,
}

impl std::fmt::Debug for DeviceBank {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DeviceBank")
            .field("patches", &self.len())
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl DeviceBank {
    /// Number of patches.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the bank holds no patch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the bank lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Exactly [`FeatureBank::nearest`]: the device scores every patch by chunked matrix
    /// products and reduces them to block maxima, only the blocks that may hold a result are
    /// read back, the patches within the device's error of its k-th best are re-scored on the
    /// host, and the best `k` of those are returned. Should the device fail, the CPU path
    /// answers instead (see [`DeviceBank::try_nearest`] to see the error).
    pub fn nearest(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        self.try_nearest(query, k).unwrap_or_else(|_| {
            unit_vector(query, self.rows.dim)
                .map(|unit| scan_top_k(&self.rows, &unit, k))
                .unwrap_or_default()
        })
    }

    /// [`DeviceBank::nearest`], with device failures (and invalid queries) as errors.
    pub fn try_nearest(&self, query: &[f32], k: usize) -> Result<Vec<Neighbour>, BankError> {
        let dim = self.rows.dim;
        let unit = unit_vector(query, dim).ok_or_else(|| {
            BankError::Query(format!(
                "expected {dim} finite values of non-zero length, got {}",
                query.len()
            ))
        })?;
        let len = self.len();
        if k == 0 || len == 0 {
            return Ok(Vec::new());
        }
        if k >= len {
            // Everything is returned: nothing for the device to narrow down.
            return Ok(scan_top_k(&self.rows, &unit, k));
        }
        let device = &self.device;
        let device_error = |error: String| BankError::Device(error);
        let query_tensor = Tensor::<2>::from_data(TensorData::new(unit.clone(), [dim, 1]), device);
        // [C, D] x [D, 1] per chunk, padded to whole blocks -> [blocks, SCORE_BLOCK].
        let blocks: Vec<Tensor<2>> = self
            .chunks
            .iter()
            .map(|chunk| {
                let [rows, _] = chunk.dims();
                let scores = chunk.clone().matmul(query_tensor.clone());
                let padded = rows.div_ceil(SCORE_BLOCK) * SCORE_BLOCK;
                let scores = if padded > rows {
                    let pad = Tensor::<2>::full([padded - rows, 1], PAD_SCORE, device);
                    Tensor::cat(vec![scores, pad], 0)
                } else {
                    scores
                };
                scores.reshape([padded / SCORE_BLOCK, SCORE_BLOCK])
            })
            .collect();
        let blocks = Tensor::cat(blocks, 0);
        let block_count = len.div_ceil(SCORE_BLOCK);
        // Only the block maxima come back first (N / 256 values instead of N)...
        let maxima = blocks
            .clone()
            .max_dim(1)
            .try_into_vec_as::<f32>()
            .map_err(|error| device_error(format!("{error:?}")))?;
        if maxima.len() != block_count || maxima.iter().any(|score| !score.is_finite()) {
            return Err(device_error(format!(
                "the device returned {} block maxima for {block_count} blocks, or a \
                 non-finite one",
                maxima.len()
            )));
        }
        // ...then every block that may hold one of the best k. The k-th largest block maximum
        // is at most the k-th best score (those k blocks hold k scores at least that high), so
        // a block whose maximum is lower than that, less the tolerance, holds no patch the
        // host must re-score.
        let block_floor = if block_count <= k {
            f32::NEG_INFINITY
        } else {
            let mut order = maxima.clone();
            let (_, kth, _) = order.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth - 2.0 * DEVICE_TOLERANCE
        };
        let chosen: Vec<usize> = (0..block_count)
            .filter(|&block| maxima[block] >= block_floor)
            .collect();
        let chosen_ids: Vec<i64> = chosen.iter().map(|&block| block as i64).collect();
        let chosen_ids =
            Tensor::<1, Int>::from_data(TensorData::new(chosen_ids, [chosen.len()]), device);
        let chosen_scores = blocks
            .select(0, chosen_ids)
            .try_into_vec_as::<f32>()
            .map_err(|error| device_error(format!("{error:?}")))?;
        if chosen_scores.len() != chosen.len() * SCORE_BLOCK
            || chosen_scores.iter().any(|score| !score.is_finite())
        {
            return Err(device_error(format!(
                "the device returned {} scores for {} blocks, or a non-finite one",
                chosen_scores.len(),
                chosen.len()
            )));
        }
        // (patch, device score) of the real patches of the chosen blocks, at least k of them:
        // every chosen block holds its maximum, which is a real patch (padding scores lower).
        let scored: Vec<(usize, f32)> = chosen
            .iter()
            .zip(chosen_scores.chunks(SCORE_BLOCK))
            .flat_map(|(&block, scores)| {
                scores
                    .iter()
                    .enumerate()
                    .map(move |(offset, &score)| (block * SCORE_BLOCK + offset, score))
            })
            .filter(|&(patch, _)| patch < len)
            .collect();
        let mut order: Vec<f32> = scored.iter().map(|&(_, score)| score).collect();
        if order.len() < k {
            return Err(device_error(format!(
                "the chosen blocks hold {} patches, fewer than {k}",
                order.len()
            )));
        }
        let (_, kth, _) = order.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let floor = *kth - 2.0 * DEVICE_TOLERANCE;
        let candidates: Vec<usize> = scored
            .iter()
            .filter(|&&(_, score)| score >= floor)
            .map(|&(patch, _)| patch)
            .collect();
        Ok(candidates_top_k(&self.rows, &unit, k, &candidates))
    }
}
