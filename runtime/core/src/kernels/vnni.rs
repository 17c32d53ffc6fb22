//! Block-quantized matrix products with AVX-512 VNNI (`vpdpbusd`: 64 u8·i8 products summed
//! into 16 i32 lanes per instruction).
//!
//! One 512-bit register holds a *pair* of blocks. For the 4-bit formats the weight register is
//! `[low nibbles of block b, of block b+1, high nibbles of b, of b+1]` (16 bytes each), which is
//! how the packed bytes unpack with one shift, so the activations are reordered to match once
//! per pair and token; `q8_0` keeps the natural order. Each i32 lane (4 products of one block)
//! is converted to f32 and multiplied by its block's `d_w·d_x` into a float accumulator per
//! (row, token): no horizontal sum until the end of the row. A tile of `R` rows × `T` tokens
//! loads each weight pair once for `T` tokens and each activation pair once for `R` rows.
//!
//! Integer parts are exact; only the order of the float sums differs from the reference, which
//! the tests hold to [`q8::error_budget`](super::q8::error_budget).

use alloc::vec;
use alloc::vec::Vec;
use core::arch::x86_64::*;

use super::product::Product;
use super::q8::consts::{block_bytes, Q4_0, Q4_1, Q8_0};
use super::q8::Q8Block;
use crate::layout::Layout;
use crate::quant::Format;

/// Rows × tokens of the register tile for batches, and rows per tile for one token.
const R: usize = super::TILE_ROWS;
const T: usize = super::TILE_TOKENS;
const R1: usize = super::TILE_ROWS;
/// Bytes ahead of the current pair that each row of a tile prefetches (0: none). Decoding
/// streams every weight once per token, and the hardware prefetchers alone leave much of the
/// memory bandwidth unused; the distance (a few row tiles) was chosen by timing `kiln bench`
/// decode against shorter and longer ones (the `variants` compare them on the kernels alone).
const PREFETCH: usize = 6144;

/// One token's activations for one pair of blocks, ready for every row of the tile.
#[derive(Clone, Copy)]
struct Act {
    /// 64 activations in the weight register's order.
    q: __m512i,
    /// `d_x` of the block each lane belongs to.
    d: __m512,
    /// Added to the integer sums: `-8·Σa` (`q4_0`) or `-128·Σa` (`q8_0`) per lane, else 0.
    off: __m512i,
    /// `q4_1`: `[s_b, s_b+1, 0, …]`, the activation sums the mins multiply.
    s: __m512,
}

/// One row's weights for one pair of blocks.
#[derive(Clone, Copy)]
struct Wt {
    q: __m512i,
    /// `d_w` of the block each lane belongs to.
    d: __m512,
    /// `q4_1`: `[m_b, m_b+1, 0, …]`.
    m: __m512,
}

/// An [`Act`] stored in scratch memory: `q`, `d`, and `off` or (`q4_1`) `s`.
#[derive(Clone, Copy)]
#[repr(C)]
struct Prepared([__m512i; 3]);

impl Act {
    #[inline(always)]
    fn put<const F: u8>(&self) -> Prepared {
        // SAFETY: bit casts between vector types.
        unsafe {
            let third = if F == Q4_1 {
                _mm512_castps_si512(self.s)
            } else {
                self.off
            };
            Prepared([self.q, _mm512_castps_si512(self.d), third])
        }
    }
}

impl Prepared {
    #[inline(always)]
    fn get<const F: u8>(&self) -> Act {
        // SAFETY: bit casts between vector types.
        unsafe {
            let zero = _mm512_setzero_si512();
            Act {
                q: self.0[0],
                d: _mm512_castsi512_ps(self.0[1]),
                off: if F == Q4_1 { zero } else { self.0[2] },
                s: _mm512_castsi512_ps(if F == Q4_1 { self.0[2] } else { zero }),
            }
        }
    }
}

