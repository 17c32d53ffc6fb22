//! Compute kernels: one table of generic reference kernels, entries replaced after a run-time
//! CPU check by versions compiled for wider vector units. `KILN_KERNELS=generic` forces the
//! reference table.

mod generic;
pub mod q8;
#[cfg(all(feature = "std", target_arch = "x86_64"))]
mod x86;

use crate::quant::{Format, BLOCK};
use q8::Q8Block;

/// Rows of a weight matrix handled together by [`Kernels::dot4`].
pub const TILE_ROWS: usize = 4;

/// The kernel table.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// Name of the table, for `--verbose` output and benchmarks.
    pub name: &'static str,
    /// `Σ a[i]·b[i]`.
    pub dot: fn(&[f32], &[f32]) -> f32,
    /// Four dot products of the rows of `w` (`4 × x.len()`) with `x`.
    pub dot4: fn(&[f32], &[f32]) -> [f32; TILE_ROWS],
    /// One block-quantized weight row against 8-bit activations.
    pub dot_q8: fn(Format, &[u8], &[Q8Block]) -> f32,
}

impl Kernels {
    /// The reference kernels.
    pub fn generic() -> Kernels {
        Kernels {
            name: "generic",
            dot: generic::dot,
            dot4: generic::dot4,
            dot_q8: q8::dot_row,
        }
    }

    /// The best table for this CPU, unless `KILN_KERNELS=generic` (std only) asks otherwise.
    pub fn detect() -> Kernels {
        #[cfg(feature = "std")]
        if std::env::var("KILN_KERNELS").is_ok_and(|v| v == "generic") {
            return Kernels::generic();
        }
        #[allow(unused_mut)]
        let mut k = Kernels::generic();
        #[cfg(all(feature = "std", target_arch = "x86_64"))]
        x86::overwrite(&mut k);
        k
    }
}

/// A weight matrix as the kernels read it.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
    /// The values in place, when stored as f32 and aligned.
    pub f32: Option<&'a [f32]>,
}

impl<'a> Matrix<'a> {
    pub fn new(format: Format, rows: usize, cols: usize, bytes: &'a [u8]) -> Matrix<'a> {
        let f32 = (format == Format::F32)
            .then(|| bytemuck::try_cast_slice(bytes).ok())
            .flatten();
        Matrix {
            format,
            rows,
            cols,
            bytes,
            f32,
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.bytes.len() / self.rows.max(1)
    }

    /// Rows `r0..r0+count` as f32: in place when possible, else dequantized into `scratch`.
    pub fn rows_f32<'s>(&self, r0: usize, count: usize, scratch: &'s mut [f32]) -> &'s [f32]
    where
        'a: 's,
    {
        if let Some(values) = self.f32 {
            return &values[r0 * self.cols..(r0 + count) * self.cols];
        }
        let rb = self.row_bytes();
        for i in 0..count {
            let src = &self.bytes[(r0 + i) * rb..(r0 + i + 1) * rb];
            self.format
                .dequantize_row(src, &mut scratch[i * self.cols..(i + 1) * self.cols]);
        }
        &scratch[..count * self.cols]
    }
}

/// Activations of a batch of tokens, as a matrix product reads them.
#[derive(Clone, Copy)]
pub enum Input<'x> {
    /// `n × cols` floats (for float weights).
    F32(&'x [f32]),
    /// `n × cols / 32` quantized blocks (for block-quantized weights).
    Q8(&'x [Q8Block]),
}

impl<'x> Input<'x> {
    /// Tokens `range` of a batch whose rows are `cols` long.
    pub fn tokens(self, range: core::ops::Range<usize>, cols: usize) -> Input<'x> {
        match self {
            Input::F32(x) => Input::F32(&x[range.start * cols..range.end * cols]),
            Input::Q8(x) => Input::Q8(&x[range.start * cols / BLOCK..range.end * cols / BLOCK]),
        }
    }
}

/// `out[t][r] = x[t] · w[r]` for tokens `t < n` and rows `rows` of `w`; `out` rows are
/// `out_stride` apart, and `scratch` holds [`TILE_ROWS`] dequantized weight rows.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    k: &Kernels,
    x: Input<'_>,
    n: usize,
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    out: &mut [f32],
    out_stride: usize,
    scratch: &mut [f32],
) {
    let cols = w.cols;
    if let Input::Q8(xq) = x {
        let (rb, bpr) = (w.row_bytes(), cols / BLOCK);
        for r in rows.clone() {
            let row = &w.bytes[r * rb..(r + 1) * rb];
            for t in 0..n {
                out[t * out_stride + r - rows.start] =
                    (k.dot_q8)(w.format, row, &xq[t * bpr..(t + 1) * bpr]);
            }
        }
        return;
    }
    let Input::F32(x) = x else { return };
    let mut r0 = rows.start;
    while r0 < rows.end {
        let count = TILE_ROWS.min(rows.end - r0);
        let tile = w.rows_f32(r0, count, scratch);
        for t in 0..n {
            let xt = &x[t * cols..(t + 1) * cols];
            let o = &mut out[t * out_stride + r0 - rows.start..];
            if count == TILE_ROWS {
                o[..TILE_ROWS].copy_from_slice(&(k.dot4)(tile, xt));
            } else {
                for i in 0..count {
                    o[i] = (k.dot)(&tile[i * cols..(i + 1) * cols], xt);
                }
            }
        }
        r0 += count;
    }
}

/// `out = x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / libm::sqrtf(mean_sq + eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// `out = gate · sigmoid(gate) · up`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + libm::expf(-g)) * u;
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = libm::expf(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Rotate-half RoPE on each head of `x` (`heads × head_dim`) with this position's cos/sin pairs.
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x1 * cos[i] + x0 * sin[i];
        }
    }
}
