//! Edits of the clustering that the user sends to the trainer: merge clusters into one, or
//! split a cluster in two by k-means on its own pixels. The trainer clusters the next epoch
//! starting from the edited centroids, so training continues with the user's clusters.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use super::{Centroids, ClusterError, FeatureStore, KMeansConfig, assign, kmeans_with};

/// A change of the clusters for the next epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterEdit {
    /// `sources` join `into`; the source ids disappear and later ids move down to fill the
    /// gaps.
    Merge {
        /// Clusters to merge away.
        sources: Vec<usize>,
        /// The cluster they join.
        into: usize,
    },
    /// `cluster` is divided in two: it keeps one half, the other becomes the new last id.
    Split {
        /// The cluster to divide.
        cluster: usize,
    },
}

/// Edited centroids, and where each new id came from.
#[derive(Debug, Clone)]
pub struct EditedClusters {
    /// The centroids to start the next clustering from.
    pub centroids: Centroids,
    /// `origin[new] = Some(old)`: the old cluster a new id continues (`None` for the second
    /// half of a split).
    pub origin: Vec<Option<usize>>,
}

fn row(centroids: &Centroids, index: usize) -> &[f32] {
    &centroids.values[index * centroids.dim..(index + 1) * centroids.dim]
}

/// Applies `edit` to `previous`. A split clusters the points of `store` nearest to the split
/// cluster (2-means, seeded); `store` is unused by merges.
pub fn edit_centroids(
    previous: &Centroids,
    edit: &ClusterEdit,
    store: &FeatureStore,
    seed: u64,
    device: &Device,
) -> Result<EditedClusters, ClusterError> {
    let clusters = previous.clusters;
    let dim = previous.dim;
    let out_of_range = |cluster: usize| {
        ClusterError::Invalid(format!(
            "cluster {cluster} does not exist (there are {clusters})"
        ))
    };
    match edit {
        ClusterEdit::Merge { sources, into } => {
            if *into >= clusters {
                return Err(out_of_range(*into));
            }
            if let Some(&bad) = sources.iter().find(|&&s| s >= clusters) {
                return Err(out_of_range(bad));
            }
            let removed: Vec<usize> = sources.iter().copied().filter(|&s| s != *into).collect();
            if clusters - removed.len() < 2 {
                return Err(ClusterError::Invalid(
                    "a merge must leave at least two clusters".into(),
                ));
            }
            // The merged centroid: the normalised mean of the members' centroids.
            let mut merged = row(previous, *into).to_vec();
            for &source in &removed {
                for (sum, value) in merged.iter_mut().zip(row(previous, source)) {
                    *sum += value;
                }
            }
            let mut values = Vec::with_capacity((clusters - removed.len()) * dim);
            let mut origin = Vec::new();
            for cluster in (0..clusters).filter(|c| !removed.contains(c)) {
                if cluster == *into {
                    values.extend_from_slice(&merged);
                } else {
                    values.extend_from_slice(row(previous, cluster));
                }
                origin.push(Some(cluster));
            }
            Ok(EditedClusters {
                centroids: Centroids::new(values, origin.len(), dim)?,
                origin,
            })
        }
        ClusterEdit::Split { cluster } => {
            if *cluster >= clusters {
                return Err(out_of_range(*cluster));
            }
            // The points of the cluster, by the previous centroids.
            let labels = assign(store, previous, device)?.labels;
            let mut members = FeatureStore::new(dim, None)?;
            let mut buffer = Vec::new();
            let chunk = 65_536;
            let mut start = 0;
            while start < store.len() {
                let end = (start + chunk).min(store.len());
                store.read_into(start..end, &mut buffer)?;
                let mut selected = Vec::new();
                for (offset, point) in buffer.chunks(dim).enumerate() {
                    if labels.get(start + offset) == Some(*cluster) {
                        selected.extend_from_slice(point);
                    }
                }
                members.push_slice(&selected)?;
                start = end;
            }
            if members.len() < 2 {
                return Err(ClusterError::Invalid(format!(
                    "cluster {cluster} has {} pixels: too few to split",
                    members.len()
                )));
            }
            let halves = kmeans_with(
                &members,
                &KMeansConfig::new(2).with_seed(seed).with_iterations(20),
                None,
                device,
                &mut |_| {},
            )?
            .centroids;
            let mut values = previous.values.clone();
            values[cluster * dim..(cluster + 1) * dim].copy_from_slice(row(&halves, 0));
            values.extend_from_slice(row(&halves, 1));
            let mut origin: Vec<Option<usize>> = (0..clusters).map(Some).collect();
            origin.push(None);
            Ok(EditedClusters {
                centroids: Centroids::new(values, clusters + 1, dim)?,
                origin,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(values: &[f32]) -> Vec<f32> {
        let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
        values.iter().map(|v| v / norm).collect()
    }

    #[test]
    fn merges_renumber_and_splits_find_the_two_halves() {
        let device = Device::flex();
        let previous = Centroids::new(
            [
                unit(&[1.0, 0.0, 0.0]),
                unit(&[0.0, 1.0, 0.0]),
                unit(&[0.0, 0.0, 1.0]),
            ]
            .concat(),
            3,
            3,
        )
        .unwrap();
        let empty = FeatureStore::new(3, None).unwrap();
        let merged = edit_centroids(
            &previous,
            &ClusterEdit::Merge {
                sources: vec![0],
                into: 2,
            },
            &empty,
            0,
            &device,
        )
        .unwrap();
        assert_eq!(merged.origin, vec![Some(1), Some(2)]);
        let into = &merged.centroids.values[3..6];
        assert!(
            (into[0] - into[2]).abs() < 1e-6 && into[0] > 0.7,
            "{into:?}"
        );

        // Cluster 0's points are two tight groups: a split separates them.
        let mut store = FeatureStore::new(3, None).unwrap();
        let mut points = Vec::new();
        for i in 0..50 {
            let jitter = i as f32 * 1e-4;
            points.extend(unit(&[1.0, 0.3 + jitter, 0.0]));
            points.extend(unit(&[1.0, -0.3 - jitter, 0.0]));
            points.extend(unit(&[0.0, 0.0, 1.0 + jitter]));
        }
        store.push_slice(&points).unwrap();
        let split = edit_centroids(
            &previous,
            &ClusterEdit::Split { cluster: 0 },
            &store,
            3,
            &device,
        )
        .unwrap();
        assert_eq!(split.centroids.clusters, 4);
        assert_eq!(split.origin, vec![Some(0), Some(1), Some(2), None]);
        let (first, second) = (split.centroids.values[1], split.centroids.values[10]);
        assert!(
            first * second < 0.0,
            "the halves lean opposite ways: {first} {second}"
        );

        let error = edit_centroids(
            &previous,
            &ClusterEdit::Split { cluster: 7 },
            &store,
            0,
            &device,
        )
        .unwrap_err();
        assert!(error.to_string().contains("cluster 7 does not exist"));
    }
}
