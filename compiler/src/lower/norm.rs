//! RMSNorm over the hidden axis, as tract's declutter leaves it: its fused `RmsNorm` op, or
//! the mean of squares, `+ eps`, reciprocal square root and product it is made of; then the
//! learned scale (absent when declutter dropped a product by ones).

use tract_onnx::prelude::OutletId;
use tract_onnx::tract_core::ops::math::{Add, Mul, Recip, Rsqrt, Sqrt};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use super::layout::Atom;
use super::view::{floats, Mismatch, Use, Value, View};

/// A matched RMSNorm.
pub struct Norm {
    /// The learned scale, one value per hidden feature.
    pub weight: Vec<f32>,
    pub eps: f32,
    pub out: Value,
}

/// Finds the RMSNorm of `x` among `uses` (the uses of `x`); returns it and the other uses.
pub fn rms_norm(
    view: &View,
    x: &Value,
    uses: &[Use],
    hidden: usize,
) -> Result<(Norm, Vec<Use>), Mismatch> {
    let axis = x
        .layout
        .find(Atom::Hidden)
        .ok_or_else(|| Mismatch::Graph("the residual stream has no hidden axis".into()))?;
    let (normed, eps, consumed) = match uses.iter().find(|u| is_norm_start(view, u)) {
        Some(u) => normalized(view, u, axis)?,
        None => {
            let node = uses.first().map_or(x.outlet.node, |u| u.node);
            return Err(view.mismatch(node, "expected an RMSNorm of the residual stream"));
        }
    };
    let rest = uses
        .iter()
        .filter(|u| !consumed.contains(&u.node))
        .cloned()
        .collect();
    let (weight, out) = scale(view, &normed, axis, hidden)?;
    Ok((Norm { weight, eps, out }, rest))
}

fn is_norm_start(view: &View, u: &Use) -> bool {
    let node = view.node(u.node);
    node.op_is::<RmsNorm>()
        || node
            .op_as::<Reduce>()
            .is_some_and(|r| r.reducer == Reducer::MeanOfSquares)
}

/// `x / sqrt(mean(x²) + eps)` starting at `u`: its output, eps and the nodes reading `x`.
fn normalized(view: &View, u: &Use, axis: usize) -> Result<(Value, f32, Vec<usize>), Mismatch> {
    if u.scale != 1.0 {
        return Err(view.mismatch(u.node, "RMSNorm of a scaled residual stream"));
    }
    let node = view.node(u.node);
    if let Some(op) = node.op_as::<RmsNorm>() {
        if op.axis != axis {
            return Err(view.mismatch(u.node, "RMSNorm over an axis other than the hidden one"));
        }
        let eps = floats(&op.eps)
            .ok()
            .and_then(|v| v.first().copied())
            .ok_or_else(|| view.mismatch(u.node, "RMSNorm without a float epsilon"))?;
        return Ok((u.output(), eps, vec![u.node]));
    }
    let reduce = node
        .op_as::<Reduce>()
        .ok_or_else(|| view.mismatch(u.node, "expected an RMSNorm"))?;
    if reduce.axes.as_slice() != [axis] {
        return Err(view.mismatch(
            u.node,
            "mean of squares over an axis other than the hidden one",
        ));
    }
    let add = view.single_use(&u.output(), "`+ eps` in RMSNorm")?;
    let eps = view
        .other_input(add.node, add.slot)
        .filter(|_| view.is_bin::<Add>(add.node))
        .and_then(|o| view.scalar(o))
        .ok_or_else(|| view.mismatch(add.node, "expected `+ eps` in RMSNorm"))?;
    let mut step = view.single_use(&add.output(), "a reciprocal square root in RMSNorm")?;
    if view.is_unary::<Sqrt>(step.node) {
        step = view.single_use(&step.output(), "a reciprocal in RMSNorm")?;
        if !view.is_unary::<Recip>(step.node) {
            return Err(view.mismatch(step.node, "expected 1/sqrt in RMSNorm"));
        }
    } else if !view.is_unary::<Rsqrt>(step.node) {
        return Err(view.mismatch(step.node, "expected a reciprocal square root in RMSNorm"));
    }
    let mul = view.single_use(&step.output(), "the product with the input in RMSNorm")?;
    let other = view.other_input(mul.node, mul.slot);
    if !view.is_bin::<Mul>(mul.node) || other != Some(u.input) {
        return Err(view.mismatch(mul.node, "expected x · rsqrt(mean(x²) + eps) in RMSNorm"));
    }
    Ok((
        Value::new(OutletId::new(mul.node, 0), u.layout.clone()),
        eps as f32,
        vec![u.node, mul.node],
    ))
}

/// The learned scale after the normalization, if declutter kept it.
fn scale(
    view: &View,
    normed: &Value,
    axis: usize,
    hidden: usize,
) -> Result<(Vec<f32>, Value), Mismatch> {
    let uses = view.plain_uses(normed)?;
    if let [u] = uses.as_slice() {
        let other = view.other_input(u.node, u.slot);
        if let Some(t) = other.and_then(|o| view.konst(o)) {
            let per_feature = t.rank() == normed.layout.rank()
                && t.shape()
                    .iter()
                    .enumerate()
                    .all(|(i, &d)| d == if i == axis { hidden } else { 1 });
            if view.is_bin::<Mul>(u.node) && per_feature {
                let weight = floats(t).map_err(|e| view.mismatch(u.node, e))?;
                return Ok((weight, u.output()));
            }
        }
    }
    Ok((vec![1.0; hidden], normed.clone()))
}