/// Prepares every pair of blocks of `TT` tokens (token `t` at `x + t·nb`) into `dst`, pair by
/// pair (`dst[pair·TT + t]`), so that tiles load them instead of rebuilding them per tile.
///
/// SAFETY: as [`load_act`] for each token, and `dst` has room for `⌈nb/2⌉·TT` entries.
#[inline(always)]
unsafe fn prepare<const F: u8, const TT: usize>(x: *const Q8Block, nb: usize, dst: *mut Prepared) {
    // SAFETY: within the tokens and `dst` of the contract above.
    unsafe {
        let mut b = 0;
        while b < nb {
            for t in 0..TT {
                let a = load_act::<F>(x.add(t * nb + b), b + 1 < nb);
                dst.add(b / 2 * TT + t).write(a.put::<F>());
            }
            b += 2;
        }
    }
}

/// Loads block pair `b` (a lone last block when `!two`) of one token's activations.
///
/// SAFETY: the caller runs this with AVX-512F/BW/VNNI available, and `x` points at block `b`
/// of a token's activations with block `b + 1` present when `two`.
#[inline(always)]
unsafe fn load_act<const F: u8>(x: *const Q8Block, two: bool) -> Act {
    // SAFETY: reads block `b` (and `b + 1` when `two`), which exist by the contract above.
    unsafe {
        let b0 = &*x;
        let a0 = _mm256_loadu_si256(b0.qs.as_ptr().cast());
        let (a1, d1, s1) = if two {
            let b1 = &*x.add(1);
            (_mm256_loadu_si256(b1.qs.as_ptr().cast()), b1.d, b1.s)
        } else {
            (_mm256_setzero_si256(), 0.0, 0.0)
        };
        let natural = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a0), a1);
        let (q, d) = if F == Q8_0 {
            let d = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(b0.d), _mm512_set1_ps(d1));
            (natural, d)
        } else {
            // [a0 0..16, a0 16..32, a1 0..16, a1 16..32] → [a0 lo, a1 lo, a0 hi, a1 hi].
            let q = _mm512_shuffle_i64x2::<0b11_01_10_00>(natural, natural);
            let d = _mm512_mask_blend_ps(0xf0f0, _mm512_set1_ps(b0.d), _mm512_set1_ps(d1));
            (q, d)
        };
        let zero = _mm512_setzero_si512();
        let off = match F {
            // -8·Σa: the nibbles are stored as q + 8.
            Q4_0 => _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(8), q)),
            // -128·Σa: the weights enter as w + 128, the unsigned operand vpdpbusd needs.
            Q8_0 => _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(-128), q)),
            _ => zero,
        };
        let s = if F == Q4_1 {
            _mm512_zextps128_ps512(_mm_setr_ps(b0.s, s1, 0.0, 0.0))
        } else {
            _mm512_setzero_ps()
        };
        Act { q, d, off, s }
    }
}

