//! K-quant weights against `q8_K` activations on x86-64, bit-identical to [`q8k::gemm`], and
//! the AVX2 `q8_K` quantizer. Four rows are computed together, one super-block at a time: their
//! codes are unpacked once into a stack buffer with the rows interleaved in 16-byte runs (row
//! `r` in 128-bit lane `r`, as AVX-512 holds all four and AVX2 two) — from the 4×16 layout the
//! compiler packs `q4_k`/`q6_k` in (a few vector operations per line), or from ggml's rows —
//! and their scales into i16 vectors of the same shape; then each token's 16 activations of a run are broadcast to every lane,
//! multiplied by `vpmaddubsw` (unsigned codes × signed activations) and scaled and summed by
//! `vpmaddwd` (`vpdpwssd` with VNNI), so one accumulator per token holds the four rows and the
//! integer sums stay exact. The float tail is the reference's, one lane per row, each token's
//! partial sums kept in the output between super-blocks. One token (decode) reuses nothing it
//! could unpack: it multiplies the 4×16 layout's lines straight from memory, split into codes
//! in registers, each row's partial sums kept in a register between super-blocks.

use core::arch::x86_64::*;

use super::q8k::{self, Q8KBlock};
use super::x86::hsum;
use super::{Matrix, Out, TILE_ROWS};
use crate::layout::{Geometry, Layout, GROUP};
use crate::quant::{Format, SUPER_BLOCK};

/// The formats, as const parameters.
const K4: u8 = 0;
const K5: u8 = 1;
const K6: u8 = 2;

/// Values in a run (one row's share of a 64-byte line of the buffer).
const RUN: usize = 16;
/// Runs in a super-block.
const RUNS: usize = SUPER_BLOCK / RUN;

/// Tokens computed together.
const T: usize = 4;

/// Bytes ahead of the current super-block that the interleaved kernel prefetches: decoding
/// streams every weight once per token, faster than the hardware prefetchers alone fetch.
/// Chosen by timing `kiln bench` decode on the 1B shape's Q4_K_M (Zen 5, one thread): 2 KiB
/// gave 21 tokens/s, 4 KiB 19–20, 8 KiB 25–26, 12 KiB 28–29, 16 KiB 22–27.
const PREFETCH: usize = 12288;

/// 64 bytes: one 16-byte run per row.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Four rows' super-block, unpacked.
struct Unpacked {
    /// Run `k` of every row: codes `16k..16k + 16` (0..32, or 0..64 for `q6_k`).
    codes: [Line; RUNS],
    /// The i16 scale of run `k`'s values, eight times per row.
    scales: [Line; RUNS],
    /// Per row, 8 i16 that multiply the activations' sums: the mins of `q4_k`/`q5_k` (against
    /// pairs of sums of 16), or `q6_k`'s first 8 scales (against sums 0..8) …
    corr: Line,
    /// … and `q6_k`'s last 8 scales (against sums 8..16).
    corr_hi: Line,
    d: __m128,
    dmin: __m128,
}

/// One vector width's steps.
///
/// SAFETY (every method): the CPU has the ISA's features; pointers are valid for the bytes
/// the method's doc names.
trait Isa {
    type V: Copy;
    /// Registers per line (rows per register: `4 / PARTS`).
    const PARTS: usize;
    unsafe fn zero() -> Self::V;
    /// Part `h` of the line at `p`.
    unsafe fn part(p: &Line, h: usize) -> Self::V;
    /// The 16 bytes at `p` in every row's lane.
    unsafe fn broadcast(p: *const u8) -> Self::V;
    /// Part `h` of the 64 bytes at `p` (unaligned).
    unsafe fn load(p: *const u8, h: usize) -> Self::V;
    /// Byte products `w·a` (unsigned codes, signed activations), summed in i16 pairs.
    unsafe fn products(w: Self::V, a: Self::V) -> Self::V;
    /// `acc +` the i16 pairs of `p` times the i16 scales of their lanes in `s`, summed to i32.
    unsafe fn scaled(acc: Self::V, p: Self::V, s: Self::V) -> Self::V;
    /// `acc + Σ` of pairs of `w·a` byte products times the i16 scale of their lanes in `s`.
    #[inline(always)]
    unsafe fn dot(acc: Self::V, w: Self::V, a: Self::V, s: Self::V) -> Self::V {
        // SAFETY: the trait's contract. Codes are at most 63 and activations at least −127, so
        // no i16 pair of `vpmaddubsw` saturates.
        unsafe { Self::scaled(acc, Self::products(w, a), s) }
    }
    /// Each 128-bit lane's i16 number `j`, in all of its lane.
    unsafe fn pick(v: Self::V, j: usize) -> Self::V;
    /// The bytes of rows `2h, 2h + 1` (`v[h]`: 8 each) as i16 (sign-extended when `SIGNED`),
    /// one row a 128-bit lane, in parts.
    unsafe fn widen<const SIGNED: bool>(v: [__m128i; 2]) -> [Self::V; 2];
    unsafe fn splat(b: i8) -> Self::V;
    unsafe fn and(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn or(a: Self::V, b: Self::V) -> Self::V;
    /// Pairs of i16 summed (sums that fit in i16).
    unsafe fn add16(a: Self::V, b: Self::V) -> Self::V;
    /// Shifted right (`n > 0`) or left (`n < 0`) by `|n|` (2 or 4) bits within i16 lanes.
    unsafe fn shift(v: Self::V, n: i32) -> Self::V;
    /// Pairs of i16 products, summed to i32.
    unsafe fn madd(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn times32(a: Self::V) -> Self::V;
    /// The sums of each row's lanes, row `r` in lane `r` (the parts of one line in order).
    unsafe fn rows(v: &[Self::V]) -> __m128i;
    /// [`Isa::rows`] of `a` in lanes 0..4 and of `b` in lanes 4..8, at once.
    unsafe fn rows2(a: &[Self::V], b: &[Self::V]) -> __m256i;
}

/// AVX2 (two rows a register), with AVX-VNNI's `vpdpwssd` when `VNNI`.
struct Avx2<const VNNI: bool>;

impl<const VNNI: bool> Isa for Avx2<VNNI> {
    type V = __m256i;
    const PARTS: usize = 2;

    #[inline(always)]
    unsafe fn zero() -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_setzero_si256() }
    }

    #[inline(always)]
    unsafe fn part(p: &Line, h: usize) -> __m256i {
        // SAFETY: the trait's contract; 32 bytes inside the line.
        unsafe { _mm256_load_si256(p.0.as_ptr().add(32 * h).cast()) }
    }

