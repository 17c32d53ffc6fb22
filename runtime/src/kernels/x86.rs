//! x86-64 versions of the generic kernels, compiled for AVX2+FMA and for AVX-512.

use std::arch::x86_64::*;

use super::q8::{self, BlockDot, Q8Block};
use super::{generic, Kernels, TILE_ROWS};
use crate::quant::Format;
use crate::quant::BLOCK;

#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    generic::dot(a, b)
}

#[target_feature(enable = "avx2,fma")]
fn dot4_avx2(w: &[f32], x: &[f32]) -> [f32; TILE_ROWS] {
    generic::dot4(w, x)
}

/// Integer block dots with AVX2 byte multiply-adds (`vpmaddubsw` + `vpmaddwd`). Only inlined
/// into functions compiled with AVX2 enabled and chosen after detecting it.
struct Avx2;

/// Σ of the eight i32 lanes.
#[inline(always)]
fn hsum(v: __m256i) -> i32 {
    // SAFETY: only reached from `dot_q8_avx2`/`dot_q8_avx512`, which run after AVX2 was detected.
    unsafe {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

/// Pairs of u8·i8 products summed to i16, then to i32 lanes. No pair can saturate i16 here:
/// nibbles are at most 15 and the unsigned side of a `q8_0` product at most 128.
#[inline(always)]
fn madd(u: __m256i, s: __m256i) -> __m256i {
    // SAFETY: as in `hsum`.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
}

impl BlockDot for Avx2 {
    #[inline(always)]
    fn signed(w: &[u8], a: &[i8; BLOCK]) -> i32 {
        debug_assert!(w.len() >= BLOCK);
        // SAFETY: both loads read 32 bytes that exist (`w` holds a block's 32 quants, `a` is 32
        // long); AVX2 is available as in `hsum`.
        unsafe {
            let w = _mm256_loadu_si256(w.as_ptr().cast());
            let a = _mm256_loadu_si256(a.as_ptr().cast());
            // |w|·(a·sign w) = w·a, with the unsigned operand vpmaddubsw needs.
            hsum(madd(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)))
        }
    }

    #[inline(always)]
    fn nibbles(qs: &[u8], a: &[i8; BLOCK]) -> i32 {
        debug_assert!(qs.len() >= BLOCK / 2);
        // SAFETY: reads the block's 16 packed bytes and the 32 activations; AVX2 as in `hsum`.
        unsafe {
            let packed = _mm_loadu_si128(qs.as_ptr().cast());
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(packed, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), mask);
            let w = _mm256_set_m128i(hi, lo);
            hsum(madd(w, _mm256_loadu_si256(a.as_ptr().cast())))
        }
    }

    #[inline(always)]
    fn sum(a: &[i8; BLOCK]) -> i32 {
        // SAFETY: reads the 32 activations; AVX2 as in `hsum`.
        unsafe {
            hsum(madd(
                _mm256_set1_epi8(1),
                _mm256_loadu_si256(a.as_ptr().cast()),
            ))
        }
    }
}

#[target_feature(enable = "avx2,fma")]
fn dot_q8_avx2(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    q8::dot_row_with::<Avx2>(format, row, x)
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn dot_q8_avx512(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    q8::dot_row_with::<Avx2>(format, row, x)
}

#[target_feature(enable = "avx512f,avx2,fma")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    generic::dot(a, b)
}

#[target_feature(enable = "avx512f,avx2,fma")]
fn dot4_avx512(w: &[f32], x: &[f32]) -> [f32; TILE_ROWS] {
    generic::dot4(w, x)
}

/// Replaces table entries with the widest versions this CPU runs.
pub fn overwrite(k: &mut Kernels) {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: these functions only need avx512f/avx512bw/avx2/fma, which were just detected.
        *k = Kernels {
            name: "x86-64 avx512",
            dot: |a, b| unsafe { dot_avx512(a, b) },
            dot4: |w, x| unsafe { dot4_avx512(w, x) },
            dot_q8: |f, r, x| unsafe { dot_q8_avx512(f, r, x) },
        };
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: these functions only need avx2/fma, which were just detected.
        *k = Kernels {
            name: "x86-64 avx2",
            dot: |a, b| unsafe { dot_avx2(a, b) },
            dot4: |w, x| unsafe { dot4_avx2(w, x) },
            dot_q8: |f, r, x| unsafe { dot_q8_avx2(f, r, x) },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 block dots equal the portable ones exactly, over the full value ranges.
    #[test]
    fn avx2_block_dots_equal_the_portable_ones() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for round in 0..2000 {
            let mut a = [0i8; BLOCK];
            let mut w = [0u8; BLOCK];
            for j in 0..BLOCK {
                // Extremes first, then random bytes; i8::MIN appears in weights but never in
                // activations, whose quantizer clamps to ±127.
                a[j] = if round == 0 {
                    127
                } else {
                    (byte() as i8).max(-127)
                };
                w[j] = if round == 0 { 0x80 } else { byte() };
            }
            assert_eq!(Avx2::signed(&w, &a), q8::Scalar::signed(&w, &a));
            assert_eq!(
                Avx2::nibbles(&w[..BLOCK / 2], &a),
                q8::Scalar::nibbles(&w[..BLOCK / 2], &a)
            );
            assert_eq!(Avx2::sum(&a), q8::Scalar::sum(&a));
        }
    }
}
