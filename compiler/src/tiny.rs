//! A tiny random checkpoint with Llama 3.2's structure (128256-token vocabulary, GQA, `llama3`
//! RoPE scaling, tied embeddings, Llama 3 token policy) in the Hugging Face layout, so the whole
//! pipeline can be tested without downloading real weights.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::bf16;
use kiln_engine::tokenizer::{TokenizerData, TokenizerError};
use safetensors::tensor::{Dtype, SafeTensorError, TensorView};
use serde_json::{json, Value};

const VOCAB_SIZE: usize = 128_256;
const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTERMEDIATE: usize = 128;
const BOS: u32 = 128_000;
/// `<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`, as Llama 3.2 Instruct lists them.
const EOS: [u32; 3] = [128_001, 128_008, 128_009];
/// Standard deviation of the random weights (transformers' `initializer_range`).
const INIT_STD: f64 = 0.02;

/// Llama 3.2 Instruct's own chat template.
pub(crate) const CHAT_TEMPLATE: &str = include_str!("../../testdata/chat/llama-3.2-instruct.jinja");

/// Why the tiny checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        source: TokenizerError,
    },
    #[error("serializing safetensors: {0}")]
    Safetensors(#[from] SafeTensorError),
}

/// Writes the checkpoint into `dir` (created if missing): `config.json`,
/// `generation_config.json`, `model.safetensors` (bf16), `tokenizer.json` converted from Meta's
/// Llama 3 `tokenizer.model` at `tokenizer_model`, and `tokenizer_config.json` with the
/// Llama 3.2 Instruct chat template.
///
/// The same seed always writes the same bytes. Every file is replaced atomically, and
/// `config.json` comes last, so a directory with a new `config.json` is complete.
pub fn write_checkpoint(dir: &Path, seed: u64, tokenizer_model: &Path) -> Result<(), TinyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TinyError::Io { path, source }
    };
    let model_bytes = std::fs::read(tokenizer_model).map_err(io(tokenizer_model))?;
    let tokenizer_json = tokenizer_json(&model_bytes).map_err(|source| TinyError::Tokenizer {
        path: tokenizer_model.to_path_buf(),
        source,
    })?;
    let weights = weights(seed)?;

    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // A stale index from an earlier sharded checkpoint would take precedence over the new file.
    let index = dir.join("model.safetensors.index.json");
    match std::fs::remove_file(&index) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&index)(e)),
        _ => {}
    }
    write_atomic(&dir.join("model.safetensors"), &weights)?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json)?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config())?;
    write_json(&dir.join("generation_config.json"), &generation_config())?;
    write_json(&dir.join("config.json"), &config())
}

/// Meta's vocabulary as a `tokenizer.json`, with the BOS template that Llama 3's Hugging Face
/// tokenizers carry (the plain conversion has none).
fn tokenizer_json(tiktoken_model: &[u8]) -> Result<Value, TokenizerError> {
    let converted = TokenizerData::from_tiktoken(tiktoken_model)?.to_tokenizer_json()?;
    let mut json: Value =
        serde_json::from_str(&converted).map_err(|e| TokenizerError::Json(e.to_string()))?;
    let bos = json!({ "SpecialToken": { "id": "<|begin_of_text|>", "type_id": 0 } });
    let template = json!({
        "type": "TemplateProcessing",
        "single": [bos, { "Sequence": { "id": "A", "type_id": 0 } }],
        "pair": [
            bos,
            { "Sequence": { "id": "A", "type_id": 0 } },
            { "SpecialToken": { "id": "<|begin_of_text|>", "type_id": 1 } },
            { "Sequence": { "id": "B", "type_id": 1 } }
        ],
        "special_tokens": {
            "<|begin_of_text|>": { "id": "<|begin_of_text|>", "ids": [BOS], "tokens": ["<|begin_of_text|>"] }
        }
    });
    let byte_level = json["post_processor"].take();
    json["post_processor"] = json!({ "type": "Sequence", "processors": [byte_level, template] });
    Ok(json)
}

/// Llama 3.2 1B Instruct's `config.json`, shrunk.
fn config() -> Value {
    json!({
        "_name_or_path": "kiln-tiny-llama3",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 131_072,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3"
        },
        "rope_theta": 500_000.0,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "use_cache": true,
        "vocab_size": VOCAB_SIZE
    })
}

fn generation_config() -> Value {
    json!({
        "bos_token_id": BOS,
        "do_sample": true,
        "eos_token_id": EOS,
        "temperature": 0.6,
        "top_p": 0.9
    })
}

fn tokenizer_config() -> Value {
    json!({
        "bos_token": "<|begin_of_text|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": true,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131_072,
        "tokenizer_class": "PreTrainedTokenizerFast"
    })
}

/// Each layer's tensors: name, shape, and the value they scatter around (norm weights near 1).
const LAYER_TENSORS: [(&str, &[usize], f64); 9] = [
    ("input_layernorm", &[HIDDEN], 1.0),
    ("self_attn.q_proj", &[HEADS * HEAD_DIM, HIDDEN], 0.0),
    ("self_attn.k_proj", &[KV_HEADS * HEAD_DIM, HIDDEN], 0.0),
    ("self_attn.v_proj", &[KV_HEADS * HEAD_DIM, HIDDEN], 0.0),
    ("self_attn.o_proj", &[HIDDEN, HEADS * HEAD_DIM], 0.0),
    ("post_attention_layernorm", &[HIDDEN], 1.0),
    ("mlp.gate_proj", &[INTERMEDIATE, HIDDEN], 0.0),
    ("mlp.up_proj", &[INTERMEDIATE, HIDDEN], 0.0),
    ("mlp.down_proj", &[HIDDEN, INTERMEDIATE], 0.0),
];

/// Every tensor, drawn in a fixed order from one stream; `model.safetensors` bytes.
fn weights(seed: u64) -> Result<Vec<u8>, SafeTensorError> {
    let mut rng = SplitMix64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: &[usize], center: f64| {
        let n = shape.iter().product();
        let values =
            (0..n).flat_map(|_| bf16::from_f64(center + INIT_STD * rng.normal()).to_le_bytes());
        tensors.push((name, shape.to_vec(), values.collect()));
    };
    add(
        "model.embed_tokens.weight".into(),
        &[VOCAB_SIZE, HIDDEN],
        0.0,
    );
    for i in 0..LAYERS {
        for (suffix, shape, center) in LAYER_TENSORS {
            add(format!("model.layers.{i}.{suffix}.weight"), shape, center);
        }
    }
    add("model.norm.weight".into(), &[HIDDEN], 1.0);

    let views = tensors
        .iter()
        .map(|(name, shape, data)| Ok((name, TensorView::new(Dtype::BF16, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, SafeTensorError>>()?;
    let metadata = [("format".to_owned(), "pt".to_owned())]
        .into_iter()
        .collect();
    safetensors::serialize(views, Some(metadata))
}

/// SplitMix64: a tiny seedable generator whose output is the same on every platform.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal by Box–Muller, through `libm` so the draws do not depend on the
    /// platform's math library.
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        libm::sqrt(-2.0 * libm::log(u1)) * libm::cos(2.0 * std::f64::consts::PI * u2)
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), TinyError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| TinyError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Writes beside `path` and renames over it, so readers never see a partial file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TinyError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|source| {
        // Best effort: the error being reported matters more than a leftover temporary.
        let _ = std::fs::remove_file(&tmp);
        TinyError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}
