//! K-quant rows (`q4_k`, `q5_k`, `q6_k`, ggml's layout) against `q8_K` activations on aarch64:
//! NEON, dotprod and i8mm, bit-identical to [`q8k::gemm`].
//!
//! A tile is 4 rows × 1–4 tokens. Each super-block is walked in 8 chunks of 32 values (a
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
use super::{Matrix, Out, TILE_ROWS};
use crate::layout::Layout;
use crate::quant::{Format, SUPER_BLOCK};

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

/// The 32 codes of chunk `C` of the super-block at `p`, as signed bytes: nibbles (plus 16 for
/// the `q5_k` high bit) or `q6_k`'s 6-bit codes before their `−32`.
///
/// SAFETY: `p` points at a whole super-block of format `F`.
#[inline(always)]
unsafe fn codes<const F: u8, const C: usize>(p: *const u8) -> [int8x16_t; 2] {
    // SAFETY: every load stays inside the super-block (q4_k: qs at 16..144; q5_k: qh at
    // 16..48, qs at 48..176; q6_k: ql at 0..128, qh at 128..192); NEON is baseline.
    unsafe {
        let s = vreinterpretq_s8_u8;
        if F == Q6K {
            let (h, k) = (C / 4, C % 4);
            let ql = vld1q_u8_x2(p.add(64 * h + 32 * (k % 2)));
            let qh = vld1q_u8_x2(p.add(128 + 32 * h));
            let m3f = vdupq_n_u8(0x3f);
            let m30 = vdupq_n_u8(0x30);
            // Value l: nibble k/2 of ql, bits 2k, 2k+1 of qh above it.
            let code = |l: uint8x16_t, h: uint8x16_t| match k {
                0 => vandq_u8(vsliq_n_u8::<4>(l, h), m3f),
                1 => vandq_u8(vsliq_n_u8::<4>(l, vshrq_n_u8::<2>(h)), m3f),
                2 => vsriq_n_u8::<4>(vandq_u8(h, m30), l),
                _ => vsriq_n_u8::<4>(vshrq_n_u8::<2>(h), l),
            };
            return [s(code(ql.0, qh.0)), s(code(ql.1, qh.1))];
        }
        let qs = if F == Q5K { 48 } else { 16 };
        let packed = vld1q_u8_x2(p.add(qs + 32 * (C / 2)));
        let nibbles = |v: uint8x16_t| {
            if C % 2 == 0 {
                vandq_u8(v, vdupq_n_u8(0x0f))
            } else {
                vshrq_n_u8::<4>(v)
            }
        };
        let (mut lo, mut hi) = (nibbles(packed.0), nibbles(packed.1));
        if F == Q5K {
            // Bit C of each qh byte, moved to bit 4.
            let qh = vld1q_u8_x2(p.add(16));
            let shift = vdupq_n_s8(4 - C as i8);
            let m10 = vdupq_n_u8(0x10);
            lo = vorrq_u8(lo, vandq_u8(vshlq_u8(qh.0, shift), m10));
            hi = vorrq_u8(hi, vandq_u8(vshlq_u8(qh.1, shift), m10));
        }
        [s(lo), s(hi)]
    }
}

/// The 8 scales and 8 mins of a `q4_k`/`q5_k` super-block as i16 (llama.cpp's kmask
/// unpacking of the 12 bytes at 4..16, three 32-bit words at once).
///
/// SAFETY: `p` points at a whole `q4_k` or `q5_k` super-block.
#[inline(always)]
unsafe fn k4_scales(p: *const u8) -> (int16x8_t, int16x8_t) {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    // SAFETY: bytes 4..16 are inside the super-block; NEON is baseline.
    unsafe {
        let word = |i: usize| p.add(4 + 4 * i).cast::<u32>().read_unaligned().to_le();
        let (a, b, c) = (word(0), word(1), word(2));
        let sc = u64::from(a & K1) | u64::from((c & K2) | ((a >> 6) & K3) << 4) << 32;
        let m = u64::from(b & K1) | u64::from(((c >> 4) & K2) | ((b >> 6) & K3) << 4) << 32;
        let widen = |v: u64| vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(v)));
        (widen(sc), widen(m))
    }
}

