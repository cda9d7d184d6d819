//! One epoch of the trainer: cluster both views, preview, train batch by batch on views built
//! ahead on their own thread, evaluate, checkpoint.

use super::*;

impl Trainer {
    /// One epoch: cluster both views, preview, train, evaluate, checkpoint. Returns false
    /// when a stop request ended it before its checkpoint (the last one stands).
    pub(super) fn run_epoch(
        &mut self,
        epoch: usize,
        state: &mut RunState,
        compute: &ComputeDevice,
        training_device: &Device,
        observer: &mut dyn TrainObserver,
    ) -> Result<bool, TrainError> {
        let order = self.batch_order(epoch);
        let params: Arc<Vec<ViewParams>> = Arc::new(
            (0..self.data.len())
                .map(|index| {
                    views::draw_view_params(
                        self.config.seed,
                        epoch,
                        index,
                        self.config.feature_grid(),
                    )
                })
                .collect(),
        );

        self.phase_times.set(PhaseTimes::default());
        let clustering_started = Instant::now();
        let edits = self.control.take_edits();
        let edit_request = state
            .previous
            .as_ref()
            .filter(|_| !edits.is_empty())
            .map(|previous| (&previous.centroids, edits.as_slice()));
        let (mut epoch_clusters, edited_origin) = self.cluster_epoch(
            &state.model.network,
            training_device,
            epoch,
            &order,
            &params,
            state.clusters,
            edit_request,
            state
                .previous
                .as_ref()
                .filter(|_| self.config.kmeans_warm_start)
                .map(|previous| &previous.centroids),
            observer,
        )?;
        let edited = edited_origin.is_some();
        match edited_origin {
            Some(origin) => {
                // The user's edit defines the ids of this epoch; K may have changed.
                state.clusters = epoch_clusters.centroids_first.clusters;
                self.config.clusters = Some(state.clusters);
                self.config.save(&self.run.config_path())?;
                observer.on_event(&TrainEvent::ClustersEdited { epoch, origin });
            }
            None => {
                if let Some(previous) = &state.previous {
                    epoch_clusters.keep_ids_of(&previous.centroids);
                }
            }
        }
        let seconds_clustering = clustering_started.elapsed().as_secs_f64();
        let maps = self.preview_maps(
            &state.model.network.valid(),
            &epoch_clusters.centroids_first,
            &compute.device,
        )?;
        // Over the same pixels of the same (un-augmented) images: the training views are
        // new random crops every epoch, so their labels cannot be compared cell by cell.
        let preview_labels = preview_labels(&maps);
        let label_change = state
            .previous
            .as_ref()
            .filter(|previous| !edited && !previous.preview_labels.is_empty())
            .and_then(|previous| {
                cluster::label_change_fraction(&previous.preview_labels, &preview_labels).ok()
            });
        self.report_clusters(epoch, &epoch_clusters, label_change, observer);
        observer.on_event(&TrainEvent::Preview {
            epoch,
            step: 0,
            maps,
        });
        if self.control.is_stopping() {
            return Ok(false);
        }

        let training_started = Instant::now();
        let (loss, completed) = self.train_epoch(
            &mut state.model,
            training_device,
            epoch,
            &order,
            &params,
            &epoch_clusters,
            state.started,
            state.first_epoch,
            observer,
        )?;
        let seconds_training = training_started.elapsed().as_secs_f64();
        if !completed {
            // Stopped inside the epoch: the last complete epoch's checkpoint stands.
            return Ok(false);
        }

        let evaluation_started = Instant::now();
        let network = state.model.network.valid();
        let (evaluation, bank) = self.evaluate(
            &network,
            &compute.device,
            epoch,
            Some(&epoch_clusters.centroids_first),
            self.config.feature_bank,
            observer,
        )?;
        let held_out = self.evaluate_held_out(&network, &compute.device, epoch, observer)?;
        let times = self.phase_times.get();
        let record = EpochRecord {
            epoch,
            acc: evaluation.as_ref().map(|e| e.accuracy),
            miou: evaluation.as_ref().map(|e| e.mean_iou),
            held_out: held_out.map(|evaluation| Score {
                acc: evaluation.accuracy,
                miou: evaluation.mean_iou,
            }),
            seconds_clustering,
            seconds_training,
            seconds_evaluation: evaluation_started.elapsed().as_secs_f64(),
            seconds_views: times.views,
            seconds_kmeans: times.kmeans,
            seconds_saving: 0.0,
            images_per_second: self.data.len() as f64 / seconds_training.max(1e-9),
            loss,
            label_change,
        };
        self.checkpoint_epoch(record, state, &epoch_clusters, bank, observer)?;
        state.previous = Some(PreviousEpoch {
            centroids: epoch_clusters.centroids_first,
            preview_labels,
        });
        Ok(true)
    }

