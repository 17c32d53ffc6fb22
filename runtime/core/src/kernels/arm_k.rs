//! K-quant rows (`q4_k`, `q5_k`, `q6_k`; ggml's rows, or `q4_k` and `q6_k` in 4×4 groups)
//! against `q8_K` activations on aarch64: NEON, dotprod and i8mm, bit-identical to
//! [`q8k::gemm`].
//!
//! A 4×4 group ([`Layout::X4`]: 4 rows in runs of 4 bytes, scales arranged for four rows as
//! `Geometry::scale_at` says) meets `sdot` by element with dotprod and i8mm ([`lanes_tile`]):
//! a register holds 4 codes of each row, the token's 4 values in a lane meet them, so every
//! sum's 4 lanes are the 4 rows — one `mla` per sub-block scales all four, the scales unpack
//! for the four rows in a few vector instructions, and nothing is reduced. NEON reads a
//! group's rows back with `ld4` into the ggml-rows kernel below.
//!
//! A ggml-rows tile is 4 rows × 1–4 tokens. Each super-block is walked in 8 chunks of 32 values (a
//! `q4_k`/`q5_k` sub-block, or two `q6_k` sub-blocks of 16); a chunk's codes are decoded once
//! per row and multiplied against every token of the tile. The integer sums stay exact:
//! - NEON: `smull`/`smlal` of bytes into i16 (at most 4 products of ≤ 63·128 a lane), then
//!   `smlal` by the sub-block's scale (a lane of the row's scales) into i32;
//! - dotprod: `sdot` into a running sum `C` that is never reset inside the super-block, and
//!   `A += C·(scale_j − scale_{j+1})` after each sub-block `j` (with `scale_8 = 0`), which sums
//!   to `Σ_j scale_j·(q·a)_j` with one multiply-add per sub-block and no zeroing;
//! - i8mm: the same with `smmla` on 2 rows × 2 tokens × 8 bytes, lanes `[r0t0, r0t1, r1t0,
//!   r1t1]` (both interleaves in registers: the signature has no scratch); one token takes
//!   dotprod.
//!
//! `q6_k` codes are used as stored (0..63) and the `−32` comes back as `−32·Σ_j scale_j·bsum_j`
//! from the activations' sums of 16, as the start value of the sum; the `q4_k`/`q5_k` mins
//! term is one `smull`/`smlal2` of the row's 8 mins by the token's 8 pair sums of `bsums`.
//! Sums are wrapping i32 arithmetic whose exact value fits i32, so they equal the reference's.
//! The float tail is the reference's, per super-block and in order, four rows a vector:
//! `sum += d·dy·dots − dmin·dy·mins` (or `d·dy·sum`), separate multiplies and adds.
//!
//! `sdot`/`smmla` are `asm!` helpers from [`super::arm`], inlined only into the functions
//! compiled with their features.

use core::arch::aarch64::*;
use core::arch::asm;

use super::arm::{pair, sdot, smmla};
use super::q8k::{self, Q8KBlock};
use super::x4::sdot_lane;
use super::{Matrix, Out, TILE_ROWS};
use crate::layout::{Layout, GROUP};
use crate::quant::Format;

/// Rows of a tile: the four lanes of a float accumulator.
const R: usize = TILE_ROWS;

/// Formats as const parameters.
const Q4K: u8 = 0;
const Q5K: u8 = 1;
const Q6K: u8 = 2;

const fn block_bytes(f: u8) -> usize {
    match f {
        Q4K => 144,
        Q5K => 176,
        _ => 210,
    }
}

/// Bytes ahead of the super-block being read that decode (one token) prefetches in each row:
/// every weight is read once per token, and a few super-blocks ahead keeps DRAM busy.
const PREFETCH: usize = 1024;

/// Runs `$body` for the 8 chunks of a super-block, unrolled, with the constants the scale
/// lanes need (const items, so they can be const arguments): `$c` the chunk, `$l` its lane in
/// 4-lane scale registers (`q4_k`), `$e`/`$o` those of the `q6_k` sub-blocks `2c` and `2c + 1`.
macro_rules! chunks {
    (|$c:ident, $l:ident, $e:ident, $o:ident| $body:block) => {
        chunks!(@ $c, $l, $e, $o, $body, 0 1 2 3 4 5 6 7)
    };
    (@ $c:ident, $l:ident, $e:ident, $o:ident, $body:block, $($n:literal)*) => {
        $({
            const $c: usize = $n;
            const $l: i32 = $n % 4;
            const $e: i32 = (2 * $n) % 4;
            const $o: i32 = (2 * $n + 1) % 4;
            $body
        })*
    };
}

/// 16 of the 32 codes of chunk `C` of a super-block, as signed bytes: nibbles (plus 16 for
/// the `q5_k` high bit) or `q6_k`'s 6-bit codes before their `−32`, from the 16 bytes holding
/// their nibbles (`qs`; `q6_k`: `ql`) and, for `q5_k` and `q6_k`, the 16 of their high bits.
#[inline(always)]
fn decode<const F: u8, const C: usize>(packed: uint8x16_t, qh: uint8x16_t) -> int8x16_t {
    // SAFETY: register arithmetic; NEON is baseline.
    unsafe {
        let s = vreinterpretq_s8_u8;
        if F == Q6K {
            let m3f = vdupq_n_u8(0x3f);
            let m30 = vdupq_n_u8(0x30);
            // Value l: nibble k/2 of ql, bits 2k, 2k+1 of qh above it.
            return s(match C % 4 {
                0 => vandq_u8(vsliq_n_u8::<4>(packed, qh), m3f),
                1 => vandq_u8(vsliq_n_u8::<4>(packed, vshrq_n_u8::<2>(qh)), m3f),
                2 => sri4(vandq_u8(qh, m30), packed),
                _ => sri4(vshrq_n_u8::<2>(qh), packed),
            });
        }
        let mut v = if C % 2 == 0 {
            vandq_u8(packed, vdupq_n_u8(0x0f))
        } else {
            vshrq_n_u8::<4>(packed)
        };
        if F == Q5K {
            // Bit C of each qh byte, moved to bit 4.
            let shift = vdupq_n_s8(4 - C as i8);
            v = vorrq_u8(v, vandq_u8(vshlq_u8(qh, shift), vdupq_n_u8(0x10)));
        }
        s(v)
    }
}

/// Where chunk `C`'s bytes lie in a ggml super-block of format `F`: its packed nibbles, and
/// its high bits (`q5_k`: `qh`; `q6_k`: the `qh` bytes of its half; `q4_k`: unused).
const fn chunk_at(f: u8, c: usize) -> (usize, usize) {
    match f {
        Q6K => (64 * (c / 4) + 32 * (c % 4 % 2), 128 + 32 * (c / 4)),
        Q5K => (48 + 32 * (c / 2), 16),
        _ => (16 + 32 * (c / 2), 16),
    }
}

/// The 8 scales and 8 mins of a `q4_k`/`q5_k` super-block as i16 (llama.cpp's kmask
/// unpacking of its 12 scale bytes, three 32-bit words at once), the words `stride` bytes
/// apart from `p` (4 in ggml's rows, 16 in a 4×4 group).
///
/// SAFETY: `p`, `p + stride` and `p + 2·stride` point at 4 readable bytes each.
#[inline(always)]
unsafe fn k4_scales(p: *const u8, stride: usize) -> (int16x8_t, int16x8_t) {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    // SAFETY: the three words are readable by the contract; NEON is baseline.
    unsafe {
        let word = |i: usize| p.add(stride * i).cast::<u32>().read_unaligned().to_le();
        let (a, b, c) = (word(0), word(1), word(2));
        let sc = u64::from(a & K1) | u64::from((c & K2) | ((a >> 6) & K3) << 4) << 32;
        let m = u64::from(b & K1) | u64::from(((c >> 4) & K2) | ((b >> 6) & K3) << 4) << 32;
        let widen = |v: u64| vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(v)));
        (widen(sc), widen(m))
    }
}

/// The 16 signed scales of a `q6_k` super-block as i16, from its 16 scale bytes at `p`.
///
/// SAFETY: `p` points at 16 readable bytes.
#[inline(always)]
unsafe fn k6_scales(p: *const u8) -> [int16x8_t; 2] {
    // SAFETY: the 16 bytes are readable by the contract; NEON is baseline.
    unsafe {
        let s = vld1q_s8(p.cast());
        [vmovl_s8(vget_low_s8(s)), vmovl_high_s8(s)]
    }
}

