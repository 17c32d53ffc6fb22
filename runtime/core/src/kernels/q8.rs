//! Block-quantized weights against 8-bit activations, with llama.cpp's arithmetic: activations
//! are quantized per block of 32 (`q8_0`, plus the block sum for `q4_1`'s `q8_1`), scales
//! rounded to f16, integer dot products per block, f32 accumulation across blocks.

use half::f16;

use super::product::Product;
use crate::layout::GROUP;
use crate::quant::{Format, BLOCK};

/// The block formats as `u8` const parameters, so that an optimized kernel generic over the
/// format gets straight-line code for each.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod consts {
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;
    pub const Q5_0: u8 = 3;
    pub const Q5_1: u8 = 4;

    /// Whether format `f` has a minimum `m` in each block (adding `m·s`, `s` the activations'
    /// scaled sum).
    pub const fn has_min(f: u8) -> bool {
        matches!(f, Q4_1 | Q5_1)
    }

    /// Whether format `f` stores a fifth bit of each value (`qh`).
    pub const fn has_fifth_bit(f: u8) -> bool {
        matches!(f, Q5_0 | Q5_1)
    }

    /// Bytes of one stored block of format `f`.
    pub const fn block_bytes(f: u8) -> usize {
        match f {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            _ => 34,
        }
    }
}

/// One block of quantized activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct Q8Block {
    /// Scale, already rounded through f16 as llama.cpp stores it.
    pub d: f32,
    /// `d × Σ qs`, rounded through f16 (`q8_1`'s `s`).
    pub s: f32,
    pub qs: [i8; BLOCK],
}

fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Quantizes `x` (a whole number of blocks) into `out`.
pub fn quantize(x: &[f32], out: &mut [Q8Block]) {
    for (block, q) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (o, &v) in q.qs.iter_mut().zip(block) {
            *o = libm::roundf(v * id) as i8;
            sum += i32::from(*o);
        }
        q.d = round_f16(d);
        q.s = round_f16(sum as f32 * d);
    }
}

/// The f16 with bits `h` as f32, exactly as `half` converts it (NaNs stay NaNs), without
/// branches: the exponent and mantissa move to f32 positions, then one multiplication by 2¹¹²
/// rebiases the exponent (and normalizes subnormals exactly); infinities and NaNs are set apart.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let em = u32::from(h & 0x7fff);
    let sign = u32::from(h & 0x8000) << 16;
    let finite = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let bits = if em >= 0x7c00 {
        0x7f80_0000 | (em & 0x3ff) << 13
    } else {
        finite.to_bits()
    };
    f32::from_bits(bits | sign)
}

#[inline(always)]
fn half_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Whether `format` multiplies against [`Q8Block`] activations.
pub fn uses_q8(format: Format) -> bool {
    matches!(
        format,
        Format::Q8_0 | Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1
    )
}

/// Whether the levels' optimized kernels take `format` (the 5-bit formats have their own
/// entry, [`Kernels::gemm_q5`](super::Kernels::gemm_q5)).
pub fn has_level_kernels(format: Format) -> bool {
    matches!(format, Format::Q8_0 | Format::Q4_0 | Format::Q4_1)
}

/// `16 × Σ a_v` over the values `v` whose fifth bit is set in a 5-bit block's `qh`.
#[inline(always)]
fn fifth_bits(qh: &[u8], a: &[i8; BLOCK]) -> i32 {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    16 * (0..BLOCK)
        .filter(|&v| qh >> v & 1 != 0)
        .map(|v| i32::from(a[v]))
        .sum::<i32>()
}

/// The integer part of a block dot product; the float scaling around it is shared, so every
/// implementation gives bit-identical results (integer sums do not depend on their order).
pub trait BlockDot {
    /// `Σ w[j]·a[j]` for 32 signed bytes `w` (a `q8_0` block's quants).
    fn signed(w: &[u8], a: &[i8; BLOCK]) -> i32;
    /// `Σ nibble[j]·a[j]` for the 32 unsigned nibbles of a 4-bit block, in ggml's order.
    fn nibbles(qs: &[u8], a: &[i8; BLOCK]) -> i32;
    /// `Σ a[j]`.
    fn sum(a: &[i8; BLOCK]) -> i32;
    /// `16 × Σ a[v]` over the values `v` whose fifth bit is set in a 5-bit block's `qh`.
    fn fifth(qh: &[u8], a: &[i8; BLOCK]) -> i32 {
        fifth_bits(qh, a)
    }
}

/// Portable integer block dots, written so compilers vectorize them.
pub struct Scalar;

impl BlockDot for Scalar {
    #[inline(always)]
    fn signed(w: &[u8], a: &[i8; BLOCK]) -> i32 {
        w.iter()
            .zip(a)
            .map(|(&w, &a)| i32::from(w as i8) * i32::from(a))
            .sum()
    }

