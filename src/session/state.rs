//! Everything the explorer shows about a session, built from the trainer's events, and saved
//! in the run folder so a reopened run shows its maps, statistics and timeline without
//! retraining: `RUN_DIR/explorer/session.json` (status, curves, statistics, scores; rewritten
//! atomically at each epoch end) and `RUN_DIR/explorer/snapshots.jsonl` (one cluster-map
//! snapshot per line, appended as they arrive, so a crash loses at most the line being
//! written). The trainer thread writes both; the window only reads.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::timeline::{Snapshot, Timeline};
use super::worker::WorkerEvent;
use crate::train::{ClusterStatistics, LossTerms, TrainEvent, TrainPhase};

/// What the trainer is doing, as the status bar shows it. Stored in `session.json` as its
/// words ([`Activity::to_string`]), so records written when it was a plain string still
/// read.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Activity {
    /// Nothing has happened yet.
    #[default]
    Idle,
    /// The trainer thread was started.
    Starting,
    /// Opening a session on a remote server (its address).
    Connecting(String),
    /// Decoding the dataset.
    LoadingImages {
        /// Images decoded.
        done: usize,
        /// Images in all.
        total: usize,
    },
    /// A phase of an epoch (training steps included).
    Phase(TrainPhase),
    /// A pause was asked for; it takes effect after this batch.
    Pausing,
    /// A stop was asked for; it takes effect after this batch.
    Stopping,
    /// Paused at a batch boundary.
    Paused,
    /// Stopped before the last epoch.
    Stopped,
    /// Every epoch done.
    Finished,
    /// Training could not start or failed ([`SessionStatus::error`] says why).
    Failed,
    /// Words this version does not know (from another version's record).
    Other(String),
}

impl std::fmt::Display for Activity {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idle => Ok(()),
            Self::Starting => out.write_str("Starting"),
            Self::Connecting(address) => write!(out, "Connecting to {address}"),
            Self::LoadingImages { done, total } => write!(out, "Loading images {done}/{total}"),
            Self::Phase(phase) => out.write_str(phase.describe()),
            Self::Pausing => out.write_str("Pausing after this batch"),
            Self::Stopping => out.write_str("Stopping after this batch"),
            Self::Paused => out.write_str("Paused"),
            Self::Stopped => out.write_str("Stopped"),
            Self::Finished => out.write_str("Finished"),
            Self::Failed => out.write_str("Failed"),
            Self::Other(words) => out.write_str(words),
        }
    }
}

impl From<Activity> for String {
    fn from(activity: Activity) -> Self {
        activity.to_string()
    }
}

impl From<String> for Activity {
    /// Reads the words back; progress counts are not kept (only the last status of a closed
    /// session is ever read).
    fn from(words: String) -> Self {
        const PHASES: [TrainPhase; 6] = [
            TrainPhase::Loading,
            TrainPhase::Features,
            TrainPhase::Clustering,
            TrainPhase::Training,
            TrainPhase::Evaluating,
            TrainPhase::Checkpointing,
        ];
        let fixed = [
            Activity::Idle,
            Activity::Starting,
            Activity::Pausing,
            Activity::Stopping,
            Activity::Paused,
            Activity::Stopped,
            Activity::Finished,
            Activity::Failed,
        ];
        if let Some(activity) = fixed
            .into_iter()
            .chain(PHASES.map(Activity::Phase))
            .find(|activity| activity.to_string() == words)
        {
            return activity;
        }
        if let Some(address) = words.strip_prefix("Connecting to ") {
            return Activity::Connecting(address.to_owned());
        }
        Activity::Other(words)
    }
}

pub use crate::run::paths::{SESSION_FILE, SNAPSHOTS_FILE};

/// A dataset the user opened: images and, when found, labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetPaths {
    /// The image folder.
    pub images: PathBuf,
    /// The label folder (evaluation format), if any.
    pub labels: Option<PathBuf>,
}

impl DatasetPaths {
    /// What a chosen folder means: `images/` (and `labels/`) inside it when it has them, as
    /// the demo dataset and CamVid are laid out, else the folder itself without labels.
    pub fn from_folder(folder: &Path) -> Self {
        let images = folder.join("images");
        if images.is_dir() {
            let labels = folder.join("labels");
            Self {
                images,
                labels: labels.is_dir().then_some(labels),
            }
        } else {
            Self {
                images: folder.to_owned(),
                labels: None,
            }
        }
    }

    /// A short name for lists and window titles.
    pub fn display_name(&self) -> String {
        let folder = if self.images.file_name().is_some_and(|name| name == "images") {
            self.images.parent().unwrap_or(&self.images)
        } else {
            &self.images
        };
        folder
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| folder.display().to_string())
    }
}

