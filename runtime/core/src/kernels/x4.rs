//! Block products over matrices packed for aarch64: 4×4 (`layout::Layout::X4`) for NEON and
//! dotprod, 4×8 (`Layout::X8`) for i8mm.
//!
//! In 4×4 a block of a group is 4 (or for `q8_0` 8) registers, register `k` holding bytes
//! `4k..4k+4` of each of the four rows' quants: one `sdot` by element (lane `k` of the token's
//! block) adds a row's 4 products into its own lane, so an accumulator's four lanes are the
//! four rows and nothing is reduced at all. NEON without dotprod does the same with `vmull_s8`
//! and pairwise adds. In 4×8 a register holds 8 bytes of two rows, a 2×8 `smmla` operand, and
//! two tokens at once make its other one; a single token (decode) meets it with `sdot` by
//! vector instead, its 8 bytes in both halves of a register, and one pairwise add per block.
//!
//! Each block's integer sums (exact) are scaled by `d_w·d_x` into a float accumulator per
//! (group, token) with `vfmaq_f32`, plus `m·s` for `q4_1`, as the reference does per block; only
//! the order of the float sums differs, within [`q8::error_budget`](super::q8::error_budget).
//! A tile of `G` groups × `T` tokens reads each weight block once per tile; 4×8 batches first
//! stage 8 tokens as `smmla` pairs in the participant's scratch, once for all groups.
//!
//! `sdot` and `smmla` go through `asm!` (their intrinsics are unstable); each only sits in
//! `#[inline(always)]` helpers (here `sdot` by element, the rest shared with the ggml-rows
//! kernels in `arm`) inlined into functions compiled with the feature.

use core::arch::aarch64::*;
use core::arch::asm;

use super::arm::{pair, sdot, smmla};
use super::lanes::widen_f16;
use super::product::Product;
use super::q8::consts::{Q4_0, Q4_1, Q8_0};
use super::q8::Q8Block;
use crate::layout::{Layout, GROUP};
use crate::quant::Format;

/// Quant and scale bytes of one block of a group.
const fn group_quants(f: u8) -> usize {
    if f == Q8_0 {
        128
    } else {
        64
    }
}

const fn group_scales(f: u8) -> usize {
    if f == Q4_1 {
        16
    } else {
        8
    }
}

/// Four f16 at `p` as f32.
///
/// SAFETY: `p` points at four f16 values.
#[inline(always)]
unsafe fn halves(p: *const u8) -> float32x4_t {
    // SAFETY: the contract is `widen_f16`'s.
    unsafe { widen_f16(p.cast()) }
}

/// A block of a group: the signed quants (`16·(nibble − 8)` for `q4_0`, the nibble for `q4_1`,
/// as stored for `q8_0`) in the layout's registers, and the rows' `d` (and `m`).
#[derive(Clone, Copy)]
struct Wt<const K: usize> {
    q: [int8x16_t; K],
    d: float32x4_t,
    m: float32x4_t,
}

/// Registers of one block of a group: 4 of packed nibbles unpack to 8; `q8_0` has 8.
const REGS: usize = 8;

