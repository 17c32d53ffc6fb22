//! aarch64 versions of the generic kernels: NEON (every aarch64 CPU; the float ones over
//! [`super::lanes`]), then the block-quantized product again with `sdot` (dotprod) and with
//! `smmla` (i8mm) where the CPU has them. This file holds the products over ggml rows; those
//! over the packed layouts are in [`super::x4`].
//!
//! The block products take a tile of 4 weight rows, decode each block of them once to 32 signed
//! bytes (`nibble − 8` for `q4_0`, the nibble for `q4_1`, as stored for `q8_0`, the nibble and
//! its fifth bit for `q5_1`, less 16 for `q5_0`) and multiply it
//! against 1–4 tokens: exact integer sums per (row, token) — `vmull_s8` + `vpadalq_s16`, or
//! `sdot` — reduced so that the four lanes are the four rows, converted to f32 and accumulated
//! with the block's `d_w·d_x` (plus `m·s` for `q4_1`), as llama.cpp's
//! `ggml_vec_dot_q4_0_q8_0` does. With i8mm, `smmla` multiplies 2 rows × 2 tokens × 8 bytes at
//! once. Only the order of the float sums differs from [`q8::gemm`], which the tests hold to
//! [`q8::error_budget`]; the 5-bit formats (the `gemm_q5` entry) keep the reference's
//! multiplies and adds unfused, in its order, and give its bits.
//!
//! `sdot` and `smmla` go through `asm!` (their intrinsics are unstable); each `asm!` only sits
//! in `#[inline(always)]` helpers inlined into functions compiled with the feature, which are
//! installed only after the CPU check (`crate::cpu`: detected with `std`, the build's target
//! features without it).

use core::arch::aarch64::*;
use core::arch::asm;

