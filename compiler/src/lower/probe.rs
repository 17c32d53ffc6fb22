//! Evaluates the parts of the graph that depend only on the interface inputs (RoPE tables,
//! attention masks) on sample steps, so that what they compute is checked, not guessed.

use std::collections::HashMap;

use tract_onnx::prelude::{
    tvec, DatumType, IntoRunnable, IntoTensor, OutletId, TValue, Tensor as TractTensor, TractError,
    TractResult,
};

use super::mask::MaskSite;
use super::rope::{RopeSite, Tables};
use super::view::{Mismatch, View};

/// The inputs kiln's runtime gives a decoder step; anything else is refused.
pub const INPUTS: [&str; 4] = [
    "input_ids",
    "attention_mask",
    "position_ids",
    "cache_position",
];

/// Sample steps: a prefill from position 0 (which holds position 1, where a table's angle is
/// the frequency itself), and a short step after a few cached tokens.
const STEPS: [Step; 2] = [Step { past: 0, seq: 16 }, Step { past: 5, seq: 3 }];
/// Relative tolerance between two RoPE sites' frequencies.
const SAME_FREQS: f64 = 1e-6;

/// One batch row: `past` cached tokens, then `seq` new ones at positions `past..past + seq`.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub past: usize,
    pub seq: usize,
}

/// The cache's shape, for the `past_key_values.*` inputs.
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The RoPE tables and masks met while matching, checked once the whole graph is matched.
#[derive(Default)]
pub struct Sites {
    pub ropes: Vec<RopeSite>,
    pub masks: Vec<MaskSite>,
}

/// Evaluates every RoPE table and mask of `sites` on the sample steps: the tables must rotate
/// by one set of frequencies (returned) and the masks must be causal. `embed` is the embedding
/// node, which none of them may depend on.
pub fn check_sites(
    view: &View,
    sites: &Sites,
    embed: usize,
    cache: CacheShape,
) -> Result<Vec<f64>, Mismatch> {
    let mut ropes: Vec<&RopeSite> = Vec::new();
    for rope in &sites.ropes {
        if !ropes.iter().any(|r| (r.cos, r.sin) == (rope.cos, rope.sin)) {
            ropes.push(rope);
        }
    }
    let mut outlets: Vec<OutletId> = ropes.iter().flat_map(|r| [r.cos, r.sin]).collect();
    outlets.extend(sites.masks.iter().flat_map(MaskSite::outlets));
    outlets.sort_by_key(|o| (o.node, o.slot));
    outlets.dedup();
    check_inputs_only(view, &outlets, embed, "a RoPE table or attention mask")?;
    let mut freqs: Option<Vec<f64>> = None;
    for step in STEPS {
        let values = evaluate(view, &outlets, step, cache)?;
        let value: HashMap<OutletId, TractTensor> = outlets.iter().copied().zip(values).collect();
        for rope in &ropes {
            let bad = |e: String| view.mismatch(rope.node, format!("RoPE tables: {e}"));
            let tables = Tables::read(
                rope,
                (&value[&rope.cos], &value[&rope.sin]),
                step,
                cache.head_dim,
            )
            .map_err(bad)?;
            // Only the step holding position 1 gives the frequencies; the others are checked.
            if let Ok(mine) = tables.frequencies() {
                match &freqs {
                    None => freqs = Some(mine),
                    Some(f)
                        if mine
                            .iter()
                            .zip(f)
                            .any(|(a, b)| ((a - b) / b).abs() > SAME_FREQS) =>
                    {
                        return Err(
                            view.mismatch(rope.node, "RoPE frequencies differ between layers")
                        )
                    }
                    Some(_) => {}
                }
            }
            let f = freqs
                .as_ref()
                .ok_or_else(|| bad("no step holds position 1".into()))?;
            tables.check(f).map_err(bad)?;
        }
        for mask in &sites.masks {
            let values: Vec<TractTensor> =
                mask.outlets().iter().map(|o| value[o].clone()).collect();
            mask.check(&values, step)
                .map_err(|e| view.mismatch(mask.node, format!("not a causal mask: {e}")))?;
        }
    }
    freqs.ok_or_else(|| Mismatch::Graph("no RoPE found".into()))
}

/// Checks that `outlets` depend on nothing but the step's ids, mask and positions: not on
/// the cache, and not on the token embeddings (`embed`, the node every activation comes from).
pub fn check_inputs_only(
    view: &View,
    outlets: &[OutletId],
    embed: usize,
    what: &str,
) -> Result<(), Mismatch> {
    let inputs = view
        .model
        .input_outlets()
        .map_err(|e| Mismatch::Graph(format!("{e}")))?;
    for id in view.ancestors(outlets) {
        let name = view.node(id).name.as_str();
        if id == embed || (inputs.iter().any(|o| o.node == id) && !INPUTS.contains(&name)) {
            return Err(view.mismatch(id, format!("{what} must not depend on this")));
        }
    }
    Ok(())
}

/// The values of `outlets` on `step`.
pub fn evaluate(
    view: &View,
    outlets: &[OutletId],
    step: Step,
    cache: CacheShape,
) -> Result<Vec<TractTensor>, Mismatch> {
    let failed = |e: TractError| {
        Mismatch::Graph(format!(
            "evaluating RoPE tables and masks on a sample step: {e:#}"
        ))
    };
    let model = view.model;
    // Constants are read as they are; a plan evaluates the rest.
    let computed: Vec<OutletId> = outlets
        .iter()
        .copied()
        .filter(|o| view.konst(*o).is_none())
        .collect();
    let mut results = Vec::new();
    if !computed.is_empty() {
        let mut feed = tvec!();
        for &outlet in model.input_outlets().map_err(failed)? {
            let name = model.node(outlet.node).name.as_str();
            let fact = model.outlet_fact(outlet).map_err(failed)?;
            let value = input(name, step, cache).map_err(failed)?;
            let value = value
                .cast_to_dt(fact.datum_type)
                .map_err(failed)?
                .into_owned();
            feed.push(TValue::from(value));
        }
        let plan = model
            .clone()
            .with_output_outlets(&computed)
            .and_then(|m| m.into_runnable())
            .map_err(failed)?;
        results = plan
            .run(feed)
            .map_err(failed)?
            .into_iter()
            .map(|v| v.into_tensor())
            .collect();
    }
    let mut results = results.into_iter();
    outlets
        .iter()
        .map(|o| match view.konst(*o) {
            Some(t) => Ok(t.clone()),
            None => results
                .next()
                .ok_or_else(|| Mismatch::Graph("tract returned too few values".into())),
        })
        .collect()
}

/// What kiln's runtime would feed input `name` on `step`.
fn input(name: &str, step: Step, cache: CacheShape) -> TractResult<TractTensor> {
    let total = step.past + step.seq;
    let positions: Vec<i64> = (step.past as i64..total as i64).collect();
    match name {
        "input_ids" => TractTensor::from_shape(&[1, step.seq], &vec![0i64; step.seq]),
        "attention_mask" => TractTensor::from_shape(&[1, total], &vec![1i64; total]),
        "position_ids" => TractTensor::from_shape(&[1, step.seq], &positions),
        "cache_position" => TractTensor::from_shape(&[step.seq], &positions),
        _ if name.starts_with("past_key_values.") => TractTensor::zero_dt(
            DatumType::F32,
            &[1, cache.kv_heads, step.past, cache.head_dim],
        ),
        _ => Err(TractError::msg(format!(
            "input {name} is not a decoder input kiln knows"
        ))),
    }
}