/// Unpacks the block at `q` (scales at `s`): the 4-bit formats' register `k < 4` of packed
/// bytes gives registers `k` (low nibbles) and `4 + k` (high nibbles). `q4_0`'s bytes are
/// stored XOR `0x88` ([`Geometry::flips_nibbles`](crate::layout::Geometry::flips_nibbles)), so
/// a shift or a mask alone leaves `16·(q − 8)`, scaled back by [`sums_f32`].
///
/// SAFETY: `q` and `s` point at a block's quants and scales.
#[inline(always)]
unsafe fn weights<const F: u8>(q: *const u8, s: *const u8) -> Wt<REGS> {
    // SAFETY: reads one block of a group; NEON is part of every aarch64 CPU.
    unsafe {
        let mut w = [vdupq_n_s8(0); REGS];
        if F == Q8_0 {
            for (k, w) in w.iter_mut().enumerate() {
                *w = vld1q_s8(q.add(16 * k).cast());
            }
        } else {
            for k in 0..4 {
                let packed = vld1q_u8(q.add(16 * k));
                let (lo, hi) = if F == Q4_0 {
                    (vshlq_n_u8::<4>(packed), vandq_u8(packed, vdupq_n_u8(0xf0)))
                } else {
                    (vandq_u8(packed, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(packed))
                };
                w[k] = vreinterpretq_s8_u8(lo);
                w[4 + k] = vreinterpretq_s8_u8(hi);
            }
        }
        Wt {
            q: w,
            d: halves(s),
            m: if F == Q4_1 {
                halves(s.add(8))
            } else {
                vdupq_n_f32(0.0)
            },
        }
    }
}

/// A block's integer sums as floats: `q4_0`'s are 16 times the products' (see [`weights`]), and
/// `scvtf` by 4 fraction bits divides them back exactly (they stay below 2²⁴).
#[inline(always)]
fn sums_f32<const F: u8>(sums: int32x4_t) -> float32x4_t {
    // SAFETY: register arithmetic; NEON is part of every aarch64 CPU.
    unsafe {
        if F == Q4_0 {
            vcvtq_n_f32_s32::<4>(sums)
        } else {
            vcvtq_f32_s32(sums)
        }
    }
}

/// How a level forms a 4×4 block's integer sums: lane `r` = row `r`'s dot with the token.
trait Lanes {
    /// `acc + Σ_k sdot(w[k], a, lane k)`-style: `w[k]` holds 4 bytes of each row, which meet
    /// bytes `4k..4k+4` of `a`.
    ///
    /// SAFETY: the CPU has the level's features.
    unsafe fn dot4(acc: int32x4_t, w: &[int8x16_t], a: int8x16_t) -> int32x4_t;
}

/// `sdot` by element.
struct Dotprod;

/// `acc + sdot(w, a.4b[L])`.
#[inline(always)]
pub(super) fn sdot_lane<const L: i32>(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: register arithmetic only; inlined only into functions compiled with `dotprod`
    // and installed after detecting it.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            a = in(vreg) a,
            l = const L,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

impl Lanes for Dotprod {
    #[inline(always)]
    unsafe fn dot4(acc: int32x4_t, w: &[int8x16_t], a: int8x16_t) -> int32x4_t {
        let acc = sdot_lane::<0>(acc, w[0], a);
        let acc = sdot_lane::<1>(acc, w[1], a);
        let acc = sdot_lane::<2>(acc, w[2], a);
        sdot_lane::<3>(acc, w[3], a)
    }
}

/// NEON's widening multiplies: each token's 4 bytes broadcast against the rows'.
struct Neon;

/// `acc + [row r's 4 bytes of w · bytes 4L..4L+4 of a]` without `sdot`: the products fit i16
/// (at most 128·127, `q4_0`'s `16·(q − 8)` included) and a pair of them too, summed into i32
/// before anything overflows.
#[inline(always)]
fn dot_lane<const L: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: register arithmetic; NEON is part of every aarch64 CPU.
    unsafe {
        let b = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(a)));
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(b));
        let hi = vmull_high_s8(w, b);
        vpadalq_s16(acc, vpaddq_s16(lo, hi))
    }
}

impl Lanes for Neon {
    #[inline(always)]
    unsafe fn dot4(acc: int32x4_t, w: &[int8x16_t], a: int8x16_t) -> int32x4_t {
        let acc = dot_lane::<0>(acc, w[0], a);
        let acc = dot_lane::<1>(acc, w[1], a);
        let acc = dot_lane::<2>(acc, w[2], a);
        dot_lane::<3>(acc, w[3], a)
    }
}