/// `Σ_k a[k]·b[k]` over 8 i16 lanes, as an i32x4 whose lane sum it is.
#[inline(always)]
fn dot16(a: int16x8_t, b: int16x8_t) -> int32x4_t {
    // SAFETY: register arithmetic; NEON is baseline.
    unsafe { vmlal_high_s16(vmull_s16(vget_low_s16(a), vget_low_s16(b)), a, b) }
}

/// `[Σ lanes of v0, …, Σ lanes of v3]`.
#[inline(always)]
fn sum4(v: [int32x4_t; 4]) -> int32x4_t {
    // SAFETY: register arithmetic; NEON is baseline.
    unsafe { vpaddq_s32(vpaddq_s32(v[0], v[1]), vpaddq_s32(v[2], v[3])) }
}

/// How one level keeps the integer sum of one (row, token) over a super-block.
trait KDot {
    type Acc: Copy;
    /// A row's scales as the level multiplies by them.
    type Scales: Copy;
    /// From the row's scales as i16 (`q4_k`/`q5_k`: 8 in `sc[0]`; `q6_k`: 16).
    fn scales<const K6: bool>(sc: [int16x8_t; 2]) -> Self::Scales;
    /// A sum that starts at the lane sum of `start`.
    fn start(start: int32x4_t) -> Self::Acc;
    /// Adds chunk `C` (codes `w`, activations `a`); `L`, `E`, `O` as [`chunks!`] gives them.
    fn chunk<const K6: bool, const C: usize, const L: i32, const E: i32, const O: i32>(
        acc: Self::Acc,
        sc: &Self::Scales,
        w: &[int8x16_t; 2],
        a: &[int8x16_t; 2],
    ) -> Self::Acc;
    /// A vector whose lane sum is the super-block's sum.
    fn total(acc: Self::Acc) -> int32x4_t;
}

/// Widening multiplies: i8 products summed in i16, then scaled into i32.
struct Neon;

impl KDot for Neon {
    type Acc = int32x4_t;
    type Scales = [int16x4_t; 4];

    #[inline(always)]
    fn scales<const K6: bool>(sc: [int16x8_t; 2]) -> Self::Scales {
        // SAFETY: register moves; NEON is baseline.
        unsafe {
            [
                vget_low_s16(sc[0]),
                vget_high_s16(sc[0]),
                vget_low_s16(sc[1]),
                vget_high_s16(sc[1]),
            ]
        }
    }

    #[inline(always)]
    fn start(start: int32x4_t) -> int32x4_t {
        start
    }

    #[inline(always)]
    fn chunk<const K6: bool, const C: usize, const L: i32, const E: i32, const O: i32>(
        acc: int32x4_t,
        sc: &[int16x4_t; 4],
        w: &[int8x16_t; 2],
        a: &[int8x16_t; 2],
    ) -> int32x4_t {
        // SAFETY: register arithmetic; NEON is baseline. i16 lanes hold at most 4 products of
        // |code| ≤ 63 (q6_k) or ≤ 31 and |a| ≤ 128: under 2¹⁵.
        unsafe {
            let pairs = |w: int8x16_t, a: int8x16_t| {
                vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(a)), w, a)
            };
            if K6 {
                let (s0, s1) = (pairs(w[0], a[0]), pairs(w[1], a[1]));
                let (e, o) = (sc[2 * C / 4], sc[(2 * C + 1) / 4]);
                let acc =
                    vmlal_high_lane_s16::<E>(vmlal_lane_s16::<E>(acc, vget_low_s16(s0), e), s0, e);
                vmlal_high_lane_s16::<O>(vmlal_lane_s16::<O>(acc, vget_low_s16(s1), o), s1, o)
            } else {
                let s = vmlal_high_s8(
                    vmlal_s8(pairs(w[0], a[0]), vget_low_s8(w[1]), vget_low_s8(a[1])),
                    w[1],
                    a[1],
                );
                let l = sc[C / 4];
                vmlal_high_lane_s16::<L>(vmlal_lane_s16::<L>(acc, vget_low_s16(s), l), s, l)
            }
        }
    }

    #[inline(always)]
    fn total(acc: int32x4_t) -> int32x4_t {
        acc
    }
}

/// `sdot` into a running sum `C`, and `A += C·(scale_j − scale_{j+1})` after sub-block `j`.
struct Dotprod;

/// `scale_j − scale_{j+1}` of 16 i16 scales (`scale_16 = 0`), as i32 in 4 registers.
#[inline(always)]
fn steps(sc: [int16x8_t; 2]) -> [int32x4_t; 4] {
    // SAFETY: register arithmetic; NEON is baseline. Scales are 6-bit or i8: differences fit i16.
    unsafe {
        let next0 = vextq_s16::<1>(sc[0], sc[1]);
        let next1 = vextq_s16::<1>(sc[1], vdupq_n_s16(0));
        let (d0, d1) = (vsubq_s16(sc[0], next0), vsubq_s16(sc[1], next1));
        [
            vmovl_s16(vget_low_s16(d0)),
            vmovl_high_s16(d0),
            vmovl_s16(vget_low_s16(d1)),
            vmovl_high_s16(d1),
        ]
    }
}

impl KDot for Dotprod {
    type Acc = (int32x4_t, int32x4_t);
    type Scales = [int32x4_t; 4];

    #[inline(always)]
    fn scales<const K6: bool>(sc: [int16x8_t; 2]) -> Self::Scales {
        steps(sc)
    }

    #[inline(always)]
    fn start(start: int32x4_t) -> Self::Acc {
        // SAFETY: register arithmetic; NEON is baseline.
        (unsafe { vdupq_n_s32(0) }, start)
    }

    #[inline(always)]
    fn chunk<const K6: bool, const C: usize, const L: i32, const E: i32, const O: i32>(
        (c, acc): Self::Acc,
        sc: &[int32x4_t; 4],
        w: &[int8x16_t; 2],
        a: &[int8x16_t; 2],
    ) -> Self::Acc {
        // SAFETY: register arithmetic; NEON is baseline.
        unsafe {
            if K6 {
                let c = sdot(c, w[0], a[0]);
                let acc = vmlaq_laneq_s32::<E>(acc, c, sc[2 * C / 4]);
                let c = sdot(c, w[1], a[1]);
                (c, vmlaq_laneq_s32::<O>(acc, c, sc[(2 * C + 1) / 4]))
            } else {
                let c = sdot(sdot(c, w[0], a[0]), w[1], a[1]);
                (c, vmlaq_laneq_s32::<L>(acc, c, sc[C / 4]))
            }
        }
    }

    #[inline(always)]
    fn total((_, acc): Self::Acc) -> int32x4_t {
        acc
    }
}

/// Where a tile reads and writes: its four rows' super-blocks `S`, `x` at the tile's first
/// token, `out` at (first token, first row).
struct Tile<S> {
    w: S,
    rows: usize,
    x: *const Q8KBlock,
    nb: usize,
    out: *mut f32,
    stride: usize,
}

/// Four ggml rows `0..4` (the last one repeated when fewer than four remain).
#[derive(Clone, Copy)]
struct Rows([*const u8; R]);

/// A 4×4 group ([`Layout::X4`]): its quants `q` and scales `s` (of super-block 0).
#[derive(Clone, Copy)]
struct Group {
    q: *const u8,
    s: *const u8,
}

/// A group's quant and scale bytes of one super-block of format `F` (`q4_k` or `q6_k`).
const fn group_bytes(f: u8) -> (usize, usize) {
    if f == Q6K {
        (4 * 192, 4 * 18)
    } else {
        (4 * 128, 4 * 16)
    }
}

/// How [`dot_tile`] reads the four rows' super-block `b`.
trait Src: Copy {
    /// The codes of chunk `C` of each row ([`decode`]).
    ///
    /// SAFETY: super-block `b` of format `F` exists in each row.
    unsafe fn codes<const F: u8, const C: usize>(&self, b: usize) -> [[int8x16_t; 2]; R];
    /// Row `i`'s scales as i16: `q4_k`/`q5_k` its 8 scales and 8 mins, `q6_k` its 16 scales.
    ///
    /// SAFETY: as [`Src::codes`].
    unsafe fn k4<const F: u8>(&self, b: usize, i: usize) -> (int16x8_t, int16x8_t);
    /// SAFETY: as [`Src::codes`].
    unsafe fn k6(&self, b: usize, i: usize) -> [int16x8_t; 2];
    /// The f32 `d` and (`q4_k`/`q5_k`) `dmin` of the four rows, lanes the rows.
    ///
    /// SAFETY: as [`Src::codes`].
    unsafe fn d<const F: u8>(&self, b: usize) -> (float32x4_t, float32x4_t);
    /// Hints the super-blocks a few ahead of `b` into the cache (one token: decode).
    fn prefetch<const F: u8>(&self, b: usize);
}

