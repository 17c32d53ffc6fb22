//! Block products over matrices packed 4×16 (`layout::Layout::X16`) for x86-64: AVX-512 VNNI,
//! AVX-VNNI and AVX2.
//!
//! A block of a group is 64 bytes: the four rows' 16 packed bytes side by side (for `q8_0`,
//! two such halves), so one 512-bit load (two 256-bit ones) holds a block of four rows, and the
//! 4-bit weights unpack with one shift and two masks into elements 0–15 and 16–31 of each row.
//! A token's block is broadcast to match (its elements 0–15 to every 128-bit lane, then
//! 16–31), so `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd` on AVX2) leaves in each i32 lane the sum
//! of 8 products of one row, and lanes 4r..4r+4 are row r. Each lane is scaled by its row's
//! `d_w·d_x` into a float accumulator per (group, token); nothing is summed across lanes until
//! the row ends. A tile of `G` groups × `T` tokens loads each block of weights once for `T`
//! tokens and each token's block once for `G` groups, and the loops run groups outside tokens,
//! so a participant reads each weight once per product.
//!
//! The 5-bit formats unpack as the 4-bit ones, then take their fifth bits from the scales'
//! masks (see `layout`): one masked byte add per half with AVX-512 BW, a bits-to-bytes
//! expansion on AVX2.
//!
//! The 4- and 5-bit quants are unsigned (`q4_0` stores `q + 8`, `q5_0` `q + 16`) and VNNI's
//! `q8_0` weights are made unsigned by adding 128, so each lane's integer sum starts from
//! `−8·Σa` (`−16·Σa`, `−128·Σa`) over its own 8 activations: exact integers, computed once per
//! (token, block) before the tiles. `q4_1` and `q5_1` add `m·s` per row and block.
//! AVX2's `q8_0` multiplies `|w|` by `a·sign(w)` instead. Integer parts are exact; only the
//! order of the float sums differs from the reference, which the tests hold to
//! [`q8::error_budget`](super::q8::error_budget).

use core::arch::x86_64::*;

