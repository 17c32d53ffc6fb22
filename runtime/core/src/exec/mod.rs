//! The executor: a session walks the artifact's op list over buffers, a KV cache and scratch
//! that all live in one arena, allocated (or handed in by the caller) when the session is created.

mod arena;
mod attention;
mod parallel;
mod plan;
#[cfg(feature = "std")]
mod pool;

use arena::Arena;
pub use plan::MemoryPlan;
use plan::Regions;

use alloc::vec;
use alloc::vec::Vec;

use crate::artifact::{Metadata, Op};
use crate::kernels::q8::{self, Q8Block};
use crate::kernels::q8k::{self, Q8KBlock};
use crate::kernels::{self, Input, Kernels, Matrix};
use crate::model::ModelFacts;
use crate::quant::{BLOCK, SUPER_BLOCK};

/// Floats one [`Q8KBlock`] takes in the activation scratch.
const Q8K_FLOATS: usize = core::mem::size_of::<Q8KBlock>() / core::mem::size_of::<f32>();

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
    /// Worker threads for the matrix products and attention (1 = the calling thread only).
    pub threads: usize,
    /// How the KV cache stores keys and values (native backend; onnxruntime's cache has the
    /// ONNX model's type).
    pub kv_type: KvType,
    /// The kernel table (native backend); `None`: [`Kernels::detect`] (`KILN_KERNELS`, else
    /// the best this CPU runs).
    pub kernels: Option<Kernels>,
}

/// How the KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Half precision, as llama.cpp's default: half the memory and half the bytes each decoded
    /// token reads from the cache.
    #[default]
    F16,
    /// Single precision.
    F32,
}

impl KvType {
    /// Bytes per cached value.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }

    /// The name llama.cpp's `--cache-type-k` uses.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        }
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            context: 0,
            batch: 64,
            logits_all: false,
            threads: 1,
            kv_type: KvType::default(),
            kernels: None,
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
    #[error("the arena holds {given} bytes, the session needs {needed} (plan it with MemoryPlan::session_bytes)")]
    ArenaTooSmall { needed: usize, given: usize },
    #[error(transparent)]
    Kernels(#[from] kernels::LevelError),
    #[error("a context of {context} tokens exceeds the model's {model}")]
    ContextTooLong { context: usize, model: usize },
    #[error("tensor {tensor}: a norm weight must be 4-byte aligned f32")]
    NotF32 { tensor: alloc::string::String },
    #[error("no tokens to run")]
    NoTokens,
    #[error(
        "every token's logits need a session made with logits_all, and at most {batch} tokens"
    )]
    NotLogitsAll { batch: usize },
    #[error("op {op} names buffer {buffer}, but the graph declares {declared}")]
    UnknownBuffer {
        op: usize,
        buffer: usize,
        declared: usize,
    },
    #[error("memory plan: buffers {first} and {second} share arena floats while both are in use at op {op}")]
    PlanOverlap {
        first: alloc::string::String,
        second: alloc::string::String,
        op: usize,
    },
    #[error("the backend failed: {0}")]
    Backend(alloc::string::String),
}

/// A running model: weights borrowed from the artifact, everything else in one arena.
pub struct Session<'a> {
    facts: ModelFacts,
    ops: Vec<Op>,
    tensors: Vec<Matrix<'a>>,
    kernels: Kernels,
    opts: SessionOptions,
    context: usize,
    arena: Arena<'a>,
    regions: Regions,
    workers: parallel::Workers,
    pos: usize,
    /// Block-quantized weights meet f32 activations (see [`Session::set_float_activations`]).
    float_activations: bool,
}

