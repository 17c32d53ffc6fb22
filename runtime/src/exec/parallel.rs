//! Splits a matrix product across the session's workers: by tokens for a batch, by rows for a
//! single token, in chunks that participants take from a counter. Each chunk's output is
//! written by the participant that took it; each participant has its own scratch tile.

use crate::kernels::{matmul_rows, Input, Kernels, Matrix, TILE_ROWS};

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

/// `out[t] = x[t] · wᵀ` for `n` tokens; `scratch` holds one `TILE_ROWS × w.cols` tile per participant.
pub fn matmul(
    k: &Kernels,
    workers: &Workers,
    x: Input<'_>,
    n: usize,
    w: &Matrix<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    #[cfg(feature = "std")]
    if let Some(pool) = workers {
        if n * w.rows * w.cols >= MIN_PARALLEL_WORK {
            return split(k, pool, x, n, w, &mut out[..n * w.rows], scratch);
        }
    }
    #[cfg(not(feature = "std"))]
    let _ = workers;
    matmul_rows(
        k,
        x,
        n,
        w,
        0..w.rows,
        out,
        w.rows,
        &mut scratch[..TILE_ROWS * w.cols],
    );
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

#[cfg(feature = "std")]
fn split(
    k: &Kernels,
    pool: &super::pool::Pool,
    x: Input<'_>,
    n: usize,
    w: &Matrix<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let (m, threads, tile) = (w.rows, pool.threads(), TILE_ROWS * w.cols);
    let (out, tiles) = (
        Shared::new(out),
        Shared::new(&mut scratch[..threads * tile]),
    );
    // Participants take chunks from a counter until none is left, so a worker whose core is
    // busy elsewhere costs nothing (see `Pool::run`); a few chunks per participant balance the
    // load without splitting the work too finely.
    let next = core::sync::atomic::AtomicUsize::new(0);
    let take = || next.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    if n == 1 {
        // One token: chunks of whole row tiles.
        let per = m.div_ceil(CHUNKS_PER_THREAD * threads).div_ceil(TILE_ROWS) * TILE_ROWS;
        pool.run(&|i| {
            // SAFETY: each participant index runs at most once per step, so tile `i` is its own.
            let sc = unsafe { tiles.part(i * tile..(i + 1) * tile) };
            loop {
                let start = (take() * per).min(m);
                let rows = start..(start + per).min(m);
                if rows.is_empty() {
                    return;
                }
                // SAFETY: the counter hands each chunk (output rows `rows`) to one participant.
                let os = unsafe { out.part(rows.clone()) };
                matmul_rows(k, x, 1, w, rows, os, 0, sc);
            }
        });
    } else {
        // A batch: chunks of whole tokens (whole output rows), in whole token tiles of the
        // kernels where the batch allows.
        let tt = crate::kernels::TILE_TOKENS;
        let per = n.div_ceil(CHUNKS_PER_THREAD * threads).div_ceil(tt) * tt;
        pool.run(&|i| {
            // SAFETY: each participant index runs at most once per step, so tile `i` is its own.
            let sc = unsafe { tiles.part(i * tile..(i + 1) * tile) };
            loop {
                let start = (take() * per).min(n);
                let tokens = start..(start + per).min(n);
                if tokens.is_empty() {
                    return;
                }
                // SAFETY: the counter hands each chunk (the output rows of `tokens`) to one
                // participant.
                let os = unsafe { out.part(tokens.start * m..tokens.end * m) };
                matmul_rows(
                    k,
                    x.tokens(tokens.clone(), w.cols),
                    tokens.len(),
                    w,
                    0..m,
                    os,
                    m,
                    sc,
                );
            }
        });
    }
}