/// Where a product's groups and tokens lie.
struct Span {
    quants: *const u8,
    scales: *const u8,
    nb: usize,
    x: *const Q8Block,
    out: *mut f32,
    stride: usize,
    /// The participant's scratch, where 4×8 batches stage their token pairs.
    stage: *mut u8,
    stage_bytes: usize,
}

/// One 4×4 tile: groups `g0..g0 + G` × tokens `t0..t0 + T`.
///
/// SAFETY: the CPU has `L`'s features; the groups, tokens and outputs exist.
#[inline(always)]
unsafe fn tile4<L: Lanes, const F: u8, const G: usize, const T: usize>(
    s: &Span,
    g0: usize,
    t0: usize,
) {
    let (qg, sg) = (group_quants(F), group_scales(F));
    // SAFETY: every pointer stays inside the groups, tokens and outputs of the contract.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); T]; G];
        // Loops, not closures: a closure may stay out of line, outside the function compiled
        // with the level's features.
        for b in 0..s.nb {
            let first = weights::<F>(
                s.quants.add(g0 * s.nb * qg + b * qg),
                s.scales.add(g0 * s.nb * sg + b * sg),
            );
            let mut w = [first; G];
            for (g, w) in w.iter_mut().enumerate().skip(1) {
                *w = weights::<F>(
                    s.quants.add((g0 + g) * s.nb * qg + b * qg),
                    s.scales.add((g0 + g) * s.nb * sg + b * sg),
                );
            }
            for t in 0..T {
                let a = &*s.x.add((t0 + t) * s.nb + b);
                let (lo, hi) = (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16)));
                for (acc, w) in acc.iter_mut().zip(&w) {
                    let zero = vdupq_n_s32(0);
                    let sums = L::dot4(L::dot4(zero, &w.q[..4], lo), &w.q[4..], hi);
                    let v = vfmaq_f32(acc[t], sums_f32::<F>(sums), vmulq_n_f32(w.d, a.d));
                    acc[t] = if F == Q4_1 {
                        vfmaq_n_f32(v, w.m, a.s)
                    } else {
                        v
                    };
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (t, &acc) in acc.iter().enumerate() {
                vst1q_f32(s.out.add((t0 + t) * s.stride + (g0 + g) * GROUP), acc);
            }
        }
    }
}

/// Two tokens' block `b` as `smmla`'s second operands (`arm::pair` of their bytes) and their
/// `[d_a, d_c, d_a, d_c]`, `[s_a, s_c, s_a, s_c]`, matching the `smmla` lanes.
#[derive(Clone, Copy)]
struct Pair {
    m: [int8x16_t; 4],
    d: float32x4_t,
    s: float32x4_t,
}

/// Bytes of a staged [`Pair`]: its four operands, `d` and `s`.
const PAIR_BYTES: usize = 96;

/// Tokens staged at a time for 4×8 batches (the pairs of one tile).
const STAGED_TOKENS: usize = 2 * P8;

// The plans reserve this much per block for the staging (`kernels::scratch_floats`).
const _: () = assert!(P8 * PAIR_BYTES == 4 * super::STAGED_PAIR_FLOATS);

