//! Attention over the KV cache: stores a batch's keys and values (f32 or f16), then causal
//! grouped-query attention, one (token, head) pair per work item, split across the session's
//! workers when there is enough of it.

use crate::kernels::{Kernels, KvRows};
use crate::model::ModelFacts;

#[cfg(feature = "std")]
use super::parallel::Shared;
use super::parallel::Workers;
use super::KvType;

/// One layer's view of the KV cache (`[layer][kv_head][position][head_dim]`), in its arena
/// regions: f32 values, or f16 bits two to a float.
pub struct KvCache<'c> {
    pub k: &'c mut [f32],
    pub v: &'c mut [f32],
    pub kind: KvType,
    pub context: usize,
    pub layer: usize,
}

/// Below this many multiply-adds (scores and weighted sums) attention runs on the caller.
#[cfg(feature = "std")]
const MIN_PARALLEL_WORK: usize = 1 << 15;

/// One batch's part in attention: `n` tokens from position `pos`, their queries, keys and
/// values (`[token][head][head_dim]`), where the result goes and one context-long row of
/// scores per participant.
pub struct Batch<'b> {
    pub pos: usize,
    pub n: usize,
    pub q: &'b [f32],
    pub k: &'b [f32],
    pub v: &'b [f32],
    pub out: &'b mut [f32],
    pub scores: &'b mut [f32],
}

/// Stores the batch's keys/values at their positions, then attends: `out` gets, for each
/// token `t` and head `h`, the softmax-weighted sum of the values at positions `..=pos + t`.
pub fn attention(
    kernels: &Kernels,
    workers: &Workers,
    f: &ModelFacts,
    cache: KvCache<'_>,
    batch: Batch<'_>,
) {
    let Batch {
        pos,
        n,
        q,
        k,
        v,
        out,
        scores,
    } = batch;
    let (hd, kvh, ctx) = (f.head_dim, f.kv_heads, cache.context);
    let layer = cache.layer * kvh * ctx * hd;
    let (keys, values) = match cache.kind {
        KvType::F32 => {
            for t in 0..n {
                for h in 0..kvh {
                    let (dst, src) = (layer + (h * ctx + pos + t) * hd, (t * kvh + h) * hd);
                    cache.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                    cache.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
            (KvRows::F32(cache.k), KvRows::F32(cache.v))
        }
        KvType::F16 => {
            let kc: &mut [u16] = bytemuck::cast_slice_mut(cache.k);
            let vc: &mut [u16] = bytemuck::cast_slice_mut(cache.v);
            for t in 0..n {
                for h in 0..kvh {
                    let (dst, src) = (layer + (h * ctx + pos + t) * hd, (t * kvh + h) * hd);
                    (kernels.to_f16)(&k[src..src + hd], &mut kc[dst..dst + hd]);
                    (kernels.to_f16)(&v[src..src + hd], &mut vc[dst..dst + hd]);
                }
            }
            (KvRows::F16(kc), KvRows::F16(vc))
        }
    };
    let job = Job {
        kernels,
        heads: f.heads,
        group: f.heads / kvh,
        hd,
        ctx,
        layer,
        pos,
        q,
        keys,
        values,
        scale: 1.0 / libm::sqrtf(hd as f32),
    };
    let items = n * f.heads;
    #[cfg(feature = "std")]
    if let Some(pool) = workers {
        let work = n * f.heads * (pos + n) * hd * 2;
        if work >= MIN_PARALLEL_WORK && items > 1 {
            let (outs, rows_of_scores) = (Shared::new(out), Shared::new(scores));
            let next = core::sync::atomic::AtomicUsize::new(0);
            pool.run(&|i| {
                // SAFETY: each participant index runs at most once per step, so score row `i` is its own.
                let sc = unsafe { rows_of_scores.part(i * ctx..(i + 1) * ctx) };
                loop {
                    let item = next.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
                    if item >= items {
                        return;
                    }
                    // SAFETY: the counter hands each item (its output row) to one participant.
                    let o = unsafe { outs.part(item * hd..(item + 1) * hd) };
                    job.item(item, o, sc);
                }
            });
            return;
        }
    }
    #[cfg(not(feature = "std"))]
    let _ = workers;
    for item in 0..items {
        job.item(
            item,
            &mut out[item * hd..(item + 1) * hd],
            &mut scores[..ctx],
        );
    }
}

/// What every work item of one attention call shares.
struct Job<'a> {
    kernels: &'a Kernels,
    heads: usize,
    group: usize,
    hd: usize,
    ctx: usize,
    layer: usize,
    pos: usize,
    q: &'a [f32],
    keys: KvRows<'a>,
    values: KvRows<'a>,
    scale: f32,
}

impl Job<'_> {
    /// Item `t · heads + h`: token `t`'s head `h` into `out` (`head_dim` long).
    fn item(&self, item: usize, out: &mut [f32], scores: &mut [f32]) {
        let (t, h, hd, k) = (item / self.heads, item % self.heads, self.hd, self.kernels);
        let qv = &self.q[item * hd..(item + 1) * hd];
        let seen = self.pos + t + 1;
        let base = self.layer + (h / self.group) * self.ctx * hd;
        let span = base..base + seen * hd;
        let scores = &mut scores[..seen];
        (k.scores)(qv, rows(self.keys, span.clone()), self.scale, scores);
        (k.softmax)(scores);
        (k.mix)(scores, rows(self.values, span), out);
    }
}

/// Values `span` of a cache.
fn rows(r: KvRows<'_>, span: core::ops::Range<usize>) -> KvRows<'_> {
    match r {
        KvRows::F32(c) => KvRows::F32(&c[span]),
        KvRows::F16(c) => KvRows::F16(&c[span]),
    }
}
