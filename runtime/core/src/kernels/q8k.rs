//! K-quant weights (`q4_k`, `q5_k`, `q6_k`) against 8-bit activations with llama.cpp's
//! arithmetic: activations quantized per super-block of 256 (`q8_K`: an f32 scale, 256 codes,
//! sums of each 16), integer dot products per sub-block scaled by the weights' 6- or 8-bit
//! scales and summed as integers per super-block, then f32 accumulation across super-blocks.
//! The sums inside a super-block are exact, so any kernel that keeps them integer gives the
//! same bits as this reference.

use crate::layout::GROUP;
use crate::quant::dequant::scale_min_k4;
use crate::quant::{Format, BLOCK, SUPER_BLOCK};

use super::q8::{f16_to_f32, Q8Block};
use super::{Matrix, Out};

/// Codes summed per entry of [`Q8KBlock::bsums`].
const SUM_GROUP: usize = 16;

/// One super-block of quantized activations (ggml's `block_q8_K`).
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; SUPER_BLOCK],
    /// Sums of each 16 codes.
    pub bsums: [i16; SUPER_BLOCK / SUM_GROUP],
}

impl Default for Q8KBlock {
    fn default() -> Q8KBlock {
        bytemuck::Zeroable::zeroed()
    }
}

// The activation scratch is planned in 32-value blocks: a super-block must fit in the room of
// its eight, and be a whole number of floats to live in the f32 arena.
const _: () = assert!(
    core::mem::size_of::<Q8KBlock>() <= core::mem::size_of::<Q8Block>() * SUPER_BLOCK / BLOCK
);
const _: () = assert!(core::mem::size_of::<Q8KBlock>().is_multiple_of(4));

/// Whether `format` multiplies against [`Q8KBlock`] activations.
pub fn uses_q8k(format: Format) -> bool {
    format.is_k_quant()
}

/// Rounds half to even, as ggml's `nearest_int` does for the magnitudes it sees (at most 127).
fn nearest_int(v: f32) -> i32 {
    libm::rintf(v) as i32
}

/// Quantizes `x` (a whole number of super-blocks) into `out` (ggml's `quantize_row_q8_K_ref`):
/// the value of largest magnitude maps to −127 exactly, the scale keeps its sign.
pub fn quantize(x: &[f32], out: &mut [Q8KBlock]) {
    for (block, q) in x.chunks_exact(SUPER_BLOCK).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *q = Q8KBlock::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (o, &v) in q.qs.iter_mut().zip(block) {
            *o = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, codes) in q.bsums.iter_mut().zip(q.qs.chunks_exact(SUM_GROUP)) {
            *s = codes.iter().map(|&c| i16::from(c)).sum();
        }
        q.d = 1.0 / iscale;
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// `Σ w·a` over 32 weights `w(l)` and the activations `a`.
fn sub_dot(a: &[i8], w: impl Fn(usize) -> i32) -> i32 {
    a.iter()
        .enumerate()
        .map(|(l, &v)| w(l) * i32::from(v))
        .sum()
}

/// What one `q4_k` or `q5_k` super-block adds to a row's sum: `d·dy·Σ scale_j·(q·a)_j −
/// dmin·dy·Σ min_j·(Σa)_j`, both sums integers.
fn k4_term(format: Format, b: &[u8], q: &Q8KBlock) -> f32 {
    let (scales, qh, qs) = match format {
        Format::Q5K => (&b[4..16], Some(&b[16..48]), &b[48..176]),
        _ => (&b[4..16], None, &b[16..144]),
    };
    let (mut dots, mut mins) = (0i32, 0i32);
    for pair in 0..4 {
        let bytes = &qs[32 * pair..32 * pair + 32];
        for half in 0..2 {
            let j = 2 * pair + half;
            let (sc, m) = scale_min_k4(j, scales);
            let high = |l: usize| match qh {
                Some(qh) if qh[l] >> j & 1 != 0 => 16,
                _ => 0,
            };
            let a = &q.qs[32 * j..32 * j + 32];
            let dot = sub_dot(a, |l| i32::from(bytes[l] >> (4 * half) & 0x0f) + high(l));
            dots += i32::from(sc) * dot;
            mins += i32::from(m) * (i32::from(q.bsums[2 * j]) + i32::from(q.bsums[2 * j + 1]));
        }
    }
    half_at(b, 0) * q.d * dots as f32 - half_at(b, 2) * q.d * mins as f32
}

/// What one `q6_k` super-block adds: `d·dy·Σ scale_j·(q·a)_j` over 16 sub-blocks of 16.
fn k6_term(b: &[u8], q: &Q8KBlock) -> f32 {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let mut sum = 0i32;
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        for k in 0..4 {
            // Value `l` (< 32) of quarter `k`: nibble `k / 2` of byte `l + 32·(k % 2)`, bits
            // `2k, 2k+1` of `qh[l]`.
            let code = |l: usize| {
                let low = ql[l + 32 * (k % 2)] >> (4 * (k / 2)) & 0x0f;
                let high = (qh[l] >> (2 * k)) & 3;
                i32::from(low | high << 4) - 32
            };
            let base = 128 * half + 32 * k;
            for g in 0..2 {
                let a = &q.qs[base + 16 * g..base + 16 * g + 16];
                let dot: i32 = a
                    .iter()
                    .enumerate()
                    .map(|(l, &v)| code(16 * g + l) * i32::from(v))
                    .sum();
                sum += i32::from(scales[8 * half + 2 * k + g] as i8) * dot;
            }
        }
    }
    half_at(b, 208) * q.d * sum as f32
}

