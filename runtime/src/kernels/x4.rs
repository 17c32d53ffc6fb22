//! Block products over matrices packed for aarch64: 4×4 (`layout::Layout::X4`) for NEON and
//! dotprod, 4×8 (`Layout::X8`) for i8mm.
//!
//! In 4×4 a block of a group is 4 (or for `q8_0` 8) registers, register `k` holding bytes
//! `4k..4k+4` of each of the four rows' quants: one `sdot` by element (lane `k` of the token's
//! block) adds a row's 4 products into its own lane, so an accumulator's four lanes are the
//! four rows and nothing is reduced at all. NEON without dotprod does the same with `vmull_s8`
//! and pairwise adds. In 4×8 a register holds 8 bytes of two rows, a 2×8 `smmla` operand, and
//! two tokens at once make its other one.
//!
//! Each block's integer sums (exact) are scaled by `d_w·d_x` into a float accumulator per
//! (group, token) with `vfmaq_f32`, plus `m·s` for `q4_1`, as the reference does per block; only
//! the order of the float sums differs, within [`q8::error_budget`](super::q8::error_budget).
//! A tile of `G` groups × `T` tokens reads each weight block once per tile.
//!
//! `sdot` and `smmla` go through `asm!` (their intrinsics are unstable); each only sits in
//! `#[inline(always)]` helpers inlined into functions compiled with the feature.

use core::arch::aarch64::*;
use core::arch::asm;

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

/// A block of a group: the signed quants (`nibble − 8` for `q4_0`, the nibble for `q4_1`, as
/// stored for `q8_0`) in the layout's registers, and the rows' `d` (and `m`).
#[derive(Clone, Copy)]
struct Wt<const K: usize> {
    q: [int8x16_t; K],
    d: float32x4_t,
    m: float32x4_t,
}

/// Registers of one block of a group: 4 of packed nibbles unpack to 8; `q8_0` has 8.
const REGS: usize = 8;

/// Unpacks the block at `q` (scales at `s`): the 4-bit formats' register `k < 4` of packed
/// bytes gives registers `k` (low nibbles) and `4 + k` (high nibbles).
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
            let mask = vdupq_n_u8(0x0f);
            for k in 0..4 {
                let packed = vld1q_u8(q.add(16 * k));
                let (lo, hi) = (
                    vreinterpretq_s8_u8(vandq_u8(packed, mask)),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed)),
                );
                if F == Q4_0 {
                    let eight = vdupq_n_s8(8);
                    w[k] = vsubq_s8(lo, eight);
                    w[4 + k] = vsubq_s8(hi, eight);
                } else {
                    w[k] = lo;
                    w[4 + k] = hi;
                }
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
fn sdot_lane<const L: i32>(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
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
/// (at most 128·127) and a pair of them too, summed into i32 before anything overflows.
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
                    let v = vfmaq_f32(acc[t], vcvtq_f32_s32(sums), vmulq_n_f32(w.d, a.d));
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

/// `[a[0..8], b[0..8]]` and `[a[8..16], b[8..16]]`: two tokens' bytes as 2×8 `smmla` operands.
#[inline(always)]
fn zip64(a: int8x16_t, b: int8x16_t) -> [int8x16_t; 2] {
    // SAFETY: register shuffles; NEON is part of every aarch64 CPU.
    unsafe {
        let (a, b) = (vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b));
        [
            vreinterpretq_s8_s64(vzip1q_s64(a, b)),
            vreinterpretq_s8_s64(vzip2q_s64(a, b)),
        ]
    }
}

