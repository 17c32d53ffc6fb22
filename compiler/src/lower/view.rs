//! Read-only helpers over the decluttered tract graph: constants, interface inputs, and the
//! uses of a value seen through the ops that only move axes, cast or scale it.

use std::collections::HashSet;

use tract_onnx::prelude::{
    DatumType, OutletId, TDim, Tensor as TractTensor, TypedModel, TypedNode,
};
use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::identity::Identity;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::math::{Div, Mul, Neg};

use super::layout::Layout;

/// Why the graph does not match, before the file name is attached.
#[derive(Debug)]
pub enum Mismatch {
    /// A node that does not fit where it sits.
    Node {
        node: String,
        op: String,
        what: String,
    },
    /// Something about the graph as a whole (its interface, a missing part).
    Graph(String),
}

/// A labelled activation: an outlet, what its axes mean, and a constant factor it still
/// carries (scalar multiplications met on the way, which only attention may absorb).
#[derive(Clone, Debug)]
pub struct Value {
    pub outlet: OutletId,
    pub layout: Layout,
    pub scale: f64,
}

impl Value {
    pub fn new(outlet: OutletId, layout: Layout) -> Value {
        Value {
            outlet,
            layout,
            scale: 1.0,
        }
    }
}

/// A node that consumes a value, past any axis moves, casts and scalar factors.
#[derive(Clone, Debug)]
pub struct Use {
    pub node: usize,
    pub slot: usize,
    /// The outlet the node reads (the value itself, or the end of the moves).
    pub input: OutletId,
    pub layout: Layout,
    pub scale: f64,
}

impl Use {
    /// The node's output, labelled like its input.
    pub fn output(&self) -> Value {
        Value::new(OutletId::new(self.node, 0), self.layout.clone())
    }
}

/// The graph being matched.
pub struct View<'m> {
    pub model: &'m TypedModel,
}

