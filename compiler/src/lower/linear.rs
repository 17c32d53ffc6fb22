//! A projection: an einsum of a labelled activation with one constant weight, read back as a
//! Hugging Face `[out_features, in_features]` matrix whatever axis order the graph stores.

use ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::OutletId;
use tract_onnx::tract_core::ops::change_axes::InOut;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::layout::{concrete, product, split, Atom, Axis, Factor, Layout};
use super::view::{floats, Mismatch, Use, Value, View};
use crate::graph::Tensor;

/// An einsum of an activation with a constant, before its output features are named.
pub struct Projection<'v, 'm> {
    view: &'v View<'m>,
    pub node: usize,
    /// The constant weight's node.
    pub weight_node: usize,
    weight_shape: Vec<usize>,
    /// Per weight axis: the activation's label when summed over, `None` for an output axis.
    weight_axes: Vec<Option<Axis>>,
    outputs: Vec<OutAxis>,
}

/// Where an output axis of a projection comes from.
#[derive(Clone)]
enum OutAxis {
    /// An activation axis the weight does not touch (batch, sequence), with its label.
    Input(Axis),
    /// An axis of the weight: output features.
    Weight(usize),
}

/// The constant input of `u`'s einsum, when it is a projection of the used value.
pub fn weight_of(view: &View, u: &Use) -> Option<usize> {
    let node = view.node(u.node);
    node.op_as::<EinSum>()?;
    let other = view.other_input(u.node, u.slot)?;
    view.konst(other).map(|_| other.node)
}

impl<'v, 'm> Projection<'v, 'm> {
    /// Reads the einsum at `u`; errors unless it multiplies the used value by a constant,
    /// summing exactly over the activation's axes that the weight has.
    pub fn new(view: &'v View<'m>, u: &Use) -> Result<Projection<'v, 'm>, Mismatch> {
        let node = view.node(u.node);
        let (Some(op), Some(weight_node)) = (node.op_as::<EinSum>(), weight_of(view, u)) else {
            return Err(view.mismatch(u.node, "expected a projection by a constant weight"));
        };
        if u.scale != 1.0 || op.q_params.is_some() {
            return Err(view.mismatch(u.node, "a scaled or quantized projection"));
        }
        let bad = |what: String| view.mismatch(u.node, what);
        let weight = view
            .konst(OutletId::new(weight_node, 0))
            .ok_or_else(|| bad("the weight is not a constant".into()))?;
        let weight_shape = weight.shape().to_vec();
        let (x_slot, w_slot) = (u.slot, 1 - u.slot);
        let mut weight_axes = vec![None; weight_shape.len()];
        // An output axis from neither input has size 1.
        let mut outputs = vec![OutAxis::Input(Vec::new()); op.axes.rank(InOut::Out(0))];
        for axis in op.axes.iter_all_axes() {
            let one = |p: &[usize]| match p {
                [] => Ok(None),
                [i] => Ok(Some(*i)),
                _ => Err(bad(format!("axis {} repeats", axis.repr))),
            };
            let x = one(&axis.inputs[x_slot])?;
            let w = one(&axis.inputs[w_slot])?;
            let o = one(&axis.outputs[0])?;
            let label = x.and_then(|p| u.layout.axes.get(p).cloned());
            let w_size = w.map_or(1, |p| weight_shape[p]);
            match (label, w, o) {
                // A size-1 activation axis the weight widens: an output feature axis.
                (Some(l), Some(wp), Some(op)) if l.is_empty() && w_size > 1 => {
                    outputs[op] = OutAxis::Weight(wp)
                }
                (Some(l), Some(wp), None) => {
                    if product(&l) != w_size.into() {
                        return Err(bad(format!("weight axis {wp} does not match the input")));
                    }
                    weight_axes[wp] = Some(l);
                }
                (Some(l), None, Some(op)) if !l.iter().any(|f| is_feature(f.atom)) => {
                    outputs[op] = OutAxis::Input(l)
                }
                (None, Some(wp), Some(op)) => outputs[op] = OutAxis::Weight(wp),
                (Some(l), _, _) if l.is_empty() => {}
                (None, Some(_), None) if w_size == 1 => {}
                (None, None, Some(_)) => {}
                _ => {
                    return Err(bad(format!(
                        "axis {} is not a projection's (input {x:?}, weight {w:?}, output {o:?})",
                        axis.repr
                    )))
                }
            }
        }
        Ok(Projection {
            view,
            node: u.node,
            weight_node,
            weight_shape,
            weight_axes,
            outputs,
        })
    }

