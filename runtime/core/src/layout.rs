//! How the blocks of a block-quantized weight matrix are arranged: ggml's rows one after the
//! other, or groups of four rows interleaved for the vector kernels of one ISA, packed by the
//! compiler so that the runtime maps them as they are.
//!
//! An interleaved matrix holds, for each group of [`GROUP`] rows (the rows past the last whole
//! group stay as ggml rows at the end):
//!
//! ```text
//! quants   group 0: block 0: the 4 rows' quant bytes in runs of `chunk` bytes
//!                            (row 0 run 0, row 1 run 0, row 2 run 0, row 3 run 0, row 0 run 1, …)
//!                   block 1: …
//!          group 1: …
//! scales   group 0: block 0: d of rows 0–3 (f16), then for q4_1 and q5_1 m of rows 0–3,
//!                            then for q5_0 and q5_1 the fifth bits of rows 0–3
//!                   block 1: …
//!          group 1: …
//! rows     the rows past the last whole group, as ggml stores them
//! ```
//!
//! The quants of a group come first and are 64 bytes a block for the 4-bit formats (128 for
//! `q8_0`), so each block of a group is one 64-byte-aligned load. The sizes are those of the
//! ggml rows, so memory plans do not change. A 4-bit block's quant bytes are its 16 packed bytes
//! (low nibbles: elements 0–15, high nibbles: 16–31), `q8_0`'s its 32 signed bytes.
//!
//! `q5_0` and `q5_1` interleave in 4×16 only (x86-64): their quant bytes are the 16 bytes of
//! packed low four bits, laid out as `q4_0`'s; the fifth bits `qh` go with the scales, after `d`
//! (and `m`), as two runs of 16-bit halves: bits 0–15 of rows 0–3, then bits 16–31 of rows 0–3.
//! Each run is then one 64-bit mask for a block of a group, bit `16r + j` for byte `j` of row
//! `r`.
//!
//! The K-quants interleave in 4×16 (x86-64) and `q4_k` and `q6_k` also in 4×4 (aarch64, for
//! 4×8 targets too; `q5_k` keeps ggml's rows). A "block" is then a super-block of 256:
//! `q4_k`'s quant bytes are its 128 packed bytes, `q6_k`'s its 128 low-nibble and 64
//! high-bit-pair bytes, in runs of 16 (or 4); the rest of the super-block is its scales,
//! arranged for the kernels to decode four rows at once (`Geometry::scale_at`, the same in
//! both layouts).
//!
//! In the aarch64 layouts (4×4, 4×8) `q4_0`'s packed bytes are stored XOR `0x88`: nibble `q`
//! becomes `q ^ 8`, the 4-bit two's complement of `q − 8`, so a shift left by 4 (low nibbles)
//! or a mask of `0xf0` (high) gives `16·(q − 8)` as a signed byte in one instruction, with no
//! subtraction ([`Geometry::flips_nibbles`]).

use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::kernels::Level;
use crate::quant::Format;

/// Rows interleaved together.
pub const GROUP: usize = 4;

/// What [`Geometry::flips_nibbles`] layouts XOR `q4_0`'s packed bytes with: `8` in each nibble.
pub const NIBBLE_FLIP: u8 = 0x88;

/// The arrangement of one tensor's blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layout {
    /// ggml's: row after row, each a run of blocks.
    #[default]
    #[serde(rename = "rows")]
    Rows,
    /// Groups of 4 rows in runs of 4 bytes: one `sdot` lane per row (aarch64 NEON, dotprod).
    #[serde(rename = "4x4")]
    X4,
    /// Runs of 8 bytes: one 2×8 `smmla` operand per row pair (aarch64 i8mm).
    #[serde(rename = "4x8")]
    X8,
    /// Runs of 16 bytes: a row's whole packed block per 128-bit lane (x86-64 AVX2, AVX-512).
    #[serde(rename = "4x16")]
    X16,
}

