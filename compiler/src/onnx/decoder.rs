//! The Llama 3 decoder as a standard opset-17 ONNX graph (ai.onnx only) with a KV cache in the
//! layout onnxruntime-genai and Optimum use.
//!
//! The graph follows Hugging Face's `LlamaForCausalLM`: RMSNorm from primitives, rotate-half
//! RoPE with cos/sin computed from `position_ids` × inverse frequencies, GQA by repeating the KV
//! heads, a causal + padding mask, SwiGLU, and logits from the (possibly tied) output matrix.

use super::builder::{attr_i, attr_ints, value_info, Dim, GraphBuilder, Layout};
use super::nbits::{self, Part};
use super::proto::{ValueInfoProto, FLOAT, INT64};
use crate::graph::{Checkpoint, Tensor};
use kiln_runtime::quant::Format;

/// The ai.onnx opset the graph is written against (`ReduceMean` takes `axes` as an attribute).
pub const OPSET: i64 = 17;

const BATCH: Dim = Dim::Symbol("batch_size");
const SEQ: Dim = Dim::Symbol("sequence_length");
const PAST: Dim = Dim::Symbol("past_sequence_length");
const TOTAL: Dim = Dim::Symbol("total_sequence_length");

/// A built decoder graph, its weights still referring to the checkpoint.
pub struct Decoder<'a> {
    pub graph: GraphBuilder<'a>,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<ValueInfoProto>,
}

/// Graph values shared by every layer.
struct Shared {
    cos: String,
    sin: String,
    /// `[batch, 1, seq, total]` booleans: which keys each query may attend to.
    allowed: String,
    /// Block-format projections become `MatMulNBits`.
    quantized: bool,
}

/// Builds the decoder graph, or says which part of the checkpoint is inconsistent. With
/// `quantized`, every projection whose weight is in a block format is a `MatMulNBits`.
pub fn build(checkpoint: &Checkpoint, quantized: bool) -> Result<Decoder<'_>, String> {
    check(checkpoint)?;
    let f = &checkpoint.facts;
    let w = &checkpoint.weights;
    let kv_dims = [BATCH, Dim::Fixed(f.kv_heads), PAST, Dim::Fixed(f.head_dim)];
    let present_dims = [BATCH, Dim::Fixed(f.kv_heads), TOTAL, Dim::Fixed(f.head_dim)];
    let mut inputs = vec![
        value_info("input_ids", INT64, &[BATCH, SEQ]),
        value_info("attention_mask", INT64, &[BATCH, TOTAL]),
        value_info("position_ids", INT64, &[BATCH, SEQ]),
    ];
    let mut outputs = vec![value_info(
        "logits",
        FLOAT,
        &[BATCH, SEQ, Dim::Fixed(f.vocab_size)],
    )];
    for i in 0..f.layers {
        for kind in ["key", "value"] {
            inputs.push(value_info(
                &format!("past_key_values.{i}.{kind}"),
                FLOAT,
                &kv_dims,
            ));
            outputs.push(value_info(
                &format!("present.{i}.{kind}"),
                FLOAT,
                &present_dims,
            ));
        }
    }

    let mut g = GraphBuilder::default();
    g.set_scope("model/embed_tokens");
    let embed_name = "model.embed_tokens.weight";
    let mut x = if quantized && w.embed.format == Format::Q8_0 {
        gather_q8(&mut g, embed_name, &w.embed)
    } else {
        let embed = g.weight(embed_name, &w.embed, false);
        g.op("Gather", &[&embed, "input_ids"], vec![attr_i("axis", 0)])
    };
    let shared = Shared::build(&mut g, checkpoint, quantized);
    for i in 0..f.layers {
        x = layer(&mut g, checkpoint, &shared, i, &x);
    }
    g.set_scope("model/norm");
    let norm = g.weight("model.norm.weight", &w.final_norm, false);
    let h = rms_norm(&mut g, &x, &norm, f.rms_eps);
    g.set_scope("lm_head");
    let head = w.lm_head.as_ref().unwrap_or(&w.embed);
    if quantized && nbits::bits(head.format).is_some() {
        // Tied: the blocks the embedding gathers from, if it does.
        let name = match w.lm_head {
            None => embed_name,
            Some(_) => "lm_head.weight",
        };
        linear(&mut g, &h, name, head, true, Some("logits"));
    } else {
        let head = match &w.lm_head {
            // Tied: one stored table, transposed in the graph rather than written twice.
            None => {
                let embed = g.weight(embed_name, &w.embed, false);
                g.op("Transpose", &[&embed], vec![attr_ints("perm", &[1, 0])])
            }
            Some(t) => g.weight("lm_head.weight", t, true),
        };
        g.op_to("MatMul", &[&h, &head], Vec::new(), "logits");
    }
    Ok(Decoder {
        graph: g,
        inputs,
        outputs,
    })
}

