//! Model facts stored in an artifact: the hyper-parameters and token policy the runtime needs.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// ONNX `metadata_props` key of the facts (JSON) in a model kiln exported.
pub const ONNX_FACTS_KEY: &str = "kiln.facts";
/// ONNX `metadata_props` key of the tokenizer (kiln's binary codec, base64) in a model kiln exported.
pub const ONNX_TOKENIZER_KEY: &str = "kiln.tokenizer";

/// Hugging Face `rope_scaling` of type `llama3` (Llama 3.1 / 3.2).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: u32,
}

/// The sampling its authors recommend for a model (Hugging Face `generation_config.json`, GGUF
/// `general.sampling.*`): what a run uses where the user sets nothing, as llama.cpp does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
}

impl SamplingDefaults {
    /// Each value within the range a sampler takes (temperature finite and 0 or more, `top_p`
    /// in (0, 1], `min_p` in [0, 1]), or what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let within = |name: &str, v: Option<f32>, ok: fn(f32) -> bool, range: &str| match v {
            Some(v) if !(v.is_finite() && ok(v)) => {
                Err(format!("sampling {name} {v} is not {range}"))
            }
            _ => Ok(()),
        };
        within("temperature", self.temperature, |v| v >= 0.0, "0 or more")?;
        within("top_p", self.top_p, |v| v > 0.0 && v <= 1.0, "in (0, 1]")?;
        within(
            "min_p",
            self.min_p,
            |v| (0.0..=1.0).contains(&v),
            "in [0, 1]",
        )
    }
}

/// Everything about a Llama-family decoder that is not a weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    /// Human-readable model name (from the checkpoint).
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest context the model was trained for.
    pub context_length: usize,
    pub tie_word_embeddings: bool,
    pub bos_id: Option<u32>,
    /// Whether a BOS token is prepended to a prompt.
    pub add_bos: bool,
    /// Ids that end generation: EOS and every end-of-turn / end-of-generation id.
    pub eog_ids: Vec<u32>,
    /// The model's own Jinja chat template, when it has one.
    pub chat_template: Option<String>,
    /// Recommended sampling (absent from artifacts written before it was recorded).
    #[serde(default)]
    pub sampling: SamplingDefaults,
}

/// Bounds on a model's facts, far above any Llama 3 (405B has 126 layers, 16,384 wide, a
/// 128,256-token vocabulary and a 131,072-token context): a fact past them is a crafted or
/// corrupt file, refused before any size is computed from it.
const MAX_LAYERS: usize = 1024;
pub(crate) const MAX_WIDTH: usize = 1 << 17;
const MAX_VOCAB: usize = 1 << 22;
const MAX_HEADS: usize = 1024;
const MAX_HEAD_DIM: usize = 1024;
const MAX_CONTEXT: usize = 1 << 24;

impl ModelFacts {
    /// Each fact within its bounds and consistent with the others, or what is wrong: what the
    /// runtime checks when it loads an artifact, and the compiler when it imports a checkpoint.
    pub fn check(&self) -> Result<(), String> {
        let f = self;
        let counts = [
            ("layers", f.layers, MAX_LAYERS),
            ("hidden_size", f.hidden_size, MAX_WIDTH),
            ("intermediate_size", f.intermediate_size, MAX_WIDTH),
            ("vocab_size", f.vocab_size, MAX_VOCAB),
            ("heads", f.heads, MAX_HEADS),
            ("kv_heads", f.kv_heads, MAX_HEADS),
            ("head_dim", f.head_dim, MAX_HEAD_DIM),
            ("context_length", f.context_length, MAX_CONTEXT),
        ];
        for (name, value, max) in counts {
            if value == 0 || value > max {
                return Err(format!("{name} {value} is outside 1..={max}"));
            }
        }
        if !f.heads.is_multiple_of(f.kv_heads) || !f.head_dim.is_multiple_of(2) {
            return Err(format!(
                "{} heads, {} KV heads, head_dim {}: the heads must share KV heads evenly and \
                 head_dim must be even",
                f.heads, f.kv_heads, f.head_dim
            ));
        }
        for (name, value) in [("rms_eps", f.rms_eps), ("rope_theta", f.rope_theta)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!("{name} {value} must be a positive number"));
            }
        }
        let ids = f.bos_id.iter().chain(&f.eog_ids);
        if let Some(id) = ids.into_iter().find(|&&id| id as usize >= f.vocab_size) {
            return Err(format!(
                "token id {id} is outside the {}-token vocabulary",
                f.vocab_size
            ));
        }
        f.sampling.check()
    }

    /// RoPE inverse frequencies, one per rotated pair, with `llama3` scaling applied when set.
    ///
    /// Follows Meta's `apply_scaling` in `llama_models/llama3/reference_impl/model.py`.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling.as_ref())
    }
}

/// RoPE inverse frequencies for `head_dim`, base `theta`, optionally `llama3`-scaled.
pub fn rope_inv_freq(head_dim: usize, theta: f32, scaling: Option<&Llama3RopeScaling>) -> Vec<f32> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            let freq = 1.0 / libm::pow(f64::from(theta), (2 * i) as f64 / head_dim as f64);
            match scaling {
                None => freq as f32,
                Some(s) => llama3_scale(freq, s) as f32,
            }
        })
        .collect()
}

fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_ctx = f64::from(s.original_max_position_embeddings);
    let low_freq_wavelen = old_ctx / f64::from(s.low_freq_factor);
    let high_freq_wavelen = old_ctx / f64::from(s.high_freq_factor);
    let wavelen = 2.0 * core::f64::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / f64::from(s.factor)
    } else {
        let smooth = (old_ctx / wavelen - f64::from(s.low_freq_factor))
            / f64::from(s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / f64::from(s.factor) + smooth * freq
    }
}