    /// How many output features the weight makes.
    pub fn out_features(&self) -> usize {
        self.weight_outputs()
            .iter()
            .map(|&wp| self.weight_shape[wp])
            .product()
    }

    /// The weight axes that are output axes, in output order.
    fn weight_outputs(&self) -> Vec<usize> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                OutAxis::Weight(wp) => Some(*wp),
                OutAxis::Input(_) => None,
            })
            .collect()
    }

    /// The weight as `[out, in]`: output features named `out` (outer to inner, in the order the
    /// einsum's output lists them), input features in the order `inputs` names them. Also the
    /// einsum's output, labelled.
    pub fn matrix(
        &self,
        name: &str,
        out: &[Factor],
        inputs: &[Atom],
    ) -> Result<(Tensor, Value), Mismatch> {
        let bad = |what: String| self.view.mismatch(self.node, what);
        let out_axes = self.weight_outputs();
        let sizes: Vec<_> = out_axes
            .iter()
            .map(|&wp| self.weight_shape[wp].into())
            .collect();
        let named = split(out, &sizes).map_err(|e| {
            bad(format!(
                "{} output features cannot be {name}'s: {e}",
                self.out_features()
            ))
        })?;
        let mut weight_axes = self.weight_axes.clone();
        for (&wp, axis) in out_axes.iter().zip(&named) {
            weight_axes[wp] = Some(axis.clone());
        }
        // Every factor of the weight, in storage order, with its meaning.
        let mut dims = Vec::new();
        let mut atoms = Vec::new();
        for (wp, axis) in weight_axes.iter().enumerate() {
            for f in axis.iter().flatten() {
                let size = concrete(&f.size).ok_or_else(|| {
                    bad(format!("weight axis {wp} is labelled with a symbolic size"))
                })?;
                dims.push(size);
                atoms.push(f.atom);
            }
        }
        let order: Vec<Atom> = out
            .iter()
            .map(|f| f.atom)
            .chain(inputs.iter().copied())
            .collect();
        let mut perm = Vec::with_capacity(order.len());
        for atom in &order {
            match atoms.iter().position(|a| a == atom) {
                Some(p) if !perm.contains(&p) => perm.push(p),
                _ => {
                    return Err(bad(format!(
                        "{name}: expected the weight to map {inputs:?} to {:?}, it maps {atoms:?}",
                        out.iter().map(|f| f.atom).collect::<Vec<_>>()
                    )))
                }
            }
        }
        if perm.len() != atoms.len() {
            return Err(bad(format!("{name}: the weight has extra axes {atoms:?}")));
        }
        let weight = self
            .view
            .konst(OutletId::new(self.weight_node, 0))
            .ok_or_else(|| bad("the weight is not a constant".into()))?;
        let values = floats(weight).map_err(|e| bad(format!("{name}: {e}")))?;
        let array = ArrayD::from_shape_vec(IxDyn(&dims), values)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        let rows: usize = out_axes.iter().map(|&wp| self.weight_shape[wp]).product();
        let cols = array.len() / rows.max(1);
        let ordered: Vec<f32> = array
            .permuted_axes(IxDyn(&perm))
            .as_standard_layout()
            .iter()
            .copied()
            .collect();
        let tensor = Tensor::from_f32(name, vec![rows, cols], &ordered);

        let mut named = named.into_iter();
        let axes = self
            .outputs
            .iter()
            .map(|o| match o {
                OutAxis::Input(label) => label.clone(),
                OutAxis::Weight(_) => named.next().unwrap_or_default(),
            })
            .collect();
        let value = Value::new(OutletId::new(self.node, 0), Layout { axes });
        Ok((tensor, value))
    }
}

/// Labels only a weight can produce: an activation axis carrying one must be summed over.
fn is_feature(atom: Atom) -> bool {
    !matches!(atom, Atom::Batch | Atom::Seq)
}
