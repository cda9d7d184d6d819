//! A training session as the desktop app sees it, without any GUI code: the background
//! trainer thread ([`worker`]), the kept cluster-map snapshots ([`timeline`]) and everything
//! the explorer displays, built from the trainer's events and saved in the run folder
//! ([`state`]).

pub mod jobs;
pub mod state;
pub mod timeline;
pub mod worker;

pub use jobs::{Job, JobContext, JobError, Service, ServiceBusy, ServiceContext, Wake};
pub use state::{Activity, DatasetPaths, EpochScore, LossPoint, SessionState, SessionStatus};
pub use timeline::{Snapshot, Timeline};
pub use worker::{
    Command, TrainRequest, TrainerHandle, TrainingFailure, WorkerEvent, WorkerWarning,
};