impl<'m> View<'m> {
    pub fn node(&self, id: usize) -> &'m TypedNode {
        &self.model.nodes()[id]
    }

    /// An error naming `node` and its op.
    pub fn mismatch(&self, node: usize, what: impl Into<String>) -> Mismatch {
        let n = self.node(node);
        Mismatch::Node {
            node: n.name.clone(),
            op: n.op.name().to_string(),
            what: what.into(),
        }
    }

    /// The constant behind `outlet`, if it is one.
    pub fn konst(&self, outlet: OutletId) -> Option<&'m TractTensor> {
        self.node(outlet.node)
            .op_as::<Const>()
            .map(|c| c.val().as_ref())
    }

    /// The value of a one-element float constant.
    pub fn scalar(&self, outlet: OutletId) -> Option<f64> {
        let t = self.konst(outlet)?;
        if t.len() != 1 || !t.datum_type().is_float() {
            return None;
        }
        floats(t).ok()?.first().map(|&v| f64::from(v))
    }

    /// The interface input called `name`.
    pub fn source(&self, name: &str) -> Option<OutletId> {
        let inputs = self.model.input_outlets().ok()?;
        inputs
            .iter()
            .copied()
            .find(|o| self.node(o.node).name == name)
    }

    /// The shape of `outlet`.
    pub fn shape(&self, outlet: OutletId) -> Result<Vec<TDim>, Mismatch> {
        self.model
            .outlet_fact(outlet)
            .map(|f| f.shape.to_vec())
            .map_err(|e| Mismatch::Graph(format!("{e}")))
    }

    pub fn is_output(&self, outlet: OutletId) -> bool {
        self.model
            .output_outlets()
            .is_ok_and(|outputs| outputs.contains(&outlet))
    }

    /// Every node `outlets` are computed from, themselves included.
    pub fn ancestors(&self, outlets: &[OutletId]) -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut stack: Vec<usize> = outlets.iter().map(|o| o.node).collect();
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(self.node(id).inputs.iter().map(|i| i.node));
            }
        }
        seen
    }

    /// The nodes that consume `value`, seen through axis changes, float casts, broadcasts
    /// and multiplications by scalar constants (whose product the uses carry).
    pub fn uses(&self, value: &Value) -> Result<Vec<Use>, Mismatch> {
        let mut found = Vec::new();
        let mut stack = vec![value.clone()];
        while let Some(v) = stack.pop() {
            for inlet in self.model.outlet_successors(v.outlet) {
                let node = self.node(inlet.node);
                match self.pass_through(node, inlet.slot, &v.layout)? {
                    Some((layout, factor)) => stack.push(Value {
                        outlet: OutletId::new(node.id, 0),
                        layout,
                        scale: v.scale * factor,
                    }),
                    None => found.push(Use {
                        node: node.id,
                        slot: inlet.slot,
                        input: v.outlet,
                        layout: v.layout.clone(),
                        scale: v.scale,
                    }),
                }
            }
        }
        found.sort_by_key(|u| (u.node, u.slot));
        Ok(found)
    }

    /// The uses of `value`, which must be unscaled.
    pub fn plain_uses(&self, value: &Value) -> Result<Vec<Use>, Mismatch> {
        let uses = self.uses(value)?;
        match uses.iter().find(|u| u.scale != 1.0) {
            Some(u) => Err(self.mismatch(
                u.node,
                format!(
                    "its input is scaled by {} here, which kiln does not fold",
                    u.scale
                ),
            )),
            None => Ok(uses),
        }
    }

    /// The one use of `value`, else an error saying what was expected.
    pub fn single_use(&self, value: &Value, what: &str) -> Result<Use, Mismatch> {
        let uses = self.uses(value)?;
        match uses.as_slice() {
            [u] => Ok(u.clone()),
            [] => Err(self.mismatch(
                value.outlet.node,
                format!("its result is not used, expected {what}"),
            )),
            [_, second, ..] => Err(self.mismatch(
                second.node,
                format!("unexpected second use of a value that should only feed {what}"),
            )),
        }
    }

    /// Whether `node` is the binary op `T`.
    pub fn is_bin<T: BinMiniOp>(&self, node: usize) -> bool {
        self.node(node)
            .op_as::<TypedBinOp>()
            .is_some_and(|op| op.0.is::<T>())
    }

    /// Whether `node` is the element-wise op `T`.
    pub fn is_unary<T: ElementWiseMiniOp>(&self, node: usize) -> bool {
        self.node(node)
            .op_as::<ElementWiseOp>()
            .is_some_and(|op| op.0.is::<T>())
    }

    /// The input of `node` other than `slot`, for a binary node.
    pub fn other_input(&self, node: usize, slot: usize) -> Option<OutletId> {
        let inputs = &self.node(node).inputs;
        (inputs.len() == 2 && slot < 2).then(|| inputs[1 - slot])
    }

    /// The layout and scale factor after `node` when it only relabels or scales its input at
    /// `slot`; `None` when it computes something.
    fn pass_through(
        &self,
        node: &TypedNode,
        slot: usize,
        layout: &Layout,
    ) -> Result<Option<(Layout, f64)>, Mismatch> {
        let relabel = |r: Result<Layout, String>| {
            r.map(|l| Some((l, 1.0)))
                .map_err(|e| self.mismatch(node.id, e))
        };
        if let Some(op) = node.op_as::<AxisOp>() {
            return relabel(layout.apply(op));
        }
        if let Some(op) = node.op_as::<MultiBroadcastTo>() {
            return relabel(layout.broadcast(&op.shape));
        }
        if node.op_is::<Identity>() {
            return Ok(Some((layout.clone(), 1.0)));
        }
        if let Some(op) = node.op_as::<Cast>() {
            let from = self
                .model
                .outlet_fact(node.inputs[0])
                .map(|f| f.datum_type)
                .unwrap_or(DatumType::Bool);
            return Ok((from.is_float() && op.to.is_float()).then(|| (layout.clone(), 1.0)));
        }
        if let Some(op) = node.op_as::<ElementWiseOp>() {
            return Ok(op.0.is::<Neg>().then(|| (layout.clone(), -1.0)));
        }
        if let Some(op) = node.op_as::<TypedBinOp>() {
            let other = self.other_input(node.id, slot);
            let Some(c) = other.and_then(|o| self.scalar(o)) else {
                return Ok(None);
            };
            // A scalar of the same rank broadcasts nothing: the output is labelled as the input.
            let same_rank = other
                .and_then(|o| self.konst(o))
                .is_some_and(|t| t.rank() == layout.rank());
            if !same_rank {
                return Ok(None);
            }
            if op.0.is::<Mul>() {
                return Ok(Some((layout.clone(), c)));
            }
            if op.0.is::<Div>() && slot == 0 && c != 0.0 {
                return Ok(Some((layout.clone(), 1.0 / c)));
            }
        }
        Ok(None)
    }
}

/// A float tensor's values as f32.
pub fn floats(t: &TractTensor) -> Result<Vec<f32>, String> {
    let cast = t.cast_to::<f32>().map_err(|e| format!("{e}"))?;
    let view = cast.try_as_plain_ram().map_err(|e| format!("{e}"))?;
    view.as_slice::<f32>()
        .map(<[f32]>::to_vec)
        .map_err(|e| format!("{e}"))
}
