//! Pause, resume and stop, checked by the trainer at batch boundaries.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::ClusterEdit;

/// What the trainer should be doing (kept in an atomic as its `u8` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ControlState {
    /// Keep going.
    Running = 0,
    /// Wait at the next batch boundary until resumed or stopped.
    Paused = 1,
    /// Finish the current batch, write a checkpoint and return.
    Stopping = 2,
}

impl ControlState {
    /// The state stored as `code` (anything unknown reads as running).
    fn from_code(code: u8) -> Self {
        match code {
            code if code == Self::Paused as u8 => Self::Paused,
            code if code == Self::Stopping as u8 => Self::Stopping,
            _ => Self::Running,
        }
    }
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
        ControlState::from_code(self.state.load(Ordering::SeqCst))
    }

    /// Asks the trainer to pause at the next batch boundary.
    pub fn pause(&self) {
        // A stop request wins over a pause.
        let _ = self.state.compare_exchange(
            ControlState::Running as u8,
            ControlState::Paused as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Lets a paused trainer continue.
    pub fn resume(&self) {
        let _ = self.state.compare_exchange(
            ControlState::Paused as u8,
            ControlState::Running as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Asks the trainer to stop after the current batch.
    pub fn stop(&self) {
        self.state
            .store(ControlState::Stopping as u8, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_resume_and_a_stop_that_wins() {
        let control = TrainControl::new();
        assert_eq!(control.state(), ControlState::Running);
        control.pause();
        assert_eq!(control.state(), ControlState::Paused);
        control.resume();
        assert_eq!(control.state(), ControlState::Running);
        control.pause();
        control.stop();
        assert!(control.is_stopping());
        // Neither a pause nor a resume undoes a stop.
        control.pause();
        control.resume();
        assert_eq!(control.state(), ControlState::Stopping);
    }
}