impl Src for Rows {
    #[inline(always)]
    unsafe fn codes<const F: u8, const C: usize>(&self, b: usize) -> [[int8x16_t; 2]; R] {
        let (qs, qh) = chunk_at(F, C);
        // SAFETY: chunk_at's bytes are inside super-block `b` of each row, by the contract;
        // NEON is baseline.
        unsafe {
            core::array::from_fn(|i| {
                let p = self.0[i].add(b * block_bytes(F));
                let packed = vld1q_u8_x2(p.add(qs));
                let high = if F == Q4K {
                    packed
                } else {
                    vld1q_u8_x2(p.add(qh))
                };
                [
                    decode::<F, C>(packed.0, high.0),
                    decode::<F, C>(packed.1, high.1),
                ]
            })
        }
    }

    #[inline(always)]
    unsafe fn k4<const F: u8>(&self, b: usize, i: usize) -> (int16x8_t, int16x8_t) {
        // SAFETY: bytes 4..16 are inside the super-block.
        unsafe { k4_scales(self.0[i].add(b * block_bytes(F) + 4), 4) }
    }

    #[inline(always)]
    unsafe fn k6(&self, b: usize, i: usize) -> [int16x8_t; 2] {
        // SAFETY: bytes 192..208 are inside the super-block.
        unsafe { k6_scales(self.0[i].add(b * block_bytes(Q6K) + 192)) }
    }

    #[inline(always)]
    unsafe fn d<const F: u8>(&self, b: usize) -> (float32x4_t, float32x4_t) {
        // SAFETY: the contract is scales_f32's.
        unsafe { scales_f32::<F>(&self.0.map(|p| p.add(b * block_bytes(F)))) }
    }

    #[inline(always)]
    fn prefetch<const F: u8>(&self, b: usize) {
        for &p in &self.0 {
            prefetch::<F>(p.wrapping_add(b * block_bytes(F)));
        }
    }
}

impl Src for Group {
    #[inline(always)]
    unsafe fn codes<const F: u8, const C: usize>(&self, b: usize) -> [[int8x16_t; 2]; R] {
        let (qs, qh) = chunk_at(F, C);
        // `q4_k`'s quant bytes start after its 16 scale bytes, `q6_k`'s at 0.
        let (qs, qh) = if F == Q4K { (qs - 16, qh) } else { (qs, qh) };
        // SAFETY: a run of 4 bytes of the four rows is 16 bytes of the group, so ggml byte
        // `o` of the rows' super-block `b` lies at `4·o` of its quants: the 32 bytes at
        // `qs` (and `qh`) are 128 there, inside them by the contract. `ld4` of 32-bit
        // elements de-interleaves the runs back into one register per row.
        unsafe {
            let at = self.q.add(b * group_bytes(F).0);
            // Half `h` (16 bytes) of each row, decoded before the next is loaded.
            let half = |h: usize| {
                let p = vld4q_u32(at.add(4 * qs + 64 * h).cast());
                let q = if F == Q4K {
                    p
                } else {
                    vld4q_u32(at.add(4 * qh + 64 * h).cast())
                };
                let u = vreinterpretq_u8_u32;
                [
                    decode::<F, C>(u(p.0), u(q.0)),
                    decode::<F, C>(u(p.1), u(q.1)),
                    decode::<F, C>(u(p.2), u(q.2)),
                    decode::<F, C>(u(p.3), u(q.3)),
                ]
            };
            let (lo, hi) = (half(0), half(1));
            core::array::from_fn(|i| [lo[i], hi[i]])
        }
    }

    #[inline(always)]
    unsafe fn k4<const F: u8>(&self, b: usize, i: usize) -> (int16x8_t, int16x8_t) {
        // SAFETY: the group's `q4_k` scales: the three words of row `i` at 16, 32 and 48
        // plus 4·i (Geometry::scale_at), inside super-block `b`'s 64 bytes.
        unsafe { k4_scales(self.s.add(b * group_bytes(F).1 + 16 + 4 * i), 16) }
    }

    #[inline(always)]
    unsafe fn k6(&self, b: usize, i: usize) -> [int16x8_t; 2] {
        // SAFETY: row `i`'s 16 scales at 16·i of super-block `b`'s 72 bytes.
        unsafe { k6_scales(self.s.add(b * group_bytes(Q6K).1 + 16 * i)) }
    }

    #[inline(always)]
    unsafe fn d<const F: u8>(&self, b: usize) -> (float32x4_t, float32x4_t) {
        // SAFETY: the contract is group_d's.
        unsafe { group_d::<F>(self.s.add(b * group_bytes(F).1)) }
    }

    #[inline(always)]
    fn prefetch<const F: u8>(&self, _: usize) {}
}

/// The f32 `d` (and `dmin`) of a group's four rows, from its scales of one super-block at `s`:
/// `q4_k` stores the 4 `d` then the 4 `dmin` first, `q6_k` its 4 `d` at 64.
///
/// SAFETY: `s` points at a group's scales of one super-block of format `F`.
#[inline(always)]
unsafe fn group_d<const F: u8>(s: *const u8) -> (float32x4_t, float32x4_t) {
    // SAFETY: 16 bytes at 0 (`q4_k`) or 8 at 64 (`q6_k`) are inside them; NEON is baseline.
    unsafe {
        if F == Q6K {
            let h = vld1_u16(s.add(64).cast());
            let [d, _] = widen8(vcombine_u16(h, vdup_n_u16(0)));
            return (d, d);
        }
        let [d, dmin] = widen8(vld1q_u16(s.cast()));
        (d, dmin)
    }
}

impl<S> Tile<S> {
    /// Stores the lanes of `v` (rows) for token `t`.
    ///
    /// SAFETY: `out` is valid for `rows` floats at `t·stride`.
    #[inline(always)]
    unsafe fn store(&self, t: usize, v: float32x4_t) {
        // SAFETY: writes `rows` floats at `t·stride`, as the contract allows.
        unsafe {
            let o = self.out.add(t * self.stride);
            if self.rows == R {
                vst1q_f32(o, v);
            } else {
                let mut lanes = [0f32; R];
                vst1q_f32(lanes.as_mut_ptr(), v);
                core::ptr::copy_nonoverlapping(lanes.as_ptr(), o, self.rows);
            }
        }
    }
}

/// Prefetches the lines of the super-block `PREFETCH` bytes past `p`.
#[inline(always)]
fn prefetch<const F: u8>(p: *const u8) {
    let mut line = 0;
    while line < block_bytes(F) {
        // SAFETY: a prefetch is a hint: it never faults, whatever the address.
        unsafe {
            asm!(
                "prfm pldl1keep, [{p}]",
                p = in(reg) p.wrapping_add(PREFETCH + line),
                options(nostack, preserves_flags, readonly),
            );
        }
        line += 64;
    }
}

/// `fcvtl`/`fcvtl2`: the low and the high four f16 of `h` as f32 (exact).
#[inline(always)]
fn widen8(h: uint16x8_t) -> [float32x4_t; 2] {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: register arithmetic only (ARMv8.0).
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            h = in(vreg) h,
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    [lo, hi]
}

/// The f32 scales `d` (at byte `at`) and `dmin` (at byte 2, `q4_k`/`q5_k`) of 4 rows'
/// super-blocks, lanes the rows, converted together.
///
/// SAFETY: each `p[i]` points at a whole super-block of format `F`.
#[inline(always)]
unsafe fn scales_f32<const F: u8>(p: &[*const u8; R]) -> (float32x4_t, float32x4_t) {
    // SAFETY: the reads stay inside the super-blocks (bytes 0..4, or 208..210 for q6_k);
    // NEON is baseline.
    unsafe {
        let read = |p: *const u8| p.cast::<u32>().read_unaligned().to_le();
        if F == Q6K {
            let h = |i: usize| u32::from(p[i].add(208).cast::<u16>().read_unaligned().to_le());
            let v = vcombine_u32(
                vcreate_u32(u64::from(h(0) | h(1) << 16) | u64::from(h(2) | h(3) << 16) << 32),
                vdup_n_u32(0),
            );
            let [d, _] = widen8(vreinterpretq_u16_u32(v));
            return (d, d);
        }
        let mut v = vdupq_n_u32(0);
        v = vsetq_lane_u32::<0>(read(p[0]), v);
        v = vsetq_lane_u32::<1>(read(p[1]), v);
        v = vsetq_lane_u32::<2>(read(p[2]), v);
        v = vsetq_lane_u32::<3>(read(p[3]), v);
        // [d0, dmin0, d1, dmin1] and [d2, dmin2, d3, dmin3].
        let [lo, hi] = widen8(vreinterpretq_u16_u32(v));
        (vuzp1q_f32(lo, hi), vuzp2q_f32(lo, hi))
    }
}

