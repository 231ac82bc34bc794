//! [`Pool`]: the worker threads of an image, started on first use and shared by its backing
//! chain, on which jobs that borrow the caller's data run (decompression, parallel reads).
//!
//! Scoped jobs (closures that borrow from the caller's stack) on long-lived threads need
//! lifetime erasure, which this crate does not do itself (`unsafe` is forbidden): with the
//! `parallel` cargo feature the threads are a [`rayon::ThreadPool`] and jobs run in its
//! [`in_place_scope`](rayon::ThreadPool::in_place_scope). Without the feature, or when the
//! system refuses to start the threads, every job runs on the calling thread.
//!
//! Jobs must never block waiting for other jobs or for the caller: a pool thread that waits
//! for a scope of its own runs other queued jobs meanwhile (rayon's work stealing), so a job
//! that blocked could hold up unrelated work. Jobs here do bounded work and return.

use std::sync::{Mutex, PoisonError};

/// The most threads a pool has, whatever the image's `threads` setting asks.
pub(crate) const MAX_THREADS: usize = 64;

/// Which pool thread this is (its index in its pool), or `usize::MAX` off the pool: for work
/// that is cheaper on the thread that did the last part of it.
/// A thread of a copy's own pool ([`Pool::for_copy`]) counts as off the pool.
pub(crate) fn current_worker() -> usize {
    #[cfg(feature = "parallel")]
    if !COPY_THREAD.with(std::cell::Cell::get) {
        return rayon::current_thread_index().unwrap_or(usize::MAX);
    }
    usize::MAX
}

#[cfg(feature = "parallel")]
thread_local! {
    /// Set on the threads of a copy's own pool.
    static COPY_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A bounded pool of worker threads, created lazily (opening an image starts no thread).
pub(crate) struct Pool {
    /// Threads this pool runs jobs on at once (at least 1).
    threads: usize,
    /// The threads, once started; `None` when the system would not start them.
    #[cfg(feature = "parallel")]
    workers: std::sync::OnceLock<Option<rayon::ThreadPool>>,
    /// A copy's own pool: its threads read as callers do ([`Pool::for_copy`]).
    #[cfg(feature = "parallel")]
    for_copy: bool,
}

/// Where a scope's jobs are started: [`Pool::scope`] hands one to its body.
pub(crate) struct Scope<'a, 'scope> {
    /// `None` when there are no worker threads.
    inner: Option<Workers<'a, 'scope>>,
}

#[cfg(feature = "parallel")]
type Workers<'a, 'scope> = &'a rayon::Scope<'scope>;

/// Without the `parallel` feature there are never workers to start jobs on.
#[cfg(not(feature = "parallel"))]
type Workers<'a, 'scope> = (
    std::convert::Infallible,
    std::marker::PhantomData<(&'a (), fn(&'scope ()) -> &'scope ())>,
);

impl<'scope> Scope<'_, 'scope> {
    /// Whether [`Scope::spawn`] starts jobs on other threads (otherwise the caller must do
    /// all the work itself).
    pub(crate) fn has_workers(&self) -> bool {
        self.inner.is_some()
    }

    /// Queue `job` on the pool, to run once a thread is free; `false` (and `job` dropped
    /// unrun) when there are no workers.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'scope) -> bool {
        match self.inner {
            Some(workers) => {
                start(workers, job);
                true
            }
            None => false,
        }
    }
}

#[cfg(feature = "parallel")]
fn start<'scope>(workers: Workers<'_, 'scope>, job: impl FnOnce() + Send + 'scope) {
    workers.spawn(move |_| job());
}

#[cfg(not(feature = "parallel"))]
fn start<'scope>(workers: Workers<'_, 'scope>, _job: impl FnOnce() + Send + 'scope) {
    match workers.0 {}
}

impl Pool {
    /// A pool of `threads` threads (1 to [`MAX_THREADS`]), none started yet.
    pub(crate) fn new(threads: usize) -> Self {
        Pool {
            threads: threads.clamp(1, MAX_THREADS),
            #[cfg(feature = "parallel")]
            workers: std::sync::OnceLock::new(),
            #[cfg(feature = "parallel")]
            for_copy: false,
        }
    }

    /// A pool a copy starts for itself (a conversion's threads). Reads on its threads are
    /// made as a caller's are, not as a share of an image pool's work: they read ahead and
    /// spread their clusters over the image's pool ([`current_worker`] says they are off
    /// the pool). As a share of pool work, the zstd convert row of the workloads bench took
    /// 7% longer and 14% more CPU.
    pub(crate) fn for_copy(threads: usize) -> Self {
        Pool {
            #[cfg(feature = "parallel")]
            for_copy: true,
            ..Pool::new(threads)
        }
    }

    /// How many threads the pool runs jobs on at once.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Run `job` on a pool thread, later, without waiting for it (work ahead of the caller,
    /// such as decompressing the clusters a sequential reader reads next). `false`, and `job`
    /// dropped unrun, when the pool has no threads to spare (one thread, or none started).
    pub(crate) fn spawn_detached(&self, job: impl FnOnce() + Send + 'static) -> bool {
        #[cfg(feature = "parallel")]
        if let Some(workers) = self.spare_workers() {
            workers.spawn(job);
            return true;
        }
        drop(job);
        false
    }

    /// Whether [`Pool::spawn_detached`] would run a job.
    pub(crate) fn can_spawn_detached(&self) -> bool {
        #[cfg(feature = "parallel")]
        return self.spare_workers().is_some();
        #[cfg(not(feature = "parallel"))]
        false
    }