    #[inline(always)]
    unsafe fn broadcast(p: *const u8) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load(p: *const u8, h: usize) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_loadu_si256(p.add(32 * h).cast()) }
    }

    #[inline(always)]
    unsafe fn products(w: __m256i, a: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_maddubs_epi16(w, a) }
    }

    #[inline(always)]
    unsafe fn scaled(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the trait's contract (AVX-VNNI when `VNNI`).
        unsafe {
            if VNNI {
                _mm256_dpwssd_avx_epi32(acc, p, s)
            } else {
                _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
            }
        }
    }

    #[inline(always)]
    unsafe fn pick(v: __m256i, j: usize) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_shuffle_epi8(v, _mm256_set1_epi16(pick_bytes(j))) }
    }

    #[inline(always)]
    unsafe fn widen<const SIGNED: bool>(v: [__m128i; 2]) -> [__m256i; 2] {
        // SAFETY: the trait's contract.
        unsafe {
            v.map(|v| {
                if SIGNED {
                    _mm256_cvtepi8_epi16(v)
                } else {
                    _mm256_cvtepu8_epi16(v)
                }
            })
        }
    }

    #[inline(always)]
    unsafe fn splat(b: i8) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_set1_epi8(b) }
    }

    #[inline(always)]
    unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_and_si256(a, b) }
    }

    #[inline(always)]
    unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_or_si256(a, b) }
    }

    #[inline(always)]
    unsafe fn add16(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_add_epi16(a, b) }
    }

    #[inline(always)]
    unsafe fn shift(v: __m256i, n: i32) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe {
            match n {
                2 => _mm256_srli_epi16::<2>(v),
                4 => _mm256_srli_epi16::<4>(v),
                -2 => _mm256_slli_epi16::<2>(v),
                _ => _mm256_slli_epi16::<4>(v),
            }
        }
    }

    #[inline(always)]
    unsafe fn madd(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_madd_epi16(a, b) }
    }

    #[inline(always)]
    unsafe fn sub(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_sub_epi32(a, b) }
    }

    #[inline(always)]
    unsafe fn add(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_add_epi32(a, b) }
    }

    #[inline(always)]
    unsafe fn times32(a: __m256i) -> __m256i {
        // SAFETY: the trait's contract.
        unsafe { _mm256_slli_epi32::<5>(a) }
    }

    #[inline(always)]
    unsafe fn rows(v: &[__m256i]) -> __m128i {
        // SAFETY: the trait's contract. `[r0, r1]` and `[r2, r3]`, four lanes each: two
        // rounds of pair sums leave `[r0, r2, ·, · | r1, r3, ·, ·]`.
        unsafe {
            let h = _mm256_hadd_epi32(v[0], v[1]);
            let h = _mm256_hadd_epi32(h, h);
            _mm_unpacklo_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
        }
    }

    #[inline(always)]
    unsafe fn rows2(a: &[__m256i], b: &[__m256i]) -> __m256i {
        // SAFETY: the trait's contract. Three rounds of pair sums leave `[a0, a2, b0, b2 |
        // a1, a3, b1, b3]`.
        unsafe {
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(b[0], b[1]));
            _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
        }
    }
}

/// AVX-512 BW (four rows a register), with VNNI's `vpdpwssd` when `VNNI`.
struct Avx512<const VNNI: bool>;

impl<const VNNI: bool> Isa for Avx512<VNNI> {
    type V = __m512i;
    const PARTS: usize = 1;

    #[inline(always)]
    unsafe fn zero() -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_setzero_si512() }
    }

    #[inline(always)]
    unsafe fn part(p: &Line, _h: usize) -> __m512i {
        // SAFETY: the trait's contract; the line is 64 aligned bytes.
        unsafe { _mm512_load_si512(p.0.as_ptr().cast()) }
    }

    #[inline(always)]
    unsafe fn broadcast(p: *const u8) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_broadcast_i32x4(_mm_loadu_si128(p.cast())) }
    }

    #[inline(always)]
    unsafe fn load(p: *const u8, _h: usize) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_loadu_si512(p.cast()) }
    }

    #[inline(always)]
    unsafe fn products(w: __m512i, a: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_maddubs_epi16(w, a) }
    }

    #[inline(always)]
    unsafe fn scaled(acc: __m512i, p: __m512i, s: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe {
            if VNNI {
                _mm512_dpwssd_epi32(acc, p, s)
            } else {
                _mm512_add_epi32(acc, _mm512_madd_epi16(p, s))
            }
        }
    }

    #[inline(always)]
    unsafe fn pick(v: __m512i, j: usize) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_shuffle_epi8(v, _mm512_set1_epi16(pick_bytes(j))) }
    }

    #[inline(always)]
    unsafe fn widen<const SIGNED: bool>(v: [__m128i; 2]) -> [__m512i; 2] {
        // SAFETY: the trait's contract.
        unsafe {
            let rows = _mm256_set_m128i(v[1], v[0]);
            let wide = if SIGNED {
                _mm512_cvtepi8_epi16(rows)
            } else {
                _mm512_cvtepu8_epi16(rows)
            };
            [wide, wide]
        }
    }

    #[inline(always)]
    unsafe fn splat(b: i8) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_set1_epi8(b) }
    }

    #[inline(always)]
    unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_and_si512(a, b) }
    }

    #[inline(always)]
    unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_or_si512(a, b) }
    }

    #[inline(always)]
    unsafe fn add16(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_add_epi16(a, b) }
    }

    #[inline(always)]
    unsafe fn shift(v: __m512i, n: i32) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe {
            match n {
                2 => _mm512_srli_epi16::<2>(v),
                4 => _mm512_srli_epi16::<4>(v),
                -2 => _mm512_slli_epi16::<2>(v),
                _ => _mm512_slli_epi16::<4>(v),
            }
        }
    }

    #[inline(always)]
    unsafe fn madd(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_madd_epi16(a, b) }
    }

    #[inline(always)]
    unsafe fn sub(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_sub_epi32(a, b) }
    }

    #[inline(always)]
    unsafe fn add(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_add_epi32(a, b) }
    }

    #[inline(always)]
    unsafe fn times32(a: __m512i) -> __m512i {
        // SAFETY: the trait's contract.
        unsafe { _mm512_slli_epi32::<5>(a) }
    }

    #[inline(always)]
    unsafe fn rows(v: &[__m512i]) -> __m128i {
        // SAFETY: the trait's contract. Sums within each 128-bit lane, then lane `r`'s first
        // i32 to position `r`.
        unsafe {
            let s = _mm512_add_epi32(v[0], _mm512_shuffle_epi32::<0b01_00_11_10>(v[0]));
            let s = _mm512_add_epi32(s, _mm512_shuffle_epi32::<0b10_11_00_01>(s));
            let first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
            _mm512_castsi512_si128(_mm512_permutexvar_epi32(first, s))
        }
    }

    #[inline(always)]
    unsafe fn rows2(a: &[__m512i], b: &[__m512i]) -> __m256i {
        // SAFETY: the trait's contract. Lane `r` sums to `[a_r, a_r, b_r, b_r]`, then each
        // lane's `a_r` and `b_r` to positions `r` and `4 + r`.
        unsafe {
            let (a, b) = (a[0], b[0]);
            let s = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
            let s = _mm512_add_epi32(s, _mm512_shuffle_epi32::<0b10_11_00_01>(s));
            let pick = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
            _mm512_castsi512_si256(_mm512_permutexvar_epi32(pick, s))
        }
    }
}