impl Layout {
    pub const ALL: [Layout; 4] = [Layout::Rows, Layout::X4, Layout::X8, Layout::X16];

    /// Whether `format`'s quant bytes are stored XOR [`NIBBLE_FLIP`] here (`q4_0` in 4×4 and
    /// 4×8; since artifact format 3).
    pub fn flips_nibbles(self, format: Format) -> bool {
        format == Format::Q4_0 && matches!(self, Layout::X4 | Layout::X8)
    }

    /// The name in artifacts and target descriptors.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Rows => "rows",
            Layout::X4 => "4x4",
            Layout::X8 => "4x8",
            Layout::X16 => "4x16",
        }
    }

    pub fn from_name(name: &str) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Bytes per run of one row's quants; `None` for [`Layout::Rows`].
    pub fn chunk(self) -> Option<usize> {
        match self {
            Layout::Rows => None,
            Layout::X4 => Some(4),
            Layout::X8 => Some(8),
            Layout::X16 => Some(16),
        }
    }

    /// The weakest kernel level that runs this layout natively.
    pub fn level(self) -> Level {
        match self {
            Layout::Rows => Level::Generic,
            Layout::X4 => Level::Neon,
            Layout::X8 => Level::I8mm,
            Layout::X16 => Level::Avx2,
        }
    }

    /// The CPU features an artifact packed in this layout requires (those of [`Layout::level`]).
    pub fn features(self) -> &'static [&'static str] {
        self.level().features()
    }

    /// The layout a matrix of `format` gets when `self` is asked for: only block formats
    /// interleave (the K-quants and the 5-bit formats in 4×16, the layout their x86-64 kernels
    /// read, and `q4_k` and `q6_k` also in 4×4, aarch64's `sdot` by element, whether 4×4 or
    /// 4×8 is asked for); floats keep their rows.
    pub fn for_format(self, format: Format) -> Layout {
        let x16_only = format.is_k_quant() || matches!(format, Format::Q5_0 | Format::Q5_1);
        let k_x4 =
            matches!(self, Layout::X4 | Layout::X8) && matches!(format, Format::Q4K | Format::Q6K);
        match Geometry::quant_bytes(format) {
            // i8mm multiplies K-quant groups of 4×4 with `sdot` by element, as dotprod does:
            // fewer instructions than its `smmla` over ggml's rows.
            Some(_) if k_x4 => Layout::X4,
            Some(_) if !x16_only || self == Layout::X16 => self,
            _ => Layout::Rows,
        }
    }
}

/// Where the parts of one matrix lie in its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub format: Format,
    pub layout: Layout,
    pub rows: usize,
    /// Blocks per row.
    pub blocks: usize,
}

impl Geometry {
    /// Quant bytes of one block of `format` (`None`: not a block format).
    pub fn quant_bytes(format: Format) -> Option<usize> {
        match format {
            // The packed nibbles (the 5-bit formats' `qh` counts as scale bytes).
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => Some(16),
            Format::Q8_0 => Some(32),
            // The packed codes of a super-block: `qs` (`q4_k`), `ql` and `qh` (`q6_k`).
            Format::Q4K => Some(128),
            Format::Q6K => Some(192),
            // Formats without interleaved kernels stay in ggml's rows.
            _ => None,
        }
    }

    /// Scale bytes of one block: `d`, `m` for `q4_1` and `q5_1`, `qh` for `q5_0` and `q5_1`;
    /// for the K-quants everything but the codes.
    pub fn scale_bytes(format: Format) -> usize {
        format.block_bytes() - Geometry::quant_bytes(format).unwrap_or(0)
    }

    /// Where a block's quant bytes start in ggml's block (`q6_k` stores its scales last).
    fn quants_in_block(format: Format) -> usize {
        match format {
            Format::Q6K => 0,
            _ => Geometry::scale_bytes(format),
        }
    }

    /// Where a block's scale bytes start in ggml's block.
    fn scales_in_block(format: Format) -> usize {
        match format {
            Format::Q6K => 192,
            _ => 0,
        }
    }

