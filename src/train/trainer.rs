//! The training loop.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::control::TrainControl;
use super::events::{
    ClusterMap, ClusterStatistics, EpochRecord, LossTerms, StepProgress, TrainEvent, TrainObserver,
    TrainPhase,
};
use super::prefetch::ViewStream;
use crate::bank::{BankBuilder, write_bank};
use crate::cluster::{self, Centroids, ClusterEdit, FeatureStore, PixelLabels, SpillConfig};
use crate::config::{ClusterBatchNorm, ConfigError, TrainConfig, Upsampling};
use crate::data::TrainingData;
use crate::data::views::{self, ViewParams};
use crate::device::{BackendKind, ComputeDevice, DeviceError};
use crate::eval::{Evaluation, confusion_from_store};
use crate::loss::{class_weights, picie_loss};
use crate::model::{
    FEATURE_DIM, PicieNet, WeightsError, build_network, images_to_tensor, random_network,
};
use crate::run::{CheckpointState, Metrics, RunError, RunFolder, Score, SegmentationCentroids};

/// Why training could not run or continue.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No usable device.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Weights could not be loaded.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The run folder could not be read or written.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Clustering failed.
    #[error("clustering failed: {0}")]
    Cluster(String),
    /// The dataset does not fit the configuration.
    #[error("{0}")]
    Data(String),
    /// A decoded image could not be read back from its cache file.
    #[error(transparent)]
    DecodedImage(#[from] crate::data::StackReadError),
    /// The feature bank could not be built or saved.
    #[error(transparent)]
    Bank(#[from] crate::bank::BankError),
    /// The connection to the remote server broke off (burn's remote client cannot recover a
    /// session, it panics): training stopped; the last epoch's checkpoint is on disk.
    #[error(
        "the connection to the server at {device} broke off during epoch {epoch}; training \
         stopped, and the run keeps its last checkpoint (epoch {last_checkpoint}). When the \
         server is back (`picie serve`), continue the run (Continue in the app, `picie train \
         --resume` on the command line)"
    )]
    RemoteLost {
        /// The server, as the user named it.
        device: String,
        /// The epoch that was running.
        epoch: usize,
        /// The epoch of the checkpoint on disk (0: the untrained network's).
        last_checkpoint: usize,
    },
    /// The loss stopped being a finite number.
    #[error(
        "training diverged at epoch {epoch}, step {step}: the loss is {loss}. Lower the learning \
         rate (it is {learning_rate:e}; the default is 1e-4) and start the run again"
    )]
    Diverged {
        /// The epoch.
        epoch: usize,
        /// The step in the epoch, from 1.
        step: usize,
        /// The loss value.
        loss: f32,
        /// The run's learning rate.
        learning_rate: f64,
    },
}

/// How a training run ended.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The last epoch with a checkpoint (0: only the untrained network).
    pub last_epoch: usize,
    /// Whether a stop request ended training early.
    pub stopped: bool,
    /// The metrics written to `metrics.json`.
    pub metrics: Metrics,
}

/// Trains PiCIE on a dataset into a run folder.
pub struct Trainer {
    config: TrainConfig,
    run: RunFolder,
    data: Arc<TrainingData>,
    /// The images held out of training by [`TrainConfig::held_out_prefix`], scored beside.
    held_out: Option<Arc<TrainingData>>,
    control: TrainControl,
    resume: bool,
    /// This epoch's time in parts of its phases, for the epoch record.
    phase_times: Cell<PhaseTimes>,
}

/// Seconds of an epoch spent in parts of its phases.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseTimes {
    /// Building views (on the view thread, beside the network's work).
    views: f64,
    /// k-means and labelling, after the features.
    kmeans: f64,
}

/// The network being trained and its optimiser.
struct Model {
    network: PicieNet,
    optimizer: ModuleOptimizer,
}

/// A clustering head's centroids and class weights as tensors on the training device.
struct HeadTensors {
    mu_first: Tensor<2>,
    mu_second: Tensor<2>,
    weights_first: Option<Tensor<1>>,
    weights_second: Option<Tensor<1>>,
}

