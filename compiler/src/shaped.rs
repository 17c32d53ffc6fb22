//! Checkpoints with the exact shapes of the Llama 3 models users run (3.2 1B and 3B, 3.1 8B)
//! and seeded random weights, written as an f16 GGUF that llama.cpp and kiln both read, with
//! Meta's tokenizer and the Llama 3.2 chat template inside. Speed and memory do not depend on
//! the weights' values, so these stand in for the gated downloads in benchmarks.

use std::io::Write;
use std::path::Path;

use half::f16;
use kiln_engine::tokenizer::TokenizerData;
use kiln_runtime::model::{rope_inv_freq, Llama3RopeScaling};
use kiln_runtime::quant::Format;
use serde_json::Value as Json;

use crate::gguf_write::{self, GgufTensor, TensorBytes};
use crate::import::gguf::Value;
use crate::tiny::{SplitMix64, CHAT_TEMPLATE};

/// One released model's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub tied: bool,
    /// `rope_scaling.factor` of its `config.json` (`llama3` type).
    pub rope_factor: f32,
}

pub const VOCAB: usize = 128_256;
const CONTEXT: usize = 131_072;
const ROPE_THETA: f32 = 500_000.0;
const BOS: u32 = 128_000;
/// `<|eot_id|>`, the Instruct models' end of turn.
const EOS: u32 = 128_009;
/// transformers' `initializer_range`: the weights are uniform with this standard deviation.
const INIT_STD: f32 = 0.02;

/// The shapes, by the names `--shape` takes (from each model's `config.json`).
pub const SHAPES: [Shape; 3] = [
    Shape {
        name: "llama3.2-1b",
        hidden: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        ffn: 8192,
        tied: true,
        rope_factor: 32.0,
    },
    Shape {
        name: "llama3.2-3b",
        hidden: 3072,
        layers: 28,
        heads: 24,
        kv_heads: 8,
        head_dim: 128,
        ffn: 8192,
        tied: true,
        rope_factor: 32.0,
    },
    Shape {
        name: "llama3.1-8b",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ffn: 14336,
        tied: false,
        rope_factor: 8.0,
    },
];

impl Shape {
    pub fn find(name: &str) -> Option<Shape> {
        SHAPES.into_iter().find(|s| s.name == name)
    }

    pub fn scaling(&self) -> Llama3RopeScaling {
        Llama3RopeScaling {
            factor: self.rope_factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }

    /// Every tensor's GGUF name and shape (rows, columns), in llama.cpp's order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        let mut t = vec![
            ("token_embd.weight".to_owned(), vec![VOCAB, d]),
            ("rope_freqs.weight".to_owned(), vec![self.head_dim / 2]),
        ];
        for i in 0..self.layers {
            for (name, shape) in [
                ("attn_norm", vec![d]),
                ("attn_q", vec![q, d]),
                ("attn_k", vec![kv, d]),
                ("attn_v", vec![kv, d]),
                ("attn_output", vec![d, q]),
                ("ffn_norm", vec![d]),
                ("ffn_gate", vec![self.ffn, d]),
                ("ffn_up", vec![self.ffn, d]),
                ("ffn_down", vec![d, self.ffn]),
            ] {
                t.push((format!("blk.{i}.{name}.weight"), shape));
            }
        }
        t.push(("output_norm.weight".to_owned(), vec![d]));
        if !self.tied {
            t.push(("output.weight".to_owned(), vec![VOCAB, d]));
        }
        t
    }

    /// Parameters, as the models report them.
    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .filter(|(n, _)| n != "rope_freqs.weight")
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Why a shaped checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ShapedError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: tokenizer: {what}")]
    Tokenizer {
        path: std::path::PathBuf,
        what: String,
    },
}

/// A vocabulary as llama.cpp's GGUF keys hold it.
struct Vocabulary {
    /// Byte-level spelled tokens (special ones as their text).
    tokens: Vec<String>,
    /// 1 normal, 3 control.
    types: Vec<i32>,
    /// `"a b"`, by rank.
    merges: Vec<String>,
}

/// Meta's vocabulary, through kiln's conversion to a Hugging Face `tokenizer.json`.
fn vocabulary(tokenizer_model: &Path) -> Result<Vocabulary, ShapedError> {
    let bad = |what: String| ShapedError::Tokenizer {
        path: tokenizer_model.to_path_buf(),
        what,
    };
    let bytes = std::fs::read(tokenizer_model).map_err(|source| ShapedError::Io {
        path: tokenizer_model.to_path_buf(),
        source,
    })?;
    let json = TokenizerData::from_tiktoken(&bytes)
        .and_then(|t| t.to_tokenizer_json())
        .map_err(|e| bad(e.to_string()))?;
    let json: Json = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
    let mut tokens = vec![String::new(); VOCAB];
    let mut types = vec![1i32; VOCAB];
    let vocab = json["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab".into()))?;
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad("a vocab id is not a number".into()))? as usize;
        if let Some(slot) = tokens.get_mut(id) {
            slot.clone_from(text);
        }
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(text)) = (added["id"].as_u64(), added["content"].as_str()) {
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = text.to_owned();
                types[id as usize] = 3;
            }
        }
    }
    let merges = json["model"]["merges"]
        .as_array()
        .ok_or_else(|| bad("no model.merges".into()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => Some(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            )),
            _ => None,
        })
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| bad("a merge is neither \"a b\" nor [a, b]".into()))?;
    Ok(Vocabulary {
        tokens,
        types,
        merges,
    })
}

