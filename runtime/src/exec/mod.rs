//! The executor: a session walks the artifact's op list over buffers and a KV cache that are
//! allocated once, when the session is created.

mod parallel;
mod plan;

pub use plan::MemoryPlan;

use alloc::vec;
use alloc::vec::Vec;

use crate::artifact::{Metadata, Op};
use crate::kernels::q8::{self, Q8Block};
use crate::kernels::{self, Input, Kernels, Matrix, TILE_ROWS};
use crate::model::ModelFacts;
use crate::quant::BLOCK;

/// Context used when the caller does not choose one (llama.cpp's default too), capped by the model's.
pub const DEFAULT_CONTEXT: usize = 4096;

/// How a session is sized.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Tokens of context (KV cache length); 0 = the smaller of the model's and [`DEFAULT_CONTEXT`].
    pub context: usize,
    /// Most tokens processed in one pass; longer inputs are split.
    pub batch: usize,
    /// Keep the logits of every token of a pass (perplexity), not only the last.
    pub logits_all: bool,
    /// Worker threads for the matrix products (1 = the calling thread only).
    pub threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            context: 0,
            batch: 64,
            logits_all: false,
            threads: 1,
        }
    }
}

/// Why a step could not run.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SessionError {
    #[error("context full: {needed} tokens do not fit the {context}-token context (shorten the prompt or raise --ctx)")]
    ContextFull { needed: usize, context: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("{0}")]
    Setup(alloc::string::String),
}

/// A running model: weights borrowed from the artifact, everything else owned and preallocated.
pub struct Session<'a> {
    facts: ModelFacts,
    ops: Vec<Op>,
    tensors: Vec<Matrix<'a>>,
    kernels: Kernels,
    opts: SessionOptions,
    context: usize,
    bufs: Vec<Vec<f32>>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    scores: Vec<f32>,
    scratch: Vec<f32>,
    /// Activations quantized for block-quantized weights.
    xq: Vec<Q8Block>,
    logits: Vec<f32>,
    pos: usize,
}