use super::lanes::widen_f16_bits;
use super::product::{Out, Product};
use super::q8::consts::{block_bytes, has_fifth_bit, has_min, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::q8::{self, Q8Block};
use super::{arm_k, x4, Kernels, Level, TILE_ROWS, TILE_TOKENS};
use crate::layout::Layout;
use crate::quant::{Format, BLOCK};

/// Rows of a tile: the four f32 lanes of an accumulator.
const R: usize = 4;
const _: () = assert!(R == TILE_ROWS);
const T: usize = TILE_TOKENS;

/// Integer dot products of signed bytes: 16 products added into the four i32 lanes of `acc`
/// (which lane holds which product is up to the implementation: only the lane sum counts).
trait IDot {
    fn dot(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t;
}

/// Widening multiplies: i8·i8 products are at most 2¹⁴ in magnitude, so i16 holds each, and
/// pairs are summed into i32 (`vpadalq_s16`) before anything could overflow.
struct Neon;

impl IDot for Neon {
    #[inline(always)]
    fn dot(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
        // SAFETY: register arithmetic; NEON is part of every aarch64 CPU.
        unsafe {
            let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
            let hi = vmull_high_s8(w, a);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

/// `sdot`: four i8·i8 products summed into each i32 lane.
struct Dotprod;

impl IDot for Dotprod {
    #[inline(always)]
    fn dot(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
        sdot(acc, w, a)
    }
}

/// `sdot` by vector: lane `i` of `acc` gains `Σ_k w[4i + k]·a[4i + k]`.
#[inline(always)]
pub(super) fn sdot(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: register arithmetic only; inlined only into functions compiled with `dotprod`
    // enabled and installed after detecting it.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {a:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            a = in(vreg) a,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// `smmla`: `acc + W·Aᵀ` for the 2×8 byte matrices `w` (two rows) and `a` (two tokens), as
/// `[w0·a0, w0·a1, w1·a0, w1·a1]`.
#[inline(always)]
pub(super) fn smmla(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: register arithmetic only; inlined only into functions compiled with `i8mm`
    // enabled and installed after detecting it.
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

/// One block of one weight row: elements 0..16 and 16..32 as signed bytes, `d` and (`q4_1`,
/// `q5_1`) `m`.
#[derive(Clone, Copy)]
struct Wb {
    lo: int8x16_t,
    hi: int8x16_t,
    d: f32,
    m: f32,
}

/// The bit of each byte lane within its 8-lane half: `vtstq_u8` against a byte of `qh`
/// repeated over a half spreads its 8 bits over the half's 8 lanes.
const LANE_BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];

/// `16·bit` for elements `0..16` (`qh` bits 0–15) or `16..32` (bits 16–31) of a 5-bit block:
/// bytes `h0` and `h1` of `qh`, each spread over 8 lanes.
///
/// SAFETY: NEON is part of every aarch64 CPU.
#[inline(always)]
unsafe fn fifth_bits(h0: u8, h1: u8) -> uint8x16_t {
    // SAFETY: register arithmetic and a 16-byte load of `LANE_BITS`.
    unsafe {
        let spread = vcombine_u8(vdup_n_u8(h0), vdup_n_u8(h1));
        let set = vtstq_u8(spread, vld1q_u8(LANE_BITS.as_ptr()));
        vandq_u8(set, vdupq_n_u8(16))
    }
}

/// Decodes the block at `p`.
///
/// SAFETY: `p` points at a whole block of format `F`.
#[inline(always)]
unsafe fn decode<const F: u8>(p: *const u8) -> Wb {
    // SAFETY: every read stays inside the block at `p` (`block_bytes(F)` bytes).
    unsafe {
        let half = |at: usize| widen_f16_bits(u16::from_le_bytes([*p.add(at), *p.add(at + 1)]));
        let m = if has_min(F) { half(2) } else { 0.0 };
        if F == Q8_0 {
            return Wb {
                lo: vld1q_s8(p.add(2).cast()),
                hi: vld1q_s8(p.add(18).cast()),
                d: half(0),
                m,
            };
        }
        // The nibbles follow `d`, `m` (with a minimum) and `qh` (5-bit formats, 4 bytes).
        let qh = if has_min(F) { 4 } else { 2 };
        let at = qh + if has_fifth_bit(F) { 4 } else { 0 };
        let packed = vld1q_u8(p.add(at));
        let mut lo = vandq_u8(packed, vdupq_n_u8(0x0f));
        let mut hi = vshrq_n_u8::<4>(packed);
        if has_fifth_bit(F) {
            let h = |i: usize| *p.add(qh + i);
            lo = vorrq_u8(lo, fifth_bits(h(0), h(1)));
            hi = vorrq_u8(hi, fifth_bits(h(2), h(3)));
        }
        let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
        // Stored codes are offset by half their range when the format has no minimum.
        let offset = match F {
            Q4_0 => 8,
            Q5_0 => 16,
            _ => 0,
        };
        let offset = vdupq_n_s8(offset);
        Wb {
            lo: vsubq_s8(lo, offset),
            hi: vsubq_s8(hi, offset),
            d: half(0),
            m,
        }
    }
}

/// `acc + sums·(d_w·d_x) + m_w·s_x` per lane (the last term with a minimum): fused for the 4-
/// and 8-bit formats, whose results are held to the error budget; the 5-bit ones round each
/// operation as the reference does, in its order.
///
/// SAFETY: NEON is part of every aarch64 CPU.
#[inline(always)]
unsafe fn accumulate<const F: u8>(
    acc: float32x4_t,
    sums: int32x4_t,
    dd: float32x4_t,
    mw: float32x4_t,
    sx: float32x4_t,
) -> float32x4_t {
    // SAFETY: register arithmetic.
    unsafe {
        let sums = vcvtq_f32_s32(sums);
        match F {
            Q5_0 => vaddq_f32(acc, vmulq_f32(dd, sums)),
            Q5_1 => vaddq_f32(acc, vaddq_f32(vmulq_f32(dd, sums), vmulq_f32(mw, sx))),
            Q4_1 => vfmaq_f32(vfmaq_f32(acc, sums, dd), mw, sx),
            _ => vfmaq_f32(acc, sums, dd),
        }
    }
}

/// The two halves of one token's block.
#[inline(always)]
fn act(a: &Q8Block) -> (int8x16_t, int8x16_t) {
    // SAFETY: `qs` is 32 bytes: two 16-byte loads.
    unsafe { (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16))) }
}

/// Four floats as a vector.
#[inline(always)]
fn f32x4(v: [f32; 4]) -> float32x4_t {
    // SAFETY: reads the four floats of `v`.
    unsafe { vld1q_f32(v.as_ptr()) }
}

/// Where a tile reads and writes: weight rows `w[i]` (the last one repeated when fewer than
/// four remain), `x` at the tile's first token, `out` at (first token, first row).
struct Tile {
    w: [*const u8; R],
    rows: usize,
    x: *const Q8Block,
    nb: usize,
    blocks: usize,
    out: *mut f32,
    stride: usize,
}

impl Tile {
    /// Stores the lanes of `acc` (rows) for token `t`.
    ///
    /// SAFETY: `out` is valid for `rows` floats at `t·stride`.
    #[inline(always)]
    unsafe fn store(&self, t: usize, acc: float32x4_t) {
        // SAFETY: writes `rows` floats at `t·stride`, as the contract allows.
        unsafe {
            let o = self.out.add(t * self.stride);
            if self.rows == R {
                vst1q_f32(o, acc);
            } else {
                let mut lanes = [0f32; R];
                vst1q_f32(lanes.as_mut_ptr(), acc);
                core::ptr::copy_nonoverlapping(lanes.as_ptr(), o, self.rows);
            }
        }
    }
}

/// `TT` tokens × 4 rows, one accumulator per token whose lanes are the rows.
///
/// SAFETY: the tile's rows hold `blocks` blocks of `F`, its `TT` tokens `blocks` of `nb`
/// blocks each, and `out` has room for `rows` floats at `t·stride` for each `t < TT`.
#[inline(always)]
unsafe fn dot_tile<D: IDot, const F: u8, const TT: usize>(tile: &Tile) {
    let bb = block_bytes(F);
    // SAFETY: block `b < blocks` of each row and of each token `t < TT` exists, and `store`
    // writes token `t < TT`, by the contract; NEON is part of every aarch64 CPU.
    unsafe {
        let mut acc = [vdupq_n_f32(0.0); TT];
        for b in 0..tile.blocks {
            let wb: [Wb; R] = core::array::from_fn(|i| decode::<F>(tile.w[i].add(b * bb)));
            let dw = f32x4(wb.map(|w| w.d));
            let mw = f32x4(wb.map(|w| w.m));
            for (t, acc) in acc.iter_mut().enumerate() {
                let a = &*tile.x.add(t * tile.nb + b);
                let (a0, a1) = act(a);
                let zero = vdupq_n_s32(0);
                // A loop, not a closure: closures may stay out of line, outside the function
                // compiled with the level's features.
                let mut s = [zero; R];
                for (s, w) in s.iter_mut().zip(&wb) {
                    *s = D::dot(D::dot(zero, w.lo, a0), w.hi, a1);
                }
                let sums = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
                let dd = vmulq_n_f32(dw, a.d);
                *acc = accumulate::<F>(*acc, sums, dd, mw, vdupq_n_f32(a.s));
            }
        }
        for (t, &acc) in acc.iter().enumerate() {
            tile.store(t, acc);
        }
    }
}

/// `[a0[0..8], a1[0..8]]` and `[a0[8..16], a1[8..16]]`: two 2×8 matrices for `smmla`.
#[inline(always)]
pub(super) fn zip64(a0: int8x16_t, a1: int8x16_t) -> [int8x16_t; 2] {
    // SAFETY: register shuffles; NEON is part of every aarch64 CPU.
    unsafe {
        let (a0, a1) = (vreinterpretq_s64_s8(a0), vreinterpretq_s64_s8(a1));
        [
            vreinterpretq_s8_s64(vzip1q_s64(a0, a1)),
            vreinterpretq_s8_s64(vzip2q_s64(a0, a1)),
        ]
    }
}

/// Both halves of two rows' (or two tokens') blocks as four 2×8 matrices.
#[inline(always)]
pub(super) fn pair(
    lo0: int8x16_t,
    hi0: int8x16_t,
    lo1: int8x16_t,
    hi1: int8x16_t,
) -> [int8x16_t; 4] {
    let [a, b] = zip64(lo0, lo1);
    let [c, d] = zip64(hi0, hi1);
    [a, b, c, d]
}

/// `2·TP` tokens (the last one repeated when `tokens` is fewer) × 4 rows with `smmla`: one
/// accumulator per (row pair, token pair), lanes `[r0·t0, r0·t1, r1·t0, r1·t1]`.
///
/// SAFETY: as [`dot_tile`] for `tokens ≤ 2·TP` tokens, and the CPU has i8mm.
#[inline(always)]
unsafe fn mmla_tile<const F: u8, const TP: usize>(tile: &Tile, tokens: usize) {
    let bb = block_bytes(F);
    // SAFETY: tokens `< tokens` exist by the contract (later ones repeat the last), and so do
    // block `b < blocks` of each of them and of each row; stores go to rows `< rows` of tokens
    // `< tokens`; NEON is part of every aarch64 CPU.
    unsafe {
        let x: [[*const Q8Block; 2]; TP] = core::array::from_fn(|p| {
            core::array::from_fn(|j| tile.x.add((2 * p + j).min(tokens - 1) * tile.nb))
        });
        let mut acc = [[vdupq_n_f32(0.0); TP]; 2];
        for b in 0..tile.blocks {
            let wb: [Wb; R] = core::array::from_fn(|i| decode::<F>(tile.w[i].add(b * bb)));
            let wm: [[int8x16_t; 4]; 2] = core::array::from_fn(|p| {
                let (w0, w1) = (wb[2 * p], wb[2 * p + 1]);
                pair(w0.lo, w0.hi, w1.lo, w1.hi)
            });
            let both = |p: usize, f: fn(&Wb) -> f32| {
                let (w0, w1) = (f(&wb[2 * p]), f(&wb[2 * p + 1]));
                f32x4([w0, w0, w1, w1])
            };
            let dw = [both(0, |w| w.d), both(1, |w| w.d)];
            let mw = [both(0, |w| w.m), both(1, |w| w.m)];
            for (tp, x) in x.iter().enumerate() {
                let (a0, a1) = (&*x[0].add(b), &*x[1].add(b));
                let ((l0, h0), (l1, h1)) = (act(a0), act(a1));
                let am = pair(l0, h0, l1, h1);
                let dx = f32x4([a0.d, a1.d, a0.d, a1.d]);
                let sx = f32x4([a0.s, a1.s, a0.s, a1.s]);
                for (p, wm) in wm.iter().enumerate() {
                    let mut s = vdupq_n_s32(0);
                    for (&w, &a) in wm.iter().zip(&am) {
                        s = smmla(s, w, a);
                    }
                    let a = &mut acc[p][tp];
                    *a = accumulate::<F>(*a, s, vmulq_f32(dw[p], dx), mw[p], sx);
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            for (tp, &acc) in acc.iter().enumerate() {
                let mut lanes = [0f32; 4];
                vst1q_f32(lanes.as_mut_ptr(), acc);
                for (l, &v) in lanes.iter().enumerate() {
                    let (r, t) = (2 * p + l / 2, 2 * tp + l % 2);
                    if r < tile.rows && t < tokens {
                        *tile.out.add(t * tile.stride + r) = v;
                    }
                }
            }
        }
    }
}

/// How the tiles of a product are computed: one type per level, so that code for a level is
/// only ever instantiated inside the functions compiled for it.
trait Tiles {
    /// The tile at `tile` for `tokens` (1 to 4) tokens.
    ///
    /// SAFETY: as [`dot_tile`] for `tokens` tokens, and the CPU has the level's features.
    unsafe fn tile<const F: u8>(tile: &Tile, tokens: usize);
}

impl<D: IDot> Tiles for D {
    #[inline(always)]
    unsafe fn tile<const F: u8>(tile: &Tile, tokens: usize) {
        // SAFETY: the caller's contract, for `tokens` tokens.
        unsafe {
            match tokens {
                4 => dot_tile::<D, F, 4>(tile),
                3 => dot_tile::<D, F, 3>(tile),
                2 => dot_tile::<D, F, 2>(tile),
                _ => dot_tile::<D, F, 1>(tile),
            }
        }
    }
}

/// `smmla` for 2 to 4 tokens, `sdot` for one.
struct I8mm;

impl Tiles for I8mm {
    #[inline(always)]
    unsafe fn tile<const F: u8>(tile: &Tile, tokens: usize) {
        // SAFETY: the caller's contract, for `tokens` tokens; i8mm and dotprod are available.
        unsafe {
            match tokens {
                3 | 4 => mmla_tile::<F, 2>(tile, tokens),
                2 => mmla_tile::<F, 1>(tile, tokens),
                _ => dot_tile::<Dotprod, F, 1>(tile),
            }
        }
    }
}

/// [`q8::gemm`] for format `F` over ggml rows, in tiles of 4 rows × up to 4 tokens.
#[inline(always)]
fn gemm<L: Tiles, const F: u8>(w: &[u8], rows: usize, x: &[Q8Block], n: usize, out: Out<'_>) {
    let mut out = out;
    if rows == 0 || n == 0 {
        return;
    }
    let (rb, nb) = (w.len() / rows, x.len() / n);
    let blocks = (rb / block_bytes(F)).min(nb);
    let (o, stride) = (out.checked(n, rows), out.stride());
    let mut r0 = 0;
    while r0 < rows {
        let nr = (rows - r0).min(R);
        let mut t0 = 0;
        while t0 < n {
            let nt = (n - t0).min(T);
            // SAFETY: rows `r0..r0 + nr ≤ rows` of `rb ≥ blocks·bb` bytes are inside `w`,
            // tokens `t0..t0 + nt ≤ n` of `nb ≥ blocks` blocks inside `x`, and `o` holds
            // `rows` floats at `t·stride` for every `t < n` (`checked` above).
            unsafe {
                let tile = Tile {
                    w: core::array::from_fn(|i| w.as_ptr().add((r0 + i.min(nr - 1)) * rb)),
                    rows: nr,
                    x: x.as_ptr().add(t0 * nb),
                    nb,
                    blocks,
                    out: o.add(t0 * stride + r0),
                    stride,
                };
                L::tile::<F>(&tile, nt);
            }
            t0 += nt;
        }
        r0 += nr;
    }
}

/// [`gemm`] for each block format over ggml rows; other layouts take the reference.
#[inline(always)]
fn gemm_level<L: Tiles>(p: Product<'_>) {
    if p.w.geometry.layout != Layout::Rows {
        return q8::gemm(p);
    }
    let nb = p.w.geometry.blocks;
    let (w, rows, x) = (
        p.w.plain_rows(p.rows.clone()),
        p.rows.len(),
        &p.x[..p.n * nb],
    );
    match p.w.geometry.format {
        Format::Q4_0 => gemm::<L, Q4_0>(w, rows, x, p.n, p.out),
        Format::Q4_1 => gemm::<L, Q4_1>(w, rows, x, p.n, p.out),
        Format::Q8_0 => gemm::<L, Q8_0>(w, rows, x, p.n, p.out),
        Format::Q5_0 => gemm::<L, Q5_0>(w, rows, x, p.n, p.out),
        Format::Q5_1 => gemm::<L, Q5_1>(w, rows, x, p.n, p.out),
        _ => q8::gemm(p),
    }
}

fn rows_neon(p: Product<'_>) {
    gemm_level::<Neon>(p);
}

#[target_feature(enable = "dotprod")]
fn rows_dotprod(p: Product<'_>) {
    gemm_level::<Dotprod>(p);
}

#[target_feature(enable = "dotprod,i8mm")]
fn rows_i8mm(p: Product<'_>) {
    gemm_level::<I8mm>(p);
}

/// The float kernels over NEON's 4 lanes ([`lanes`]); NEON is part of every aarch64 CPU.
mod float {
    use super::super::lanes::{self, V128};
    use super::super::{KvRows, TILE_ROWS};

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: NEON is baseline.
        unsafe { lanes::dot::<V128, f32>(a, b) }
    }

    /// 4 rows × 3 tokens × 2 vectors (8 lanes) of sums, 3 activations and a weight: 28 of the
    /// 32 registers.
    pub fn dot4(w: &[f32], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::dot4::<V128, f32, 3, 2>(w, x, out) }
    }

    pub fn dot4_f16(w: &[u16], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::dot4::<V128, u16, 3, 2>(w, x, out) }
    }

    pub fn scores(q: &[f32], k: KvRows<'_>, scale: f32, out: &mut [f32]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::scores_rows::<V128>(q, k, scale, out) }
    }

    pub fn mix(w: &[f32], v: KvRows<'_>, out: &mut [f32]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::mix_rows::<V128>(w, v, out) }
    }

    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::rms_norm::<V128>(x, weight, eps, out) }
    }

    pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::swiglu::<V128>(gate, up, out) }
    }

    pub fn softmax(x: &mut [f32]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::softmax::<V128>(x) }
    }

    pub fn to_f16(x: &[f32], out: &mut [u16]) {
        // SAFETY: NEON is baseline.
        unsafe { lanes::to_f16::<V128>(x, out) }
    }
}