/// `TT` tokens × 4 rows on level `D`: one float sum per token whose lanes are the rows.
///
/// SAFETY: the tile's rows hold `nb` super-blocks of `F`, its `TT` tokens `nb` super-blocks
/// each, and `out` has room for `rows` floats at `t·stride` for each `t < TT`.
#[inline(always)]
unsafe fn dot_tile<D: KDot, S: Src, const F: u8, const TT: usize, const PF: bool>(tile: &Tile<S>) {
    let k6 = F == Q6K;
    // SAFETY: super-block `b < nb` of each row and of each token `t < TT` exists, and `store`
    // writes token `t < TT`, by the contract; NEON is baseline.
    unsafe {
        let mut sum = [vdupq_n_f32(0.0); TT];
        for b in 0..tile.nb {
            if PF {
                tile.w.prefetch::<F>(b);
            }
            let x: [&Q8KBlock; TT] = core::array::from_fn(|t| &*tile.x.add(t * tile.nb + b));
            let zero = vdupq_n_s32(0);
            let mut acc = [[D::start(zero); R]; TT];
            let mut mins = [[zero; R]; TT];
            let mut sc = [D::scales::<false>([vdupq_n_s16(0); 2]); R];
            // A loop, not closures: closures may stay out of line, outside the function
            // compiled with the level's features.
            for i in 0..R {
                if k6 {
                    let s = tile.w.k6(b, i);
                    sc[i] = D::scales::<true>(s);
                    // The codes' −32, from the sums of 16: `−32·Σ_j scale_j·bsum_j`.
                    let neg = [vmulq_n_s16(s[0], -32), vmulq_n_s16(s[1], -32)];
                    for (t, x) in x.iter().enumerate() {
                        let bs = vld1q_s16_x2(x.bsums.as_ptr());
                        let bias = vaddq_s32(dot16(neg[0], bs.0), dot16(neg[1], bs.1));
                        acc[t][i] = D::start(bias);
                    }
                } else {
                    let (s, m) = tile.w.k4::<F>(b, i);
                    sc[i] = D::scales::<false>([s, vdupq_n_s16(0)]);
                    for (t, x) in x.iter().enumerate() {
                        let bs = vld1q_s16_x2(x.bsums.as_ptr());
                        mins[t][i] = dot16(m, vpaddq_s16(bs.0, bs.1));
                    }
                }
            }
            chunks!(|C, L, E, O| {
                let w = tile.w.codes::<F, C>(b);
                for (t, x) in x.iter().enumerate() {
                    let a = vld1q_s8_x2(x.qs.as_ptr().add(32 * C));
                    let a = [a.0, a.1];
                    for ((acc, sc), w) in acc[t].iter_mut().zip(&sc).zip(&w) {
                        *acc = if k6 {
                            D::chunk::<true, C, L, E, O>(*acc, sc, w, &a)
                        } else {
                            D::chunk::<false, C, L, E, O>(*acc, sc, w, &a)
                        };
                    }
                }
            });
            let (d, dmin) = tile.w.d::<F>(b);
            for (t, x) in x.iter().enumerate() {
                let dots = vcvtq_f32_s32(sum4(acc[t].map(D::total)));
                let term = vmulq_f32(vmulq_n_f32(d, x.d), dots);
                let term = if k6 {
                    term
                } else {
                    let m = vcvtq_f32_s32(sum4(mins[t]));
                    vsubq_f32(term, vmulq_f32(vmulq_n_f32(dmin, x.d), m))
                };
                sum[t] = vaddq_f32(sum[t], term);
            }
        }
        for (t, &s) in sum.iter().enumerate() {
            tile.store(t, s);
        }
    }
}

/// `tbl` indices that gather byte `k` of each row's 4 (lanes `4r + k`) into lane `r` of an
/// i32 vector, zero-extended (an index past the table reads 0).
const fn spread32(k: u8) -> [u8; 16] {
    let mut v = [0xff; 16];
    let mut r = 0;
    while r < 4 {
        v[4 * r] = 4 * r as u8 + k;
        r += 1;
    }
    v
}

/// Two-register `tbl` indices: byte `k` of each row's 4 in register 0, then in register 1,
/// into the i16 lanes `r` and `4 + r`, zero-extended.
const fn spread16(k: u8) -> [u8; 16] {
    let mut v = [0xff; 16];
    let mut r = 0;
    while r < 4 {
        v[2 * r] = 4 * r as u8 + k;
        v[8 + 2 * r] = 16 + 4 * r as u8 + k;
        r += 1;
    }
    v
}

/// Four-register `tbl` indices over a group's `q6_k` scales (row `r`'s 16 at `16·r`): lane
/// `4m + r` gets row `r`'s scale of the sub-block [`lanes_q6`] takes `4q + m`-th.
const fn gather6(q: usize) -> [u8; 16] {
    let mut v = [0; 16];
    let mut m = 0;
    while m < 4 {
        let mut r = 0;
        while r < 4 {
            v[4 * m + r] = (16 * r + 8 * (q / 2) + 2 * m + q % 2) as u8;
            r += 1;
        }
        m += 1;
    }
    v
}

static SPREAD32: [[u8; 16]; 4] = [spread32(0), spread32(1), spread32(2), spread32(3)];
static SPREAD16: [[u8; 16]; 4] = [spread16(0), spread16(1), spread16(2), spread16(3)];
static GATHER6: [[u8; 16]; 4] = [gather6(0), gather6(1), gather6(2), gather6(3)];

/// `c + Σ_k sdot(w[k], a.4b[k])` over 4 registers: bytes `4k..4k+4` of `a` meet `w[k]`.
#[inline(always)]
fn dot4(c: int32x4_t, w: &[int8x16_t], a: int8x16_t) -> int32x4_t {
    let c = sdot_lane::<0>(c, w[0], a);
    let c = sdot_lane::<1>(c, w[1], a);
    let c = sdot_lane::<2>(c, w[2], a);
    sdot_lane::<3>(c, w[3], a)
}

/// `acc + Σ_m lo/hi[m]·bs[L_m]`: the i16 row vectors `[m0 | m1]`, `[m2 | m3]` each by a lane
/// of `bs`.
#[inline(always)]
fn mul4<const A: i32, const B: i32, const C: i32, const D: i32>(
    acc: int32x4_t,
    lo: int16x8_t,
    hi: int16x8_t,
    bs: int16x8_t,
) -> int32x4_t {
    // SAFETY: register arithmetic; NEON is baseline.
    unsafe {
        let acc = vmlal_laneq_s16::<A>(acc, vget_low_s16(lo), bs);
        let acc = vmlal_high_laneq_s16::<B>(acc, lo, bs);
        let acc = vmlal_laneq_s16::<C>(acc, vget_low_s16(hi), bs);
        vmlal_high_laneq_s16::<D>(acc, hi, bs)
    }
}

/// Sub-block `J`'s scales (or steps) of the four rows as i32 lanes, from the unpacked 6-bit
/// values (lanes `4r + j`) of sub-blocks 0..4 (`lo`) and 4..8 (`hi`).
#[inline(always)]
fn q4_scale<const J: usize>(lo: uint8x16_t, hi: uint8x16_t) -> int32x4_t {
    // SAFETY: register arithmetic and a read of a static; NEON is baseline.
    unsafe {
        let spread = vld1q_u8(SPREAD32[J % 4].as_ptr());
        vreinterpretq_s32_u8(vqtbl1q_u8(if J < 4 { lo } else { hi }, spread))
    }
}