    /// The seeded order of images in this epoch's batches.
    pub(super) fn batch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        order.shuffle(&mut rng);
        order
    }

    pub(super) fn batches<'a>(&self, order: &'a [usize]) -> impl Iterator<Item = &'a [usize]> + 'a {
        order.chunks(self.config.batch_size)
    }

    /// Starts building the views of `batches` on the view thread.
    pub(super) fn view_stream(
        &self,
        batches: &[&[usize]],
        params: &Arc<Vec<ViewParams>>,
    ) -> Result<ViewStream, TrainError> {
        ViewStream::start(
            Arc::clone(&self.data),
            self.config.input_size as usize,
            batches.iter().map(|batch| batch.to_vec()).collect(),
            Arc::clone(params),
        )
        .map_err(|error| TrainError::Data(format!("could not start the view thread: {error}")))
    }

    /// One pass of optimisation over the epoch's batches. Returns the mean loss terms and
    /// whether the epoch completed (false on a stop request).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn train_epoch(
        &self,
        model: &mut Model,
        device: &Device,
        epoch: usize,
        order: &[usize],
        params: &Arc<Vec<ViewParams>>,
        clusters: &EpochClusters,
        run_started: Instant,
        first_epoch: usize,
        observer: &mut dyn TrainObserver,
    ) -> Result<(LossTerms, bool), TrainError> {
        let grid = self.config.feature_grid();
        let cells = grid * grid;
        // One head, or two for PiCIE + H (K and K2), each with its own weight in the loss.
        let head_weights = match (&clusters.overclustering, self.config.overclusters) {
            (Some(_), Some(k2)) => {
                let (lambda1, lambda2) =
                    crate::loss::overclustering_weights(clusters.centroids_first.clusters, k2);
                vec![lambda1, lambda2]
            }
            _ => vec![1.0],
        };
        let heads: Vec<HeadTensors> = std::iter::once(clusters)
            .chain(clusters.overclustering.as_deref())
            .map(|head| HeadTensors::new(head, device))
            .collect();
        let batches: Vec<&[usize]> = self.batches(order).collect();
        let mut sums = LossTerms::default();
        let mut images_done = 0usize;
        let started = Instant::now();
        let mut offset = 0usize;
        let mut stream = self.view_stream(&batches, params)?;
        for (step, batch) in batches.iter().enumerate() {
            if self
                .control
                .wait_if_paused(|paused| observer.on_event(&TrainEvent::Paused(paused)))
            {
                self.add_times(PhaseTimes {
                    views: stream.finish(),
                    kmeans: 0.0,
                });
                return Ok((sums.divided_by(step), false));
            }
            let prepared = stream.next().ok_or_else(view_thread_stopped)??;
            let (view_first, view_second) = prepared.views.into_tensors(device);
            let geometric = prepared.geometric;
            let range = offset * cells..(offset + batch.len()) * cells;
            offset += batch.len();

            // From the epoch number, so a resumed run continues the same schedule.
            let progress = ((epoch - 1) as f64 + step as f64 / batches.len() as f64)
                / self.config.epochs as f64;
            let learning_rate = self
                .config
                .learning_rate_schedule
                .rate(self.config.learning_rate, progress);
            let step_heads: Vec<StepHead> = std::iter::once(clusters)
                .chain(clusters.overclustering.as_deref())
                .zip(&heads)
                .zip(&head_weights)
                .map(|((clusters, tensors), &weight)| StepHead {
                    clusters,
                    tensors,
                    weight,
                })
                .collect();
            let labels = StepLabels {
                range,
                shape: [batch.len(), grid, grid],
                device,
            };
            let terms = crate::parallel::on_pool_thread(|| {
                train_step(
                    model,
                    (view_first, view_second),
                    &geometric,
                    &step_heads,
                    &labels,
                    learning_rate,
                )
            })?;
            if !terms.total.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: terms.total,
                    learning_rate: self.config.learning_rate,
                });
            }

            images_done += batch.len();
            sums = sums + terms;
            let elapsed = started.elapsed().as_secs_f64();
            let images_per_second = images_done as f64 / elapsed.max(1e-9);
            let epochs_done =
                (epoch - first_epoch) as f64 + (step + 1) as f64 / batches.len() as f64;
            let per_epoch = run_started.elapsed().as_secs_f64() / epochs_done.max(1e-9);
            let eta_seconds =
                per_epoch * ((self.config.epochs + 1 - first_epoch) as f64 - epochs_done);
            let every = self.config.preview_every_steps;
            if every > 0 && (step + 1) % every == 0 && step + 1 < batches.len() {
                observer.on_event(&TrainEvent::Preview {
                    epoch,
                    step: step + 1,
                    maps: self.preview_maps(
                        &model.network.valid(),
                        &clusters.centroids_first,
                        &device.clone().inner(),
                    )?,
                });
            }
            observer.on_event(&TrainEvent::Step(StepProgress {
                epoch,
                step: step + 1,
                steps: batches.len(),
                images_per_second,
                eta_seconds,
                loss: terms,
            }));
        }
        self.add_times(PhaseTimes {
            views: stream.finish(),
            kmeans: 0.0,
        });
        Ok((sums.divided_by(batches.len()), true))
    }
}

