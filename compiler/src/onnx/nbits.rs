//! ggml blocks as the inputs of onnxruntime's `com.microsoft::MatMulNBits` (block size 32),
//! which dequantizes a code `q` of block `b` as `(q - zero_point[b]) * scale[b]`:
//!
//! - `B` is uint8 `[N, K/32, 32 * bits / 8]`, codes packed low-first along K (for 4 bits,
//!   element `2j` in the low nibble of byte `j`, `2j + 1` in its high nibble — ggml puts
//!   elements `j` and `j + 16` there, so nibbles are repacked);
//! - `scales` is f32 `[N * K/32]`;
//! - `q8_0` (`d * q`, `q` int8) becomes codes `q + 128` over the default zero point 128 and
//!   `q4_0` (`d * (q - 8)`) keeps its codes over the default zero point 8: both exact;
//! - `q4_1` (`d * q + m`) needs the zero point `-m / d`, which is not an integer, so it goes
//!   in the optional f32 `zero_points` input `[N * K/32]` (the same type as `scales`,
//!   unpacked). A block with `d = 0` holds `m` everywhere and is written as codes 0, scale 1
//!   and zero point `-m`, which is exact.

use half::f16;
use kiln_runtime::quant::{Format, BLOCK};

use crate::graph::Tensor;

/// The operator's domain.
pub const DOMAIN: &str = "com.microsoft";
/// Values per block, the only size written.
pub const BLOCK_SIZE: usize = BLOCK;

/// Which input of `MatMulNBits` an initializer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    B,
    Scales,
    ZeroPoints,
}

/// Bits per code when `format` is a block format `MatMulNBits` can hold.
pub fn bits(format: Format) -> Option<usize> {
    match format {
        Format::Q8_0 => Some(8),
        Format::Q4_0 | Format::Q4_1 => Some(4),
        // Exported as float initializers.
        _ => None,
    }
}

/// Whether `format` needs the f32 `zero_points` input.
pub fn has_zero_points(format: Format) -> bool {
    format == Format::Q4_1
}

/// One ggml block as codes (one per element, in order), scale and zero point.
struct Block {
    codes: [u8; BLOCK],
    scale: f32,
    zero_point: f32,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// ggml's nibbles: byte `j` holds element `j` low and element `j + 16` high.
fn nibbles(qs: &[u8]) -> [u8; BLOCK] {
    let mut codes = [0u8; BLOCK];
    for (j, &q) in qs.iter().enumerate().take(BLOCK / 2) {
        codes[j] = q & 0x0f;
        codes[j + BLOCK / 2] = q >> 4;
    }
    codes
}

/// Converts one block of `format` (exactly `format.block_bytes()` long).
fn block(format: Format, b: &[u8]) -> Block {
    match format {
        Format::Q8_0 => {
            let mut codes = [0u8; BLOCK];
            for (c, &q) in codes.iter_mut().zip(&b[2..]) {
                // int8 q → uint8 q + 128: flipping the sign bit.
                *c = q ^ 0x80;
            }
            Block {
                codes,
                scale: f16_at(b, 0),
                zero_point: 128.0,
            }
        }
        Format::Q4_0 => Block {
            codes: nibbles(&b[2..]),
            scale: f16_at(b, 0),
            zero_point: 8.0,
        },
        Format::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            if d == 0.0 {
                Block {
                    codes: [0; BLOCK],
                    scale: 1.0,
                    zero_point: -m,
                }
            } else {
                Block {
                    codes: nibbles(&b[4..]),
                    scale: d,
                    zero_point: -m / d,
                }
            }
        }
        // Not block formats; `decoder` only asks for those `bits` accepts.
        _ => Block {
            codes: [0; BLOCK],
            scale: 0.0,
            zero_point: 0.0,
        },
    }
}

/// Dimensions of `part` for an `[N, K]` tensor stored in a block format.
pub fn dims(t: &Tensor, part: Part) -> Vec<i64> {
    let (n, blocks) = (t.rows(), t.cols() / BLOCK_SIZE);
    match part {
        Part::B => vec![
            n as i64,
            blocks as i64,
            (BLOCK_SIZE * bits(t.format).unwrap_or(8) / 8) as i64,
        ],
        Part::Scales | Part::ZeroPoints => vec![(n * blocks) as i64],
    }
}

