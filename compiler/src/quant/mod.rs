//! Weight quantization into kiln's storage formats, with the arithmetic of ggml's reference
//! quantizers (`quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref` here, the K-quants in `kquants.rs`),
//! so that kiln's blocks are llama.cpp's byte for byte; and [`QuantPlan`], which picks a format
//! per tensor of a checkpoint (one format, or one of llama.cpp's [`Mixture`]s).

mod kquants;
pub mod mixture;

use half::f16;
use kiln_runtime::quant::{Format, BLOCK};

pub use mixture::{MixShape, Mixture};

use crate::graph::{Checkpoint, Tensor};

/// Every format kiln writes: all it reads but bf16.
pub const WRITABLE: [Format; 10] = [
    Format::F32,
    Format::F16,
    Format::Q8_0,
    Format::Q4_0,
    Format::Q4_1,
    Format::Q5_0,
    Format::Q5_1,
    Format::Q4K,
    Format::Q5K,
    Format::Q6K,
];

/// Why a tensor or a plan could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{tensor}: rows of {cols} values cannot be stored as {format}, which needs a multiple of {block} values per row")]
    RowLength {
        tensor: String,
        cols: usize,
        format: &'static str,
        block: usize,
    },
    #[error(
        "{tensor}: holds {len} bytes, but a {shape:?} tensor stored as {format} takes {expected:?}"
    )]
    Malformed {
        tensor: String,
        shape: Vec<usize>,
        format: &'static str,
        len: usize,
        expected: Option<usize>,
    },
    #[error("{tensor}: value {value} at row {row}, column {col} is not finite")]
    NonFinite {
        tensor: String,
        row: usize,
        col: usize,
        value: f32,
    },
    #[error(
        "{tensor}: row {row}, column {col}: {format} cannot represent {value} (beyond f16's range)"
    )]
    OutOfRange {
        tensor: String,
        row: usize,
        col: usize,
        format: &'static str,
        value: f32,
    },
    #[error("{tensor}: kiln does not quantize to {format} (it keeps {format} tensors a GGUF file holds; quantize to one of f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, or use --quant copy)")]
    NotQuantizable {
        tensor: String,
        format: &'static str,
    },
    #[error("--override {spec:?}: {why}")]
    BadOverride { spec: String, why: String },
    #[error("--override {pattern}={format}: no weight matrix matches (names look like `blk.0.ffn_down`, `token_embd`, `output`, or the checkpoint's own tensor names)")]
    UnusedOverride {
        pattern: String,
        format: &'static str,
    },
}

/// Where a row could not be encoded: the column and the offending value.
enum RowError {
    NonFinite(usize, f32),
    OutOfRange(usize, f32),
    /// The format is one kiln only keeps, never writes.
    NotQuantizable,
}

/// `v` as f16 bytes, refusing what f16 cannot hold (ggml would silently store infinity).
fn half_bytes(v: f32, col: usize) -> Result<[u8; 2], RowError> {
    let h = f16::from_f32(v);
    if h.is_infinite() {
        return Err(RowError::OutOfRange(col, v));
    }
    Ok(h.to_le_bytes())
}

/// `d = amax / 127`, `q = round(x / d)`.
fn q8_0_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half_bytes(d, col)?);
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    Ok(())
}

/// `d = max / -8` for the signed value of largest magnitude, so that it lands exactly on `q = 0`.
fn q4_0_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        // Strictly greater: the first of equal magnitudes wins, as in ggml.
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half_bytes(d, col)?);
    // Truncation toward zero after `+ 8.5` is ggml's rounding; the top code 16 folds into 15.
    let code = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    let (lo, hi) = x.split_at(BLOCK / 2);
    out.extend(lo.iter().zip(hi).map(|(&a, &b)| code(a) | code(b) << 4));
    Ok(())
}

/// The smallest and largest of `x`, compared as ggml's `q4_1`/`q5_1` quantizers compare them.
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
    }
    (min, max)
}

