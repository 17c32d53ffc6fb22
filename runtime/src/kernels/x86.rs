//! x86-64 versions of the generic kernels, compiled for AVX2+FMA and for AVX-512.

use std::arch::x86_64::*;

use super::product::Product;
use super::q8::{self, BlockDot, Q8Block};
use super::{generic, vnni, x16, Kernels, KvRows, Level, TILE_ROWS};
use crate::layout::Layout;
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
    /// Through f16 and back, rounding to nearest even as `half` does.
    #[inline(always)]
    fn round_f16(v: f32) -> f32 {
        // SAFETY: F16C is enabled on the enclosing function, which runs after detecting it.
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                _mm_set_ss(v),
            )))
        }
    }
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
            q.d = round_f16(d);
            q.s = round_f16(_mm512_reduce_add_epi32(sum) as f32 * d);
        }
    }
}

/// The lanes of `x[at..]` still in bounds, at most 16.
#[inline(always)]
fn tail_mask(len: usize, at: usize) -> __mmask16 {
    let left = (len - at).min(16);
    ((1u32 << left) - 1) as __mmask16
}

/// `e^x` per lane: `2^n·p(r)` with `n = round(x·log₂e)`, `r = x − n·ln 2` (in two parts) and
/// Cephes' degree-7 polynomial for `expf`, within 2 ulp of `libm::expf`; saturates to +∞ above
/// 88.7 and to 0 far below −87.
#[inline(always)]
fn exp512(x: __m512) -> __m512 {
    // SAFETY: register arithmetic, only inlined into functions compiled for AVX-512F and
    // installed after detecting it.
    unsafe {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(88.8)),
            _mm512_set1_ps(-104.0),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(core::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_fmadd_ps(
            p,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(p, n)
    }
}

/// Values the AVX-512 float kernels read 16 at a time as f32: f32 itself, or f16 bits.
trait Lanes: Copy {
    /// The 16 values at `p` (those of `mask` only; the rest read as 0 and are not touched).
    ///
    /// SAFETY: AVX-512F/BW/VL and F16C are available, and the masked values at `p` exist.
    unsafe fn load(p: *const Self, mask: __mmask16) -> __m512;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: as the trait says.
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
}

impl Lanes for u16 {
    #[inline(always)]
    unsafe fn load(p: *const u16, mask: __mmask16) -> __m512 {
        // SAFETY: as the trait says; `vcvtph2ps` is exact.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

/// `Σ a·b` with four 16-lane accumulators and a tree reduction.
///
/// SAFETY: as [`Lanes::load`]; the caller inlines this into a function with those features.
#[inline(always)]
unsafe fn dot_lanes<T: Lanes>(a: &[f32], b: &[T]) -> f32 {
    let len = a.len().min(b.len());
    // SAFETY: every load is masked to `..len` of both slices; the features are the caller's.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= len {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = i + 16 * k;
                *acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(at)),
                    T::load(b.as_ptr().add(at), 0xffff),
                    *acc,
                );
            }
            i += 64;
        }
        while i < len {
            let m = tail_mask(len, i);
            acc[0] = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, a.as_ptr().add(i)),
                T::load(b.as_ptr().add(i), m),
                acc[0],
            );
            i += 16;
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(sum)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,avx2,fma")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: this function's features are those `dot_lanes` needs.
    unsafe { dot_lanes(a, b) }
}

/// [`super::scores`] for a head of `16·V` values: the query stays in `V` registers.
///
/// SAFETY: as [`Lanes::load`]; `k` holds `out.len()` rows of `16·V` values and `q` one.
#[inline(always)]
unsafe fn scores_lanes<T: Lanes, const V: usize>(q: &[f32], k: &[T], scale: f32, out: &mut [f32]) {
    // SAFETY: row `j < out.len()` of `k` and the query are in bounds by the contract above.
    unsafe {
        let qv: [__m512; V] = core::array::from_fn(|i| _mm512_loadu_ps(q.as_ptr().add(16 * i)));
        for (j, o) in out.iter_mut().enumerate() {
            let row = k.as_ptr().add(j * 16 * V);
            let mut acc = _mm512_mul_ps(qv[0], T::load(row, 0xffff));
            for (i, qv) in qv.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(*qv, T::load(row.add(16 * i), 0xffff), acc);
            }
            *o = _mm512_reduce_add_ps(acc) * scale;
        }
    }
}

/// [`super::mix`] for a head of `16·V` values: the sum stays in `V` registers.
///
/// SAFETY: as [`scores_lanes`], with `w.len()` rows and `out` `16·V` long.
#[inline(always)]
unsafe fn mix_lanes<T: Lanes, const V: usize>(w: &[f32], v: &[T], out: &mut [f32]) {
    // SAFETY: row `j < w.len()` of `v` and `out` are in bounds by the contract above.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); V];
        for (j, &wj) in w.iter().enumerate() {
            let (wv, row) = (_mm512_set1_ps(wj), v.as_ptr().add(j * 16 * V));
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(wv, T::load(row.add(16 * i), 0xffff), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), *acc);
        }
    }
}