/// The live status line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionStatus {
    /// The device, in words.
    pub device: String,
    /// Where the starting weights came from.
    pub weights: String,
    /// Images in the dataset.
    pub images: usize,
    /// Clusters K.
    pub clusters: usize,
    /// Current epoch.
    pub epoch: usize,
    /// Last epoch.
    pub epochs: usize,
    /// Current step within the epoch.
    pub step: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Training throughput.
    pub images_per_second: f64,
    /// Estimated seconds left.
    pub eta_seconds: f64,
    /// What the trainer is doing.
    pub activity: Activity,
    /// Progress of that activity, 0..1, when known.
    pub activity_fraction: Option<f32>,
    /// Paused at a batch boundary.
    pub paused: bool,
    /// The trainer thread is running.
    pub running: bool,
    /// Training ended (completed or stopped).
    pub finished: bool,
    /// Why training failed, with what to do.
    pub error: Option<String>,
}

/// One training step's loss terms on a time axis in epochs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LossPoint {
    /// `epoch - 1 + step / steps_per_epoch`.
    pub time: f64,
    /// The four terms and their combination.
    pub loss: LossTerms,
}

/// Scores of one epoch against the labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochScore {
    /// Epoch (0: untrained).
    pub epoch: usize,
    /// Pixel accuracy in percent.
    pub accuracy: f64,
    /// Mean IoU in percent.
    pub mean_iou: f64,
    /// The class each cluster is matched to.
    pub cluster_class: Vec<Option<usize>>,
}

/// The explorer's model of a session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionState {
    /// The run folder.
    pub run_dir: PathBuf,
    /// The status line.
    pub status: SessionStatus,
    /// Every step's losses.
    pub losses: Vec<LossPoint>,
    /// View-1 cluster statistics of every epoch (ids stable across epochs).
    pub clusters: Vec<ClusterStatistics>,
    /// Scores per epoch, when the dataset has labels.
    pub scores: Vec<EpochScore>,
    /// Cluster-map snapshots (saved separately, in the snapshot log).
    #[serde(skip)]
    pub timeline: Timeline,
    /// Class names of the labels, when known.
    pub class_names: Option<Vec<String>>,
    /// Files the trainer skipped, with the reason.
    pub warnings: Vec<String>,
    /// The dataset trained on.
    pub dataset: Option<DatasetPaths>,
    /// Merges and splits the trainer applied and the app has not yet followed: `origin[new]`
    /// is the old id a new id continues.
    #[serde(skip)]
    pub cluster_edits: Vec<Vec<Option<usize>>>,
}