/// One clustering head as a training step sees it: its pseudo-labels, their centroids and
/// class weights as tensors, and its weight in the loss.
struct StepHead<'a> {
    clusters: &'a EpochClusters,
    tensors: &'a HeadTensors,
    weight: f32,
}

/// Where a training step finds its pseudo-labels: the batch's pixel cells in the epoch's
/// label arrays, as tensors of `shape` on `device`.
struct StepLabels<'a> {
    range: std::ops::Range<usize>,
    shape: [usize; 3],
    device: &'a Device,
}

impl StepLabels<'_> {
    fn tensor(&self, labels: &PixelLabels) -> Result<Tensor<3, Int>, TrainError> {
        let slice: Vec<i64> = labels
            .slice_usize(self.range.clone())
            .map_err(cluster_error)?
            .into_iter()
            .map(|label| label as i64)
            .collect();
        Ok(Tensor::<3, Int>::from_data(
            TensorData::new(slice, self.shape),
            self.device,
        ))
    }
}

/// One training step: both views through the network, every head's loss and, when the loss is
/// finite, the backward pass and the optimiser's step at `learning_rate`. Returns the loss
/// terms; when they are not finite, nothing was updated.
fn train_step(
    model: &mut Model,
    (view_first, view_second): (Tensor<4>, Tensor<4>),
    geometric: &[views::GeometricParams],
    heads: &[StepHead],
    labels: &StepLabels,
    learning_rate: f64,
) -> Result<LossTerms, TrainError> {
    let features_first = model.network.forward(view_first);
    let features_second =
        views::geometric_on_features(model.network.forward(view_second), geometric);
    let mut loss = None;
    for head in heads {
        let head_loss = picie_loss(
            features_first.clone(),
            features_second.clone(),
            head.tensors.mu_first.clone(),
            head.tensors.mu_second.clone(),
            labels.tensor(&head.clusters.labels_first)?,
            labels.tensor(&head.clusters.labels_second)?,
            head.tensors.weights_first.clone(),
            head.tensors.weights_second.clone(),
        )
        .scaled(head.weight);
        loss = Some(match loss {
            None => head_loss,
            Some(sum) => head_loss.combined(sum),
        });
    }
    let loss = loss.ok_or_else(|| TrainError::Cluster("no clustering head".into()))?;
    let terms = loss.terms();
    if !terms.total.is_finite() {
        return Ok(terms);
    }
    let gradients = GradientsParams::from_grads(loss.total.backward(), &model.network);
    // Parameters are shared handles, so the clone is cheap; the step returns the update.
    model.network = model
        .optimizer
        .step(learning_rate, model.network.clone(), gradients);
    Ok(terms)
}
