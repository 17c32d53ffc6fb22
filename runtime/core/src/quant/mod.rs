//! Weight storage formats: ggml-compatible blocks of 32 values (`q8_0`, `q4_0`, `q4_1`,
//! `q5_0`, `q5_1`), ggml's K-quant super-blocks of 256 (`q4_k`, `q5_k`, `q6_k`) and plain
//! floats (`f32`, `f16`, `bf16`). kiln's compiler writes all but `bf16`, which comes from GGUF
//! files and is kept byte for byte ([`dequant`] reads them all).

pub(crate) mod dequant;

use half::f16;
use serde::{Deserialize, Serialize};

/// Values per quantization block of the 32-value formats, and of the 8-bit activation blocks
/// every block format is multiplied with (as in ggml).
pub const BLOCK: usize = 32;

/// Values per K-quant super-block (ggml's `QK_K`).
pub const SUPER_BLOCK: usize = 256;

/// How the values of one weight tensor are stored, row by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Bf16,
    Q5_0,
    Q5_1,
    #[serde(rename = "q4_k")]
    Q4K,
    #[serde(rename = "q5_k")]
    Q5K,
    #[serde(rename = "q6_k")]
    Q6K,
}

/// One `q8_0` block: `x = d * q`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; BLOCK],
}

/// One `q4_0` block: `x = d * (q - 8)`, low nibbles hold values 0..16, high nibbles 16..32.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; BLOCK / 2],
}

/// One `q4_1` block: `x = d * q + m`, nibble order as in `q4_0`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; BLOCK / 2],
}

// The on-disk sizes are ggml's; a layout change here would silently break bit-exact import.
const _: () = assert!(core::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(core::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(core::mem::size_of::<BlockQ4_1>() == 20);

impl Format {
    /// Every format an artifact may hold.
    pub const ALL: [Format; 11] = [
        Format::F32,
        Format::F16,
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Bf16,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q4K,
        Format::Q5K,
        Format::Q6K,
    ];

    /// The formats a whole model may be stored in under one name (`--quant`, a target's
    /// default); the compiler writes the 5-bit and K-quant formats per tensor, as llama.cpp's
    /// mixtures and overrides pick them.
    pub const QUANTIZABLE: [Format; 5] = [
        Format::F32,
        Format::F16,
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
    ];

    /// The name used on the command line and in artifacts.
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
            Format::Bf16 => "bf16",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q4K => "q4_k",
            Format::Q5K => "q5_k",
            Format::Q6K => "q6_k",
        }
    }

    /// Parses a name as written by [`Format::name`].
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Values per storage unit: 1 for floats, [`BLOCK`] or [`SUPER_BLOCK`] for block formats.
    pub fn block_len(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::Bf16 => 1,
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => BLOCK,
            Format::Q4K | Format::Q5K | Format::Q6K => SUPER_BLOCK,
        }
    }

    /// The most bytes a storage unit takes (`q6_k`'s).
    pub const MAX_BLOCK_BYTES: usize = 210;

    /// Bytes per storage unit (ggml's block sizes).
    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::Bf16 => 2,
            Format::Q8_0 => core::mem::size_of::<BlockQ8_0>(),
            Format::Q4_0 => core::mem::size_of::<BlockQ4_0>(),
            Format::Q4_1 => core::mem::size_of::<BlockQ4_1>(),
            // f16 scale, 32 high bits, 16 bytes of nibbles (q5_1: and an f16 minimum).
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            // f16 scale and minimum scale, 12 bytes of 6-bit scales and minimums, 128 bytes
            // of nibbles (q5_k: and 32 bytes of high bits).
            Format::Q4K => 144,
            Format::Q5K => 176,
            // 128 bytes of low nibbles, 64 of high bit pairs, 16 8-bit scales, an f16 scale.
            Format::Q6K => 210,
        }
    }

    /// Whether this is one of ggml's K-quants (super-blocks of 256 with 6- or 8-bit scales).
    pub fn is_k_quant(self) -> bool {
        matches!(self, Format::Q4K | Format::Q5K | Format::Q6K)
    }

    /// Whether this format is one of [`Format::QUANTIZABLE`].
    pub fn quantizable(self) -> bool {
        Format::QUANTIZABLE.contains(&self)
    }

    /// Bytes of one row of `cols` values, or `None` when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_len())
            .then(|| cols / self.block_len() * self.block_bytes())
    }

    /// Writes the `out.len()` values stored in `row` (which holds exactly that many) as f32,
    /// with ggml's arithmetic.
    pub fn dequantize_row(self, row: &[u8], out: &mut [f32]) {
        debug_assert_eq!(Some(row.len()), self.row_bytes(out.len()));
        match self {
            Format::F32 => dequant::f32_row(row, out),
            Format::F16 => dequant::f16_row(row, out),
            Format::Bf16 => dequant::bf16_row(row, out),
            Format::Q8_0 => dequant::q8_0_row(row, out),
            Format::Q4_0 => dequant::q4_0_row(row, out),
            Format::Q4_1 => dequant::q4_1_row(row, out),
            Format::Q5_0 => dequant::q5_0_row(row, out),
            Format::Q5_1 => dequant::q5_1_row(row, out),
            Format::Q4K => dequant::q4_k_row(row, out),
            Format::Q5K => dequant::q5_k_row(row, out),
            Format::Q6K => dequant::q6_k_row(row, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Format::ALL {
            assert_eq!(Format::from_name(f.name()), Some(f));
            assert!(f.block_bytes() <= Format::MAX_BLOCK_BYTES, "{}", f.name());
        }
        assert_eq!(Format::from_name("iq4_xs"), None);
    }

    #[test]
    fn q4_1_dequantizes_in_ggml_nibble_order() {
        let mut row = vec![0u8; 20];
        row[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        row[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        row[4] = 0x3a; // low nibble 10 -> value 0, high nibble 3 -> value 16
        let mut out = [0f32; 32];
        Format::Q4_1.dequantize_row(&row, &mut out);
        assert_eq!(out[0], 0.5 * 10.0 - 1.0);
        assert_eq!(out[16], 0.5 * 3.0 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn row_bytes_rejects_partial_blocks() {
        assert_eq!(Format::Q8_0.row_bytes(64), Some(68));
        assert_eq!(Format::Q4_0.row_bytes(33), None);
        assert_eq!(Format::F16.row_bytes(3), Some(6));
    }
}
