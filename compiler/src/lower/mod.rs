//! Lowering an ONNX Llama decoder back to a [`Checkpoint`]: tract-onnx reads it, tract-core
//! types and declutters it, and the matcher walks the result from `input_ids` — embedding,
//! per layer RMSNorm, q/k/v projections, RoPE, KV append, GQA attention, `o_proj`, residual,
//! RMSNorm, SwiGLU MLP, residual — to the final norm and output head, reading each weight back
//! in Hugging Face layout. The RoPE tables and masks are evaluated on sample steps, so θ,
//! `llama3` scaling and causality are checked, not assumed.
//!
//! Any exporter's graph lowers as long as it keeps the standard decoder interface (`input_ids`,
//! `attention_mask`, `position_ids`, `past_key_values.{i}.key|value` as
//! `[batch, kv_heads, past, head_dim]`); node names are only used in errors. Whatever does not
//! match is an error naming the node and its op.

mod attention;
mod decoder;
mod facts;
mod kv_cache;
mod layout;
mod linear;
mod mask;
mod metadata;
mod mlp;
mod norm;
mod plane;
mod probe;
mod rope;
mod sdpa;
mod tokenizer;
mod tract_panics;
mod view;

use std::path::{Path, PathBuf};

use tract_onnx::prelude::{Framework, InferenceModelExt, TypedModel};

use kiln_runtime::model::SamplingDefaults;

use crate::graph::Checkpoint;
use crate::import::ImportError;
use metadata::Metadata;
use view::{Mismatch, View};

/// Where the parts of a model not in its ONNX file come from.
#[derive(Clone, Debug, Default)]
pub struct LowerOptions {
    /// A `tokenizer.json` or GGUF whose vocabulary the model uses; by default kiln's metadata,
    /// else `tokenizer.json` beside the model.
    pub tokenizer: Option<PathBuf>,
}

/// Why an ONNX model could not be lowered; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a readable ONNX model: {what}")]
    Load { path: PathBuf, what: String },
    #[error("{path}: node {node:?} ({op}): {what}")]
    Unmatched {
        path: PathBuf,
        node: String,
        op: String,
        what: String,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: metadata {key}: {what}")]
    Metadata {
        path: PathBuf,
        key: String,
        what: String,
    },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        source: kiln_engine::tokenizer::TokenizerError,
    },
    #[error(transparent)]
    Import(#[from] ImportError),
}

/// Lowers the ONNX decoder at `path` with default options.
pub fn import_onnx(path: &Path) -> Result<Checkpoint, LowerError> {
    import_onnx_with(path, &LowerOptions::default())
}

/// Lowers the ONNX decoder at `path`.
pub fn import_onnx_with(path: &Path, opts: &LowerOptions) -> Result<Checkpoint, LowerError> {
    let model = load(path)?;
    let view = View { model: &model };
    let matched = decoder::decoder(&view).map_err(|m| unmatched(path, m))?;
    let meta = Metadata::read(&model.properties).map_err(|e| LowerError::Metadata {
        path: path.to_path_buf(),
        key: e.key,
        what: e.what,
    })?;
    let tokens = tokenizer::resolve(path, &meta, opts.tokenizer.as_deref())?;
    let config_path = path.with_file_name("config.json");
    let config = match config_path.is_file() {
        true => Some(crate::import::hf::config_facts(&config_path)?),
        false => None,
    };
    let mut facts = facts::facts(path, &matched.structure, &meta, config.as_ref(), &tokens)
        .map_err(|what| LowerError::Invalid {
            path: path.to_path_buf(),
            what,
        })?;
    if facts.sampling == SamplingDefaults::default() {
        let generation = path.with_file_name("generation_config.json");
        facts.sampling = crate::import::hf::generation_sampling(&generation)?;
    }
    facts.check().map_err(|what| LowerError::Invalid {
        path: path.to_path_buf(),
        what: format!("model facts: {what}"),
    })?;
    Ok(Checkpoint {
        facts,
        tokenizer: tokens.data,
        weights: matched.weights,
    })
}

/// Reads, types and declutters the model (a panic in tract is an error too).
fn load(path: &Path) -> Result<TypedModel, LowerError> {
    std::fs::metadata(path).map_err(|source| LowerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let load_error = |what| LowerError::Load {
        path: path.to_path_buf(),
        what,
    };
    tract_panics::contained(|| {
        tract_onnx::onnx()
            .model_for_path(path)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
    })
    .map_err(|panic| load_error(format!("tract failed on it: {panic}")))?
    .map_err(|e| load_error(format!("{e:#}")))
}

fn unmatched(path: &Path, m: Mismatch) -> LowerError {
    let path = path.to_path_buf();
    match m {
        Mismatch::Node { node, op, what } => LowerError::Unmatched {
            path,
            node,
            op,
            what,
        },
        Mismatch::Graph(what) => LowerError::Invalid { path, what },
    }
}
