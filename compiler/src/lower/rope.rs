//! Rotate-half RoPE: `x·cos + concat(-x[half:], x[:half])·sin` over the head dimension, with
//! `cos`/`sin` tables computed from the positions, whose values are checked on sample steps.

use tract_onnx::prelude::{OutletId, Tensor as TractTensor};
use tract_onnx::tract_core::ops::array::{Slice, TypedConcat};
use tract_onnx::tract_core::ops::math::{Add, Mul};

use super::layout::{concrete, factors, Atom, Layout};
use super::plane::Plane;
use super::probe::Step;
use super::view::{Mismatch, Use, Value, View};

/// Where a RoPE reads its tables, to be evaluated once the whole graph is matched.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeSite {
    pub cos: OutletId,
    pub sin: OutletId,
    /// The labels of the rotated value, which the tables broadcast against.
    pub layout: Layout,
    /// The node that completes the rotation, for errors.
    pub node: usize,
}

/// Matches the RoPE applied to `x`; returns the rotated value and its tables.
pub fn rope(view: &View, x: &Value, head_dim: usize) -> Result<(Value, RopeSite), Mismatch> {
    let uses = view.plain_uses(x)?;
    let first = uses.first().map_or(x.outlet.node, |u| u.node);
    let expect = |what: &str| view.mismatch(first, format!("expected rotate-half RoPE: {what}"));
    let input = uses
        .first()
        .map(|u| u.input)
        .ok_or_else(|| expect("the projection is unused"))?;
    if uses.iter().any(|u| u.input != input) || uses.len() != 3 {
        return Err(expect("x·cos and two halves of x"));
    }
    let layout = uses[0].layout.clone();
    let axis = layout
        .find(Atom::HeadDim)
        .ok_or_else(|| expect("no head-dimension axis"))?;
    let half = head_dim / 2;

    let mut cos = None;
    let mut halves = [None, None];
    for u in &uses {
        let node = view.node(u.node);
        if let Some(slice) = node.op_as::<Slice>() {
            let bounds = (concrete(&slice.start), concrete(&slice.end));
            let which = match bounds {
                (Some(0), Some(e)) if e == half => 1,
                (Some(s), Some(e)) if s == half && e == head_dim => 0,
                _ => return Err(view.mismatch(u.node, "expected a half of the head dimension")),
            };
            if slice.axis != axis || halves[which].is_some() {
                return Err(view.mismatch(u.node, "expected a half of the head dimension"));
            }
            halves[which] = Some(u.clone());
        } else if view.is_bin::<Mul>(u.node) {
            cos = Some((u.node, view.other_input(u.node, u.slot)));
        } else {
            return Err(view.mismatch(u.node, "expected rotate-half RoPE"));
        }
    }
    let (Some((cos_mul, Some(cos))), [Some(high), Some(low)]) = (cos, halves) else {
        return Err(expect("x·cos and two halves of x"));
    };

    // concat(-x[half:], x[:half]) along the head dimension.
    let half_layout = layout.with_axis(axis, factors(&[(Atom::HalfDim, half.into())]));
    let to_concat = |h: &Use, sign: f64| -> Result<Use, Mismatch> {
        let v = Value::new(OutletId::new(h.node, 0), half_layout.clone());
        let u = view.single_use(&v, "the rotated halves' concatenation")?;
        let cat = view.node(u.node).op_as::<TypedConcat>();
        if u.scale != sign || cat.is_none_or(|c| c.axis != axis) {
            return Err(view.mismatch(u.node, "expected concat(-x[half:], x[:half])"));
        }
        Ok(u)
    };
    let (neg, pos) = (to_concat(&high, -1.0)?, to_concat(&low, 1.0)?);
    if neg.node != pos.node || (neg.slot, pos.slot) != (0, 1) {
        return Err(view.mismatch(pos.node, "expected concat(-x[half:], x[:half])"));
    }
    let rotated = Value::new(OutletId::new(neg.node, 0), layout.clone());
    let sin_use = view.single_use(&rotated, "a product with the sine table")?;
    let sin = view
        .other_input(sin_use.node, sin_use.slot)
        .filter(|_| view.is_bin::<Mul>(sin_use.node) && sin_use.scale == 1.0)
        .ok_or_else(|| view.mismatch(sin_use.node, "expected rotate_half(x)·sin"))?;

    // x·cos + rotate_half(x)·sin
    let add_cos = view.single_use(
        &Value::new(OutletId::new(cos_mul, 0), layout.clone()),
        "RoPE's sum",
    )?;
    let add_sin = view.single_use(&sin_use.output(), "RoPE's sum")?;
    if add_cos.node != add_sin.node || !view.is_bin::<Add>(add_cos.node) || add_cos.scale != 1.0 {
        return Err(view.mismatch(add_sin.node, "expected x·cos + rotate_half(x)·sin"));
    }
    for table in [cos, sin] {
        if view.shape(table)?.len() != layout.rank() {
            return Err(view.mismatch(add_cos.node, "RoPE tables of another rank than x"));
        }
    }
    let site = RopeSite {
        cos,
        sin,
        layout: layout.clone(),
        node: add_cos.node,
    };
    Ok((Value::new(OutletId::new(add_cos.node, 0), layout), site))
}

