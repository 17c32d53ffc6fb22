//! One SwiGLU MLP block: gate and up projections of the normed stream, `silu(gate) · up`
//! (the gate being the one under SiLU), and the down projection.

use tract_onnx::prelude::OutletId;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::Mul;
use tract_onnx::tract_core::ops::nn::{Sigmoid, Silu};

use super::layout::{Atom, Factor};
use super::linear::{weight_of, Projection};
use super::view::{Mismatch, Use, Value, View};
use crate::graph::Tensor;

/// An MLP block's weights (Hugging Face layout).
pub struct MlpWeights {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

/// Matches layer `layer`'s MLP on `normed` (its normed input); returns its weights and output
/// (before the residual add).
pub fn mlp(
    view: &View,
    normed: &Value,
    layer: usize,
    hidden: usize,
) -> Result<(MlpWeights, Value), Mismatch> {
    let uses = view.plain_uses(normed)?;
    if let Some(u) = uses.iter().find(|u| weight_of(view, u).is_none()) {
        return Err(view.mismatch(
            u.node,
            "expected only the gate and up projections of the normed input",
        ));
    }
    let [a, b] = uses.as_slice() else {
        return Err(Mismatch::Graph(format!(
            "layer {layer}: expected the MLP's gate and up projections, found {} projections",
            uses.len()
        )));
    };
    let name = |part: &str| format!("model.layers.{layer}.mlp.{part}.weight");
    let features = |u: &Use| -> Result<(Projection, Vec<Factor>), Mismatch> {
        let p = Projection::new(view, u)?;
        let ffn = vec![Factor::new(Atom::Ffn, p.out_features())];
        Ok((p, ffn))
    };
    let ((pa, fa), (pb, fb)) = (features(a)?, features(b)?);
    if fa != fb {
        return Err(view.mismatch(b.node, "the gate and up projections differ in width"));
    }
    // Named once the SiLU tells the gate from the up projection.
    let (wa, va) = pa.matrix(&name("gate_proj|up_proj"), &fa, &[Atom::Hidden])?;
    let (wb, vb) = pb.matrix(&name("gate_proj|up_proj"), &fb, &[Atom::Hidden])?;
    let (gate, (up, up_value), act) = match (silu(view, &va)?, silu(view, &vb)?) {
        (Some(act), None) => (wa, (wb, vb), act),
        (None, Some(act)) => (wb, (wa, va), act),
        _ => {
            return Err(view.mismatch(
                pa.node.max(pb.node),
                "expected SiLU on exactly one of the MLP's two projections",
            ))
        }
    };
    let (gate, up) = (
        rename(gate, &name("gate_proj")),
        rename(up, &name("up_proj")),
    );
    let product = view.single_use(&act, "silu(gate) · up")?;
    let with_up = view.single_use(&up_value, "silu(gate) · up")?;
    if product.node != with_up.node
        || !view.is_bin::<Mul>(product.node)
        || product.slot == with_up.slot
    {
        return Err(view.mismatch(with_up.node, "expected silu(gate) · up in the MLP"));
    }
    let down_use = view.single_use(&product.output(), "down_proj")?;
    let out = [Factor::new(Atom::Hidden, hidden)];
    let (down, out) =
        Projection::new(view, &down_use)?.matrix(&name("down_proj"), &out, &[Atom::Ffn])?;
    Ok((MlpWeights { gate, up, down }, out))
}

/// `silu(v)` when `v` feeds a SiLU (fused, or `v · sigmoid(v)`); `None` when it feeds a
/// product only; an error naming any other activation.
fn silu(view: &View, v: &Value) -> Result<Option<Value>, Mismatch> {
    let uses = view.plain_uses(v)?;
    let activation = |u: &Use| view.node(u.node).op_is::<ElementWiseOp>();
    if let Some(u) = uses.iter().find(|u| {
        activation(u) && !view.is_unary::<Silu>(u.node) && !view.is_unary::<Sigmoid>(u.node)
    }) {
        return Err(view.mismatch(u.node, "expected SiLU (x·sigmoid(x)) in the MLP"));
    }
    match uses.as_slice() {
        [u] if view.is_unary::<Silu>(u.node) => Ok(Some(u.output())),
        [u] if view.is_bin::<Mul>(u.node) => Ok(None),
        [x_mul, s] | [s, x_mul] if view.is_unary::<Sigmoid>(s.node) => {
            let sig = view.single_use(&s.output(), "x · sigmoid(x)")?;
            if sig.node != x_mul.node || !view.is_bin::<Mul>(sig.node) || sig.slot == x_mul.slot {
                return Err(view.mismatch(sig.node, "expected x · sigmoid(x) in the MLP"));
            }
            Ok(Some(Value::new(
                OutletId::new(sig.node, 0),
                v.layout.clone(),
            )))
        }
        _ => Err(view.mismatch(
            uses.first().map_or(v.outlet.node, |u| u.node),
            "expected a gate or up projection of the MLP",
        )),
    }
}

fn rename(t: Tensor, name: &str) -> Tensor {
    Tensor {
        name: name.to_owned(),
        ..t
    }
}