/// Bytes of `part`.
pub fn byte_len(t: &Tensor, part: Part) -> u64 {
    let elems: i64 = dims(t, part).iter().product();
    match part {
        Part::B => elems as u64,
        Part::Scales | Part::ZeroPoints => elems as u64 * 4,
    }
}

/// The little-endian bytes of `part`.
pub fn le_bytes(t: &Tensor, part: Part) -> Vec<u8> {
    let bits = bits(t.format).unwrap_or(8);
    let mut out = Vec::with_capacity(byte_len(t, part) as usize);
    for b in t.data.chunks_exact(t.format.block_bytes()) {
        let block = block(t.format, b);
        match part {
            Part::B if bits == 4 => out.extend(
                block
                    .codes
                    .chunks_exact(2)
                    .map(|pair| pair[0] | (pair[1] << 4)),
            ),
            Part::B => out.extend_from_slice(&block.codes),
            Part::Scales => out.extend_from_slice(&block.scale.to_le_bytes()),
            Part::ZeroPoints => out.extend_from_slice(&block.zero_point.to_le_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `MatMulNBits`' dequantization of block `k` of row `r`, from the written inputs.
    fn onnx_values(t: &Tensor) -> Vec<f32> {
        let (b, scales) = (le_bytes(t, Part::B), le_bytes(t, Part::Scales));
        let zps = has_zero_points(t.format).then(|| le_bytes(t, Part::ZeroPoints));
        let f32_at = |v: &[u8], i: usize| f32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
        let bits = bits(t.format).expect("block format");
        let blob = BLOCK * bits / 8;
        let mut out = Vec::new();
        for (i, codes) in b.chunks_exact(blob).enumerate() {
            let scale = f32_at(&scales, 4 * i);
            let zp = match &zps {
                Some(z) => f32_at(z, 4 * i),
                None => f32::from(1u8 << (bits - 1)),
            };
            for e in 0..BLOCK {
                let q = if bits == 8 {
                    codes[e]
                } else {
                    (codes[e / 2] >> (4 * (e % 2))) & 0x0f
                };
                out.push((f32::from(q) - zp) * scale);
            }
        }
        out
    }

    fn tensor(format: Format, blocks: Vec<u8>) -> Tensor {
        Tensor {
            name: "w".into(),
            shape: vec![2, blocks.len() / format.block_bytes() / 2 * BLOCK],
            format,
            data: blocks,
        }
    }

    fn half(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn blocks_dequantize_as_kiln_does() {
        let qs: Vec<u8> = (0..16u8).map(|j| j.wrapping_mul(37) ^ 0x5a).collect();
        let mut q8 = Vec::new();
        let mut q4_0 = Vec::new();
        let mut q4_1 = Vec::new();
        for (i, d) in [0.25f32, -0.125].into_iter().enumerate() {
            q8.extend(half(d));
            q8.extend((0..32u8).map(|j| j.wrapping_mul(29).wrapping_add(i as u8)));
            q4_0.extend(half(d));
            q4_0.extend(&qs);
            q4_1.extend(half(d.abs()));
            q4_1.extend(half(-1.5));
            q4_1.extend(&qs);
        }
        // A q4_1 block with d = 0 holds m everywhere, whatever its codes.
        q4_1[20..22].copy_from_slice(&half(0.0));
        q4_1[22..24].copy_from_slice(&half(0.75));
        for (format, data) in [
            (Format::Q8_0, q8),
            (Format::Q4_0, q4_0),
            (Format::Q4_1, q4_1),
        ] {
            let t = tensor(format, data);
            assert_eq!(
                dims(&t, Part::B)[2] as usize,
                BLOCK * bits(format).unwrap() / 8
            );
            assert_eq!(le_bytes(&t, Part::B).len() as u64, byte_len(&t, Part::B));
            let expected = t.to_f32_vec();
            let got = onnx_values(&t);
            assert_eq!(expected.len(), got.len());
            for (e, g) in expected.iter().zip(&got) {
                assert!(
                    (e - g).abs() <= 1e-6 * e.abs().max(1.0),
                    "{format:?}: {e} vs {g}"
                );
            }
        }
    }
}