impl<'a> Session<'a> {
    /// Creates a session over `weights` (the artifact's weights section) described by `meta`.
    pub fn new(
        meta: &Metadata,
        weights: &'a [u8],
        opts: SessionOptions,
    ) -> Result<Session<'a>, SessionError> {
        let plan = MemoryPlan::new(meta, &opts)?;
        let facts = meta.facts.clone();
        let (context, batch) = (plan.context, plan.batch);
        let threads = opts.threads.max(1);
        let tensors: Vec<Matrix<'a>> = meta
            .tensors
            .iter()
            .map(|e| {
                Matrix::new(
                    e.format,
                    e.rows(),
                    e.cols(),
                    crate::artifact::tensor_bytes(weights, e),
                )
            })
            .collect();
        for (m, e) in tensors.iter().zip(&meta.tensors) {
            if e.shape.len() == 1 && m.f32.is_none() {
                return Err(SessionError::Setup(alloc::format!(
                    "tensor {} is not 4-byte aligned f32",
                    e.name
                )));
            }
        }
        let max_cols = tensors.iter().map(|m| m.cols).max().unwrap_or(0);
        let kv = facts.layers * facts.kv_heads * context * facts.head_dim;
        let half = facts.head_dim / 2;
        let logit_rows = if opts.logits_all { batch } else { 1 };
        Ok(Session {
            ops: meta.graph.ops.clone(),
            bufs: meta
                .graph
                .buffers
                .iter()
                .map(|b| vec![0.0; b.width * batch])
                .collect(),
            k_cache: vec![0.0; kv],
            v_cache: vec![0.0; kv],
            cos: vec![0.0; batch * half],
            sin: vec![0.0; batch * half],
            scores: vec![0.0; context],
            scratch: vec![0.0; threads * TILE_ROWS * max_cols],
            xq: vec![Q8Block::default(); batch * max_cols.div_ceil(BLOCK)],
            logits: vec![0.0; logit_rows * facts.vocab_size],
            kernels: Kernels::detect(),
            tensors,
            facts,
            context,
            opts: SessionOptions {
                batch,
                threads,
                ..opts
            },
            pos: 0,
        })
    }

    /// Tokens already in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The KV cache length.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn facts(&self) -> &ModelFacts {
        &self.facts
    }

    /// Name of the kernel table in use.
    pub fn kernels_name(&self) -> &'static str {
        self.kernels.name
    }

    /// Bytes this session allocated (buffers, KV cache, scratch, logits), counted from the
    /// buffers themselves so a test can hold it against [`MemoryPlan::session_bytes`].
    pub fn allocated_bytes(&self) -> usize {
        let floats = self.bufs.iter().map(Vec::len).sum::<usize>()
            + self.k_cache.len()
            + self.v_cache.len()
            + self.cos.len()
            + self.sin.len()
            + self.scores.len()
            + self.scratch.len()
            + self.logits.len();
        floats * core::mem::size_of::<f32>() + self.xq.len() * core::mem::size_of::<Q8Block>()
    }

    /// Forgets cached tokens from `pos` on (keeps the prefix for the next turn).
    pub fn rewind(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// Runs `tokens` after the cached ones and returns the last token's logits.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        self.check(tokens)?;
        for chunk in tokens.chunks(self.opts.batch) {
            self.run(chunk);
        }
        let vocab = self.facts.vocab_size;
        let last = if self.opts.logits_all {
            (tokens.len() - 1) % self.opts.batch
        } else {
            0
        };
        Ok(&self.logits[last * vocab..(last + 1) * vocab])
    }

    /// Runs at most `batch` tokens and returns every token's logits (`tokens.len() × vocab`);
    /// needs a session created with `logits_all`.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        if !self.opts.logits_all || tokens.len() > self.opts.batch {
            return Err(SessionError::Setup(alloc::format!(
                "forward_all needs logits_all and at most {} tokens",
                self.opts.batch
            )));
        }
        self.check(tokens)?;
        self.run(tokens);
        Ok(&self.logits[..tokens.len() * self.facts.vocab_size])
    }

    fn check(&self, tokens: &[u32]) -> Result<(), SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::Setup("no tokens to run".into()));
        }
        let needed = self.pos + tokens.len();
        if needed > self.context {
            return Err(SessionError::ContextFull {
                needed,
                context: self.context,
            });
        }
        if let Some(&id) = tokens
            .iter()
            .find(|&&id| id as usize >= self.facts.vocab_size)
        {
            return Err(SessionError::BadToken {
                id,
                vocab: self.facts.vocab_size,
            });
        }
        Ok(())
    }

    fn run(&mut self, tokens: &[u32]) {
        let n = tokens.len();
        let mut rope_for = None;
        for i in 0..self.ops.len() {
            match self.ops[i] {
                Op::Embed { table, out } => {
                    let m = self.tensors[table];
                    let buf = &mut self.bufs[out];
                    for (t, &id) in tokens.iter().enumerate() {
                        let row = m.rows_f32(id as usize, 1, &mut self.scratch);
                        buf[t * m.cols..(t + 1) * m.cols].copy_from_slice(row);
                    }
                }
                Op::RmsNorm { input, weight, out } => {
                    let w = self.tensors[weight].f32.unwrap_or(&[]);
                    let width = w.len();
                    let x = core::mem::take(&mut self.bufs[input]);
                    let o = &mut self.bufs[out];
                    for t in 0..n {
                        let r = t * width..(t + 1) * width;
                        kernels::rms_norm(&x[r.clone()], w, self.facts.rms_eps, &mut o[r]);
                    }
                    self.bufs[input] = x;
                }
                Op::MatMul { input, weight, out } => {
                    let m = self.tensors[weight];
                    let x = core::mem::take(&mut self.bufs[input]);
                    let mut o = core::mem::take(&mut self.bufs[out]);
                    self.matmul(&x[..n * m.cols], n, &m, &mut o);
                    self.bufs[input] = x;
                    self.bufs[out] = o;
                }
                Op::Rope {
                    buf,
                    heads,
                    inv_freq,
                } => {
                    if rope_for != Some(inv_freq) {
                        self.rope_table(inv_freq, n);
                        rope_for = Some(inv_freq);
                    }
                    let hd = self.facts.head_dim;
                    let half = hd / 2;
                    let x = &mut self.bufs[buf];
                    for t in 0..n {
                        let c = &self.cos[t * half..(t + 1) * half];
                        let s = &self.sin[t * half..(t + 1) * half];
                        kernels::rope(&mut x[t * heads * hd..(t + 1) * heads * hd], hd, c, s);
                    }
                }
                Op::Attention {
                    layer,
                    q,
                    k,
                    v,
                    out,
                } => self.attention(layer, n, [q, k, v, out]),
                Op::SwiGlu { gate, up, out } => {
                    let width = self.bufs[gate].len() / self.opts.batch;
                    let g = core::mem::take(&mut self.bufs[gate]);
                    let u = core::mem::take(&mut self.bufs[up]);
                    let mut o = core::mem::take(&mut self.bufs[out]);
                    kernels::swiglu(&g[..n * width], &u[..n * width], &mut o[..n * width]);
                    self.bufs[gate] = g;
                    self.bufs[up] = u;
                    self.bufs[out] = o;
                }
                Op::Add { acc, input } => {
                    let x = core::mem::take(&mut self.bufs[input]);
                    for (a, b) in self.bufs[acc].iter_mut().zip(&x) {
                        *a += b;
                    }
                    self.bufs[input] = x;
                }
                Op::Logits { input, weight } => {
                    let m = self.tensors[weight];
                    let x = core::mem::take(&mut self.bufs[input]);
                    let (first, count) = if self.opts.logits_all {
                        (0, n)
                    } else {
                        (n - 1, 1)
                    };
                    let mut logits = core::mem::take(&mut self.logits);
                    self.matmul(
                        &x[first * m.cols..(first + count) * m.cols],
                        count,
                        &m,
                        &mut logits,
                    );
                    self.logits = logits;
                    self.bufs[input] = x;
                }
            }
        }
        self.pos += n;
    }

    /// `out = x · mᵀ` for `n` tokens; block-quantized weights see 8-bit activations, as in llama.cpp.
    fn matmul(&mut self, x: &[f32], n: usize, m: &Matrix<'_>, out: &mut [f32]) {
        let input = if q8::uses_q8(m.format) {
            let blocks = n * m.cols / BLOCK;
            q8::quantize(x, &mut self.xq[..blocks]);
            Input::Q8(&self.xq[..blocks])
        } else {
            Input::F32(x)
        };
        parallel::matmul(
            &self.kernels,
            self.opts.threads,
            input,
            n,
            m,
            out,
            &mut self.scratch,
        );
    }

    /// cos/sin of each batch token's position times each inverse frequency.
    fn rope_table(&mut self, inv_freq: usize, n: usize) {
        let freqs = self.tensors[inv_freq].f32.unwrap_or(&[]);
        let half = freqs.len();
        for t in 0..n {
            let p = (self.pos + t) as f64;
            for (i, &f) in freqs.iter().enumerate() {
                let angle = p * f64::from(f);
                self.cos[t * half + i] = libm::cos(angle) as f32;
                self.sin[t * half + i] = libm::sin(angle) as f32;
            }
        }
    }

    /// Stores this batch's keys/values at their positions, then causal grouped-query attention.
    fn attention(&mut self, layer: usize, n: usize, [q, k, v, out]: [usize; 4]) {
        let f = &self.facts;
        let (hd, kvh, heads) = (f.head_dim, f.kv_heads, f.heads);
        let group = heads / kvh;
        let ctx = self.context;
        let layer_base = layer * kvh * ctx * hd;
        for t in 0..n {
            let p = self.pos + t;
            for h in 0..kvh {
                let dst = layer_base + (h * ctx + p) * hd;
                let src = (t * kvh + h) * hd;
                self.k_cache[dst..dst + hd].copy_from_slice(&self.bufs[k][src..src + hd]);
                self.v_cache[dst..dst + hd].copy_from_slice(&self.bufs[v][src..src + hd]);
            }
        }
        let scale = 1.0 / libm::sqrtf(hd as f32);
        let mut o = core::mem::take(&mut self.bufs[out]);
        let qb = &self.bufs[q];
        for t in 0..n {
            let seen = self.pos + t + 1;
            for h in 0..heads {
                let qv = &qb[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                let base = layer_base + (h / group) * ctx * hd;
                let scores = &mut self.scores[..seen];
                for (j, s) in scores.iter_mut().enumerate() {
                    *s = (self.kernels.dot)(qv, &self.k_cache[base + j * hd..base + (j + 1) * hd])
                        * scale;
                }
                kernels::softmax(scores);
                let ov = &mut o[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                ov.fill(0.0);
                for (j, &w) in scores.iter().enumerate() {
                    let vv = &self.v_cache[base + j * hd..base + (j + 1) * hd];
                    for (a, &b) in ov.iter_mut().zip(vv) {
                        *a += w * b;
                    }
                }
            }
        }
        self.bufs[out] = o;
    }
}