    /// Where scale byte `e` of row `i` of a group lies among the group's scale bytes of one
    /// block: 16-bit values (f16 scales, halves of `qh`) interleaved row by row, except for
    /// the K-quants, whose scales are arranged for their kernels (x86_k.rs): `q4_k` as `d` of
    /// the 4 rows, `dmin` of the 4 rows, then each of the three 32-bit words of packed 6-bit
    /// scales for the 4 rows; `q6_k` as each row's 16 scales, then `d` of the 4 rows.
    fn scale_at(format: Format, i: usize, e: usize) -> usize {
        match format {
            Format::Q4K if e >= 4 => 16 + 16 * ((e - 4) / 4) + 4 * i + (e - 4) % 4,
            Format::Q6K if e < 16 => 16 * i + e,
            Format::Q6K => 64 + 2 * i + (e - 16),
            _ => (e / 2 * GROUP + i) * 2 + e % 2,
        }
    }

    /// Whole groups of interleaved rows (none for [`Layout::Rows`]).
    pub fn groups(&self) -> usize {
        match self.layout {
            Layout::Rows => 0,
            _ => self.rows / GROUP,
        }
    }

    fn qb(&self) -> usize {
        Geometry::quant_bytes(self.format).unwrap_or(0)
    }

    /// Whether the groups' quant bytes are stored XOR [`NIBBLE_FLIP`].
    pub fn flips_nibbles(&self) -> bool {
        self.layout.flips_nibbles(self.format)
    }

    /// XORs `bytes` (a group's quants) with [`NIBBLE_FLIP`] where the layout stores them so.
    fn flip(&self, bytes: &mut [u8]) {
        if self.flips_nibbles() {
            for b in bytes {
                *b ^= NIBBLE_FLIP;
            }
        }
    }

    /// Bytes of one stored row (and a quarter of a group).
    pub fn row_bytes(&self) -> usize {
        self.blocks * self.format.block_bytes()
    }

    /// Offset of group `g`'s quants (`GROUP · quant bytes` a block).
    pub fn quants(&self, g: usize) -> usize {
        g * self.blocks * GROUP * self.qb()
    }

    /// Offset of group `g`'s scales (`GROUP · scale bytes` a block).
    pub fn scales(&self, g: usize) -> usize {
        let sb = Geometry::scale_bytes(self.format);
        self.quants(self.groups()) + g * self.blocks * GROUP * sb
    }

    /// Offset of row `r`, one of the rows stored as ggml's (all of them for [`Layout::Rows`]).
    pub fn plain_row(&self, r: usize) -> usize {
        let first = self.groups() * GROUP;
        debug_assert!(r >= first);
        first * self.row_bytes() + (r - first) * self.row_bytes()
    }

    /// Copies row `r` as ggml stores it into `out` (one row's bytes).
    pub fn row(&self, bytes: &[u8], r: usize, out: &mut [u8]) {
        let rb = self.row_bytes();
        if r >= self.groups() * GROUP {
            let at = self.plain_row(r);
            out[..rb].copy_from_slice(&bytes[at..at + rb]);
            return;
        }
        for b in 0..self.blocks {
            self.block(bytes, r, b, &mut out[b * self.format.block_bytes()..]);
        }
    }

    /// Copies block `b` of row `r` (of a whole group) as ggml stores it into `out`.
    pub fn block(&self, bytes: &[u8], r: usize, b: usize, out: &mut [u8]) {
        let (g, i) = (r / GROUP, r % GROUP);
        let (qb, sb) = (self.qb(), Geometry::scale_bytes(self.format));
        let (qin, sin) = (
            Geometry::quants_in_block(self.format),
            Geometry::scales_in_block(self.format),
        );
        let chunk = self.layout.chunk().unwrap_or(qb);
        let quants = self.quants(g) + b * GROUP * qb;
        for run in 0..qb / chunk {
            let at = quants + (run * GROUP + i) * chunk;
            out[qin + run * chunk..qin + (run + 1) * chunk].copy_from_slice(&bytes[at..at + chunk]);
        }
        self.flip(&mut out[qin..qin + qb]);
        let scales = self.scales(g) + b * GROUP * sb;
        for e in 0..sb {
            out[sin + e] = bytes[scales + Geometry::scale_at(self.format, i, e)];
        }
    }

