//! The memory a session will use, computed from the artifact and the options alone, before
//! anything is allocated: one arena with a fixed offset for every buffer, cache and scratch.
//!
//! Activation buffers share the arena by lifetime. Over one pass of the op list a buffer holds
//! values during intervals, each from the op that writes a value to the last op that reads it
//! (an op that updates a buffer in place, `Rope` or `Add`, extends its interval); a value read
//! before the pass writes it comes from the previous pass, so that buffer holds it throughout.
//! Two buffers may take the same floats only when none of their intervals meet. They are
//! placed largest first, each in the smallest gap that the buffers it meets leave free, else
//! after them (greedy by size, best fit). Before a session uses the placement it is checked
//! against the op list by an independent backward liveness pass, so a planner bug is an error
//! at session creation, never a value overwritten while still needed.

use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;
use core::ops::Range;

use crate::artifact::{BufId, Graph, Metadata, Op};
use crate::kernels;
use crate::kernels::q8::Q8Block;
use crate::quant::BLOCK;

use super::{SessionError, SessionOptions, DEFAULT_CONTEXT};

/// Resident bytes of the `kiln` process that neither the model's tensors nor its tokenizer
/// explain: the binary's code and data as far as they are touched, the C library and loader,
/// thread stacks, the parsed metadata and the allocator's own pages. Firmware that embeds the
/// runtime core has its own, smaller, figure.
//
// Nothing in the artifact says how large the binary is, so this is measured, once: in
// `/proc/PID/smaps` of `kiln run` (release build with line tables, x86-64 Linux, glibc) the
// binary has 4.3-4.9 MB resident, the shared libraries 2.0 MB, the stack 0.1 MB; fitting
// `base + k × tokenizer section` to the whole measured overhead (peak RSS less the rest of the
// plan) of SmolLM2 (0.62 MB section: 17.1-17.3 MB over f32, q8_0, q4_0, q4_1) and of a
// Llama 3-vocabulary checkpoint (2.29 MB section: 46.2 MB) gives base 6.5 MB, k 17.4. Worker
// threads moved the peak by under 0.3 MB from 1 to 8. Both constants are rounded up, so the
// prediction errs by about a megabyte on the safe side.
pub const PROCESS_BASE: usize = 7_000_000;

/// Resident bytes per byte of the artifact's tokenizer section: the section itself (mapped and
/// read once) and the tables the runtime decodes from it (id → bytes, bytes → id, merge ranks,
/// special tokens, the pre-tokenizer); see [`PROCESS_BASE`] for how it was measured.
pub const TOKENIZER_RESIDENT_PER_BYTE: usize = 18;

/// Bytes by purpose; everything but `weights` and `overhead` lives in the session's one arena.
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
    /// Activation buffers of the op list, `batch` tokens each, packed by their lifetimes.
    pub buffers: usize,
    /// What the activation buffers would take each in a region of its own.
    pub buffers_sum: usize,
    /// RoPE tables, attention scores, dequantized weight tiles, quantized activations.
    pub scratch: usize,
    pub logits: usize,
    /// The process around the session: [`PROCESS_BASE`], plus the tokenizer once
    /// [`MemoryPlan::with_tokenizer`] has said how large it is.
    pub overhead: usize,
}

