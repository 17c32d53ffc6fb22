//! What each axis of an activation means: semantic labels followed through tract's axis
//! changes, broadcasts and einsums, so weights can be read in Hugging Face's layout whatever
//! order the exporter and declutter left the axes in.
//!
//! An axis is a list of factors, outer to inner (a reshape that merges `[kv_heads, rep]` into
//! one head axis gives one axis of two factors); an axis of size 1 has no factors.

use tract_onnx::prelude::TDim;
use tract_onnx::tract_core::axes::AxesMapping;
use tract_onnx::tract_core::ops::change_axes::{AxisOp, InOut};

/// The meaning of one factor of an axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atom {
    Batch,
    /// The new tokens of this step.
    Seq,
    /// The cached tokens of `past_key_values`.
    Past,
    /// Every key position: the past followed by the new tokens.
    Keys,
    Hidden,
    KvHead,
    /// The query heads sharing one KV head (GQA).
    Rep,
    HeadDim,
    /// One half of the head dimension, as rotate-half RoPE slices it.
    HalfDim,
    Ffn,
    Vocab,
    /// A size-1 axis broadcast to a size (the KV side of GQA's `repeat_kv`); it matches `Rep`.
    Repeat,
}

/// One factor of an axis: its meaning and size.
#[derive(Clone, Debug, PartialEq)]
pub struct Factor {
    pub atom: Atom,
    pub size: TDim,
}

impl Factor {
    pub fn new(atom: Atom, size: impl Into<TDim>) -> Factor {
        Factor {
            atom,
            size: size.into(),
        }
    }
}

/// The factors of one axis, outer to inner; empty for an axis of size 1.
pub type Axis = Vec<Factor>;

/// The labels of every axis of a value.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub axes: Vec<Axis>,
}

/// Factors of size 1 carry no meaning and are dropped.
pub fn factors(list: &[(Atom, TDim)]) -> Vec<Factor> {
    list.iter()
        .filter(|(_, size)| *size != TDim::from(1))
        .map(|(atom, size)| Factor::new(*atom, size.clone()))
        .collect()
}

impl Layout {
    /// One factor per axis.
    pub fn of(list: &[(Atom, TDim)]) -> Layout {
        Layout {
            axes: list
                .iter()
                .map(|(atom, size)| factors(&[(*atom, size.clone())]))
                .collect(),
        }
    }

    pub fn rank(&self) -> usize {
        self.axes.len()
    }

    /// The axis that is exactly `atom`.
    pub fn find(&self, atom: Atom) -> Option<usize> {
        self.axes
            .iter()
            .position(|a| matches!(a.as_slice(), [f] if f.atom == atom))
    }

    /// Every factor's meaning, axis by axis.
    pub fn atoms(&self) -> Vec<Atom> {
        self.axes.iter().flatten().map(|f| f.atom).collect()
    }

    /// The same meanings axis by axis (a broadcast repeat matching GQA's group).
    pub fn same(&self, other: &Layout) -> bool {
        self.rank() == other.rank() && self.axes.iter().zip(&other.axes).all(|(a, b)| same(a, b))
    }

    /// With `axis` relabelled as `to`.
    pub fn with_axis(&self, axis: usize, to: Axis) -> Layout {
        let mut axes = self.axes.clone();
        axes[axis] = to;
        Layout { axes }
    }

    /// The labels after tract's axis change `op`.
    pub fn apply(&self, op: &AxisOp) -> Result<Layout, String> {
        let mut axes = self.axes.clone();
        let rank = axes.len();
        match op {
            AxisOp::Add(at) if *at <= rank => axes.insert(*at, Vec::new()),
            AxisOp::Rm(at) if *at < rank => {
                if !axes.remove(*at).is_empty() {
                    return Err(format!("removes axis {at}, which is not of size 1"));
                }
            }
            AxisOp::Move(from, to) if *from < rank && *to < rank => {
                let axis = axes.remove(*from);
                axes.insert(*to, axis);
            }
            AxisOp::Reshape(at, from, to) if at + from.len() <= rank => {
                let merged: Vec<Factor> = axes.drain(*at..at + from.len()).flatten().collect();
                let split =
                    split(&merged, to).map_err(|e| format!("reshape {from:?} → {to:?}: {e}"))?;
                axes.splice(*at..*at, split);
            }
            _ => return Err(format!("axis change {op:?} does not fit rank {rank}")),
        }
        Ok(Layout { axes })
    }