impl SessionState {
    /// A fresh session writing into `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        Self {
            run_dir: run_dir.to_owned(),
            ..Self::default()
        }
    }

    /// Applies one message of the trainer thread. Returns true when an epoch ended or
    /// training ended, the moments worth saving the session.
    pub fn apply(&mut self, event: &WorkerEvent) -> bool {
        match event {
            WorkerEvent::Connecting(address) => {
                self.status.running = true;
                self.status.activity = Activity::Connecting(address.clone());
                self.status.activity_fraction = None;
                false
            }
            WorkerEvent::Loading { done, total } => {
                self.status.running = true;
                self.status.activity = Activity::LoadingImages {
                    done: *done,
                    total: *total,
                };
                self.status.activity_fraction = Some(*done as f32 / (*total).max(1) as f32);
                false
            }
            WorkerEvent::Warning(warning) => {
                self.warnings.push(warning.to_string());
                false
            }
            WorkerEvent::Skipped(files) => {
                self.warnings.extend(files.iter().cloned());
                false
            }
            WorkerEvent::Train(event) => self.apply_train(event),
            WorkerEvent::Failed(failure) => {
                self.fail(failure.as_ref());
                true
            }
            WorkerEvent::Ended => {
                self.status.running = false;
                self.status.paused = false;
                true
            }
        }
    }

    /// Records that training stopped with `failure`: its text becomes the status's error,
    /// the form in which the window shows it and `session.json` keeps it.
    pub fn fail(&mut self, failure: &dyn std::fmt::Display) {
        self.status.error = Some(failure.to_string());
        self.status.activity = Activity::Failed;
        self.status.running = false;
    }

    fn apply_train(&mut self, event: &TrainEvent) -> bool {
        let status = &mut self.status;
        match event {
            TrainEvent::Started {
                device,
                weights,
                images,
                clusters,
                first_epoch,
                epochs,
                steps_per_epoch,
            } => {
                status.device = device.clone();
                status.weights = weights.clone();
                status.images = *images;
                status.clusters = *clusters;
                status.epoch = first_epoch.saturating_sub(1);
                status.epochs = *epochs;
                status.steps_per_epoch = *steps_per_epoch;
                status.running = true;
                status.finished = false;
                status.error = None;
                false
            }
            TrainEvent::Phase {
                epoch,
                phase,
                done,
                total,
            } => {
                status.epoch = *epoch;
                status.activity = Activity::Phase(*phase);
                status.activity_fraction = (*total > 0).then(|| *done as f32 / *total as f32);
                false
            }
            TrainEvent::Step(progress) => {
                status.epoch = progress.epoch;
                status.step = progress.step;
                status.steps_per_epoch = progress.steps;
                status.images_per_second = progress.images_per_second;
                status.eta_seconds = progress.eta_seconds;
                status.activity = Activity::Phase(TrainPhase::Training);
                status.activity_fraction =
                    Some(progress.step as f32 / progress.steps.max(1) as f32);
                self.losses.push(LossPoint {
                    time: progress.epoch.saturating_sub(1) as f64
                        + progress.step as f64 / progress.steps.max(1) as f64,
                    loss: progress.loss,
                });
                false
            }
            TrainEvent::Clustered(statistics) => {
                self.clusters
                    .retain(|existing| existing.epoch != statistics.epoch);
                self.clusters.push(statistics.clone());
                false
            }
            TrainEvent::Preview { epoch, step, maps } => {
                self.timeline.push(Snapshot {
                    epoch: *epoch,
                    step: *step,
                    maps: maps.clone(),
                });
                false
            }
            TrainEvent::Evaluated { epoch, evaluation } => {
                self.scores.retain(|existing| existing.epoch != *epoch);
                self.scores.push(EpochScore {
                    epoch: *epoch,
                    accuracy: evaluation.accuracy,
                    mean_iou: evaluation.mean_iou,
                    cluster_class: evaluation.assignment.clone(),
                });
                false
            }
            // The app trains on every image; held-out scores come from the CLI's runs.
            TrainEvent::HeldOutEvaluated { .. } => false,
            TrainEvent::ClustersEdited { origin, .. } => {
                status.clusters = origin.len();
                self.cluster_edits.push(origin.clone());
                false
            }
            TrainEvent::Warning(message) => {
                self.warnings.push(message.clone());
                false
            }
            TrainEvent::EditRefused(reason) => {
                self.warnings
                    .push(format!("cluster edit not applied: {reason}"));
                false
            }
            TrainEvent::EpochFinished(_) => true,
            TrainEvent::Paused(paused) => {
                status.paused = *paused;
                status.activity = if *paused {
                    Activity::Paused
                } else {
                    Activity::Phase(TrainPhase::Training)
                };
                false
            }
            TrainEvent::Finished { stopped } => {
                status.finished = true;
                status.paused = false;
                status.activity = if *stopped {
                    Activity::Stopped
                } else {
                    Activity::Finished
                };
                status.activity_fraction = None;
                true
            }
        }
    }

    /// Where the session of a run folder is saved.
    pub fn path_in(run_dir: &Path) -> PathBuf {
        crate::run::paths::session(run_dir)
    }

    /// Saves the session (without the timeline) atomically into its run folder.
    pub fn save(&self) -> std::io::Result<()> {
        let path = Self::path_in(&self.run_dir);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut saved = self.clone();
        // A saved session is never running: reopening shows what was kept.
        saved.status.running = false;
        saved.status.paused = false;
        crate::fsutil::write_atomic(&path, |writer| {
            serde_json::to_writer(writer, &saved).map_err(std::io::Error::other)
        })
    }

    /// Appends one snapshot to the run's snapshot log.
    pub fn append_snapshot(run_dir: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
        use std::io::Write;
        let path = crate::run::paths::snapshots(run_dir);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        // A crash mid-write leaves a partial last line (skipped on load); start a new line
        // after it, or this snapshot would be glued to the fragment and lost with it.
        let mut line = Vec::new();
        if file.metadata()?.len() > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                line.push(b'\n');
            }
        }
        line.extend(serde_json::to_vec(snapshot).map_err(std::io::Error::other)?);
        line.push(b'\n');
        // One write per line: a crash leaves at most a partial last line.
        file.write_all(&line)?;
        file.flush()
    }

    /// Reopens the session saved in `run_dir`, with its snapshots.
    pub fn load(run_dir: &Path) -> Result<Self, String> {
        let mut state = Self::load_without_snapshots(run_dir)?;
        let log = crate::run::paths::snapshots(run_dir);
        if let Ok(text) = std::fs::read_to_string(&log) {
            // Lines that do not parse are the tail of an interrupted write.
            for snapshot in text
                .lines()
                .filter_map(|line| serde_json::from_str::<Snapshot>(line).ok())
            {
                state.timeline.push(snapshot);
            }
        }
        Ok(state)
    }

    /// Reopens the session saved in `run_dir` without reading its snapshot log (what the
    /// trainer continues when it resumes a run: it only appends to the log).
    pub fn load_without_snapshots(run_dir: &Path) -> Result<Self, String> {
        let path = Self::path_in(run_dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(if crate::run::paths::config(run_dir).is_file() {
                    format!(
                        "{} is a run made with the picie CLI, which keeps no explorer session: \
                         the app reopens runs it trained itself. Its masks: `picie export --run \
                         {}`; to explore it here, open its image folder and train in the app",
                        run_dir.display(),
                        run_dir.display()
                    )
                } else {
                    format!(
                        "{} has no saved explorer session: open a run folder the app trained",
                        run_dir.display()
                    )
                });
            }
            Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
        };
        let mut state: Self = serde_json::from_slice(&bytes).map_err(|error| {
            format!(
                "{} is damaged ({error}); the run's checkpoints do not depend on it: \
                 `picie export --run {}` still works",
                path.display(),
                run_dir.display()
            )
        })?;
        state.run_dir = run_dir.to_owned();
        Ok(state)
    }

    /// The cluster statistics of the newest epoch.
    pub fn latest_clusters(&self) -> Option<&ClusterStatistics> {
        self.clusters
            .iter()
            .max_by_key(|statistics| statistics.epoch)
    }

    /// The newest scores.
    pub fn latest_score(&self) -> Option<&EpochScore> {
        self.scores.iter().max_by_key(|score| score.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::timeline::tests::snapshot;

    #[test]
    fn activities_are_stored_as_words_and_old_records_still_read() {
        for activity in [
            Activity::Paused,
            Activity::Phase(TrainPhase::Clustering),
            Activity::Connecting("ws://gpu-box:3000".into()),
            Activity::Failed,
        ] {
            let text = serde_json::to_string(&activity).unwrap();
            assert_eq!(text, format!("\"{activity}\""));
            assert_eq!(serde_json::from_str::<Activity>(&text).unwrap(), activity);
        }
        // As session.json held it when the activity was a string.
        let old: SessionStatus =
            serde_json::from_str(r#"{"device":"CPU","weights":"","images":3,"clusters":2,"epoch":1,"epochs":2,"step":0,"steps_per_epoch":1,"images_per_second":0.0,"eta_seconds":0.0,"activity":"Writing checkpoint","activity_fraction":null,"paused":false,"running":false,"finished":false,"error":null}"#)
                .unwrap();
        assert_eq!(old.activity, Activity::Phase(TrainPhase::Checkpointing));
        let progress = Activity::from("Loading images 3/10".to_owned());
        assert_eq!(progress, Activity::Other("Loading images 3/10".into()));
        assert_eq!(progress.to_string(), "Loading images 3/10");
    }

    #[test]
    fn a_saved_session_reopens_with_its_snapshots_even_after_a_torn_write() {
        let folder = tempfile::tempdir().unwrap();
        let mut session = SessionState::new(folder.path());
        session.apply(&WorkerEvent::Train(TrainEvent::Paused(true)));
        for (epoch, step) in [(1, 0), (1, 2), (2, 0)] {
            SessionState::append_snapshot(folder.path(), &snapshot(epoch, step)).unwrap();
        }
        session.save().unwrap();
        // A crash in the middle of the next line.
        let log = crate::run::paths::snapshots(folder.path());
        let mut text = std::fs::read_to_string(&log).unwrap();
        text.push_str("{\"epoch\":2,\"step\":2,\"ma");
        std::fs::write(&log, text).unwrap();

        let reopened = SessionState::load(folder.path()).unwrap();
        let kept: Vec<(usize, usize)> = reopened
            .timeline
            .snapshots()
            .iter()
            .map(|s| (s.epoch, s.step))
            .collect();
        assert_eq!(kept, vec![(1, 0), (1, 2), (2, 0)]);
        assert_eq!(reopened.timeline.snapshots()[1], snapshot(1, 2));
        assert!(!reopened.status.running && !reopened.status.paused);

        let missing = SessionState::load(&folder.path().join("nothing")).unwrap_err();
        assert!(missing.contains("no saved explorer session"), "{missing}");

        // Training continues after the torn line: the next snapshot is kept.
        SessionState::append_snapshot(folder.path(), &snapshot(3, 0)).unwrap();
        let continued = SessionState::load(folder.path()).unwrap();
        let epochs: Vec<usize> = continued
            .timeline
            .snapshots()
            .iter()
            .map(|s| s.epoch)
            .collect();
        assert_eq!(epochs, vec![1, 1, 2, 3]);
    }
}