/// Where each part of the session lies in the arena, in f32 units.
#[derive(Clone, Debug)]
pub(super) struct Regions {
    pub bufs: Vec<Range<usize>>,
    /// Floats from the start of the arena that the packed buffers take.
    pub bufs_len: usize,
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

/// Inclusive intervals of op indices during which a buffer holds a value still to be read.
type Lifetime = Vec<(usize, usize)>;

/// The buffers `op` reads, and the one it writes (`Rope` and `Add` write one they read).
fn accesses(op: &Op) -> ([Option<BufId>; 3], Option<BufId>) {
    match *op {
        Op::Embed { out, .. } => ([None; 3], Some(out)),
        Op::RmsNorm { input, out, .. } | Op::MatMul { input, out, .. } => {
            ([Some(input), None, None], Some(out))
        }
        Op::Rope { buf, .. } => ([Some(buf), None, None], Some(buf)),
        Op::Attention { q, k, v, out, .. } => ([Some(q), Some(k), Some(v)], Some(out)),
        Op::SwiGlu { gate, up, out } => ([Some(gate), Some(up), None], Some(out)),
        Op::Add { acc, input } => ([Some(acc), Some(input), None], Some(acc)),
        Op::Logits { input, .. } => ([Some(input), None, None], None),
    }
}

/// Every buffer id `graph`'s ops name must exist (the artifact reader checks it too; plans are
/// also made from metadata the compiler builds in memory).
fn check_ids(graph: &Graph) -> Result<(), SessionError> {
    for (i, op) in graph.ops.iter().enumerate() {
        let (reads, write) = accesses(op);
        if let Some(b) = reads
            .into_iter()
            .flatten()
            .chain(write)
            .find(|&b| b >= graph.buffers.len())
        {
            return Err(SessionError::UnknownBuffer {
                op: i,
                buffer: b,
                declared: graph.buffers.len(),
            });
        }
    }
    Ok(())
}

/// Each buffer's lifetime over one pass of `graph`'s op list (ids already checked).
fn lifetimes(graph: &Graph) -> Vec<Lifetime> {
    let n = graph.buffers.len();
    let mut done: Vec<Lifetime> = vec![Vec::new(); n];
    let mut open: Vec<Option<(usize, usize)>> = vec![None; n];
    let mut carried = vec![false; n];
    for (i, op) in graph.ops.iter().enumerate() {
        let (reads, write) = accesses(op);
        for b in reads.into_iter().flatten() {
            match &mut open[b] {
                Some((_, last)) => *last = i,
                None => {
                    carried[b] = true;
                    open[b] = Some((0, i));
                }
            }
        }
        if let Some(w) = write.filter(|w| !reads.contains(&Some(*w))) {
            done[w].extend(open[w].take());
            open[w] = Some((i, i));
        }
    }
    let last = graph.ops.len().saturating_sub(1);
    for (b, lifetime) in done.iter_mut().enumerate() {
        lifetime.extend(open[b].take());
        if carried[b] {
            *lifetime = vec![(0, last)];
        }
    }
    done
}

fn meet(a: &Lifetime, b: &Lifetime) -> bool {
    a.iter()
        .any(|&(s, e)| b.iter().any(|&(t, f)| s <= f && t <= e))
}

/// Offsets for buffers of `sizes` floats with `lifetimes`: largest first, each in the smallest
/// gap between the placed buffers whose lifetimes meet its own, else after all of them.
/// Returns the regions and the floats they span from 0.
fn pack(sizes: &[usize], lifetimes: &[Lifetime]) -> (Vec<Range<usize>>, usize) {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&b| (Reverse(sizes[b]), b));
    let mut regions = vec![0..0; sizes.len()];
    let mut placed: Vec<usize> = Vec::with_capacity(sizes.len());
    let mut len = 0;
    for b in order {
        let size = sizes[b];
        let mut taken: Vec<Range<usize>> = placed
            .iter()
            .filter(|&&p| meet(&lifetimes[b], &lifetimes[p]))
            .map(|&p| regions[p].clone())
            .collect();
        taken.sort_by_key(|r| r.start);
        let (mut end, mut best) = (0, None::<(usize, usize)>);
        for r in &taken {
            if r.start >= end + size {
                let gap = r.start - end;
                if best.is_none_or(|(g, _)| gap < g) {
                    best = Some((gap, end));
                }
            }
            end = end.max(r.end);
        }
        let offset = best.map_or(end, |(_, at)| at);
        regions[b] = offset..offset + size;
        len = len.max(offset + size);
        placed.push(b);
    }
    (regions, len)
}