impl Shared {
    fn build(g: &mut GraphBuilder, checkpoint: &Checkpoint, quantized: bool) -> Shared {
        g.set_scope("model/rotary_emb");
        let inv_freq = g.floats(
            "model.rotary_emb.inv_freq",
            &checkpoint.facts.rope_inv_freq(),
        );
        let pos = g.op(
            "Cast",
            &["position_ids"],
            vec![attr_i("to", i64::from(FLOAT))],
        );
        let axis2 = g.ints(&[2]);
        let pos = g.op("Unsqueeze", &[&pos, &axis2], Vec::new());
        let freqs = g.op("Mul", &[&pos, &inv_freq], Vec::new());
        let emb = g.op("Concat", &[&freqs, &freqs], vec![attr_i("axis", -1)]);
        let axis1 = g.ints(&[1]);
        let cos = g.op("Cos", &[&emb], Vec::new());
        let cos = g.op("Unsqueeze", &[&cos, &axis1], Vec::new());
        let sin = g.op("Sin", &[&emb], Vec::new());
        let sin = g.op("Unsqueeze", &[&sin, &axis1], Vec::new());

        // Causal by index: the queries are the last `seq` of the `total` keys, so query `s`
        // sees keys `0..=total-seq+s` (its position when there is no left padding); a key
        // whose mask is 0 is never seen. Keying on indices, not on position_ids, keeps
        // left-padded rows from masking everything.
        g.set_scope("model/attn_mask");
        let one = g.int(1);
        let zero = g.int(0);
        let ids_shape = g.op("Shape", &["input_ids"], Vec::new());
        let seq = g.op("Gather", &[&ids_shape, &one], vec![attr_i("axis", 0)]);
        let mask_shape = g.op("Shape", &["attention_mask"], Vec::new());
        let total = g.op("Gather", &[&mask_shape, &one], vec![attr_i("axis", 0)]);
        let past = g.op("Sub", &[&total, &seq], Vec::new());
        let keys = g.op("Range", &[&zero, &total, &one], Vec::new());
        let queries = g.op("Range", &[&past, &total, &one], Vec::new());
        let queries = g.op("Unsqueeze", &[&queries, &axis1], Vec::new());
        let causal = g.op("LessOrEqual", &[&keys, &queries], Vec::new());
        let padding = g.op("Equal", &["attention_mask", &one], Vec::new());
        let axes12 = g.ints(&[1, 2]);
        let padding = g.op("Unsqueeze", &[&padding, &axes12], Vec::new());
        let allowed = g.op("And", &[&causal, &padding], Vec::new());
        Shared {
            cos,
            sin,
            allowed,
            quantized,
        }
    }
}