use super::product::Product;
use super::q8::consts::{has_fifth_bit, has_min, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::q8::Q8Block;
use crate::layout::{Layout, GROUP};
use crate::quant::Format;

/// Quant bytes of one block of a group: 4 rows × 16 (or 32 for `q8_0`).
const fn group_quants(f: u8) -> usize {
    if f == Q8_0 {
        128
    } else {
        64
    }
}

/// Scale bytes of one block of a group: 4 `d` (and 4 `m` for `q4_1`, `q5_1`), f16, then the
/// 5-bit formats' two 64-bit masks of fifth bits.
const fn group_scales(f: u8) -> usize {
    match f {
        Q4_1 => 16,
        Q5_0 => 24,
        Q5_1 => 32,
        _ => 8,
    }
}

/// Where the masks of fifth bits (elements 0–15 of the four rows, then 16–31) start among a
/// block's scale bytes, for the 5-bit formats.
const fn fifth_bits(f: u8) -> Option<usize> {
    if has_fifth_bit(f) {
        Some(group_scales(f) - 16)
    } else {
        None
    }
}

/// The integer lane sums start from `−K·Σa` over each lane's activations: `K` is 8 for `q4_0`
/// (stored `q + 8`), 16 for `q5_0` (`q + 16`), 128 for `q8_0` on VNNI (`w + 128`), 0 otherwise.
const fn offset(f: u8, vnni: bool) -> u8 {
    match f {
        Q4_0 => 8,
        Q5_0 => 16,
        Q8_0 if vnni => 128,
        _ => 0,
    }
}

/// Lane offsets of one token's block: `−K·Σ` of the activations each i32 lane holds (lane
/// `k`: elements `4k..4k+4` and `16+4k..16+4k+4`).
type Offsets = [i32; 4];

/// One ISA's arithmetic on a group of four rows.
trait Group<const F: u8> {
    /// Accumulators of one (group, token).
    type Acc: Copy;
    /// One block of a group, unpacked, with its scales.
    type Wt: Copy;
    /// One token's block, broadcast.
    type Act: Copy;

    fn zero() -> Self::Acc;
    /// SAFETY: the CPU has the ISA's features; `q` and `s` point at a block's quants and scales.
    unsafe fn weights(q: *const u8, s: *const u8) -> Self::Wt;
    /// SAFETY: as `weights`; `a` is a token's block and `off` its lane offsets.
    unsafe fn act(a: *const Q8Block, off: *const Offsets) -> Self::Act;
    /// SAFETY: the CPU has the ISA's features.
    unsafe fn step(acc: Self::Acc, w: &Self::Wt, a: &Self::Act) -> Self::Acc;
    /// The sums of two accumulators.
    ///
    /// SAFETY: the CPU has the ISA's features.
    unsafe fn merge(a: Self::Acc, b: Self::Acc) -> Self::Acc;
    /// Writes the four rows' sums to `out[0..4]`.
    ///
    /// SAFETY: the CPU has the ISA's features; `out` has room for four floats.
    unsafe fn store(acc: Self::Acc, out: *mut f32);
}

/// Where a product's groups and tokens lie.
#[derive(Clone, Copy)]
struct Span {
    /// The group's quants and scales of the first group of the range, and their strides.
    quants: *const u8,
    scales: *const u8,
    quants_per_group: usize,
    scales_per_group: usize,
    x: *const Q8Block,
    off: *const Offsets,
    nb: usize,
    out: *mut f32,
    stride: usize,
}

/// One tile: groups `g0..g0 + G` × tokens `t0..t0 + T`.
///
/// SAFETY: the CPU has the ISA's features; the groups, tokens and outputs exist.
#[inline(always)]
unsafe fn tile<K: Group<F>, const F: u8, const G: usize, const T: usize>(
    s: &Span,
    g0: usize,
    t0: usize,
) {
    // SAFETY: every pointer stays inside the groups, tokens and outputs of the contract.
    unsafe {
        // A tile of one group and one token takes its blocks in pairs, with a set of sums
        // for each, so that a block's sum does not wait on the one before; larger tiles have
        // enough independent sums. Two named sets, not an array indexed by the block, so
        // that both stay in registers.
        let pairs = G * T == 1;
        let mut acc = [[K::zero(); T]; G];
        let mut odd = [[K::zero(); T]; G];
        let mut b = 0;
        while b < s.nb {
            block::<K, F, G, T>(s, g0, t0, b, &mut acc);
            b += 1;
            if pairs && b < s.nb {
                block::<K, F, G, T>(s, g0, t0, b, &mut odd);
                b += 1;
            }
        }
        for (g, (acc, odd)) in acc.iter().zip(&odd).enumerate() {
            for (t, (&acc, &odd)) in acc.iter().zip(odd).enumerate() {
                let acc = if pairs { K::merge(acc, odd) } else { acc };
                K::store(acc, s.out.add((t0 + t) * s.stride + (g0 + g) * GROUP));
            }
        }
    }
}

/// Block `b` of groups `g0..g0 + G` × tokens `t0..t0 + T`, added to `acc`.
///
/// SAFETY: as [`tile`], and `b` is one of the span's blocks.
#[inline(always)]
unsafe fn block<K: Group<F>, const F: u8, const G: usize, const T: usize>(
    s: &Span,
    g0: usize,
    t0: usize,
    b: usize,
    acc: &mut [[K::Acc; T]; G],
) {
    // SAFETY: every pointer stays inside the groups, tokens and outputs of the contract.
    unsafe {
        let (qg, sg) = (group_quants(F), group_scales(F));
        // Loops, not closures: a closure may stay out of line, outside the function compiled
        // with the ISA's features, and take every intrinsic with it.
        if T == 1 {
            // A hint only: addresses past the matrix are not dereferenced.
            for g in 0..G {
                let quants = s
                    .quants
                    .wrapping_add((g0 + g) * s.quants_per_group + b * qg);
                for line in (0..qg).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(
                        quants.wrapping_add(PREFETCH_BLOCKS * qg + line).cast(),
                    );
                }
                let scales = s
                    .scales
                    .wrapping_add((g0 + g) * s.scales_per_group + b * sg);
                _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(PREFETCH_BLOCKS * sg).cast());
            }
        }
        let mut w = [K::weights(
            s.quants.add(g0 * s.quants_per_group + b * qg),
            s.scales.add(g0 * s.scales_per_group + b * sg),
        ); G];
        for (g, w) in w.iter_mut().enumerate().skip(1) {
            *w = K::weights(
                s.quants.add((g0 + g) * s.quants_per_group + b * qg),
                s.scales.add((g0 + g) * s.scales_per_group + b * sg),
            );
        }
        for t in 0..T {
            let at = (t0 + t) * s.nb + b;
            let a = K::act(s.x.add(at), s.off.add(at));
            for (acc, w) in acc.iter_mut().zip(&w) {
                acc[t] = K::step(acc[t], w, &a);
            }
        }
    }
}

