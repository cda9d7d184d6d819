//! Background jobs of the window: a job is one named thread with a bounded progress channel,
//! a typed result, a cancel flag and a wake callback, joined when it is dropped. The window
//! starts jobs, reads their latest progress and result while it draws, and never blocks on
//! them; nothing here knows about egui (the wake callback is how a job asks for a redraw).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};

/// Called from a job's thread when it has news for the window (progress or its result).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Progress messages waiting for the window at most. Progress messages are snapshots (how far
/// a job has got), so when the window falls this far behind the oldest waiting one is dropped
/// rather than stalling the job; the result is never dropped.
const PROGRESS_CAPACITY: usize = 64;

/// Why a job gave no result.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The operating system refused to start the thread.
    #[error("could not start the {name} job: {source}; close other programs and try again")]
    Spawn {
        /// The job's name.
        name: &'static str,
        /// The error of the thread builder.
        source: std::io::Error,
    },
    /// The job's thread panicked.
    #[error(
        "the {name} job stopped unexpectedly (a bug: please report it with the terminal's \
         output); the rest of the app goes on"
    )]
    Panicked {
        /// The job's name.
        name: &'static str,
    },
}

/// What a job's work sees: where to report progress and whether it was asked to stop.
pub struct JobContext<P> {
    progress: Sender<P>,
    /// The channel's other end, to drop the oldest message when it is full.
    oldest: Receiver<P>,
    cancel: Arc<AtomicBool>,
    wake: Wake,
}

impl<P> JobContext<P> {
    /// Reports progress to the window and wakes it. When the window is far behind, the oldest
    /// waiting report makes room, so the newest is always there to read.
    pub fn report(&self, progress: P) {
        if let Err(TrySendError::Full(progress)) = self.progress.try_send(progress) {
            let _ = self.oldest.try_recv();
            let _ = self.progress.try_send(progress);
        }
        (self.wake)();
    }

    /// Whether the window asked the job to stop; long work checks this between steps.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The cancel flag itself, for engine functions that take one.
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }
}

/// Wakes the window when the job's thread ends, also when it ends by panicking.
struct WakeOnExit(Wake);

impl Drop for WakeOnExit {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// A running (or finished) background job with progress `P` and result `R`.
pub struct Job<P, R> {
    name: &'static str,
    progress: Receiver<P>,
    latest: Option<P>,
    result: Receiver<R>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<P: Send + 'static, R: Send + 'static> Job<P, R> {
    /// Starts `work` on a thread named `picie-<name>`. `wake` is called after each progress
    /// report and when the job ends.
    pub fn spawn<F>(name: &'static str, wake: Wake, work: F) -> Result<Self, JobError>
    where
        F: FnOnce(&JobContext<P>) -> R + Send + 'static,
    {
        let (progress_sender, progress) = bounded(PROGRESS_CAPACITY);
        let (result_sender, result) = bounded(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let context = JobContext {
            progress: progress_sender,
            oldest: progress.clone(),
            cancel: cancel.clone(),
            wake: wake.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("picie-{name}"))
            .spawn(move || {
                let _wake_on_exit = WakeOnExit(wake);
                let outcome = work(&context);
                // The window may have dropped the job already; then nobody wants the result.
                let _ = result_sender.send(outcome);
            })
            .map_err(|source| JobError::Spawn { name, source })?;
        Ok(Self {
            name,
            progress,
            latest: None,
            result,
            cancel,
            thread: Some(thread),
        })
    }
}

impl<P, R> Job<P, R> {
    /// The job's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The newest progress the job reported (reading the channel empties it).
    pub fn progress(&mut self) -> Option<&P> {
        while let Ok(progress) = self.progress.try_recv() {
            self.latest = Some(progress);
        }
        self.latest.as_ref()
    }

    /// Asks the job to stop; it ends at its next check of [`JobContext::is_cancelled`].
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Whether [`Self::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The job's result once it has ended (`None` while it runs). Returns `Some` once; the
    /// thread is joined then.
    pub fn try_result(&mut self) -> Option<Result<R, JobError>> {
        let outcome = match self.result.try_recv() {
            Ok(result) => Ok(result),
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) if self.thread.is_none() => return None,
            Err(TryRecvError::Disconnected) => Err(JobError::Panicked { name: self.name }),
        };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        Some(outcome)
    }
}

impl<P, R> Drop for Job<P, R> {
    /// Cancels the job and waits for its thread, so no job outlives the window.
    fn drop(&mut self) {
        self.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    fn counting_wake() -> (Wake, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        (
            Arc::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            }),
            count,
        )
    }

    fn wait_for<P, R>(job: &mut Job<P, R>) -> Result<R, JobError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(result) = job.try_result() {
                return result;
            }
            assert!(Instant::now() < deadline, "the job did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_job_reports_progress_then_its_result_and_wakes_the_window_for_each() {
        let (wake, wakes) = counting_wake();
        let mut job = Job::spawn("count", wake, |context: &JobContext<usize>| {
            for step in 1..=3 {
                context.report(step);
            }
            "done"
        })
        .unwrap();
        assert_eq!(wait_for(&mut job).unwrap(), "done");
        assert_eq!(job.progress(), Some(&3));
        // Three reports and the end.
        assert_eq!(wakes.load(Ordering::Relaxed), 4);
        assert!(job.try_result().is_none(), "a result is handed out once");
    }

    #[test]
    fn cancel_stops_a_job_at_its_next_check_and_drop_joins_it() {
        let (wake, _) = counting_wake();
        let mut job = Job::spawn("loop", wake, |context: &JobContext<()>| {
            let mut rounds = 0_u64;
            while !context.is_cancelled() {
                rounds += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            rounds
        })
        .unwrap();
        job.cancel();
        assert!(job.is_cancelled());
        assert!(wait_for(&mut job).is_ok());

        // Dropping a running job cancels and joins it: the flag is seen set afterwards.
        let seen = Arc::new(AtomicBool::new(false));
        let seen_in_job = seen.clone();
        let (wake, _) = counting_wake();
        let job = Job::spawn("drop", wake, move |context: &JobContext<()>| {
            while !context.is_cancelled() {
                std::thread::sleep(Duration::from_millis(1));
            }
            seen_in_job.store(true, Ordering::Relaxed);
        })
        .unwrap();
        drop(job);
        assert!(seen.load(Ordering::Relaxed));
    }

    #[test]
    fn a_panicking_job_is_an_error_that_names_it_and_still_wakes_the_window() {
        let (wake, wakes) = counting_wake();
        let mut job = Job::spawn("broken", wake, |_: &JobContext<()>| -> u8 {
            panic!("deliberate panic in a test job")
        })
        .unwrap();
        let error = wait_for(&mut job).unwrap_err();
        assert!(error.to_string().contains("broken job"), "{error}");
        assert_eq!(wakes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_flood_of_progress_neither_blocks_the_job_nor_loses_the_newest_report() {
        let (wake, _) = counting_wake();
        let mut job = Job::spawn("flood", wake, |context: &JobContext<usize>| {
            for step in 0..10 * PROGRESS_CAPACITY {
                context.report(step);
            }
        })
        .unwrap();
        wait_for(&mut job).unwrap();
        assert_eq!(job.progress(), Some(&(10 * PROGRESS_CAPACITY - 1)));
    }
}
