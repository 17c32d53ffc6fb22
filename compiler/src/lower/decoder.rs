//! Walks the decoder from `input_ids`: the embedding, each layer (RMSNorm, attention, RMSNorm,
//! MLP) along the residual stream, the final norm and the output head; then evaluates the
//! RoPE tables and masks met on the way on sample steps.

use tract_onnx::prelude::{OutletId, TDim};
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::math::Add;

use super::attention::{attention, Dims};
use super::layout::{concrete, Atom, Factor, Layout};
use super::linear::{weight_of, Projection};
use super::mlp::mlp;
use super::norm::{rms_norm, Norm};
use super::probe::{check_sites, CacheShape, Sites, INPUTS};
use super::view::{floats, Mismatch, Use, Value, View};
use crate::graph::{LayerWeights, LlamaWeights, Tensor};

/// What the graph says about the model, beyond its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Structure {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub tied: bool,
    /// The RoPE inverse frequency of each rotated pair, as the graph computes it.
    pub inv_freq: Vec<f64>,
}

/// The matched decoder.
pub struct Decoder {
    pub weights: LlamaWeights,
    pub structure: Structure,
}

/// Matches the whole decoder.
pub fn decoder(view: &View) -> Result<Decoder, Mismatch> {
    let layers = check_interface(view)?;
    let (kv_heads, head_dim) = cache_dims(view)?;
    let embedding = embedding(view)?;
    let (vocab, hidden) = (embedding.weight.shape[0], embedding.weight.shape[1]);
    let dims = Dims {
        hidden,
        kv_heads,
        head_dim,
    };
    let mut sites = Sites::default();
    let mut eps = Vec::new();
    let mut blocks: Vec<(LayerWeights, usize)> = Vec::new();
    let mut x = embedding.x;
    let (final_norm, head) = loop {
        let (norm, rest) = rms_norm(view, &x, &view.plain_uses(&x)?, hidden)?;
        eps.push(norm.eps);
        // After the last layer the norm feeds the output head alone, not q, k and v.
        if let [head] = view.plain_uses(&norm.out)?.as_slice() {
            if let Some(u) = rest.first() {
                return Err(view.mismatch(u.node, "unexpected use of the final residual stream"));
            }
            break (norm, head.clone());
        }
        let (block, heads, next) = layer(view, &x, norm, &rest, blocks.len(), dims, &mut sites)?;
        eps.extend([block.attn_norm.eps, block.ffn_norm.eps]);
        blocks.push((block.weights, heads));
        x = next;
    };
    if blocks.len() != layers {
        return Err(Mismatch::Graph(format!(
            "{layers} layers of KV-cache inputs, but {} decoder layers",
            blocks.len()
        )));
    }
    let (heads, intermediate) = uniform(&blocks)?;
    if weight_of(view, &head).is_none() {
        return Err(view.mismatch(head.node, "expected the output projection (lm_head)"));
    }
    let vocab_factor = [Factor::new(Atom::Vocab, vocab)];
    let projection = Projection::new(view, &head)?;
    let (lm_head, logits) = projection.matrix("lm_head.weight", &vocab_factor, &[Atom::Hidden])?;
    check_logits(view, &logits, &x.layout)?;
    let tied = projection.weight_node == embedding.table || lm_head.data == embedding.weight.data;

    let cache = CacheShape { kv_heads, head_dim };
    let inv_freq = check_sites(view, &sites, embedding.gather, cache)?;
    let rms_eps = eps[0];
    if let Some(other) = eps.iter().find(|&&e| e != rms_eps) {
        return Err(Mismatch::Graph(format!(
            "RMSNorm epsilons differ ({rms_eps} and {other})"
        )));
    }
    let structure = Structure {
        vocab,
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
        head_dim,
        rms_eps,
        tied,
        inv_freq,
    };
    let weights = LlamaWeights {
        embed: embedding.weight,
        layers: blocks.into_iter().map(|(w, _)| w).collect(),
        final_norm: norm_tensor("model.norm.weight", &final_norm),
        lm_head: (!tied).then_some(lm_head),
    };
    Ok(Decoder { weights, structure })
}

/// A matched layer and its two norms (for their epsilons).
struct Block {
    weights: LayerWeights,
    attn_norm: Norm,
    ffn_norm: Norm,
}