/// What one super-block `b` (ggml's bytes) adds to a row's sum against activations `q`.
fn block_term(format: Format, b: &[u8], q: &Q8KBlock) -> f32 {
    match format {
        Format::Q6K => k6_term(b, q),
        _ => k4_term(format, b, q),
    }
}

/// Dot product of one stored K-quant row with quantized activations (super-blocks summed in
/// order).
pub fn dot_row(format: Format, row: &[u8], x: &[Q8KBlock]) -> f32 {
    let mut sum = 0f32;
    for (b, q) in row.chunks_exact(format.block_bytes()).zip(x) {
        sum += block_term(format, b, q);
    }
    sum
}

/// `out(t, r − rows.start) = x[t] · w[r]` for K-quant rows in any layout.
pub fn gemm(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    mut out: Out<'_>,
) {
    let g = w.geometry();
    let (nb, bb) = (g.blocks, w.format.block_bytes());
    let plain = g.groups() * GROUP;
    let mut block = [0u8; Format::MAX_BLOCK_BYTES];
    for (c, r) in rows.enumerate() {
        for t in 0..n {
            let x = &x[t * nb..(t + 1) * nb];
            let sum = if r >= plain {
                let at = g.plain_row(r);
                dot_row(w.format, &w.bytes[at..at + nb * bb], x)
            } else {
                let mut sum = 0f32;
                for (b, q) in x.iter().enumerate() {
                    g.block(w.bytes, r, b, &mut block);
                    sum += block_term(w.format, &block[..bb], q);
                }
                sum
            };
            out.set(t, c, sum);
        }
    }
}

#[cfg(test)]
/// Random but finite K-quant blocks for tests: f16 scales under 0.01, any codes.
pub(crate) fn random_row(format: Format, cols: usize, seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u8
    };
    let mut row: Vec<u8> = (0..format.row_bytes(cols).unwrap_or(0))
        .map(|_| next())
        .collect();
    let halves: &[usize] = if format == Format::Q6K {
        &[208]
    } else {
        &[0, 2]
    };
    for b in row.chunks_exact_mut(format.block_bytes()) {
        for &at in halves {
            let v = half::f16::from_f32(f32::from(next()) / 255.0 * 0.01);
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The integer path stays within 8-bit rounding of the exact dot product of the
    /// dequantized weights, for each K-quant.
    #[test]
    fn k_quant_dots_are_close_to_the_dequantized_dot() {
        let cols = 512;
        let x = crate::kernels::near::activations(cols);
        let mut xq = vec![Q8KBlock::default(); cols / SUPER_BLOCK];
        quantize(&x, &mut xq);
        let mut seed = 7;
        for format in [Format::Q4K, Format::Q5K, Format::Q6K] {
            let row = random_row(format, cols, &mut seed);
            let got = dot_row(format, &row, &xq);
            crate::kernels::near::assert_near_dequantized(format, &row, &x, got);
        }
    }

    #[test]
    fn quantizing_maps_the_largest_magnitude_to_minus_127_and_sums_each_16() {
        let mut x = vec![0.25f32; SUPER_BLOCK];
        x[3] = -2.0;
        let mut q = [Q8KBlock::default()];
        quantize(&x, &mut q);
        assert_eq!(q[0].qs[3], -127);
        assert_eq!(q[0].d, 2.0 / 127.0);
        assert_eq!(q[0].qs[0], 16);
        assert_eq!(q[0].bsums[0], 15 * 16 - 127);
        assert_eq!(q[0].bsums[1], 16 * 16);
    }
}