    /// `rows` ggml rows (`row_major`) in this layout.
    pub fn pack(&self, row_major: &[u8]) -> Vec<u8> {
        let rb = self.row_bytes();
        let mut out = vec![0u8; self.rows * rb];
        let (qb, sb, bb) = (
            self.qb(),
            Geometry::scale_bytes(self.format),
            self.format.block_bytes(),
        );
        let (qin, sin) = (
            Geometry::quants_in_block(self.format),
            Geometry::scales_in_block(self.format),
        );
        let chunk = self.layout.chunk().unwrap_or(qb);
        for g in 0..self.groups() {
            for i in 0..GROUP {
                let row = &row_major[(g * GROUP + i) * rb..][..rb];
                for b in 0..self.blocks {
                    let block = &row[b * bb..(b + 1) * bb];
                    let quants = self.quants(g) + b * GROUP * qb;
                    for run in 0..qb / chunk {
                        let at = quants + (run * GROUP + i) * chunk;
                        out[at..at + chunk]
                            .copy_from_slice(&block[qin + run * chunk..qin + (run + 1) * chunk]);
                        self.flip(&mut out[at..at + chunk]);
                    }
                    let scales = self.scales(g) + b * GROUP * sb;
                    for e in 0..sb {
                        out[scales + Geometry::scale_at(self.format, i, e)] = block[sin + e];
                    }
                }
            }
        }
        let first = self.groups() * GROUP;
        let at = self.plain_row(first.min(self.rows));
        out[at..].copy_from_slice(&row_major[first * rb..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_round_trips_every_row_in_every_layout() {
        for format in [
            Format::Q4_0,
            Format::Q4_1,
            Format::Q8_0,
            Format::Q5_0,
            Format::Q5_1,
            Format::Q4K,
            Format::Q6K,
        ] {
            for rows in [1, 4, 7, 9] {
                let blocks = 3;
                let rb = blocks * format.block_bytes();
                let row_major: Vec<u8> = (0..rows * rb).map(|i| (i * 7 % 251) as u8).collect();
                for layout in Layout::ALL.map(|l| l.for_format(format)) {
                    let g = Geometry {
                        format,
                        layout,
                        rows,
                        blocks,
                    };
                    let packed = g.pack(&row_major);
                    assert_eq!(packed.len(), row_major.len());
                    if layout != Layout::Rows && rows >= GROUP {
                        assert_ne!(packed, row_major, "{format:?} {layout:?} moved nothing");
                    }
                    let mut row = vec![0u8; rb];
                    for r in 0..rows {
                        g.row(&packed, r, &mut row);
                        assert_eq!(
                            row,
                            row_major[r * rb..(r + 1) * rb],
                            "{format:?} {layout:?} row {r}"
                        );
                    }
                }
            }
        }
    }

    /// The 4×16 layout of q4_0: a block of a group is the four rows' 16 packed bytes, one
    /// after the other, and the group's scales follow all of its blocks.
    #[test]
    fn x16_puts_each_rows_packed_block_in_its_own_lane() {
        let (blocks, rb) = (2, 2 * 18);
        let row_major: Vec<u8> = (0..4 * rb).map(|i| i as u8).collect();
        let g = Geometry {
            format: Format::Q4_0,
            layout: Layout::X16,
            rows: 4,
            blocks,
        };
        let packed = g.pack(&row_major);
        // Row 1, block 0: bytes 36..54 (d at 36, 37).
        assert_eq!(packed[16..32], row_major[38..54]);
        assert_eq!(g.scales(0), 128);
        assert_eq!(packed[130..132], row_major[36..38]);
    }

    /// The 4×16 layout of the 5-bit formats: the packed nibbles as `q4_0`'s, and after the
    /// scales of a block of a group two 64-bit masks, bit `16r + j` the fifth bit of byte `j`
    /// of row `r` (elements 0–15, then 16–31); the other layouts keep them in rows.
    #[test]
    fn x16_puts_the_fifth_bits_in_one_mask_per_half() {
        for (format, at) in [(Format::Q5_0, 2), (Format::Q5_1, 4)] {
            let (blocks, bb) = (2, format.block_bytes());
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let row_major: Vec<u8> = (0..4 * blocks * bb)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let g = Geometry {
                format,
                layout: Layout::X16,
                rows: 4,
                blocks,
            };
            let packed = g.pack(&row_major);
            let sb = Geometry::scale_bytes(format);
            for b in 0..blocks {
                let scales = g.scales(0) + b * GROUP * sb;
                let mask = |h: usize| {
                    let at = scales + GROUP * (sb - 4) + 8 * h;
                    u64::from_le_bytes(packed[at..at + 8].try_into().expect("8 bytes"))
                };
                for r in 0..GROUP {
                    let block = &row_major[(r * blocks + b) * bb..][..bb];
                    let qh = u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"));
                    for j in 0..32 {
                        let bit = mask(j / 16) >> (16 * r + j % 16) & 1;
                        assert_eq!(bit, u64::from(qh >> j & 1), "{format:?} {b} row {r} {j}");
                    }
                    let quants = g.quants(0) + b * GROUP * 16 + 16 * r;
                    assert_eq!(packed[quants..quants + 16], block[bb - 16..]);
                }
            }
            for layout in [Layout::Rows, Layout::X4, Layout::X8] {
                assert_eq!(layout.for_format(format), Layout::Rows);
            }
            assert_eq!(Layout::X16.for_format(format), Layout::X16);
        }
    }

    /// The aarch64 layouts store `q4_0` nibble `q` as `q ^ 8`, whose shifted byte is
    /// `16·(q − 8)`; other formats and layouts keep the bytes as they are.
    #[test]
    fn aarch64_layouts_store_q4_0_nibbles_as_twos_complement() {
        let (blocks, rb) = (1, 18);
        let mut row_major = vec![0u8; 4 * rb];
        for (i, q) in row_major
            .chunks_mut(rb)
            .flat_map(|r| r[2..].iter_mut())
            .enumerate()
        {
            *q = (i % 16) as u8 | ((15 - i % 16) as u8) << 4;
        }
        for layout in Layout::ALL {
            let g = Geometry {
                format: Format::Q4_0,
                layout,
                rows: 4,
                blocks,
            };
            let packed = g.pack(&row_major);
            let flipped = matches!(layout, Layout::X4 | Layout::X8);
            assert_eq!(g.flips_nibbles(), flipped, "{layout:?}");
            // Row 0's first quant byte: at 0 in every interleaved layout, after d for rows.
            let at = if layout == Layout::Rows { 2 } else { 0 };
            let (lo, hi) = (packed[at] << 4, packed[at] & 0xf0);
            let expect = |q: u8| (16 * (q as i32 - 8)) as i8;
            if flipped {
                assert_eq!((lo as i8, hi as i8), (expect(0), expect(15)));
            } else {
                assert_eq!(packed[at], row_major[2]);
            }
        }
        let q8 = Geometry {
            format: Format::Q8_0,
            layout: Layout::X4,
            rows: 4,
            blocks,
        };
        assert!(!q8.flips_nibbles());
    }

    #[test]
    fn names_round_trip() {
        for l in Layout::ALL {
            assert_eq!(Layout::from_name(l.name()), Some(l));
        }
        assert_eq!(Layout::X16.for_format(Format::F16), Layout::Rows);
    }
}
