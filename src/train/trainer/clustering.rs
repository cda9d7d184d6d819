//! An epoch's clustering: both views' pixel features over the whole dataset, k-means on each
//! (with the user's edits applied), the pseudo-labels, and the preview maps.

use super::*;

/// One epoch's pseudo-labels and centroids for both views.
pub(super) struct EpochClusters {
    pub(super) centroids_first: Centroids,
    pub(super) centroids_second: Centroids,
    pub(super) labels_first: PixelLabels,
    pub(super) labels_second: PixelLabels,
    pub(super) compactness_first: Vec<Option<f64>>,
    pub(super) weights_first: Option<Vec<f32>>,
    pub(super) weights_second: Option<Vec<f32>>,
    /// The K2 clustering of PiCIE + H, when enabled.
    pub(super) overclustering: Option<Box<EpochClusters>>,
}

impl EpochClusters {
    /// Renumbers the view-1 clusters to match `previous` (see [`cluster::match_to_previous`]),
    /// so a cluster keeps its id, and its colour in the app, from epoch to epoch. View 2's
    /// numbering only ever meets its own labels, so it is left alone.
    pub(super) fn keep_ids_of(&mut self, previous: &Centroids) {
        let new_ids = cluster::match_to_previous(previous, &self.centroids_first);
        if new_ids.iter().enumerate().all(|(old, &new)| old == new) {
            return;
        }
        self.centroids_first = cluster::permute_centroids(&self.centroids_first, &new_ids);
        cluster::permute_labels(&mut self.labels_first, &new_ids);
        self.compactness_first = cluster::permute_per_cluster(&self.compactness_first, &new_ids);
        self.weights_first = self
            .weights_first
            .as_ref()
            .map(|weights| cluster::permute_per_cluster(weights, &new_ids));
    }
}

/// The preview maps' clusters, every map's pixels one after the other, to compare with the
/// same images' maps of another epoch.
pub(super) fn preview_labels(maps: &[ClusterMap]) -> PixelLabels {
    PixelLabels::U16(
        maps.iter()
            .flat_map(|map| map.labels.iter().copied())
            .collect(),
    )
}

impl Trainer {
    /// A feature store for one view that spills to the run folder past a memory budget, so
    /// datasets of 10^7..10^8 pixels fit.
    pub(super) fn feature_store(&self, name: &str) -> Result<FeatureStore, TrainError> {
        spilling_store(Some(&crate::run::paths::feature_spill(
            self.run.root(),
            name,
        )))
    }