    /// The threads, unless the pool has only one: then the caller does all the work, and no
    /// thread is ever started (`OpenOptions::threads(1)`).
    #[cfg(feature = "parallel")]
    fn spare_workers(&self) -> Option<&rayon::ThreadPool> {
        (self.threads > 1).then(|| self.workers()).flatten()
    }

    /// Run `body` on the calling thread with a [`Scope`] whose jobs may borrow anything that
    /// outlives the call; returns once `body` and every job it started are done. A job's
    /// panic is raised again here, after the others are done.
    pub(crate) fn scope<'scope, R>(&self, body: impl FnOnce(&Scope<'_, 'scope>) -> R) -> R {
        #[cfg(feature = "parallel")]
        if let Some(workers) = self.spare_workers() {
            return workers.in_place_scope(|scope| body(&Scope { inner: Some(scope) }));
        }
        body(&Scope { inner: None })
    }

    /// Apply `f` to every job, on up to [`Pool::threads`] threads: the calling thread and
    /// pool threads take jobs from one queue until it is empty, so the load balances itself
    /// and the work is done even when every pool thread is busy elsewhere. Returns when all
    /// are done.
    pub(crate) fn run_all<T: Send>(&self, jobs: &mut [T], f: impl Fn(&mut T) + Sync) {
        let helpers = self.threads.min(jobs.len()).saturating_sub(1);
        if helpers == 0 {
            jobs.iter_mut().for_each(f);
            return;
        }
        let queue = Mutex::new(jobs.iter_mut());
        let work_off_queue = || loop {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            match next {
                Some(job) => f(job),
                None => return,
            }
        };
        self.scope(|scope| {
            for _ in 0..helpers {
                if !scope.spawn(work_off_queue) {
                    break;
                }
            }
            work_off_queue();
        });
    }

    /// The pool's threads, started on the first call.
    #[cfg(feature = "parallel")]
    fn workers(&self) -> Option<&rayon::ThreadPool> {
        self.workers
            .get_or_init(|| {
                #[cfg(test)]
                if REFUSE_THREADS.with(std::cell::Cell::get) {
                    return None;
                }
                let builder = rayon::ThreadPoolBuilder::new().num_threads(self.threads);
                let builder = if self.for_copy {
                    builder
                        .thread_name(|i| format!("qcow2-copy-{i}"))
                        .start_handler(|_| COPY_THREAD.with(|c| c.set(true)))
                } else {
                    builder.thread_name(|i| format!("qcow2-pool-{i}"))
                };
                builder.build().ok()
            })
            .as_ref()
    }

    /// Whether the threads have been started (tests check that opening starts none).
    #[cfg(test)]
    pub(crate) fn started(&self) -> bool {
        #[cfg(feature = "parallel")]
        let started = self.workers.get().is_some_and(Option::is_some);
        #[cfg(not(feature = "parallel"))]
        let started = false;
        started
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: pools started on this thread are refused their threads, as a system out of
    /// threads would.
    static REFUSE_THREADS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests: make the system refuse (or grant again) the threads of pools started on this
/// thread.
#[cfg(test)]
pub(crate) fn refuse_threads_in_tests(refuse: bool) {
    REFUSE_THREADS.with(|r| r.set(refuse));
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn run_all_does_every_job_once() {
        for threads in [1, 2, 4] {
            let pool = Pool::new(threads);
            let mut jobs: Vec<(usize, usize)> = (0..100).map(|i| (i, 0)).collect();
            pool.run_all(&mut jobs, |(i, done)| *done += *i + 1);
            assert!(jobs.iter().all(|&(i, done)| done == i + 1), "{threads}");
        }
    }

    #[test]
    fn one_thread_starts_nothing_and_a_pool_starts_only_when_used() {
        let pool = Pool::new(1);
        pool.run_all(&mut [1, 2, 3], |x| *x += 1);
        let mut ran = false;
        pool.scope(|scope| {
            assert!(!scope.has_workers());
            ran = true;
        });
        assert!(ran);
        assert!(!pool.spawn_detached(|| {}));
        assert!(!pool.started());
        let pool = Pool::new(3);
        assert!(!pool.started());
        pool.run_all(&mut [0u8; 8], |x| *x += 1);
        assert_eq!(pool.started(), cfg!(feature = "parallel"));
    }

    #[cfg(feature = "parallel")]
    #[test]
    fn jobs_run_on_the_pool_threads_and_the_caller() {
        let pool = Pool::new(3);
        let names = Mutex::new(std::collections::HashSet::new());
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let mut jobs = vec![(); 64];
        pool.run_all(&mut jobs, |()| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let name = std::thread::current().name().map(str::to_owned);
            names.lock().unwrap().insert(name);
            std::thread::sleep(std::time::Duration::from_millis(2));
            running.fetch_sub(1, Ordering::SeqCst);
        });
        let most = most.load(Ordering::SeqCst);
        assert!((2..=3).contains(&most), "{most} jobs at once");
        let names = names.into_inner().unwrap();
        assert!(names.iter().flatten().any(|n| n.starts_with("qcow2-pool-")));
    }

    #[test]
    fn a_job_that_panics_is_raised_in_the_caller_after_the_others() {
        let pool = Pool::new(2);
        let done = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run_all(&mut [0, 1, 2, 3, 4, 5, 6, 7], |x| {
                if *x == 3 {
                    panic!("job 3");
                }
                done.fetch_add(1, Ordering::SeqCst);
            })
        }));
        assert!(result.is_err());
        // The pool still works afterwards.
        let mut jobs = [0u8; 4];
        pool.run_all(&mut jobs, |x| *x = 1);
        assert_eq!(jobs, [1; 4]);
    }
}
