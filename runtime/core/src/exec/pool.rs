//! A persistent worker pool: threads start with the session, wake for each parallel step,
//! spin briefly, then park. Running a step allocates nothing, so decoding stays allocation-free.
//!
//! A step does not wait for workers that are not running: the caller runs the job itself, then
//! closes the step, and a worker that wakes after that (its core was busy with another process)
//! skips it. Jobs therefore share their work dynamically (participants take chunks from a
//! counter until none is left), so whoever takes part finishes the step.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How many times a waiting thread polls before it parks: a decode step's matrix products
/// follow each other within microseconds, long before a park/unpark round trip would finish.
const SPINS: usize = 20_000;

/// The job of the current step, with its lifetime erased (see the SAFETY note in [`Pool::run`]).
type Job = *const (dyn Fn(usize) + Sync);

/// [`Shared::gate`]: the step's generation in the high 32 bits, then "closed", then the count
/// of workers that joined the step and have not finished it.
const CLOSED: u64 = 1 << 31;
const ACTIVE: u64 = CLOSED - 1;

fn generation(gate: u64) -> u64 {
    gate >> 32
}

struct Shared {
    /// Generation, closed flag and active workers of the current step, in one word so that a
    /// worker joins only the step it saw and only while it is open.
    gate: AtomicU64,
    shutdown: AtomicBool,
    /// Workers parked on `wake` (or about to park): only then does a step need to notify.
    sleepers: AtomicUsize,
    /// The caller is parked on `done` (or about to park): only then does the last worker notify.
    caller_waits: AtomicBool,
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
            gate: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            caller_waits: AtomicBool::new(false),
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

    /// Runs `job(0)` on the caller and `job(i)` on each worker `i` that wakes before the caller
    /// is done with its own call; returns when every call made has returned. Each index is used
    /// by one call at most, so it can select per-participant scratch; the job must share its
    /// work dynamically, as any subset of participants (always including the caller) may run.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased. Workers dereference the pointer only after
        // joining the step while it is open, and this function closes the step and waits for
        // every joined worker to leave before it returns, so `job` outlives every use.
        let erased: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        *lock(&s.job) = Some(SendJob(erased));
        let next = (generation(s.gate.load(Ordering::Relaxed)) + 1) & 0xffff_ffff;
        s.gate.store(next << 32, Ordering::SeqCst);
        // A worker registers in `sleepers` under the lock before it re-checks the generation
        // and parks; with both sides SeqCst, either it sees the new generation or we see it.
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&s.job);
            s.wake.notify_all();
        }
        job(0);
        if s.gate.fetch_or(CLOSED, Ordering::SeqCst) & ACTIVE == 0 {
            return;
        }
        for _ in 0..SPINS {
            if s.gate.load(Ordering::Acquire) & ACTIVE == 0 {
                return;
            }
            std::hint::spin_loop();
        }
        let mut guard = lock(&s.done_lock);
        s.caller_waits.store(true, Ordering::SeqCst);
        while s.gate.load(Ordering::SeqCst) & ACTIVE != 0 {
            guard = s.done.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        s.caller_waits.store(false, Ordering::Relaxed);
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
        while generation(s.gate.load(Ordering::Acquire)) == seen
            && !s.shutdown.load(Ordering::Acquire)
        {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let guard = lock(&s.job);
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            if generation(s.gate.load(Ordering::SeqCst)) == seen
                && !s.shutdown.load(Ordering::Acquire)
            {
                drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
            } else {
                drop(guard);
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        // Join the step we saw, if it is still open.
        let mut gate = s.gate.load(Ordering::SeqCst);
        seen = generation(gate);
        let joined = loop {
            if generation(gate) != seen || gate & CLOSED != 0 {
                break false;
            }
            match s
                .gate
                .compare_exchange_weak(gate, gate + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break true,
                Err(now) => gate = now,
            }
        };
        if !joined {
            continue;
        }
        let job = *lock(&s.job);
        if let Some(SendJob(job)) = job {
            // SAFETY: `Pool::run` published this pointer before opening the step we joined,
            // and waits for every joined worker to leave before its referent can go away.
            unsafe { (*job)(index) };
        }
        // The caller sets `caller_waits` under `done_lock` before re-checking the count and
        // parking; with both sides SeqCst, either it sees zero or we see it waiting.
        let before = s.gate.fetch_sub(1, Ordering::SeqCst);
        if before & ACTIVE == 1 && before & CLOSED != 0 && s.caller_waits.load(Ordering::SeqCst) {
            let _guard = lock(&s.done_lock);
            s.done.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks taken from a counter are all done once per step, whoever joins, and no index
    /// runs twice at once.
    #[test]
    fn every_chunk_runs_once_per_step() {
        let pool = Pool::new(3);
        let chunks: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        let busy: Vec<AtomicBool> = (0..3).map(|_| AtomicBool::new(false)).collect();
        for step in 0..2000 {
            let next = AtomicUsize::new(0);
            pool.run(&|i| {
                assert!(
                    !busy[i].swap(true, Ordering::AcqRel),
                    "index {i} ran twice at once"
                );
                loop {
                    let c = next.fetch_add(1, Ordering::Relaxed);
                    if c >= chunks.len() {
                        break;
                    }
                    chunks[c].fetch_add(1, Ordering::Relaxed);
                }
                busy[i].store(false, Ordering::Release);
            });
            assert!(chunks.iter().all(|c| c.load(Ordering::Relaxed) == step + 1));
        }
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