/// `d = (max - min) / 15`, `m = min`, `q = trunc((x - min) / d + 0.5)`.
fn q4_1_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half_bytes(d, col)?);
    out.extend(half_bytes(min, col)?);
    let code = |v: f32| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8;
    let (lo, hi) = x.split_at(BLOCK / 2);
    out.extend(lo.iter().zip(hi).map(|(&a, &b)| code(a) | code(b) << 4));
    Ok(())
}

/// `v` as the integer gcc's x86-64 code makes of ggml's C casts from float (`cvttss2si`):
/// truncated toward zero, and `i32::MIN` for NaN and values beyond i32 (which C leaves
/// undefined). Rows whose range is a few f32 subnormals give 1/d = ±inf and reach that case.
fn c_trunc(v: f32) -> i32 {
    if v.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    }
}

/// `d = max / -16` for the signed value of largest magnitude; 5-bit codes, their low nibbles
/// packed as in `q4_0` and the fifth bits in a little-endian `u32` before them.
fn q5_0_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half_bytes(d, col)?);
    let codes: [u8; BLOCK] =
        std::array::from_fn(|j| (c_trunc(x[j] * id + 16.5) as i8).min(31) as u8);
    five_bit_codes(&codes, out);
    Ok(())
}

/// `d = (max - min) / 31`, `m = min`, `q = trunc((x - min) / d + 0.5)`, packed as `q5_0`.
fn q5_1_block(x: &[f32], col: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half_bytes(d, col)?);
    out.extend(half_bytes(min, col)?);
    let codes: [u8; BLOCK] = std::array::from_fn(|j| c_trunc((x[j] - min) * id + 0.5) as u8);
    five_bit_codes(&codes, out);
    Ok(())
}

/// The fifth bits of 32 codes (bit `j` for value `j`), then their low nibbles as in `q4_0`.
fn five_bit_codes(codes: &[u8; BLOCK], out: &mut Vec<u8>) {
    let qh = codes
        .iter()
        .enumerate()
        .fold(0u32, |qh, (j, &c)| qh | u32::from(c >> 4 & 1) << j);
    out.extend(qh.to_le_bytes());
    let (lo, hi) = codes.split_at(BLOCK / 2);
    out.extend(
        lo.iter()
            .zip(hi)
            .map(|(&a, &b)| (a & 0x0f) | (b & 0x0f) << 4),
    );
}

/// Appends `row` encoded as `format`; `row.len()` is a whole number of `format`'s blocks.
fn quantize_row(row: &[f32], format: Format, out: &mut Vec<u8>) -> Result<(), RowError> {
    if let Some(col) = row.iter().position(|v| !v.is_finite()) {
        return Err(RowError::NonFinite(col, row[col]));
    }
    let block = match format {
        Format::F32 => {
            out.extend(row.iter().flat_map(|v| v.to_le_bytes()));
            return Ok(());
        }
        Format::F16 => {
            for (col, &v) in row.iter().enumerate() {
                out.extend(half_bytes(v, col)?);
            }
            return Ok(());
        }
        Format::Q8_0 => q8_0_block,
        Format::Q4_0 => q4_0_block,
        Format::Q4_1 => q4_1_block,
        Format::Q5_0 => q5_0_block,
        Format::Q5_1 => q5_1_block,
        Format::Q4K => kquants::q4_k_block,
        Format::Q5K => kquants::q5_k_block,
        Format::Q6K => kquants::q6_k_block,
        Format::Bf16 => return Err(RowError::NotQuantizable),
    };
    let len = format.block_len();
    for (i, x) in row.chunks_exact(len).enumerate() {
        block(x, i * len, out)?;
    }
    Ok(())
}