/// The 8 scales and the 8 mins of a `q4_k`/`q5_k` super-block (byte `j` is sub-block `j`'s),
/// from its 12 packed bytes (`scale_min_k4` for all eight at once).
#[inline(always)]
fn k4_scales_mins(p: &[u8]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let sc = u64::from(u0 & low6) | u64::from((u2 & low4) | ((u0 >> 6) & top2) << 4) << 32;
    let m = u64::from(u1 & low6) | u64::from(((u2 >> 4) & low4) | ((u1 >> 6) & top2) << 4) << 32;
    (sc, m)
}

/// The 8 scales and the 8 mins of each of a `q4_k` group's four rows, rows 0 and 1 then 2 and
/// 3 (8 bytes a row), from the 4×16 layout's scale bytes of one super-block at `scales`: the
/// three words of 6-bit scales of the four rows ([`k4_scales_mins`], four rows at once).
///
/// SAFETY: the caller has SSE2 and `scales` holds the group's 64 scale bytes.
#[inline(always)]
unsafe fn k4_x16_scales(scales: *const u8) -> ([__m128i; 2], [__m128i; 2]) {
    // SAFETY: the caller's contract; the loads read bytes 16..64.
    unsafe {
        let word = |i: usize| _mm_loadu_si128(scales.add(16 + 16 * i).cast());
        let (u0, u1, u2) = (word(0), word(1), word(2));
        let low6 = _mm_set1_epi8(0x3f);
        let low4 = _mm_set1_epi8(0x0f);
        let top2 = |u: __m128i| {
            _mm_slli_epi32::<4>(_mm_and_si128(_mm_srli_epi32::<6>(u), _mm_set1_epi8(3)))
        };
        let sc_lo = _mm_and_si128(u0, low6);
        let sc_hi = _mm_or_si128(_mm_and_si128(u2, low4), top2(u0));
        let m_lo = _mm_and_si128(u1, low6);
        let m_hi = _mm_or_si128(_mm_and_si128(_mm_srli_epi32::<4>(u2), low4), top2(u1));
        (
            [
                _mm_unpacklo_epi32(sc_lo, sc_hi),
                _mm_unpackhi_epi32(sc_lo, sc_hi),
            ],
            [
                _mm_unpacklo_epi32(m_lo, m_hi),
                _mm_unpackhi_epi32(m_lo, m_hi),
            ],
        )
    }
}

/// The `vpshufb` index that copies i16 number `j` of a 128-bit lane to every i16 of it.
const fn pick_bytes(j: usize) -> i16 {
    i16::from_le_bytes([2 * j as u8, 2 * j as u8 + 1])
}

/// `v` shifted right by `n` (0, 2, 4 or 6) bits within 16-bit lanes.
#[inline(always)]
unsafe fn srl(v: __m128i, n: usize) -> __m128i {
    // SAFETY: the caller has SSE2.
    unsafe {
        match n {
            0 => v,
            2 => _mm_srli_epi16::<2>(v),
            4 => _mm_srli_epi16::<4>(v),
            _ => _mm_srli_epi16::<6>(v),
        }
    }
}

/// The f16 at byte `at` of each row's block `b`, as 4 floats.
#[inline(always)]
unsafe fn halves(base: *const u8, rb: usize, bb: usize, b: usize, at: usize) -> __m128 {
    // SAFETY: the caller has F16C and the four rows hold block `b`.
    unsafe {
        let h = |r: usize| i16::from_le_bytes(*base.add(r * rb + b * bb + at).cast::<[u8; 2]>());
        _mm_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), 0, 0, 0, 0))
    }
}