/// Checks `regions` against `graph` by backward liveness, independently of [`lifetimes`]: at
/// every op, the buffers it touches and those holding a value read later (in this pass or,
/// past its end, in the next) must lie in pairwise disjoint floats.
fn check(graph: &Graph, regions: &[Range<usize>]) -> Result<(), SessionError> {
    let n = graph.buffers.len();
    let mut live = vec![false; n];
    // The first sweep finds the values a pass reads before writing (carried from the previous
    // pass); the second starts from them and checks.
    for sweep in 0..2 {
        for (i, op) in graph.ops.iter().enumerate().rev() {
            let (reads, write) = accesses(op);
            if sweep == 1 {
                let mut held = live.clone();
                for b in reads.into_iter().flatten().chain(write) {
                    held[b] = true;
                }
                let mut ids: Vec<usize> = (0..n)
                    .filter(|&b| held[b] && !regions[b].is_empty())
                    .collect();
                ids.sort_by_key(|&b| regions[b].start);
                if let Some(pair) = ids
                    .windows(2)
                    .find(|w| regions[w[0]].end > regions[w[1]].start)
                {
                    let name = |b: usize| graph.buffers[b].name.clone();
                    return Err(SessionError::PlanOverlap {
                        first: name(pair[0]),
                        second: name(pair[1]),
                        op: i,
                    });
                }
            }
            if let Some(w) = write {
                live[w] = false;
            }
            for b in reads.into_iter().flatten() {
                live[b] = true;
            }
        }
    }
    Ok(())
}

/// How a session of given options over given metadata is laid out.
pub(super) struct Layout {
    /// Tokens of context the KV cache holds.
    pub context: usize,
    /// Most tokens per pass.
    pub batch: usize,
    /// Where each buffer, the KV cache and the scratch lie in the arena.
    pub regions: Regions,
}

/// The layout of a session of `opts` over `meta`.
pub(super) fn layout(meta: &Metadata, opts: &SessionOptions) -> Result<Layout, SessionError> {
    let f = &meta.facts;
    let context = match opts.context {
        0 => f.context_length.min(DEFAULT_CONTEXT),
        c => c,
    };
    if context > f.context_length {
        return Err(SessionError::ContextTooLong {
            context,
            model: f.context_length,
        });
    }
    let batch = opts.batch.max(1);
    let max_cols = meta.tensors.iter().map(|t| t.cols()).max().unwrap_or(0);
    let graph = &meta.graph;
    check_ids(graph)?;
    let sizes: Vec<usize> = graph.buffers.iter().map(|b| b.width * batch).collect();
    let (bufs, bufs_len) = pack(&sizes, &lifetimes(graph));
    check(graph, &bufs)?;
    let mut end = bufs_len;
    let mut take = |floats: usize| {
        end += floats;
        end - floats..end
    };
    let kv = (f.layers * f.kv_heads * context * f.head_dim * opts.kv_type.bytes()).div_ceil(4);
    let regions = Regions {
        bufs,
        bufs_len,
        k_cache: take(kv),
        v_cache: take(kv),
        cos: take(batch * (f.head_dim / 2)),
        sin: take(batch * (f.head_dim / 2)),
        scores: take(opts.threads.max(1) * context),
        tiles: take(opts.threads.max(1) * kernels::scratch_floats(max_cols, batch)),
        xq: take(batch * max_cols.div_ceil(BLOCK) * Q8_FLOATS),
        logits: take(if opts.logits_all { batch } else { 1 } * f.vocab_size),
        len: 0,
    };
    Ok(Layout {
        context,
        batch,
        regions: Regions {
            len: end,
            ..regions
        },
    })
}

impl MemoryPlan {
    /// Plans a session of `opts` over the artifact described by `meta`; the overhead counts the
    /// process without its tokenizer, which the metadata does not describe (see
    /// [`MemoryPlan::with_tokenizer`]).
    pub fn new(meta: &Metadata, opts: &SessionOptions) -> Result<MemoryPlan, SessionError> {
        let Layout {
            context,
            batch,
            regions: r,
        } = layout(meta, opts)?;
        let bytes = |range: &Range<usize>| range.len() * F32;
        Ok(MemoryPlan {
            context,
            batch,
            weights: meta.tensors.iter().map(|t| t.len as usize).sum(),
            kv_cache: bytes(&r.k_cache) + bytes(&r.v_cache),
            buffers: r.bufs_len * F32,
            buffers_sum: r.bufs.iter().map(bytes).sum(),
            scratch: bytes(&r.cos)
                + bytes(&r.sin)
                + bytes(&r.scores)
                + bytes(&r.tiles)
                + bytes(&r.xq),
            logits: bytes(&r.logits),
            overhead: PROCESS_BASE,
        })
    }