    /// Computes both views' features for the whole dataset and clusters them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn cluster_epoch(
        &self,
        network: &PicieNet,
        training_device: &Device,
        epoch: usize,
        order: &[usize],
        params: &Arc<Vec<ViewParams>>,
        clusters: usize,
        edits: Option<(&Centroids, &[ClusterEdit])>,
        warm_start: Option<&Centroids>,
        observer: &mut dyn TrainObserver,
    ) -> Result<(EpochClusters, Option<IdOrigin>), TrainError> {
        let batch_norm = self.config.cluster_batch_norm;
        let eval_network = network.valid();
        // Train-mode features (batch statistics), for the modes whose centroids use them.
        let batch_statistics = batch_norm != ClusterBatchNorm::Eval;
        let device = if batch_statistics {
            training_device.clone()
        } else {
            training_device.clone().inner()
        };
        let mut first = self.feature_store("view1")?;
        let mut second = self.feature_store("view2")?;
        // Reference mode: the centroids come from train-mode features, the labels from these.
        let mut centroid_stores = if batch_norm == ClusterBatchNorm::Reference {
            Some((
                self.feature_store("view1-train-mode")?,
                self.feature_store("view2-train-mode")?,
            ))
        } else {
            None
        };
        let batches: Vec<&[usize]> = self.batches(order).collect();
        let mut stream = self.view_stream(&batches, params)?;
        for done in 0..batches.len() {
            observer.on_event(&TrainEvent::Phase {
                epoch,
                phase: TrainPhase::Features,
                done,
                total: batches.len(),
            });
            let prepared = stream.next().ok_or_else(view_thread_stopped)??;
            let (view_first, view_second) = prepared.views.into_tensors(&device);
            let geometric = prepared.geometric;
            if batch_statistics {
                let output_first = network.forward(view_first.clone());
                let output_second = network.forward(view_second.clone());
                let features_first = output_first.clone().detach().inner();
                let features_second = views::geometric_on_features(
                    output_second.clone().detach().inner(),
                    &geometric,
                );
                let (store_first, store_second) = match centroid_stores.as_mut() {
                    Some((first, second)) => (first, second),
                    None => (&mut first, &mut second),
                };
                store_first
                    .push_feature_maps(features_first)
                    .map_err(cluster_error)?;
                store_second
                    .push_feature_maps(features_second)
                    .map_err(cluster_error)?;
                // burn's autodiff frees a graph only in a backward pass: without one, every
                // batch's graph stays alive and memory grows with the dataset.
                let _ = (output_first.sum() + output_second.sum())
                    .mul_scalar(0.0)
                    .backward();
            }
            if !batch_statistics || centroid_stores.is_some() {
                let features_first = eval_network.forward(view_first.inner());
                let features_second = views::geometric_on_features(
                    eval_network.forward(view_second.inner()),
                    &geometric,
                );
                first
                    .push_feature_maps(features_first)
                    .map_err(cluster_error)?;
                second
                    .push_feature_maps(features_second)
                    .map_err(cluster_error)?;
            }
            if self.control.is_stopping() {
                break;
            }
        }
        self.add_times(PhaseTimes {
            views: stream.finish(),
            kmeans: 0.0,
        });
        observer.on_event(&TrainEvent::Phase {
            epoch,
            phase: TrainPhase::Clustering,
            done: 0,
            total: 2,
        });
        let kmeans_started = Instant::now();
        let compute_device = training_device.clone().inner();
        // Centroids from `centroid_store`, labels of `store`'s features (the same store
        // unless the reference's BatchNorm mode asked for a second pass).
        let kmeans = |store: &FeatureStore,
                      centroid_store: &FeatureStore,
                      view: u64,
                      clusters: usize,
                      init: Option<Centroids>|
         -> Result<_, TrainError> {
            let config = self.config.kmeans(
                clusters,
                self.config
                    .seed
                    .wrapping_mul(1000)
                    .wrapping_add(2 * epoch as u64 + view),
            );
            let centroids =
                cluster::kmeans_with(centroid_store, &config, init, &compute_device, &mut |_| {})
                    .map_err(cluster_error)?
                    .centroids;
            let assignment =
                cluster::assign(store, &centroids, &compute_device).map_err(cluster_error)?;
            Ok((centroids, assignment))
        };
        let (centroid_first, centroid_second) = match &centroid_stores {
            Some((first, second)) => (first, second),
            None => (&first, &second),
        };
        // The user's merges and splits: the main head starts from the edited centroids.
        let mut edited: Option<(Centroids, Vec<Option<usize>>)> = None;
        if let Some((previous, edits)) = edits {
            let mut centroids = previous.clone();
            let mut origin: Vec<Option<usize>> = (0..previous.clusters).map(Some).collect();
            for (index, edit) in edits.iter().enumerate() {
                let step = match cluster::edit_centroids(
                    &centroids,
                    edit,
                    centroid_first,
                    self.config.seed ^ (epoch as u64 * 7919 + index as u64),
                    &compute_device,
                ) {
                    Ok(step) => step,
                    Err(error) => {
                        // A stale or impossible edit must not end the run.
                        observer.on_event(&TrainEvent::EditRefused(error.to_string()));
                        continue;
                    }
                };
                origin = step
                    .origin
                    .iter()
                    .map(|from| from.and_then(|old| origin[old]))
                    .collect();
                centroids = step.centroids;
            }
            if centroids != *previous {
                edited = Some((centroids, origin));
            }
        }
        let main_k = edited.as_ref().map_or(clusters, |(c, _)| c.clusters);
        let heads: Vec<(usize, u64)> = std::iter::once((main_k, 0))
            .chain(self.config.overclusters.map(|k2| (k2, 2)))
            .collect();
        let total = 2 * heads.len();
        let mut results = Vec::with_capacity(heads.len());
        for (head, &(k, salt)) in heads.iter().enumerate() {
            observer.on_event(&TrainEvent::Phase {
                epoch,
                phase: TrainPhase::Clustering,
                done: 2 * head,
                total,
            });
            let init = if head == 0 {
                edited
                    .as_ref()
                    .map(|(centroids, _)| centroids.clone())
                    .or_else(|| warm_start.filter(|c| c.clusters == k).cloned())
            } else {
                None
            };
            let (centroids_first, assignment_first) =
                kmeans(&first, centroid_first, salt, k, init.clone())?;
            observer.on_event(&TrainEvent::Phase {
                epoch,
                phase: TrainPhase::Clustering,
                done: 2 * head + 1,
                total,
            });
            let (centroids_second, assignment_second) =
                kmeans(&second, centroid_second, salt + 1, k, init)?;
            results.push(EpochClusters {
                weights_first: class_weights(&assignment_first.counts, self.config.balance),
                weights_second: class_weights(&assignment_second.counts, self.config.balance),
                centroids_first,
                centroids_second,
                compactness_first: assignment_first.compactness,
                labels_first: assignment_first.labels,
                labels_second: assignment_second.labels,
                overclustering: None,
            });
        }
        self.add_times(PhaseTimes {
            views: 0.0,
            kmeans: kmeans_started.elapsed().as_secs_f64(),
        });
        let mut heads = results.into_iter();
        let mut main = heads
            .next()
            .ok_or_else(|| TrainError::Cluster("no clustering head".into()))?;
        main.overclustering = heads.next().map(Box::new);
        Ok((main, edited.map(|(_, origin)| origin)))
    }

    pub(super) fn report_clusters(
        &self,
        epoch: usize,
        clusters: &EpochClusters,
        label_change: Option<f64>,
        observer: &mut dyn TrainObserver,
    ) {
        let grid = self.config.feature_grid();
        let cells = grid * grid;
        let k = clusters.centroids_first.clusters;
        let mut pixel_counts = vec![0u64; k];
        let mut images_with = vec![0usize; k];
        let labels: Vec<usize> = clusters.labels_first.iter().collect();
        for image_labels in labels.chunks(cells) {
            let mut seen = vec![false; k];
            for &label in image_labels {
                pixel_counts[label] += 1;
                seen[label] = true;
            }
            for (count, present) in images_with.iter_mut().zip(seen) {
                *count += usize::from(present);
            }
        }
        let total = clusters.labels_first.len().max(1) as f64;
        observer.on_event(&TrainEvent::Clustered(ClusterStatistics {
            epoch,
            pixel_share: pixel_counts.iter().map(|&c| c as f64 / total).collect(),
            compactness: clusters
                .compactness_first
                .iter()
                .map(|value| value.unwrap_or(0.0))
                .collect(),
            images_with_cluster: images_with,
            label_change,
            centroids: clusters.centroids_first.values.clone(),
            dim: clusters.centroids_first.dim,
        }));
    }

    /// Cluster maps of the first `preview_images` images as the network sees them now: the
    /// un-augmented image's features assigned to the epoch's view-1 centroids, with each
    /// cell's cosine similarity to its centroid.
    pub(super) fn preview_maps(
        &self,
        network: &PicieNet,
        centroids: &Centroids,
        device: &Device,
    ) -> Result<Vec<ClusterMap>, TrainError> {
        let count = self.config.preview_images.min(self.data.len());
        if count == 0 {
            return Ok(Vec::new());
        }
        let size = self.data.eval_size as usize;
        let indices: Vec<usize> = (0..count).collect();
        let images = self.data.eval_images.gather(&indices)?;
        let images: Vec<&[u8]> = images.iter().map(AsRef::as_ref).collect();
        let features = network.forward(images_to_tensor(&images, size, device));
        let [batch, dim, grid_height, grid_width] = features.dims();
        // [B, D, h, w] -> [B, h*w, D] -> [B*h*w, D] x [D, K] -> [B*h*w, K]
        let pixels = features
            .reshape([batch, dim, grid_height * grid_width])
            .swap_dims(1, 2)
            .reshape([batch * grid_height * grid_width, dim]);
        let similarities = pixels.matmul(centroids.to_tensor(device).transpose());
        // As the evaluation does: the similarities are upsampled to the input's pixels before
        // the argmax, so a cluster's boundary follows the image instead of the feature grid.
        let clusters = centroids.clusters;
        let similarities = crate::model::permute_axes(
            similarities.reshape([batch, grid_height, grid_width, clusters]),
            [0, 3, 1, 2],
        );
        let similarities = if [grid_height, grid_width] == [size, size] {
            similarities
        } else {
            crate::model::resize::resize_bilinear(similarities, [size, size])
        };
        let (height, width) = (size, size);
        let (best, index) = similarities.max_dim_with_indices(1);
        let best = best
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap_or_default();
        let index = index
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .unwrap_or_default();
        let cells = height * width;
        Ok((0..batch)
            .filter(|image| index.len() >= (image + 1) * cells && best.len() >= (image + 1) * cells)
            .map(|image| ClusterMap {
                image_index: image,
                image_name: self.data.names.get(image).cloned().unwrap_or_default(),
                width,
                height,
                labels: index[image * cells..(image + 1) * cells]
                    .iter()
                    .map(|&label| label as u16)
                    .collect(),
                similarity: best[image * cells..(image + 1) * cells].to_vec(),
            })
            .collect())
    }
}