impl Unpacked {
    /// Unpacks super-block `b` of the four rows starting at `base` (`rb` bytes apart, blocks of
    /// `bb` bytes) into `self`.
    ///
    /// SAFETY: the caller has AVX2 and F16C, and the four rows hold super-block `b`.
    #[inline(always)]
    unsafe fn fill<const F: u8>(&mut self, base: *const u8, rb: usize, bb: usize, b: usize) {
        // SAFETY: AVX2 and F16C (the caller's contract); loads read inside the four rows'
        // block `b`, stores write inside `self`'s lines.
        unsafe {
            let low4 = _mm_set1_epi8(0x0f);
            for r in 0..TILE_ROWS {
                let blk = base.add(r * rb + b * bb);
                let load = |at: usize| _mm_loadu_si128(blk.add(at).cast());
                let runs = |lines: &mut [Line; RUNS], k: usize, v: __m128i| {
                    _mm_store_si128(lines[k].0.as_mut_ptr().add(RUN * r).cast(), v)
                };
                if F == K6 {
                    // Value `128·half + 32·q + l` (quarter `q`, `l < 32`): nibble `q / 2` of low
                    // byte `64·half + 32·(q % 2) + l`, bits `2q, 2q+1` of high byte
                    // `128 + 32·half + l`. Run `k` holds values `16k..16k + 16`.
                    for half in 0..2 {
                        for l in [0, RUN] {
                            let high = load(128 + 32 * half + l);
                            for q in 0..4 {
                                let low = _mm_and_si128(
                                    srl(load(64 * half + 32 * (q % 2) + l), 4 * (q / 2)),
                                    low4,
                                );
                                let top = _mm_and_si128(srl(high, 2 * q), _mm_set1_epi8(3));
                                let k = 8 * half + 2 * q + l / RUN;
                                runs(
                                    &mut self.codes,
                                    k,
                                    _mm_or_si128(low, _mm_slli_epi16::<4>(top)),
                                );
                            }
                        }
                    }
                    let sc = _mm_cvtepi8_epi16(load(192));
                    let sc_hi = _mm_cvtepi8_epi16(_mm_srli_si128::<8>(load(192)));
                    for k in 0..RUNS {
                        let v = if k < 8 { sc } else { sc_hi };
                        let lane = (2 * (k % 8)) as i8;
                        let pick = _mm_set1_epi16(i16::from_le_bytes([lane as u8, lane as u8 + 1]));
                        runs(&mut self.scales, k, _mm_shuffle_epi8(v, pick));
                    }
                    let corr = |line: &mut Line, v: __m128i| {
                        _mm_store_si128(line.0.as_mut_ptr().add(RUN * r).cast(), v)
                    };
                    corr(&mut self.corr, sc);
                    corr(&mut self.corr_hi, sc_hi);
                } else {
                    // Sub-block `j`: nibble `j % 2` of packed bytes `32·(j / 2)..+32`, bit `j` of
                    // the fifth bits; runs `2j` and `2j + 1`.
                    let qs = if F == K5 { 48 } else { 16 };
                    let (sc, m) = k4_scales_mins(core::slice::from_raw_parts(blk.add(4), 12));
                    let sc = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
                    for p in 0..4 {
                        for (i, l) in [0, RUN].into_iter().enumerate() {
                            let packed = load(qs + 32 * p + l);
                            let mut low = _mm_and_si128(packed, low4);
                            let mut high = _mm_and_si128(_mm_srli_epi16::<4>(packed), low4);
                            if F == K5 {
                                let bits = load(16 + l);
                                let bit = |j: usize| {
                                    let b = _mm_and_si128(
                                        _mm_srl_epi16(bits, _mm_cvtsi32_si128(j as i32)),
                                        _mm_set1_epi8(1),
                                    );
                                    _mm_slli_epi16::<4>(b)
                                };
                                low = _mm_or_si128(low, bit(2 * p));
                                high = _mm_or_si128(high, bit(2 * p + 1));
                            }
                            runs(&mut self.codes, 4 * p + i, low);
                            runs(&mut self.codes, 4 * p + 2 + i, high);
                        }
                    }
                    for j in 0..8 {
                        let lane = (2 * j) as u8;
                        let pick = _mm_set1_epi16(i16::from_le_bytes([lane, lane + 1]));
                        let v = _mm_shuffle_epi8(sc, pick);
                        runs(&mut self.scales, 2 * j, v);
                        runs(&mut self.scales, 2 * j + 1, v);
                    }
                    let m = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(m as i64));
                    _mm_store_si128(self.corr.0.as_mut_ptr().add(RUN * r).cast(), m);
                }
            }
            if F == K6 {
                self.d = halves(base, rb, bb, b, 208);
            } else {
                self.d = halves(base, rb, bb, b, 0);
                self.dmin = halves(base, rb, bb, b, 2);
            }
        }
    }

    /// Unpacks super-block `b` of group `g` of a matrix in the 4×16 layout ([`Geometry`]):
    /// the codes' lines hold 16 packed bytes of each row already, and the scales are arranged
    /// for the vector decoding below.
    ///
    /// SAFETY: the caller has AVX2 and F16C, and the group and super-block exist in `bytes`.
    #[inline(always)]
    unsafe fn fill_x16<const F: u8>(
        &mut self,
        geo: &Geometry,
        bytes: *const u8,
        g: usize,
        b: usize,
    ) {
        let format = geo.format;
        let qb = Geometry::quant_bytes(format).unwrap_or(0);
        let sb = Geometry::scale_bytes(format);
        // SAFETY: AVX2 and F16C (the caller's contract); loads read inside the group's block
        // `b` (its `4·qb` quant bytes and `4·sb` scale bytes), stores write inside `self`.
        unsafe {
            let quants = bytes.add(geo.quants(g) + b * GROUP * qb);
            let scales = bytes.add(geo.scales(g) + b * GROUP * sb);
            // The quants and the scales are two streams read once per token: fetch ahead.
            for line in 0..GROUP * qb / 64 {
                _mm_prefetch::<_MM_HINT_T0>(quants.wrapping_add(PREFETCH + 64 * line).cast());
            }
            _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(PREFETCH).cast());
            _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(PREFETCH + 64).cast());
            let line = |i: usize, h: usize| _mm256_loadu_si256(quants.add(64 * i + 32 * h).cast());
            let put = |lines: &mut [Line; RUNS], k: usize, h: usize, v: __m256i| {
                _mm256_store_si256(lines[k].0.as_mut_ptr().add(32 * h).cast(), v)
            };
            let low4 = _mm256_set1_epi8(0x0f);
            let srl = |v: __m256i, n: usize| match n {
                0 => v,
                2 => _mm256_srli_epi16::<2>(v),
                4 => _mm256_srli_epi16::<4>(v),
                _ => _mm256_srli_epi16::<6>(v),
            };
            // Byte `2k + 1` of each i16 lane of `pick(k)`: `k`, the low byte zeroed.
            let pick = |k: usize, high: bool| {
                let k = k as i16;
                _mm256_set1_epi16(if high { (k << 8) | 0x80 } else { k | -32768 })
            };
            if F == K6 {
                // Lines 0..8: bytes `16i..` of `ql`; lines 8..12: bytes `16(i − 8)..` of `qh`.
                for h in 0..2 {
                    for half in 0..2 {
                        for l in 0..2 {
                            let high = line(8 + 2 * half + l, h);
                            for qq in 0..2 {
                                let v = line(4 * half + 2 * qq + l, h);
                                for nib in 0..2 {
                                    let q = qq + 2 * nib;
                                    let low = _mm256_and_si256(srl(v, 4 * nib), low4);
                                    let top =
                                        _mm256_and_si256(srl(high, 2 * q), _mm256_set1_epi8(3));
                                    let codes = _mm256_or_si256(low, _mm256_slli_epi16::<4>(top));
                                    put(&mut self.codes, 8 * half + 2 * q + l, h, codes);
                                }
                            }
                        }
                    }
                    // Each row's 16 signed scales fill its lane; run `k` takes scale `k`.
                    let sc = _mm256_loadu_si256(scales.add(32 * h).cast());
                    for k in 0..RUNS {
                        let v = _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(sc, pick(k, true)));
                        put(&mut self.scales, k, h, v);
                    }
                    let (r0, r1) = (
                        _mm256_castsi256_si128(sc),
                        _mm256_extracti128_si256::<1>(sc),
                    );
                    let lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(r0, r1));
                    let hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi64(r0, r1));
                    _mm256_store_si256(self.corr.0.as_mut_ptr().add(32 * h).cast(), lo);
                    _mm256_store_si256(self.corr_hi.0.as_mut_ptr().add(32 * h).cast(), hi);
                }
                self.d = _mm_cvtph_ps(_mm_loadl_epi64(scales.add(64).cast()));
            } else {
                // Line `i`: bytes `16i..` of `qs`, pair `i / 2`: low nibbles are run
                // `4·(i / 2) + i % 2`, high nibbles two runs on.
                for h in 0..2 {
                    for i in 0..8 {
                        let v = line(i, h);
                        let k = 4 * (i / 2) + i % 2;
                        put(&mut self.codes, k, h, _mm256_and_si256(v, low4));
                        put(
                            &mut self.codes,
                            k + 2,
                            h,
                            _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4),
                        );
                    }
                }
                self.d = _mm_cvtph_ps(_mm_loadl_epi64(scales.cast()));
                self.dmin = _mm_cvtph_ps(_mm_loadl_epi64(scales.add(8).cast()));
                let (sc, m) = k4_x16_scales(scales);
                for h in 0..2 {
                    // Row `2h` in the low lane, `2h + 1` in the high, each 8 bytes twice.
                    let rows = _mm256_set_m128i(
                        _mm_unpackhi_epi64(sc[h], sc[h]),
                        _mm_unpacklo_epi64(sc[h], sc[h]),
                    );
                    for j in 0..8 {
                        let v = _mm256_shuffle_epi8(rows, pick(j, false));
                        put(&mut self.scales, 2 * j, h, v);
                        put(&mut self.scales, 2 * j + 1, h, v);
                    }
                    _mm256_store_si256(
                        self.corr.0.as_mut_ptr().add(32 * h).cast(),
                        _mm256_cvtepu8_epi16(m[h]),
                    );
                }
            }
        }
    }
}