/// Calls `$f::<T, V>` for head sizes `16·V`, `V` in 1..=8, else `$fallback`.
macro_rules! by_head_size {
    ($hd:expr, $f:ident, $t:ty, ($($arg:expr),*), $fallback:expr) => {
        match ($hd % 16, $hd / 16) {
            (0, 1) => $f::<$t, 1>($($arg),*),
            (0, 2) => $f::<$t, 2>($($arg),*),
            (0, 3) => $f::<$t, 3>($($arg),*),
            (0, 4) => $f::<$t, 4>($($arg),*),
            (0, 5) => $f::<$t, 5>($($arg),*),
            (0, 6) => $f::<$t, 6>($($arg),*),
            (0, 7) => $f::<$t, 7>($($arg),*),
            (0, 8) => $f::<$t, 8>($($arg),*),
            _ => $fallback,
        }
    };
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,avx2,fma")]
fn scores_avx512(q: &[f32], k: KvRows<'_>, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    assert!(
        k.values() >= out.len() * hd,
        "scores: {} keys of {hd}",
        out.len()
    );
    // SAFETY: the keys hold `out.len()` rows of `hd` (just checked); the features are this
    // function's.
    unsafe {
        match k {
            KvRows::F32(k) => by_head_size!(
                hd,
                scores_lanes,
                f32,
                (q, k, scale, out),
                super::scores(q, KvRows::F32(k), scale, out)
            ),
            KvRows::F16(k) => by_head_size!(
                hd,
                scores_lanes,
                u16,
                (q, k, scale, out),
                super::scores(q, KvRows::F16(k), scale, out)
            ),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,avx2,fma")]
fn mix_avx512(w: &[f32], v: KvRows<'_>, out: &mut [f32]) {
    let hd = out.len();
    assert!(
        v.values() >= w.len() * hd,
        "mix: {} values of {hd}",
        w.len()
    );
    // SAFETY: the values hold `w.len()` rows of `hd` (just checked); the features are this
    // function's.
    unsafe {
        match v {
            KvRows::F32(v) => by_head_size!(
                hd,
                mix_lanes,
                f32,
                (w, v, out),
                super::mix(w, KvRows::F32(v), out)
            ),
            KvRows::F16(v) => by_head_size!(
                hd,
                mix_lanes,
                u16,
                (w, v, out),
                super::mix(w, KvRows::F16(v), out)
            ),
        }
    }
}

/// [`super::rms_norm`] with the sum of squares in 16 lanes.
#[target_feature(enable = "avx512f,avx2,fma")]
fn rms_norm_avx512(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let len = x.len().min(weight.len()).min(out.len());
    // SAFETY: loads and stores are masked to `..len` of each slice; AVX-512F was detected.
    unsafe {
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < len {
            let v = _mm512_maskz_loadu_ps(tail_mask(len, i), x.as_ptr().add(i));
            acc = _mm512_fmadd_ps(v, v, acc);
            i += 16;
        }
        let mean_sq = _mm512_reduce_add_ps(acc) / x.len() as f32;
        let scale = _mm512_set1_ps(1.0 / (mean_sq + eps).sqrt());
        let mut i = 0;
        while i < len {
            let m = tail_mask(len, i);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            let w = _mm512_maskz_loadu_ps(m, weight.as_ptr().add(i));
            let o = _mm512_mul_ps(_mm512_mul_ps(v, scale), w);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, o);
            i += 16;
        }
    }
}

/// [`super::swiglu`] with a vector `e^x`.
#[target_feature(enable = "avx512f,avx2,fma")]
fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let len = gate.len().min(up.len()).min(out.len());
    // SAFETY: loads and stores are masked to `..len` of each slice; AVX-512F was detected.
    unsafe {
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < len {
            let m = tail_mask(len, i);
            let g = _mm512_maskz_loadu_ps(m, gate.as_ptr().add(i));
            let u = _mm512_maskz_loadu_ps(m, up.as_ptr().add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let o = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, o);
            i += 16;
        }
    }
}

/// [`super::softmax`] with a vector `e^x`.
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax_avx512(x: &mut [f32]) {
    let len = x.len();
    if len == 0 {
        return;
    }
    // SAFETY: loads and stores are masked to `..len`; AVX-512F was detected.
    unsafe {
        let p = x.as_mut_ptr();
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < len {
            let m = tail_mask(len, i);
            max = _mm512_mask_max_ps(max, m, max, _mm512_maskz_loadu_ps(m, p.add(i)));
            i += 16;
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < len {
            let m = tail_mask(len, i);
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), max));
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            _mm512_mask_storeu_ps(p.add(i), m, e);
            i += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        let mut i = 0;
        while i < len {
            let m = tail_mask(len, i);
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), inv);
            _mm512_mask_storeu_ps(p.add(i), m, v);
            i += 16;
        }
    }
}