/// Loads block pair starting at `p` (a lone last block when `!two`) of one weight row.
///
/// SAFETY: AVX-512F/BW/VNNI and F16C are available, and `p` points at a block with the next
/// one present when `two`.
#[inline(always)]
unsafe fn load_wt<const F: u8>(p: *const u8, two: bool) -> Wt {
    // SAFETY: every load below stays inside the one or two blocks at `p` (masked loads do
    // not touch the bytes their mask leaves out).
    unsafe {
        let bb = block_bytes(F);
        let nibble = _mm512_set1_epi8(0x0f);
        match F {
            Q4_0 | Q4_1 => {
                let bytes = if two { 2 * bb } else { bb };
                let raw = _mm512_maskz_loadu_epi8((1u64 << bytes) - 1, p.cast());
                // 16-bit words: q4_0 blocks are 9 words (d, 8 of nibbles), q4_1 10 (d, m, 8).
                let (w, first) = (bb as i16 / 2, if F == Q4_0 { 1 } else { 2 });
                let idx = |i: i16| if i < 8 { first + i } else { w + first + i - 8 };
                // Words of [packed b, packed b+1, packed b, packed b+1].
                let sel = _mm512_set_epi16(
                    idx(15),
                    idx(14),
                    idx(13),
                    idx(12),
                    idx(11),
                    idx(10),
                    idx(9),
                    idx(8),
                    idx(7),
                    idx(6),
                    idx(5),
                    idx(4),
                    idx(3),
                    idx(2),
                    idx(1),
                    idx(0),
                    idx(15),
                    idx(14),
                    idx(13),
                    idx(12),
                    idx(11),
                    idx(10),
                    idx(9),
                    idx(8),
                    idx(7),
                    idx(6),
                    idx(5),
                    idx(4),
                    idx(3),
                    idx(2),
                    idx(1),
                    idx(0),
                );
                let packed = _mm512_permutexvar_epi16(sel, raw);
                let shifted = _mm512_mask_srli_epi16::<4>(packed, 0xffff_0000, packed);
                let q = _mm512_and_si512(shifted, nibble);
                // Scales: d_b in lanes 0-3 and 8-11, d_b+1 in 4-7 and 12-15.
                let dsel = _mm512_set_epi16(
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, w, w, w, w, 0, 0, 0, 0, w, w,
                    w, w, 0, 0, 0, 0,
                );
                let d =
                    _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(dsel, raw)));
                let m = if F == Q4_1 {
                    let msel = _mm512_set_epi16(
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        w + 1,
                        1,
                    );
                    let mins = _mm512_maskz_permutexvar_epi16(0b11, msel, raw);
                    _mm512_cvtph_ps(_mm512_castsi512_si256(mins))
                } else {
                    _mm512_setzero_ps()
                };
                Wt { q, d, m }
            }
            _ => {
                let lo = _mm256_loadu_si256(p.add(2).cast());
                let d0 = u32::from(p.cast::<u16>().read_unaligned());
                let (hi, d1) = if two {
                    (
                        _mm256_loadu_si256(p.add(bb + 2).cast()),
                        u32::from(p.add(bb).cast::<u16>().read_unaligned()),
                    )
                } else {
                    (_mm256_setzero_si256(), 0)
                };
                let signed = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                let q = _mm512_xor_si512(signed, _mm512_set1_epi8(-128));
                let halves = _mm_cvtsi32_si128((d0 | d1 << 16) as i32);
                let dsel = _mm256_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
                let d = _mm512_cvtph_ps(_mm256_permutexvar_epi16(
                    dsel,
                    _mm256_castsi128_si256(halves),
                ));
                Wt {
                    q,
                    d,
                    m: _mm512_setzero_ps(),
                }
            }
        }
    }
}

/// `acc += Σ_lanes (w·a + off)·d_w·d_x (+ m·s)` for one pair.
///
/// SAFETY: AVX-512F/VNNI are available.
#[inline(always)]
unsafe fn step<const F: u8>(acc: __m512, w: &Wt, a: &Act) -> __m512 {
    // SAFETY: register operations only.
    unsafe {
        let sums = _mm512_dpbusd_epi32(a.off, w.q, a.q);
        let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(w.d, a.d), acc);
        if F == Q4_1 {
            _mm512_fmadd_ps(w.m, a.s, acc)
        } else {
            acc
        }
    }
}

/// Rows of weights against tokens: row `r` at `w + r·rb`, token `t`'s `nb` blocks at
/// `x + t·nb`, the result for (token `t`, row `r`) at `out[t·stride + r]`.
#[derive(Clone, Copy)]
struct Span {
    w: *const u8,
    rb: usize,
    x: *const Q8Block,
    nb: usize,
    out: *mut f32,
    stride: usize,
}

impl Span {
    /// The span from row `r` and token `t` on.
    ///
    /// SAFETY: row `r` and token `t` exist.
    #[inline(always)]
    unsafe fn at(self, r: usize, t: usize) -> Span {
        // SAFETY: the offsets stay inside the rows, tokens and outputs by the contract.
        unsafe {
            Span {
                w: self.w.add(r * self.rb),
                x: self.x.add(t * self.nb),
                out: self.out.add(t * self.stride + r),
                ..self
            }
        }
    }
}