/// Adds the unpacked super-block `u` to the sums of `TT` tokens (token `t`'s super-block at
/// `x + t·nb`, its four sums at `out + t·stride`).
#[inline(always)]
unsafe fn tile<I: Isa, const F: u8, const TT: usize>(
    u: &Unpacked,
    x: *const Q8KBlock,
    nb: usize,
    out: *mut f32,
    stride: usize,
) {
    // SAFETY: the caller has the ISA; the tokens and outputs exist (see above).
    unsafe {
        let q = |t: usize| &*x.add(t * nb);
        let mut acc = [[I::zero(); 2]; TT];
        for k in 0..RUNS {
            let mut a = [I::zero(); TT];
            for (t, a) in a.iter_mut().enumerate() {
                *a = I::broadcast(q(t).qs.as_ptr().add(RUN * k).cast());
            }
            for h in 0..I::PARTS {
                let (w, s) = (I::part(&u.codes[k], h), I::part(&u.scales[k], h));
                for (acc, &a) in acc.iter_mut().zip(&a) {
                    acc[h] = I::dot(acc[h], w, a, s);
                }
            }
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let q = q(t);
            let sums = _mm_loadu_si128(q.bsums.as_ptr().cast());
            let sums_hi = _mm_loadu_si128(q.bsums.as_ptr().add(8).cast());
            let dy = _mm_set1_ps(q.d);
            let o = out.add(t * stride);
            let term = if F == K6 {
                // The codes' bias: Σ scale·(q − 32)·a = Σ scale·q·a − 32·Σ scale·Σa.
                let (lo, hi) = (
                    I::broadcast(core::ptr::addr_of!(sums).cast()),
                    I::broadcast(core::ptr::addr_of!(sums_hi).cast()),
                );
                for (h, acc) in acc.iter_mut().enumerate().take(I::PARTS) {
                    let bias = I::add(
                        I::madd(I::part(&u.corr, h), lo),
                        I::madd(I::part(&u.corr_hi, h), hi),
                    );
                    *acc = I::sub(*acc, I::times32(bias));
                }
                _mm_mul_ps(
                    _mm_mul_ps(u.d, dy),
                    _mm_cvtepi32_ps(I::rows(&acc[..I::PARTS])),
                )
            } else {
                // Sums of 32 (the sub-blocks the mins apply to).
                let pairs = _mm_hadd_epi16(sums, sums_hi);
                let pairs = I::broadcast(core::ptr::addr_of!(pairs).cast());
                let mut mins = [I::zero(); 2];
                for (h, m) in mins.iter_mut().enumerate().take(I::PARTS) {
                    *m = I::madd(I::part(&u.corr, h), pairs);
                }
                let dots = _mm_mul_ps(
                    _mm_mul_ps(u.d, dy),
                    _mm_cvtepi32_ps(I::rows(&acc[..I::PARTS])),
                );
                let mins = _mm_mul_ps(
                    _mm_mul_ps(u.dmin, dy),
                    _mm_cvtepi32_ps(I::rows(&mins[..I::PARTS])),
                );
                _mm_sub_ps(dots, mins)
            };
            _mm_storeu_ps(o, _mm_add_ps(_mm_loadu_ps(o), term));
        }
    }
}

/// One token against groups `groups` of a matrix in the 4×16 layout, straight from its bytes
/// (nothing reuses an unpacked super-block): each 64-byte line's codes are split into
/// registers and multiplied at once, the scales decoded once per super-block into vectors.
/// Group `c` of the range writes `out[4c..4c + 4]`.
///
/// SAFETY: the caller has the ISA, the groups exist in `bytes`, `x` holds the token's
/// super-blocks and `out` four floats per group.
#[inline(always)]
unsafe fn gemv<I: Isa, const F: u8>(
    geo: &Geometry,
    bytes: *const u8,
    groups: core::ops::Range<usize>,
    x: *const Q8KBlock,
    out: *mut f32,
) {
    let format = geo.format;
    let qb = Geometry::quant_bytes(format).unwrap_or(0);
    let sb = Geometry::scale_bytes(format);
    for (c, g) in groups.enumerate() {
        // SAFETY: the caller's contract; the loads read inside the group's super-blocks.
        unsafe {
            let mut sum = _mm_setzero_ps();
            for b in 0..geo.blocks {
                let quants = bytes.add(geo.quants(g) + b * GROUP * qb);
                let scales = bytes.add(geo.scales(g) + b * GROUP * sb);
                for line in 0..GROUP * qb / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(quants.wrapping_add(PREFETCH + 64 * line).cast());
                }
                _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(PREFETCH).cast());
                _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(PREFETCH + 64).cast());
                let q = &*x.add(b);
                let term = if F == K6 {
                    k6_line_term::<I>(quants, scales, q)
                } else {
                    k4_line_term::<I>(quants, scales, q)
                };
                sum = _mm_add_ps(sum, term);
            }
            _mm_storeu_ps(out.add(GROUP * c), sum);
        }
    }
}