/// Groups `0..groups` × tokens `0..n` in tiles of `G × T` (then smaller ones at the edges).
///
/// SAFETY: as [`tile`] for every group and token.
#[inline(always)]
unsafe fn tiles<K: Group<F>, const F: u8, const G: usize, const T: usize>(
    s: &Span,
    groups: usize,
    n: usize,
) {
    // SAFETY: every tile lies inside `groups × n`.
    unsafe {
        let mut g = 0;
        while g < groups {
            let whole = g + G <= groups;
            let mut t = 0;
            while t + T <= n {
                if whole {
                    tile::<K, F, G, T>(s, g, t);
                } else {
                    for g in g..groups {
                        tile::<K, F, 1, T>(s, g, t);
                    }
                }
                t += T;
            }
            while t < n {
                if whole {
                    tile::<K, F, G, 1>(s, g, t);
                } else {
                    for g in g..groups {
                        tile::<K, F, 1, 1>(s, g, t);
                    }
                }
                t += 1;
            }
            g += G;
        }
    }
}

/// Fills `off` with every token's lane offsets (`x.len()` of them), `−k·Σa` per lane.
///
/// SAFETY: AVX2 is available; `off` has room for `x.len()` entries.
#[inline(always)]
unsafe fn offsets(x: &[Q8Block], k: u8, off: *mut Offsets) {
    // SAFETY: loads read each block's 32 quants; stores write `x.len()` entries of `off`.
    unsafe {
        for (i, a) in x.iter().enumerate() {
            let q = _mm256_loadu_si256(a.qs.as_ptr().cast());
            // i32 lane i: Σ a[4i..4i+4] (pairs of at most 2·127 fit i16).
            let fours = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_set1_epi8(1), q),
                _mm256_set1_epi16(1),
            );
            // Lane k of a product holds elements 4k..4k+4 and 16+4k..16+4k+4.
            let lanes = _mm_add_epi32(
                _mm256_castsi256_si128(fours),
                _mm256_extracti128_si256::<1>(fours),
            );
            let scaled = _mm_mullo_epi32(lanes, _mm_set1_epi32(-i32::from(k)));
            _mm_storeu_si128(off.add(i).cast(), scaled);
        }
    }
}