/// [`q8::quantize`], bit-identical to it: the same scalar scale arithmetic, the same products
/// `v·id`, `fcvtas` (round half away from zero, as `roundf`; NaN to 0) and saturating
/// narrowing (as `as i8`), the same f16 rounding of `d` and `s`.
fn quantize(x: &[f32], out: &mut [Q8Block]) {
    let round_f16 = |v: f32| half::f16::from_f32(v).to_f32();
    for (block, q) in x.chunks_exact(BLOCK).zip(out.iter_mut()) {
        // SAFETY: `block` holds 32 floats (eight 4-lane loads) and `qs` 32 bytes (two 16-byte
        // stores); NEON is baseline.
        let (d, sum) = unsafe {
            let v: [float32x4_t; 8] =
                core::array::from_fn(|k| vld1q_f32(block.as_ptr().add(4 * k)));
            // `maxnm` skips NaNs as `f32::max` does; the fold starts from 0.
            let m = v
                .iter()
                .fold(vdupq_n_f32(0.0), |m, &v| vmaxnmq_f32(m, vabsq_f32(v)));
            let amax = 0f32.max(vmaxnmvq_f32(m));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let i: [int32x4_t; 8] = v.map(|v| vcvtaq_s32_f32(vmulq_n_f32(v, id)));
            let h: [int16x8_t; 4] = core::array::from_fn(|k| {
                vcombine_s16(vqmovn_s32(i[2 * k]), vqmovn_s32(i[2 * k + 1]))
            });
            let b0 = vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1]));
            let b1 = vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3]));
            vst1q_s8(q.qs.as_mut_ptr(), b0);
            vst1q_s8(q.qs.as_mut_ptr().add(16), b1);
            (d, i32::from(vaddlvq_s8(b0)) + i32::from(vaddlvq_s8(b1)))
        };
        q.d = round_f16(d);
        q.s = round_f16(sum as f32 * d);
    }
}