    /// The labels after broadcasting to `shape`: a size-1 axis that grows repeats its value.
    pub fn broadcast(&self, shape: &[TDim]) -> Result<Layout, String> {
        if shape.len() != self.rank() {
            return Err(format!(
                "broadcast to rank {} from rank {}",
                shape.len(),
                self.rank()
            ));
        }
        let axes = self
            .axes
            .iter()
            .zip(shape)
            .map(|(axis, size)| match axis.as_slice() {
                [] => Ok(factors(&[(Atom::Repeat, size.clone())])),
                _ if product(axis) == *size => Ok(axis.clone()),
                _ => Err(format!(
                    "broadcast changes an axis of size {} to {size}",
                    product(axis)
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Layout { axes })
    }
}

/// A dimension's value when it is a number.
pub fn concrete(d: &TDim) -> Option<usize> {
    d.as_i64().and_then(|v| usize::try_from(v).ok())
}

/// The size of an axis.
pub fn product(axis: &[Factor]) -> TDim {
    axis.iter().fold(TDim::from(1), |p, f| p * f.size.clone())
}

/// The same factors, a broadcast repeat matching GQA's group.
pub fn same(a: &[Factor], b: &[Factor]) -> bool {
    let canonical = |f: &Factor| match f.atom {
        Atom::Repeat => Atom::Rep,
        atom => atom,
    };
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| canonical(x) == canonical(y) && x.size == y.size)
}

/// Cuts `factors` (outer to inner) into axes of `sizes`; every cut must fall between factors.
pub fn split(factors: &[Factor], sizes: &[TDim]) -> Result<Vec<Axis>, String> {
    let mut rest = factors.iter();
    let mut axes = Vec::with_capacity(sizes.len());
    for size in sizes {
        let mut axis = Vec::new();
        while product(&axis) != *size {
            match rest.next() {
                Some(f) => axis.push(f.clone()),
                None => return Err(format!("no whole factors make an axis of size {size}")),
            }
        }
        axes.push(axis);
    }
    match rest.next() {
        None => Ok(axes),
        Some(f) => Err(format!("{:?} of size {} is left over", f.atom, f.size)),
    }
}

/// What a two-input einsum does to labelled inputs.
pub struct Contraction {
    pub output: Layout,
    /// The labels of the summed-over axes.
    pub contracted: Vec<Axis>,
}

/// Follows the labels of `a` and `b` through an einsum: shared axes must mean the same, an
/// axis of size 1 on one side takes the other's meaning, and an axis may only be summed over
/// if both inputs have it.
pub fn einsum(mapping: &AxesMapping, a: &Layout, b: &Layout) -> Result<Contraction, String> {
    let rank = mapping.rank(InOut::Out(0));
    let mut output: Vec<Option<Axis>> = vec![None; rank];
    let mut contracted = Vec::new();
    for axis in mapping.iter_all_axes() {
        let label = |slot: usize, layout: &Layout| -> Result<Option<Axis>, String> {
            match axis.inputs.get(slot).map(|p| p.as_slice()) {
                None | Some([]) => Ok(None),
                Some([p]) => layout
                    .axes
                    .get(*p)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| format!("axis {} is out of the input's rank", axis.repr)),
                Some(_) => Err(format!("axis {} repeats within an input", axis.repr)),
            }
        };
        let (la, lb) = (label(0, a)?, label(1, b)?);
        let merged = match (&la, &lb) {
            (Some(x), Some(y)) => merge(x, y).ok_or_else(|| {
                format!(
                    "axis {} pairs {:?} with {:?}",
                    axis.repr,
                    atoms(x),
                    atoms(y)
                )
            })?,
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (None, None) => Vec::new(),
        };
        match axis.outputs.first().map(|p| p.as_slice()) {
            Some([p]) if *p < rank => output[*p] = Some(merged),
            Some([]) | None => {
                if la.is_none() || lb.is_none() {
                    if !merged.is_empty() {
                        return Err(format!(
                            "axis {} ({:?}) is summed within one input",
                            axis.repr,
                            atoms(&merged)
                        ));
                    }
                } else if !merged.is_empty() {
                    contracted.push(merged);
                }
            }
            Some(_) => return Err(format!("axis {} repeats in the output", axis.repr)),
        }
    }
    let axes = output
        .into_iter()
        .map(|a| a.ok_or_else(|| "an output axis comes from no input".to_owned()))
        .collect::<Result<_, _>>()?;
    Ok(Contraction {
        output: Layout { axes },
        contracted,
    })
}

/// The meaning of an axis both inputs of an einsum have: a size-1 side takes the other's.
fn merge(x: &Axis, y: &Axis) -> Option<Axis> {
    if x.is_empty() {
        Some(y.clone())
    } else if y.is_empty() {
        Some(x.clone())
    } else if !same(x, y) {
        None
    } else if x.iter().any(|f| f.atom == Atom::Repeat) {
        Some(y.clone())
    } else {
        Some(x.clone())
    }
}

fn atoms(axis: &[Factor]) -> Vec<Atom> {
    axis.iter().map(|f| f.atom).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(atom: Atom, size: usize) -> Factor {
        Factor::new(atom, size)
    }

    #[test]
    fn reshape_splits_only_between_factors() {
        let heads = Layout {
            axes: vec![vec![
                f(Atom::KvHead, 2),
                f(Atom::Rep, 2),
                f(Atom::HeadDim, 16),
            ]],
        };
        let op = AxisOp::Reshape(0, vec![64.into()].into(), vec![4.into(), 16.into()].into());
        let split = heads.apply(&op).expect("split");
        assert_eq!(split.axes[0], vec![f(Atom::KvHead, 2), f(Atom::Rep, 2)]);
        assert_eq!(split.axes[1], vec![f(Atom::HeadDim, 16)]);
        let op = AxisOp::Reshape(0, vec![64.into()].into(), vec![8.into(), 8.into()].into());
        assert!(heads.apply(&op).is_err());
    }

    #[test]
    fn broadcast_repeat_matches_the_group() {
        let k = Layout {
            axes: vec![vec![f(Atom::KvHead, 2)], vec![]],
        };
        let repeated = k.broadcast(&[2.into(), 3.into()]).expect("broadcast");
        let q = Layout {
            axes: vec![vec![f(Atom::KvHead, 2)], vec![f(Atom::Rep, 3)]],
        };
        assert!(repeated.same(&q));
    }
}