/// Runs `p` (an X16 matrix, rows starting on a group) on the ISA `K` in tiles of `G × T`.
///
/// SAFETY: the CPU has `K`'s features and AVX2.
#[inline(always)]
unsafe fn gemm_with<K: Group<F>, const F: u8, const G: usize, const T: usize>(
    p: Product<'_>,
    vnni: bool,
    tail: fn(Product<'_>),
) {
    let Product {
        w,
        rows,
        x,
        n,
        mut out,
        scratch,
    } = p;
    let g = w.geometry;
    let (nb, first) = (g.blocks, rows.start);
    let grouped_end = rows.end.min(g.groups() * GROUP);
    assert!(
        first.is_multiple_of(GROUP)
            && grouped_end.is_multiple_of(GROUP)
            && rows.end <= g.rows
            && x.len() >= n * nb,
        "x16 gemm: rows {rows:?} of {} ({nb} blocks), {n} tokens",
        g.rows
    );
    let groups = grouped_end.saturating_sub(first) / GROUP;
    let o = out.checked(n, rows.len());
    let stride = out.stride();
    let k = offset(F, vnni);
    let entries = n * nb;
    let base = scratch.as_mut_ptr().cast::<u8>();
    let skip = base.align_offset(64);
    let room =
        core::mem::size_of_val(scratch).saturating_sub(skip) / core::mem::size_of::<Offsets>();
    assert!(
        k == 0 || room >= entries,
        "x16 gemm: scratch for {entries} offsets holds {room} (see kernels::scratch_floats)"
    );
    // SAFETY: `skip` is within `scratch` (checked by the subtraction above) and the offsets fit.
    let off = unsafe { base.add(skip) }.cast::<Offsets>();
    if k != 0 {
        // SAFETY: `x` holds `entries` blocks, `off` room for as many; AVX2 by the contract.
        unsafe { offsets(&x[..entries], k, off) };
    }
    let span = Span {
        quants: w.bytes[g.quants(first / GROUP)..].as_ptr(),
        scales: w.bytes[g.scales(first / GROUP)..].as_ptr(),
        quants_per_group: nb * group_quants(F),
        scales_per_group: nb * group_scales(F),
        x: x.as_ptr(),
        off,
        nb,
        out: o,
        stride,
    };
    // SAFETY: the groups `first / 4..` up to `groups` lie in `w` (the geometry's), the `n`
    // tokens in `x`, and `o` holds `rows.len()` columns of `n` tokens (`checked`).
    unsafe { tiles::<K, F, G, T>(&span, groups, n) };
    let plain = first + groups * GROUP;
    if plain < rows.end {
        // SAFETY: the columns past the groups are this call's alone.
        let out = unsafe { out.columns(plain - first) };
        tail(Product {
            w,
            rows: plain..rows.end,
            x,
            n,
            out,
            scratch: &mut [],
        });
    }
}

/// AVX-512 VNNI: one register holds a block of a group.
struct Avx512Vnni;

#[derive(Clone, Copy)]
struct Wt512 {
    lo: __m512i,
    hi: __m512i,
    d: __m512,
    /// `q4_1`, `q5_1`: the four rows' `m`.
    m: __m128,
}

#[derive(Clone, Copy)]
struct Act512 {
    lo: __m512i,
    hi: __m512i,
    off: __m512i,
    d: __m512,
    s: __m128,
}

/// Per-lane sums, and (`q4_1`, `q5_1`) the four rows' `Σ m·s`, which needs no lanes of its own.
type Acc512 = (__m512, __m128);

impl<const F: u8> Group<F> for Avx512Vnni {
    type Acc = Acc512;
    type Wt = Wt512;
    type Act = Act512;

    #[inline(always)]
    fn zero() -> Acc512 {
        // SAFETY: register arithmetic inside functions compiled for AVX-512.
        unsafe { (_mm512_setzero_ps(), _mm_setzero_ps()) }
    }

    #[inline(always)]
    unsafe fn weights(q: *const u8, s: *const u8) -> Wt512 {
        // SAFETY: reads one block of a group (64 or 128 quant bytes, 8 to 32 scale bytes).
        unsafe {
            let (mut lo, mut hi) = if F == Q8_0 {
                let bias = _mm512_set1_epi8(-128);
                (
                    _mm512_xor_si512(_mm512_loadu_si512(q.cast()), bias),
                    _mm512_xor_si512(_mm512_loadu_si512(q.add(64).cast()), bias),
                )
            } else {
                let packed = _mm512_loadu_si512(q.cast());
                let nibble = _mm512_set1_epi8(0x0f);
                (
                    _mm512_and_si512(packed, nibble),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble),
                )
            };
            if let Some(at) = fifth_bits(F) {
                // Bit 16r + j of a mask is byte j of row r's half: the byte's bit 4, clear
                // in a nibble, so a masked byte add sets it (AVX-512 has no byte-masked OR).
                let masks = s.add(at).cast::<u64>();
                let bit = _mm512_set1_epi8(0x10);
                lo = _mm512_mask_add_epi8(lo, masks.read_unaligned(), lo, bit);
                hi = _mm512_mask_add_epi8(hi, masks.add(1).read_unaligned(), hi, bit);
            }
            // Rows' d (and m) to lanes 4r..4r+4: d_r at index r, m_r at index 4 + r.
            let scales = if has_min(F) {
                _mm256_cvtph_ps(_mm_loadu_si128(s.cast()))
            } else {
                _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(s.cast())))
            };
            let wide = _mm512_castps256_ps512(scales);
            let d_idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
            let d = _mm512_permutexvar_ps(d_idx, wide);
            let m = _mm256_extractf128_ps::<1>(scales);
            Wt512 { lo, hi, d, m }
        }
    }

    #[inline(always)]
    unsafe fn act(a: *const Q8Block, off: *const Offsets) -> Act512 {
        // SAFETY: reads one token's block (32 quants, d, s) and its offsets.
        unsafe {
            let qs = (*a).qs.as_ptr();
            let lo = _mm512_broadcast_i32x4(_mm_loadu_si128(qs.cast()));
            let hi = _mm512_broadcast_i32x4(_mm_loadu_si128(qs.add(16).cast()));
            let off = if offset(F, true) == 0 {
                _mm512_setzero_si512()
            } else {
                _mm512_broadcast_i32x4(_mm_loadu_si128(off.cast()))
            };
            Act512 {
                lo,
                hi,
                off,
                d: _mm512_set1_ps((*a).d),
                s: _mm_set1_ps((*a).s),
            }
        }
    }

    #[inline(always)]
    unsafe fn step((acc, ms): Acc512, w: &Wt512, a: &Act512) -> Acc512 {
        // SAFETY: register arithmetic; AVX-512 F/VNNI by the contract.
        unsafe {
            let sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a.off, w.lo, a.lo), w.hi, a.hi);
            let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(w.d, a.d), acc);
            if has_min(F) {
                (acc, _mm_fmadd_ps(w.m, a.s, ms))
            } else {
                (acc, ms)
            }
        }
    }

    #[inline(always)]
    unsafe fn merge((a, am): Acc512, (b, bm): Acc512) -> Acc512 {
        // SAFETY: register arithmetic; AVX-512 by the contract.
        unsafe { (_mm512_add_ps(a, b), _mm_add_ps(am, bm)) }
    }

    #[inline(always)]
    unsafe fn store((acc, ms): Acc512, out: *mut f32) {
        // SAFETY: register shuffles, then four floats at `out`.
        unsafe {
            let pairs = _mm512_add_ps(acc, _mm512_permute_ps::<0b10_11_00_01>(acc));
            let quads = _mm512_add_ps(pairs, _mm512_permute_ps::<0b01_00_11_10>(pairs));
            let rows = _mm512_permutexvar_ps(
                _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0),
                quads,
            );
            _mm_storeu_ps(out, _mm_add_ps(_mm512_castps512_ps128(rows), ms));
        }
    }
}

