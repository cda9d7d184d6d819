//! Scoring a network: the un-augmented images' features (spilling past a memory budget),
//! a fresh k-means, Hungarian matching against the labels; the held-out split; the feature
//! bank built from the same forward pass.

use super::*;

/// Passes events on, but reports scores as the held-out images' and progress as evaluation.
struct HeldOutRelay<'a> {
    inner: &'a mut dyn TrainObserver,
}

impl TrainObserver for HeldOutRelay<'_> {
    fn on_event(&mut self, event: &TrainEvent) {
        match event {
            TrainEvent::Evaluated { epoch, evaluation } => {
                self.inner.on_event(&TrainEvent::HeldOutEvaluated {
                    epoch: *epoch,
                    evaluation: evaluation.clone(),
                })
            }
            other => self.inner.on_event(other),
        }
    }
}

/// Rows a feature store keeps in memory before it moves them to its spill file. Two stores
/// (the two views) live at once while an epoch is clustered: with the decoded images'
/// budget ([`crate::data::DEFAULT_DECODED_MEMORY_BUDGET`]) this bounds the data's memory at
/// about 3 GiB whatever the number of images.
pub const FEATURE_MEMORY_BUDGET_BYTES: usize = 1 << 30;

/// A feature store that spills to `folder` past [`FEATURE_MEMORY_BUDGET_BYTES`] (in memory
/// only without one).
pub(super) fn spilling_store(folder: Option<&Path>) -> Result<FeatureStore, TrainError> {
    FeatureStore::new(
        FEATURE_DIM,
        folder.map(|folder| SpillConfig::new(folder, FEATURE_MEMORY_BUDGET_BYTES)),
    )
    .map_err(cluster_error)
}

/// Features of the un-augmented images (network in eval mode), in dataset order, spilling to
/// `spill_folder` past the memory budget; with `bank`, the same features also go into a
/// feature bank.
#[allow(clippy::too_many_arguments)]
fn eval_features(
    network: &PicieNet,
    data: &TrainingData,
    config: &TrainConfig,
    device: &Device,
    epoch: usize,
    spill_folder: Option<&Path>,
    mut bank: Option<&mut BankBuilder>,
    observer: &mut dyn TrainObserver,
) -> Result<FeatureStore, TrainError> {
    let size = data.eval_size as usize;
    let mut store = spilling_store(spill_folder)?;
    let indices: Vec<usize> = (0..data.len()).collect();
    let batches: Vec<&[usize]> = indices.chunks(config.batch_size).collect();
    for (done, batch) in batches.iter().enumerate() {
        observer.on_event(&TrainEvent::Phase {
            epoch,
            phase: TrainPhase::Evaluating,
            done,
            total: batches.len(),
        });
        let images = data.eval_images.gather(batch)?;
        let images: Vec<&[u8]> = images.iter().map(AsRef::as_ref).collect();
        let input = images_to_tensor(&images, size, device);
        let features = if config.test_time_flip {
            network.forward_flip_averaged(input)
        } else {
            network.forward(input)
        };
        if let Some(bank) = bank.as_deref_mut() {
            bank.push(features.clone())?;
        }
        store.push_feature_maps(features).map_err(cluster_error)?;
    }
    Ok(store)
}

/// Clusters the un-augmented images afresh into `clusters` centroids; their features spill
/// to `spill_folder` past the memory budget.
#[allow(clippy::too_many_arguments)]
pub fn cluster_unaugmented(
    network: &PicieNet,
    data: &TrainingData,
    config: &TrainConfig,
    clusters: usize,
    device: &Device,
    epoch: usize,
    spill_folder: Option<&Path>,
    observer: &mut dyn TrainObserver,
) -> Result<Centroids, TrainError> {
    let store = eval_features(
        network,
        data,
        config,
        device,
        epoch,
        spill_folder,
        None,
        observer,
    )?;
    cluster_store(&store, config, clusters, device)
}

/// Fresh k-means of stored un-augmented features (seeded by the config's seed).
fn cluster_store(
    store: &FeatureStore,
    config: &TrainConfig,
    clusters: usize,
    device: &Device,
) -> Result<Centroids, TrainError> {
    let kmeans = config.eval_kmeans(clusters, config.seed);
    Ok(cluster::kmeans(store, &kmeans, device)
        .map_err(cluster_error)?
        .centroids)
}

