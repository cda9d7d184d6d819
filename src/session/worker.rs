//! The background trainer: a named thread that loads the dataset and runs [`Trainer`], talking
//! to the app only through typed messages on bounded crossbeam channels. The engine wakes the
//! UI through a plain callback, so it never depends on the UI toolkit.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender, TrySendError, bounded};

use super::state::{DatasetPaths, SessionState};
use super::timeline::Snapshot;
use crate::config::TrainConfig;
use crate::data::{DatasetError, DecodedStorage};
use crate::device::{DeviceError, select_device};
use crate::run::paths as run_paths;
use crate::train::{
    ExistingRun, RunError, RunFolder, TrainControl, TrainError, TrainEvent, Trainer, TrainingData,
};

/// Commands from the app to the trainer; they take effect at the next batch boundary (edits:
/// at the next epoch's clustering).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Pause after the current batch.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Finish the current batch, keep the last completed epoch's checkpoint and end.
    Stop,
    /// Merge or split clusters: the next epoch clusters from the edited centroids.
    Edit(crate::cluster::ClusterEdit),
}

/// Messages from the trainer thread to the app.
#[derive(Debug, Clone)]
pub enum WorkerEvent {
    /// Opening a session on a remote server (its address); may take up to 15 s when it does
    /// not answer.
    Connecting(String),
    /// Decoding the dataset: `done` of `total` images.
    Loading {
        /// Images decoded.
        done: usize,
        /// Images in all.
        total: usize,
    },
    /// Files of the dataset that could not be read (each with the reason); training goes on
    /// without them.
    Skipped(Vec<String>),
    /// Something went wrong that does not stop training.
    Warning(WorkerWarning),
    /// An event of the trainer itself.
    Train(TrainEvent),
    /// Training could not start or failed; its text says why and what to do. Shared, so the
    /// event stays `Clone` while the error keeps its type and source chain.
    Failed(Arc<TrainingFailure>),
    /// The thread is about to end (after `Finished` or `Failed`).
    Ended,
}

/// Why the trainer thread could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TrainingFailure {
    /// The device could not be opened (or the server reached).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The run folder could not be created or claimed.
    #[error(transparent)]
    RunFolder(#[from] RunError),
    /// The images could not be read.
    #[error("could not load the dataset: {0}")]
    Dataset(#[from] DatasetError),
    /// The trainer failed.
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// Problems of the trainer thread that do not stop training.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerWarning {
    /// The explorer's session record could not be written.
    #[error(
        "could not save the session in {run_dir}: {reason}; training goes on, but the maps \
         will not be there when the run is reopened"
    )]
    SessionNotSaved {
        /// The run folder.
        run_dir: PathBuf,
        /// The file system's error.
        reason: String,
    },
}

/// What to train.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// The image folder.
    pub images: PathBuf,
    /// Its label folder, when there is one (enables Acc / mIoU).
    pub labels: Option<PathBuf>,
    /// Where checkpoints, metrics and snapshots go.
    pub run_dir: PathBuf,
    /// The hyperparameters.
    pub config: TrainConfig,
    /// Continue the run's latest checkpoint instead of starting anew.
    pub resume: bool,
}

/// Messages waiting for the app at most; the trainer blocks (it never drops a message) when
/// the app falls this far behind, which only happens when the window is frozen.
const EVENT_CAPACITY: usize = 4096;
/// Commands are few and handled at once.
const COMMAND_CAPACITY: usize = 16;

/// The app's side of a running trainer thread.
pub struct TrainerHandle {
    commands: Sender<Command>,
    events: Receiver<WorkerEvent>,
    thread: Option<JoinHandle<()>>,
}

impl TrainerHandle {
    /// Starts the trainer thread (`picie-trainer`). `wake` is called after every message, from
    /// the trainer thread, so the app can repaint without polling.
    // The trainer's threads outlive a frame and pause inside the engine, so they are made
    // here rather than as a `Job`.
    #[allow(clippy::disallowed_methods)]
    pub fn spawn(
        request: TrainRequest,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let (command_sender, command_receiver) = bounded::<Command>(COMMAND_CAPACITY);
        let (event_sender, event_receiver) = bounded::<WorkerEvent>(EVENT_CAPACITY);
        let control = TrainControl::new();

        // Commands are applied by their own small thread: while the trainer is paused it
        // waits inside the engine and could not read them itself.
        let command_control = control.clone();
        std::thread::Builder::new()
            .name("picie-commands".into())
            .spawn(move || {
                for command in command_receiver {
                    match command {
                        Command::Pause => command_control.pause(),
                        Command::Resume => command_control.resume(),
                        Command::Stop => command_control.stop(),
                        Command::Edit(edit) => command_control.request_edit(edit),
                    }
                }
                // The app is gone: do not train for nobody.
                command_control.stop();
            })?;

        let thread = std::thread::Builder::new()
            .name("picie-trainer".into())
            .spawn(move || {
                let send = |event: WorkerEvent| {
                    let delivered = event_sender.send(event).is_ok();
                    wake();
                    delivered
                };
                if let Err(failure) = run_training(request, control.clone(), &send) {
                    send(WorkerEvent::Failed(Arc::new(failure)));
                }
                send(WorkerEvent::Ended);
            })?;
        Ok(Self {
            commands: command_sender,
            events: event_receiver,
            thread: Some(thread),
        })
    }