    #[inline(always)]
    fn nibbles(qs: &[u8], a: &[i8; BLOCK]) -> i32 {
        let (lo, hi) = a.split_at(BLOCK / 2);
        qs.iter()
            .zip(lo.iter().zip(hi))
            .map(|(&q, (&l, &h))| {
                i32::from(q & 0x0f) * i32::from(l) + i32::from(q >> 4) * i32::from(h)
            })
            .sum()
    }

    #[inline(always)]
    fn sum(a: &[i8; BLOCK]) -> i32 {
        a.iter().map(|&v| i32::from(v)).sum()
    }
}

/// What block `b` (ggml's bytes) adds to a row's sum against the activation block `q`.
#[inline(always)]
pub fn block_term<D: BlockDot>(format: Format, b: &[u8], q: &Q8Block) -> f32 {
    match format {
        Format::Q8_0 => D::signed(&b[2..], &q.qs) as f32 * (half_at(b, 0) * q.d),
        Format::Q4_0 => {
            // Σ (nibble − 8)·a, with the offset taken out of the integer sum.
            let acc = D::nibbles(&b[2..], &q.qs) - 8 * D::sum(&q.qs);
            acc as f32 * (half_at(b, 0) * q.d)
        }
        Format::Q4_1 => {
            let acc = D::nibbles(&b[4..], &q.qs);
            half_at(b, 0) * q.d * acc as f32 + half_at(b, 2) * q.s
        }
        Format::Q5_0 => {
            // Σ (q − 16)·a with q = nibble + 16·bit.
            let acc = D::nibbles(&b[6..], &q.qs) + D::fifth(&b[2..6], &q.qs) - 16 * D::sum(&q.qs);
            acc as f32 * (half_at(b, 0) * q.d)
        }
        Format::Q5_1 => {
            let acc = D::nibbles(&b[8..], &q.qs) + D::fifth(&b[4..8], &q.qs);
            half_at(b, 0) * q.d * acc as f32 + half_at(b, 2) * q.s
        }
        // Formats without these activations never reach here (see [`uses_q8`]); zero keeps
        // this total.
        _ => 0.0,
    }
}

/// Dot product of one stored weight row with quantized activations.
#[inline(always)]
pub fn dot_row_with<D: BlockDot>(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, q) in row.chunks_exact(format.block_bytes()).zip(x) {
        sum += block_term::<D>(format, b, q);
    }
    sum
}

/// [`dot_row_with`] on the portable block dots (the reference kernel).
pub fn dot_row(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    dot_row_with::<Scalar>(format, row, x)
}

/// The reference matrix product ([`Product`]), in any layout: each (row, token) sums its
/// blocks' [`block_term`]s in order, so the result does not depend on the layout.
pub fn gemm(mut p: Product<'_>) {
    let g = p.w.geometry;
    let nb = g.blocks;
    let out = p.out.checked(p.n, p.rows.len());
    let plain = g.groups() * GROUP;
    let mut block = [0u8; 34];
    for (c, r) in p.rows.clone().enumerate() {
        if r >= plain {
            let row = p.w.plain_rows(r..r + 1);
            for t in 0..p.n {
                let v = dot_row(g.format, row, &p.x[t * nb..(t + 1) * nb]);
                p.out.set(t, c, v);
            }
            continue;
        }
        for t in 0..p.n {
            p.out.set(t, c, 0.0);
        }
        for b in 0..nb {
            g.block(p.w.bytes, r, b, &mut block);
            for t in 0..p.n {
                let term = block_term::<Scalar>(g.format, &block, &p.x[t * nb + b]);
                // SAFETY: `(t, c)` is inside the output `checked` vouched for.
                unsafe { *out.add(t * p.out.stride() + c) += term };
            }
        }
    }
}

/// [`gemm`] over a matrix of ggml rows, one row and token at a time on the block dots `D`.
#[inline(always)]
pub fn gemm_rows_with<D: BlockDot>(p: Product<'_>) {
    let Product {
        w,
        rows,
        x,
        n,
        mut out,
        ..
    } = p;
    let (format, nb) = (w.geometry.format, w.geometry.blocks);
    let bytes = w.plain_rows(rows.clone());
    let rb = w.geometry.row_bytes();
    for c in 0..rows.len() {
        let row = &bytes[c * rb..(c + 1) * rb];
        for t in 0..n {
            out.set(
                t,
                c,
                dot_row_with::<D>(format, row, &x[t * nb..(t + 1) * nb]),
            );
        }
    }
}

