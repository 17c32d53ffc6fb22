//! ONNX export: the Llama decoder as a standard opset-17 graph with a KV cache, runnable by
//! onnxruntime, onnxruntime-genai, tract and anything else that runs such decoders.
//!
//! Interface (the layout Optimum and onnxruntime-genai use):
//! - inputs `input_ids` int64 `[batch_size, sequence_length]`, `attention_mask` int64
//!   `[batch_size, total_sequence_length]`, `position_ids` int64 `[batch_size, sequence_length]`,
//!   `past_key_values.{i}.key|value` f32 `[batch_size, kv_heads, past_sequence_length, head_dim]`;
//! - outputs `logits` f32 `[batch_size, sequence_length, vocab]`, `present.{i}.key|value` f32
//!   `[batch_size, kv_heads, total_sequence_length, head_dim]`.
//!
//! Weights are dequantized to f32 initializers; [`export_quantized`] instead writes every
//! projection whose weight is in `q8_0`, `q4_0` or `q4_1` as onnxruntime's
//! `com.microsoft::MatMulNBits` over the same blocks. A query attends to the keys up to its own index
//! in the sequence (`total - seq + s`) whose `attention_mask` is 1.

mod builder;
mod decoder;
mod nbits;
pub mod proto;
mod write;

use std::path::{Path, PathBuf};

use crate::graph::Checkpoint;

pub use decoder::OPSET;

/// How to write the model.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Keep the weights in `<out>.data` even when the model would fit in one protobuf (it is
    /// done anyway above protobuf's 2 GiB limit).
    pub external_data: bool,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    pub nodes: usize,
    pub initializers: usize,
    /// Bytes written: the model file and, with external data, `<out>.data`.
    pub bytes: u64,
    /// Whether the weights are in `<out>.data`.
    pub external: bool,
}

/// Why an export failed; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot export this checkpoint: {what}")]
    Checkpoint { path: PathBuf, what: String },
}

/// Writes `checkpoint` as an ONNX decoder to `out` (and `<out>.data` when the weights are
/// external). Both files appear atomically: nothing is left under their names on failure.
pub fn export(
    checkpoint: &Checkpoint,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport, OnnxError> {
    export_with(checkpoint, out, opts, false)
}

/// [`export`], except that every projection (attention, MLP and output head) whose weight is
/// stored in `q8_0`, `q4_0` or `q4_1` becomes a `com.microsoft::MatMulNBits` node (bits 8 or
/// 4, block size 32, `accuracy_level` 0) over the same blocks, repacked but not requantized;
/// `q4_1`'s minimum becomes a float zero point. Float weights stay `MatMul`s. A `q8_0`
/// embedding table is stored as the same blocks (shared with a tied output head) and
/// dequantized in the graph after the `Gather`; one in another format is written as f32.
/// The model imports the `com.microsoft` opset 1, so
/// it runs in onnxruntime.
pub fn export_quantized(
    checkpoint: &Checkpoint,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport, OnnxError> {
    export_with(checkpoint, out, opts, true)
}

fn export_with(
    checkpoint: &Checkpoint,
    out: &Path,
    opts: &ExportOptions,
    quantized: bool,
) -> Result<ExportReport, OnnxError> {
    let decoder = decoder::build(checkpoint, quantized).map_err(|what| OnnxError::Checkpoint {
        path: out.to_path_buf(),
        what,
    })?;
    write::write(
        &decoder,
        &checkpoint.facts,
        &checkpoint.tokenizer.to_bytes(),
        out,
        opts,
    )
}