/// Layer `i` from its input `x`, whose attention norm is matched and whose other uses are
/// `rest`; returns it, its query heads and the residual stream after it.
fn layer(
    view: &View,
    x: &Value,
    attn_norm: Norm,
    rest: &[Use],
    i: usize,
    dims: Dims,
    sites: &mut Sites,
) -> Result<(Block, usize, Value), Mismatch> {
    let (attn, attn_out) = attention(view, &attn_norm.out, i, dims, sites)?;
    let mid = residual(view, x, &attn_out, rest)?;
    let (ffn_norm, rest) = rms_norm(view, &mid, &view.plain_uses(&mid)?, dims.hidden)?;
    let (ffn, ffn_out) = mlp(view, &ffn_norm.out, i, dims.hidden)?;
    let next = residual(view, &mid, &ffn_out, &rest)?;
    let weights = LayerWeights {
        attn_norm: norm_tensor(
            &format!("model.layers.{i}.input_layernorm.weight"),
            &attn_norm,
        ),
        wq: attn.wq,
        wk: attn.wk,
        wv: attn.wv,
        wo: attn.wo,
        ffn_norm: norm_tensor(
            &format!("model.layers.{i}.post_attention_layernorm.weight"),
            &ffn_norm,
        ),
        w_gate: ffn.gate,
        w_up: ffn.up,
        w_down: ffn.down,
    };
    let block = Block {
        weights,
        attn_norm,
        ffn_norm,
    };
    Ok((block, attn.heads, next))
}

/// `x + out`, the residual add after a block whose input `x` has no uses but its norm and
/// `rest`; returns the new residual stream.
fn residual(view: &View, x: &Value, out: &Value, rest: &[Use]) -> Result<Value, Mismatch> {
    if !out.layout.same(&x.layout) {
        return Err(view.mismatch(
            out.outlet.node,
            "the block's output is not laid out like the residual stream",
        ));
    }
    let u = view.single_use(out, "the residual add")?;
    if !view.is_bin::<Add>(u.node)
        || u.scale != 1.0
        || view.other_input(u.node, u.slot) != Some(x.outlet)
    {
        return Err(view.mismatch(
            u.node,
            "expected the residual add of the block's input and output",
        ));
    }
    if let Some(other) = rest.iter().find(|r| r.node != u.node) {
        return Err(view.mismatch(other.node, "unexpected use of the residual stream"));
    }
    Ok(Value::new(OutletId::new(u.node, 0), x.layout.clone()))
}

/// Query heads and MLP width, which kiln's facts hold once for all layers.
fn uniform(blocks: &[(LayerWeights, usize)]) -> Result<(usize, usize), Mismatch> {
    let shape = |(w, heads): &(LayerWeights, usize)| (*heads, w.w_gate.shape[0]);
    let first = blocks.first().map(shape).unwrap_or_default();
    match blocks.iter().map(shape).position(|s| s != first) {
        Some(i) => Err(Mismatch::Graph(format!(
            "layer {i} has (query heads, MLP width) {:?}, layer 0 {first:?}: \
             kiln needs every layer alike",
            shape(&blocks[i])
        ))),
        None => Ok(first),
    }
}

/// Checks the inputs are the standard decoder's; returns the number of layers of cache.
fn check_interface(view: &View) -> Result<usize, Mismatch> {
    let inputs = view
        .model
        .input_outlets()
        .map_err(|e| Mismatch::Graph(format!("{e}")))?;
    let mut layers = 0;
    for outlet in inputs {
        let name = view.node(outlet.node).name.as_str();
        let cache = name
            .strip_prefix("past_key_values.")
            .and_then(|rest| {
                rest.strip_suffix(".key")
                    .or_else(|| rest.strip_suffix(".value"))
            })
            .and_then(|i| i.parse::<usize>().ok());
        match cache {
            Some(i) => layers = layers.max(i + 1),
            None if INPUTS.contains(&name) => {}
            None => {
                return Err(Mismatch::Graph(format!(
                    "input {name:?} is not one of a Llama decoder's (input_ids, attention_mask, \
                     position_ids, past_key_values.{{i}}.key|value)"
                )))
            }
        }
    }
    if view.source("input_ids").is_none() || layers == 0 {
        return Err(Mismatch::Graph(
            "expected a decoder with inputs input_ids and past_key_values.{i}.key|value".into(),
        ));
    }
    Ok(layers)
}

