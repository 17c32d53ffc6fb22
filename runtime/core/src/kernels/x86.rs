//! x86-64 versions of the generic kernels: the float ones over [`lanes`] for AVX2 and AVX-512,
//! activation quantization for each, and the block dots of matrices of ggml rows on AVX2 (the
//! 5-bit formats' rows on every level).

use core::arch::x86_64::*;

use super::product::Product;
use super::q8::{self, BlockDot, Q8Block};
use super::{vnni, x16, Kernels, Level};
use crate::layout::Layout;
use crate::quant::BLOCK;

/// Integer block dots with AVX2 byte multiply-adds (`vpmaddubsw` + `vpmaddwd`). Only inlined
/// into functions compiled with AVX2 enabled and chosen after detecting it.
struct Avx2;

/// Σ of the eight i32 lanes.
#[inline(always)]
pub(super) fn hsum(v: __m256i) -> i32 {
    // SAFETY: only reached from the AVX2 and AVX-512 kernels, which run after AVX2 was detected.
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

    #[inline(always)]
    fn fifth(qh: &[u8], a: &[i8; BLOCK]) -> i32 {
        let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        // SAFETY: reads the 32 activations; AVX2 as in `hsum`.
        unsafe {
            let a = _mm256_and_si256(bit_bytes(bits), _mm256_loadu_si256(a.as_ptr().cast()));
            16 * hsum(madd(_mm256_set1_epi8(1), a))
        }
    }
}

/// Byte `v` is `0xff` where bit `v` of `bits` is set, 0 elsewhere (a 5-bit block's `qh`
/// spread over its 32 values).
///
/// SAFETY: the CPU has AVX2 (only inlined into functions compiled with it).
#[inline(always)]
pub(super) unsafe fn bit_bytes(bits: u32) -> __m256i {
    // SAFETY: register arithmetic, AVX2 by the contract.
    unsafe {
        // Byte `v` of the spread word is byte `v / 8` of `bits`; masked by bit `v % 8`, it
        // tells bit `v`.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
    }
}

/// [`q8::gemm`] one row and token at a time on the AVX2 block dots (ggml rows; other layouts
/// take the reference).
#[target_feature(enable = "avx2,fma")]
fn gemm_q8_avx2(p: Product<'_>) {
    match p.w.geometry.layout {
        Layout::Rows => q8::gemm_rows_with::<Avx2>(p),
        _ => q8::gemm(p),
    }
}

/// [`q8::quantize`] with AVX-512, bit-identical to it: the same scalar scale arithmetic, the
/// same products, and `roundf`'s half-away-from-zero rounding rebuilt from truncation (the
/// fraction `x − trunc(x)` is exact); NaN products become 0 as `as i8` makes them.
#[target_feature(enable = "avx512f,avx512bw,f16c,avx2,fma")]
fn quantize_avx512(x: &[f32], out: &mut [Q8Block]) {
    for (block, q) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        // SAFETY: `block` holds 32 floats (two 16-lane loads) and `q.qs` 32 bytes (two 16-byte
        // stores); AVX-512F/BW were detected before this table entry was installed.
        unsafe {
            let v = [
                _mm512_loadu_ps(block.as_ptr()),
                _mm512_loadu_ps(block.as_ptr().add(16)),
            ];
            let magnitude = _mm512_set1_epi32(0x7fff_ffff);
            let abs = |v: __m512| {
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), magnitude))
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(v[0]), abs(v[1])));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = _mm512_setzero_si512();
            for (h, &v) in v.iter().enumerate() {
                let p = _mm512_mul_ps(v, _mm512_set1_ps(id));
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
                let away =
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(abs(_mm512_sub_ps(p, t)), _mm512_set1_ps(0.5));
                let one = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_castps_si512(_mm512_set1_ps(1.0)),
                    _mm512_andnot_si512(magnitude, _mm512_castps_si512(p)),
                ));
                // Saturate as `as i8` does (a subnormal scale makes `id` infinite).
                let r = _mm512_min_ps(
                    _mm512_max_ps(_mm512_mask_add_ps(t, away, t, one), _mm512_set1_ps(-128.0)),
                    _mm512_set1_ps(127.0),
                );
                let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p);
                let i = _mm512_maskz_cvtps_epi32(ordered, r);
                sum = _mm512_add_epi32(sum, i);
                _mm_storeu_si128(
                    q.qs.as_mut_ptr().add(16 * h).cast(),
                    _mm512_cvtsepi32_epi8(i),
                );
            }
            q.d = f16_round(d);
            q.s = f16_round(_mm512_reduce_add_epi32(sum) as f32 * d);
        }
    }
}