/// One decoder layer: attention and MLP blocks, each pre-normed with a residual.
fn layer<'a>(
    g: &mut GraphBuilder<'a>,
    checkpoint: &'a Checkpoint,
    shared: &Shared,
    i: usize,
    x: &str,
) -> String {
    let f = &checkpoint.facts;
    let lw = &checkpoint.weights.layers[i];
    let p = format!("model.layers.{i}");
    g.set_scope(&format!("model/layers.{i}/input_layernorm"));
    let norm = g.weight(&format!("{p}.input_layernorm.weight"), &lw.attn_norm, false);
    let h = rms_norm(g, x, &norm, f.rms_eps);

    g.set_scope(&format!("model/layers.{i}/self_attn"));
    let q = heads(
        g,
        &h,
        &format!("{p}.self_attn.q_proj.weight"),
        &lw.wq,
        (f.heads, f.head_dim),
        shared.quantized,
    );
    let k = heads(
        g,
        &h,
        &format!("{p}.self_attn.k_proj.weight"),
        &lw.wk,
        (f.kv_heads, f.head_dim),
        shared.quantized,
    );
    let v = heads(
        g,
        &h,
        &format!("{p}.self_attn.v_proj.weight"),
        &lw.wv,
        (f.kv_heads, f.head_dim),
        shared.quantized,
    );
    let q = rope(g, &q, shared);
    let k = rope(g, &k, shared);
    let (key, value) = (format!("present.{i}.key"), format!("present.{i}.value"));
    g.op_to(
        "Concat",
        &[&format!("past_key_values.{i}.key"), &k],
        vec![attr_i("axis", 2)],
        &key,
    );
    g.op_to(
        "Concat",
        &[&format!("past_key_values.{i}.value"), &v],
        vec![attr_i("axis", 2)],
        &value,
    );
    let key = repeat_kv(g, &key, f.heads, f.kv_heads, f.head_dim);
    let value = repeat_kv(g, &value, f.heads, f.kv_heads, f.head_dim);

    let key_t = g.op("Transpose", &[&key], vec![attr_ints("perm", &[0, 1, 3, 2])]);
    let scores = g.op("MatMul", &[&q, &key_t], Vec::new());
    let scale = g.float(1.0 / (f.head_dim as f32).sqrt());
    let scores = g.op("Mul", &[&scores, &scale], Vec::new());
    // The most negative finite value rather than -inf: a fully masked row (a padding query)
    // then gives a uniform distribution instead of NaN.
    let masked = g.float(f32::MIN);
    let scores = g.op("Where", &[&shared.allowed, &scores, &masked], Vec::new());
    let probs = g.op("Softmax", &[&scores], vec![attr_i("axis", -1)]);
    let ctx = g.op("MatMul", &[&probs, &value], Vec::new());
    let ctx = g.op("Transpose", &[&ctx], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let merged = g.ints(&[0, 0, (f.heads * f.head_dim) as i64]);
    let ctx = g.op("Reshape", &[&ctx, &merged], Vec::new());
    let attn = linear(
        g,
        &ctx,
        &format!("{p}.self_attn.o_proj.weight"),
        &lw.wo,
        shared.quantized,
        None,
    );
    let x = g.op("Add", &[x, &attn], Vec::new());

    g.set_scope(&format!("model/layers.{i}/post_attention_layernorm"));
    let norm = g.weight(
        &format!("{p}.post_attention_layernorm.weight"),
        &lw.ffn_norm,
        false,
    );
    let h = rms_norm(g, &x, &norm, f.rms_eps);
    g.set_scope(&format!("model/layers.{i}/mlp"));
    let q = shared.quantized;
    let gate = linear(
        g,
        &h,
        &format!("{p}.mlp.gate_proj.weight"),
        &lw.w_gate,
        q,
        None,
    );
    let up = linear(g, &h, &format!("{p}.mlp.up_proj.weight"), &lw.w_up, q, None);
    let sig = g.op("Sigmoid", &[&gate], Vec::new());
    let act = g.op("Mul", &[&gate, &sig], Vec::new());
    let act = g.op("Mul", &[&act, &up], Vec::new());
    let down = linear(
        g,
        &act,
        &format!("{p}.mlp.down_proj.weight"),
        &lw.w_down,
        q,
        None,
    );
    g.op("Add", &[&x, &down], Vec::new())
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last axis.
fn rms_norm(g: &mut GraphBuilder, x: &str, weight: &str, eps: f32) -> String {
    let two = g.float(2.0);
    let eps = g.float(eps);
    let sq = g.op("Pow", &[x, &two], Vec::new());
    let mean = g.op(
        "ReduceMean",
        &[&sq],
        vec![attr_ints("axes", &[-1]), attr_i("keepdims", 1)],
    );
    let var = g.op("Add", &[&mean, &eps], Vec::new());
    let rms = g.op("Sqrt", &[&var], Vec::new());
    let normed = g.op("Div", &[x, &rms], Vec::new());
    g.op("Mul", &[&normed, weight], Vec::new())
}

/// `x · wᵀ` for an `[out, in]` weight `w` named `name`: a `MatMulNBits` over its blocks when
/// `quantized` and `w` is in a block format, else a `MatMul` with `w` as f32 `[in, out]`.
/// The output is the graph value `out` if given.
fn linear<'a>(
    g: &mut GraphBuilder<'a>,
    x: &str,
    name: &str,
    w: &'a Tensor,
    quantized: bool,
    out: Option<&str>,
) -> String {
    let Some(bits) = nbits::bits(w.format).filter(|_| quantized) else {
        let w = g.weight(name, w, true);
        return match out {
            Some(out) => {
                g.op_to("MatMul", &[x, &w], Vec::new(), out);
                out.to_owned()
            }
            None => g.op("MatMul", &[x, &w], Vec::new()),
        };
    };
    let base = name.strip_suffix(".weight").unwrap_or(name);
    let b = g.weight_as(&format!("{base}.qweight"), w, Layout::NBits(Part::B));
    let scales = g.weight_as(&format!("{base}.scales"), w, Layout::NBits(Part::Scales));
    let mut inputs = vec![x.to_owned(), b, scales];
    if nbits::has_zero_points(w.format) {
        let zp = Layout::NBits(Part::ZeroPoints);
        inputs.push(g.weight_as(&format!("{base}.zero_points"), w, zp));
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let attributes = vec![
        attr_i("K", w.cols() as i64),
        attr_i("N", w.rows() as i64),
        attr_i("bits", bits as i64),
        attr_i("block_size", nbits::BLOCK_SIZE as i64),
        attr_i("accuracy_level", 0),
    ];
    g.op_in(nbits::DOMAIN, "MatMulNBits", &inputs, attributes, out)
}

/// The rows of `input_ids` of a `q8_0` table `[vocab, hidden]`, dequantized in the graph from
/// the `MatMulNBits` inputs of `name` (which a tied output head shares): codes `q + 128`
/// minus 128, times the block's scale — `d * q` exactly, as kiln computes it.
fn gather_q8<'a>(g: &mut GraphBuilder<'a>, name: &str, table: &'a Tensor) -> String {
    let base = name.strip_suffix(".weight").unwrap_or(name);
    let b = g.weight_as(&format!("{base}.qweight"), table, Layout::NBits(Part::B));
    let scales = g.weight_as(
        &format!("{base}.scales"),
        table,
        Layout::NBits(Part::Scales),
    );
    let codes = g.op("Gather", &[&b, "input_ids"], vec![attr_i("axis", 0)]);
    let codes = g.op("Cast", &[&codes], vec![attr_i("to", i64::from(FLOAT))]);
    let offset = g.float(128.0);
    let q = g.op("Sub", &[&codes, &offset], Vec::new());
    let blocks = (table.cols() / nbits::BLOCK_SIZE) as i64;
    let shape = g.ints(&[table.rows() as i64, blocks, 1]);
    let scales = g.op("Reshape", &[&scales, &shape], Vec::new());
    let d = g.op("Gather", &[&scales, "input_ids"], vec![attr_i("axis", 0)]);
    let x = g.op("Mul", &[&q, &d], Vec::new());
    let hidden = g.ints(&[0, 0, table.cols() as i64]);
    g.op("Reshape", &[&x, &hidden], Vec::new())
}

/// Projects `[batch, seq, hidden]` with `w` and splits into `[batch, n, seq, head_dim]`.
fn heads<'a>(
    g: &mut GraphBuilder<'a>,
    h: &str,
    name: &str,
    w: &'a Tensor,
    (n, head_dim): (usize, usize),
    quantized: bool,
) -> String {
    let proj = linear(g, h, name, w, quantized, None);
    let shape = g.ints(&[0, 0, n as i64, head_dim as i64]);
    let split = g.op("Reshape", &[&proj, &shape], Vec::new());
    g.op(
        "Transpose",
        &[&split],
        vec![attr_ints("perm", &[0, 2, 1, 3])],
    )
}