/// Clusters the un-augmented images afresh (K = the number of classes unless the config says
/// otherwise) and scores the clusters against the labels with Hungarian matching, as the
/// reference does. `None` when the dataset has no labels. With `shown_centroids` (those whose
/// clusters the user sees), the evaluation's `assignment` names those clusters by the labels
/// of their own pixels; the scores stay the fresh clustering's. The features spill to
/// `spill_folder` past the memory budget.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_network(
    network: &PicieNet,
    data: &TrainingData,
    config: &TrainConfig,
    device: &Device,
    epoch: usize,
    shown_centroids: Option<&Centroids>,
    spill_folder: Option<&Path>,
    observer: &mut dyn TrainObserver,
) -> Result<Option<Evaluation>, TrainError> {
    if data.eval_labels.is_none() || data.classes().is_none() {
        return Ok(None);
    }
    let store = eval_features(
        network,
        data,
        config,
        device,
        epoch,
        spill_folder,
        None,
        observer,
    )?;
    evaluate_stored(
        &store,
        data,
        config,
        device,
        epoch,
        shown_centroids,
        observer,
    )
}

/// [`evaluate_network`] from the features [`eval_features`] stored: one forward pass serves
/// the clustering and the scoring.
fn evaluate_stored(
    store: &FeatureStore,
    data: &TrainingData,
    config: &TrainConfig,
    device: &Device,
    epoch: usize,
    shown_centroids: Option<&Centroids>,
    observer: &mut dyn TrainObserver,
) -> Result<Option<Evaluation>, TrainError> {
    let (Some(labels), Some(classes)) = (&data.eval_labels, data.classes()) else {
        return Ok(None);
    };
    let k = config.eval_clusters.unwrap_or(classes);
    let centroids = cluster_store(store, config, k, device)?;
    let size = data.eval_size as usize;
    let side = size / crate::model::FEATURE_STRIDE;
    let guides = (config.upsampling == Upsampling::Bilateral).then_some(&data.eval_images);
    let confusion = confusion_from_store(
        store,
        [side, side],
        &centroids,
        labels,
        [size, size],
        classes,
        guides,
    )
    .map_err(cluster_error)?;
    let mut evaluation = Evaluation::from_confusion(&confusion);
    // The scores come from the fresh clustering, as the reference's; the class each cluster
    // the user sees is named after comes from those clusters' own pixels. (Renumbering the
    // fresh clusters by centroid similarity named grass "ball" when the two partitions
    // differed.)
    if let Some(shown) = shown_centroids {
        let shown_confusion = confusion_from_store(
            store,
            [side, side],
            shown,
            labels,
            [size, size],
            classes,
            None,
        )
        .map_err(cluster_error)?;
        evaluation.assignment = Evaluation::from_confusion(&shown_confusion).assignment;
    }
    observer.on_event(&TrainEvent::Evaluated {
        epoch,
        evaluation: evaluation.clone(),
    });
    Ok(Some(evaluation))
}

impl Trainer {
    /// Where the un-augmented images' features spill.
    pub(super) fn eval_spill(&self) -> PathBuf {
        crate::run::paths::feature_spill(self.run.root(), "eval")
    }

    /// Scores the network on the un-augmented images (when they have labels) and, with
    /// `with_bank`, builds their feature bank from the same forward pass.
    pub(super) fn evaluate(
        &self,
        network: &PicieNet,
        device: &Device,
        epoch: usize,
        shown_centroids: Option<&Centroids>,
        with_bank: bool,
        observer: &mut dyn TrainObserver,
    ) -> Result<(Option<Evaluation>, Option<BankBuilder>), TrainError> {
        if self.data.eval_labels.is_none() && !with_bank {
            return Ok((None, None));
        }
        let mut bank = if with_bank {
            Some(BankBuilder::streaming(
                &self.data,
                self.config.bank_patch,
                self.run.root(),
            )?)
        } else {
            None
        };
        let store = eval_features(
            network,
            &self.data,
            &self.config,
            device,
            epoch,
            Some(&self.eval_spill()),
            bank.as_mut(),
            observer,
        )?;
        let evaluation = evaluate_stored(
            &store,
            &self.data,
            &self.config,
            device,
            epoch,
            shown_centroids,
            observer,
        )?;
        Ok((evaluation, bank))
    }

    /// Scores the network on the held-out images, when the run holds some out.
    pub(super) fn evaluate_held_out(
        &self,
        network: &PicieNet,
        device: &Device,
        epoch: usize,
        observer: &mut dyn TrainObserver,
    ) -> Result<Option<Evaluation>, TrainError> {
        let Some(held_out) = &self.held_out else {
            return Ok(None);
        };
        let mut relay = HeldOutRelay { inner: observer };
        evaluate_network(
            network,
            held_out,
            &self.config,
            device,
            epoch,
            None,
            Some(&self.eval_spill()),
            &mut relay,
        )
    }
}