impl HeadTensors {
    fn new(head: &EpochClusters, device: &Device) -> Self {
        let weights = |weights: &Option<Vec<f32>>| {
            weights
                .as_ref()
                .map(|w| Tensor::<1>::from_data(TensorData::new(w.clone(), [w.len()]), device))
        };
        Self {
            mu_first: head.centroids_first.to_tensor(device),
            mu_second: head.centroids_second.to_tensor(device),
            weights_first: weights(&head.weights_first),
            weights_second: weights(&head.weights_second),
        }
    }
}

/// One epoch's pseudo-labels and centroids for both views.
struct EpochClusters {
    centroids_first: Centroids,
    centroids_second: Centroids,
    labels_first: PixelLabels,
    labels_second: PixelLabels,
    compactness_first: Vec<Option<f64>>,
    weights_first: Option<Vec<f32>>,
    weights_second: Option<Vec<f32>>,
    /// The K2 clustering of PiCIE + H, when enabled.
    overclustering: Option<Box<EpochClusters>>,
}

impl EpochClusters {
    /// Renumbers the view-1 clusters to match `previous` (see [`cluster::match_to_previous`]),
    /// so a cluster keeps its id, and its colour in the app, from epoch to epoch. View 2's
    /// numbering only ever meets its own labels, so it is left alone.
    fn keep_ids_of(&mut self, previous: &Centroids) {
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

/// Refuses a resume whose settings differ from the run's recorded ones, naming them.
fn check_resume(
    run: &RunFolder,
    asked: &TrainConfig,
    recorded: &TrainConfig,
) -> Result<(), TrainError> {
    let conflicts = asked.resume_conflicts(recorded);
    if conflicts.is_empty() {
        return Ok(());
    }
    Err(RunError::ResumeChanges {
        root: run.root().to_owned(),
        changes: conflicts.join(", "),
    }
    .into())
}

/// `origin[new] = Some(old)`: the previous epoch's cluster a new id continues after an edit.
type IdOrigin = Vec<Option<usize>>;

/// What the next epoch's clustering is compared with.
struct PreviousEpoch {
    centroids: Centroids,
    /// The cluster of every pixel of the preview images' maps at the epoch's start (empty
    /// without previews).
    preview_labels: PixelLabels,
}

/// What carries from one epoch to the next.
struct RunState {
    model: Model,
    /// The first epoch this call trains (1, or the one after the restored checkpoint).
    first_epoch: usize,
    /// K of the main head (a user's merge or split changes it).
    clusters: usize,
    metrics: Metrics,
    previous: Option<PreviousEpoch>,
    /// When this call started, for the time estimate.
    started: Instant,
}

/// The preview maps' clusters, every map's pixels one after the other, to compare with the
/// same images' maps of another epoch.
fn preview_labels(maps: &[ClusterMap]) -> PixelLabels {
    PixelLabels::U16(
        maps.iter()
            .flat_map(|map| map.labels.iter().copied())
            .collect(),
    )
}

impl Trainer {
    /// A trainer writing into `run`; with `resume` it continues from the run's latest
    /// checkpoint (and the run's own config).
    pub fn new(
        config: TrainConfig,
        run: RunFolder,
        data: Arc<TrainingData>,
        control: TrainControl,
        resume: bool,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        if data.is_empty() {
            return Err(TrainError::Data("the dataset has no images".into()));
        }
        if data.base_size != config.base_size || data.eval_size != config.input_size {
            return Err(TrainError::Data(format!(
                "the dataset was decoded at {}/{} but the config asks for base {} and input {}",
                data.base_size, data.eval_size, config.base_size, config.input_size
            )));
        }
        let mut config = config;
        if resume {
            let mut recorded = run.config()?;
            if recorded.clusters.is_none() {
                // Runs made before K was recorded: the checkpoint's K, not one from labels.
                recorded.clusters = run
                    .latest_checkpoint()
                    .ok()
                    .flatten()
                    .map(|(_, state)| state.clusters);
            }
            // K left open means the run's own K.
            config.clusters = config.clusters.or(recorded.clusters);
            check_resume(&run, &config, &recorded)?;
        } else if config.clusters.is_none() {
            // K is recorded, so a resume without labels keeps it.
            config.clusters = Some(config.clusters_for(data.classes()));
        }
        if run.is_locked() {
            config.save(&run.config_path())?;
        }
        let (data, held_out) = match &config.held_out_prefix {
            Some(prefix) => {
                let (kept, held) = data.split_held_out(prefix).map_err(TrainError::Data)?;
                (Arc::new(kept), Some(Arc::new(held)))
            }
            None => (data, None),
        };
        Ok(Self {
            config,
            run,
            data,
            held_out,
            control,
            resume,
            phase_times: Cell::new(PhaseTimes::default()),
        })
    }

    /// Runs the remaining epochs on `compute` (chosen by the caller, usually with
    /// [`crate::device::select_device`] from the config's `device`). Returns after the last
    /// epoch or, on a stop request, after the current batch with a checkpoint of the last
    /// completed epoch.
    pub fn run(
        &mut self,
        compute: &ComputeDevice,
        observer: &mut dyn TrainObserver,
    ) -> Result<TrainOutcome, TrainError> {
        if compute.backend != BackendKind::Remote {
            return self.run_on(compute, observer);
        }
        // burn's remote client panics when its connection breaks; everything it could have
        // been writing goes to a temporary file first, so the run folder stays whole.
        let epoch = Cell::new(0);
        let mut watched = |event: &TrainEvent| {
            if let TrainEvent::Step(progress) = event {
                epoch.set(progress.epoch);
            }
            observer.on_event(event);
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_on(compute, &mut watched)
        })) {
            Ok(outcome) => outcome,
            Err(_) => Err({
                crate::device::forget_remote_sessions();
                TrainError::RemoteLost {
                    device: match &self.config.device {
                        crate::device::DeviceChoice::Remote(server) => server.url.clone(),
                        other => other.to_string(),
                    },
                    epoch: epoch.get(),
                    last_checkpoint: self
                        .run
                        .latest_checkpoint()
                        .ok()
                        .flatten()
                        .map_or(0, |(_, state)| state.epoch),
                }
            }),
        }
    }

