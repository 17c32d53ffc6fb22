//! The memory a session will use, computed from the artifact and the options alone, before
//! anything is allocated: the same numbers size the session's buffers.

use crate::artifact::Metadata;
use crate::kernels::q8::Q8Block;
use crate::kernels::TILE_ROWS;
use crate::quant::BLOCK;

use super::{SessionError, SessionOptions, DEFAULT_CONTEXT};

/// Bytes by purpose; everything but `weights` is allocated once, when the session is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// Tokens of context the KV cache holds.
    pub context: usize,
    /// Most tokens per pass.
    pub batch: usize,
    /// Weights, mapped from the artifact (resident once touched).
    pub weights: usize,
    /// Keys and values of every layer.
    pub kv_cache: usize,
    /// Activation buffers of the op list, `batch` tokens each.
    pub buffers: usize,
    /// RoPE tables, attention scores, dequantized weight tiles, quantized activations.
    pub scratch: usize,
    pub logits: usize,
}

impl MemoryPlan {
    /// Plans a session of `opts` over the artifact described by `meta`.
    pub fn new(meta: &Metadata, opts: &SessionOptions) -> Result<MemoryPlan, SessionError> {
        let f = &meta.facts;
        let context = match opts.context {
            0 => f.context_length.min(DEFAULT_CONTEXT),
            c => c,
        };
        if context > f.context_length {
            return Err(SessionError::Setup(alloc::format!(
                "a context of {context} exceeds the model's {} tokens",
                f.context_length
            )));
        }
        let batch = opts.batch.max(1);
        let threads = opts.threads.max(1);
        let max_cols = meta.tensors.iter().map(|t| t.cols()).max().unwrap_or(0);
        let floats = |n: usize| n * core::mem::size_of::<f32>();
        let kv = f.layers * f.kv_heads * context * f.head_dim;
        let rope = 2 * batch * (f.head_dim / 2);
        let tiles = threads * TILE_ROWS * max_cols;
        let xq = batch * max_cols.div_ceil(BLOCK) * core::mem::size_of::<Q8Block>();
        Ok(MemoryPlan {
            context,
            batch,
            weights: meta.tensors.iter().map(|t| t.len as usize).sum(),
            kv_cache: floats(2 * kv),
            buffers: floats(meta.graph.buffers.iter().map(|b| b.width * batch).sum()),
            scratch: floats(rope + context + tiles) + xq,
            logits: floats(if opts.logits_all { batch } else { 1 } * f.vocab_size),
        })
    }

    /// Bytes the session allocates (all but the mapped weights).
    pub fn session_bytes(&self) -> usize {
        self.kv_cache + self.buffers + self.scratch + self.logits
    }

    /// Peak bytes: the weights plus the session.
    pub fn total(&self) -> usize {
        self.weights + self.session_bytes()
    }
}
