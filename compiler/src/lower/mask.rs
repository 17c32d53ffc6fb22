//! The attention mask between the scores and the softmax: a select (`Where`) against a large
//! negative fill, or an added float mask. Its values are checked on sample steps to be
//! causal, which is the only mask kiln's attention applies.

use tract_onnx::prelude::{OutletId, Tensor as TractTensor};
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::math::Add;

use super::layout::{Atom, Layout};
use super::plane::Plane;
use super::probe::Step;
use super::view::{floats, Mismatch, Use, Value, View};

/// A masked score at or below this is never attended to (−inf, `f32::MIN`, −1e9 all are).
const MASKED: f32 = -1e4;

/// How the mask is applied.
#[derive(Clone, Debug)]
enum Kind {
    /// `Where(cond, scores, fill)` (`allowed` true) or `Where(cond, fill, scores)`.
    Select {
        cond: OutletId,
        fill: OutletId,
        allowed: bool,
    },
    /// `scores + mask`.
    Additive { mask: OutletId },
}

/// A matched mask, to be evaluated once the whole graph is matched.
#[derive(Clone, Debug)]
pub struct MaskSite {
    pub node: usize,
    layout: Layout,
    kind: Kind,
}

/// Matches the mask applied to the scores at `u`; returns the masked scores.
pub fn mask(view: &View, u: &Use) -> Result<(Value, MaskSite), Mismatch> {
    let node = view.node(u.node);
    let kind = if node.op_is::<Iff>() && (u.slot == 1 || u.slot == 2) {
        Kind::Select {
            cond: node.inputs[0],
            fill: node.inputs[3 - u.slot],
            allowed: u.slot == 1,
        }
    } else if view.is_bin::<Add>(u.node) {
        let mask = view
            .other_input(u.node, u.slot)
            .ok_or_else(|| view.mismatch(u.node, "expected a mask added to the scores"))?;
        Kind::Additive { mask }
    } else {
        return Err(view.mismatch(
            u.node,
            "expected a causal mask on the attention scores (Where or Add)",
        ));
    };
    let mut masked = u.output();
    masked.scale = u.scale;
    let site = MaskSite {
        node: u.node,
        layout: u.layout.clone(),
        kind,
    };
    Ok((masked, site))
}

impl MaskSite {
    /// The graph values the check needs.
    pub fn outlets(&self) -> Vec<OutletId> {
        match self.kind {
            Kind::Select { cond, fill, .. } => vec![cond, fill],
            Kind::Additive { mask } => vec![mask],
        }
    }

    /// Checks that `values` (of [`MaskSite::outlets`] on `step`) let query `s` see exactly
    /// the keys up to its own position.
    pub fn check(&self, values: &[TractTensor], step: Step) -> Result<(), String> {
        let axes = match (self.layout.find(Atom::Seq), self.layout.find(Atom::Keys)) {
            (Some(s), Some(k)) => (s, k),
            _ => return Err("the scores have no query or key axis".into()),
        };
        let total = step.past + step.seq;
        let size = (step.seq, total);
        let allowed = |s: usize, t: usize| t <= step.past + s;
        let wrong = |s: usize, t: usize| {
            let verb = if allowed(s, t) { "hides" } else { "shows" };
            format!(
                "with {} cached tokens it {verb} key {t} from query {s}",
                step.past
            )
        };
        match (&self.kind, values) {
            (Kind::Select { allowed: when, .. }, [cond, fill]) => {
                let plane = Plane::<bool>::of(cond, axes, size)?;
                for (s, t) in cells(size) {
                    if plane.at(s, t) != (allowed(s, t) == *when) {
                        return Err(wrong(s, t));
                    }
                }
                if !floats(fill)?.iter().all(|&v| v <= MASKED) {
                    return Err(format!("the fill value is not below {MASKED}"));
                }
            }
            (Kind::Additive { .. }, [mask]) => {
                let mask = mask.cast_to::<f32>().map_err(|e| format!("{e}"))?;
                let plane = Plane::<f32>::of(&mask, axes, size)?;
                for (s, t) in cells(size) {
                    let v = plane.at(s, t);
                    if (allowed(s, t) && v != 0.0) || (!allowed(s, t) && v > MASKED) {
                        return Err(wrong(s, t));
                    }
                }
            }
            _ => return Err("unexpected number of mask values".into()),
        }
        Ok(())
    }
}

fn cells((rows, cols): (usize, usize)) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).flat_map(move |r| (0..cols).map(move |c| (r, c)))
}