/// [`q8::quantize`] with AVX2, bit-identical to it as [`quantize_avx512`] is.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_avx2(x: &[f32], out: &mut [Q8Block]) {
    for (block, q) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        // SAFETY: `block` holds 32 floats (four 8-lane loads) and `q.qs` 32 bytes (one 32-byte
        // store); AVX2, FMA and F16C were detected before this table entry was installed.
        unsafe {
            let v: [__m256; 4] = [
                _mm256_loadu_ps(block.as_ptr()),
                _mm256_loadu_ps(block.as_ptr().add(8)),
                _mm256_loadu_ps(block.as_ptr().add(16)),
                _mm256_loadu_ps(block.as_ptr().add(24)),
            ];
            let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut amax = _mm256_setzero_ps();
            for v in v {
                amax = _mm256_max_ps(amax, _mm256_and_ps(v, magnitude));
            }
            let m = _mm_max_ps(
                _mm256_castps256_ps128(amax),
                _mm256_extractf128_ps::<1>(amax),
            );
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut ints = [_mm256_setzero_si256(); 4];
            for (i, v) in v.iter().enumerate() {
                let p = _mm256_mul_ps(*v, _mm256_set1_ps(id));
                // Round half away from zero (as `roundf`): truncate, then step away when the
                // fraction (exact) is at least one half.
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
                let frac = _mm256_and_ps(_mm256_sub_ps(p, t), magnitude);
                let away = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
                let one = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_andnot_ps(magnitude, p));
                let r = _mm256_add_ps(t, _mm256_and_ps(away, one));
                // Saturate as `as i8` does; NaN products become 0 as it makes them.
                let r = _mm256_min_ps(
                    _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
                    _mm256_set1_ps(127.0),
                );
                let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(p, p);
                ints[i] = _mm256_cvtps_epi32(_mm256_and_ps(r, ordered));
            }
            // i32 → i16 → i8 with saturation (values already fit); the packs interleave the
            // 128-bit lanes, which the final permutation puts back in order.
            let w01 = _mm256_packs_epi32(ints[0], ints[1]);
            let w23 = _mm256_packs_epi32(ints[2], ints[3]);
            let bytes = _mm256_packs_epi16(w01, w23);
            let bytes =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.qs.as_mut_ptr().cast(), bytes);
            let sum = _mm256_add_epi32(
                _mm256_add_epi32(ints[0], ints[1]),
                _mm256_add_epi32(ints[2], ints[3]),
            );
            let s = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            let sum = _mm_cvtsi128_si32(s);
            q.d = f16_round(d);
            q.s = f16_round(sum as f32 * d);
        }
    }
}

/// Through f16 and back, rounding to nearest even as `half` does.
#[inline(always)]
fn f16_round(v: f32) -> f32 {
    // SAFETY: F16C is enabled on the functions this is inlined into, which run after detecting it.
    unsafe {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(v),
        )))
    }
}