/// `Σ |terms|` of `row · x`: `|d_w·d_x|·Σ|q_w·q_x|` per block over the element products (with
/// `q_w` the signed quant, `nibble − 8` for `q4_0`), plus `|m·s|` for `q4_1`. Every partial sum
/// a kernel may form (one block, part of a block, several blocks) is bounded by it, so it
/// scales the rounding error of any summation order.
pub fn abs_terms(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    let bb = format.block_bytes();
    for (b, q) in row.chunks_exact(bb).zip(x) {
        let d = (half_at(b, 0) * q.d).abs();
        let fifth = |at: usize, j: usize| {
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            16 * (qh >> j & 1) as i32
        };
        let quant = |j: usize| -> i32 {
            match format {
                Format::Q8_0 => i32::from(b[2 + j] as i8),
                Format::Q4_0 => i32::from(b[2 + j % 16] >> (4 * (j / 16)) & 0x0f) - 8,
                Format::Q5_0 => {
                    i32::from(b[6 + j % 16] >> (4 * (j / 16)) & 0x0f) + fifth(2, j) - 16
                }
                Format::Q5_1 => i32::from(b[8 + j % 16] >> (4 * (j / 16)) & 0x0f) + fifth(4, j),
                _ => i32::from(b[4 + j % 16] >> (4 * (j / 16)) & 0x0f),
            }
        };
        let products: i32 = (0..BLOCK)
            .map(|j| (quant(j) * i32::from(q.qs[j])).abs())
            .sum();
        sum += products as f32 * d;
        if matches!(format, Format::Q4_1 | Format::Q5_1) {
            sum += (half_at(b, 2) * q.s).abs();
        }
    }
    sum
}

/// How far an optimized kernel may be from [`dot_row`] for a row of `blocks` blocks whose
/// terms sum to `abs_terms` in absolute value. Both sum the same products, each rounded at most
/// twice, in different orders: the reference adds up to two terms per block one after the
/// other (`2·blocks` additions), an optimized kernel fewer (lanes, then a reduction), so the
/// worst case is about `(2.5·blocks + 8)·u·Σ|terms|` with the unit roundoff `u = ε/2`. The
/// budget is `(2·blocks + 16)·ε·Σ|terms|` (SmolLM2's 576 columns: 6.2e-6 of `Σ|terms|`).
pub fn error_budget(blocks: usize, abs_terms: f32) -> f32 {
    (2 * blocks + 16) as f32 * f32::EPSILON * abs_terms
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The branchless conversion equals `half`'s on every f16 (NaNs stay NaNs).
    #[test]
    fn f16_conversion_matches_half() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

    /// The quantized dot product stays within 8-bit rounding error of the exact one.
    #[test]
    fn q4_1_dot_is_close_to_the_dequantized_dot() {
        let cols = 128;
        let mut row = vec![0u8; Format::Q4_1.row_bytes(cols).expect("whole blocks")];
        for (i, b) in row.chunks_exact_mut(20).enumerate() {
            b[0..2].copy_from_slice(&f16::from_f32(0.01 * (i + 1) as f32).to_le_bytes());
            b[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
            for (j, q) in b[4..].iter_mut().enumerate() {
                *q = (j * 37 % 256) as u8;
            }
        }
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect();
        let mut w = vec![0f32; cols];
        Format::Q4_1.dequantize_row(&row, &mut w);
        let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        let mut xq = vec![Q8Block::default(); cols / BLOCK];
        quantize(&x, &mut xq);
        let got = dot_row(Format::Q4_1, &row, &xq);
        assert!(
            (got - exact).abs() < 0.02 * exact.abs().max(1.0),
            "{got} vs {exact}"
        );
    }

    /// The 5-bit blocks' fifth bits and offsets: the quantized dot stays within 8-bit
    /// rounding of the exact dot of the dequantized weights.
    #[test]
    fn q5_dots_are_close_to_the_dequantized_dot() {
        let cols = 128;
        let x = crate::kernels::near::activations(cols);
        let mut xq = vec![Q8Block::default(); cols / BLOCK];
        quantize(&x, &mut xq);
        for (format, scales) in [(Format::Q5_0, 2), (Format::Q5_1, 4)] {
            let bb = format.block_bytes();
            let mut row = vec![0u8; format.row_bytes(cols).expect("whole blocks")];
            for (i, b) in row.chunks_exact_mut(bb).enumerate() {
                b[0..2].copy_from_slice(&f16::from_f32(0.01 * (i + 1) as f32).to_le_bytes());
                if scales == 4 {
                    b[2..4].copy_from_slice(&f16::from_f32(-0.05).to_le_bytes());
                }
                for (j, q) in b[scales..].iter_mut().enumerate() {
                    *q = (j * 37 + i * 11) as u8;
                }
            }
            let got = dot_row(format, &row, &xq);
            crate::kernels::near::assert_near_dequantized(format, &row, &x, got);
            // The error bound the level kernels are held to covers the 5-bit terms too.
            assert!(abs_terms(format, &row, &xq) >= got.abs());
        }
    }
}