    /// The run, step by step: [`Trainer::prepare`], [`Trainer::score_untrained`], then
    /// [`Trainer::run_epoch`] for each epoch (which ends in [`Trainer::checkpoint_epoch`]),
    /// then [`Trainer::finish_run`].
    fn run_on(
        &mut self,
        compute: &ComputeDevice,
        observer: &mut dyn TrainObserver,
    ) -> Result<TrainOutcome, TrainError> {
        let mut state = self.prepare(compute, observer)?;
        if state.first_epoch == 1 {
            self.score_untrained(&state.model, compute, &mut state.metrics, observer)?;
            if self.config.epochs == 0 {
                self.finish_run(&state.model, 0, &compute.device, observer)?;
                observer.on_event(&TrainEvent::Finished { stopped: false });
                return Ok(TrainOutcome {
                    last_epoch: 0,
                    stopped: false,
                    metrics: state.metrics,
                });
            }
        }

        let training_device = compute.device.clone().autodiff();
        state.model.network = state.model.network.fork(&training_device).train();
        let mut last_epoch = state.first_epoch - 1;
        let mut stopped = false;
        // The time estimate counts from the first epoch, not from the untrained scoring.
        state.started = Instant::now();
        for epoch in state.first_epoch..=self.config.epochs {
            let completed =
                self.run_epoch(epoch, &mut state, compute, &training_device, observer)?;
            if !completed {
                stopped = true;
                break;
            }
            last_epoch = epoch;
            if self.control.is_stopping() {
                stopped = epoch < self.config.epochs;
                break;
            }
        }
        if last_epoch >= 1 && !stopped {
            self.finish_run(&state.model, last_epoch, &compute.device, observer)?;
        } else if last_epoch >= 1 {
            // A stopped run is still usable for segmenting with its last checkpoint.
            let valid = Model {
                network: self.run.latest_network(&compute.device)?.0,
                optimizer: self.config.adam().init(),
            };
            self.finish_run(&valid, last_epoch, &compute.device, observer)?;
        }
        observer.on_event(&TrainEvent::Finished { stopped });
        Ok(TrainOutcome {
            last_epoch,
            stopped,
            metrics: state.metrics,
        })
    }

