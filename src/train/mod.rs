//! The PiCIE training loop and the event interface the GUI and CLI consume (the run folder it
//! writes is [`crate::run`]).
//!
//! An epoch: build both views of every image (parameters seeded per image and epoch), compute
//! the pixel features of both views, cluster each view's features with k-means from scratch,
//! label every pixel with its nearest centroid, then optimise the network over the same views
//! with the PiCIE loss. Observers get progress, the four loss terms, centroid statistics and
//! preview cluster maps; a [`TrainControl`] pauses, resumes or stops at batch boundaries.

mod adam;
mod control;
mod events;
mod prefetch;
mod trainer;

pub use crate::data::TrainingData;
pub use crate::run;
pub use crate::run::{ExistingRun, RunError, RunFolder, RunLock};
pub use adam::{AdamCoefficients, AdamOps, FusedAdam};
pub use control::{ControlState, TrainControl};
pub use events::{
    ClusterMap, ClusterStatistics, EpochRecord, LossTerms, NullObserver, StepProgress, TrainEvent,
    TrainObserver, TrainPhase,
};
pub use trainer::{TrainError, TrainOutcome, Trainer, cluster_unaugmented, evaluate_network};
