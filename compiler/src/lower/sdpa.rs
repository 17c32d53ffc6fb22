//! The attention core: GQA scores `q·kᵀ` over the head dimension, scaled by `1/√head_dim`
//! (scalar factors anywhere on the way, as SDPA exports split them over q and k), causally
//! masked, softmaxed over the keys, then the weighted sum of the values.

use tract_onnx::prelude::OutletId;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::layout::{self, Atom};
use super::mask::mask;
use super::probe::Sites;
use super::view::{Mismatch, Value, View};

/// Relative tolerance on the product of the scalar factors applied to the scores.
const SCALE_TOLERANCE: f64 = 1e-6;

/// Matches attention of the rotated queries `q` over the whole cache `keys` and `values`;
/// returns the per-head context. The mask is recorded in `sites` for evaluation.
pub fn sdpa(
    view: &View,
    q: &Value,
    keys: &Value,
    values: &Value,
    head_dim: usize,
    sites: &mut Sites,
) -> Result<Value, Mismatch> {
    let (scores_node, scores) = pair(view, q, keys, Atom::HeadDim, "the attention scores")?;
    // A score per head, query and key: q's labels with the head dimension traded for keys.
    let mut expected = q.layout.atoms();
    for atom in expected.iter_mut().filter(|a| **a == Atom::HeadDim) {
        *atom = Atom::Keys;
    }
    if !same_atoms(scores.layout.atoms(), expected) {
        return Err(view.mismatch(
            scores_node,
            "the scores do not span the query and key positions per head",
        ));
    }
    let (masked, site) = mask(view, &view.single_use(&scores, "the attention mask")?)?;
    sites.masks.push(site);
    let soft = view.single_use(&masked, "the softmax")?;
    let keys_axis = soft.layout.find(Atom::Keys);
    let is_softmax = view.node(soft.node).op_as::<Softmax>().is_some_and(|s| {
        s.kind == SoftmaxKind::Softmax && keys_axis.is_some_and(|k| s.axes.as_slice() == [k])
    });
    if !is_softmax {
        return Err(view.mismatch(soft.node, "expected a softmax over the key positions"));
    }
    let scale = 1.0 / (head_dim as f64).sqrt();
    if ((soft.scale - scale) / scale).abs() > SCALE_TOLERANCE {
        return Err(view.mismatch(
            soft.node,
            format!(
                "the scores are scaled by {}, kiln's attention by 1/√{head_dim} = {scale}",
                soft.scale
            ),
        ));
    }
    let probs = soft.output();
    let (_, context) = pair(view, &probs, values, Atom::Keys, "the weighted values")?;
    Ok(context)
}

/// The einsum that combines `a` and `b` (each used only there) summing over `over`; returns
/// it and its labelled output, carrying the product of the inputs' scales.
fn pair(
    view: &View,
    a: &Value,
    b: &Value,
    over: Atom,
    what: &str,
) -> Result<(usize, Value), Mismatch> {
    let ua = view.single_use(a, what)?;
    let ub = view.single_use(b, what)?;
    let Some(op) = view.node(ua.node).op_as::<EinSum>() else {
        return Err(view.mismatch(ua.node, format!("expected a matrix product for {what}")));
    };
    if ua.node != ub.node || ua.slot == ub.slot || view.node(ua.node).inputs.len() != 2 {
        return Err(view.mismatch(ub.node, format!("expected one matrix product for {what}")));
    }
    let (first, second) = if ua.slot == 0 { (&ua, &ub) } else { (&ub, &ua) };
    let c = layout::einsum(&op.axes, &first.layout, &second.layout)
        .map_err(|e| view.mismatch(ua.node, format!("{what}: {e}")))?;
    let summed: Vec<Vec<Atom>> = c
        .contracted
        .iter()
        .map(|a| a.iter().map(|f| f.atom).collect())
        .collect();
    if summed != [vec![over]] {
        return Err(view.mismatch(
            ua.node,
            format!("{what} must sum over {over:?} alone, not {summed:?}"),
        ));
    }
    let mut out = Value::new(OutletId::new(ua.node, 0), c.output);
    out.scale = ua.scale * ub.scale;
    Ok((ua.node, out))
}

/// The same labels, in any order.
fn same_atoms(mut a: Vec<Atom>, mut b: Vec<Atom>) -> bool {
    a.sort_by_key(|x| *x as u8);
    b.sort_by_key(|x| *x as u8);
    a == b
}