impl Pair {
    /// Tokens `ta` and `tb` of block `b`.
    ///
    /// SAFETY: both tokens' block `b` exists.
    #[inline(always)]
    unsafe fn of(s: &Span, ta: usize, tb: usize, b: usize) -> Pair {
        // SAFETY: reads the two blocks of the contract.
        unsafe {
            let (a, c) = (&*s.x.add(ta * s.nb + b), &*s.x.add(tb * s.nb + b));
            let (alo, ahi) = (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16)));
            let (clo, chi) = (vld1q_s8(c.qs.as_ptr()), vld1q_s8(c.qs.as_ptr().add(16)));
            let lanes = |x: &f32, y: &f32| vzip1q_f32(vld1q_dup_f32(x), vld1q_dup_f32(y));
            Pair {
                m: pair(alo, ahi, clo, chi),
                d: lanes(&a.d, &c.d),
                s: lanes(&a.s, &c.s),
            }
        }
    }

    /// Writes the pair's [`PAIR_BYTES`] at `at`.
    ///
    /// SAFETY: `at` has room for them (any alignment).
    #[inline(always)]
    unsafe fn store(&self, at: *mut u8) {
        // SAFETY: the contract's bytes.
        unsafe {
            for (k, &m) in self.m.iter().enumerate() {
                vst1q_s8(at.add(16 * k).cast(), m);
            }
            vst1q_f32(at.add(64).cast(), self.d);
            vst1q_f32(at.add(80).cast(), self.s);
        }
    }

    /// The pair [`store`](Pair::store)d at `at`; `s` only for `q4_1`.
    ///
    /// SAFETY: `at` holds a stored pair.
    #[inline(always)]
    unsafe fn load<const F: u8>(at: *const u8) -> Pair {
        // SAFETY: the contract's bytes.
        unsafe {
            Pair {
                m: [0, 1, 2, 3].map(|k| vld1q_s8(at.add(16 * k).cast())),
                d: vld1q_f32(at.add(64).cast()),
                s: if F == Q4_1 {
                    vld1q_f32(at.add(80).cast())
                } else {
                    vdupq_n_f32(0.0)
                },
            }
        }
    }
}

/// Stages tokens `t0..t0 + tokens` (at most [`STAGED_TOKENS`]; an odd last one paired with
/// itself) as pairs, pair `p`'s block `b` at `(p·nb + b)·PAIR_BYTES` of the scratch.
///
/// SAFETY: the tokens exist and the scratch has room for their pairs (checked by the caller).
#[inline(always)]
unsafe fn stage(s: &Span, t0: usize, tokens: usize) {
    // SAFETY: reads the contract's tokens, writes inside the scratch.
    unsafe {
        for p in 0..tokens.div_ceil(2) {
            let ta = t0 + 2 * p;
            let tb = (ta + 1).min(t0 + tokens - 1);
            for b in 0..s.nb {
                Pair::of(s, ta, tb, b).store(s.stage.add((p * s.nb + b) * PAIR_BYTES));
            }
        }
    }
}