/// The float kernels of one ISA over [`lanes`], each a function compiled for its features.
macro_rules! float_kernels {
    ($name:ident, $v:ty, $tokens:literal, $features:literal) => {
        mod $name {
            use super::super::lanes;
            use super::super::{KvRows, TILE_ROWS};

            #[target_feature(enable = $features)]
            pub fn dot(a: &[f32], b: &[f32]) -> f32 {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::dot::<$v, f32>(a, b) }
            }

            #[target_feature(enable = $features)]
            pub fn dot4(w: &[f32], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::dot4::<$v, f32, $tokens, 1>(w, x, out) }
            }

            #[target_feature(enable = $features)]
            pub fn dot4_f16(w: &[u16], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::dot4::<$v, u16, $tokens, 1>(w, x, out) }
            }

            #[target_feature(enable = $features)]
            pub fn scores(q: &[f32], k: KvRows<'_>, scale: f32, out: &mut [f32]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::scores_rows::<$v>(q, k, scale, out) }
            }

            #[target_feature(enable = $features)]
            pub fn mix(w: &[f32], v: KvRows<'_>, out: &mut [f32]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::mix_rows::<$v>(w, v, out) }
            }

            #[target_feature(enable = $features)]
            pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::rms_norm::<$v>(x, weight, eps, out) }
            }

            #[target_feature(enable = $features)]
            pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::swiglu::<$v>(gate, up, out) }
            }

            #[target_feature(enable = $features)]
            pub fn softmax(x: &mut [f32]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::softmax::<$v>(x) }
            }

            #[target_feature(enable = $features)]
            pub fn to_f16(x: &[f32], out: &mut [u16]) {
                // SAFETY: this function's features are those `lanes` needs.
                unsafe { lanes::to_f16::<$v>(x, out) }
            }
        }
    };
}

// Tokens per float tile: 4 rows × 3 tokens of sums, 3 activations and a weight fill AVX2's 16
// registers; 4 × 4 leave AVX-512's 32 room.
float_kernels!(f256, lanes::V256, 3, "avx2,fma,f16c");
float_kernels!(
    f512,
    lanes::V512,
    4,
    "avx512f,avx512bw,avx512vl,f16c,avx2,fma"
);

