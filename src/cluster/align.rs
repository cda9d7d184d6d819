//! Stable cluster ids across epochs.
//!
//! k-means runs from scratch every epoch, so cluster `3` of one epoch has no relation to
//! cluster `3` of the next. To keep ids (and the colours the app gives them) with the concept
//! they found, each epoch's centroids are matched one-to-one to the previous epoch's by the
//! maximum total cosine similarity (Hungarian) and renumbered accordingly. The loss is
//! invariant to the numbering, so this changes no result.

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;

use super::{Centroids, PixelLabels};

/// Similarities are scaled to integers for the solver: 1e6 keeps six decimals.
const SIMILARITY_SCALE: f64 = 1e6;

/// For each cluster of `current`, the id it should take so that it matches `previous`:
/// `result[k]` is the new id of `current`'s cluster `k`, a permutation of `0..K`. Returns the
/// identity when the two have different shapes (nothing to match against).
pub fn match_to_previous(previous: &Centroids, current: &Centroids) -> Vec<usize> {
    let clusters = current.clusters;
    let identity: Vec<usize> = (0..clusters).collect();
    if previous.clusters != clusters || previous.dim != current.dim || clusters == 0 {
        return identity;
    }
    let dim = current.dim;
    let values: Vec<i64> = (0..clusters)
        .flat_map(|row| {
            let now = &current.values[row * dim..(row + 1) * dim];
            (0..clusters).map(move |column| {
                let before = &previous.values[column * dim..(column + 1) * dim];
                let cosine: f64 = now.iter().zip(before).map(|(a, b)| (a * b) as f64).sum();
                (cosine * SIMILARITY_SCALE).round() as i64
            })
        })
        .collect();
    let Ok(weights) = Matrix::from_vec(clusters, clusters, values) else {
        return identity;
    };
    kuhn_munkres(&weights).1
}

/// Renumbers `centroids` so that cluster `k` becomes `new_ids[k]`.
pub fn permute_centroids(centroids: &Centroids, new_ids: &[usize]) -> Centroids {
    let dim = centroids.dim;
    let mut values = vec![0f32; centroids.values.len()];
    for (old, &new) in new_ids.iter().enumerate() {
        values[new * dim..(new + 1) * dim]
            .copy_from_slice(&centroids.values[old * dim..(old + 1) * dim]);
    }
    Centroids {
        values,
        clusters: centroids.clusters,
        dim,
    }
}

/// Moves per-cluster values so that entry `k` goes to `new_ids[k]`.
pub fn permute_per_cluster<T: Clone>(values: &[T], new_ids: &[usize]) -> Vec<T> {
    let mut out = values.to_vec();
    for (old, &new) in new_ids.iter().enumerate() {
        out[new] = values[old].clone();
    }
    out
}

/// Relabels every pixel `k` as `new_ids[k]`.
pub fn permute_labels(labels: &mut PixelLabels, new_ids: &[usize]) {
    match labels {
        PixelLabels::U8(values) => {
            let table: Vec<u8> = new_ids.iter().map(|&id| id as u8).collect();
            values
                .iter_mut()
                .for_each(|label| *label = table[*label as usize]);
        }
        PixelLabels::U16(values) => {
            let table: Vec<u16> = new_ids.iter().map(|&id| id as u16).collect();
            values
                .iter_mut()
                .for_each(|label| *label = table[*label as usize]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn centroids(rows: &[[f32; 3]]) -> Centroids {
        Centroids::new(rows.concat(), rows.len(), 3).unwrap()
    }

    #[test]
    fn a_shuffled_clustering_gets_its_old_ids_back() {
        let before = centroids(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
        // The same concepts, slightly moved, found in another order.
        let now = centroids(&[[0.1, 0.0, 1.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.2]]);
        let new_ids = match_to_previous(&before, &now);
        assert_eq!(new_ids, vec![2, 0, 1]);
        let renumbered = permute_centroids(&now, &new_ids);
        assert!(renumbered.values[0] > 0.9 && renumbered.values[4] > 0.9);
        let mut labels = PixelLabels::U8(vec![0, 1, 2, 2]);
        permute_labels(&mut labels, &new_ids);
        assert_eq!(labels.as_u8().unwrap(), &[2, 0, 1, 1]);
        assert_eq!(
            permute_per_cluster(&[10, 20, 30], &new_ids),
            vec![20, 30, 10]
        );
    }
}