/// One 4×8 tile: group `g` × staged pairs `p0..p0 + P` (tokens from `t0`, `tokens` in all
/// staged, the last repeated when odd), with `smmla`.
///
/// In 4×8 register `2j + h` of a block of a group (as [`weights`] unpacks it) holds run `j` of
/// 8 bytes of row pair `h` (rows 0–1, 2–3): elements `8j..8j+8` of both, for `q8_0` and the
/// low nibbles (`j < 2`) alike, the high nibbles continuing at `j = 2`.
///
/// SAFETY: the CPU has i8mm; the group, the staged pairs and the outputs exist.
#[inline(always)]
unsafe fn tile8<const F: u8, const P: usize>(
    s: &Span,
    g: usize,
    p0: usize,
    t0: usize,
    tokens: usize,
) {
    let (qg, sg) = (group_quants(F), group_scales(F));
    // SAFETY: every pointer stays inside the group, the staged pairs and the outputs of the
    // contract.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 2]; P];
        for b in 0..s.nb {
            let w = weights::<F>(
                s.quants.add(g * s.nb * qg + b * qg),
                s.scales.add(g * s.nb * sg + b * sg),
            );
            // Per row pair: [d_r, d_r, d_r+1, d_r+1], matching the `smmla` lanes.
            let dw = [vzip1q_f32(w.d, w.d), vzip2q_f32(w.d, w.d)];
            let mw = [vzip1q_f32(w.m, w.m), vzip2q_f32(w.m, w.m)];
            for (p, acc) in acc.iter_mut().enumerate() {
                let x = Pair::load::<F>(s.stage.add(((p0 + p) * s.nb + b) * PAIR_BYTES));
                for (h, acc) in acc.iter_mut().enumerate() {
                    // Row pair `h`, elements 8e..8e+8: register 2e + h (see above).
                    let mut sums = vdupq_n_s32(0);
                    for (e, &m) in x.m.iter().enumerate() {
                        sums = smmla(sums, w.q[2 * e + h], m);
                    }
                    *acc = vfmaq_f32(*acc, sums_f32::<F>(sums), vmulq_f32(dw[h], x.d));
                    if F == Q4_1 {
                        *acc = vfmaq_f32(*acc, mw[h], x.s);
                    }
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            // [r0·ta, r0·tb, r1·ta, r1·tb] and the same for rows 2–3 → each token's row.
            let ta = vuzp1q_f32(acc[0], acc[1]);
            let tb = vuzp2q_f32(acc[0], acc[1]);
            let t = t0 + 2 * (p0 + p);
            vst1q_f32(s.out.add(t * s.stride + g * GROUP), ta);
            if t + 1 < t0 + tokens {
                vst1q_f32(s.out.add((t + 1) * s.stride + g * GROUP), tb);
            }
        }
    }
}

/// One token against groups `g0..g0 + G` of a 4×8 matrix, with `sdot` by vector rather than
/// `smmla` (which would pair the token with a copy of itself): the token's run `j` of 8 bytes,
/// in both halves of a register, meets register `2j + h` (rows `2h`, `2h + 1`, see [`tile8`])
/// to give each row's two 4-byte halves, and one pairwise add per block makes the rows' sums.
///
/// SAFETY: the CPU has dotprod; the groups, token `t` and outputs exist.
#[inline(always)]
unsafe fn decode8<const F: u8, const G: usize>(s: &Span, g0: usize, t: usize) {
    let (qg, sg) = (group_quants(F), group_scales(F));
    // SAFETY: every pointer stays inside the groups, the token and outputs of the contract.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); G];
        for b in 0..s.nb {
            let a = &*s.x.add(t * s.nb + b);
            let (lo, hi) = (
                vreinterpretq_s64_s8(vld1q_s8(a.qs.as_ptr())),
                vreinterpretq_s64_s8(vld1q_s8(a.qs.as_ptr().add(16))),
            );
            let runs = [
                vreinterpretq_s8_s64(vdupq_laneq_s64::<0>(lo)),
                vreinterpretq_s8_s64(vdupq_laneq_s64::<1>(lo)),
                vreinterpretq_s8_s64(vdupq_laneq_s64::<0>(hi)),
                vreinterpretq_s8_s64(vdupq_laneq_s64::<1>(hi)),
            ];
            for (g, acc) in acc.iter_mut().enumerate() {
                let w = weights::<F>(
                    s.quants.add((g0 + g) * s.nb * qg + b * qg),
                    s.scales.add((g0 + g) * s.nb * sg + b * sg),
                );
                let mut halves = [vdupq_n_s32(0); 2];
                for (h, sums) in halves.iter_mut().enumerate() {
                    for (j, &run) in runs.iter().enumerate() {
                        *sums = sdot(*sums, w.q[2 * j + h], run);
                    }
                }
                let sums = vpaddq_s32(halves[0], halves[1]);
                let v = vfmaq_f32(*acc, sums_f32::<F>(sums), vmulq_n_f32(w.d, a.d));
                *acc = if F == Q4_1 {
                    vfmaq_n_f32(v, w.m, a.s)
                } else {
                    v
                };
            }
        }
        for (g, &acc) in acc.iter().enumerate() {
            vst1q_f32(s.out.add(t * s.stride + (g0 + g) * GROUP), acc);
        }
    }
}