/// The table of an x86-64 `level` (`None` for other levels). The caller
/// has checked that the CPU has the level's features ([`Level::check`]).
pub fn table(level: Level) -> Option<Kernels> {
    // SAFETY (every closure below): the functions need the features of `level`, which the
    // caller checked this CPU has; each level's features include the levels below it.
    let avx2 = Kernels {
        level: Level::Avx2,
        name: "x86-64 avx2",
        dot: |a, b| unsafe { f256::dot(a, b) },
        dot4: |w, x, o| unsafe { f256::dot4(w, x, o) },
        dot4_f16: |w, x, o| unsafe { f256::dot4_f16(w, x, o) },
        gemm_q8: |p| unsafe { x16::gemm_avx2(p, |p| gemm_q8_avx2(p)) },
        quantize: |x, q| unsafe { quantize_avx2(x, q) },
        gemm_q8k: |w, r, x, n, o| unsafe { super::x86_k::gemm_avx2(w, r, x, n, o) },
        quantize_q8k: |x, q| unsafe { super::x86_k::quantize_avx2(x, q) },
        gemm_q5: |p| unsafe { x16::gemm_avx2(p, |p| gemm_q8_avx2(p)) },
        rms_norm: |x, w, e, o| unsafe { f256::rms_norm(x, w, e, o) },
        swiglu: |g, u, o| unsafe { f256::swiglu(g, u, o) },
        softmax: |x| unsafe { f256::softmax(x) },
        scores: |q, k, s, o| unsafe { f256::scores(q, k, s, o) },
        mix: |w, v, o| unsafe { f256::mix(w, v, o) },
        to_f16: |x, o| unsafe { f256::to_f16(x, o) },
    };
    let avx512 = || Kernels {
        level: Level::Avx512,
        name: "x86-64 avx512",
        dot: |a, b| unsafe { f512::dot(a, b) },
        dot4: |w, x, o| unsafe { f512::dot4(w, x, o) },
        dot4_f16: |w, x, o| unsafe { f512::dot4_f16(w, x, o) },
        rms_norm: |x, w, e, o| unsafe { f512::rms_norm(x, w, e, o) },
        swiglu: |g, u, o| unsafe { f512::swiglu(g, u, o) },
        softmax: |x| unsafe { f512::softmax(x) },
        quantize: |x, q| unsafe { quantize_avx512(x, q) },
        gemm_q8k: |w, r, x, n, o| unsafe { super::x86_k::gemm_avx512(w, r, x, n, o) },
        scores: |q, k, s, o| unsafe { f512::scores(q, k, s, o) },
        mix: |w, v, o| unsafe { f512::mix(w, v, o) },
        to_f16: |x, o| unsafe { f512::to_f16(x, o) },
        ..avx2
    };
    match level {
        Level::Avx2 => Some(avx2),
        Level::AvxVnni => Some(Kernels {
            level,
            name: "x86-64 avxvnni",
            gemm_q8: |p| unsafe { x16::gemm_avxvnni(p, |p| gemm_q8_avx2(p)) },
            gemm_q5: |p| unsafe { x16::gemm_avxvnni(p, |p| gemm_q8_avx2(p)) },
            gemm_q8k: |w, r, x, n, o| unsafe { super::x86_k::gemm_avxvnni(w, r, x, n, o) },
            ..avx2
        }),
        Level::Avx512 => Some(avx512()),
        Level::Avx512Vnni => Some(Kernels {
            level,
            name: "x86-64 avx512vnni",
            gemm_q8: |p| unsafe { x16::gemm_avx512vnni(p, |p| vnni::gemm(p)) },
            gemm_q5: |p| unsafe { x16::gemm_avx512vnni(p, |p| gemm_q8_avx2(p)) },
            gemm_q8k: |w, r, x, n, o| unsafe { super::x86_k::gemm_avx512vnni(w, r, x, n, o) },
            ..avx512()
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector `e^x` of both widths stays within 2 ulp of `libm::expf` where the result is
    /// normal, and saturates where it is not.
    #[test]
    fn vector_exp_is_within_two_ulp() {
        use super::super::lanes::{exp, Vf, V256, V512};
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn run512(x: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: 16 floats each way; AVX-512F was detected.
            unsafe { exp(V512::load(x.as_ptr())).store(out.as_mut_ptr()) };
            out
        }
        #[target_feature(enable = "avx2,fma")]
        fn run256(x: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: 2 × 8 floats each way; AVX2 was detected.
            unsafe {
                exp(V256::load(x.as_ptr())).store(out.as_mut_ptr());
                exp(V256::load(x.as_ptr().add(8))).store(out.as_mut_ptr().add(8));
            }
            out
        }
        type Run = fn(&[f32; 16]) -> [f32; 16];
        let mut runs: Vec<Run> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected.
            runs.push(|x| unsafe { run512(x) });
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 was detected.
            runs.push(|x| unsafe { run256(x) });
        }
        for run in runs {
            let mut x = -87.0f32;
            while x < 88.5 {
                let xs: [f32; 16] = core::array::from_fn(|i| x + i as f32 * 1.3e-3);
                for (g, &x) in run(&xs).iter().zip(&xs) {
                    let want = libm::expf(x);
                    let ulps = (g.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
                    assert!(ulps <= 2, "exp({x}) = {g}, libm {want}");
                }
                x += 0.0173;
            }
            let edges = run(&[
                100.0, -100.0, -200.0, 0.0, 1.0, -1.0, 88.7, -87.5, -95.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                0.0, 0.0,
            ]);
            assert_eq!(edges[0], f32::INFINITY);
            assert!(edges[1] < 1e-43 && edges[2] == 0.0);
            assert_eq!((edges[3], edges[4]), (1.0, core::f32::consts::E));
            // A subnormal result, as libm gives it within 2 ulp.
            let sub = (edges[8].to_bits() as i64 - libm::expf(-95.0).to_bits() as i64).abs();
            assert!(sub <= 2, "exp(-95) = {:e}", edges[8]);
        }
    }

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
            assert_eq!(Avx2::fifth(&w[..4], &a), q8::Scalar::fifth(&w[..4], &a));
        }
    }
}
