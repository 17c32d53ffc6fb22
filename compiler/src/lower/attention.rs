//! One attention block: q/k/v projections of the normed stream (told apart by which cache
//! they reach), RoPE on q and k, the KV append, GQA attention and `o_proj`.

use std::collections::{HashSet, VecDeque};

use tract_onnx::prelude::OutletId;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::kv_cache::{append, cache_input};
use super::layout::{factors, Atom, Factor};
use super::linear::{weight_of, Projection};
use super::probe::Sites;
use super::rope::rope;
use super::sdpa::sdpa;
use super::view::{Mismatch, Use, Value, View};
use crate::graph::Tensor;

/// The sizes every layer shares, known from the embedding and the KV-cache inputs.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub hidden: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// An attention block's weights (Hugging Face layout) and query head count.
pub struct AttentionWeights {
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub heads: usize,
}

/// Matches layer `layer`'s attention on `normed` (its normed input); returns its weights and
/// output (before the residual add).
pub fn attention(
    view: &View,
    normed: &Value,
    layer: usize,
    dims: Dims,
    sites: &mut Sites,
) -> Result<(AttentionWeights, Value), Mismatch> {
    let concat_k = cache_input(view, layer, "key", dims)?;
    let concat_v = cache_input(view, layer, "value", dims)?;
    let [q, k, v] = roles(view, normed, layer, [concat_k.node, concat_v.node])?;

    let name = |part: &str| format!("model.layers.{layer}.self_attn.{part}.weight");
    let (kv, d) = (dims.kv_heads, dims.head_dim);
    let q = Projection::new(view, &q)?;
    let group = q.out_features() / (kv * d);
    if group == 0 || q.out_features() != group * kv * d {
        return Err(view.mismatch(
            q.node,
            format!(
                "{} query features are not a multiple of {kv} KV heads × {d}",
                q.out_features()
            ),
        ));
    }
    let heads = [
        (Atom::KvHead, kv.into()),
        (Atom::Rep, group.into()),
        (Atom::HeadDim, d.into()),
    ];
    let kv_factors = factors(&[(Atom::KvHead, kv.into()), (Atom::HeadDim, d.into())]);
    let (wq, qv) = q.matrix(&name("q_proj"), &factors(&heads), &[Atom::Hidden])?;
    let (wk, kv_) =
        Projection::new(view, &k)?.matrix(&name("k_proj"), &kv_factors, &[Atom::Hidden])?;
    let (wv, vv) =
        Projection::new(view, &v)?.matrix(&name("v_proj"), &kv_factors, &[Atom::Hidden])?;

    let (q_rot, q_site) = rope(view, &qv, d)?;
    let (k_rot, k_site) = rope(view, &kv_, d)?;
    sites.ropes.extend([q_site, k_site]);
    let keys = append(view, &k_rot, &concat_k)?;
    let values = append(view, &vv, &concat_v)?;

    let context = sdpa(view, &q_rot, &keys, &values, d, sites)?;
    let o = view.single_use(&context, "o_proj")?;
    let in_atoms: Vec<Atom> = factors(&heads).iter().map(|f| f.atom).collect();
    let hidden = [Factor::new(Atom::Hidden, dims.hidden)];
    let (wo, out) = Projection::new(view, &o)?.matrix(&name("o_proj"), &hidden, &in_atoms)?;
    Ok((
        AttentionWeights {
            wq,
            wk,
            wv,
            wo,
            heads: kv * group,
        },
        out,
    ))
}

/// The q, k and v projections of `normed`, told apart by which cache append (`caches`: key,
/// value) they feed: k the key cache, v the value cache, q neither.
fn roles(
    view: &View,
    normed: &Value,
    layer: usize,
    caches: [usize; 2],
) -> Result<[Use; 3], Mismatch> {
    let uses = view.plain_uses(normed)?;
    let projections: Vec<&Use> = uses
        .iter()
        .filter(|u| weight_of(view, u).is_some())
        .collect();
    if let Some(u) = uses.iter().find(|u| weight_of(view, u).is_none()) {
        return Err(view.mismatch(
            u.node,
            "expected only the q, k and v projections of the normed input",
        ));
    }
    let [a, b, c] = projections.as_slice() else {
        return Err(Mismatch::Graph(format!(
            "layer {layer}: expected separate q, k and v projections, found {} projections",
            projections.len()
        )));
    };
    let role = |u: &Use| {
        (
            reaches(view, u.node, caches[0]),
            reaches(view, u.node, caches[1]),
        )
    };
    let (mut q, mut k, mut v) = (None, None, None);
    for u in [a, b, c] {
        let slot = match role(u) {
            (false, false) => &mut q,
            (true, false) => &mut k,
            (false, true) => &mut v,
            (true, true) => {
                return Err(view.mismatch(
                    u.node,
                    "this projection feeds both the key and the value cache",
                ))
            }
        };
        if slot.replace((*u).clone()).is_some() {
            return Err(view.mismatch(u.node, "cannot tell this projection's role (q, k or v)"));
        }
    }
    match (q, k, v) {
        (Some(q), Some(k), Some(v)) => Ok([q, k, v]),
        _ => Err(view.mismatch(a.node, "cannot tell the q, k and v projections apart")),
    }
}

/// Whether `target` is computed from `from`, not looking past other projections.
fn reaches(view: &View, from: usize, target: usize) -> bool {
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([from]);
    while let Some(id) = queue.pop_front() {
        if id == target {
            return true;
        }
        let node = view.node(id);
        let projection = id != from
            && node.op_is::<EinSum>()
            && node.inputs.iter().any(|i| view.konst(*i).is_some());
        if !seen.insert(id) || projection {
            continue;
        }
        for o in 0..node.outputs.len() {
            queue.extend(
                view.model
                    .outlet_successors(OutletId::new(id, o))
                    .iter()
                    .map(|i| i.node),
            );
        }
    }
    false
}
