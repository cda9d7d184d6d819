//! Pause, resume and stop, checked by the trainer at batch boundaries.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::ClusterEdit;

/// What the trainer should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlState {
    /// Keep going.
    Running,
    /// Wait at the next batch boundary until resumed or stopped.
    Paused,
    /// Finish the current batch, write a checkpoint and return.
    Stopping,
}

/// A shared switch between the trainer and whoever drives it (UI, Ctrl-C handler).
#[derive(Debug, Clone, Default)]
pub struct TrainControl {
    state: Arc<AtomicU8>,
    edits: Arc<Mutex<Vec<ClusterEdit>>>,
}

impl TrainControl {
    /// A control in the running state.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current state.
    pub fn state(&self) -> ControlState {
        match self.state.load(Ordering::SeqCst) {
            1 => ControlState::Paused,
            2 => ControlState::Stopping,
            _ => ControlState::Running,
        }
    }

    /// Asks the trainer to pause at the next batch boundary.
    pub fn pause(&self) {
        // A stop request wins over a pause.
        let _ = self
            .state
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Lets a paused trainer continue.
    pub fn resume(&self) {
        let _ = self
            .state
            .compare_exchange(1, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Asks the trainer to stop after the current batch.
    pub fn stop(&self) {
        self.state.store(2, Ordering::SeqCst);
    }

    /// Queues a merge or split for the trainer: it is applied to the clustering of the next
    /// epoch, which starts from the edited centroids.
    pub fn request_edit(&self, edit: ClusterEdit) {
        if let Ok(mut edits) = self.edits.lock() {
            edits.push(edit);
        }
    }

    /// The edits queued since the last call.
    pub(crate) fn take_edits(&self) -> Vec<ClusterEdit> {
        self.edits
            .lock()
            .map(|mut edits| std::mem::take(&mut *edits))
            .unwrap_or_default()
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.state() == ControlState::Stopping
    }

    /// Blocks while paused; returns `true` if the trainer should stop. `on_pause` is called
    /// once when a pause begins and once when it ends (with `false`).
    pub(crate) fn wait_if_paused(&self, mut on_pause: impl FnMut(bool)) -> bool {
        if self.state() == ControlState::Paused {
            on_pause(true);
            while self.state() == ControlState::Paused {
                std::thread::sleep(Duration::from_millis(50));
            }
            on_pause(false);
        }
        self.is_stopping()
    }
}