    /// This plan with the overhead of a tokenizer section of `tokenizer_bytes` (the artifact's
    /// tokenizer section, `Artifact::tokenizer_bytes`, or the compiler's encoding of it).
    pub fn with_tokenizer(self, tokenizer_bytes: usize) -> MemoryPlan {
        MemoryPlan {
            overhead: PROCESS_BASE + tokenizer_bytes * TOKENIZER_RESIDENT_PER_BYTE,
            ..self
        }
    }

    /// Bytes of the session's arena (all but the mapped weights and the process overhead).
    pub fn session_bytes(&self) -> usize {
        self.kv_cache + self.buffers + self.scratch + self.logits
    }

    /// Peak resident bytes: the weights, the session and the process overhead.
    pub fn total(&self) -> usize {
        self.weights + self.session_bytes() + self.overhead
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::BufferDecl;
    use alloc::string::ToString;

    fn graph(widths: &[usize], ops: Vec<Op>) -> Graph {
        Graph {
            buffers: widths
                .iter()
                .enumerate()
                .map(|(i, &width)| BufferDecl {
                    name: alloc::format!("b{i}"),
                    width,
                })
                .collect(),
            ops,
        }
    }

    /// A Llama decoder's op list in the compiler's order, with its ten buffers (residual
    /// stream, normed, q, k, v, attention, projected, gate, up, activated).
    fn llama(layers: usize, d: usize, q: usize, kv: usize, ffn: usize) -> Graph {
        let (x, xn, bq, bk, bv, att, proj, gate, up, act) = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9);
        let mut ops = vec![Op::Embed { table: 0, out: x }];
        let mm = |input, out| Op::MatMul {
            input,
            weight: 0,
            out,
        };
        let norm = |out| Op::RmsNorm {
            input: x,
            weight: 0,
            out,
        };
        for layer in 0..layers {
            ops.extend([norm(xn), mm(xn, bq), mm(xn, bk), mm(xn, bv)]);
            for buf in [bq, bk] {
                ops.push(Op::Rope {
                    buf,
                    heads: 1,
                    inv_freq: 0,
                });
            }
            ops.extend([
                Op::Attention {
                    layer,
                    q: bq,
                    k: bk,
                    v: bv,
                    out: att,
                },
                mm(att, proj),
                Op::Add {
                    acc: x,
                    input: proj,
                },
                norm(xn),
                mm(xn, gate),
                mm(xn, up),
                Op::SwiGlu { gate, up, out: act },
                mm(act, proj),
                Op::Add {
                    acc: x,
                    input: proj,
                },
            ]);
        }
        ops.extend([
            norm(xn),
            Op::Logits {
                input: xn,
                weight: 0,
            },
        ]);
        graph(&[d, d, q, kv, kv, q, d, ffn, ffn, ffn], ops)
    }

    /// Runs `passes` passes of `graph` over an arena laid out by `regions`, stamping every float
    /// a write touches with the id of the value written; every read must find its buffer's
    /// last value intact. This models the executor directly, independently of both
    /// [`lifetimes`] and [`check`]. Returns the first clobbered read.
    fn clobbered(graph: &Graph, regions: &[Range<usize>], passes: usize) -> Option<(usize, BufId)> {
        let len = regions.iter().map(|r| r.end).max().unwrap_or(0);
        let mut arena = vec![0u32; len];
        let mut value = vec![0u32; graph.buffers.len()];
        let mut next = 1;
        for _ in 0..passes {
            for (i, op) in graph.ops.iter().enumerate() {
                let (reads, write) = accesses(op);
                for b in reads.into_iter().flatten() {
                    if arena[regions[b].clone()].iter().any(|&s| s != value[b]) {
                        return Some((i, b));
                    }
                }
                if let Some(w) = write {
                    value[w] = next;
                    arena[regions[w].clone()].fill(next);
                    next += 1;
                }
            }
        }
        None
    }

