//! The float kernels written once over a vector of f32 lanes: AVX-512's 16 (masked tails),
//! AVX2's 8 (masked loads and stores from AVX) and NEON's 4 (tails through a buffer). Each is
//! inlined into a function compiled for its ISA (`x86.rs`, `arm.rs`) and installed only after
//! detecting it.
//!
//! The results differ from the reference kernels only in the order of float sums (and a vector
//! `e^x` within 2 ulp of `libm::expf`), within the budgets of [`super::budget`].

use super::{KvRows, TILE_ROWS};

#[cfg(target_arch = "aarch64")]
pub(super) use neon::{widen_f16, widen_f16_bits, V128};
#[cfg(target_arch = "x86_64")]
pub(super) use x86::{V256, V512};

/// One vector of f32 lanes and the operations the kernels use on it.
///
/// SAFETY (every method): the CPU has the ISA's features, and memory operands are valid for
/// the lanes they touch (a masked operation touches only its mask's lanes).
pub(super) trait Vf: Copy {
    /// Lanes.
    const N: usize;
    /// Which lanes a masked load or store touches.
    type Mask: Copy;

    unsafe fn splat(v: f32) -> Self;
    /// The first `len < N` lanes.
    unsafe fn mask(len: usize) -> Self::Mask;
    unsafe fn load(p: *const f32) -> Self;
    /// The masked lanes at `p`, zero elsewhere.
    unsafe fn load_masked(p: *const f32, m: Self::Mask) -> Self;
    /// `N` f16 values at `p`, as f32 (exact).
    unsafe fn load_f16(p: *const u16) -> Self;
    unsafe fn load_f16_masked(p: *const u16, m: Self::Mask, len: usize) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn store_masked(self, p: *mut f32, m: Self::Mask);
    /// The lanes as f16 bits, rounded to nearest even (as `half`), at `p` (`len` of them).
    unsafe fn store_f16(self, p: *mut u16, len: usize);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    /// `self·a + b`.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    /// Rounded to the nearest integer, ties to even.
    unsafe fn round(self) -> Self;
    /// `self · 2^n` for integer-valued `n` in [-150, 128], subnormal results included.
    unsafe fn scale2(self, n: Self) -> Self;
    unsafe fn sum(self) -> f32;
    unsafe fn hmax(self) -> f32;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::Vf;

    #[derive(Clone, Copy)]
    pub struct V512(__m512);