/// f32 to f16 bits, rounding to nearest even like `half` (`vcvtps2ph`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,avx2,fma")]
fn to_f16_avx512(x: &[f32], out: &mut [u16]) {
    let len = x.len().min(out.len());
    // SAFETY: loads and stores are masked to `..len` of both slices; AVX-512F/BW/VL were detected.
    unsafe {
        let mut i = 0;
        while i < len {
            let m = tail_mask(len, i);
            let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm512_maskz_loadu_ps(
                m,
                x.as_ptr().add(i),
            ));
            _mm256_mask_storeu_epi16(out.as_mut_ptr().add(i).cast(), m, h);
            i += 16;
        }
    }
}

#[target_feature(enable = "avx512f,avx2,fma")]
fn dot4_avx512(w: &[f32], x: &[f32]) -> [f32; TILE_ROWS] {
    generic::dot4(w, x)
}

/// The table of an x86-64 `level` over `base`'s entries (`None` for other levels). The caller
/// has checked that the CPU has the level's features ([`Level::check`]).
pub fn table(level: Level, base: &Kernels) -> Option<Kernels> {
    // SAFETY (every closure below): the functions need the features of `level`, which the
    // caller checked this CPU has; each level's features include the levels below it.
    let avx2 = Kernels {
        level: Level::Avx2,
        name: "x86-64 avx2",
        dot: |a, b| unsafe { dot_avx2(a, b) },
        dot4: |w, x| unsafe { dot4_avx2(w, x) },
        gemm_q8: |p| unsafe { x16::gemm_avx2(p, |p| gemm_q8_avx2(p)) },
        ..*base
    };
    let avx512 = || Kernels {
        level: Level::Avx512,
        name: "x86-64 avx512",
        dot: |a, b| unsafe { dot_avx512(a, b) },
        dot4: |w, x| unsafe { dot4_avx512(w, x) },
        rms_norm: |x, w, e, o| unsafe { rms_norm_avx512(x, w, e, o) },
        swiglu: |g, u, o| unsafe { swiglu_avx512(g, u, o) },
        softmax: |x| unsafe { softmax_avx512(x) },
        quantize: |x, q| unsafe { quantize_avx512(x, q) },
        scores: |q, k, s, o| unsafe { scores_avx512(q, k, s, o) },
        mix: |w, v, o| unsafe { mix_avx512(w, v, o) },
        to_f16: |x, o| unsafe { to_f16_avx512(x, o) },
        ..avx2
    };
    match level {
        Level::Avx2 => Some(avx2),
        Level::AvxVnni => Some(Kernels {
            level,
            name: "x86-64 avxvnni",
            gemm_q8: |p| unsafe { x16::gemm_avxvnni(p, |p| gemm_q8_avx2(p)) },
            ..avx2
        }),
        Level::Avx512 => Some(avx512()),
        Level::Avx512Vnni => Some(Kernels {
            level,
            name: "x86-64 avx512vnni",
            gemm_q8: |p| unsafe { x16::gemm_avx512vnni(p, |p| vnni::gemm(p)) },
            ..avx512()
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector `e^x` stays within 2 ulp of `libm::expf` where the result is normal, and
    /// saturates where it is not.
    #[test]
    fn exp512_is_within_two_ulp() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn run(x: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: 16 floats each way; AVX-512F was detected.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp512(_mm512_loadu_ps(x.as_ptr()))) };
            out
        }
        let mut x = -87.0f32;
        while x < 88.5 {
            let xs: [f32; 16] = core::array::from_fn(|i| x + i as f32 * 1.3e-3);
            // SAFETY: AVX-512F was detected above.
            let got = unsafe { run(&xs) };
            for (g, &x) in got.iter().zip(&xs) {
                let want = libm::expf(x);
                let ulps = (g.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
                assert!(ulps <= 2, "exp({x}) = {g}, libm {want}");
            }
            x += 0.0173;
        }
        // SAFETY: AVX-512F was detected above.
        let edges = unsafe {
            run(&[
                100.0, -100.0, -200.0, 0.0, 1.0, -1.0, 88.7, -87.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                0.0, 0.0,
            ])
        };
        assert_eq!(edges[0], f32::INFINITY);
        assert!(edges[1] < 1e-43 && edges[2] == 0.0);
        assert_eq!((edges[3], edges[4]), (1.0, core::f32::consts::E));
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
        }
    }
}