impl<'a> Session<'a> {
    /// Creates a session over `weights` (the artifact's weights section) described by `meta`,
    /// allocating its arena.
    pub fn new(
        meta: &Metadata,
        weights: &'a [u8],
        opts: SessionOptions,
    ) -> Result<Session<'a>, SessionError> {
        let layout = plan::layout(meta, &opts)?;
        let arena = Arena::Owned(vec![0.0; layout.regions.len]);
        Session::build(meta, weights, opts, arena, layout)
    }

    /// Creates a session whose buffers, KV cache and scratch live in `arena`, which the caller
    /// sized with [`MemoryPlan::session_bytes`]; nothing is allocated for them.
    pub fn with_arena(
        meta: &Metadata,
        weights: &'a [u8],
        opts: SessionOptions,
        arena: &'a mut [f32],
    ) -> Result<Session<'a>, SessionError> {
        let layout = plan::layout(meta, &opts)?;
        if arena.len() < layout.regions.len {
            return Err(SessionError::ArenaTooSmall {
                needed: layout.regions.len * core::mem::size_of::<f32>(),
                given: core::mem::size_of_val(arena),
            });
        }
        Session::build(meta, weights, opts, Arena::Borrowed(arena), layout)
    }

    fn build(
        meta: &Metadata,
        weights: &'a [u8],
        opts: SessionOptions,
        arena: Arena<'a>,
        plan::Layout {
            context,
            batch,
            regions,
        }: plan::Layout,
    ) -> Result<Session<'a>, SessionError> {
        let tensors: Vec<Matrix<'a>> = meta
            .tensors
            .iter()
            .map(|e| {
                Matrix::new(
                    e.format,
                    e.layout,
                    e.rows(),
                    e.cols(),
                    crate::artifact::tensor_bytes(weights, e),
                )
            })
            .collect();
        for (m, e) in tensors.iter().zip(&meta.tensors) {
            if e.shape.len() == 1 && m.f32.is_none() {
                return Err(SessionError::NotF32 {
                    tensor: e.name.clone(),
                });
            }
        }
        let kernels = match opts.kernels {
            Some(k) => k,
            None => Kernels::detect()?,
        };
        for e in &meta.tensors {
            kernels.level.check_layout(&e.name, e.layout)?;
        }
        Ok(Session {
            facts: meta.facts.clone(),
            ops: meta.graph.ops.clone(),
            tensors,
            kernels,
            opts: SessionOptions {
                batch,
                threads: opts.threads.max(1),
                ..opts
            },
            context,
            arena,
            regions,
            workers: parallel::workers(opts.threads),
            pos: 0,
            float_activations: false,
        })
    }

    /// With `true`, block-quantized weights are dequantized tile by tile and multiplied against
    /// the f32 activations, as onnxruntime's `MatMulNBits` does at `accuracy_level` 0, instead
    /// of against 8-bit quantized activations as llama.cpp does (the default). Slower; for exact
    /// comparisons with float-activation runtimes. Uses the same scratch, so memory is unchanged.
    pub fn set_float_activations(&mut self, on: bool) {
        self.float_activations = on;
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

    /// Bytes of the arena the session uses (held against [`MemoryPlan::session_bytes`] in tests).
    pub fn allocated_bytes(&self) -> usize {
        self.regions.len * core::mem::size_of::<f32>()
    }

    /// Forgets cached tokens from `pos` on (keeps the prefix for the next turn).
    pub fn rewind(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// How the KV cache stores keys and values.
    pub fn kv_type(&self) -> KvType {
        self.opts.kv_type
    }

    /// The KV cache's keys and values as bytes, each `[layer][kv head][position][head dim]` of
    /// [`Session::kv_type`] over the whole context (a snapshot copies a prefix of positions),
    /// and the count of positions that hold tokens, to set after filling them (at most
    /// [`Session::context`]; the next step checks it).
    pub fn kv_cache_and_position(&mut self) -> ([&mut [u8]; 2], &mut usize) {
        let [k, v] = arena::split(
            self.arena.floats_mut(),
            [self.regions.k_cache.clone(), self.regions.v_cache.clone()],
        );
        (
            [bytemuck::cast_slice_mut(k), bytemuck::cast_slice_mut(v)],
            &mut self.pos,
        )
    }

    /// Most tokens one pass runs; [`Session::forward`] splits longer inputs into passes of
    /// this many.
    pub fn batch(&self) -> usize {
        self.opts.batch
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
        let logits = &self.arena.floats()[self.regions.logits.clone()];
        Ok(&logits[last * vocab..(last + 1) * vocab])
    }

    /// Runs at most `batch` tokens and returns every token's logits (`tokens.len() × vocab`);
    /// needs a session created with `logits_all`.
    pub fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        if !self.opts.logits_all || tokens.len() > self.opts.batch {
            return Err(SessionError::NotLogitsAll {
                batch: self.opts.batch,
            });
        }
        self.check(tokens)?;
        self.run(tokens);
        let logits = &self.arena.floats()[self.regions.logits.clone()];
        Ok(&logits[..tokens.len() * self.facts.vocab_size])
    }

    fn check(&self, tokens: &[u32]) -> Result<(), SessionError> {
        check_tokens(tokens, self.pos, self.context, self.facts.vocab_size)
    }

    fn run(&mut self, tokens: &[u32]) {
        let n = tokens.len();
        let r = &self.regions;
        let arena = self.arena.floats_mut();
        let mut rope_for = None;
        for op in &self.ops {
            match *op {
                Op::Embed { table, out } => {
                    let m = &self.tensors[table];
                    let [buf, tiles] = arena::split(arena, [r.bufs[out].clone(), r.tiles.clone()]);
                    for (t, &id) in tokens.iter().enumerate() {
                        let row = m.rows_f32(id as usize, 1, tiles);
                        buf[t * m.cols..(t + 1) * m.cols].copy_from_slice(row);
                    }
                }
                Op::RmsNorm { input, weight, out } => {
                    let w = self.tensors[weight].f32.unwrap_or(&[]);
                    let width = w.len();
                    let [x, o] = arena::split(arena, [r.bufs[input].clone(), r.bufs[out].clone()]);
                    for t in 0..n {
                        let row = t * width..(t + 1) * width;
                        (self.kernels.rms_norm)(
                            &x[row.clone()],
                            w,
                            self.facts.rms_eps,
                            &mut o[row],
                        );
                    }
                }
                Op::MatMul { input, weight, out } => {
                    let m = &self.tensors[weight];
                    let [x, o, tiles, xq] = arena::split(
                        arena,
                        [
                            r.bufs[input].clone(),
                            r.bufs[out].clone(),
                            r.tiles.clone(),
                            r.xq.clone(),
                        ],
                    );
                    let a = Activations {
                        x: &x[..n * m.cols],
                        n,
                        xq,
                        float: self.float_activations,
                    };
                    matmul(&self.kernels, &self.workers, a, m, o, tiles);
                }
                Op::Rope {
                    buf,
                    heads,
                    inv_freq,
                } => {
                    let hd = self.facts.head_dim;
                    let half = hd / 2;
                    let [x, cos, sin] =
                        arena::split(arena, [r.bufs[buf].clone(), r.cos.clone(), r.sin.clone()]);
                    if rope_for != Some(inv_freq) {
                        rope_table(
                            self.tensors[inv_freq].f32.unwrap_or(&[]),
                            self.pos,
                            n,
                            cos,
                            sin,
                        );
                        rope_for = Some(inv_freq);
                    }
                    for t in 0..n {
                        let (c, s) = (
                            &cos[t * half..(t + 1) * half],
                            &sin[t * half..(t + 1) * half],
                        );
                        kernels::rope(&mut x[t * heads * hd..(t + 1) * heads * hd], hd, c, s);
                    }
                }
                Op::Attention {
                    layer,
                    q,
                    k,
                    v,
                    out,
                } => {
                    let [q, k, v, o, k_cache, v_cache, scores] = arena::split(
                        arena,
                        [
                            r.bufs[q].clone(),
                            r.bufs[k].clone(),
                            r.bufs[v].clone(),
                            r.bufs[out].clone(),
                            r.k_cache.clone(),
                            r.v_cache.clone(),
                            r.scores.clone(),
                        ],
                    );
                    let kv = attention::KvCache {
                        k: k_cache,
                        v: v_cache,
                        kind: self.opts.kv_type,
                        context: self.context,
                        layer,
                    };
                    let batch = attention::Batch {
                        pos: self.pos,
                        n,
                        q,
                        k,
                        v,
                        out: o,
                        scores,
                    };
                    attention::attention(&self.kernels, &self.workers, &self.facts, kv, batch);
                }
                Op::SwiGlu { gate, up, out } => {
                    let width = r.bufs[gate].len() / self.opts.batch;
                    let [g, u, o] = arena::split(
                        arena,
                        [
                            r.bufs[gate].clone(),
                            r.bufs[up].clone(),
                            r.bufs[out].clone(),
                        ],
                    );
                    (self.kernels.swiglu)(&g[..n * width], &u[..n * width], &mut o[..n * width]);
                }
                Op::Add { acc, input } => {
                    let [a, x] = arena::split(arena, [r.bufs[acc].clone(), r.bufs[input].clone()]);
                    for (a, b) in a.iter_mut().zip(x.iter()) {
                        *a += b;
                    }
                }
                Op::Logits { input, weight } => {
                    let m = &self.tensors[weight];
                    let (first, count) = if self.opts.logits_all {
                        (0, n)
                    } else {
                        (n - 1, 1)
                    };
                    let [x, logits, tiles, xq] = arena::split(
                        arena,
                        [
                            r.bufs[input].clone(),
                            r.logits.clone(),
                            r.tiles.clone(),
                            r.xq.clone(),
                        ],
                    );
                    let rows = &x[first * m.cols..(first + count) * m.cols];
                    let a = Activations {
                        x: rows,
                        n: count,
                        xq,
                        float: self.float_activations,
                    };
                    matmul(&self.kernels, &self.workers, a, m, logits, tiles);
                }
            }
        }
        self.pos += n;
    }
}

