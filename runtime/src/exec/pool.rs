//! A persistent worker pool: threads start with the session, wake for each parallel step,
//! spin briefly, then park. Running a step allocates nothing, so decoding stays allocation-free.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How many times a waiting thread polls before it parks: a decode step's matrix products
/// follow each other within microseconds, long before a park/unpark round trip would finish.
const SPINS: usize = 20_000;

/// The job of the current step, with its lifetime erased (see the SAFETY note in [`Pool::run`]).
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per step; workers run the job when they see a new value.
    generation: AtomicUsize,
    /// Workers still running the current step.
    busy: AtomicUsize,
    shutdown: AtomicBool,
    job: Mutex<Option<SendJob>>,
    wake: Condvar,
    done: Condvar,
    done_lock: Mutex<()>,
}

/// The job pointer, sent to workers that only dereference it while [`Pool::run`] waits.
#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is `Sync`, and `Pool::run` keeps it alive until every worker is done.
unsafe impl Send for SendJob {}

/// Worker threads that share a step's work with the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool of `threads` participants: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: Mutex::new(None),
            wake: Condvar::new(),
            done: Condvar::new(),
            done_lock: Mutex::new(()),
        });
        let workers = (1..threads.max(1))
            .map(|index| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || worker(&shared, index))
            })
            .collect();
        Pool { shared, workers }
    }

    /// Participants, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(i)` for every participant `i` (the caller is 0) and returns when all are done.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. Workers dereference the pointer between seeing
        // the new generation and decrementing `busy`, and this function does not return before
        // `busy` is back to zero, so `job` outlives every use.
        let erased: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        *lock(&s.job) = Some(SendJob(erased));
        s.busy.store(self.workers.len(), Ordering::Release);
        s.generation.fetch_add(1, Ordering::AcqRel);
        {
            let _guard = lock(&s.job);
            s.wake.notify_all();
        }
        job(0);
        for _ in 0..SPINS {
            if s.busy.load(Ordering::Acquire) == 0 {
                return;
            }
            std::hint::spin_loop();
        }
        let mut guard = lock(&s.done_lock);
        while s.busy.load(Ordering::Acquire) != 0 {
            guard = s.done.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _guard = lock(&self.shared.job);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Locks, ignoring poisoning: a panicking job already failed the step it ran in.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0;
        while s.generation.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let guard = lock(&s.job);
            if s.generation.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            }
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = s.generation.load(Ordering::Acquire);
        let job = *lock(&s.job);
        if let Some(SendJob(job)) = job {
            // SAFETY: `Pool::run` published this pointer for the current generation and waits
            // for `busy` to reach zero before its referent can go away.
            unsafe { (*job)(index) };
        }
        if s.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _guard = lock(&s.done_lock);
            s.done.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_participant_runs_every_step() {
        let pool = Pool::new(3);
        let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1000));
    }

    #[test]
    fn a_pool_of_one_runs_on_the_caller() {
        let pool = Pool::new(1);
        let ran = AtomicUsize::new(0);
        pool.run(&|i| {
            assert_eq!(i, 0);
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!((pool.threads(), ran.load(Ordering::Relaxed)), (1, 1));
    }
}