    /// The network and optimiser to start from (restored from the run's checkpoint, or new),
    /// announced with [`TrainEvent::Started`].
    fn prepare(
        &self,
        compute: &ComputeDevice,
        observer: &mut dyn TrainObserver,
    ) -> Result<RunState, TrainError> {
        compute.device.seed(self.config.seed);
        let clusters = self.config.clusters_for(self.data.classes());
        let mut weights = String::from("the run's latest checkpoint");
        let (model, first_epoch, metrics, previous) = if self.resume {
            let (restored, note) = self.restore(compute)?;
            if let Some(note) = note {
                observer.on_event(&TrainEvent::Warning(note));
            }
            restored
        } else {
            let (network, origin) = if self.config.random_init {
                random_network(self.config.backbone, self.config.seed, &compute.device)?
            } else {
                build_network(
                    self.config.backbone,
                    self.config.weights.as_deref(),
                    self.config.seed,
                    &compute.device,
                )?
            };
            weights = origin.to_string();
            let optimizer = self.config.adam().init();
            (Model { network, optimizer }, 1, Metrics::default(), None)
        };
        observer.on_event(&TrainEvent::Started {
            device: compute.description.clone(),
            weights,
            images: self.data.len(),
            clusters,
            first_epoch,
            epochs: self.config.epochs,
            steps_per_epoch: self.data.len().div_ceil(self.config.batch_size),
        });
        Ok(RunState {
            model,
            first_epoch,
            clusters,
            metrics,
            previous,
            started: Instant::now(),
        })
    }

    /// Scores the untrained network exactly as trained ones are, into `metrics` (written to
    /// the run folder).
    fn score_untrained(
        &self,
        model: &Model,
        compute: &ComputeDevice,
        metrics: &mut Metrics,
        observer: &mut dyn TrainObserver,
    ) -> Result<(), TrainError> {
        let network = model.network.valid();
        let (evaluation, _) = self.evaluate(&network, &compute.device, 0, None, false, observer)?;
        if let Some(evaluation) = &evaluation {
            metrics.no_train = Some(Score {
                acc: evaluation.accuracy,
                miou: evaluation.mean_iou,
            });
        }
        metrics.no_train_held_out = self
            .evaluate_held_out(&network, &compute.device, 0, observer)?
            .map(|evaluation| Score {
                acc: evaluation.accuracy,
                miou: evaluation.mean_iou,
            });
        self.run.write_metrics(metrics)?;
        Ok(())
    }