/// AVX2, with AVX-VNNI's 256-bit `vpdpbusd` when `V`: two registers hold a block of a group
/// (rows 0–1 and 2–3). The two row pairs' sums are folded into one register of lanes
/// `[r0 r0 r2 r2 | r1 r1 r3 r3]` before they become floats, so each (group, token, block) takes
/// one conversion and one multiply-add, not two.
struct Avx2<const V: bool>;

#[derive(Clone, Copy)]
struct Wt256 {
    /// Per row pair: elements 0–15 and 16–31 (`|w|` for AVX2's `q8_0`), with `sign` the
    /// signed weights whose signs the activations take.
    lo: [__m256i; 2],
    hi: [__m256i; 2],
    sign_lo: [__m256i; 2],
    sign_hi: [__m256i; 2],
    /// The rows' `d` in the folded lanes' order.
    d: __m256,
    /// `q4_1`, `q5_1`: the four rows' `m`.
    m: __m128,
}

#[derive(Clone, Copy)]
struct Act256 {
    lo: __m256i,
    hi: __m256i,
    /// Each pair's starting lanes with AVX-VNNI; the folded lanes' offsets on AVX2.
    off: __m256i,
    d: __m256,
    s: __m128,
}

/// Folded lane sums of the four rows, and (`q4_1`, `q5_1`) their `Σ m·s`.
type Acc256 = (__m256, __m128);

/// Whether AVX2 without VNNI adds a format's offsets after folding (the 4-bit formats fold
/// their i16 pair sums; VNNI starts each pair's sums from the offsets instead).
const fn folds_i16(f: u8, vnni: bool) -> bool {
    !vnni && f != Q8_0
}

