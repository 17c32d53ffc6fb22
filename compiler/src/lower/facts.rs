//! [`ModelFacts`] for a lowered model: the structure from the matched graph, RoPE parameters
//! that reproduce its frequencies, the rest from kiln's metadata, a `config.json` beside the
//! model, and the tokenizer. Whatever the metadata or config states must agree with the graph.
//! Without any of them, a llama3-scaled model's context is `original × factor`.

use std::path::Path;

use kiln_runtime::model::{ModelFacts, SamplingDefaults};

use super::decoder::Structure;
use super::metadata::Metadata;
use super::tokenizer::TokenSource;
use crate::freqs::{fit, reproduces, Rope};

/// The facts, or what is inconsistent.
pub fn facts(
    model: &Path,
    graph: &Structure,
    meta: &Metadata,
    config: Option<&ModelFacts>,
    tokens: &TokenSource,
) -> Result<ModelFacts, String> {
    let stated: Vec<(&str, &ModelFacts)> = meta
        .facts
        .iter()
        .map(|f| ("the metadata (kiln.facts)", f))
        .chain(config.map(|f| ("config.json", f)))
        .collect();
    for (source, f) in &stated {
        agree(source, f, graph)?;
    }
    let rope = stated
        .iter()
        .map(|(_, f)| Rope {
            theta: f.rope_theta,
            scaling: f.rope_scaling,
        })
        .find(|r| reproduces(r, graph.head_dim, &graph.inv_freq))
        .or_else(|| fit(&graph.inv_freq, graph.head_dim))
        .ok_or_else(|| {
            format!(
                "the RoPE frequencies {:?} come from no base θ, with or without llama3 scaling",
                graph.inv_freq
            )
        })?;
    let context_length = stated
        .iter()
        .map(|(_, f)| f.context_length)
        .chain(meta.context_length)
        .next()
        // llama3 scaling stretches the pre-training context by `factor`.
        .or_else(|| {
            rope.scaling
                .map(|s| (s.original_max_position_embeddings as f32 * s.factor) as usize)
        })
        .ok_or(
            "the context length is unknown: the model has no model.context_length \
                metadata, no llama3 RoPE scaling and no config.json beside it",
        )?;
    let name = stated
        .iter()
        .map(|(_, f)| f.name.clone())
        .chain(meta.name.clone())
        .next()
        .or_else(|| model.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unnamed".to_owned());
    let mut eog_ids = tokens.eog_ids.clone();
    if eog_ids.is_empty() {
        eog_ids = meta.eos_token_ids.clone().unwrap_or_default();
    }
    if tokens.data.vocab_size() > graph.vocab {
        return Err(format!(
            "the tokenizer's {} tokens do not fit the model's vocabulary of {}",
            tokens.data.vocab_size(),
            graph.vocab
        ));
    }
    if let Some(id) = eog_ids
        .iter()
        .chain(&tokens.bos_id)
        .find(|&&id| id as usize >= graph.vocab)
    {
        return Err(format!(
            "token id {id} is outside the vocabulary of {}",
            graph.vocab
        ));
    }
    Ok(ModelFacts {
        name,
        vocab_size: graph.vocab,
        hidden_size: graph.hidden,
        intermediate_size: graph.intermediate,
        layers: graph.layers,
        heads: graph.heads,
        kv_heads: graph.kv_heads,
        head_dim: graph.head_dim,
        rms_eps: graph.rms_eps,
        rope_theta: rope.theta,
        rope_scaling: rope.scaling,
        context_length,
        tie_word_embeddings: graph.tied,
        bos_id: tokens.bos_id,
        add_bos: tokens.add_bos,
        eog_ids,
        chat_template: tokens.chat_template.clone(),
        sampling: stated
            .iter()
            .map(|(_, f)| f.sampling)
            .find(|s| *s != SamplingDefaults::default())
            .unwrap_or_default(),
    })
}

/// Checks stated facts against the graph's.
fn agree(source: &str, f: &ModelFacts, graph: &Structure) -> Result<(), String> {
    let pairs = [
        ("vocab_size", f.vocab_size, graph.vocab),
        ("hidden_size", f.hidden_size, graph.hidden),
        ("intermediate_size", f.intermediate_size, graph.intermediate),
        ("layers", f.layers, graph.layers),
        ("heads", f.heads, graph.heads),
        ("kv_heads", f.kv_heads, graph.kv_heads),
        ("head_dim", f.head_dim, graph.head_dim),
    ];
    if let Some((key, said, found)) = pairs.iter().find(|(_, a, b)| a != b) {
        return Err(format!("{source} says {key} {said}, the graph has {found}"));
    }
    if (f.rms_eps - graph.rms_eps).abs() > 1e-6 * f.rms_eps.abs().max(1e-6) {
        return Err(format!(
            "{source} says rms_eps {}, the graph has {}",
            f.rms_eps, graph.rms_eps
        ));
    }
    Ok(())
}
