//! Splits a matrix product across threads: by tokens for a batch, by rows for a single token.

use crate::kernels::{matmul_rows, Input, Kernels, Matrix, TILE_ROWS};

/// Below this many multiply-adds a product runs on the calling thread.
#[cfg(feature = "std")]
const MIN_PARALLEL_WORK: usize = 1 << 18;

/// `out[t] = x[t] · wᵀ` for `n` tokens; `scratch` holds `threads × TILE_ROWS × w.cols` floats.
pub fn matmul(
    k: &Kernels,
    threads: usize,
    x: Input<'_>,
    n: usize,
    w: &Matrix<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let m = w.rows;
    let tile = TILE_ROWS * w.cols;
    #[cfg(feature = "std")]
    if threads > 1 && n * m * w.cols >= MIN_PARALLEL_WORK {
        let scratches = scratch.chunks_exact_mut(tile);
        if n >= threads {
            // Whole tokens per thread: each output row belongs to exactly one thread.
            let per = n.div_ceil(threads);
            std::thread::scope(|s| {
                for ((i, os), sc) in out[..n * m].chunks_mut(per * m).enumerate().zip(scratches) {
                    let count = os.len() / m;
                    let xs = x.tokens(i * per..i * per + count, w.cols);
                    s.spawn(move || matmul_rows(k, xs, count, w, 0..m, os, m, sc));
                }
            });
        } else {
            // One token: split the weight rows, aligned to whole tiles.
            let per = m.div_ceil(threads).div_ceil(TILE_ROWS) * TILE_ROWS;
            std::thread::scope(|s| {
                for ((i, os), sc) in out[..m].chunks_mut(per).enumerate().zip(scratches) {
                    let rows = i * per..(i * per + os.len());
                    s.spawn(move || matmul_rows(k, x, 1, w, rows, os, 0, sc));
                }
            });
        }
        return;
    }
    #[cfg(not(feature = "std"))]
    let _ = threads;
    matmul_rows(k, x, n, w, 0..m, out, m, &mut scratch[..tile]);
}