/// Sub-block pair `P` of a group's `q4_k` super-block (quants at `q`) against `TT` tokens:
/// register `u` holds `qs` bytes `32P + 4u..+4` of each row, whose low nibbles are values
/// `64P + 4u..` and high ones `64P + 32 + 4u..`, met by `sdot` by element with the token's 16
/// values from `64P + 16·(u / 4)` (or `+ 32`), lane `u % 4`. Four registers at a time, loaded
/// again for the high nibbles, keep the tile within the register file.
///
/// SAFETY: `q` points at a group's `q4_k` quants of one super-block, `x[t]` at a token's
/// matching super-block; the CPU has dotprod.
#[inline(always)]
unsafe fn q4_pair<const TT: usize, const P: usize>(
    q: *const u8,
    x: &[&Q8KBlock; TT],
    c: &mut [int32x4_t; TT],
    acc: &mut [int32x4_t; TT],
    steps: [int32x4_t; 2],
) {
    // SAFETY: bytes `128P..128P + 128` of the group's 512, and values `64P..64P + 64` of each
    // token; NEON is baseline, dotprod the contract's.
    unsafe {
        let m0f = vdupq_n_u8(0x0f);
        for (half, &step) in steps.iter().enumerate() {
            for v in 0..2 {
                let w = vld1q_u8_x4(q.add(128 * P + 64 * v));
                let codes = if half == 0 {
                    [w.0, w.1, w.2, w.3].map(|w| vreinterpretq_s8_u8(vandq_u8(w, m0f)))
                } else {
                    [w.0, w.1, w.2, w.3].map(|w| vreinterpretq_s8_u8(vshrq_n_u8::<4>(w)))
                };
                for (c, x) in c.iter_mut().zip(x) {
                    let a = vld1q_s8(x.qs.as_ptr().add(64 * P + 32 * half + 16 * v));
                    *c = dot4(*c, &codes, a);
                }
            }
            for (acc, &c) in acc.iter_mut().zip(c.iter()) {
                *acc = vmlaq_s32(*acc, c, step);
            }
        }
    }
}

/// `q4_k` super-block of a 4×4 group (quants at `q`, scales at `s`) against `TT` tokens: per
/// token the integer dots and mins sums, lanes the rows.
///
/// The group's three 32-bit scale words of each row are three registers (lanes `4r + k`), from
/// which six instructions unpack the 8 scales and 8 mins of the 4 rows, and a `tbl` each
/// spreads sub-block `j`'s over the rows' i32 lanes. The running sum `C` and its steps are the
/// ggml-rows kernels'.
///
/// SAFETY: `q`, `s` point at a group's `q4_k` quants and scales of one super-block, `x[t]` at
/// a token's matching super-block; the CPU has dotprod.
#[inline(always)]
unsafe fn lanes_q4<const TT: usize>(
    q: *const u8,
    s: *const u8,
    x: &[&Q8KBlock; TT],
) -> ([int32x4_t; TT], [int32x4_t; TT]) {
    // SAFETY: reads the group's 64 scale bytes (the words at 16, 32, 48) and each token's
    // sums; the quants as `q4_pair`'s contract says; NEON is baseline.
    unsafe {
        let (va, vb, vc) = (
            vld1q_u8(s.add(16)),
            vld1q_u8(s.add(32)),
            vld1q_u8(s.add(48)),
        );
        let m3f = vdupq_n_u8(0x3f);
        // ggml's kmask unpacking, lanes `4r + j`: scales and mins 0..4 are the low 6 bits of
        // words 0 and 1; 4..8 the nibbles of word 2 below the top 2 bits of words 0 and 1.
        let (lo, hi) = (vandq_u8(va, m3f), vsliq_n_u8::<4>(vc, vshrq_n_u8::<6>(va)));
        let mn = uint8x16x2_t(vandq_u8(vb, m3f), vsriq_n_u8::<4>(vshrq_n_u8::<2>(vb), vc));
        let zero = vdupq_n_s32(0);
        let mut mins = [zero; TT];
        for (m, x) in mins.iter_mut().zip(x) {
            let bs = vld1q_s16_x2(x.bsums.as_ptr());
            let pairs = vpaddq_s16(bs.0, bs.1);
            let spread =
                |k: usize| vreinterpretq_s16_u8(vqtbl2q_u8(mn, vld1q_u8(SPREAD16[k].as_ptr())));
            *m = mul4::<0, 4, 1, 5>(zero, spread(0), spread(1), pairs);
            *m = mul4::<2, 6, 3, 7>(*m, spread(2), spread(3), pairs);
        }
        let sc = [
            q4_scale::<0>(lo, hi),
            q4_scale::<1>(lo, hi),
            q4_scale::<2>(lo, hi),
            q4_scale::<3>(lo, hi),
            q4_scale::<4>(lo, hi),
            q4_scale::<5>(lo, hi),
            q4_scale::<6>(lo, hi),
            q4_scale::<7>(lo, hi),
        ];
        let step = |j: usize| {
            if j == 7 {
                sc[7]
            } else {
                vsubq_s32(sc[j], sc[j + 1])
            }
        };
        let (mut c, mut acc) = ([zero; TT], [zero; TT]);
        q4_pair::<TT, 0>(q, x, &mut c, &mut acc, [step(0), step(1)]);
        q4_pair::<TT, 1>(q, x, &mut c, &mut acc, [step(2), step(3)]);
        q4_pair::<TT, 2>(q, x, &mut c, &mut acc, [step(4), step(5)]);
        q4_pair::<TT, 3>(q, x, &mut c, &mut acc, [step(6), step(7)]);
        (acc, mins)
    }
}

/// Scales `4G..4G + 4` in [`lanes_q6`]'s order of a group's `q6_k` super-block (`table`: row
/// `r`'s 16 signed scales in register `r`) as i32 lanes per row, and as i16 pairs `[m0 | m1]`,
/// `[m2 | m3]` for the `−32` term.
#[inline(always)]
fn q6_scales<const G: usize>(table: uint8x16x4_t) -> ([int32x4_t; 4], [int16x8_t; 2]) {
    // SAFETY: register arithmetic and a read of a static; NEON is baseline.
    unsafe {
        let idx = vld1q_u8(GATHER6[G].as_ptr());
        let v = vreinterpretq_s8_u8(vqtbl4q_u8(table, idx));
        let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        let s = [
            vmovl_s16(vget_low_s16(lo)),
            vmovl_high_s16(lo),
            vmovl_s16(vget_low_s16(hi)),
            vmovl_high_s16(hi),
        ];
        (s, [lo, hi])
    }
}

/// Codes `128H + 32K + 16SH + 4u..+4` of each row in register `u`, from the `ql` registers
/// (`l`, those of `K % 2`) and the `qh` ones (`h`, and `h2` shifted right by 2), as
/// [`decode`] forms them.
#[inline(always)]
fn q6_codes<const K: usize>(
    l: &[uint8x16_t; 4],
    h: &[uint8x16_t; 4],
    h2: &[uint8x16_t; 4],
) -> [int8x16_t; 4] {
    // SAFETY: register arithmetic; NEON is baseline.
    unsafe {
        let (m3f, m30) = (vdupq_n_u8(0x3f), vdupq_n_u8(0x30));
        core::array::from_fn(|u| {
            vreinterpretq_s8_u8(match K {
                0 => vandq_u8(vsliq_n_u8::<4>(l[u], h[u]), m3f),
                1 => vandq_u8(vsliq_n_u8::<4>(l[u], h2[u]), m3f),
                2 => sri4(vandq_u8(h[u], m30), l[u]),
                _ => sri4(h2[u], l[u]),
            })
        })
    }
}

