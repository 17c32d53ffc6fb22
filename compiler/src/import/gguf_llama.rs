//! GGUF `llama` architecture → canonical [`Checkpoint`] (undoes llama.cpp's Q/K row permutation).

use std::path::Path;

use kiln_engine::tokenizer::TokenizerData;
use kiln_runtime::model::{ModelFacts, SamplingDefaults};

use super::gguf::{GgufFile, TensorInfo};
use super::ImportError;
use crate::graph::{Checkpoint, LayerWeights, LlamaWeights, Tensor};

/// Reads a llama.cpp GGUF of a Llama-family model.
pub fn import(path: &Path) -> Result<Checkpoint, ImportError> {
    let file = GgufFile::open(path)?;
    let arch = file.string("general.architecture").unwrap_or("").to_owned();
    if arch != "llama" {
        return Err(ImportError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            architecture: arch,
        });
    }
    let mut facts = facts(&file)?;
    facts.rope_scaling = rope_scaling(&file, &facts)?;
    let tokenizer = tokenizer(&file)?;
    let weights = weights(&file, &facts)?;
    facts.tie_word_embeddings = weights.lm_head.is_none();
    Ok(Checkpoint {
        facts,
        tokenizer,
        weights,
    })
}

/// Llama 3's `llama3` RoPE scaling, which llama.cpp's converter stores as `rope_freqs.weight`
/// (the factor each frequency is divided by): the scaled frequencies must be ones kiln's
/// formula makes, else the file is refused naming the tensor.
fn rope_scaling(
    file: &GgufFile,
    facts: &ModelFacts,
) -> Result<Option<kiln_runtime::model::Llama3RopeScaling>, ImportError> {
    let Some(info) = file.tensors.get("rope_freqs.weight") else {
        return Ok(None);
    };
    let half = facts.head_dim / 2;
    let corrupt = |what: String| ImportError::Corrupt {
        path: file.path().to_path_buf(),
        what: format!("rope_freqs.weight: {what}"),
    };
    if info.format != kiln_runtime::quant::Format::F32 || info.dims != [half as u64] {
        return Err(corrupt(format!(
            "expected {half} f32 factors, found {:?} {}",
            info.dims,
            info.format.name()
        )));
    }
    let plain = kiln_runtime::model::rope_inv_freq(facts.head_dim, facts.rope_theta, None);
    let scaled: Vec<f64> = file
        .tensor_bytes(info)
        .chunks_exact(4)
        .zip(&plain)
        .map(|(b, &p)| f64::from(p) / f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    match crate::freqs::fit(&scaled, facts.head_dim) {
        Some(rope) => Ok(rope.scaling),
        None => Err(corrupt(
            "these factors are not Llama 3's `llama3` RoPE scaling (the only one kiln implements)"
                .into(),
        )),
    }
}

fn facts(file: &GgufFile) -> Result<ModelFacts, ImportError> {
    let usize_of = |key: &str| file.require_u64(key).map(|v| v as usize);
    let hidden_size = usize_of("llama.embedding_length")?;
    let heads = usize_of("llama.attention.head_count")?;
    let kv_heads = match file.metadata.get("llama.attention.head_count_kv") {
        Some(_) => usize_of("llama.attention.head_count_kv")?,
        None => heads,
    };
    if heads == 0 || kv_heads == 0 || hidden_size % heads != 0 || heads % kv_heads != 0 {
        return Err(ImportError::Corrupt {
            path: file.path().to_path_buf(),
            what: format!("inconsistent attention shape: {hidden_size} wide, {heads} heads, {kv_heads} KV heads"),
        });
    }
    let head_dim = match file.metadata.get("llama.rope.dimension_count") {
        Some(_) => usize_of("llama.rope.dimension_count")?,
        None => hidden_size / heads,
    };
    // RoPE rotates pairs; the Q/K row permutation divides by half a head.
    if head_dim == 0 || head_dim % 2 != 0 || heads.checked_mul(head_dim).is_none() {
        return Err(ImportError::Corrupt {
            path: file.path().to_path_buf(),
            what: format!(
                "head dimension {head_dim} is not a positive even number of a plausible size"
            ),
        });
    }
    let tokens = file
        .string_array("tokenizer.ggml.tokens")?
        .unwrap_or_default();
    let vocab_size = match file.metadata.get("llama.vocab_size") {
        Some(_) => usize_of("llama.vocab_size")?,
        None => tokens.len(),
    };
    let bos_id = file
        .metadata
        .get("tokenizer.ggml.bos_token_id")
        .and_then(|v| v.as_u64())
        .map(|v| v as u32);
    let add_bos = matches!(
        file.metadata.get("tokenizer.ggml.add_bos_token"),
        Some(super::gguf::Value::Bool(true))
    );
    Ok(ModelFacts {
        name: file.string("general.name").unwrap_or("unnamed").to_owned(),
        vocab_size,
        hidden_size,
        intermediate_size: usize_of("llama.feed_forward_length")?,
        layers: usize_of("llama.block_count")?,
        heads,
        kv_heads,
        head_dim,
        rms_eps: file.require_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        rope_theta: match file.metadata.get("llama.rope.freq_base") {
            Some(_) => file.require_f64("llama.rope.freq_base")? as f32,
            None => 10_000.0,
        },
        rope_scaling: None,
        context_length: usize_of("llama.context_length")?,
        tie_word_embeddings: true,
        bos_id,
        add_bos,
        eog_ids: end_of_generation_ids(file, &tokens),
        chat_template: file.string("tokenizer.chat_template").map(str::to_owned),
        sampling: sampling_defaults(file)?,
    })
}

/// llama.cpp's `general.sampling.*` keys (written from `generation_config.json` by its
/// converter); their ranges are checked with the other facts (`import::import`).
fn sampling_defaults(file: &GgufFile) -> Result<SamplingDefaults, ImportError> {
    let real = |key: &str| match file.metadata.get(key) {
        None => Ok(None),
        Some(_) => file.require_f64(key).map(|v| Some(v as f32)),
    };
    Ok(SamplingDefaults {
        temperature: real("general.sampling.temp")?,
        top_k: match file.metadata.get("general.sampling.top_k") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|k| u32::try_from(k).ok())
                    .ok_or_else(|| ImportError::Corrupt {
                        path: file.path().to_path_buf(),
                        what: "general.sampling.top_k is not a count".into(),
                    })?,
            ),
        },
        top_p: real("general.sampling.top_p")?,
        min_p: real("general.sampling.min_p")?,
    })
}