/// The 16 signed scales of a `q6_k` super-block as i16.
///
/// SAFETY: `p` points at a whole `q6_k` super-block.
#[inline(always)]
unsafe fn k6_scales(p: *const u8) -> [int16x8_t; 2] {
    // SAFETY: bytes 192..208 are inside the super-block; NEON is baseline.
    unsafe {
        let s = vld1q_s8(p.add(192).cast());
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

/// Where a tile reads and writes: weight rows `w[i]` (the last one repeated when fewer than
/// four remain), `x` at the tile's first token, `out` at (first token, first row).
struct Tile {
    w: [*const u8; R],
    rows: usize,
    x: *const Q8KBlock,
    nb: usize,
    out: *mut f32,
    stride: usize,
}

impl Tile {
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
unsafe fn dot_tile<D: KDot, const F: u8, const TT: usize, const PF: bool>(tile: &Tile) {
    let bb = block_bytes(F);
    let k6 = F == Q6K;
    // SAFETY: super-block `b < nb` of each row and of each token `t < TT` exists, and `store`
    // writes token `t < TT`, by the contract; NEON is baseline.
    unsafe {
        let mut sum = [vdupq_n_f32(0.0); TT];
        for b in 0..tile.nb {
            let p: [*const u8; R] = core::array::from_fn(|i| tile.w[i].add(b * bb));
            if PF {
                for &p in &p {
                    prefetch::<F>(p);
                }
            }
            let x: [&Q8KBlock; TT] = core::array::from_fn(|t| &*tile.x.add(t * tile.nb + b));
            let zero = vdupq_n_s32(0);
            let mut acc = [[D::start(zero); R]; TT];
            let mut mins = [[zero; R]; TT];
            let mut sc = [D::scales::<false>([vdupq_n_s16(0); 2]); R];
            // A loop, not closures: closures may stay out of line, outside the function
            // compiled with the level's features.
            for (i, &p) in p.iter().enumerate() {
                if k6 {
                    let s = k6_scales(p);
                    sc[i] = D::scales::<true>(s);
                    // The codes' −32, from the sums of 16: `−32·Σ_j scale_j·bsum_j`.
                    let neg = [vmulq_n_s16(s[0], -32), vmulq_n_s16(s[1], -32)];
                    for (t, x) in x.iter().enumerate() {
                        let bs = vld1q_s16_x2(x.bsums.as_ptr());
                        let bias = vaddq_s32(dot16(neg[0], bs.0), dot16(neg[1], bs.1));
                        acc[t][i] = D::start(bias);
                    }
                } else {
                    let (s, m) = k4_scales(p);
                    sc[i] = D::scales::<false>([s, vdupq_n_s16(0)]);
                    for (t, x) in x.iter().enumerate() {
                        let bs = vld1q_s16_x2(x.bsums.as_ptr());
                        mins[t][i] = dot16(m, vpaddq_s16(bs.0, bs.1));
                    }
                }
            }
            chunks!(|C, L, E, O| {
                let w: [[int8x16_t; 2]; R] = core::array::from_fn(|i| codes::<F, C>(p[i]));
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
            let (d, dmin) = scales_f32::<F>(&p);
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

/// How the tiles of a product are computed: one type per level, so that code for a level is
/// only ever instantiated inside the functions compiled for it.
trait Tiles {
    /// Tokens a tile takes at most.
    const TOKENS: usize;
    /// The tile at `tile` for `tokens` (1 to [`Self::TOKENS`]) tokens of `n`.
    ///
    /// SAFETY: as [`dot_tile`] for `tokens` tokens, and the CPU has the level's features.
    unsafe fn tile<const F: u8>(tile: &Tile, tokens: usize, n: usize);
}

impl<D: KDot> Tiles for D {
    const TOKENS: usize = 2;

    #[inline(always)]
    unsafe fn tile<const F: u8>(tile: &Tile, tokens: usize, n: usize) {
        // SAFETY: the caller's contract, for `tokens` tokens.
        unsafe {
            match tokens {
                2 => dot_tile::<D, F, 2, false>(tile),
                _ if n == 1 => dot_tile::<D, F, 1, true>(tile),
                _ => dot_tile::<D, F, 1, false>(tile),
            }
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
unsafe fn mmla_tile<const F: u8, const TP: usize>(tile: &Tile, tokens: usize) {
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
            let p: [*const u8; R] = core::array::from_fn(|i| tile.w[i].add(b * bb));
            let xb: [[&Q8KBlock; 2]; TP] = x.map(|x| x.map(|x| &*x.add(b)));
            let zero = vdupq_n_s32(0);
            // Per row: the steps of its scales; per (row, token): the start of the sum (q6_k's
            // −32) or the mins term, as vectors whose lane sums they are.
            let mut st = [[zero; 4]; R];
            let mut extra = [[[zero; 2]; TP]; R];
            for ((&p, st), extra) in p.iter().zip(&mut st).zip(&mut extra) {
                let (sc, m) = if k6 {
                    (k6_scales(p), vdupq_n_s16(0))
                } else {
                    let (s, m) = k4_scales(p);
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
                let w: [[int8x16_t; 2]; R] = core::array::from_fn(|i| codes::<F, C>(p[i]));
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

    #[inline(always)]
    unsafe fn tile<const F: u8>(tile: &Tile, tokens: usize, n: usize) {
        // SAFETY: the caller's contract, for `tokens` tokens; i8mm and dotprod are available.
        unsafe {
            match tokens {
                3 | 4 => mmla_tile::<F, 2>(tile, tokens),
                2 => mmla_tile::<F, 1>(tile, tokens),
                _ if n == 1 => dot_tile::<Dotprod, F, 1, true>(tile),
                _ => dot_tile::<Dotprod, F, 1, false>(tile),
            }
        }
    }
}

/// [`q8k::gemm`] on level `L`, in tiles of 4 rows × up to `L::TOKENS` tokens; other layouts and
/// formats take the reference.
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
    if w.layout != Layout::Rows {
        return q8k::gemm(w, rows, x, n, out);
    }
    let count = rows.len();
    if count == 0 || n == 0 {
        return;
    }
    let (nb, rb) = (w.cols / SUPER_BLOCK, w.geometry().row_bytes());
    let bytes = &w.bytes[rows.start * rb..rows.end * rb];
    let x = &x[..n * nb];
    let (o, stride) = (out.checked(n, count), out.stride());
    let mut r0 = 0;
    while r0 < count {
        let nr = (count - r0).min(R);
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(L::TOKENS);
            // SAFETY: rows `r0..r0 + nr ≤ count` of `rb = nb·block bytes` are inside `bytes`,
            // tokens `t0..t0 + nt ≤ n` of `nb` super-blocks inside `x`, and `o` holds `count`
            // floats at `t·stride` for every `t < n` (`checked` above).
            unsafe {
                let tile = Tile {
                    w: core::array::from_fn(|i| bytes.as_ptr().add((r0 + i.min(nr - 1)) * rb)),
                    rows: nr,
                    x: x.as_ptr().add(t0 * nb),
                    nb,
                    out: o.add(t0 * stride + r0),
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

    /// Every level's kernel gives the reference's bits for each K-quant: random rows, 1 to 9
    /// tokens, row ranges that are not whole tiles, activations up to the f32 range.
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
                let bytes: Vec<u8> = (0..total)
                    .flat_map(|_| q8k::random_row(format, cols, &mut row_seed))
                    .collect();
                let w = Matrix::new(format, Layout::Rows, total, cols, &bytes);
                for rows in [0..total, 1..10, 3..6, 4..8, 5..6] {
                    for n in 1..=9 {
                        let stride = rows.len() + 1;
                        let mut want = vec![0f32; n * stride];
                        q8k::gemm(&w, rows.clone(), &xq, n, Out::new(&mut want, stride));
                        for (name, k) in &kernels {
                            let mut got = vec![0f32; n * stride];
                            k(&w, rows.clone(), &xq, n, Out::new(&mut got, stride));
                            let bits =
                                |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got),
                                bits(&want),
                                "{name} {} cols {cols} rows {rows:?} n {n}",
                                format.name()
                            );
                        }
                    }
                }
            }
        }
    }
}
