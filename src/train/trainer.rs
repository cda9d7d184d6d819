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

mod clustering;
mod epoch;
mod evaluation;

use clustering::{EpochClusters, preview_labels};
use evaluation::spilling_store;
pub use evaluation::{cluster_unaugmented, evaluate_network};

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
                let (network, _) = PicieNet::load(
                    &crate::run::paths::checkpoint_network(directory),
                    &compute.device,
                )?;
                let optimizer_path = crate::run::paths::checkpoint_optimizer(directory);
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

    /// Adds to this epoch's [`PhaseTimes`].
    fn add_times(&self, more: PhaseTimes) {
        let times = self.phase_times.get();
        self.phase_times.set(PhaseTimes {
            views: times.views + more.views,
            kmeans: times.kmeans + more.kmeans,
        });
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

fn view_thread_stopped() -> TrainError {
    TrainError::Data("the thread building the views stopped early".into())
}

fn cluster_error(error: impl std::fmt::Display) -> TrainError {
    TrainError::Cluster(error.to_string())
}