/// What one `q4_k` super-block of a 4×16 group adds to its four rows' sums (as
/// `q8k::k4_term`), from its quants (`q`) and scales (`s`).
///
/// SAFETY: the caller has the ISA and F16C, and the super-block's bytes exist.
#[inline(always)]
unsafe fn k4_line_term<I: Isa>(q: *const u8, s: *const u8, x: &Q8KBlock) -> __m128 {
    // SAFETY: the caller's contract; reads inside the super-block's 512 quant and 64 scale
    // bytes and `x`.
    unsafe {
        let a = |k: usize| I::broadcast(x.qs.as_ptr().add(RUN * k).cast());
        let (sc, m) = k4_x16_scales(s);
        let (sc, m) = (I::widen::<false>(sc), I::widen::<false>(m));
        let low4 = I::splat(0x0f);
        let mut acc = [I::zero(); 2];
        // Lines `2p` and `2p + 1` hold bytes `32p..32p + 32` of `qs`: their low nibbles are
        // sub-block `2p` (runs `4p`, `4p + 1`), their high nibbles sub-block `2p + 1`. The two
        // runs of a sub-block are summed in i16 (at most 4·15·127) before their scale.
        for p in 0..4 {
            let (a0, a1, a2, a3) = (a(4 * p), a(4 * p + 1), a(4 * p + 2), a(4 * p + 3));
            for (h, acc) in acc.iter_mut().enumerate().take(I::PARTS) {
                let w0 = I::load(q.add(128 * p), h);
                let w1 = I::load(q.add(128 * p + 64), h);
                let low = I::add16(
                    I::products(I::and(w0, low4), a0),
                    I::products(I::and(w1, low4), a1),
                );
                let high = I::add16(
                    I::products(I::and(I::shift(w0, 4), low4), a2),
                    I::products(I::and(I::shift(w1, 4), low4), a3),
                );
                *acc = I::scaled(*acc, low, I::pick(sc[h], 2 * p));
                *acc = I::scaled(*acc, high, I::pick(sc[h], 2 * p + 1));
            }
        }
        // Sums of 32 (the sub-blocks the mins apply to).
        let sums = _mm_loadu_si128(x.bsums.as_ptr().cast());
        let sums_hi = _mm_loadu_si128(x.bsums.as_ptr().add(8).cast());
        let pairs = _mm_hadd_epi16(sums, sums_hi);
        let pairs = I::broadcast(core::ptr::addr_of!(pairs).cast());
        let mut mins = [I::zero(); 2];
        for (h, mins) in mins.iter_mut().enumerate().take(I::PARTS) {
            *mins = I::madd(m[h], pairs);
        }
        // `d` then `dmin` of the four rows, against the dots then the mins.
        let d = _mm256_cvtph_ps(_mm_loadu_si128(s.cast()));
        let sums = I::rows2(&acc[..I::PARTS], &mins[..I::PARTS]);
        let terms = _mm256_mul_ps(
            _mm256_mul_ps(d, _mm256_set1_ps(x.d)),
            _mm256_cvtepi32_ps(sums),
        );
        _mm_sub_ps(
            _mm256_castps256_ps128(terms),
            _mm256_extractf128_ps::<1>(terms),
        )
    }
}

/// What one `q6_k` super-block of a 4×16 group adds to its four rows' sums (as
/// `q8k::k6_term`), from its quants (`q`) and scales (`s`).
///
/// SAFETY: the caller has the ISA and F16C, and the super-block's bytes exist.
#[inline(always)]
unsafe fn k6_line_term<I: Isa>(q: *const u8, s: *const u8, x: &Q8KBlock) -> __m128 {
    // SAFETY: the caller's contract; reads inside the super-block's 768 quant and 72 scale
    // bytes and `x`.
    unsafe {
        let a = |k: usize| I::broadcast(x.qs.as_ptr().add(RUN * k).cast());
        // Each row's 16 signed scales: the first 8 of rows 0 and 1, then 2 and 3; the last 8.
        let row = |r: usize| _mm_loadu_si128(s.add(16 * r).cast());
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        let lo = I::widen::<true>([_mm_unpacklo_epi64(r0, r1), _mm_unpacklo_epi64(r2, r3)]);
        let hi = I::widen::<true>([_mm_unpackhi_epi64(r0, r1), _mm_unpackhi_epi64(r2, r3)]);
        let (low4, top2) = (I::splat(0x0f), I::splat(0x30));
        let mut acc = [I::zero(); 2];
        // Lines 0..8: bytes `16i..` of `ql`; lines 8..12: bytes `16(i − 8)..` of `qh`. Value
        // `128·half + 32·q + l` (quarter `q`, `l < 32`): nibble `q / 2` of `ql` byte
        // `64·half + 32·(q % 2) + l`, bits `2q, 2q + 1` of `qh` byte `32·half + l`.
        for half in 0..2 {
            for l in 0..2 {
                for (h, acc) in acc.iter_mut().enumerate().take(I::PARTS) {
                    let high = I::load(q.add(64 * (8 + 2 * half + l)), h);
                    for qq in 0..2 {
                        let v = I::load(q.add(64 * (4 * half + 2 * qq + l)), h);
                        for nib in 0..2 {
                            let quarter = qq + 2 * nib;
                            let low = if nib == 0 {
                                I::and(v, low4)
                            } else {
                                I::and(I::shift(v, 4), low4)
                            };
                            // Bits `2q, 2q + 1` moved to bits 4 and 5.
                            let top = match quarter {
                                0 => I::shift(high, -4),
                                1 => I::shift(high, -2),
                                2 => high,
                                _ => I::shift(high, 2),
                            };
                            let codes = I::or(low, I::and(top, top2));
                            let k = 8 * half + 2 * quarter + l;
                            let scales = if k < 8 { lo[h] } else { hi[h] };
                            *acc = I::dot(*acc, codes, a(k), I::pick(scales, k % 8));
                        }
                    }
                }
            }
        }
        // The codes' bias: Σ scale·(q − 32)·a = Σ scale·q·a − 32·Σ scale·Σa.
        let sums = _mm_loadu_si128(x.bsums.as_ptr().cast());
        let sums_hi = _mm_loadu_si128(x.bsums.as_ptr().add(8).cast());
        let (sums, sums_hi) = (
            I::broadcast(core::ptr::addr_of!(sums).cast()),
            I::broadcast(core::ptr::addr_of!(sums_hi).cast()),
        );
        for (h, acc) in acc.iter_mut().enumerate().take(I::PARTS) {
            let bias = I::add(I::madd(lo[h], sums), I::madd(hi[h], sums_hi));
            *acc = I::sub(*acc, I::times32(bias));
        }
        let d = _mm_cvtph_ps(_mm_loadl_epi64(s.add(64).cast()));
        _mm_mul_ps(
            _mm_mul_ps(d, _mm_set1_ps(x.d)),
            _mm_cvtepi32_ps(I::rows(&acc[..I::PARTS])),
        )
    }
}

