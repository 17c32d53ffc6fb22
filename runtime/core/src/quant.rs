//! Weight storage formats: ggml-compatible blocks of 32 values (`q8_0`, `q4_0`, `q4_1`) and plain floats.

use half::f16;
use serde::{Deserialize, Serialize};

/// Values per quantization block, shared by every block format (as in ggml).
pub const BLOCK: usize = 32;

/// How the values of one weight tensor are stored, row by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
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
    /// Every format, for listings and tests.
    pub const ALL: [Format; 5] = [
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
        }
    }

    /// Parses a name as written by [`Format::name`].
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Values per storage unit: 1 for floats, [`BLOCK`] for block formats.
    pub fn block_len(self) -> usize {
        match self {
            Format::F32 | Format::F16 => 1,
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 => BLOCK,
        }
    }

    /// Bytes per storage unit.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 => 2,
            Format::Q8_0 => core::mem::size_of::<BlockQ8_0>(),
            Format::Q4_0 => core::mem::size_of::<BlockQ4_0>(),
            Format::Q4_1 => core::mem::size_of::<BlockQ4_1>(),
        }
    }

    /// Bytes of one row of `cols` values, or `None` when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_len())
            .then(|| cols / self.block_len() * self.block_bytes())
    }

    /// Writes the `out.len()` values stored in `row` (which holds exactly that many) as f32.
    pub fn dequantize_row(self, row: &[u8], out: &mut [f32]) {
        debug_assert_eq!(Some(row.len()), self.row_bytes(out.len()));
        match self {
            Format::F32 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Format::F16 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Format::Q8_0 => {
                for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(34)) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    for (x, &q) in o.iter_mut().zip(&b[2..]) {
                        *x = d * f32::from(q as i8);
                    }
                }
            }
            Format::Q4_0 => {
                for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(18)) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let (lo, hi) = o.split_at_mut(BLOCK / 2);
                    for (j, &q) in b[2..].iter().enumerate() {
                        lo[j] = d * (f32::from(q & 0x0f) - 8.0);
                        hi[j] = d * (f32::from(q >> 4) - 8.0);
                    }
                }
            }
            Format::Q4_1 => {
                for (o, b) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(20)) {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                    let (lo, hi) = o.split_at_mut(BLOCK / 2);
                    for (j, &q) in b[4..].iter().enumerate() {
                        lo[j] = d * f32::from(q & 0x0f) + m;
                        hi[j] = d * f32::from(q >> 4) + m;
                    }
                }
            }
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
        }
        assert_eq!(Format::from_name("q5_k"), None);
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