/// One tile: rows `r < RR` for tokens `t < TT` of the span.
///
/// SAFETY: AVX-512F/BW/VNNI and F16C are available; the `RR` rows of `nb` blocks, the `TT`
/// tokens of `nb` blocks and the outputs exist.
///
/// With `prep` non-null the activations come from it instead, as [`prepare`] left them for
/// these `TT` tokens.
#[inline(always)]
unsafe fn tile<const F: u8, const RR: usize, const TT: usize, const PF: usize>(
    s: Span,
    prep: *const Prepared,
) {
    let Span {
        w,
        rb,
        x,
        nb,
        out,
        stride,
    } = s;
    // SAFETY: the pointers stay within the rows, tokens and outputs of the contract above.
    unsafe {
        let bb = block_bytes(F);
        let mut acc = [[_mm512_setzero_ps(); TT]; RR];
        let mut b = 0;
        while b < nb {
            let two = b + 1 < nb;
            let mut act = [Act {
                q: _mm512_setzero_si512(),
                d: _mm512_setzero_ps(),
                off: _mm512_setzero_si512(),
                s: _mm512_setzero_ps(),
            }; TT];
            for (t, a) in act.iter_mut().enumerate() {
                *a = if prep.is_null() {
                    load_act::<F>(x.add(t * nb + b), two)
                } else {
                    (*prep.add(b / 2 * TT + t)).get::<F>()
                };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = w.add(r * rb + b * bb);
                if PF > 0 {
                    // A hint only: it never faults, wherever it points.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF).cast());
                }
                let wt = load_wt::<F>(p, two);
                for (acc, a) in acc.iter_mut().zip(&act) {
                    *acc = step::<F>(*acc, &wt, a);
                }
            }
            b += 2;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (t, acc) in acc.iter().enumerate() {
                *out.add(t * stride + r) = _mm512_reduce_add_ps(*acc);
            }
        }
    }
}

/// `rows` rows in tiles of `RR` rows (then single rows) for `TT` tokens.
///
/// SAFETY: as [`tile`], for all `rows` rows.
#[inline(always)]
unsafe fn rows_of<const F: u8, const RR: usize, const TT: usize, const PF: usize>(
    s: Span,
    rows: usize,
    prep: *const Prepared,
) {
    // SAFETY: each call gets rows and outputs inside the caller's ranges.
    unsafe {
        let mut r = 0;
        while r + RR <= rows {
            tile::<F, RR, TT, PF>(s.at(r, 0), prep);
            r += RR;
        }
        while r < rows {
            tile::<F, 1, TT, PF>(s.at(r, 0), prep);
            r += 1;
        }
    }
}

/// `TT` tokens: their activations prepared once into `scratch` when it has room, then every row.
///
/// SAFETY: as [`rows_of`].
#[inline(always)]
unsafe fn tokens_of<const F: u8, const RR: usize, const TT: usize, const PF: usize>(
    s: Span,
    rows: usize,
    scratch: &mut [f32],
) {
    let nb = s.nb;
    let entries = nb.div_ceil(2) * TT;
    let bytes = entries * core::mem::size_of::<Prepared>();
    let base = scratch.as_mut_ptr().cast::<u8>();
    let skip = base.align_offset(64);
    let prep = if skip + bytes <= core::mem::size_of_val(scratch) {
        // SAFETY: `skip + bytes` fit in `scratch`, so the aligned entries do.
        let dst = unsafe { base.add(skip) }.cast::<Prepared>();
        // SAFETY: as [`prepare`]: the tokens exist by the caller's contract, `dst` has room.
        unsafe { prepare::<F, TT>(s.x, nb, dst) };
        dst.cast_const()
    } else {
        core::ptr::null()
    };
    // SAFETY: as [`rows_of`]; `prep`, when set, holds these tokens' `entries`.
    unsafe { rows_of::<F, RR, TT, PF>(s, rows, prep) }
}

/// SAFETY: AVX-512F/BW/VNNI and F16C are available; lengths are checked by [`gemm`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,avx2,fma")]
unsafe fn gemm_format<
    const F: u8,
    const RB: usize,
    const TB: usize,
    const RV: usize,
    const PF: usize,