/// Where `p`'s groups lie (its rows start on a group), and how many it covers.
fn span(p: &mut Product<'_>) -> (Span, usize) {
    let g = p.w.geometry;
    let (nb, first, rows) = (g.blocks, p.rows.start, p.rows.clone());
    let grouped_end = rows.end.min(g.groups() * GROUP);
    assert!(
        first.is_multiple_of(GROUP)
            && grouped_end.is_multiple_of(GROUP)
            && rows.end <= g.rows
            && p.x.len() >= p.n * nb,
        "aarch64 gemm: rows {rows:?} of {} ({nb} blocks), {} tokens",
        g.rows,
        p.n
    );
    let groups = grouped_end.saturating_sub(first) / GROUP;
    let out = p.out.checked(p.n, rows.len());
    let span = Span {
        quants: p.w.bytes[g.quants(first / GROUP)..].as_ptr(),
        scales: p.w.bytes[g.scales(first / GROUP)..].as_ptr(),
        nb,
        x: p.x.as_ptr(),
        out,
        stride: p.out.stride(),
        stage: p.scratch.as_mut_ptr().cast(),
        stage_bytes: core::mem::size_of_val(p.scratch),
    };
    (span, groups)
}

/// The rows of `p` past its `groups` groups (stored as ggml rows), on `rows`.
fn tail(p: Product<'_>, groups: usize, rows: fn(Product<'_>)) {
    let plain = p.rows.start + groups * GROUP;
    if plain < p.rows.end {
        // SAFETY: the columns past the groups are this call's alone.
        let out = unsafe { p.out.columns(plain - p.rows.start) };
        rows(Product {
            rows: plain..p.rows.end,
            out,
            scratch: &mut [],
            ..p
        });
    }
}

/// Groups × tokens of a 4×4 matrix in tiles of `G × T` (single groups and tokens at the edges).
///
/// SAFETY: the CPU has `L`'s features; `s` spans `groups` groups and `n` tokens.
#[inline(always)]
unsafe fn tiles4<L: Lanes, const F: u8, const G: usize, const T: usize>(
    s: &Span,
    groups: usize,
    n: usize,
) {
    // SAFETY: every tile lies inside `groups × n`.
    unsafe {
        let mut g = 0;
        while g + G <= groups {
            let mut t = 0;
            while t + T <= n {
                tile4::<L, F, G, T>(s, g, t);
                t += T;
            }
            while t < n {
                tile4::<L, F, G, 1>(s, g, t);
                t += 1;
            }
            g += G;
        }
        for g in g..groups {
            for t in 0..n {
                tile4::<L, F, 1, 1>(s, g, t);
            }
        }
    }
}

/// Groups × tokens of a 4×8 matrix: [`STAGED_TOKENS`] tokens staged as pairs at a time, then
/// every group against them, `P8` pairs per tile.
///
/// SAFETY: the CPU has i8mm; `s` spans `groups` groups and `n` tokens.
#[inline(always)]
unsafe fn tiles8<const F: u8>(s: &Span, groups: usize, n: usize) {
    let need = STAGED_TOKENS.min(n).div_ceil(2) * s.nb * PAIR_BYTES;
    assert!(
        s.stage_bytes >= need,
        "aarch64 gemm: {} bytes of scratch stage {need} (see kernels::scratch_floats)",
        s.stage_bytes
    );
    // SAFETY: every tile lies inside `groups × n`; the staged pairs fit (checked above).
    unsafe {
        let mut t0 = 0;
        while t0 < n {
            let tokens = (n - t0).min(STAGED_TOKENS);
            stage(s, t0, tokens);
            let pairs = tokens.div_ceil(2);
            for g in 0..groups {
                if pairs == P8 {
                    tile8::<F, P8>(s, g, 0, t0, tokens);
                } else {
                    for p in 0..pairs {
                        tile8::<F, 1>(s, g, p, t0, tokens);
                    }
                }
            }
            t0 += tokens;
        }
    }
}

/// One token against all groups of a 4×8 matrix, `G` at a time.
///
/// SAFETY: the CPU has dotprod; `s` spans `groups` groups and token 0.
#[inline(always)]
unsafe fn decodes8<const F: u8, const G: usize>(s: &Span, groups: usize) {
    // SAFETY: every tile lies inside `groups` and the one token.
    unsafe {
        let mut g = 0;
        while g + G <= groups {
            decode8::<F, G>(s, g, 0);
            g += G;
        }
        for g in g..groups {
            decode8::<F, 1>(s, g, 0);
        }
    }
}