/// Rotate-half RoPE: `x·cos + concat(-x₂, x₁)·sin`.
fn rope(g: &mut GraphBuilder, x: &str, shared: &Shared) -> String {
    let halves = g.op_n("Split", &[x], vec![attr_i("axis", -1)], 2);
    let neg = g.op("Neg", &[&halves[1]], Vec::new());
    let rotated = g.op("Concat", &[&neg, &halves[0]], vec![attr_i("axis", -1)]);
    let a = g.op("Mul", &[x, &shared.cos], Vec::new());
    let b = g.op("Mul", &[&rotated, &shared.sin], Vec::new());
    g.op("Add", &[&a, &b], Vec::new())
}

/// GQA: `[batch, kv_heads, t, d]` → `[batch, heads, t, d]`, each KV head serving
/// `heads / kv_heads` consecutive query heads (Hugging Face's `repeat_kv`).
fn repeat_kv(
    g: &mut GraphBuilder,
    x: &str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> String {
    if heads == kv_heads {
        return x.to_owned();
    }
    let axis2 = g.ints(&[2]);
    let x = g.op("Unsqueeze", &[x, &axis2], Vec::new());
    let reps = g.ints(&[1, 1, (heads / kv_heads) as i64, 1, 1]);
    let x = g.op("Expand", &[&x, &reps], Vec::new());
    let shape = g.ints(&[0, heads as i64, -1, head_dim as i64]);
    g.op("Reshape", &[&x, &shape], Vec::new())
}

/// Checks the facts against each other and every tensor's shape and byte size, so that
/// dequantizing cannot fail later.
fn check(checkpoint: &Checkpoint) -> Result<(), String> {
    let f = &checkpoint.facts;
    let w = &checkpoint.weights;
    let sizes = [
        f.hidden_size,
        f.vocab_size,
        f.intermediate_size,
        f.head_dim,
        f.heads,
    ];
    if sizes.contains(&0) {
        return Err("hidden, vocab, intermediate and head sizes and heads must be non-zero".into());
    }
    if f.kv_heads == 0 || !f.heads.is_multiple_of(f.kv_heads) {
        return Err(format!(
            "{} heads cannot share {} KV heads",
            f.heads, f.kv_heads
        ));
    }
    if !f.head_dim.is_multiple_of(2) {
        return Err(format!(
            "head_dim {} is odd; rotate-half RoPE needs pairs",
            f.head_dim
        ));
    }
    if w.layers.len() != f.layers {
        return Err(format!(
            "facts say {} layers, the weights have {}",
            f.layers,
            w.layers.len()
        ));
    }
    // Facts come from the checkpoint's file: products must not overflow.
    let mul = |a: usize, b: usize| {
        a.checked_mul(b)
            .ok_or_else(|| format!("sizes {a} × {b} overflow"))
    };
    let (h, q, kv, ff, v) = (
        f.hidden_size,
        mul(f.heads, f.head_dim)?,
        mul(f.kv_heads, f.head_dim)?,
        f.intermediate_size,
        f.vocab_size,
    );
    let mut expected: Vec<(&Tensor, Vec<usize>)> =
        vec![(&w.embed, vec![v, h]), (&w.final_norm, vec![h])];
    if let Some(head) = &w.lm_head {
        expected.push((head, vec![v, h]));
    }
    for l in &w.layers {
        expected.extend([
            (&l.attn_norm, vec![h]),
            (&l.wq, vec![q, h]),
            (&l.wk, vec![kv, h]),
            (&l.wv, vec![kv, h]),
            (&l.wo, vec![h, q]),
            (&l.ffn_norm, vec![h]),
            (&l.w_gate, vec![ff, h]),
            (&l.w_up, vec![ff, h]),
            (&l.w_down, vec![h, ff]),
        ]);
    }
    for (t, shape) in expected {
        if t.shape != shape {
            return Err(format!(
                "tensor {} has shape {:?}, expected {:?}",
                t.name, t.shape, shape
            ));
        }
        let bytes = t
            .format
            .row_bytes(t.cols())
            .and_then(|r| r.checked_mul(t.rows()));
        if bytes != Some(t.data.len()) {
            return Err(format!(
                "tensor {} holds {} bytes, which is not a whole {}-format {:?} tensor",
                t.name,
                t.data.len(),
                t.format.name(),
                t.shape
            ));
        }
    }
    Ok(())
}
