//! The memory a session will use, computed from the artifact and the options alone, before
//! anything is allocated: one arena with a fixed offset for every buffer, cache and scratch.

use alloc::vec::Vec;
use core::ops::Range;

use crate::artifact::Metadata;
use crate::kernels::q8::Q8Block;
use crate::kernels::TILE_ROWS;
use crate::quant::BLOCK;

use super::{SessionError, SessionOptions, DEFAULT_CONTEXT};

/// Bytes by purpose; everything but `weights` lives in the session's one arena.
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

/// Where each part of the session lies in the arena, in f32 units.
#[derive(Clone, Debug)]
pub(super) struct Regions {
    pub bufs: Vec<Range<usize>>,
    pub k_cache: Range<usize>,
    pub v_cache: Range<usize>,
    pub cos: Range<usize>,
    pub sin: Range<usize>,
    pub scores: Range<usize>,
    pub tiles: Range<usize>,
    /// Quantized activations, [`Q8Block`]s viewed as floats.
    pub xq: Range<usize>,
    pub logits: Range<usize>,
    pub len: usize,
}

const F32: usize = core::mem::size_of::<f32>();
/// A [`Q8Block`] is a whole number of floats, so it can live in the f32 arena.
const Q8_FLOATS: usize = core::mem::size_of::<Q8Block>() / F32;
const _: () = assert!(core::mem::size_of::<Q8Block>().is_multiple_of(F32));

/// Context, batch and regions of a session of `opts` over `meta`.
pub(super) fn layout(
    meta: &Metadata,
    opts: &SessionOptions,
) -> Result<(usize, usize, Regions), SessionError> {
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
    let max_cols = meta.tensors.iter().map(|t| t.cols()).max().unwrap_or(0);
    let mut end = 0;
    let mut take = |floats: usize| {
        end += floats;
        end - floats..end
    };
    let bufs = meta
        .graph
        .buffers
        .iter()
        .map(|b| take(b.width * batch))
        .collect();
    let kv = f.layers * f.kv_heads * context * f.head_dim;
    let regions = Regions {
        bufs,
        k_cache: take(kv),
        v_cache: take(kv),
        cos: take(batch * (f.head_dim / 2)),
        sin: take(batch * (f.head_dim / 2)),
        scores: take(context),
        tiles: take(opts.threads.max(1) * TILE_ROWS * max_cols),
        xq: take(batch * max_cols.div_ceil(BLOCK) * Q8_FLOATS),
        logits: take(if opts.logits_all { batch } else { 1 } * f.vocab_size),
        len: 0,
    };
    Ok((
        context,
        batch,
        Regions {
            len: end,
            ..regions
        },
    ))
}

impl MemoryPlan {
    /// Plans a session of `opts` over the artifact described by `meta`.
    pub fn new(meta: &Metadata, opts: &SessionOptions) -> Result<MemoryPlan, SessionError> {
        let (context, batch, r) = layout(meta, opts)?;
        let bytes = |range: &Range<usize>| range.len() * F32;
        Ok(MemoryPlan {
            context,
            batch,
            weights: meta.tensors.iter().map(|t| t.len as usize).sum(),
            kv_cache: bytes(&r.k_cache) + bytes(&r.v_cache),
            buffers: r.bufs.iter().map(bytes).sum(),
            scratch: bytes(&r.cos)
                + bytes(&r.sin)
                + bytes(&r.scores)
                + bytes(&r.tiles)
                + bytes(&r.xq),
            logits: bytes(&r.logits),
        })
    }

    /// Bytes of the session's arena (all but the mapped weights).
    pub fn session_bytes(&self) -> usize {
        self.kv_cache + self.buffers + self.scratch + self.logits
    }

    /// Peak bytes: the weights plus the session.
    pub fn total(&self) -> usize {
        self.weights + self.session_bytes()
    }
}