/// `smmla`: `acc + W·Aᵀ` for the 2×8 byte matrices `w` (two rows) and `a` (two tokens), as
/// `[w0·a0, w0·a1, w1·a0, w1·a1]`.
#[inline(always)]
fn smmla(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: register arithmetic only; inlined only into functions compiled with `i8mm`
    // and installed after detecting it.
    unsafe {
        asm!(
            "smmla {acc:v}.4s, {w:v}.16b, {a:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            a = in(vreg) a,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// One 4×8 tile: groups `g0..g0 + G` × token pairs from `t0` (`tokens` of them, the last
/// repeated when odd), with `smmla`.
///
/// In 4×8 register `2j + h` of a block of a group (as [`weights`] unpacks it) holds run `j` of
/// 8 bytes of row pair `h` (rows 0–1, 2–3): elements `8j..8j+8` of both, for `q8_0` and the
/// low nibbles (`j < 2`) alike, the high nibbles continuing at `j = 2`.
///
/// SAFETY: the CPU has i8mm; the groups, `tokens` tokens and outputs exist.
#[inline(always)]
unsafe fn tile8<const F: u8, const G: usize, const P: usize>(
    s: &Span,
    g0: usize,
    t0: usize,
    tokens: usize,
) {
    let (qg, sg) = (group_quants(F), group_scales(F));
    // SAFETY: every pointer stays inside the groups, tokens and outputs of the contract; the
    // token past an odd end reads the last token again.
    unsafe {
        let mut acc = [[[vdupq_n_f32(0.0); 2]; P]; G];
        for b in 0..s.nb {
            for g in 0..G {
                let w = weights::<F>(
                    s.quants.add((g0 + g) * s.nb * qg + b * qg),
                    s.scales.add((g0 + g) * s.nb * sg + b * sg),
                );
                // Per row pair: [d_r, d_r, d_r+1, d_r+1], matching the `smmla` lanes.
                let dw = [vzip1q_f32(w.d, w.d), vzip2q_f32(w.d, w.d)];
                let mw = [vzip1q_f32(w.m, w.m), vzip2q_f32(w.m, w.m)];
                for p in 0..P {
                    let ta = t0 + 2 * p;
                    let tb = (ta + 1).min(t0 + tokens - 1);
                    let (a, c) = (&*s.x.add(ta * s.nb + b), &*s.x.add(tb * s.nb + b));
                    let (alo, ahi) = (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16)));
                    let (clo, chi) = (vld1q_s8(c.qs.as_ptr()), vld1q_s8(c.qs.as_ptr().add(16)));
                    let [m0, m1] = zip64(alo, clo);
                    let [m2, m3] = zip64(ahi, chi);
                    let m = [m0, m1, m2, m3];
                    let dx = vld1q_f32([a.d, c.d, a.d, c.d].as_ptr());
                    let sx = vld1q_f32([a.s, c.s, a.s, c.s].as_ptr());
                    for (h, acc) in acc[g][p].iter_mut().enumerate() {
                        // Row pair `h`, elements 8e..8e+8: register 2e + h (see above).
                        let mut sums = vdupq_n_s32(0);
                        for (e, &m) in m.iter().enumerate() {
                            sums = smmla(sums, w.q[2 * e + h], m);
                        }
                        *acc = vfmaq_f32(*acc, vcvtq_f32_s32(sums), vmulq_f32(dw[h], dx));
                        if F == Q4_1 {
                            *acc = vfmaq_f32(*acc, mw[h], sx);
                        }
                    }
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (p, acc) in acc.iter().enumerate() {
                // [r0·ta, r0·tb, r1·ta, r1·tb] and the same for rows 2–3 → each token's row.
                let ta = vuzp1q_f32(acc[0], acc[1]);
                let tb = vuzp2q_f32(acc[0], acc[1]);
                let t = t0 + 2 * p;
                vst1q_f32(s.out.add(t * s.stride + (g0 + g) * GROUP), ta);
                if t + 1 < t0 + tokens {
                    vst1q_f32(s.out.add((t + 1) * s.stride + (g0 + g) * GROUP), tb);
                }
            }
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

/// Groups × token pairs of a 4×8 matrix, `G` groups and `P` pairs at a time.
///
/// SAFETY: the CPU has i8mm; `s` spans `groups` groups and `n` tokens.
#[inline(always)]
unsafe fn tiles8<const F: u8, const G: usize, const P: usize>(s: &Span, groups: usize, n: usize) {
    // SAFETY: every tile lies inside `groups × n` (an odd last token is read twice).
    unsafe {
        let mut g = 0;
        while g < groups {
            let whole = g + G <= groups;
            let mut t = 0;
            while t < n {
                let tokens = (n - t).min(2 * P);
                match (whole, tokens > 2) {
                    (true, true) if tokens == 2 * P => tile8::<F, G, P>(s, g, t, tokens),
                    (true, _) => tile8::<F, G, 1>(s, g, t, tokens.min(2)),
                    (false, _) => {
                        for g in g..groups {
                            tile8::<F, 1, 1>(s, g, t, tokens.min(2));
                        }
                    }
                }
                t += if whole && tokens == 2 * P {
                    tokens
                } else {
                    tokens.min(2)
                };
            }
            g += G;
        }
    }
}

/// Tile shapes: decode (`n = 1`) takes two groups at once, batches four tokens per group.
const G1: usize = 2;
const T4: usize = 4;

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
            Format::F32 | Format::F16 => return super::q8::gemm(p),
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
            tiles4::<L, F, 1, T4>(s, groups, n)
        }
    }
}

/// A 4×8 product with `smmla`: two token pairs per tile for batches.
///
/// SAFETY: the CPU has i8mm.
#[inline(always)]
unsafe fn x8<const F: u8>(s: &Span, groups: usize, n: usize) {
    // SAFETY: passed on.
    unsafe {
        if n <= 2 {
            tiles8::<F, G1, 1>(s, groups, n)
        } else {
            tiles8::<F, 1, 2>(s, groups, n)
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
