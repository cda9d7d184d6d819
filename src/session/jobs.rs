//! Background work of the window. A [`Job`] is one named thread with a bounded progress
//! channel, a typed result, a cancel flag and a wake callback, joined when it is dropped
//! (downloads, exports, bank builds). A [`Service`] is a long-lived thread answering requests
//! one at a time over bounded channels (image decoding, gallery search). The window starts
//! them, reads progress, results and replies while it draws, and never blocks on them; nothing
//! here knows the UI toolkit (the wake callback is how they ask for a redraw). Threads and
//! channels are made here, in the trainer's worker and in its view prefetcher only
//! (`clippy.toml`).

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
    // This module is where the window's threads are made.
    #[allow(clippy::disallowed_methods)]
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

/// What a service's thread sees: the requests, one at a time, and where replies go.
pub struct ServiceContext<Q, A> {
    requests: Receiver<Q>,
    replies: Sender<A>,
    wake: Wake,
}

impl<Q, A> ServiceContext<Q, A> {
    /// The next request; `None` once the window has dropped the service.
    pub fn next_request(&self) -> Option<Q> {
        self.requests.recv().ok()
    }

    /// Sends a reply and wakes the window; `false` once the window has dropped the service
    /// (the service should return then).
    pub fn reply(&self, reply: A) -> bool {
        let sent = self.replies.send(reply).is_ok();
        (self.wake)();
        sent
    }
}

/// A long-lived job that answers the window's requests one at a time (decoding images,
/// searching the feature bank): a named thread with bounded channels both ways, the wake
/// callback after every reply, stopped and joined on drop.
pub struct Service<Q, A> {
    name: &'static str,
    requests: Option<Sender<Q>>,
    replies: Option<Receiver<A>>,
    thread: Option<JoinHandle<()>>,
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ServiceBusy {
    /// The service has `capacity` requests waiting already; ask again later.
    #[error("the {name} service is busy; try again in a moment")]
    Full {
        /// The service's name.
        name: &'static str,
    },
    /// The service's thread has ended (it panicked or could not start).
    #[error("the {name} service has stopped; reopen the run to start it again")]
    Stopped {
        /// The service's name.
        name: &'static str,
    },
}

impl<Q: Send + 'static, A: Send + 'static> Service<Q, A> {
    /// Starts `serve` on a thread named `picie-<name>`, with at most `capacity` requests and
    /// `capacity` replies waiting. `serve` reads requests with
    /// [`ServiceContext::next_request`] until it returns `None`.
    #[allow(clippy::disallowed_methods)]
    pub fn spawn<F>(
        name: &'static str,
        capacity: usize,
        wake: Wake,
        serve: F,
    ) -> Result<Self, JobError>
    where
        F: FnOnce(&ServiceContext<Q, A>) + Send + 'static,
    {
        let (request_sender, requests) = bounded(capacity);
        let (reply_sender, replies) = bounded(capacity);
        let context = ServiceContext {
            requests,
            replies: reply_sender,
            wake: wake.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("picie-{name}"))
            .spawn(move || {
                let _wake_on_exit = WakeOnExit(wake);
                serve(&context);
            })
            .map_err(|source| JobError::Spawn { name, source })?;
        Ok(Self {
            name,
            requests: Some(request_sender),
            replies: Some(replies),
            thread: Some(thread),
        })
    }
}

impl<Q, A> Service<Q, A> {
    /// Queues a request without waiting.
    pub fn ask(&self, request: Q) -> Result<(), ServiceBusy> {
        let name = self.name;
        match self
            .requests
            .as_ref()
            .map(|sender| sender.try_send(request))
        {
            Some(Ok(())) => Ok(()),
            Some(Err(TrySendError::Full(_))) => Err(ServiceBusy::Full { name }),
            Some(Err(TrySendError::Disconnected(_))) | None => Err(ServiceBusy::Stopped { name }),
        }
    }

    /// Replies waiting, at most `limit` of them.
    pub fn replies(&self, limit: usize) -> Vec<A> {
        self.replies
            .as_ref()
            .map(|replies| replies.try_iter().take(limit).collect())
            .unwrap_or_default()
    }

    /// Whether replies are still waiting.
    pub fn has_replies(&self) -> bool {
        self.replies
            .as_ref()
            .is_some_and(|replies| !replies.is_empty())
    }
}

impl<Q, A> Drop for Service<Q, A> {
    /// Ends the request stream, lets a service blocked on a full reply channel go, and waits
    /// for the thread.
    fn drop(&mut self) {
        self.requests = None;
        self.replies = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
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

    #[test]
    fn a_service_answers_requests_in_order_and_stops_when_dropped() {
        let (wake, wakes) = counting_wake();
        let stopped = Arc::new(AtomicBool::new(false));
        let stopped_in_service = stopped.clone();
        let service = Service::spawn("double", 4, wake, move |context| {
            while let Some(number) = context.next_request() {
                if !context.reply(2 * number) {
                    break;
                }
            }
            stopped_in_service.store(true, Ordering::Relaxed);
        })
        .unwrap();
        for number in 1..=3 {
            service.ask(number).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut answers = Vec::new();
        while answers.len() < 3 {
            assert!(Instant::now() < deadline, "no answers");
            answers.extend(service.replies(10));
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(answers, vec![2, 4, 6]);
        assert!(wakes.load(Ordering::Relaxed) >= 3);
        drop(service);
        assert!(
            stopped.load(Ordering::Relaxed),
            "drop ends and joins the thread"
        );
    }

    #[test]
    fn a_full_service_refuses_instead_of_blocking_the_window_and_drop_never_deadlocks() {
        let (wake, _) = counting_wake();
        let release = Arc::new(AtomicBool::new(false));
        let release_in_service = release.clone();
        let service = Service::spawn("slow", 1, wake, move |context| {
            while let Some(()) = context.next_request() {
                while !release_in_service.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Nobody reads the replies: the second blocks until the window drops them.
                if !context.reply(()) {
                    break;
                }
            }
        })
        .unwrap();
        let mut refused = false;
        for _ in 0..10 {
            if let Err(error) = service.ask(()) {
                assert!(
                    error.to_string().contains("slow service is busy"),
                    "{error}"
                );
                refused = true;
            }
        }
        assert!(refused, "a bounded queue refuses when full");
        release.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        drop(service);
    }
}