/// `Σ` of byte pairs `u·s` into i32 lanes: AVX-VNNI's `vpdpbusd`, else `vpmaddubsw` +
/// `vpmaddwd` (no pair of a quant up to 31 or `|w| ≤ 128` with `|a| ≤ 128` saturates i16).
#[inline(always)]
unsafe fn dot<const V: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    // SAFETY: register arithmetic; AVX2 (and AVX-VNNI when `V`) by the caller's contract.
    unsafe {
        if V {
            _mm256_dpbusd_avx_epi32(acc, u, s)
        } else {
            let pairs = _mm256_maddubs_epi16(u, s);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }
}

/// The fifth bits of 32 bytes (two rows' halves), 32 bits at `bits`, as bytes of `0x10`
/// where set: byte `j` takes byte `j / 8` of the word and keeps bit `j % 8`.
///
/// SAFETY: AVX2 is available; `bits` points at 4 readable bytes.
#[inline(always)]
unsafe fn fifth_bytes(bits: *const u8) -> __m256i {
    // SAFETY: reads 4 bytes; register arithmetic.
    unsafe {
        let set = super::x86::bit_bytes(bits.cast::<u32>().read_unaligned());
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

impl<const F: u8, const V: bool> Group<F> for Avx2<V> {
    type Acc = Acc256;
    type Wt = Wt256;
    type Act = Act256;

    #[inline(always)]
    fn zero() -> Acc256 {
        // SAFETY: register arithmetic inside functions compiled for AVX2.
        unsafe { (_mm256_setzero_ps(), _mm_setzero_ps()) }
    }

    #[inline(always)]
    unsafe fn weights(q: *const u8, s: *const u8) -> Wt256 {
        // SAFETY: reads one block of a group (64 or 128 quant bytes, 8 to 32 scale bytes).
        unsafe {
            let zero = _mm256_setzero_si256();
            let (mut lo, mut hi) = ([zero; 2], [zero; 2]);
            let (mut sign_lo, mut sign_hi) = ([zero; 2], [zero; 2]);
            for p in 0..2 {
                if F == Q8_0 {
                    let l = _mm256_loadu_si256(q.add(32 * p).cast());
                    let h = _mm256_loadu_si256(q.add(64 + 32 * p).cast());
                    if V {
                        let bias = _mm256_set1_epi8(-128);
                        lo[p] = _mm256_xor_si256(l, bias);
                        hi[p] = _mm256_xor_si256(h, bias);
                    } else {
                        lo[p] = _mm256_abs_epi8(l);
                        hi[p] = _mm256_abs_epi8(h);
                        sign_lo[p] = l;
                        sign_hi[p] = h;
                    }
                } else {
                    let packed = _mm256_loadu_si256(q.add(32 * p).cast());
                    let nibble = _mm256_set1_epi8(0x0f);
                    lo[p] = _mm256_and_si256(packed, nibble);
                    hi[p] = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
                    if let Some(at) = fifth_bits(F) {
                        // Rows 2p and 2p + 1 are bits 32p..32p + 32 of each mask.
                        lo[p] = _mm256_or_si256(lo[p], fifth_bytes(s.add(at + 4 * p)));
                        hi[p] = _mm256_or_si256(hi[p], fifth_bytes(s.add(at + 8 + 4 * p)));
                    }
                }
            }
            let scales = if has_min(F) {
                _mm256_cvtph_ps(_mm_loadu_si128(s.cast()))
            } else {
                _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(s.cast())))
            };
            let d = _mm256_permutevar8x32_ps(scales, _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3));
            let m = _mm256_extractf128_ps::<1>(scales);
            Wt256 {
                lo,
                hi,
                sign_lo,
                sign_hi,
                d,
                m,
            }
        }
    }

    #[inline(always)]
    unsafe fn act(a: *const Q8Block, off: *const Offsets) -> Act256 {
        // SAFETY: reads one token's block (32 quants, d, s) and its offsets.
        unsafe {
            let qs = (*a).qs.as_ptr();
            let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.cast()));
            let hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.add(16).cast()));
            let off = if offset(F, V) == 0 {
                _mm256_setzero_si256()
            } else {
                let lanes = _mm_loadu_si128(off.cast());
                // Folded, lane j of a row holds what its lanes 2j and 2j+1 held.
                let lanes = if folds_i16(F, V) {
                    _mm_hadd_epi32(lanes, lanes)
                } else {
                    lanes
                };
                _mm256_broadcastsi128_si256(lanes)
            };
            Act256 {
                lo,
                hi,
                off,
                d: _mm256_set1_ps((*a).d),
                s: _mm_set1_ps((*a).s),
            }
        }
    }

    #[inline(always)]
    unsafe fn step((acc, ms): Acc256, w: &Wt256, a: &Act256) -> Acc256 {
        // SAFETY: register arithmetic; AVX2 (AVX-VNNI when `V`) by the contract.
        unsafe {
            let sums = if folds_i16(F, V) {
                // Two products per i16 and two halves: at most 4·31·128 per pair's i16
                // (5-bit quants), and twice that once the pairs fold, within i16.
                let mut pairs = [_mm256_setzero_si256(); 2];
                for (p, pair) in pairs.iter_mut().enumerate() {
                    *pair = _mm256_add_epi16(
                        _mm256_maddubs_epi16(w.lo[p], a.lo),
                        _mm256_maddubs_epi16(w.hi[p], a.hi),
                    );
                }
                let folded = _mm256_hadd_epi16(pairs[0], pairs[1]);
                _mm256_add_epi32(a.off, _mm256_madd_epi16(folded, _mm256_set1_epi16(1)))
            } else {
                let mut pairs = [_mm256_setzero_si256(); 2];
                for (p, pair) in pairs.iter_mut().enumerate() {
                    let (lo, hi) = if F == Q8_0 && !V {
                        (
                            _mm256_sign_epi8(a.lo, w.sign_lo[p]),
                            _mm256_sign_epi8(a.hi, w.sign_hi[p]),
                        )
                    } else {
                        (a.lo, a.hi)
                    };
                    *pair = dot::<V>(dot::<V>(a.off, w.lo[p], lo), w.hi[p], hi);
                }
                _mm256_hadd_epi32(pairs[0], pairs[1])
            };
            let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(w.d, a.d), acc);
            let ms = if has_min(F) {
                _mm_fmadd_ps(w.m, a.s, ms)
            } else {
                ms
            };
            (acc, ms)
        }
    }

    #[inline(always)]
    unsafe fn merge((a, am): Acc256, (b, bm): Acc256) -> Acc256 {
        // SAFETY: register arithmetic; AVX2 by the contract.
        unsafe { (_mm256_add_ps(a, b), _mm_add_ps(am, bm)) }
    }

    #[inline(always)]
    unsafe fn store((acc, ms): Acc256, out: *mut f32) {
        // SAFETY: register shuffles, then four floats at `out`.
        unsafe {
            // [r0 r2 r0 r2 | r1 r3 r1 r3], then [r0 r1 r2 r3].
            let h = _mm256_hadd_ps(acc, acc);
            let rows = _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            _mm_storeu_ps(out, _mm_add_ps(rows, ms));
        }
    }
}