/// `t` stored as `format`: a copy when it already is (bit for bit), else its values dequantized
/// and re-encoded row by row.
pub fn quantize_tensor(t: &Tensor, format: Format) -> Result<Tensor, QuantError> {
    let (rows, cols) = (t.rows(), t.cols());
    let expected = t.format.row_bytes(cols).map(|rb| rb * rows);
    if expected != Some(t.data.len()) {
        return Err(QuantError::Malformed {
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            format: t.format.name(),
            len: t.data.len(),
            expected,
        });
    }
    let Some(dst_row) = format.row_bytes(cols) else {
        return Err(QuantError::RowLength {
            tensor: t.name.clone(),
            cols,
            format: format.name(),
            block: format.block_len(),
        });
    };
    if t.format == format {
        return Ok(t.clone());
    }
    let mut data = Vec::with_capacity(dst_row * rows);
    let mut values = vec![0f32; cols];
    for (row, src) in t.data.chunks_exact(t.row_bytes().max(1)).enumerate() {
        t.format.dequantize_row(src, &mut values);
        quantize_row(&values, format, &mut data).map_err(|e| match e {
            RowError::NonFinite(col, value) => QuantError::NonFinite {
                tensor: t.name.clone(),
                row,
                col,
                value,
            },
            RowError::OutOfRange(col, value) => QuantError::OutOfRange {
                tensor: t.name.clone(),
                row,
                col,
                format: format.name(),
                value,
            },
            RowError::NotQuantizable => QuantError::NotQuantizable {
                tensor: t.name.clone(),
                format: format.name(),
            },
        })?;
    }
    Ok(Tensor {
        name: t.name.clone(),
        shape: t.shape.clone(),
        format,
        data,
    })
}

/// `*` matches any run of characters (dots included), `?` any one; the whole name must match.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and how much of the name it has taken, for backtracking.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// What a [`QuantPlan`] stores the matrices no override names in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Storage {
    /// As the checkpoint stores them (`--quant copy`, llama-quantize's `COPY`).
    Copy,
    /// One format, except that the token embedding and the output head get `q8_0` when it is a
    /// 4-bit format, as llama.cpp keeps them wider.
    Each(Format),
    /// One of llama.cpp's K-quant mixtures, tensor by tensor as `llama-quantize` picks.
    Mixture(Mixture),
}

/// Which format each weight of a checkpoint gets.
///
/// Vectors (norm weights) keep their storage. A matrix gets the format of the last override
/// whose pattern matches it, else what [`Storage`] says. Patterns are globs over the tensor's
/// canonical GGUF-style role (`blk.3.ffn_down`, `token_embd`, `output`) or its own name, with
/// or without the `.weight` suffix.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantPlan {
    pub storage: Storage,
    pub overrides: Vec<(String, Format)>,
}

/// Canonical roles of a layer's tensors, in [`crate::graph::LayerWeights::tensors`] order.
const LAYER_ROLES: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

impl QuantPlan {
    /// Every matrix in `default`, with the embedding/output rule.
    pub fn new(default: Format) -> QuantPlan {
        QuantPlan::with_storage(Storage::Each(default))
    }

    /// Every tensor as the checkpoint stores it (a K-quant GGUF's mix, bit for bit).
    pub fn copy() -> QuantPlan {
        QuantPlan::with_storage(Storage::Copy)
    }

    /// llama.cpp's mixture `mixture` (what `llama-quantize` writes for its file type).
    pub fn mixture(mixture: Mixture) -> QuantPlan {
        QuantPlan::with_storage(Storage::Mixture(mixture))
    }

    fn with_storage(storage: Storage) -> QuantPlan {
        QuantPlan {
            storage,
            overrides: Vec::new(),
        }
    }

