//! ggml's K-quant super-blocks of 256 values (`q4_k`, `q5_k`, `q6_k`), written with the
//! arithmetic of its reference quantizers (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c, the
//! path `llama-quantize` takes without an importance matrix), so that kiln's bytes are its bytes.
//!
//! Every expression keeps ggml's operand order and f32 rounding: ggml-quants.c is built into
//! ggml-base without `-march`, so x86-64 gcc has no FMA to contract `a*b + c` into, and Rust never
//! contracts. The search loops are ports, not reformulations, for that reason.

use half::f16;
use kiln_runtime::quant::SUPER_BLOCK;

use super::{half_bytes, RowError};

/// Values per `q4_k`/`q5_k` sub-block, each with its own 6-bit scale and minimum.
const SUB: usize = 32;

/// Values per `q6_k` sub-block, each with its own 8-bit scale.
const SUB6: usize = 16;

/// ggml's `nearest_int`: adding 1.5·2²³ leaves `x` rounded half to even in the low mantissa bits
/// (exact for |x| < 2²²; outside that range it returns what ggml's bit trick returns).
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// The candidate scales `make_qkx2_quants` tries: `(nmax + rmin + rdelta·k) / (max − min)` for
/// `k` in `0..=nstep`.
struct Search {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
}

/// Codes `0..=nmax` are 4 bits (q4_k): ggml's `make_qkx2_quants(32, 15, …, -1, 0.1, 20)`.
const Q4_K_SEARCH: Search = Search {
    nmax: 15,
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
};

/// Codes are 5 bits (q5_k): `make_qkx2_quants(32, 31, …, -0.5, 0.1, 15)`.
const Q5_K_SEARCH: Search = Search {
    nmax: 31,
    rmin: -0.5,
    rdelta: 0.1,
    nstep: 15,
};

