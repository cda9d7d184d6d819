//! The views of an epoch's batches, built one batch ahead on a background thread, so the
//! network never waits for the photometric changes and resizing of the next batch (on a GPU
//! that wait idles the device; on the CPU it fills cores the network leaves idle).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam::channel::{Receiver, bounded};

use crate::data::views::{self, GeometricParams, ViewBatch, ViewParams};
use crate::data::{StackReadError, TrainingData};

/// One batch's views and the geometric change G of each image.
pub(super) struct PreparedViews {
    /// Both views on the host.
    pub views: ViewBatch,
    /// G of each image of the batch, in batch order.
    pub geometric: Vec<GeometricParams>,
}

/// Views of a sequence of batches, produced in order by a thread named `picie-views`.
pub(super) struct ViewStream {
    receiver: Option<Receiver<Result<PreparedViews, StackReadError>>>,
    worker: Option<JoinHandle<f64>>,
}

impl ViewStream {
    /// Starts building the views of `batches` (indices into `data`) with the epoch's
    /// per-image `params`.
    // The engine's own producer thread (the CLI has no window and no job module).
    #[allow(clippy::disallowed_methods)]
    pub fn start(
        data: Arc<TrainingData>,
        input_size: usize,
        batches: Vec<Vec<usize>>,
        params: Arc<Vec<ViewParams>>,
    ) -> std::io::Result<Self> {
        // One batch in the channel and one being built: memory for three batches of views.
        let (sender, receiver) = bounded(1);
        let worker = std::thread::Builder::new()
            .name("picie-views".into())
            .spawn(move || {
                let mut seconds = 0.0;
                for batch in batches {
                    let started = Instant::now();
                    let bases = match data.bases.gather(&batch) {
                        Ok(bases) => bases,
                        Err(error) => {
                            let _ = sender.send(Err(error));
                            break;
                        }
                    };
                    let bases: Vec<&[u8]> = bases.iter().map(AsRef::as_ref).collect();
                    let batch_params: Vec<ViewParams> =
                        batch.iter().map(|&index| params[index]).collect();
                    let views = views::build_view_batch(
                        &bases,
                        data.base_size as usize,
                        input_size,
                        &batch_params,
                    );
                    let geometric = batch_params.iter().map(|p| p.geometric).collect();
                    seconds += started.elapsed().as_secs_f64();
                    // The consumer hung up (a stop, or an error): nothing more to build.
                    if sender.send(Ok(PreparedViews { views, geometric })).is_err() {
                        break;
                    }
                }
                seconds
            })?;
        Ok(Self {
            receiver: Some(receiver),
            worker: Some(worker),
        })
    }

    /// The next batch's views, `None` after the last batch (or if the thread died); an
    /// error when a base image could not be read back from its cache file.
    pub fn next(&mut self) -> Option<Result<PreparedViews, StackReadError>> {
        self.receiver.as_ref()?.recv().ok()
    }

    /// Stops building and returns the seconds the thread spent building views.
    pub fn finish(mut self) -> f64 {
        self.stop()
    }

    fn stop(&mut self) -> f64 {
        // Dropping the receiver ends the thread at its next send.
        self.receiver = None;
        self.worker
            .take()
            .and_then(|worker| worker.join().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for ViewStream {
    fn drop(&mut self) {
        self.stop();
    }
}