    /// The name `--quant` takes for this plan: a format's, a mixture's, or `copy`.
    pub fn name(&self) -> &'static str {
        match self.storage {
            Storage::Copy => "copy",
            Storage::Each(f) => f.name(),
            Storage::Mixture(m) => m.name(),
        }
    }

    /// Adds an override written `PATTERN=FORMAT` (e.g. `blk.*.ffn_down=q8_0`).
    pub fn with_override(mut self, spec: &str) -> Result<QuantPlan, QuantError> {
        let bad = |why: String| QuantError::BadOverride {
            spec: spec.to_owned(),
            why,
        };
        let (pattern, name) = spec
            .rsplit_once('=')
            .ok_or_else(|| bad("expected PATTERN=FORMAT".into()))?;
        if pattern.is_empty() {
            return Err(bad("the pattern is empty".into()));
        }
        let format = Format::from_name(name)
            .filter(|f| WRITABLE.contains(f))
            .ok_or_else(|| {
                let names: Vec<&str> = WRITABLE.iter().map(|f| f.name()).collect();
                bad(format!(
                    "unknown format {name:?} (one of {})",
                    names.join(", ")
                ))
            })?;
        self.overrides.push((pattern.to_owned(), format));
        Ok(self)
    }

    /// The index of the last override matching `role` or `name`.
    fn matching_override(&self, role: &str, name: &str) -> Option<usize> {
        let short = name.strip_suffix(".weight").unwrap_or(name);
        self.overrides
            .iter()
            .rposition(|(p, _)| [role, name, short].iter().any(|n| glob_match(p, n)))
    }

    /// The format for tensor `t` in canonical role `role` of a model shaped `shape` (see
    /// [`QuantPlan`]).
    pub fn format_for(&self, role: &str, t: &Tensor, shape: &MixShape) -> Format {
        if t.shape.len() < 2 {
            return t.format;
        }
        if let Some(i) = self.matching_override(role, &t.name) {
            return self.overrides[i].1;
        }
        match self.storage {
            Storage::Copy => t.format,
            Storage::Each(default) => {
                let four_bit = matches!(default, Format::Q4_0 | Format::Q4_1);
                if four_bit && matches!(role, "token_embd" | "output") {
                    Format::Q8_0
                } else {
                    default
                }
            }
            Storage::Mixture(m) => m.format_for(role, t.cols(), shape),
        }
    }

    /// `checkpoint` with every tensor in the format this plan gives it; an override that matches
    /// no matrix is an error, as it is most likely a misspelt name.
    pub fn apply(&self, checkpoint: &Checkpoint) -> Result<Checkpoint, QuantError> {
        let mut out = checkpoint.clone();
        let shape = MixShape::new(&out.facts, out.weights.lm_head.is_none());
        let w = &mut out.weights;
        let mut jobs: Vec<(String, &mut Tensor)> = vec![("token_embd".into(), &mut w.embed)];
        for (i, l) in w.layers.iter_mut().enumerate() {
            let tensors = [
                &mut l.attn_norm,
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.ffn_norm,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ];
            for (role, t) in LAYER_ROLES.iter().zip(tensors) {
                jobs.push((format!("blk.{i}.{role}"), t));
            }
        }
        jobs.push(("output_norm".into(), &mut w.final_norm));
        if let Some(head) = &mut w.lm_head {
            jobs.push(("output".into(), head));
        }
        let mut used = vec![false; self.overrides.len()];
        for (role, t) in jobs {
            if t.shape.len() >= 2 {
                if let Some(i) = self.matching_override(&role, &t.name) {
                    used[i] = true;
                }
            }
            let format = self.format_for(&role, t, &shape);
            if format != t.format {
                *t = quantize_tensor(t, format)?;
            }
        }
        if let Some(i) = used.iter().position(|u| !u) {
            let (pattern, format) = &self.overrides[i];
            return Err(QuantError::UnusedOverride {
                pattern: pattern.clone(),
                format: format.name(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("blk.*.ffn_down", "blk.12.ffn_down"));
        assert!(glob_match("*", "token_embd"));
        assert!(glob_match("blk.?.attn_*", "blk.3.attn_q"));
        assert!(!glob_match("blk.?.attn_*", "blk.13.attn_q"));
        assert!(!glob_match("blk.*.ffn_down", "blk.1.ffn_down.weight"));
        assert!(!glob_match("ffn_down", "blk.1.ffn_down"));
        assert!(glob_match("*ffn*", "blk.1.ffn_up"));
    }
}
