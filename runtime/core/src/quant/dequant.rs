//! Rows of each storage format read back as f32, with ggml's arithmetic (`dequantize_row_*`):
//! the same products in the same order, so kiln reads a GGUF file's blocks as llama.cpp does.

use half::f16;

use super::{BLOCK, SUPER_BLOCK};

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

pub(super) fn f32_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

pub(super) fn f16_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
        *o = half(b);
    }
}

/// bfloat16 is the top half of an f32.
pub(super) fn bf16_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
    }
}

/// `x = d * q`.
pub(super) fn q8_0_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(34)) {
        let d = half(b);
        for (x, &q) in o.iter_mut().zip(&b[2..]) {
            *x = d * f32::from(q as i8);
        }
    }
}

/// `x = d * (q - 8)`; low nibbles hold values 0..16, high nibbles 16..32.
pub(super) fn q4_0_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(18)) {
        let d = half(b);
        let (lo, hi) = o.split_at_mut(BLOCK / 2);
        for (j, &q) in b[2..].iter().enumerate() {
            lo[j] = d * (f32::from(q & 0x0f) - 8.0);
            hi[j] = d * (f32::from(q >> 4) - 8.0);
        }
    }
}

/// `x = d * q + m`, nibble order as in `q4_0`.
pub(super) fn q4_1_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(20)) {
        let (d, m) = (half(b), half(&b[2..]));
        let (lo, hi) = o.split_at_mut(BLOCK / 2);
        for (j, &q) in b[4..].iter().enumerate() {
            lo[j] = d * f32::from(q & 0x0f) + m;
            hi[j] = d * f32::from(q >> 4) + m;
        }
    }
}

/// The 5-bit values of a `q5_0`/`q5_1` block: nibbles as in `q4_0`, the fifth bit of value `j`
/// in bit `j` of the little-endian `qh`.
fn five_bit(qh: u32, qs: &[u8], j: usize) -> (u8, u8) {
    let h0 = ((qh >> j) << 4) as u8 & 0x10;
    let h1 = (qh >> (j + 12)) as u8 & 0x10;
    ((qs[j] & 0x0f) | h0, (qs[j] >> 4) | h1)
}

/// `x = d * (q - 16)`.
pub(super) fn q5_0_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(22)) {
        let d = half(b);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..BLOCK / 2 {
            let (x0, x1) = five_bit(qh, &b[6..], j);
            o[j] = (i32::from(x0) - 16) as f32 * d;
            o[j + BLOCK / 2] = (i32::from(x1) - 16) as f32 * d;
        }
    }
}

/// `x = d * q + m`.
pub(super) fn q5_1_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(24)) {
        let (d, m) = (half(b), half(&b[2..]));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for j in 0..BLOCK / 2 {
            let (x0, x1) = five_bit(qh, &b[8..], j);
            o[j] = f32::from(x0) * d + m;
            o[j + BLOCK / 2] = f32::from(x1) * d + m;
        }
    }
}

/// Scale and minimum of sub-block `j` (of 8) from the 12 bytes of 6-bit codes of a `q4_k` or
/// `q5_k` super-block (ggml's `get_scale_min_k4`).
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sub-block `j` of 32 values: `x = d·scale_j · q − dmin·min_j`, the nibbles of 32 bytes, low
/// halves for an even `j` and high halves for the odd one after it.
pub(super) fn q4_k_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(SUPER_BLOCK).zip(row.chunks_exact(144)) {
        let (d, dmin) = (half(b), half(&b[2..]));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for (pair, (o, q)) in o.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let (sc, m) = scale_min_k4(2 * pair, scales);
            let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
            let (sc, m) = scale_min_k4(2 * pair + 1, scales);
            let (d2, m2) = (d * f32::from(sc), dmin * f32::from(m));
            let (lo, hi) = o.split_at_mut(32);
            for (l, &q) in q.iter().enumerate() {
                lo[l] = d1 * f32::from(q & 0x0f) - m1;
                hi[l] = d2 * f32::from(q >> 4) - m2;
            }
        }
    }
}

/// As `q4_k`, with a fifth bit per value: bit `2·pair` of `qh[l]` for the low nibble of byte
/// `l` of pair `pair`, the next bit for its high nibble.
pub(super) fn q5_k_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(SUPER_BLOCK).zip(row.chunks_exact(176)) {
        let (d, dmin) = (half(b), half(&b[2..]));
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for (pair, (o, ql)) in o.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
            let (sc, m) = scale_min_k4(2 * pair, scales);
            let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
            let (sc, m) = scale_min_k4(2 * pair + 1, scales);
            let (d2, m2) = (d * f32::from(sc), dmin * f32::from(m));
            let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
            let (lo, hi) = o.split_at_mut(32);
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                lo[l] = d1 * f32::from((ql[l] & 0x0f) + h1) - m1;
                hi[l] = d2 * f32::from((ql[l] >> 4) + h2) - m2;
            }
        }
    }
}

/// Halves of 128 values: `x = d · scale · (q − 32)` with 16 signed 8-bit scales of 16 values;
/// value `l + 32·k` of a half takes nibble `k / 2` of `ql` byte `l + 32·(k % 2)` and bit pair
/// `k` of `qh[l]`.
pub(super) fn q6_k_row(row: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(SUPER_BLOCK).zip(row.chunks_exact(210)) {
        let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
        let d = half(&b[208..]);
        for half_i in 0..2 {
            let o = &mut o[128 * half_i..128 * (half_i + 1)];
            let ql = &ql[64 * half_i..];
            let qh = &qh[32 * half_i..];
            let sc = &scales[8 * half_i..];
            for l in 0..32 {
                let is = l / 16;
                let h = qh[l];
                let q1 = i32::from((ql[l] & 0x0f) | ((h & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0f) | (((h >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((h >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32;
                let s = |k: usize| d * f32::from(sc[is + 2 * k] as i8);
                o[l] = s(0) * q1 as f32;
                o[l + 32] = s(1) * q2 as f32;
                o[l + 64] = s(2) * q3 as f32;
                o[l + 96] = s(3) * q4 as f32;
            }
        }
    }
}
