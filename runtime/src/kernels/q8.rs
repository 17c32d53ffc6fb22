//! Block-quantized weights against 8-bit activations, with llama.cpp's arithmetic: activations
//! are quantized per block of 32 (`q8_0`, plus the block sum for `q4_1`'s `q8_1`), scales
//! rounded to f16, integer dot products per block, f32 accumulation across blocks.

use half::f16;

use crate::quant::{Format, BLOCK};

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

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Whether `format` multiplies against [`Q8Block`] activations.
pub fn uses_q8(format: Format) -> bool {
    matches!(format, Format::Q8_0 | Format::Q4_0 | Format::Q4_1)
}

/// Σ a·b over one block, in integers (written so compilers turn it into vector multiply-adds).
#[inline(always)]
fn block_dot(a: &[i8; BLOCK], b: &[i8; BLOCK]) -> i32 {
    let mut acc = 0i32;
    for j in 0..BLOCK {
        acc += i32::from(a[j]) * i32::from(b[j]);
    }
    acc
}

/// The 32 nibbles of a 4-bit block in value order, minus `offset`.
#[inline(always)]
fn unpack_nibbles(qs: &[u8], offset: i8) -> [i8; BLOCK] {
    let mut out = [0i8; BLOCK];
    for j in 0..BLOCK / 2 {
        out[j] = (qs[j] & 0x0f) as i8 - offset;
        out[j + BLOCK / 2] = (qs[j] >> 4) as i8 - offset;
    }
    out
}

/// Dot product of one stored weight row with quantized activations.
#[inline(always)]
pub fn dot_row(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    match format {
        Format::Q8_0 => {
            for (b, q) in row.chunks_exact(34).zip(x) {
                let mut w = [0i8; BLOCK];
                for (o, &v) in w.iter_mut().zip(&b[2..]) {
                    *o = v as i8;
                }
                sum += block_dot(&w, &q.qs) as f32 * (half_at(b, 0) * q.d);
            }
        }
        Format::Q4_0 => {
            for (b, q) in row.chunks_exact(18).zip(x) {
                let acc = block_dot(&unpack_nibbles(&b[2..], 8), &q.qs);
                sum += acc as f32 * (half_at(b, 0) * q.d);
            }
        }
        Format::Q4_1 => {
            for (b, q) in row.chunks_exact(20).zip(x) {
                let acc = block_dot(&unpack_nibbles(&b[4..], 0), &q.qs);
                sum += half_at(b, 0) * q.d * acc as f32 + half_at(b, 2) * q.s;
            }
        }
        // Float weights never reach here (they take the f32 path); zero keeps this total.
        Format::F32 | Format::F16 => {}
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