    /// Sends a command; false when the trainer has already ended.
    pub fn send(&self, command: Command) -> bool {
        match self.commands.try_send(command) {
            Ok(()) => true,
            // Full means a burst of clicks: the state they ask for is already on its way.
            Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// The messages that arrived since the last call, without waiting.
    pub fn drain(&self) -> Vec<WorkerEvent> {
        self.events.try_iter().collect()
    }

    /// Waits for the next message (for tests and the CLI; the app never blocks on this).
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<WorkerEvent> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Asks the trainer to stop and waits for it (it finishes its batch first).
    pub fn stop_and_join(mut self) {
        self.send(Command::Stop);
        // Keep draining so a trainer blocked on a full channel can reach its stop check.
        while let Some(thread) = self.thread.take() {
            while !thread.is_finished() {
                let _ = self
                    .events
                    .recv_timeout(std::time::Duration::from_millis(50));
            }
            let _ = thread.join();
        }
    }
}

// Returned once per training run, straight into an `Arc`: its size costs nothing.
#[allow(clippy::result_large_err)]
fn run_training(
    request: TrainRequest,
    control: TrainControl,
    send: &(dyn Fn(WorkerEvent) -> bool + Sync),
) -> Result<(), TrainingFailure> {
    let config = request.config;
    // The device first: a server that cannot be reached fails before minutes of decoding.
    if config.device.is_remote() {
        send(WorkerEvent::Connecting(config.device.to_string()));
    }
    let compute = select_device(&config.device)?;
    let run = if request.resume {
        RunFolder::open_for_writing(&request.run_dir)
    } else {
        RunFolder::create(&request.run_dir, &config, ExistingRun::Refuse).map(|(run, _)| run)
    }?;
    // Large datasets are decoded into the run folder, so the folder is claimed first.
    let data = TrainingData::load_into(
        &request.images,
        request.labels.as_deref(),
        config.base_size,
        config.input_size,
        &DecodedStorage::auto(run_paths::decoded(&request.run_dir)),
        &|done, total| {
            send(WorkerEvent::Loading { done, total });
        },
    )?;
    if !data.skipped.is_empty() {
        send(WorkerEvent::Skipped(
            data.skipped
                .iter()
                .map(|file| format!("{}: {}", file.name, file.reason))
                .collect(),
        ));
    }
    // The session record on disk is kept by this thread, so it survives the window: the
    // snapshot log grows as maps arrive, the rest is rewritten at each epoch end.
    let mut record = if request.resume {
        SessionState::load_without_snapshots(&request.run_dir)
            .unwrap_or_else(|_| SessionState::new(&request.run_dir))
    } else {
        SessionState::new(&request.run_dir)
    };
    record.class_names = data.class_names.clone();
    record.dataset = Some(DatasetPaths {
        images: request.images.clone(),
        labels: request.labels.clone(),
    });
    let mut record_error: Option<WorkerWarning> = None;
    let mut trainer = Trainer::new(config, run, Arc::new(data), control.clone(), request.resume)?;
    let mut observer = |event: &TrainEvent| {
        let forwarded = WorkerEvent::Train(event.clone());
        // Snapshots go to the log only; the record keeps what session.json holds.
        let written = match event {
            TrainEvent::Preview { epoch, step, maps } => SessionState::append_snapshot(
                &request.run_dir,
                &Snapshot {
                    epoch: *epoch,
                    step: *step,
                    maps: maps.clone(),
                },
            ),
            _ if record.apply(&forwarded) => record.save(),
            _ => Ok(()),
        };
        if let Err(error) = written
            && record_error.is_none()
        {
            let warning = WorkerWarning::SessionNotSaved {
                run_dir: request.run_dir.clone(),
                reason: error.to_string(),
            };
            send(WorkerEvent::Warning(warning.clone()));
            record_error = Some(warning);
        }
        if !send(forwarded) {
            // Nobody listens any more: stop at the next batch boundary.
            control.stop();
        }
    };
    if let Err(error) = trainer.run(&compute, &mut observer) {
        let failure = TrainingFailure::from(error);
        record.fail(&failure);
        let _ = record.save();
        return Err(failure);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::DeviceChoice;

    #[test]
    fn a_missing_image_folder_ends_the_thread_with_a_dataset_failure_naming_it() {
        let folder = tempfile::tempdir().unwrap();
        let images = folder.path().join("no-such-images");
        let config = TrainConfig {
            device: DeviceChoice::Cpu,
            ..TrainConfig::default()
        };
        let request = TrainRequest {
            images: images.clone(),
            labels: None,
            run_dir: folder.path().join("run"),
            config,
            resume: false,
        };
        let handle = TrainerHandle::spawn(request, Arc::new(|| {})).unwrap();
        let mut state = SessionState::new(&folder.path().join("run"));
        let failure = loop {
            match handle.recv_timeout(Duration::from_secs(60)) {
                Some(WorkerEvent::Failed(failure)) => {
                    state.apply(&WorkerEvent::Failed(Arc::clone(&failure)));
                    break failure;
                }
                Some(_) => {}
                None => panic!("the trainer neither failed nor ended"),
            }
        };
        assert!(
            matches!(*failure, TrainingFailure::Dataset(_)),
            "{failure:?}"
        );
        let shown = state.status.error.clone().unwrap();
        assert!(shown.starts_with("could not load the dataset"), "{shown}");
        assert!(shown.contains("no-such-images"), "{shown}");
        assert_eq!(state.status.activity, crate::session::Activity::Failed);
    }
}