/// ggml's `make_qkx2_quants` (squared error): `x ≈ scale·code − min` with codes in
/// `0..=nmax` written to `codes`, choosing among `s`'s candidate scales the one whose
/// least-squares fit has the smallest `weights`-weighted error. Returns `(scale, min)`, min ≥ 0.
fn make_qkx2_quants(x: &[f32], weights: &[f32], codes: &mut [u8], s: &Search) -> (f32, f32) {
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let nmax = s.nmax as f32;
    let iscale = nmax / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for ((&v, &w), code) in x.iter().zip(weights).zip(codes.iter_mut()) {
        *code = nearest_int(iscale * (v - min)).clamp(0, s.nmax) as u8;
        let diff = scale * f32::from(*code) + min - v;
        best_error += w * (diff * diff);
    }
    let mut aux = [0u8; SUB];
    for step in 0..=s.nstep {
        let iscale = (s.rmin + s.rdelta * step as f32 + nmax) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((&v, &w), a) in x.iter().zip(weights).zip(aux.iter_mut()) {
            let l = nearest_int(iscale * (v - min)).clamp(0, s.nmax);
            *a = l as u8;
            let l = l as f32;
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for ((&v, &w), &a) in x.iter().zip(weights).zip(&aux) {
                let diff = this_scale * f32::from(a) + this_min - v;
                error += w * (diff * diff);
            }
            if error < best_error {
                codes.copy_from_slice(&aux[..codes.len()]);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Scale and minimum codes of sub-block `j` from the 12 packed bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared first half of `q4_k` and `q5_k`: per sub-block scales and minimums, quantized
/// to 6 bits against the super-block's f16 `d` and `dmin`, and every value's code. Appends `d`,
/// `dmin` and the 12 packed scale bytes to `out`; returns the codes.
fn scaled_codes(
    x: &[f32],
    s: &Search,
    col: usize,
    out: &mut Vec<u8>,
) -> Result<[u8; SUPER_BLOCK], RowError> {
    let mut codes = [0u8; SUPER_BLOCK];
    let (mut scales, mut mins) = ([0f32; SUPER_BLOCK / SUB], [0f32; SUPER_BLOCK / SUB]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for (j, xs) in x.chunks_exact(SUB).enumerate() {
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / SUB as f32).sqrt();
        let weights: [f32; SUB] = std::array::from_fn(|l| av_x + xs[l].abs());
        let (scale, min) = make_qkx2_quants(xs, &weights, &mut codes[SUB * j..SUB * (j + 1)], s);
        (scales[j], mins[j]) = (scale, min);
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..SUPER_BLOCK / SUB {
        // ggml stores nearest_int's int in a uint8_t (modulo 256) before clamping to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = half_bytes(max_scale / 63.0, col)?;
    let dmin = half_bytes(max_min / 63.0, col)?;
    out.extend(d);
    out.extend(dmin);
    out.extend(packed);
    let (d, dmin) = (
        f16::from_le_bytes(d).to_f32(),
        f16::from_le_bytes(dmin).to_f32(),
    );
    for (j, (xs, codes)) in x
        .chunks_exact(SUB)
        .zip(codes.chunks_exact_mut(SUB))
        .enumerate()
    {
        let (sc, m) = scale_min_k4(j, &packed);
        let d = d * f32::from(sc);
        // A sub-block whose scale rounds to 0 keeps the codes of the search, as in ggml.
        if d == 0.0 {
            continue;
        }
        let dm = dmin * f32::from(m);
        for (&v, code) in xs.iter().zip(codes.iter_mut()) {
            *code = nearest_int((v + dm) / d).clamp(0, s.nmax) as u8;
        }
    }
    Ok(codes)
}

/// One `q4_k` super-block: f16 `d`, f16 `dmin`, 12 bytes of scales, then for each 64 values
/// 32 bytes whose low nibbles hold the first 32 codes and high nibbles the next 32.
pub(super) fn q4_k_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let codes = scaled_codes(x, &Q4_K_SEARCH, col, out)?;
    for pair in codes.chunks_exact(2 * SUB) {
        let (lo, hi) = pair.split_at(SUB);
        out.extend(lo.iter().zip(hi).map(|(&a, &b)| a | b << 4));
    }
    Ok(())
}

/// One `q5_k` super-block: as `q4_k`, with the fifth bits in 32 bytes before the nibbles (bit
/// `2·pair` of byte `l` for value `l` of 64-value pair `pair`, the next bit for value `l + 32`).
pub(super) fn q5_k_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let codes = scaled_codes(x, &Q5_K_SEARCH, col, out)?;
    let mut qh = [0u8; SUB];
    let mut ql = [0u8; SUPER_BLOCK / 2];
    for (pair, (c, ql)) in codes
        .chunks_exact(2 * SUB)
        .zip(ql.chunks_exact_mut(SUB))
        .enumerate()
    {
        let (lo, hi) = c.split_at(SUB);
        for l in 0..SUB {
            qh[l] |= (lo[l] >> 4) << (2 * pair) | (hi[l] >> 4) << (2 * pair + 1);
            ql[l] = (lo[l] & 0x0f) | (hi[l] & 0x0f) << 4;
        }
    }
    out.extend(qh);
    out.extend(ql);
    Ok(())
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights: symmetric codes
/// `l + nmax` (l in `-nmax..nmax`) written to `codes`, the scale among 19 candidates around
/// `-nmax / max` that maximizes the x²-weighted fit. Returns the scale (0 for an all-zero block).
fn make_qx_quants(x: &[f32], nmax: i32, codes: &mut [u8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    // ggml's GROUP_MAX_EPS: the block is all zeros.
    if amax < 1e-15 {
        codes.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let iscale = -(nmax as f32) / max;
    for (&v, code) in x.iter().zip(codes.iter_mut()) {
        *code = (level(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&k| k != 0) {
        let iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (&v, code) in x.iter().zip(codes.iter_mut()) {
                *code = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// One `q6_k` super-block: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed
/// 8-bit sub-block scales, then f16 `d`; `x = d · scale · (code − 32)`.
pub(super) fn q6_k_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let mut codes = [0u8; SUPER_BLOCK];
    let mut scales = [0f32; SUPER_BLOCK / SUB6];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for (ib, (xs, codes)) in x
        .chunks_exact(SUB6)
        .zip(codes.chunks_exact_mut(SUB6))
        .enumerate()
    {
        let scale = make_qx_quants(xs, 32, codes);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < 1e-15 {
        // An all-zero super-block is all-zero bytes (d = +0).
        out.extend([0u8; 210]);
        return Ok(());
    }
    let iscale = -128.0 / max_scale;
    let d = half_bytes(1.0 / iscale, col)?;
    // ggml clamps to 127 and stores the int in an int8_t (the low bound, -128, fits).
    let sub_scales: [i8; SUPER_BLOCK / SUB6] =
        std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    let d_f32 = f16::from_le_bytes(d).to_f32();
    for ((xs, codes), &sc) in x
        .chunks_exact(SUB6)
        .zip(codes.chunks_exact_mut(SUB6))
        .zip(&sub_scales)
    {
        let d = d_f32 * f32::from(sc);
        // A sub-block whose scale rounds to 0 keeps the codes of make_qx_quants, as in ggml.
        if d == 0.0 {
            continue;
        }
        for (&v, code) in xs.iter().zip(codes.iter_mut()) {
            *code = (nearest_int(v / d).clamp(-32, 31) + 32) as u8;
        }
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (half, c) in codes.chunks_exact(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * half..], &mut qh[32 * half..]);
        for l in 0..32 {
            let [q1, q2, q3, q4] = [c[l], c[l + 32], c[l + 64], c[l + 96]];
            ql[l] = (q1 & 0x0f) | (q3 & 0x0f) << 4;
            ql[l + 32] = (q2 & 0x0f) | (q4 & 0x0f) << 4;
            qh[l] = q1 >> 4 | (q2 >> 4) << 2 | (q3 >> 4) << 4 | (q4 >> 4) << 6;
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sub_scales.map(|s| s as u8));
    out.extend(d);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
            (-7.6, -8),
        ];
        for (x, want) in cases {
            assert_eq!(nearest_int(x), want, "{x}");
        }
    }
}
