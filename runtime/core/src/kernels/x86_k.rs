//! K-quant rows against `q8_K` activations on AVX2: the integer sums of a super-block with
//! byte multiply-adds (`vpmaddubsw`, then `vpmaddwd` by the sub-blocks' scales), the float
//! tail exactly as [`q8k::dot_row`] does it, so the results are bit-identical to the reference.

use core::arch::x86_64::*;

use super::q8k::{self, Q8KBlock};
use super::x86::hsum;
use super::{Matrix, Out};
use crate::quant::dequant::scale_min_k4;
use crate::quant::Format;

fn half_at(b: &[u8], at: usize) -> f32 {
    super::q8::f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// `Σ_j scale_j·(q·a)_j` and `Σ_j min_j·(Σa)_j` of one `q4_k`/`q5_k` super-block. Codes are
/// at most 31 and activations at least −127, so no i16 pair of `vpmaddubsw` saturates.
#[target_feature(enable = "avx2")]
fn k4_sums(format: Format, b: &[u8], q: &Q8KBlock) -> (i32, i32) {
    let (scales, qh, qs) = match format {
        Format::Q5K => (&b[4..16], Some(&b[16..48]), &b[48..176]),
        _ => (&b[4..16], None, &b[16..144]),
    };
    let mut acc = _mm256_setzero_si256();
    let mut mins = 0i32;
    let low = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(1);
    // SAFETY: every load reads 32 bytes inside `qs` (128), `qh` (32) or `q.qs` (256).
    unsafe {
        let high_bits = qh.map(|h| _mm256_loadu_si256(h.as_ptr().cast()));
        for pair in 0..4 {
            let packed = _mm256_loadu_si256(qs.as_ptr().add(32 * pair).cast());
            for half in 0..2 {
                let j = 2 * pair + half;
                let (sc, m) = scale_min_k4(j, scales);
                let mut codes = if half == 0 {
                    _mm256_and_si256(packed, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low)
                };
                if let Some(h) = high_bits {
                    // Bit `j` of each byte to 16: shift within 16-bit lanes, keep bit 0 of each byte.
                    let bit =
                        _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(j as i32)), one);
                    codes = _mm256_or_si256(codes, _mm256_slli_epi16::<4>(bit));
                }
                let a = _mm256_loadu_si256(q.qs.as_ptr().add(32 * j).cast());
                let pairs = _mm256_maddubs_epi16(codes, a);
                acc = _mm256_add_epi32(
                    acc,
                    _mm256_madd_epi16(pairs, _mm256_set1_epi16(i16::from(sc))),
                );
                mins += i32::from(m) * (i32::from(q.bsums[2 * j]) + i32::from(q.bsums[2 * j + 1]));
            }
        }
    }
    (hsum(acc), mins)
}

/// `Σ_j scale_j·(q·a)_j` of one `q6_k` super-block: codes biased to 0..64 for `vpmaddubsw`,
/// the bias taken back as `32·Σ_j scale_j·(Σa)_j` from the activations' sums of 16.
#[target_feature(enable = "avx2")]
fn k6_sum(b: &[u8], q: &Q8KBlock) -> i32 {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let low = _mm256_set1_epi8(0x0f);
    let three = _mm256_set1_epi8(3);
    let mut acc = _mm256_setzero_si256();
    // SAFETY: every load reads 32 bytes inside `ql` (128), `qh` (64) or `q.qs` (256).
    unsafe {
        for half in 0..2 {
            let h = _mm256_loadu_si256(qh.as_ptr().add(32 * half).cast());
            let l0 = _mm256_loadu_si256(ql.as_ptr().add(64 * half).cast());
            let l1 = _mm256_loadu_si256(ql.as_ptr().add(64 * half + 32).cast());
            for k in 0..4 {
                let l = if k % 2 == 0 { l0 } else { l1 };
                let nibble = if k < 2 {
                    _mm256_and_si256(l, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l), low)
                };
                let shift = _mm_cvtsi32_si128(2 * k as i32);
                let high = _mm256_and_si256(_mm256_srl_epi16(h, shift), three);
                let codes = _mm256_or_si256(nibble, _mm256_slli_epi16::<4>(high));
                let base = 128 * half + 32 * k;
                let a = _mm256_loadu_si256(q.qs.as_ptr().add(base).cast());
                let s = 8 * half + 2 * k;
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(i16::from(scales[s + 1] as i8)),
                    _mm_set1_epi16(i16::from(scales[s] as i8)),
                );
                acc = _mm256_add_epi32(
                    acc,
                    _mm256_madd_epi16(_mm256_maddubs_epi16(codes, a), scale),
                );
            }
        }
    }
    let bias: i32 = (0..16)
        .map(|j| i32::from(scales[j] as i8) * i32::from(q.bsums[j]))
        .sum();
    hsum(acc) - 32 * bias
}

/// [`q8k::dot_row`] on AVX2, with the same float arithmetic per super-block.
#[target_feature(enable = "avx2")]
fn dot_row(format: Format, row: &[u8], x: &[Q8KBlock]) -> f32 {
    let mut sum = 0f32;
    for (b, q) in row.chunks_exact(format.block_bytes()).zip(x) {
        sum += match format {
            Format::Q6K => half_at(b, 208) * q.d * k6_sum(b, q) as f32,
            _ => {
                let (dots, mins) = k4_sums(format, b, q);
                half_at(b, 0) * q.d * dots as f32 - half_at(b, 2) * q.d * mins as f32
            }
        };
    }
    sum
}

/// [`q8k::gemm`] on AVX2.
///
/// SAFETY: the caller has checked the CPU has AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn gemm_avx2(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    if !q8k::uses_q8k(w.format) {
        return q8k::gemm(w, rows, x, n, out);
    }
    // The closure shares this function's target features, so `dot_row` inlines into it.
    q8k::gemm_with(w, rows, x, n, out, |f, row, x| dot_row(f, row, x));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::SUPER_BLOCK;

    /// Random rows of each K-quant against random activations: AVX2 gives the reference's bits.
    #[test]
    fn avx2_k_quant_dots_equal_the_reference_bit_for_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        let cols = 1024;
        let mut row_seed = 11;
        for round in 0..50 {
            let x: Vec<f32> = (0..cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .map(|v| if round % 7 == 0 { v * 1e3 } else { v })
                .collect();
            let mut xq = vec![Q8KBlock::default(); cols / SUPER_BLOCK];
            q8k::quantize(&x, &mut xq);
            for format in [Format::Q4K, Format::Q5K, Format::Q6K] {
                let row = q8k::random_row(format, cols, &mut row_seed);
                let want = q8k::dot_row(format, &row, &xq);
                // SAFETY: AVX2 was detected above.
                let got = unsafe { dot_row(format, &row, &xq) };
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{} round {round}",
                    format.name()
                );
            }
        }
    }
}