/// Tile shapes: decode (`n = 1`) takes two groups at once, batches four tokens per group on
/// 4×4 and four token pairs per group on 4×8.
const G1: usize = 2;
const T4: usize = 4;
const P8: usize = 4;

/// `$f::<…, F>` over `$p`'s groups for its format, then its plain rows on `$rows`.
macro_rules! by_format {
    ($p:expr, $rows:expr, $f:ident, $($generic:tt)*) => {{
        let mut p = $p;
        let (s, groups) = span(&mut p);
        let n = p.n;
        match p.w.geometry.format {
            Format::Q4_0 => $f::<$($generic)* Q4_0>(&s, groups, n),
            Format::Q4_1 => $f::<$($generic)* Q4_1>(&s, groups, n),
            Format::Q8_0 => $f::<$($generic)* Q8_0>(&s, groups, n),
            _ => return super::q8::gemm(p),
        }
        tail(p, groups, $rows);
    }};
}

/// A 4×4 product on level `L`, the tile shape chosen by the batch.
///
/// SAFETY: the CPU has `L`'s features.
#[inline(always)]
unsafe fn x4<L: Lanes, const F: u8>(s: &Span, groups: usize, n: usize) {
    // SAFETY: passed on.
    unsafe {
        if n == 1 {
            tiles4::<L, F, G1, 1>(s, groups, n)
        } else {
            tiles4::<L, F, 2, T4>(s, groups, n)
        }
    }
}

/// A 4×8 product: batches with `smmla`, one token with `sdot`.
///
/// SAFETY: the CPU has i8mm and dotprod.
#[inline(always)]
unsafe fn x8<const F: u8>(s: &Span, groups: usize, n: usize) {
    // SAFETY: passed on.
    unsafe {
        if n == 1 {
            decodes8::<F, G1>(s, groups)
        } else {
            tiles8::<F>(s, groups, n)
        }
    }
}

/// NEON's block product: 4×4 here, ggml rows on `rows`, other layouts on the reference.
pub fn gemm_neon(p: Product<'_>, rows: fn(Product<'_>)) {
    match p.w.geometry.layout {
        // SAFETY: NEON is part of every aarch64 CPU.
        Layout::X4 => unsafe { by_format!(p, rows, x4, Neon,) },
        Layout::Rows => rows(p),
        _ => super::q8::gemm(p),
    }
}

/// dotprod's: 4×4 here, ggml rows on `rows`, other layouts on the reference.
///
/// SAFETY: the caller has checked the CPU has dotprod.
#[target_feature(enable = "dotprod")]
pub unsafe fn gemm_dotprod(p: Product<'_>, rows: fn(Product<'_>)) {
    match p.w.geometry.layout {
        // SAFETY: dotprod by this function's contract.
        Layout::X4 => unsafe { by_format!(p, rows, x4, Dotprod,) },
        Layout::Rows => rows(p),
        _ => super::q8::gemm(p),
    }
}

/// i8mm's: 4×8 with `smmla`, 4×4 with `sdot`, ggml rows on `rows`, other layouts on the
/// reference.
///
/// SAFETY: the caller has checked the CPU has dotprod and i8mm.
#[target_feature(enable = "dotprod,i8mm")]
pub unsafe fn gemm_i8mm(p: Product<'_>, rows: fn(Product<'_>)) {
    match p.w.geometry.layout {
        // SAFETY: i8mm and dotprod by this function's contract.
        Layout::X8 => unsafe { by_format!(p, rows, x8,) },
        // SAFETY: as above.
        Layout::X4 => unsafe { by_format!(p, rows, x4, Dotprod,) },
        Layout::Rows => rows(p),
        _ => super::q8::gemm(p),
    }
}