/// KV heads and head dimension from `past_key_values.0.key` (`[batch, kv_heads, past, head_dim]`).
fn cache_dims(view: &View) -> Result<(usize, usize), Mismatch> {
    let name = "past_key_values.0.key";
    let outlet = view
        .source(name)
        .ok_or_else(|| Mismatch::Graph(format!("input {name} is missing")))?;
    let shape = view.shape(outlet)?;
    match shape.as_slice() {
        [_, h, _, d] => match (concrete(h), concrete(d)) {
            (Some(h), Some(d)) if h > 0 && d > 0 && d % 2 == 0 => Ok((h, d)),
            _ => Err(view.mismatch(
                outlet.node,
                format!("KV heads and an even head dimension must be fixed, found {shape:?}"),
            )),
        },
        _ => Err(view.mismatch(
            outlet.node,
            format!("expected [batch, kv_heads, past, head_dim], found {shape:?}"),
        )),
    }
}

/// The token embedding.
struct Embedding {
    /// The `Gather` node, which every activation descends from.
    gather: usize,
    /// The table's constant node (a tied output head reads it too).
    table: usize,
    weight: Tensor,
    /// The residual stream it starts.
    x: Value,
}

/// The token embedding: a row gather from a constant table by `input_ids`.
fn embedding(view: &View) -> Result<Embedding, Mismatch> {
    let ids = view
        .source("input_ids")
        .ok_or_else(|| Mismatch::Graph("input input_ids is missing".into()))?;
    let layout = match view.shape(ids)?.as_slice() {
        [b, s] => Layout::of(&[(Atom::Batch, b.clone()), (Atom::Seq, s.clone())]),
        shape => {
            return Err(view.mismatch(
                ids.node,
                format!("expected [batch, sequence], found {shape:?}"),
            ))
        }
    };
    let uses = view.plain_uses(&Value::new(ids, layout.clone()))?;
    let gather = uses.iter().find(|u| {
        view.node(u.node)
            .op_as::<Gather>()
            .is_some_and(|g| g.axis == 0)
            && u.slot == 1
            && view.konst(view.node(u.node).inputs[0]).is_some()
    });
    let Some(u) = gather else {
        let node = uses.first().map_or(ids.node, |u| u.node);
        return Err(view.mismatch(
            node,
            "expected the token embedding (a Gather from a constant table)",
        ));
    };
    let table_outlet = view.node(u.node).inputs[0];
    let table = view
        .konst(table_outlet)
        .ok_or_else(|| view.mismatch(u.node, "the embedding table is not a constant"))?;
    let [vocab, hidden] = *table.shape() else {
        return Err(view.mismatch(
            u.node,
            format!(
                "expected a [vocab, hidden] table, found {:?}",
                table.shape()
            ),
        ));
    };
    let values = floats(table).map_err(|e| view.mismatch(u.node, e))?;
    let embed = Tensor::from_f32("model.embed_tokens.weight", vec![vocab, hidden], &values);
    let mut axes = u.layout.axes.clone();
    axes.push(vec![Factor::new(Atom::Hidden, TDim::from(hidden))]);
    Ok(Embedding {
        gather: u.node,
        table: table_outlet.node,
        weight: embed,
        x: Value::new(OutletId::new(u.node, 0), Layout { axes }),
    })
}

/// The logits are the graph's output, laid out `[batch, seq, vocab]`.
fn check_logits(view: &View, logits: &Value, residual: &Layout) -> Result<(), Mismatch> {
    let uses = view.uses(logits)?;
    if let Some(u) = uses.first() {
        return Err(view.mismatch(u.node, "expected nothing computed from the logits"));
    }
    let expected: Vec<Atom> = residual
        .atoms()
        .into_iter()
        .map(|a| if a == Atom::Hidden { Atom::Vocab } else { a })
        .collect();
    if logits.layout.atoms() != expected {
        return Err(view.mismatch(
            logits.outlet.node,
            "the logits are not laid out [batch, sequence, vocab]",
        ));
    }
    Ok(())
}

fn norm_tensor(name: &str, norm: &Norm) -> Tensor {
    Tensor::from_f32(name, vec![norm.weight.len()], &norm.weight)
}