/// Whether `tokens` can run after `pos` cached ones in a `context`-token cache: not empty,
/// fitting, and every id inside the vocabulary (shared by every backend `kiln-engine` drives).
pub fn check_tokens(
    tokens: &[u32],
    pos: usize,
    context: usize,
    vocab: usize,
) -> Result<(), SessionError> {
    if tokens.is_empty() {
        return Err(SessionError::NoTokens);
    }
    let needed = pos + tokens.len();
    if needed > context {
        return Err(SessionError::ContextFull { needed, context });
    }
    match tokens.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(SessionError::BadToken { id, vocab }),
        None => Ok(()),
    }
}

/// The activations of one product: `n` tokens of `x`, and the scratch they are quantized into
/// for block-quantized weights, as llama.cpp does, unless `float` (see
/// [`Session::set_float_activations`]).
struct Activations<'x> {
    x: &'x [f32],
    n: usize,
    xq: &'x mut [f32],
    float: bool,
}

/// `out = x · mᵀ` for the activations' tokens.
fn matmul(
    k: &Kernels,
    workers: &parallel::Workers,
    Activations { x, n, xq, float }: Activations<'_>,
    m: &Matrix<'_>,
    out: &mut [f32],
    tiles: &mut [f32],
) {
    let input = if q8::uses_q8(m.format) && !float {
        let blocks = n * m.cols / BLOCK;
        let xq: &mut [Q8Block] = bytemuck::cast_slice_mut(xq);
        (k.quantize)(x, &mut xq[..blocks]);
        Input::Q8(&xq[..blocks])
    } else if q8k::uses_q8k(m.format) && !float {
        let blocks = n * m.cols / SUPER_BLOCK;
        let xq: &mut [Q8KBlock] = bytemuck::cast_slice_mut(&mut xq[..blocks * Q8K_FLOATS]);
        (k.quantize_q8k)(&x[..n * m.cols], xq);
        Input::Q8K(xq)
    } else {
        Input::F32(x)
    };
    parallel::matmul(k, workers, input, n, m, out, tiles);
}

/// cos/sin of each batch token's position (from `pos`) times each inverse frequency.
fn rope_table(freqs: &[f32], pos: usize, n: usize, cos: &mut [f32], sin: &mut [f32]) {
    let half = freqs.len();
    for t in 0..n {
        let p = (pos + t) as f64;
        for (i, &f) in freqs.iter().enumerate() {
            let angle = p * f64::from(f);
            cos[t * half + i] = libm::cos(angle) as f32;
            sin[t * half + i] = libm::sin(angle) as f32;
        }
    }
}