    /// Floats live at once at the busiest op: no placement can use fewer.
    fn lower_bound(graph: &Graph, sizes: &[usize]) -> usize {
        let lifetimes = lifetimes(graph);
        (0..graph.ops.len())
            .map(|i| {
                (0..sizes.len())
                    .filter(|&b| lifetimes[b].iter().any(|&(s, e)| s <= i && i <= e))
                    .map(|b| sizes[b])
                    .sum()
            })
            .max()
            .unwrap_or(0)
    }

    /// A deterministic xorshift generator, enough for random op lists.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        /// `k` distinct buffer ids below `n` (`k ≤ n`).
        fn distinct<const K: usize>(&mut self, n: usize) -> [BufId; K] {
            let mut ids = [0; K];
            for i in 0..K {
                ids[i] = loop {
                    let b = self.below(n);
                    if !ids[..i].contains(&b) {
                        break b;
                    }
                };
            }
            ids
        }
    }

    /// Random ops over `n ≥ 4` buffers: every kind, buffers distinct within an op as the
    /// artifact reader requires; buffers may be read before any write.
    fn random_graph(rng: &mut Rng, n: usize, ops: usize) -> Graph {
        let widths: Vec<usize> = (0..n).map(|_| 1 + rng.below(9)).collect();
        let ops = (0..ops)
            .map(|_| match rng.below(8) {
                0 => Op::Embed {
                    table: 0,
                    out: rng.below(n),
                },
                1 => {
                    let [input, out] = rng.distinct(n);
                    Op::RmsNorm {
                        input,
                        weight: 0,
                        out,
                    }
                }
                2 | 3 => {
                    let [input, out] = rng.distinct(n);
                    Op::MatMul {
                        input,
                        weight: 0,
                        out,
                    }
                }
                4 => Op::Rope {
                    buf: rng.below(n),
                    heads: 1,
                    inv_freq: 0,
                },
                5 => {
                    let [q, k, v, out] = rng.distinct(n);
                    Op::Attention {
                        layer: 0,
                        q,
                        k,
                        v,
                        out,
                    }
                }
                6 => {
                    let [gate, up, out] = rng.distinct(n);
                    Op::SwiGlu { gate, up, out }
                }
                _ => {
                    let [acc, input] = rng.distinct(n);
                    Op::Add { acc, input }
                }
            })
            .collect();
        graph(&widths, ops)
    }

    #[test]
    fn smollm2_shaped_buffers_share_the_arena_without_clobbering() {
        // SmolLM2-135M: 30 layers, 576 wide, 9 × 64 query and 3 × 64 key/value, 1536 MLP.
        let g = llama(30, 576, 576, 192, 1536);
        for batch in [1, 64] {
            let sizes: Vec<usize> = g.buffers.iter().map(|b| b.width * batch).collect();
            let (regions, len) = pack(&sizes, &lifetimes(&g));
            assert_eq!(check(&g, &regions), Ok(()));
            assert_eq!(clobbered(&g, &regions, 2), None);
            // The busiest op is SwiGlu: residual stream + gate + up + activated.
            assert_eq!(len, (576 + 3 * 1536) * batch);
            assert_eq!(len, lower_bound(&g, &sizes));
            assert_eq!(sizes.iter().sum::<usize>(), 7872 * batch);
            // The residual stream is live all along: nothing may share its floats.
            for b in 1..sizes.len() {
                assert!(
                    regions[b].end <= regions[0].start || regions[0].end <= regions[b].start,
                    "{} overlaps the residual stream",
                    g.buffers[b].name
                );
            }
        }
    }

    #[test]
    fn the_residual_stream_lives_across_layers() {
        let g = llama(2, 8, 8, 4, 16);
        let lifetimes = lifetimes(&g);
        // From the embedding to the final norm, which is the op before the output head.
        assert_eq!(lifetimes[0], vec![(0, g.ops.len() - 2)]);
        // `normed` is written four times (two per layer) and once for the output head.
        assert_eq!(lifetimes[1].len(), 5);
        // The MLP's `gate` lives from its MatMul to the SwiGlu, once per layer.
        assert_eq!(lifetimes[7], vec![(11, 13), (26, 28)]);
    }

    #[test]
    fn random_op_lists_never_clobber_a_live_buffer() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut packed, mut separate) = (0, 0);
        for case in 0..500 {
            let n = 4 + rng.below(12);
            let ops = 1 + rng.below(60);
            let g = random_graph(&mut rng, n, ops);
            let sizes: Vec<usize> = g.buffers.iter().map(|b| b.width).collect();
            let (regions, len) = pack(&sizes, &lifetimes(&g));
            assert_eq!(check(&g, &regions), Ok(()), "case {case}: {g:?}");
            assert_eq!(clobbered(&g, &regions, 3), None, "case {case}: {g:?}");
            assert!(len >= lower_bound(&g, &sizes), "case {case}");
            assert!(len <= sizes.iter().sum(), "case {case}");
            packed += len;
            separate += sizes.iter().sum::<usize>();
        }
        assert!(packed < separate, "{packed} floats packed vs {separate}");
    }

    #[test]
    fn a_placement_that_reuses_live_floats_is_caught() {
        let g = llama(2, 8, 8, 4, 16);
        let sizes: Vec<usize> = g.buffers.iter().map(|b| b.width).collect();
        let (mut regions, _) = pack(&sizes, &lifetimes(&g));
        // `q` moved onto `k`'s floats: both are read by the same Attention.
        regions[2] = regions[3].start..regions[3].start + sizes[2];
        let e = check(&g, &regions).expect_err("q and k overlap");
        let message = e.to_string();
        assert!(
            message.contains("b2") && message.contains("b3"),
            "{message}"
        );
        assert!(clobbered(&g, &regions, 1).is_some());
        // Everything at offset 0: the residual stream is clobbered by the first write.
        let stacked: Vec<Range<usize>> = sizes.iter().map(|&s| 0..s).collect();
        assert!(check(&g, &stacked).is_err());
        assert!(clobbered(&g, &stacked, 1).is_some());
    }

    #[test]
    fn a_value_carried_to_the_next_pass_stays_live() {
        // b0 is read before it is written: the value comes from the previous pass, so b0 holds
        // it from its write at op 1 through the end and the start of the next pass.
        let g = graph(
            &[4, 4, 4],
            vec![
                Op::MatMul {
                    input: 0,
                    weight: 0,
                    out: 1,
                },
                Op::MatMul {
                    input: 1,
                    weight: 0,
                    out: 0,
                },
                Op::Embed { table: 0, out: 2 },
                Op::Logits {
                    input: 2,
                    weight: 0,
                },
            ],
        );
        let lifetimes = lifetimes(&g);
        assert_eq!(lifetimes[0], vec![(0, 3)]);
        let (regions, len) = pack(&[4, 4, 4], &lifetimes);
        assert_eq!(len, 8);
        assert_eq!(clobbered(&g, &regions, 3), None);
        // Sharing b0 with b2 would lose the carried value.
        let shared = vec![regions[0].clone(), regions[1].clone(), regions[0].clone()];
        assert!(check(&g, &shared).is_err());
        assert!(clobbered(&g, &shared, 2).is_some());
    }

    #[test]
    fn an_op_naming_a_missing_buffer_is_an_error() {
        let g = graph(&[4], vec![Op::Embed { table: 0, out: 3 }]);
        let e = check_ids(&g).expect_err("buffer 3 of 1");
        assert!(e.to_string().contains("buffer 3"), "{e}");
    }
}