/// Decode asks for each group's weights this many blocks ahead of the one it multiplies: the
/// hardware prefetchers alone leave DRAM idle between the four streams (AVX2 with four groups,
/// 1B shape, one thread on a Sapphire Rapids: 13.8 tokens/s without, 15.1 at 4–8 blocks
/// ahead, 13.4 at 64; one group on the EPYC: 17–20 with, 12–17 without).
const PREFETCH_BLOCKS: usize = 6;

/// Tile shapes. Decode (`n = 1`) takes one group at a time on every level, reading the weights
/// in the order they lie, with two sets of sums (see [`tile`]): on an AMD EPYC (Zen 4 without
/// AVX-512) four interleaved groups decoded SmolLM2 q4_0 at 81–83 tokens/s on one thread and
/// one group at 118–159, the 1B shape at 14–16 and 17–20; on a Zen 5 EPYC, one thread,
/// AVX-512 VNNI 244 → 309 (SmolLM2 q4_0), 176 → 213 (q8_0) and 28–29 → 34–36 (1B shape q4_0),
/// AVX-VNNI 230–242 → 285–295 and 24–25 → 33–36, two threads no slower. (Four groups had won
/// on a Sapphire Rapids before the two sets of sums: 14.0 against 12.3 tokens/s with two.)
/// Batches take a few tokens per group (AVX2 at the 1B shape: four tokens 3–5 % faster than
/// three, as fast as six).
const G_DECODE: usize = 1;
const G_512: usize = 2;
const T_512: usize = 4;
const G_256: usize = 1;
const T_256: usize = 4;