/// [`q8k::gemm`] for format `F` with the ISA `I`: tiles of four rows (groups of the 4×16
/// layout, or any four of ggml's rows), then the rows past the last tile on the reference.
#[inline(always)]
unsafe fn gemm<I: Isa, const F: u8>(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    mut out: Out<'_>,
) {
    let geo = w.geometry();
    let (nb, bb) = (geo.blocks, w.format.block_bytes());
    let rb = geo.row_bytes();
    let interleaved = geo.layout == Layout::X16;
    let tiled_end = if interleaved {
        assert!(
            rows.start.is_multiple_of(GROUP),
            "rows start inside a group"
        );
        rows.end.min(geo.groups() * GROUP)
    } else {
        rows.start + rows.len() / TILE_ROWS * TILE_ROWS
    }
    .max(rows.start);
    let tiled = tiled_end - rows.start;
    let stride = out.stride();
    let o = out.checked(n, tiled);
    assert!(x.len() >= n * nb && w.bytes.len() >= w.rows * rb && rows.end <= w.rows);
    if interleaved && n == 1 {
        // One token: nothing reuses an unpacked super-block.
        // SAFETY: the groups of rows `rows.start..tiled_end`, the token's `nb` super-blocks
        // and the outputs `0..tiled` exist (asserted above), and the caller has the ISA.
        unsafe {
            gemv::<I, F>(
                &geo,
                w.bytes.as_ptr(),
                rows.start / GROUP..tiled_end / GROUP,
                x.as_ptr(),
                o,
            )
        };
    } else {
        let mut u = Unpacked {
            codes: [Line([0; 64]); RUNS],
            scales: [Line([0; 64]); RUNS],
            corr: Line([0; 64]),
            corr_hi: Line([0; 64]),
            // SAFETY: the caller has the ISA (AVX2 at least).
            d: unsafe { _mm_setzero_ps() },
            // SAFETY: as above.
            dmin: unsafe { _mm_setzero_ps() },
        };
        for c in (0..tiled).step_by(TILE_ROWS) {
            let r = rows.start + c;
            // SAFETY: rows `r..r + 4` (a whole group when interleaved) and `n` tokens of `nb`
            // super-blocks exist (asserted above), the outputs `t·stride + c..+4` are this view's
            // (`checked`), and the caller has the ISA.
            unsafe {
                for t in 0..n {
                    _mm_storeu_ps(o.add(t * stride + c), _mm_setzero_ps());
                }
                for b in 0..nb {
                    if interleaved {
                        u.fill_x16::<F>(&geo, w.bytes.as_ptr(), r / GROUP, b);
                    } else {
                        u.fill::<F>(w.bytes.as_ptr().add(r * rb), rb, bb, b);
                    }
                    let mut t = 0;
                    while t < n {
                        let (xt, ot) = (x.as_ptr().add(t * nb + b), o.add(t * stride + c));
                        let step = (n - t).min(T);
                        match step {
                            4 => tile::<I, F, 4>(&u, xt, nb, ot, stride),
                            3 => tile::<I, F, 3>(&u, xt, nb, ot, stride),
                            2 => tile::<I, F, 2>(&u, xt, nb, ot, stride),
                            _ => tile::<I, F, 1>(&u, xt, nb, ot, stride),
                        }
                        t += step;
                    }
                }
            }
        }
    }
    // The rows past the last tile (at most three, at the matrix's end): the reference.
    // SAFETY: the tiles wrote only the columns before `tiled`.
    let rest = unsafe { out.columns(tiled) };
    q8k::gemm(w, tiled_end..rows.end, x, n, rest);
}

/// [`q8k::gemm`] for any K-quant, else the reference.
#[inline(always)]
unsafe fn gemm_any<I: Isa>(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    // SAFETY: the caller has the ISA.
    unsafe {
        match w.format {
            Format::Q4K => gemm::<I, K4>(w, rows, x, n, out),
            Format::Q5K => gemm::<I, K5>(w, rows, x, n, out),
            Format::Q6K => gemm::<I, K6>(w, rows, x, n, out),
            _ => q8k::gemm(w, rows, x, n, out),
        }
    }
}

/// [`q8k::gemm`] on AVX2.
///
/// SAFETY: the caller has checked the CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn gemm_avx2(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    // SAFETY: AVX2, by this function's contract.
    unsafe { gemm_any::<Avx2<false>>(w, rows, x, n, out) }
}

/// [`q8k::gemm`] on AVX2 with AVX-VNNI.
///
/// SAFETY: the caller has checked the CPU has AVX2 and AVX-VNNI.
#[target_feature(enable = "avx2,f16c,avxvnni")]
pub unsafe fn gemm_avxvnni(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    // SAFETY: AVX2 and AVX-VNNI, by this function's contract.
    unsafe { gemm_any::<Avx2<true>>(w, rows, x, n, out) }
}

/// [`q8k::gemm`] on AVX-512 (with VNNI when `VNNI`). One token of ggml's rows runs faster on
/// 256-bit registers (measured: the wide broadcasts and reductions of the unpacked buffer cost
/// more than they save when nothing reuses it); the 4×16 layout's lines are one 512-bit
/// register each (decode 1.2× the 256-bit kernel).
///
/// SAFETY: the CPU has AVX-512 F/BW/VL (and VNNI when `VNNI`), AVX2 and F16C.
#[inline(always)]
unsafe fn gemm_avx512_any<const VNNI: bool>(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    // SAFETY: the features, by this function's contract.
    unsafe {
        if n == 1 && w.geometry().layout != Layout::X16 {
            gemm_any::<Avx2<false>>(w, rows, x, n, out)
        } else {
            gemm_any::<Avx512<VNNI>>(w, rows, x, n, out)
        }
    }
}

/// [`q8k::gemm`] on AVX-512 without VNNI (`vpmaddwd` and an add for `vpdpwssd`).
///
/// SAFETY: the caller has checked the CPU has AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
pub unsafe fn gemm_avx512(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    // SAFETY: the features, by this function's contract (AVX-512 includes AVX2).
    unsafe { gemm_avx512_any::<false>(w, rows, x, n, out) }
}

/// [`q8k::gemm`] on AVX-512 with VNNI.
///
/// SAFETY: the caller has checked the CPU has AVX-512 F/BW/VL and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,f16c")]
pub unsafe fn gemm_avx512vnni(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    // SAFETY: the features, by this function's contract (AVX-512 includes AVX2).
    unsafe { gemm_avx512_any::<true>(w, rows, x, n, out) }
}

