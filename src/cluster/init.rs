//! k-means' first centroids: K random points (as faiss), or greedy k-means++ on a sample.

use std::ops::Range;

use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::store::FeatureStore;
use super::{Centroids, ClusterError, check_clusters};

/// Checks that `range` lies in `store` and holds at least `clusters` (a valid K) rows.
pub(super) fn check_init_range(
    store: &FeatureStore,
    range: &Range<usize>,
    clusters: usize,
) -> Result<(), ClusterError> {
    check_clusters(clusters)?;
    if range.end > store.len() || range.start > range.end {
        return Err(ClusterError::OutOfRange {
            start: range.start,
            end: range.end,
            len: store.len(),
        });
    }
    if range.len() < clusters {
        return Err(ClusterError::TooFewPoints {
            clusters,
            points: range.len(),
        });
    }
    Ok(())
}

/// K distinct rows of `range` drawn uniformly (deterministic given `seed`), as faiss starts.
pub fn init_random(
    store: &FeatureStore,
    range: Range<usize>,
    clusters: usize,
    seed: u64,
) -> Result<Centroids, ClusterError> {
    check_init_range(store, &range, clusters)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows: Vec<usize> = index::sample(&mut rng, range.len(), clusters)
        .into_iter()
        .map(|offset| range.start + offset)
        .collect();
    Centroids::new(store.gather(&rows)?, clusters, store.dim())
}

/// Greedy k-means++ initialisation on a seeded sample of up to `sample` rows of `range`
/// (deterministic given `seed`): the first centre is drawn uniformly; for each further one,
/// `2 + ln K` candidates are drawn with probability proportional to their squared distance to
/// the nearest centre so far and the one that lowers the total squared distance most is kept
/// (as scikit-learn does; plain k-means++ too often puts two centres in one blob).
pub fn init_plus_plus(
    store: &FeatureStore,
    range: Range<usize>,
    clusters: usize,
    sample: usize,
    seed: u64,
) -> Result<Centroids, ClusterError> {
    check_init_range(store, &range, clusters)?;
    let available = range.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = sample.max(clusters).min(available);
    let mut rows: Vec<usize> = if size == available {
        range.collect()
    } else {
        index::sample(&mut rng, available, size)
            .into_iter()
            .map(|offset| range.start + offset)
            .collect()
    };
    rows.sort_unstable();
    let dim = store.dim();
    let data = store.gather(&rows)?;
    let point = |i: usize| &data[i * dim..(i + 1) * dim];
    // Squared distance to each candidate centre, folded into the current nearest distances.
    let nearest_with = |nearest: Option<&[f32]>, centre: usize| -> Vec<f32> {
        let centre = point(centre);
        data.par_chunks(dim)
            .enumerate()
            .map(|(i, x)| {
                let distance = squared_distance(x, centre);
                nearest.map_or(distance, |nearest| nearest[i].min(distance))
            })
            .collect()
    };
    // Summed sequentially in f64 so the result does not depend on thread scheduling.
    let potential = |distances: &[f32]| distances.iter().map(|&d| f64::from(d)).sum::<f64>();

    let trials = 2 + (clusters as f64).ln().floor() as usize;
    let first = rng.random_range(0..size);
    let mut chosen = vec![first];
    let mut nearest = nearest_with(None, first);
    let mut prefix = Vec::with_capacity(size);
    while chosen.len() < clusters {
        prefix.clear();
        let mut cumulative = 0.0f64;
        for &d in &nearest {
            cumulative += f64::from(d);
            prefix.push(cumulative);
        }
        if cumulative <= 0.0 {
            // Every sample point coincides with a centre: take any point not chosen yet; the
            // duplicate centre will come out empty and be re-seeded.
            let free: Vec<usize> = (0..size).filter(|i| !chosen.contains(i)).collect();
            let next = free[rng.random_range(0..free.len())];
            chosen.push(next);
            continue;
        }
        let mut best: Option<(f64, usize, Vec<f32>)> = None;
        for _ in 0..trials {
            let target = rng.random::<f64>() * cumulative;
            // First point whose prefix passes the target; points at distance 0 are never hit.
            let candidate = prefix.partition_point(|&p| p <= target).min(size - 1);
            let distances = nearest_with(Some(&nearest), candidate);
            let total = potential(&distances);
            if best
                .as_ref()
                .is_none_or(|(best_total, _, _)| total < *best_total)
            {
                best = Some((total, candidate, distances));
            }
        }
        if let Some((_, candidate, distances)) = best {
            chosen.push(candidate);
            nearest = distances;
        }
    }
    let values = chosen
        .iter()
        .flat_map(|&i| point(i).iter().copied())
        .collect();
    Centroids::new(values, clusters, dim)
}

/// Squared Euclidean distance, with eight accumulators: one running sum kept k-means++ at
/// about 3 GFLOP/s (see [`crate::linalg::lane_sum`]).
fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    crate::linalg::lane_sum(a, b, |x, y| (x - y) * (x - y))
}

#[cfg(test)]
mod tests {
    use super::squared_distance;

    #[test]
    fn squared_distance_matches_the_plain_sum() {
        for dim in [1, 7, 8, 19, 128] {
            let a: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum();
            let lanes = f64::from(squared_distance(&a, &b));
            assert!(
                (lanes - plain).abs() < 1e-5 * plain.max(1.0),
                "{dim}: {lanes} {plain}"
            );
        }
    }
}
