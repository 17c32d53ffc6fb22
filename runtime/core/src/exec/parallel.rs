//! Splits a matrix product across the session's workers by rows, in chunks of whole row tiles
//! that participants take from a counter; each chunk computes every token of the batch, so
//! each weight is read once per product. Each chunk's outputs (its columns of every token's
//! row) are written by the participant that took it; each participant has its own scratch.

#[cfg(feature = "std")]
use crate::kernels::TILE_ROWS;
use crate::kernels::{matmul_rows, Input, Kernels, Matrix, Out};

/// The session's worker threads (`None`: the calling thread does everything).
#[cfg(feature = "std")]
pub type Workers = Option<super::pool::Pool>;
/// Without `std` there are no threads; everything runs on the caller.
#[cfg(not(feature = "std"))]
pub type Workers = ();

/// Workers for `threads` participants.
pub fn workers(threads: usize) -> Workers {
    #[cfg(feature = "std")]
    {
        (threads > 1).then(|| super::pool::Pool::new(threads))
    }
    #[cfg(not(feature = "std"))]
    {
        let _ = threads;
    }
}

/// Chunks of work per participant in a parallel product.
#[cfg(feature = "std")]
const CHUNKS_PER_THREAD: usize = 4;

/// Below this many multiply-adds a product runs on the calling thread.
#[cfg(feature = "std")]
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// Participants of a parallel step: the workers and the calling thread.
pub fn participants(workers: &Workers) -> usize {
    #[cfg(feature = "std")]
    {
        workers.as_ref().map_or(1, |p| p.threads())
    }
    #[cfg(not(feature = "std"))]
    {
        let _ = workers;
        1
    }
}

/// `out[t] = x[t] · wᵀ` for `n` tokens; `scratch` holds an equal part per participant.
pub fn matmul(
    k: &Kernels,
    workers: &Workers,
    x: Input<'_>,
    n: usize,
    w: &Matrix<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let out = Out::new(&mut out[..n * w.rows], w.rows);
    let per = scratch.len() / participants(workers);
    #[cfg(feature = "std")]
    if let Some(pool) = workers {
        if n * w.rows * w.cols >= MIN_PARALLEL_WORK {
            return split(k, pool, Tokens { x, n }, w, out, scratch, per);
        }
    }
    matmul_rows(k, x, n, w, 0..w.rows, out, &mut scratch[..per]);
}

/// A slice that participants write in disjoint parts.
#[cfg(feature = "std")]
pub(super) struct Shared {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: participants only ever form non-overlapping sub-slices (see `part`).
#[cfg(feature = "std")]
unsafe impl Sync for Shared {}

#[cfg(feature = "std")]
impl Shared {
    pub(super) fn new(s: &mut [f32]) -> Shared {
        Shared {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// SAFETY: the caller guarantees no two live parts overlap.
    // Handing out `&mut` from `&self` is the point: each participant gets its own part.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn part(&self, range: core::ops::Range<usize>) -> &mut [f32] {
        debug_assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked by the caller's arithmetic), and exclusive by the contract above.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

/// The output shared by the participants, each of which takes columns of it.
#[cfg(feature = "std")]
struct SharedOut<'a>(Out<'a>);

// SAFETY: participants only take disjoint columns (one chunk of rows each, from the counter).
#[cfg(feature = "std")]
unsafe impl Sync for SharedOut<'_> {}

#[cfg(feature = "std")]
impl<'a> SharedOut<'a> {
    /// SAFETY: as [`Out::columns`].
    unsafe fn columns(&self, first: usize) -> Out<'a> {
        // SAFETY: passed on from the caller.
        unsafe { self.0.columns(first) }
    }
}

/// `n` tokens of activations.
#[cfg(feature = "std")]
struct Tokens<'x> {
    x: Input<'x>,
    n: usize,
}

/// The product over the pool's participants, each with `scratch_per` floats of `scratch`.
#[cfg(feature = "std")]
fn split(
    k: &Kernels,
    pool: &super::pool::Pool,
    Tokens { x, n }: Tokens<'_>,
    w: &Matrix<'_>,
    out: Out<'_>,
    scratch: &mut [f32],
    scratch_per: usize,
) {
    let (m, threads) = (w.rows, pool.threads());
    let out = SharedOut(out);
    let tiles = Shared::new(&mut scratch[..threads * scratch_per]);
    // Participants take chunks from a counter until none is left, so a worker whose core is
    // busy elsewhere costs nothing (see `Pool::run`); a few chunks per participant balance the
    // load without splitting the work too finely.
    let next = core::sync::atomic::AtomicUsize::new(0);
    let take = || next.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    let per = m.div_ceil(CHUNKS_PER_THREAD * threads).div_ceil(TILE_ROWS) * TILE_ROWS;
    pool.run(&|i| {
        // SAFETY: each participant index runs at most once per step, so scratch `i` is its own.
        let sc = unsafe { tiles.part(i * scratch_per..(i + 1) * scratch_per) };
        loop {
            let start = (take() * per).min(m);
            let rows = start..(start + per).min(m);
            if rows.is_empty() {
                return;
            }
            // SAFETY: the counter hands each chunk (the columns `rows` of every token's output
            // row) to one participant.
            let os = unsafe { out.columns(rows.start) };
            matmul_rows(k, x, n, w, rows, os, sc);
        }
    });
}