/// [`q8k::quantize`] on AVX2, bit-identical to it: the same first value of largest magnitude
/// (NaNs skipped), the same scalar scale, rounding half to even as `rintf`, NaN products to 0.
///
/// SAFETY: the caller has checked the CPU has AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_avx2(x: &[f32], out: &mut [Q8KBlock]) {
    for (block, q) in x.chunks_exact(SUPER_BLOCK).zip(out.iter_mut()) {
        // SAFETY: `block` holds 256 floats (32 loads of 8) and `q.qs` 256 bytes (8 stores of
        // 32); AVX2 by this function's contract.
        unsafe {
            let load = |i: usize| _mm256_loadu_ps(block.as_ptr().add(8 * i));
            let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut amax = _mm256_setzero_ps();
            for i in 0..SUPER_BLOCK / 8 {
                // `vmaxps` returns its second operand when the first is NaN: NaNs are skipped.
                amax = _mm256_max_ps(_mm256_and_ps(load(i), magnitude), amax);
            }
            let m = _mm_max_ps(
                _mm256_castps256_ps128(amax),
                _mm256_extractf128_ps::<1>(amax),
            );
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            if amax == 0.0 {
                *q = Q8KBlock::default();
                continue;
            }
            let first = (0..SUPER_BLOCK / 8)
                .find_map(|i| {
                    let hit = _mm256_cmp_ps::<_CMP_EQ_OQ>(
                        _mm256_and_ps(load(i), magnitude),
                        _mm256_set1_ps(amax),
                    );
                    let bits = _mm256_movemask_ps(hit);
                    (bits != 0).then(|| 8 * i + bits.trailing_zeros() as usize)
                })
                .unwrap_or(0);
            let iscale = -127.0 / block[first];
            let mut ints = [_mm256_setzero_si256(); 4];
            for c in 0..SUPER_BLOCK / 32 {
                for (k, int) in ints.iter_mut().enumerate() {
                    let p = _mm256_mul_ps(load(4 * c + k), _mm256_set1_ps(iscale));
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
                    let ordered = _mm256_cmp_ps::<_CMP_ORD_Q>(p, p);
                    let i = _mm256_cvtps_epi32(_mm256_and_ps(r, ordered));
                    *int = _mm256_min_epi32(i, _mm256_set1_epi32(127));
                }
                let bytes = _mm256_packs_epi16(
                    _mm256_packs_epi32(ints[0], ints[1]),
                    _mm256_packs_epi32(ints[2], ints[3]),
                );
                let bytes =
                    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(q.qs.as_mut_ptr().add(32 * c).cast(), bytes);
                q.bsums[2 * c] = hsum(_mm256_add_epi32(ints[0], ints[1])) as i16;
                q.bsums[2 * c + 1] = hsum(_mm256_add_epi32(ints[2], ints[3])) as i16;
            }
            q.d = 1.0 / iscale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    /// The AVX2 `q8_K` quantizer gives the reference's blocks, on random, huge, tied, zero and
    /// NaN-holding super-blocks.
    #[test]
    fn avx2_q8k_quantizer_equals_the_reference() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = crate::kernels::testing::Rng(0x9e37_u64);
        for round in 0..40 {
            let mut x: Vec<f32> = (0..4 * SUPER_BLOCK)
                .map(|_| rng.unit() * 10.0)
                .map(|v| if round % 5 == 0 { v * 1e30 } else { v })
                .collect();
            // A tie of magnitudes (the first wins), an all-zero block, a NaN, halves to round.
            x[7] = 50.0;
            x[9] = -50.0;
            x[SUPER_BLOCK..2 * SUPER_BLOCK].fill(0.0);
            x[2 * SUPER_BLOCK + 3] = f32::NAN;
            x[3 * SUPER_BLOCK..3 * SUPER_BLOCK + 8]
                .copy_from_slice(&[127.0, 0.5, 1.5, -2.5, -0.5, 3.5, 63.5, -127.0]);
            let mut want = vec![Q8KBlock::default(); 4];
            let mut got = vec![Q8KBlock::default(); 4];
            q8k::quantize(&x, &mut want);
            // SAFETY: AVX2 was detected above.
            unsafe { quantize_avx2(&x, &mut got) };
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.qs, w.qs, "round {round} block {b}");
                assert_eq!(g.bsums, w.bsums, "round {round} block {b}");
                assert_eq!(g.d.to_bits(), w.d.to_bits(), "round {round} block {b}");
            }
        }
    }

    /// Each level's kernel gives the reference's bits for random rows of each K-quant against
    /// random activations (some huge), for every token count up to 9 and row ranges that end
    /// off a tile.
    #[test]
    fn k_quant_kernels_equal_the_reference_bit_for_bit() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut kernels: Vec<(&str, super::super::GemmQ8K)> = vec![(
            "avx2",
            // SAFETY: AVX2 was detected above.
            |w, r, x, n, o| unsafe { gemm_avx2(w, r, x, n, o) },
        )];
        if std::is_x86_feature_detected!("avxvnni") {
            // SAFETY: AVX-VNNI was detected.
            kernels.push(("avxvnni", |w, r, x, n, o| unsafe {
                gemm_avxvnni(w, r, x, n, o)
            }));
        }
        if crate::kernels::Level::Avx512.check().is_ok() {
            // SAFETY: the level's features were detected.
            kernels.push(("avx512", |w, r, x, n, o| unsafe {
                gemm_avx512(w, r, x, n, o)
            }));
        }
        if crate::kernels::Level::Avx512Vnni.check().is_ok() {
            // SAFETY: the level's features were detected.
            kernels.push(("avx512vnni", |w, r, x, n, o| unsafe {
                gemm_avx512vnni(w, r, x, n, o)
            }));
        }
        let mut rng = crate::kernels::testing::Rng(0x5eed_u64);
        let (cols, rows) = (768, 11);
        let nb = cols / SUPER_BLOCK;
        let mut row_seed = 11;
        for round in 0..8 {
            // Rounds 6 and 7: one token (the decode kernels), with huge activations and not.
            let n = if round >= 6 {
                1
            } else {
                1 + round % 9 + round / 2
            };
            let x: Vec<f32> = (0..n * cols)
                .map(|_| rng.unit())
                .map(|v| if round % 3 == 0 { v * 1e3 } else { v })
                .collect();
            let mut xq = vec![Q8KBlock::default(); n * nb];
            q8k::quantize(&x, &mut xq);
            for format in [Format::Q4K, Format::Q5K, Format::Q6K] {
                let bytes: Vec<u8> = (0..rows)
                    .flat_map(|_| q8k::random_row(format, cols, &mut row_seed))
                    .collect();
                let rows_major = Matrix::new(format, Layout::Rows, rows, cols, &bytes);
                let layout = Layout::X16.for_format(format);
                let packed = Geometry {
                    format,
                    layout,
                    rows,
                    blocks: nb,
                }
                .pack(&bytes);
                let w = Matrix::new(format, layout, rows, cols, &packed);
                // Interleaved matrices are split on groups; ggml's rows anywhere.
                let ranges = [0..rows, 1..rows, 4..8, 3..6, 8..rows];
                for range in ranges
                    .into_iter()
                    .filter(|r| layout == Layout::Rows || r.start % GROUP == 0)
                {
                    let m = range.len();
                    let mut want = vec![0f32; n * m];
                    q8k::gemm(&rows_major, range.clone(), &xq, n, Out::new(&mut want, m));
                    let mut reference = vec![f32::NAN; n * m];
                    q8k::gemm(&w, range.clone(), &xq, n, Out::new(&mut reference, m));
                    assert_eq!(reference, want, "the reference on {}", layout.name());
                    for (name, kernel) in &kernels {
                        let mut got = vec![f32::NAN; n * m];
                        kernel(&w, range.clone(), &xq, n, Out::new(&mut got, m));
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(g, w)| g.to_bits() == w.to_bits());
                        assert!(
                            same,
                            "{name} {} n {n} rows {range:?}: {got:?} vs {want:?}",
                            format.name()
                        );
                    }
                }
            }
        }
    }
}
