//! Heavy host work runs on a thread of rayon's pool rather than beside it.
//!
//! The host kernels, burn's Flex backend and the GEMMs split their loops over rayon's global
//! pool. Called from a thread outside the pool (the trainer's thread, the CLI's main thread),
//! every parallel loop is handed to the pool while the caller sleeps until it ends: with as many
//! pool threads as cores, the serial work between loops (autodiff bookkeeping, small tensor
//! operations) then competes for the cores with pool threads that spin while waiting for work,
//! and each hand-over costs a wake-up. Run on a pool thread, the serial work takes one of the
//! pool's threads and loops start in place.
//!
//! Always the same pool thread: burn keeps BatchNorm's running statistics per thread and
//! averages the threads' values when they meet, so training steps spread over several threads
//! would give other (and run-to-run different) running statistics than one thread does.

use std::sync::Mutex;

/// Runs `work` on the first thread of rayon's global pool and returns its result; on a pool
/// thread already, runs it in place.
///
/// `work` must not wait for another thread that may itself need the pool (a channel fed by a
/// thread using rayon, a lock held by one): with a single pool thread that would never end.
pub fn on_pool_thread<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return work();
    }
    let work = Mutex::new(Some(work));
    // Every pool thread runs this; only the first finds work to do, the others return at once.
    let mut results = rayon::broadcast(|context| {
        if context.index() == 0 {
            let work = work
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            work.map(|work| work())
        } else {
            None
        }
    });
    results
        .swap_remove(0)
        .unwrap_or_else(|| unreachable!("the pool's first thread runs the work once"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_the_first_pool_thread_and_returns_its_result() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "tests run outside the pool"
        );
        for _ in 0..4 {
            let (index, thread, sum) = on_pool_thread(|| {
                use rayon::prelude::*;
                let sum: u64 = (0..1000u64).into_par_iter().sum();
                (
                    rayon::current_thread_index(),
                    std::thread::current().id(),
                    sum,
                )
            });
            assert_eq!(index, Some(0), "the work ran elsewhere");
            assert_eq!(sum, 499_500);
            let again = on_pool_thread(|| std::thread::current().id());
            assert_eq!(thread, again, "two calls ran on different threads");
        }
        // Nested calls run in place rather than queueing behind themselves.
        assert_eq!(
            on_pool_thread(|| on_pool_thread(rayon::current_thread_index)),
            Some(0)
        );
    }
}