    /// One epoch: cluster both views, preview, train, evaluate, checkpoint. Returns false
    /// when a stop request ended it before its checkpoint (the last one stands).
    fn run_epoch(
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

    /// Commits the epoch: its checkpoint with the metrics up to it (one rename), then its
    /// feature bank, then the top-level metrics copy; reports [`TrainEvent::EpochFinished`].
    fn checkpoint_epoch(
        &self,
        mut record: EpochRecord,
        state: &mut RunState,
        epoch_clusters: &EpochClusters,
        bank: Option<BankBuilder>,
        observer: &mut dyn TrainObserver,
    ) -> Result<(), TrainError> {
        let epoch = record.epoch;
        let saving_started = Instant::now();
        observer.on_event(&TrainEvent::Phase {
            epoch,
            phase: TrainPhase::Checkpointing,
            done: 0,
            total: 1,
        });
        // The metrics are committed with the checkpoint, so the two never disagree.
        let metrics = &mut state.metrics;
        metrics.epochs.retain(|existing| existing.epoch < epoch);
        metrics.epochs.push(record.clone());
        self.run.write_checkpoint(
            &CheckpointState {
                epoch,
                seed: self.config.seed,
                clusters: state.clusters,
                dim: FEATURE_DIM,
                centroids_first: epoch_clusters.centroids_first.values.clone(),
                centroids_second: epoch_clusters.centroids_second.values.clone(),
            },
            &state.model.network.valid(),
            &state.model.optimizer,
            metrics,
        )?;
        if let Some(bank) = bank {
            bank.publish(&self.data, epoch, self.run.root())?;
        }
        record.seconds_saving = saving_started.elapsed().as_secs_f64();
        if let Some(last) = metrics.epochs.last_mut() {
            last.seconds_saving = record.seconds_saving;
        }
        self.run.write_metrics(metrics)?;
        observer.on_event(&TrainEvent::EpochFinished(record));
        Ok(())
    }

    /// Loads the newest intact checkpoint of the run; the note says when the latest was
    /// damaged and an older one is used.
    #[allow(clippy::type_complexity)]
    fn restore(
        &self,
        compute: &ComputeDevice,
    ) -> Result<
        (
            (Model, usize, Metrics, Option<PreviousEpoch>),
            Option<String>,
        ),
        TrainError,
    > {
        let ((network, optimizer, metrics), _directory, state, note) =
            self.run.load_newest(|directory, state| {
                let (network, _) =
                    PicieNet::load(&directory.join("network.safetensors"), &compute.device)?;
                let optimizer_path = directory.join("optimizer.bpk");
                let optimizer = if state.epoch == 0 {
                    self.config.adam().init()
                } else {
                    self.config
                        .adam()
                        .init()
                        .load(&optimizer_path)
                        .map_err(|error| RunError::Read {
                            path: optimizer_path.clone(),
                            reason: format!("{error:?}"),
                        })?
                };
                Ok((network, optimizer, self.run.checkpoint_metrics(directory)?))
            })?;
        let previous = Centroids::new(state.centroids_first.clone(), state.clusters, state.dim)
            .ok()
            .map(|centroids| PreviousEpoch {
                centroids,
                // Not kept in checkpoints: the first resumed epoch reports no label change.
                preview_labels: PixelLabels::U16(Vec::new()),
            });
        Ok((
            (
                Model { network, optimizer },
                state.epoch + 1,
                metrics,
                previous,
            ),
            note,
        ))
    }

    /// A feature store for one view that spills to the run folder past a memory budget, so
    /// datasets of 10^7..10^8 pixels fit.
    fn feature_store(&self, name: &str) -> Result<FeatureStore, TrainError> {
        spilling_store(Some(&crate::run::paths::feature_spill(
            self.run.root(),
            name,
        )))
    }

    /// Where the un-augmented images' features spill.
    fn eval_spill(&self) -> PathBuf {
        crate::run::paths::feature_spill(self.run.root(), "eval")
    }

    /// The seeded order of images in this epoch's batches.
    fn batch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        order.shuffle(&mut rng);
        order
    }

