//! The KV append: `past_key_values.{i}.key|value` (`[batch, kv_heads, past, head_dim]`)
//! concatenated with the new entries along the sequence axis, the result being a graph output
//! (`present.{i}.*`) and the whole cache attention reads.

use tract_onnx::prelude::OutletId;
use tract_onnx::tract_core::ops::array::TypedConcat;

use super::attention::Dims;
use super::layout::{factors, Atom, Layout};
use super::view::{Mismatch, Use, Value, View};

/// The one use of `past_key_values.{layer}.{kind}`: a concatenation along the cache's
/// sequence axis.
pub fn cache_input(view: &View, layer: usize, kind: &str, dims: Dims) -> Result<Use, Mismatch> {
    let name = format!("past_key_values.{layer}.{kind}");
    let outlet = view.source(&name).ok_or_else(|| {
        Mismatch::Graph(format!(
            "input {name} is missing: kiln lowers decoders with the standard KV-cache inputs"
        ))
    })?;
    let shape = view.shape(outlet)?;
    let layout = match shape.as_slice() {
        [b, h, p, dd] if *h == dims.kv_heads.into() && *dd == dims.head_dim.into() => {
            Layout::of(&[
                (Atom::Batch, b.clone()),
                (Atom::KvHead, h.clone()),
                (Atom::Past, p.clone()),
                (Atom::HeadDim, dd.clone()),
            ])
        }
        _ => {
            return Err(view.mismatch(
                outlet.node,
                format!(
                    "expected [batch, {}, past, {}], found {shape:?}",
                    dims.kv_heads, dims.head_dim
                ),
            ))
        }
    };
    let past = Value::new(outlet, layout);
    let u = view.single_use(&past, "the KV-cache append")?;
    let concat = view.node(u.node).op_as::<TypedConcat>();
    if u.slot != 0
        || u.scale != 1.0
        || concat.map(|c| Some(c.axis)) != Some(u.layout.find(Atom::Past))
    {
        return Err(view.mismatch(
            u.node,
            "expected the cache followed by the new entries along its sequence axis",
        ));
    }
    Ok(u)
}

/// The new keys or values `new` appended to the cache at `concat`; returns the whole cache.
pub fn append(view: &View, new: &Value, concat: &Use) -> Result<Value, Mismatch> {
    let u = view.single_use(new, "the KV-cache append")?;
    let seq = u.layout.find(Atom::Seq);
    let past_axis = concat.layout.find(Atom::Past);
    let aligned = seq == past_axis
        && seq.is_some_and(|a| {
            u.layout
                .with_axis(a, Vec::new())
                .same(&concat.layout.with_axis(a, Vec::new()))
        });
    if u.node != concat.node || u.slot != 1 || u.scale != 1.0 || !aligned {
        return Err(view.mismatch(
            u.node,
            "expected the new entries appended to the cache along its sequence axis",
        ));
    }
    let out = OutletId::new(u.node, 0);
    if !view.is_output(out) {
        return Err(view.mismatch(
            u.node,
            "the updated cache is not a graph output (present.*)",
        ));
    }
    let axis = past_axis.unwrap_or_default();
    let total = view.shape(out)?[axis].clone();
    Ok(Value::new(
        out,
        concat
            .layout
            .with_axis(axis, factors(&[(Atom::Keys, total)])),
    ))
}