>(
    w: &[u8],
    rows: usize,
    x: &[Q8Block],
    n: usize,
    o: *mut f32,
    stride: usize,
    scratch: &mut [f32],
) {
    let s = Span {
        w: w.as_ptr(),
        rb: w.len() / rows,
        x: x.as_ptr(),
        nb: x.len() / n,
        out: o,
        stride,
    };
    // SAFETY: `gemm` checked that `w` holds `rows` rows of `nb` blocks, `x` holds `n` tokens of
    // `nb` blocks and `o` reaches `(n - 1)·stride + rows`; every call stays inside them.
    unsafe {
        if n == 1 {
            return tokens_of::<F, RV, 1, PF>(s, rows, scratch);
        }
        let mut t = 0;
        while t + TB <= n {
            tokens_of::<F, RB, TB, PF>(s.at(0, t), rows, scratch);
            t += TB;
        }
        while t < n {
            tokens_of::<F, RB, 1, PF>(s.at(0, t), rows, scratch);
            t += 1;
        }
    }
}

/// [`q8::gemm`](super::q8::gemm) with AVX-512 VNNI, for matrices of ggml rows.
///
/// SAFETY: the caller has detected AVX-512F/BW/VL/VNNI, F16C, AVX2 and FMA.
pub unsafe fn gemm(p: Product<'_>) {
    // SAFETY: passed on from the caller.
    unsafe { gemm_with::<R, T, R1, PREFETCH>(p) }
}

/// [`gemm`] with the tile shape and prefetch distance as parameters (see [`variants`]).
///
/// SAFETY: as [`gemm`].
unsafe fn gemm_with<const RB: usize, const TB: usize, const RV: usize, const PF: usize>(
    p: Product<'_>,
) {
    let Product {
        w,
        rows,
        x,
        n,
        mut out,
        scratch,
    } = p;
    let (range, nb) = (rows, w.geometry.blocks);
    let rows = range.len();
    let f = match w.geometry.format {
        Format::Q4_0 => Q4_0,
        Format::Q4_1 => Q4_1,
        Format::Q8_0 => Q8_0,
        _ => return,
    };
    if rows == 0 || n == 0 {
        return;
    }
    let bytes = w.plain_rows(range);
    assert!(
        x.len() >= n * nb,
        "gemm: {n} tokens of {nb} blocks do not fit the activations"
    );
    let (x, o) = (&x[..n * nb], out.checked(n, rows));
    // SAFETY: the features were detected by the caller; the lengths were just checked.
    unsafe {
        match f {
            Q4_0 => {
                gemm_format::<Q4_0, RB, TB, RV, PF>(bytes, rows, x, n, o, out.stride(), scratch)
            }
            Q4_1 => {
                gemm_format::<Q4_1, RB, TB, RV, PF>(bytes, rows, x, n, o, out.stride(), scratch)
            }
            _ => gemm_format::<Q8_0, RB, TB, RV, PF>(bytes, rows, x, n, o, out.stride(), scratch),
        }
    }
}

/// Tile shapes and prefetch distances to compare in benchmarks, with the one [`gemm`] uses
/// first, for ggml rows (other layouts take the reference). Each entry needs what [`gemm`]
/// needs: call them only after the same detection.
pub fn variants() -> Vec<(&'static str, super::GemmQ8)> {
    macro_rules! v {
        ($name:expr, $rb:expr, $tb:expr, $rv:expr, $pf:expr, $prep:expr) => {
            ($name, |p| {
                if p.w.geometry.layout != Layout::Rows {
                    return super::q8::gemm(p);
                }
                let p = if $prep {
                    p
                } else {
                    Product {
                        scratch: &mut [],
                        ..p
                    }
                };
                // SAFETY: handed out only to callers that detected the features (see above).
                unsafe { gemm_with::<$rb, $tb, $rv, $pf>(p) }
            })
        };
    }
    vec![
        v!("vnni", R, T, R1, PREFETCH, true),
        v!("vnni noprep", R, T, R1, PREFETCH, false),
        v!("vnni no prefetch", R, T, R1, 0, true),
        v!("vnni pf2048", R, T, R1, 2048, true),
        v!("vnni r8", R, T, 8, PREFETCH, true),
        v!("vnni 6x4", 6, 4, R1, PREFETCH, true),
        v!("vnni 8x2", 8, 2, R1, PREFETCH, true),
        v!("vnni 3x5", 3, 5, R1, PREFETCH, true),
    ]
}