/// The table of an aarch64 `level` (`None` for other levels). The caller
/// has checked that the CPU has the level's features ([`Level::check`]).
pub fn table(level: Level) -> Option<Kernels> {
    let neon = Kernels {
        level: Level::Neon,
        name: "aarch64 neon",
        dot: float::dot,
        dot4: float::dot4,
        dot4_f16: float::dot4_f16,
        gemm_q8: |p| x4::gemm_neon(p, rows_neon),
        quantize,
        gemm_q8k: arm_k::gemm_neon,
        quantize_q8k: super::q8k::quantize,
        gemm_q5: rows_neon,
        rms_norm: float::rms_norm,
        swiglu: float::swiglu,
        softmax: float::softmax,
        scores: float::scores,
        mix: float::mix,
        to_f16: float::to_f16,
    };
    match level {
        Level::Neon => Some(neon),
        Level::Dotprod => Some(Kernels {
            level,
            name: "aarch64 dotprod",
            // SAFETY: these only need dotprod, which the caller checked.
            gemm_q8: |p| unsafe { x4::gemm_dotprod(p, |p| rows_dotprod(p)) },
            // SAFETY: dotprod, which the caller checked.
            gemm_q5: |p| unsafe { rows_dotprod(p) },
            // SAFETY: dotprod, which the caller checked.
            gemm_q8k: |w, rows, x, n, out| unsafe { arm_k::gemm_dotprod(w, rows, x, n, out) },
            ..neon
        }),
        Level::I8mm => Some(Kernels {
            level,
            name: "aarch64 i8mm",
            // SAFETY: these only need dotprod and i8mm, which the caller checked.
            gemm_q8: |p| unsafe { x4::gemm_i8mm(p, |p| rows_i8mm(p)) },
            // SAFETY: dotprod and i8mm, which the caller checked.
            gemm_q5: |p| unsafe { rows_i8mm(p) },
            // SAFETY: dotprod and i8mm, which the caller checked.
            gemm_q8k: |w, rows, x, n, out| unsafe { arm_k::gemm_i8mm(w, rows, x, n, out) },
            ..neon
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::q8::BlockDot;

    /// The levels follow the CPU model qemu emulates (Cortex-A72: NEON; A76: dotprod; `max`:
    /// i8mm), and the best of them is the default (with `std`; without it the build's target
    /// features decide, `level::tests`).
    #[cfg(feature = "std")]
    #[test]
    fn levels_follow_the_cpu() {
        use std::arch::is_aarch64_feature_detected as has;
        let mut want = vec![Level::Generic, Level::Neon];
        if has!("dotprod") {
            want.push(Level::Dotprod);
            if has!("i8mm") {
                want.push(Level::I8mm);
            }
        }
        eprintln!("aarch64 levels: {:?}", Level::available());
        assert_eq!(Level::available(), want);
        assert_eq!(Level::best(), *want.last().expect("neon"));
    }

    /// Each integer block dot equals the portable one exactly, extremes included.
    #[test]
    fn block_dots_equal_the_portable_ones() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
        for round in 0..2000 {
            let (mut w, mut a) = ([0u8; BLOCK], [0i8; BLOCK]);
            for j in 0..BLOCK {
                w[j] = if round == 0 { 0x80 } else { byte() };
                a[j] = if round == 0 { i8::MIN } else { byte() as i8 };
            }
            let want = q8::Scalar::signed(&w, &a);
            let (wv, av) = (w.map(|b| b as i8), a);
            // SAFETY: 32 bytes each: two 16-byte loads apiece.
            let (w0, w1, a0, a1) = unsafe {
                (
                    vld1q_s8(wv.as_ptr()),
                    vld1q_s8(wv.as_ptr().add(16)),
                    vld1q_s8(av.as_ptr()),
                    vld1q_s8(av.as_ptr().add(16)),
                )
            };
            // SAFETY: register arithmetic; NEON is baseline.
            let neon = unsafe { vaddvq_s32(Neon::dot(Neon::dot(vdupq_n_s32(0), w0, a0), w1, a1)) };
            assert_eq!(neon, want);
            if dotprod {
                #[target_feature(enable = "dotprod")]
                fn run(w0: int8x16_t, w1: int8x16_t, a0: int8x16_t, a1: int8x16_t) -> i32 {
                    vaddvq_s32(Dotprod::dot(Dotprod::dot(vdupq_n_s32(0), w0, a0), w1, a1))
                }
                // SAFETY: dotprod was detected above.
                assert_eq!(unsafe { run(w0, w1, a0, a1) }, want);
            }
        }
    }
}