    impl Vf for V512 {
        const N: usize = 16;
        type Mask = __mmask16;

        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn mask(len: usize) -> __mmask16 {
            ((1u32 << len) - 1) as __mmask16
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, m: __mmask16) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_maskz_loadu_ps(m, p)) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn load_f16_masked(p: *const u16, m: __mmask16, _len: usize) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.cast()))) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the trait's contract.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, m: __mmask16) {
            // SAFETY: the trait's contract.
            unsafe { _mm512_mask_storeu_ps(p, m, self.0) }
        }
        #[inline(always)]
        unsafe fn store_f16(self, p: *mut u16, len: usize) {
            // SAFETY: the trait's contract.
            unsafe {
                let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0);
                _mm256_mask_storeu_epi16(p.cast(), Self::mask_or_all(len), h);
            }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_fmadd_ps(self.0, a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            // SAFETY: the trait's contract.
            unsafe {
                V512(_mm512_roundscale_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(self.0))
            }
        }
        #[inline(always)]
        unsafe fn scale2(self, n: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V512(_mm512_scalef_ps(self.0, n.0)) }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            // SAFETY: the trait's contract.
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            // SAFETY: the trait's contract.
            unsafe { _mm512_reduce_max_ps(self.0) }
        }
    }

    impl V512 {
        /// The first `len` lanes, all of them from 16 on.
        #[inline(always)]
        fn mask_or_all(len: usize) -> __mmask16 {
            if len >= 16 {
                0xffff
            } else {
                ((1u32 << len) - 1) as __mmask16
            }
        }
    }

    #[derive(Clone, Copy)]
    pub struct V256(__m256);

    impl Vf for V256 {
        const N: usize = 8;
        type Mask = __m256i;

        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn mask(len: usize) -> __m256i {
            // SAFETY: register arithmetic (AVX2 by the contract).
            unsafe {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lanes)
            }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, m: __m256i) -> Self {
            // SAFETY: the trait's contract; `vmaskmovps` does not touch masked-off lanes.
            unsafe { V256(_mm256_maskload_ps(p, m)) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_cvtph_ps(_mm_loadu_si128(p.cast()))) }
        }
        #[inline(always)]
        unsafe fn load_f16_masked(p: *const u16, _m: __m256i, len: usize) -> Self {
            // There is no 16-bit masked load before AVX-512: the tail goes through a buffer.
            let mut h = [0u16; 8];
            // SAFETY: `len < 8` values at `p` exist by the contract; `h` holds 8.
            unsafe {
                core::ptr::copy_nonoverlapping(p, h.as_mut_ptr(), len);
                V256(_mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast())))
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the trait's contract.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, m: __m256i) {
            // SAFETY: the trait's contract; `vmaskmovps` does not touch masked-off lanes.
            unsafe { _mm256_maskstore_ps(p, m, self.0) }
        }
        #[inline(always)]
        unsafe fn store_f16(self, p: *mut u16, len: usize) {
            // SAFETY: the trait's contract: `len.min(8)` values at `p`.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(self.0);
                if len >= 8 {
                    _mm_storeu_si128(p.cast(), h);
                } else {
                    let mut out = [0u16; 8];
                    _mm_storeu_si128(out.as_mut_ptr().cast(), h);
                    core::ptr::copy_nonoverlapping(out.as_ptr(), p, len);
                }
            }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_div_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_fmadd_ps(self.0, a.0, b.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_max_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V256(_mm256_min_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            // SAFETY: the trait's contract.
            unsafe {
                V256(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(self.0))
            }
        }
        #[inline(always)]
        unsafe fn scale2(self, n: Self) -> Self {
            // 2^n in two normal factors 2^(n - h) and 2^h (h = ⌊n/2⌋), so that subnormal
            // results round once, at the second product, as `vscalefps` rounds them.
            // SAFETY: register arithmetic (AVX2 by the contract).
            unsafe {
                let n = _mm256_cvtps_epi32(n.0);
                let h = _mm256_srai_epi32::<1>(n);
                let bias = _mm256_set1_epi32(127);
                let first = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                    _mm256_sub_epi32(n, h),
                    bias,
                )));
                let second =
                    _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(h, bias)));
                V256(_mm256_mul_ps(_mm256_mul_ps(self.0, first), second))
            }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            // SAFETY: register arithmetic (AVX by the contract).
            unsafe {
                let s = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            // SAFETY: register arithmetic (AVX by the contract).
            unsafe {
                let s = _mm_max_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;

    use super::Vf;

    #[derive(Clone, Copy)]
    pub struct V128(float32x4_t);

    /// Four f16 at `p` as f32: `fcvtl` (ARMv8.0) widens each exactly.
    ///
    /// SAFETY: `p` points at four f16 values.
    #[inline(always)]
    pub unsafe fn widen_f16(p: *const u16) -> float32x4_t {
        // SAFETY: reads the 8 bytes at `p` straight into the vector register (`vld1_u16` needs
        // no alignment beyond 2); the rest is register arithmetic.
        unsafe {
            let v: float32x4_t;
            core::arch::asm!(
                "fcvtl {v:v}.4s, {h:v}.4h",
                h = in(vreg) vld1_u16(p),
                v = out(vreg) v,
                options(pure, nomem, nostack, preserves_flags),
            );
            v
        }
    }

    /// One f16 (its bits) as f32 with the scalar `fcvt`.
    #[inline(always)]
    pub fn widen_f16_bits(bits: u16) -> f32 {
        let out: f32;
        // SAFETY: register arithmetic only (ARMv8.0).
        unsafe {
            core::arch::asm!(
                "fmov {h:s}, {b:w}",
                "fcvt {o:s}, {h:h}",
                b = in(reg) u32::from(bits),
                h = out(vreg) _,
                o = out(vreg) out,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        out
    }

    /// NEON has no masked loads or stores: tails go through a 4-lane buffer.
    impl Vf for V128 {
        const N: usize = 4;
        type Mask = usize;

        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: NEON is part of every aarch64 CPU.
            unsafe { V128(vdupq_n_f32(v)) }
        }
        #[inline(always)]
        unsafe fn mask(len: usize) -> usize {
            len
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the trait's contract.
            unsafe { V128(vld1q_f32(p)) }
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, len: usize) -> Self {
            let mut b = [0f32; 4];
            // SAFETY: the trait's contract: `len < 4` values at `p`.
            unsafe {
                core::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), len);
                V128(vld1q_f32(b.as_ptr()))
            }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            // SAFETY: the trait's contract: four f16 at `p`.
            unsafe { V128(widen_f16(p)) }
        }
        #[inline(always)]
        unsafe fn load_f16_masked(p: *const u16, _m: usize, len: usize) -> Self {
            let mut b = [0u16; 4];
            // SAFETY: the trait's contract: `len < 4` values at `p`; `b` holds four.
            unsafe {
                core::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), len);
                Self::load_f16(b.as_ptr())
            }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the trait's contract.
            unsafe { vst1q_f32(p, self.0) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, len: usize) {
            let mut b = [0f32; 4];
            // SAFETY: the trait's contract: `len < 4` values at `p`.
            unsafe {
                vst1q_f32(b.as_mut_ptr(), self.0);
                core::ptr::copy_nonoverlapping(b.as_ptr(), p, len);
            }
        }
        #[inline(always)]
        unsafe fn store_f16(self, p: *mut u16, len: usize) {
            // SAFETY: the trait's contract: `len.min(4)` values at `p`; `fcvtn` rounds to
            // nearest even (the default FPCR mode), as `half` does.
            unsafe {
                let bits: u64;
                core::arch::asm!(
                    "fcvtn {h:v}.4h, {v:v}.4s",
                    "fmov {b}, {h:d}",
                    v = in(vreg) self.0,
                    h = out(vreg) _,
                    b = out(reg) bits,
                    options(pure, nomem, nostack, preserves_flags),
                );
                let b = bits.to_le_bytes();
                let h = [0, 1, 2, 3].map(|i| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]));
                core::ptr::copy_nonoverlapping(h.as_ptr(), p, len.min(4));
            }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            // SAFETY: register arithmetic.
            unsafe { V128(vaddq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            // SAFETY: register arithmetic.
            unsafe { V128(vsubq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            // SAFETY: register arithmetic.
            unsafe { V128(vmulq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            // SAFETY: register arithmetic.
            unsafe { V128(vdivq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: register arithmetic: `b + self·a`, fused.
            unsafe { V128(vfmaq_f32(b.0, self.0, a.0)) }
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            // SAFETY: register arithmetic.
            unsafe { V128(vmaxq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            // SAFETY: register arithmetic.
            unsafe { V128(vminq_f32(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            // SAFETY: register arithmetic (`frintn`: to nearest, ties to even).
            unsafe { V128(vrndnq_f32(self.0)) }
        }
        #[inline(always)]
        unsafe fn scale2(self, n: Self) -> Self {
            // 2^n in two normal factors, as on AVX2 (see there).
            // SAFETY: register arithmetic.
            unsafe {
                let n = vcvtq_s32_f32(n.0);
                let h = vshrq_n_s32::<1>(n);
                let bias = vdupq_n_s32(127);
                let first =
                    vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(vsubq_s32(n, h), bias)));
                let second = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(h, bias)));
                V128(vmulq_f32(vmulq_f32(self.0, first), second))
            }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            // SAFETY: register arithmetic.
            unsafe { vaddvq_f32(self.0) }
        }
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            // SAFETY: register arithmetic.
            unsafe { vmaxvq_f32(self.0) }
        }
    }
}

/// Values the kernels read as f32 lanes: f32 itself, or f16 bits (the KV cache).
pub(super) trait Elem: Copy {
    /// SAFETY: as [`Vf`]'s.
    unsafe fn load<V: Vf>(p: *const Self) -> V;
    /// The first `len < N` values; SAFETY: as [`Vf`]'s.
    unsafe fn load_part<V: Vf>(p: *const Self, len: usize) -> V;
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<V: Vf>(p: *const f32) -> V {
        // SAFETY: passed on.
        unsafe { V::load(p) }
    }
    #[inline(always)]
    unsafe fn load_part<V: Vf>(p: *const f32, len: usize) -> V {
        // SAFETY: passed on.
        unsafe { V::load_masked(p, V::mask(len)) }
    }
}

impl Elem for u16 {
    #[inline(always)]
    unsafe fn load<V: Vf>(p: *const u16) -> V {
        // SAFETY: passed on.
        unsafe { V::load_f16(p) }
    }
    #[inline(always)]
    unsafe fn load_part<V: Vf>(p: *const u16, len: usize) -> V {
        // SAFETY: passed on.
        unsafe { V::load_f16_masked(p, V::mask(len), len) }
    }
}

/// `e^x` per lane: `2^n·p(r)` with `n = round(x·log₂e)`, `r = x − n·ln 2` (in two parts) and
/// Cephes' degree-7 polynomial for `expf`, within 2 ulp of `libm::expf`; saturates to +∞ above
/// 88.7 and to 0 far below −87.
///
/// SAFETY: as [`Vf`]'s.
#[inline(always)]
pub(super) unsafe fn exp<V: Vf>(x: V) -> V {
    // SAFETY: register arithmetic.
    unsafe {
        let x = x.min(V::splat(88.8)).max(V::splat(-104.0));
        let n = x.mul(V::splat(core::f32::consts::LOG2_E)).round();
        // x − n·ln 2 in two fused steps (ln 2 = 0.693359375 − 2.12194440e-4).
        let r = n.fma(V::splat(-0.693_359_4), x);
        let r = n.fma(V::splat(2.121_944_4e-4), r);
        let mut p = V::splat(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = p.fma(r, V::splat(c));
        }
        let p = p.fma(r.mul(r), r.add(V::splat(1.0)));
        p.scale2(n)
    }
}

/// `Σ a·b` with four accumulators and a tree reduction.
///
/// SAFETY: as [`Vf`]'s; the caller inlines this into a function with those features.
#[inline(always)]
pub(super) unsafe fn dot<V: Vf, T: Elem>(a: &[f32], b: &[T]) -> f32 {
    let len = a.len().min(b.len());
    // SAFETY: full loads stay below `len`, the tail's partial ones cover `len % N`.
    unsafe {
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [V::splat(0.0); 4];
        let mut i = 0;
        while i + 4 * V::N <= len {
            for (k, acc) in acc.iter_mut().enumerate() {
                let at = i + k * V::N;
                *acc = V::load(pa.add(at)).fma(T::load::<V>(pb.add(at)), *acc);
            }
            i += 4 * V::N;
        }
        while i + V::N <= len {
            acc[0] = V::load(pa.add(i)).fma(T::load::<V>(pb.add(i)), acc[0]);
            i += V::N;
        }
        if i < len {
            let left = len - i;
            let x = f32::load_part::<V>(pa.add(i), left);
            acc[0] = x.fma(T::load_part::<V>(pb.add(i), left), acc[0]);
        }
        acc[0].add(acc[1]).add(acc[2].add(acc[3])).sum()
    }
}

/// [`super::Kernels::dot4`]: four rows of float weights `w` (f32, or f16 bits widened as
/// they load), `k = w.len() / 4` values each, against each of the `out.len()` tokens of `x`:
/// `out[t][r] = Σᵢ w[r·k + i]·x[t·k + i]`. `T` tokens at a time keep `4·T·U` sums in
/// registers, so each weight vector is loaded once per `T` tokens and each activation vector
/// once per four rows; `U` vectors per sum give it `U·N` lanes of partial sums (at least 8,
/// [`super::budget::float_product`]).
///
/// SAFETY: as [`Vf`]'s; the caller inlines this into a function with those features.
#[inline(always)]
pub(super) unsafe fn dot4<V: Vf, W: Elem, const T: usize, const U: usize>(
    w: &[W],
    x: &[f32],
    out: &mut [[f32; TILE_ROWS]],
) {
    let k = w.len() / TILE_ROWS;
    let n = out.len();
    assert!(
        w.len() == TILE_ROWS * k && x.len() >= n * k,
        "dot4: {} weights and {} activations for {n} tokens",
        w.len(),
        x.len()
    );
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut t = 0;
    // SAFETY: each tile reads rows `0..4` of `k` weights and tokens `t..t + T (or 1) ≤ n` of
    // `k` activations (checked above).
    unsafe {
        while t + T <= n {
            out[t..t + T].copy_from_slice(&dot4_tile::<V, W, T, U>(pw, px.add(t * k), k));
            t += T;
        }
        while t < n {
            out[t] = dot4_tile::<V, W, 1, U>(pw, px.add(t * k), k)[0];
            t += 1;
        }
    }
}

/// One tile of [`dot4`]: four rows at `pw` against `T` tokens at `px`, `k` values each.
///
/// SAFETY: as [`Vf`]'s, and `pw` holds `4·k` values, `px` `T·k`.
#[inline(always)]
unsafe fn dot4_tile<V: Vf, W: Elem, const T: usize, const U: usize>(
    pw: *const W,
    px: *const f32,
    k: usize,
) -> [[f32; TILE_ROWS]; T] {
    // SAFETY: full loads stay below `k` in every row and token, the tail's partial ones cover
    // the rest (the caller's contract).
    unsafe {
        let mut acc = [[[V::splat(0.0); U]; T]; TILE_ROWS];
        let step = U * V::N;
        let mut i = 0;
        while i + step <= k {
            for u in 0..U {
                let at = i + u * V::N;
                let xs: [V; T] = core::array::from_fn(|t| V::load(px.add(t * k + at)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let wv = W::load::<V>(pw.add(r * k + at));
                    for (a, xv) in acc.iter_mut().zip(xs) {
                        a[u] = wv.fma(xv, a[u]);
                    }
                }
            }
            i += step;
        }
        while i < k {
            let len = (k - i).min(V::N);
            let xs: [V; T] = core::array::from_fn(|t| {
                let p = px.add(t * k + i);
                if len == V::N {
                    V::load(p)
                } else {
                    f32::load_part::<V>(p, len)
                }
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = pw.add(r * k + i);
                let wv = if len == V::N {
                    W::load::<V>(p)
                } else {
                    W::load_part::<V>(p, len)
                };
                for (a, xv) in acc.iter_mut().zip(xs) {
                    a[0] = wv.fma(xv, a[0]);
                }
            }
            i += len;
        }
        core::array::from_fn(|t| {
            core::array::from_fn(|r| {
                let sums = &acc[r][t];
                sums[1..].iter().fold(sums[0], |s, &v| s.add(v)).sum()
            })
        })
    }
}

/// Calls `$f::<V, T, R>` for head sizes `N·R`, `R` in 1..=8, 10, 12 or 16, else `$fallback`.
macro_rules! by_head_size {
    ($hd:expr, $f:ident, $t:ty, ($($arg:expr),*), $fallback:expr) => {
        match ($hd % V::N, $hd / V::N) {
            (0, 1) => $f::<V, $t, 1>($($arg),*),
            (0, 2) => $f::<V, $t, 2>($($arg),*),
            (0, 3) => $f::<V, $t, 3>($($arg),*),
            (0, 4) => $f::<V, $t, 4>($($arg),*),
            (0, 5) => $f::<V, $t, 5>($($arg),*),
            (0, 6) => $f::<V, $t, 6>($($arg),*),
            (0, 7) => $f::<V, $t, 7>($($arg),*),
            (0, 8) => $f::<V, $t, 8>($($arg),*),
            (0, 10) => $f::<V, $t, 10>($($arg),*),
            (0, 12) => $f::<V, $t, 12>($($arg),*),
            (0, 16) => $f::<V, $t, 16>($($arg),*),
            _ => $fallback,
        }
    };
}

/// [`super::scores`]: heads of a whole number of registers keep the query in them, others
/// take the reference.
///
/// SAFETY: as [`Vf`]'s.
#[inline(always)]
pub(super) unsafe fn scores_rows<V: Vf>(q: &[f32], k: KvRows<'_>, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    assert!(
        k.values() >= out.len() * hd,
        "scores: {} keys of {hd}",
        out.len()
    );
    // SAFETY: the keys hold `out.len()` rows of `hd` (just checked).
    unsafe {
        match k {
            KvRows::F32(k) => by_head_size!(
                hd,
                scores,
                f32,
                (q, k, scale, out),
                super::scores(q, KvRows::F32(k), scale, out)
            ),
            KvRows::F16(k) => by_head_size!(
                hd,
                scores,
                u16,
                (q, k, scale, out),
                super::scores(q, KvRows::F16(k), scale, out)
            ),
        }
    }
}

/// [`super::mix`]: heads of a whole number of registers keep the sum in them, others take the
/// reference.
///
/// SAFETY: as [`Vf`]'s.
#[inline(always)]
pub(super) unsafe fn mix_rows<V: Vf>(w: &[f32], v: KvRows<'_>, out: &mut [f32]) {
    let hd = out.len();
    assert!(
        v.values() >= w.len() * hd,
        "mix: {} values of {hd}",
        w.len()
    );
    // SAFETY: the values hold `w.len()` rows of `hd` (just checked).
    unsafe {
        match v {
            KvRows::F32(v) => by_head_size!(
                hd,
                mix,
                f32,
                (w, v, out),
                super::mix(w, KvRows::F32(v), out)
            ),
            KvRows::F16(v) => by_head_size!(
                hd,
                mix,
                u16,
                (w, v, out),
                super::mix(w, KvRows::F16(v), out)
            ),
        }
    }
}

/// Scores of a head of `N·R` values: the query stays in `R` registers.
///
/// SAFETY: as [`Vf`]'s; `k` holds `out.len()` rows of `N·R` values and `q` one.
#[inline(always)]
unsafe fn scores<V: Vf, T: Elem, const R: usize>(q: &[f32], k: &[T], scale: f32, out: &mut [f32]) {
    // SAFETY: row `j < out.len()` of `k` and the query are in bounds by the contract.
    unsafe {
        let mut qv = [V::splat(0.0); R];
        for (i, qv) in qv.iter_mut().enumerate() {
            *qv = V::load(q.as_ptr().add(V::N * i));
        }
        for (j, o) in out.iter_mut().enumerate() {
            let row = k.as_ptr().add(j * V::N * R);
            let mut acc = qv[0].mul(T::load::<V>(row));
            for (i, qv) in qv.iter().enumerate().skip(1) {
                acc = qv.fma(T::load::<V>(row.add(V::N * i)), acc);
            }
            *o = acc.sum() * scale;
        }
    }
}

/// The weighted sum of a head of `N·R` values: the sum stays in `R` registers.
///
/// SAFETY: as [`scores`], with `w.len()` rows and `out` `N·R` long.
#[inline(always)]
unsafe fn mix<V: Vf, T: Elem, const R: usize>(w: &[f32], v: &[T], out: &mut [f32]) {
    // SAFETY: row `j < w.len()` of `v` and `out` are in bounds by the contract.
    unsafe {
        let mut acc = [V::splat(0.0); R];
        for (j, &wj) in w.iter().enumerate() {
            let (wv, row) = (V::splat(wj), v.as_ptr().add(j * V::N * R));
            for (i, acc) in acc.iter_mut().enumerate() {
                *acc = wv.fma(T::load::<V>(row.add(V::N * i)), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            acc.store(out.as_mut_ptr().add(V::N * i));
        }
    }
}

/// [`super::rms_norm`] with the sum of squares in `N` lanes.
///
/// SAFETY: as [`Vf`]'s.
#[inline(always)]
pub(super) unsafe fn rms_norm<V: Vf>(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let len = x.len().min(weight.len()).min(out.len());
    // SAFETY: full loads and stores stay below `len`, masked ones cover the tail.
    unsafe {
        let mut acc = V::splat(0.0);
        let mut i = 0;
        while i < len {
            let v = part::<V>(x.as_ptr(), i, len);
            acc = v.fma(v, acc);
            i += V::N;
        }
        let mean_sq = acc.sum() / x.len() as f32;
        let scale = V::splat(1.0 / libm::sqrtf(mean_sq + eps));
        let mut i = 0;
        while i < len {
            let o =
                part::<V>(x.as_ptr(), i, len)
                    .mul(scale)
                    .mul(part::<V>(weight.as_ptr(), i, len));
            put::<V>(o, out.as_mut_ptr(), i, len);
            i += V::N;
        }
    }
}

/// The `N` values at `p + i` (those below `len`, zero past it).
///
/// SAFETY: as [`Vf`]'s, for `p[..len]`.
#[inline(always)]
unsafe fn part<V: Vf>(p: *const f32, i: usize, len: usize) -> V {
    // SAFETY: full below `len`, else masked to it.
    unsafe {
        if i + V::N <= len {
            V::load(p.add(i))
        } else {
            V::load_masked(p.add(i), V::mask(len - i))
        }
    }
}

/// Stores `v` at `p + i`, the lanes below `len` only.
///
/// SAFETY: as [`Vf`]'s, for `p[..len]`.
#[inline(always)]
unsafe fn put<V: Vf>(v: V, p: *mut f32, i: usize, len: usize) {
    // SAFETY: full below `len`, else masked to it.
    unsafe {
        if i + V::N <= len {
            v.store(p.add(i))
        } else {
            v.store_masked(p.add(i), V::mask(len - i))
        }
    }
}

/// [`super::swiglu`] with a vector `e^x`.
///
/// SAFETY: as [`Vf`]'s.
#[inline(always)]
pub(super) unsafe fn swiglu<V: Vf>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let len = gate.len().min(up.len()).min(out.len());
    // SAFETY: as in `rms_norm`.
    unsafe {
        let one = V::splat(1.0);
        let mut i = 0;
        while i < len {
            let g = part::<V>(gate.as_ptr(), i, len);
            let u = part::<V>(up.as_ptr(), i, len);
            let e = exp(V::splat(0.0).sub(g));
            put::<V>(g.div(one.add(e)).mul(u), out.as_mut_ptr(), i, len);
            i += V::N;
        }
    }
}

/// [`super::softmax`] with a vector `e^x`.
///
/// SAFETY: as [`Vf`]'s.
#[inline(always)]
pub(super) unsafe fn softmax<V: Vf>(x: &mut [f32]) {
    let len = x.len();
    if len == 0 {
        return;
    }
    // SAFETY: as in `rms_norm`; tails read as 0 are kept out of the max and the sum.
    unsafe {
        let p = x.as_mut_ptr();
        let mut max = V::splat(f32::NEG_INFINITY);
        let mut i = 0;
        while i + V::N <= len {
            max = max.max(V::load(p.add(i)));
            i += V::N;
        }
        let mut m = max.hmax();
        for j in i..len {
            m = m.max(*p.add(j));
        }
        let max = V::splat(m);
        let mut sum = V::splat(0.0);
        let mut tail = 0f32;
        let mut i = 0;
        while i < len {
            let e = exp(part::<V>(p, i, len).sub(max));
            if i + V::N <= len {
                sum = sum.add(e);
                e.store(p.add(i));
            } else {
                put::<V>(e, p, i, len);
                tail = (i..len).map(|j| *p.add(j)).sum();
            }
            i += V::N;
        }
        let inv = V::splat(1.0 / (sum.sum() + tail));
        let mut i = 0;
        while i < len {
            put::<V>(part::<V>(p, i, len).mul(inv), p, i, len);
            i += V::N;
        }
    }
}

/// f32 to f16 bits, rounding to nearest even like `half`.
///
/// SAFETY: as [`Vf`]'s.
#[inline(always)]
pub(super) unsafe fn to_f16<V: Vf>(x: &[f32], out: &mut [u16]) {
    let len = x.len().min(out.len());
    // SAFETY: loads and stores stay below `len`.
    unsafe {
        let mut i = 0;
        while i < len {
            part::<V>(x.as_ptr(), i, len).store_f16(out.as_mut_ptr().add(i), len - i);
            i += V::N;
        }
    }
}