/// `sri #4`: `a`'s high nibbles above `b`'s, as one instruction (LLVM rewrites `vsriq_n_u8`
/// into a mask and a shifted add).
#[inline(always)]
fn sri4(mut a: uint8x16_t, b: uint8x16_t) -> uint8x16_t {
    // SAFETY: register arithmetic only (ARMv8.0).
    unsafe {
        asm!(
            "sri {a:v}.16b, {b:v}.16b, #4",
            a = inout(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    a
}

/// Part `(H, SH)` of a group's `q6_k` super-block: three `ld1` of 4 registers give the `qh`
/// and the two `ql` registers behind codes `128H + 32k + 16SH + 4u..+4` (`k` 0..4, `u` the
/// register), each `k` met by `sdot` by element with the token's 16 values there and then
/// scaled by `steps[k]`.
///
/// SAFETY: `q` points at a group's `q6_k` quants of one super-block, `x[t]` at a token's
/// matching super-block; the CPU has dotprod.
#[inline(always)]
unsafe fn q6_part<const TT: usize, const H: usize, const SH: usize>(
    q: *const u8,
    x: &[&Q8KBlock; TT],
    c: &mut [int32x4_t; TT],
    acc: &mut [int32x4_t; TT],
    steps: [int32x4_t; 4],
) {
    // SAFETY: 64 bytes each at `512 + 128H + 64SH` (`qh`), `256H + 64SH` and `+ 128` (`ql`)
    // of the group's 768, values `128H..128H + 128` of each token; NEON is baseline, dotprod
    // the contract's.
    unsafe {
        let regs = |v: uint8x16x4_t| [v.0, v.1, v.2, v.3];
        let h = regs(vld1q_u8_x4(q.add(512 + 128 * H + 64 * SH)));
        let l0 = regs(vld1q_u8_x4(q.add(256 * H + 64 * SH)));
        let l1 = regs(vld1q_u8_x4(q.add(256 * H + 128 + 64 * SH)));
        let mut h2 = h;
        for v in &mut h2 {
            *v = vshrq_n_u8::<2>(*v);
        }
        let codes = [
            q6_codes::<0>(&l0, &h, &h2),
            q6_codes::<1>(&l1, &h, &h2),
            q6_codes::<2>(&l0, &h, &h2),
            q6_codes::<3>(&l1, &h, &h2),
        ];
        for (k, (codes, &step)) in codes.iter().zip(&steps).enumerate() {
            for ((c, acc), x) in c.iter_mut().zip(acc.iter_mut()).zip(x) {
                let a = vld1q_s8(x.qs.as_ptr().add(128 * H + 32 * k + 16 * SH));
                *c = dot4(*c, codes, a);
                *acc = vmlaq_s32(*acc, *c, step);
            }
        }
    }
}

/// `q6_k` super-block of a 4×4 group against `TT` tokens: per token the integer sum (the
/// `−32` included), lanes the rows. Sub-blocks go in the order `(h, sh, k)` of [`q6_part`], so
/// the steps of the running sum are those of the scales gathered in that order.
///
/// SAFETY: as [`lanes_q4`] for `q6_k`.
#[inline(always)]
unsafe fn lanes_q6<const TT: usize>(
    q: *const u8,
    s: *const u8,
    x: &[&Q8KBlock; TT],
) -> [int32x4_t; TT] {
    // SAFETY: reads the group's 64 signed scales and each token's sums; the quants as
    // `q6_part`'s contract says; NEON is baseline.
    unsafe {
        let table = vld1q_u8_x4(s);
        let (s0, w0) = q6_scales::<0>(table);
        let (s1, w1) = q6_scales::<1>(table);
        let (s2, w2) = q6_scales::<2>(table);
        let (s3, w3) = q6_scales::<3>(table);
        let zero = vdupq_n_s32(0);
        // The codes' −32: `−32·Σ_j scale_j·bsum_j`, the sums' start.
        let mut acc = [zero; TT];
        for (acc, x) in acc.iter_mut().zip(x) {
            let bs = vld1q_s16_x2(x.bsums.as_ptr());
            let mut bias = mul4::<0, 2, 4, 6>(zero, w0[0], w0[1], bs.0);
            bias = mul4::<1, 3, 5, 7>(bias, w1[0], w1[1], bs.0);
            bias = mul4::<0, 2, 4, 6>(bias, w2[0], w2[1], bs.1);
            bias = mul4::<1, 3, 5, 7>(bias, w3[0], w3[1], bs.1);
            *acc = vnegq_s32(vshlq_n_s32::<5>(bias));
        }
        let steps = |s: [int32x4_t; 4], next: int32x4_t| {
            [
                vsubq_s32(s[0], s[1]),
                vsubq_s32(s[1], s[2]),
                vsubq_s32(s[2], s[3]),
                vsubq_s32(s[3], next),
            ]
        };
        let mut c = [zero; TT];
        q6_part::<TT, 0, 0>(q, x, &mut c, &mut acc, steps(s0, s1[0]));
        q6_part::<TT, 0, 1>(q, x, &mut c, &mut acc, steps(s1, s2[0]));
        q6_part::<TT, 1, 0>(q, x, &mut c, &mut acc, steps(s2, s3[0]));
        q6_part::<TT, 1, 1>(q, x, &mut c, &mut acc, steps(s3, zero));
        acc
    }
}

/// `TT` tokens × a 4×4 group with `sdot` by element: the rows are the lanes of every sum, so
/// nothing is reduced; the float tail is the reference's, as in [`dot_tile`].
///
/// SAFETY: the tile is a whole group of `q4_k` or `q6_k` with `nb` super-blocks, its `TT`
/// tokens have `nb` super-blocks each, `out` has room for 4 floats at `t·stride` for each
/// `t < TT`, and the CPU has dotprod.
#[inline(always)]
unsafe fn lanes_tile<const F: u8, const TT: usize>(tile: &Tile<Group>) {
    let (qb, sb) = group_bytes(F);
    // SAFETY: super-block `b < nb` of the group and of each token `t < TT` exists, and
    // `store` writes token `t < TT`, by the contract.
    unsafe {
        let mut sum = [vdupq_n_f32(0.0); TT];
        for b in 0..tile.nb {
            let (q, s) = (tile.w.q.add(b * qb), tile.w.s.add(b * sb));
            let x: [&Q8KBlock; TT] = core::array::from_fn(|t| &*tile.x.add(t * tile.nb + b));
            let (d, dmin) = group_d::<F>(s);
            if F == Q6K {
                let acc = lanes_q6::<TT>(q, s, &x);
                for t in 0..TT {
                    let term = vmulq_f32(vmulq_n_f32(d, x[t].d), vcvtq_f32_s32(acc[t]));
                    sum[t] = vaddq_f32(sum[t], term);
                }
            } else {
                let (acc, mins) = lanes_q4::<TT>(q, s, &x);
                for t in 0..TT {
                    let term = vmulq_f32(vmulq_n_f32(d, x[t].d), vcvtq_f32_s32(acc[t]));
                    let m = vmulq_f32(vmulq_n_f32(dmin, x[t].d), vcvtq_f32_s32(mins[t]));
                    sum[t] = vaddq_f32(sum[t], vsubq_f32(term, m));
                }
            }
        }
        for (t, &s) in sum.iter().enumerate() {
            tile.store(t, s);
        }
    }
}

/// How the tiles of a product are computed: one type per level, so that code for a level is
/// only ever instantiated inside the functions compiled for it.
trait Tiles {
    /// Tokens a tile takes at most.
    const TOKENS: usize;
    /// The tile at `tile` for `tokens` (1 to [`Self::TOKENS`]) tokens of `n`.
    ///
    /// SAFETY: as [`dot_tile`] for `tokens` tokens, and the CPU has the level's features.
    unsafe fn tile<const F: u8>(tile: &Tile<Rows>, tokens: usize, n: usize);
    /// Tokens a 4×4 group's tile takes at most.
    const GROUP_TOKENS: usize;
    /// A 4×4 group's tile for `tokens` (1 to [`Self::GROUP_TOKENS`]) tokens.
    ///
    /// SAFETY: as [`Tiles::tile`], the rows a whole group of `q4_k` or `q6_k`.
    unsafe fn group<const F: u8>(tile: &Tile<Group>, tokens: usize);
}

/// [`Tiles::tile`] with [`dot_tile`] on level `D`.
///
/// SAFETY: as [`Tiles::tile`], with `tokens ≤ 2`.
#[inline(always)]
unsafe fn rows_tile<D: KDot, const F: u8>(tile: &Tile<Rows>, tokens: usize, n: usize) {
    // SAFETY: the caller's contract, for `tokens` tokens.
    unsafe {
        match tokens {
            2 => dot_tile::<D, Rows, F, 2, false>(tile),
            _ if n == 1 => dot_tile::<D, Rows, F, 1, true>(tile),
            _ => dot_tile::<D, Rows, F, 1, false>(tile),
        }
    }
}

impl Tiles for Neon {
    const TOKENS: usize = 2;
    const GROUP_TOKENS: usize = 2;

    #[inline(always)]
    unsafe fn tile<const F: u8>(tile: &Tile<Rows>, tokens: usize, n: usize) {
        // SAFETY: the caller's contract.
        unsafe { rows_tile::<Neon, F>(tile, tokens, n) }
    }

    #[inline(always)]
    unsafe fn group<const F: u8>(tile: &Tile<Group>, tokens: usize) {
        // SAFETY: the caller's contract, for `tokens ≤ 2` tokens.
        unsafe {
            match tokens {
                2 => dot_tile::<Neon, Group, F, 2, false>(tile),
                _ => dot_tile::<Neon, Group, F, 1, false>(tile),
            }
        }
    }
}

impl Tiles for Dotprod {
    const TOKENS: usize = 2;
    const GROUP_TOKENS: usize = 4;

    #[inline(always)]
    unsafe fn tile<const F: u8>(tile: &Tile<Rows>, tokens: usize, n: usize) {
        // SAFETY: the caller's contract.
        unsafe { rows_tile::<Dotprod, F>(tile, tokens, n) }
    }

    #[inline(always)]
    unsafe fn group<const F: u8>(tile: &Tile<Group>, tokens: usize) {
        // SAFETY: the caller's contract; dotprod is available.
        unsafe { lanes_any::<F>(tile, tokens) }
    }
}

/// [`lanes_tile`] for 1 to 4 tokens: `q6_k` in one tile, `q4_k` (whose codes cost less to
/// decode again than four tokens' registers) in tiles of at most two.
///
/// SAFETY: as [`lanes_tile`] for `tokens` tokens.
#[inline(always)]
unsafe fn lanes_any<const F: u8>(tile: &Tile<Group>, tokens: usize) {
    // SAFETY: the caller's contract, each tile for its tokens `first..`.
    unsafe {
        if F == Q6K {
            return match tokens {
                4 => lanes_tile::<F, 4>(tile),
                3 => lanes_tile::<F, 3>(tile),
                2 => lanes_tile::<F, 2>(tile),
                _ => lanes_tile::<F, 1>(tile),
            };
        }
        let mut first = 0;
        while first < tokens {
            let part = Tile {
                x: tile.x.add(first * tile.nb),
                out: tile.out.add(first * tile.stride),
                ..*tile
            };
            if tokens - first >= 2 {
                lanes_tile::<F, 2>(&part);
            } else {
                lanes_tile::<F, 1>(&part);
            }
            first += 2;
        }
    }
}

/// `[v_u, v_u, w_u, w_u]` for each of the 16 lanes `u` of `v` and `w` (4 registers each): the
/// factor of unit `u` for `smmla` lanes `[r0t0, r0t1, r1t0, r1t1]`.
#[inline(always)]
fn pair_lanes(v: &[int32x4_t; 4], w: &[int32x4_t; 4]) -> [int32x4_t; 16] {
    // SAFETY: register shuffles; NEON is baseline.
    unsafe {
        let mut out = [vdupq_n_s32(0); 16];
        for k in 0..4 {
            let (lo, hi) = (vzip1q_s32(v[k], w[k]), vzip2q_s32(v[k], w[k]));
            out[4 * k] = vzip1q_s32(lo, lo);
            out[4 * k + 1] = vzip2q_s32(lo, lo);
            out[4 * k + 2] = vzip1q_s32(hi, hi);
            out[4 * k + 3] = vzip2q_s32(hi, hi);
        }
        out
    }
}

/// `2·TP` tokens (the last one repeated when `tokens` is fewer) × 4 rows with `smmla`: per
/// (row pair, token pair) a running sum `C` and `A += C·step_u` after each unit `u` (a
/// `q4_k`/`q5_k` sub-block or a `q6_k` one), lanes `[r0t0, r0t1, r1t0, r1t1]`.
///
/// SAFETY: as [`dot_tile`] for `tokens ≤ 2·TP` tokens, and the CPU has i8mm.
#[inline(always)]
unsafe fn mmla_tile<const F: u8, const TP: usize>(tile: &Tile<Rows>, tokens: usize) {
    let bb = block_bytes(F);
    let k6 = F == Q6K;
    // SAFETY: tokens `< tokens` exist by the contract (later ones repeat the last), and so do
    // super-block `b < nb` of each of them and of each row; stores go to rows `< rows` of
    // tokens `< tokens`; NEON is baseline.
    unsafe {
        let x: [[*const Q8KBlock; 2]; TP] = core::array::from_fn(|p| {
            core::array::from_fn(|j| tile.x.add((2 * p + j).min(tokens - 1) * tile.nb))
        });
        let mut sum = [[vdupq_n_f32(0.0); TP]; 2];
        for b in 0..tile.nb {
            let p: [*const u8; R] = core::array::from_fn(|i| tile.w.0[i].add(b * bb));
            let xb: [[&Q8KBlock; 2]; TP] = x.map(|x| x.map(|x| &*x.add(b)));
            let zero = vdupq_n_s32(0);
            // Per row: the steps of its scales; per (row, token): the start of the sum (q6_k's
            // −32) or the mins term, as vectors whose lane sums they are.
            let mut st = [[zero; 4]; R];
            let mut extra = [[[zero; 2]; TP]; R];
            for ((&p, st), extra) in p.iter().zip(&mut st).zip(&mut extra) {
                let (sc, m) = if k6 {
                    (k6_scales(p.add(192)), vdupq_n_s16(0))
                } else {
                    let (s, m) = k4_scales(p.add(4), 4);
                    ([s, vdupq_n_s16(0)], m)
                };
                *st = steps(sc);
                let neg = [vmulq_n_s16(sc[0], -32), vmulq_n_s16(sc[1], -32)];
                for (extra, xb) in extra.iter_mut().zip(&xb) {
                    for (extra, x) in extra.iter_mut().zip(xb) {
                        let bs = vld1q_s16_x2(x.bsums.as_ptr());
                        *extra = if k6 {
                            vaddq_s32(dot16(neg[0], bs.0), dot16(neg[1], bs.1))
                        } else {
                            dot16(m, vpaddq_s16(bs.0, bs.1))
                        };
                    }
                }
            }
            let fac = [pair_lanes(&st[0], &st[1]), pair_lanes(&st[2], &st[3])];
            let mut c = [[zero; TP]; 2];
            let mut acc = [[zero; TP]; 2];
            let mut mins = [[zero; TP]; 2];
            for rp in 0..2 {
                for tp in 0..TP {
                    let (e0, e1) = (extra[2 * rp][tp], extra[2 * rp + 1][tp]);
                    let v = sum4([e0[0], e0[1], e1[0], e1[1]]);
                    if k6 {
                        acc[rp][tp] = v;
                    } else {
                        mins[rp][tp] = v;
                    }
                }
            }
            chunks!(|C, L, E, O| {
                let _ = (L, E, O);
                let w = Rows(p).codes::<F, C>(0);
                let wm: [[int8x16_t; 4]; 2] = core::array::from_fn(|rp| {
                    let (w0, w1) = (w[2 * rp], w[2 * rp + 1]);
                    pair(w0[0], w0[1], w1[0], w1[1])
                });
                for (tp, xb) in xb.iter().enumerate() {
                    let a0 = vld1q_s8_x2(xb[0].qs.as_ptr().add(32 * C));
                    let a1 = vld1q_s8_x2(xb[1].qs.as_ptr().add(32 * C));
                    let am = pair(a0.0, a0.1, a1.0, a1.1);
                    for (rp, wm) in wm.iter().enumerate() {
                        let (mut cc, mut a) = (c[rp][tp], acc[rp][tp]);
                        if k6 {
                            cc = smmla(smmla(cc, wm[0], am[0]), wm[1], am[1]);
                            a = vmlaq_s32(a, cc, fac[rp][2 * C]);
                            cc = smmla(smmla(cc, wm[2], am[2]), wm[3], am[3]);
                            a = vmlaq_s32(a, cc, fac[rp][2 * C + 1]);
                        } else {
                            for (&w, &a) in wm.iter().zip(&am) {
                                cc = smmla(cc, w, a);
                            }
                            a = vmlaq_s32(a, cc, fac[rp][C]);
                        }
                        (c[rp][tp], acc[rp][tp]) = (cc, a);
                    }
                }
            });
            let (d4, dmin4) = scales_f32::<F>(&p);
            // Lanes [r0, r0, r1, r1] of each row pair.
            let d = [vzip1q_f32(d4, d4), vzip2q_f32(d4, d4)];
            let dmin = [vzip1q_f32(dmin4, dmin4), vzip2q_f32(dmin4, dmin4)];
            for (rp, (&d, &dmin)) in d.iter().zip(&dmin).enumerate() {
                for (tp, xb) in xb.iter().enumerate() {
                    let dy = vld1q_f32([xb[0].d, xb[1].d, xb[0].d, xb[1].d].as_ptr());
                    let term = vmulq_f32(vmulq_f32(d, dy), vcvtq_f32_s32(acc[rp][tp]));
                    let term = if k6 {
                        term
                    } else {
                        let m = vcvtq_f32_s32(mins[rp][tp]);
                        vsubq_f32(term, vmulq_f32(vmulq_f32(dmin, dy), m))
                    };
                    sum[rp][tp] = vaddq_f32(sum[rp][tp], term);
                }
            }
        }
        for (rp, sum) in sum.iter().enumerate() {
            for (tp, &v) in sum.iter().enumerate() {
                let mut lanes = [0f32; 4];
                vst1q_f32(lanes.as_mut_ptr(), v);
                for (l, &v) in lanes.iter().enumerate() {
                    let (r, t) = (2 * rp + l / 2, 2 * tp + l % 2);
                    if r < tile.rows && t < tokens {
                        *tile.out.add(t * tile.stride + r) = v;
                    }
                }
            }
        }
    }
}

/// `smmla` for 2 to 4 tokens, `sdot` for one.
struct I8mm;

impl Tiles for I8mm {
    const TOKENS: usize = 4;
    const GROUP_TOKENS: usize = 4;

    #[inline(always)]
    unsafe fn tile<const F: u8>(tile: &Tile<Rows>, tokens: usize, n: usize) {
        // SAFETY: the caller's contract, for `tokens` tokens; i8mm and dotprod are available.
        unsafe {
            match tokens {
                3 | 4 => mmla_tile::<F, 2>(tile, tokens),
                2 => mmla_tile::<F, 1>(tile, tokens),
                _ if n == 1 => dot_tile::<Dotprod, Rows, F, 1, true>(tile),
                _ => dot_tile::<Dotprod, Rows, F, 1, false>(tile),
            }
        }
    }

    #[inline(always)]
    unsafe fn group<const F: u8>(tile: &Tile<Group>, tokens: usize) {
        // SAFETY: the caller's contract; dotprod is available.
        unsafe { lanes_any::<F>(tile, tokens) }
    }
}

/// [`q8k::gemm`] on level `L`, in tiles of 4 rows (4×4 groups, then any ggml rows) × up to
/// `L::GROUP_TOKENS` or `L::TOKENS` tokens; other layouts and formats take the reference.
#[inline(always)]
fn gemm<L: Tiles>(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    mut out: Out<'_>,
) {
    let f = match w.format {
        Format::Q4K => Q4K,
        Format::Q5K => Q5K,
        Format::Q6K => Q6K,
        _ => return q8k::gemm(w, rows, x, n, out),
    };
    let grouped = match w.layout {
        Layout::Rows => false,
        Layout::X4 if f != Q5K => true,
        _ => return q8k::gemm(w, rows, x, n, out),
    };
    let count = rows.len();
    if count == 0 || n == 0 {
        return;
    }
    let geo = w.geometry();
    let (nb, rb) = (geo.blocks, geo.row_bytes());
    assert!(x.len() >= n * nb && w.bytes.len() >= w.rows * rb && rows.end <= w.rows);
    // Rows `rows.start..split` are whole groups, the rest ggml rows (at `r·rb` either way).
    let split = if grouped {
        assert!(
            rows.start.is_multiple_of(GROUP),
            "rows start inside a group"
        );
        rows.end.min(geo.groups() * GROUP).max(rows.start)
    } else {
        rows.start
    };
    let (o, stride) = (out.checked(n, count), out.stride());
    let at = |r: usize| r - rows.start;
    for g in (rows.start..split).step_by(GROUP) {
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(L::GROUP_TOKENS);
            // SAFETY: group `g / GROUP < groups` holds `nb` super-blocks at `quants` and
            // `scales`, tokens `t0..t0 + nt ≤ n` have `nb` super-blocks in `x` (asserted), and
            // `o` holds `count` floats at `t·stride` for every `t < n` (`checked` above).
            unsafe {
                let base = w.bytes.as_ptr();
                let tile = Tile {
                    w: Group {
                        q: base.add(geo.quants(g / GROUP)),
                        s: base.add(geo.scales(g / GROUP)),
                    },
                    rows: R,
                    x: x.as_ptr().add(t0 * nb),
                    nb,
                    out: o.add(t0 * stride + at(g)),
                    stride,
                };
                match f {
                    Q4K => L::group::<Q4K>(&tile, nt),
                    _ => L::group::<Q6K>(&tile, nt),
                }
            }
            t0 += nt;
        }
    }
    let mut r0 = split;
    while r0 < rows.end {
        let nr = (rows.end - r0).min(R);
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(L::TOKENS);
            // SAFETY: rows `r0..r0 + nr ≤ rows.end` of `rb = nb·block bytes` at `r·rb` are
            // inside the bytes, tokens `t0..t0 + nt ≤ n` of `nb` super-blocks inside `x`
            // (asserted), and `o` holds `count` floats at `t·stride` for every `t < n`.
            unsafe {
                let tile = Tile {
                    w: Rows(core::array::from_fn(|i| {
                        w.bytes.as_ptr().add((r0 + i.min(nr - 1)) * rb)
                    })),
                    rows: nr,
                    x: x.as_ptr().add(t0 * nb),
                    nb,
                    out: o.add(t0 * stride + at(r0)),
                    stride,
                };
                match f {
                    Q4K => L::tile::<Q4K>(&tile, nt, n),
                    Q5K => L::tile::<Q5K>(&tile, nt, n),
                    _ => L::tile::<Q6K>(&tile, nt, n),
                }
            }
            t0 += nt;
        }
        r0 += nr;
    }
}

/// [`q8k::gemm`] with NEON (every aarch64 CPU).
pub fn gemm_neon(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    gemm::<Neon>(w, rows, x, n, out);
}

/// [`q8k::gemm`] with `sdot`.
#[target_feature(enable = "dotprod")]
pub fn gemm_dotprod(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    gemm::<Dotprod>(w, rows, x, n, out);
}

/// [`q8k::gemm`] with `smmla` (2 to 4 tokens) and `sdot` (one).
#[target_feature(enable = "dotprod,i8mm")]
pub fn gemm_i8mm(
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    x: &[Q8KBlock],
    n: usize,
    out: Out<'_>,
) {
    gemm::<I8mm>(w, rows, x, n, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::GemmQ8K;
    use crate::layout::Geometry;
    use crate::quant::SUPER_BLOCK;

    /// The kernels of the levels this CPU has.
    fn kernels() -> Vec<(&'static str, GemmQ8K)> {
        let mut k: Vec<(&'static str, GemmQ8K)> = vec![("neon", gemm_neon)];
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            // SAFETY: dotprod was detected.
            k.push(("dotprod", |w, r, x, n, o| unsafe {
                gemm_dotprod(w, r, x, n, o)
            }));
            if std::arch::is_aarch64_feature_detected!("i8mm") {
                // SAFETY: dotprod and i8mm were detected.
                k.push(("i8mm", |w, r, x, n, o| unsafe { gemm_i8mm(w, r, x, n, o) }));
            }
        }
        k
    }

    /// Every level's kernel gives the reference's bits for each K-quant, in ggml's rows and
    /// packed 4×4: random rows, 1 to 9 tokens, row ranges that are not whole tiles (groups and
    /// the ggml rows after them), activations up to the f32 range.
    #[test]
    fn k_quant_kernels_equal_the_reference_bit_for_bit() {
        let mut rng = crate::kernels::testing::Rng(0x5eed_u64);
        let kernels = kernels();
        let mut row_seed = 17;
        let total = 11;
        for (round, cols) in [256, 512, 768, 512].into_iter().enumerate() {
            let nb = cols / SUPER_BLOCK;
            let magnitude = [1.0f32, 1e3, 1e30, 3e38][round];
            let x: Vec<f32> = (0..9 * cols).map(|_| rng.unit() * magnitude).collect();
            let mut xq = vec![Q8KBlock::default(); 9 * nb];
            q8k::quantize(&x, &mut xq);
            for format in [Format::Q4K, Format::Q5K, Format::Q6K] {
                let row_major: Vec<u8> = (0..total)
                    .flat_map(|_| q8k::random_row(format, cols, &mut row_seed))
                    .collect();
                for layout in [Layout::Rows, Layout::X4.for_format(format)] {
                    let geo = Geometry {
                        format,
                        layout,
                        rows: total,
                        blocks: nb,
                    };
                    let bytes = geo.pack(&row_major);
                    let w = Matrix::new(format, layout, total, cols, &bytes);
                    let ranges = if layout == Layout::Rows {
                        [0..total, 1..10, 3..6, 4..8, 5..6]
                    } else {
                        [0..total, 4..10, 8..11, 4..8, 0..4]
                    };
                    each_range(&kernels, &w, ranges, &xq);
                }
            }
        }
    }

    /// Each kernel against the reference on each of `ranges` of `w`, for 1 to 9 tokens.
    fn each_range(
        kernels: &[(&str, GemmQ8K)],
        w: &Matrix<'_>,
        ranges: [core::ops::Range<usize>; 5],
        xq: &[Q8KBlock],
    ) {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for rows in ranges {
            for n in 1..=9 {
                let stride = rows.len() + 1;
                let mut want = vec![0f32; n * stride];
                q8k::gemm(w, rows.clone(), xq, n, Out::new(&mut want, stride));
                for (name, k) in kernels {
                    let mut got = vec![0f32; n * stride];
                    k(w, rows.clone(), xq, n, Out::new(&mut got, stride));
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{name} {} {} cols {} rows {rows:?} n {n}",
                        w.format.name(),
                        w.layout.name(),
                        w.cols
                    );
                }
            }
        }
    }
}