macro_rules! by_format {
    ($p:expr, $isa:ty, $vnni:expr, $g:expr, $t:expr, $tail:expr) => {{
        let one = $p.n == 1;
        match ($p.w.geometry.format, one) {
            (Format::Q4_0, true) => gemm_with::<$isa, Q4_0, G_DECODE, 1>($p, $vnni, $tail),
            (Format::Q4_0, false) => gemm_with::<$isa, Q4_0, $g, $t>($p, $vnni, $tail),
            (Format::Q4_1, true) => gemm_with::<$isa, Q4_1, G_DECODE, 1>($p, $vnni, $tail),
            (Format::Q4_1, false) => gemm_with::<$isa, Q4_1, $g, $t>($p, $vnni, $tail),
            (Format::Q8_0, true) => gemm_with::<$isa, Q8_0, G_DECODE, 1>($p, $vnni, $tail),
            (Format::Q8_0, false) => gemm_with::<$isa, Q8_0, $g, $t>($p, $vnni, $tail),
            (Format::Q5_0, true) => gemm_with::<$isa, Q5_0, G_DECODE, 1>($p, $vnni, $tail),
            (Format::Q5_0, false) => gemm_with::<$isa, Q5_0, $g, $t>($p, $vnni, $tail),
            (Format::Q5_1, true) => gemm_with::<$isa, Q5_1, G_DECODE, 1>($p, $vnni, $tail),
            (Format::Q5_1, false) => gemm_with::<$isa, Q5_1, $g, $t>($p, $vnni, $tail),
            _ => {}
        }
    }};
}

/// [`super::q8::gemm`] for the AVX-512 VNNI level: X16 matrices here, ggml rows on `rows`,
/// other layouts on the reference.
///
/// SAFETY: the caller has checked the CPU has AVX-512 F/BW/VL/VNNI, F16C, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,avx2,fma")]
pub unsafe fn gemm_avx512vnni(p: Product<'_>, rows: fn(Product<'_>)) {
    match p.w.geometry.layout {
        Layout::X16 => {}
        Layout::Rows => return rows(p),
        _ => return super::q8::gemm(p),
    }
    // SAFETY: the features are this function's.
    unsafe { by_format!(p, Avx512Vnni, true, G_512, T_512, rows) }
}

/// [`super::q8::gemm`] for the AVX2 levels (with AVX-VNNI when `V`): X16 matrices here, ggml
/// rows on `rows`, other layouts on the reference.
///
/// SAFETY: the caller has checked the CPU has AVX2, FMA and F16C (and AVX-VNNI when `V`).
#[inline(always)]
unsafe fn gemm_avx2_with<const V: bool>(p: Product<'_>, rows: fn(Product<'_>)) {
    match p.w.geometry.layout {
        Layout::X16 => {}
        Layout::Rows => return rows(p),
        _ => return super::q8::gemm(p),
    }
    // SAFETY: passed on from the caller.
    unsafe { by_format!(p, Avx2<V>, V, G_256, T_256, rows) }
}

/// SAFETY: as [`gemm_avx2_with`] without AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_avx2(p: Product<'_>, rows: fn(Product<'_>)) {
    // SAFETY: the features are this function's.
    unsafe { gemm_avx2_with::<false>(p, rows) }
}

/// SAFETY: as [`gemm_avx2_with`] with AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn gemm_avxvnni(p: Product<'_>, rows: fn(Product<'_>)) {
    // SAFETY: the features are this function's.
    unsafe { gemm_avx2_with::<true>(p, rows) }
}