/// EOS, EOT and every vocabulary token llama.cpp treats as end-of-generation.
fn end_of_generation_ids(file: &GgufFile, tokens: &[String]) -> Vec<u32> {
    let mut ids: Vec<u32> = [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ]
    .iter()
    .filter_map(|k| file.metadata.get(*k).and_then(|v| v.as_u64()))
    .map(|v| v as u32)
    .collect();
    // The same names llama.cpp's vocabulary loader marks as end-of-generation.
    const EOG_TEXTS: [&str; 9] = [
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
    ];
    for (id, text) in tokens.iter().enumerate() {
        if EOG_TEXTS.contains(&text.as_str()) {
            ids.push(id as u32);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn tokenizer(file: &GgufFile) -> Result<TokenizerData, ImportError> {
    let path = file.path();
    let model = file.string("tokenizer.ggml.model").unwrap_or("");
    let pre = file.string("tokenizer.ggml.pre").unwrap_or("default");
    let tokens =
        file.string_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| ImportError::Corrupt {
                path: path.to_path_buf(),
                what: "metadata key tokenizer.ggml.tokens is missing".into(),
            })?;
    let types = file
        .i32_array("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    let merges = file
        .string_array("tokenizer.ggml.merges")?
        .unwrap_or_default();
    let id = |k: &str| {
        file.metadata
            .get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as u32)
    };
    TokenizerData::from_gguf(
        model,
        pre,
        &tokens,
        &types,
        &merges,
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
    )
    .map_err(|source| ImportError::Tokenizer {
        path: path.to_path_buf(),
        source,
    })
}

fn weights(file: &GgufFile, facts: &ModelFacts) -> Result<LlamaWeights, ImportError> {
    let (d, hd) = (facts.hidden_size, facts.head_dim);
    let tensor = |name: &str, expected: &[usize]| load(file, name, expected);
    let embed = tensor("token_embd.weight", &[facts.vocab_size, d])?;
    // `layers` comes from the file: reserve for a plausible count only, the tensors decide.
    let mut layers = Vec::with_capacity(facts.layers.min(1024));
    for i in 0..facts.layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let wq = tensor(&n("attn_q"), &[facts.heads * hd, d])?;
        let wk = tensor(&n("attn_k"), &[facts.kv_heads * hd, d])?;
        layers.push(LayerWeights {
            attn_norm: tensor(&n("attn_norm"), &[d])?,
            wq: unpermute_rope_rows(&wq, hd),
            wk: unpermute_rope_rows(&wk, hd),
            wv: tensor(&n("attn_v"), &[facts.kv_heads * hd, d])?,
            wo: tensor(&n("attn_output"), &[d, facts.heads * hd])?,
            ffn_norm: tensor(&n("ffn_norm"), &[d])?,
            w_gate: tensor(&n("ffn_gate"), &[facts.intermediate_size, d])?,
            w_up: tensor(&n("ffn_up"), &[facts.intermediate_size, d])?,
            w_down: tensor(&n("ffn_down"), &[d, facts.intermediate_size])?,
        });
    }
    let lm_head = match file.tensors.get("output.weight") {
        Some(_) => Some(tensor("output.weight", &[facts.vocab_size, d])?),
        None => None,
    };
    Ok(LlamaWeights {
        embed,
        layers,
        final_norm: tensor("output_norm.weight", &[d])?,
        lm_head,
    })
}

/// Loads a tensor and checks its shape (given in row-major order, ggml's dims reversed).
fn load(file: &GgufFile, name: &str, expected: &[usize]) -> Result<Tensor, ImportError> {
    let info: &TensorInfo = file
        .tensors
        .get(name)
        .ok_or_else(|| ImportError::MissingTensor {
            path: file.path().to_path_buf(),
            name: name.to_owned(),
        })?;
    let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
    if shape != expected {
        return Err(ImportError::Shape {
            path: file.path().to_path_buf(),
            name: name.to_owned(),
            found: shape,
            expected: expected.to_vec(),
        });
    }
    let t = Tensor {
        name: name.to_owned(),
        shape,
        format: info.format,
        data: file.tensor_bytes(info).to_vec(),
    };
    // Norm vectors are tiny; kernels read them as f32 whatever the file stored.
    Ok(if t.shape.len() == 1 {
        t.dequantized()
    } else {
        t
    })
}

/// llama.cpp's converter interleaves each head's rows (pair `i` of rotate-half RoPE becomes rows
/// `2i, 2i+1`) so its adjacent-pair RoPE matches; this puts them back in Hugging Face order.
fn unpermute_rope_rows(t: &Tensor, head_dim: usize) -> Tensor {
    let half = head_dim / 2;
    t.with_rows_from(|r| {
        let (head, within) = (r / head_dim, r % head_dim);
        let (j, i) = (within / half, within % half);
        head * head_dim + 2 * i + j
    })
}