    fn batches<'a>(&self, order: &'a [usize]) -> impl Iterator<Item = &'a [usize]> + 'a {
        order.chunks(self.config.batch_size)
    }

    /// Starts building the views of `batches` on the view thread.
    fn view_stream(
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

    /// Computes both views' features for the whole dataset and clusters them.
    #[allow(clippy::too_many_arguments)]
    fn cluster_epoch(
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

    fn report_clusters(
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
    fn preview_maps(
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

    /// One pass of optimisation over the epoch's batches. Returns the mean loss terms and
    /// whether the epoch completed (false on a stop request).
    #[allow(clippy::too_many_arguments)]
    fn train_epoch(
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

            let features_first = model.network.forward(view_first);
            let features_second =
                views::geometric_on_features(model.network.forward(view_second), &geometric);
            let mut loss = None;
            for ((head, tensors), &weight) in std::iter::once(clusters)
                .chain(clusters.overclustering.as_deref())
                .zip(&heads)
                .zip(&head_weights)
            {
                let labels = |labels: &PixelLabels| -> Result<Tensor<3, Int>, TrainError> {
                    let slice: Vec<i64> = labels
                        .slice_usize(range.clone())
                        .map_err(cluster_error)?
                        .into_iter()
                        .map(|label| label as i64)
                        .collect();
                    Ok(Tensor::<3, Int>::from_data(
                        TensorData::new(slice, [batch.len(), grid, grid]),
                        device,
                    ))
                };
                let head_loss = picie_loss(
                    features_first.clone(),
                    features_second.clone(),
                    tensors.mu_first.clone(),
                    tensors.mu_second.clone(),
                    labels(&head.labels_first)?,
                    labels(&head.labels_second)?,
                    tensors.weights_first.clone(),
                    tensors.weights_second.clone(),
                )
                .scaled(weight);
                loss = Some(match loss {
                    None => head_loss,
                    Some(sum) => head_loss.combined(sum),
                });
            }
            let loss = loss.ok_or_else(|| TrainError::Cluster("no clustering head".into()))?;
            let terms = loss.terms();
            if !terms.total.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step: step + 1,
                    loss: terms.total,
                    learning_rate: self.config.learning_rate,
                });
            }
            let gradients = GradientsParams::from_grads(loss.total.backward(), &model.network);
            // From the epoch number, so a resumed run continues the same schedule.
            let progress = ((epoch - 1) as f64 + step as f64 / batches.len() as f64)
                / self.config.epochs as f64;
            let learning_rate = self
                .config
                .learning_rate_schedule
                .rate(self.config.learning_rate, progress);
            // Parameters are shared handles, so the clone is cheap; the step returns the update.
            model.network = model
                .optimizer
                .step(learning_rate, model.network.clone(), gradients);

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

    /// Adds to this epoch's [`PhaseTimes`].
    fn add_times(&self, more: PhaseTimes) {
        let times = self.phase_times.get();
        self.phase_times.set(PhaseTimes {
            views: times.views + more.views,
            kmeans: times.kmeans + more.kmeans,
        });
    }

    /// Scores the network on the un-augmented images (when they have labels) and, with
    /// `with_bank`, builds their feature bank from the same forward pass.
    fn evaluate(
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
    fn evaluate_held_out(
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

    /// Writes the final checkpoint (for epoch 0) and the centroids of the un-augmented images
    /// that segmenting and exporting use.
    fn finish_run(
        &self,
        model: &Model,
        epoch: usize,
        device: &Device,
        observer: &mut dyn TrainObserver,
    ) -> Result<(), TrainError> {
        let network = model.network.valid();
        let clusters = self.config.clusters_for(self.data.classes());
        if epoch == 0 {
            self.run.write_checkpoint(
                &CheckpointState {
                    epoch: 0,
                    seed: self.config.seed,
                    clusters,
                    dim: FEATURE_DIM,
                    centroids_first: Vec::new(),
                    centroids_second: Vec::new(),
                },
                &network,
                &model.optimizer,
                &self.run.metrics()?,
            )?;
            if self.config.feature_bank {
                write_bank(
                    &network,
                    &self.data,
                    self.config.bank_patch,
                    0,
                    device,
                    self.run.root(),
                    &mut |done, total| {
                        observer.on_event(&TrainEvent::Phase {
                            epoch: 0,
                            phase: TrainPhase::Evaluating,
                            done,
                            total,
                        });
                    },
                )?;
            }
        }
        let centroids = cluster_unaugmented(
            &network,
            &self.data,
            &self.config,
            clusters,
            device,
            epoch,
            Some(&self.eval_spill()),
            observer,
        )?;
        self.run.write_segmentation(&SegmentationCentroids {
            epoch,
            clusters,
            dim: FEATURE_DIM,
            centroids: centroids.values,
        })?;
        Ok(())
    }
}

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

fn view_thread_stopped() -> TrainError {
    TrainError::Data("the thread building the views stopped early".into())
}

/// Rows a feature store keeps in memory before it moves them to its spill file. Two stores
/// (the two views) live at once while an epoch is clustered: with the decoded images'
/// budget ([`crate::data::DEFAULT_DECODED_MEMORY_BUDGET`]) this bounds the data's memory at
/// about 3 GiB whatever the number of images.
pub const FEATURE_MEMORY_BUDGET_BYTES: usize = 1 << 30;

/// A feature store that spills to `folder` past [`FEATURE_MEMORY_BUDGET_BYTES`] (in memory
/// only without one).
fn spilling_store(folder: Option<&Path>) -> Result<FeatureStore, TrainError> {
    FeatureStore::new(
        FEATURE_DIM,
        folder.map(|folder| SpillConfig::new(folder, FEATURE_MEMORY_BUDGET_BYTES)),
    )
    .map_err(cluster_error)
}

fn cluster_error(error: impl std::fmt::Display) -> TrainError {
    TrainError::Cluster(error.to_string())
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