/// llama.cpp's `rope_freqs.weight`: the factor each frequency is divided by under `llama3`
/// scaling (1 for the high frequencies, `factor` for the low ones, blended between).
pub fn rope_factors(shape: &Shape) -> Vec<f32> {
    let plain = rope_inv_freq(shape.head_dim, ROPE_THETA, None);
    let scaled = rope_inv_freq(shape.head_dim, ROPE_THETA, Some(&shape.scaling()));
    plain.iter().zip(&scaled).map(|(p, s)| p / s).collect()
}

/// Writes `shape` with weights drawn from `seed` to `path` (atomically) as an f16 GGUF;
/// `on_tensor(i, count)` reports progress.
pub fn write_gguf(
    shape: &Shape,
    seed: u64,
    tokenizer_model: &Path,
    path: &Path,
    on_tensor: impl FnMut(usize),
) -> Result<u64, ShapedError> {
    let Vocabulary {
        tokens,
        types,
        merges,
    } = vocabulary(tokenizer_model)?;
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let u32v = |v: usize| Value::U32(v as u32);
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        (
            "general.name",
            Value::String(format!("kiln {} shape, random weights", shape.name)),
        ),
        ("general.file_type", Value::U32(1)),
        ("llama.vocab_size", u32v(VOCAB)),
        ("llama.context_length", u32v(CONTEXT)),
        ("llama.embedding_length", u32v(shape.hidden)),
        ("llama.block_count", u32v(shape.layers)),
        ("llama.feed_forward_length", u32v(shape.ffn)),
        ("llama.attention.head_count", u32v(shape.heads)),
        ("llama.attention.head_count_kv", u32v(shape.kv_heads)),
        ("llama.attention.key_length", u32v(shape.head_dim)),
        ("llama.attention.value_length", u32v(shape.head_dim)),
        ("llama.rope.dimension_count", u32v(shape.head_dim)),
        ("llama.rope.freq_base", Value::F32(ROPE_THETA)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("llama-bpe".into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(BOS)),
        ("tokenizer.ggml.eos_token_id", Value::U32(EOS)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        (
            "tokenizer.chat_template",
            Value::String(CHAT_TEMPLATE.into()),
        ),
        ("general.quantization_version", Value::U32(2)),
    ];
    let factors = rope_factors(shape);
    let tensors: Vec<GgufTensor> = shape
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (name, dims))| {
            let n: usize = dims.iter().product();
            let seed = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let (format, bytes): (Format, TensorBytes<'static>) = if name == "rope_freqs.weight" {
                let factors = factors.clone();
                (
                    Format::F32,
                    Box::new(move |out| {
                        let b: Vec<u8> = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
                        out.write_all(&b)
                    }),
                )
            } else if dims.len() == 1 {
                (
                    Format::F32,
                    Box::new(move |out| out.write_all(&1f32.to_le_bytes().repeat(n))),
                )
            } else {
                (Format::F16, Box::new(move |out| random_f16(seed, n, out)))
            };
            GgufTensor {
                name,
                shape: dims,
                format,
                bytes,
            }
        })
        .collect();
    gguf_write::write(path, &metadata, &tensors, on_tensor).map_err(|source| ShapedError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `n` f16 values uniform in ±√3·[`INIT_STD`] (standard deviation `INIT_STD`), from `seed`,
/// written a chunk at a time.
fn random_f16(seed: u64, n: usize, out: &mut dyn Write) -> std::io::Result<()> {
    let mut rng = SplitMix64(seed);
    let scale = INIT_STD * 3f32.sqrt() / (1u64 << 31) as f32;
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut left = n;
    while left > 0 {
        let k = left.min(1 << 19);
        chunk.clear();
        for _ in 0..k / 2 + k % 2 {
            let r = rng.next_u64();
            for half in [r as u32, (r >> 32) as u32] {
                let v = (half as i32) as f32 * scale;
                chunk.extend_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        chunk.truncate(2 * k);
        out.write_all(&chunk)?;
        left -= k;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes' parameter counts are the released models' (1.24 B, 3.21 B, 8.03 B).
    #[test]
    fn parameter_counts_match_the_models() {
        let billions = |name: &str| Shape::find(name).expect(name).parameters() as f64 / 1e9;
        assert!((billions("llama3.2-1b") - 1.236).abs() < 0.01);
        assert!((billions("llama3.2-3b") - 3.213).abs() < 0.01);
        assert!((billions("llama3.1-8b") - 8.030).abs() < 0.01);
    }

    /// llama.cpp's factors: 1 for the highest frequencies, `factor` for the lowest.
    #[test]
    fn rope_factors_run_from_one_to_the_factor() {
        let s = Shape::find("llama3.2-1b").expect("1b");
        let f = rope_factors(&s);
        assert_eq!(f.len(), 32);
        assert!(
            (f[0] - 1.0).abs() < 1e-6 && (f[31] - 32.0).abs() < 1e-3,
            "{f:?}"
        );
    }
}