/// Tolerance on a table entry: f32 angles `p·f` for the sample positions, then cos / sin.
const TABLE_TOLERANCE: f64 = 1e-4;

/// The `cos` and `sin` tables of `site` evaluated on `step`, as `[seq, head_dim]` planes.
pub struct Tables {
    cos: Plane<f32>,
    sin: Plane<f32>,
    past: usize,
}

impl Tables {
    pub fn read(
        site: &RopeSite,
        (cos, sin): (&TractTensor, &TractTensor),
        step: Step,
        head_dim: usize,
    ) -> Result<Tables, String> {
        let axes = match (site.layout.find(Atom::Seq), site.layout.find(Atom::HeadDim)) {
            (Some(s), Some(d)) => (s, d),
            _ => return Err("the rotated value has no sequence or head-dimension axis".into()),
        };
        let plane = |t: &TractTensor| {
            let t = t.cast_to::<f32>().map_err(|e| format!("{e}"))?;
            Plane::of(&t, axes, (step.seq, head_dim))
        };
        Ok(Tables {
            cos: plane(cos)?,
            sin: plane(sin)?,
            past: step.past,
        })
    }

    /// The inverse frequency of each rotated pair: the angle at position 1.
    pub fn frequencies(&self) -> Result<Vec<f64>, String> {
        let row = 1usize
            .checked_sub(self.past)
            .filter(|&r| r < self.cos.rows)
            .ok_or("the sample step does not hold position 1")?;
        let half = self.cos.cols / 2;
        Ok((0..half)
            .map(|j| f64::from(self.sin.at(row, j)).atan2(f64::from(self.cos.at(row, j))))
            .collect())
    }

    /// Checks that the tables are `cos(p·f)` and `sin(p·f)`, the pair's frequency repeated
    /// over both halves of the head dimension.
    pub fn check(&self, freqs: &[f64]) -> Result<(), String> {
        let half = freqs.len();
        for s in 0..self.cos.rows {
            let p = (self.past + s) as f64;
            for j in 0..self.cos.cols {
                let angle = p * freqs[j % half];
                let (c, si) = (f64::from(self.cos.at(s, j)), f64::from(self.sin.at(s, j)));
                if (c - angle.cos()).abs() > TABLE_TOLERANCE
                    || (si - angle.sin()).abs() > TABLE_TOLERANCE
                {
                    return Err(format!(
                        "at position {p}, index {j}: cos {c}, sin {si}, not a rotation by {angle}"
                    ));
                }
            }
        }
        Ok(())
    }
}
