//! Options and helpers shared by the subcommands: model loading, threads, sampling flags.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use kiln_engine::constrain::Constraint;
use kiln_engine::generate::Model;
use kiln_engine::onnxrt::{Ep, OrtModel, OrtOptions};
use kiln_runtime::artifact::Residency;
use kiln_runtime::exec::{KvType, SessionOptions};
use kiln_runtime::model::SamplingDefaults;
use kiln_runtime::sampler::SamplerConfig;

/// Which engine runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// By the file: `.onnx` → ort, anything else → native.
    Auto,
    /// kiln's own executor over a `.kiln` artifact.
    Native,
    /// onnxruntime over an ONNX model written by `cargo xtask export`.
    Ort,
}

/// The model and how to run it.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// The model: a compiled `.kiln` artifact, or an `.onnx` from `cargo xtask export` (ort backend).
    #[arg(value_name = "MODEL", required_unless_present = "model_flag")]
    model_path: Option<PathBuf>,
    /// The model, given as llama.cpp's `-m` gives it (instead of MODEL).
    #[arg(
        short = 'm',
        long = "model",
        value_name = "MODEL",
        conflicts_with = "model_path"
    )]
    model_flag: Option<PathBuf>,
    /// The engine: kiln's own (native) or onnxruntime (ort).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// onnxruntime execution providers in order of preference, comma-separated: cpu, xnnpack,
    /// cuda, tensorrt, qnn, nnapi, coreml, openvino, acl (ort backend; default cpu).
    #[arg(long, value_delimiter = ',')]
    pub ep: Vec<String>,
    /// Run on the CPU when a requested execution provider is not in the library (default: fail).
    #[arg(long)]
    pub ep_fallback: bool,
    /// The libonnxruntime to load (default: $ORT_DYLIB_PATH, then the kiln cache, then the system's).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Worker threads (default: the number of physical cores, as llama.cpp).
    #[arg(short = 't', long, value_parser = count(1, MAX_THREADS))]
    pub threads: Option<usize>,
    /// Context length in tokens (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size", visible_alias = "ctx", value_parser = count(1, MAX_CONTEXT))]
    pub ctx: Option<usize>,
    /// How the KV cache stores keys and values: f16 (half the memory) or f32 (native backend).
    #[arg(long = "cache-type", value_enum, default_value_t = CacheType::F16)]
    pub cache_type: CacheType,
    /// Map the artifact instead of reading it into (huge-page) memory: nothing copied and only
    /// touched pages resident, but decode reads the weights through 4 KiB page-cache pages,
    /// slower on most machines (native backend).
    #[arg(long)]
    pub mmap: bool,
}

/// `--cache-type`, as llama.cpp's `--cache-type-k`/`-v` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheType {
    F16,
    F32,
}

/// Most threads `-t` may ask for.
const MAX_THREADS: u64 = 1024;
/// Longest context `-c` may ask for (Llama 3.1's 128K, and some).
const MAX_CONTEXT: u64 = 1 << 20;
/// Most tokens the penalties may look back over.
const MAX_PENALTY_WINDOW: u64 = 1 << 20;

/// A whole number from `lo` to `hi`, checked when the flag is parsed.
fn count(lo: u64, hi: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(lo..=hi)
}

/// A flag's number that must be finite and pass `ok`; the error says `range`.
fn real(ok: fn(f32) -> bool, range: &'static str) -> impl Fn(&str) -> Result<f32, String> + Clone {
    move |text: &str| {
        let v: f32 = text.parse().map_err(|e| format!("{e}"))?;
        if v.is_finite() && ok(v) {
            Ok(v)
        } else {
            Err(format!("{v} must be {range}"))
        }
    }
}

impl ModelArgs {
    /// The model file, however it was given.
    pub fn path(&self) -> &Path {
        self.model_flag
            .as_deref()
            .or(self.model_path.as_deref())
            .unwrap_or(Path::new(""))
    }

    pub fn load(&self) -> anyhow::Result<Model> {
        let path = self.path();
        // A FIFO or a device would block or stream forever; a model is a file.
        let meta = std::fs::metadata(path)
            .with_context(|| format!("reading the model {}", path.display()))?;
        if !meta.is_file() {
            anyhow::bail!("the model {} is not a regular file", path.display());
        }
        let ort = match self.backend {
            Backend::Ort => true,
            Backend::Native => false,
            Backend::Auto => path.extension().is_some_and(|e| e == "onnx"),
        };
        if !ort {
            // The error names the file already.
            let residency = if self.mmap {
                Residency::Map
            } else {
                Residency::Load
            };
            return Ok(Model::open_as(path, residency)?);
        }
        let eps = self
            .ep
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                Ep::parse(e).with_context(|| {
                    let known: Vec<&str> = Ep::ALL.iter().map(|e| e.key()).collect();
                    format!(
                        "unknown execution provider {e:?} (one of {})",
                        known.join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<Vec<Ep>>>()?;
        let opts = OrtOptions {
            library: self.ort_lib.clone(),
            eps,
            fallback_to_cpu: self.ep_fallback,
            threads: self.threads(),
        };
        let model = OrtModel::load(path, &opts)?;
        eprintln!("kiln: {} running {}", model.describe(), path.display());
        Ok(Model::from_ort(model)?)
    }

    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            context: self.ctx.unwrap_or(0),
            threads: self.threads(),
            kv_type: match self.cache_type {
                CacheType::F16 => KvType::F16,
                CacheType::F32 => KvType::F32,
            },
            ..SessionOptions::default()
        }
    }

    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(default_threads).max(1)
    }
}

/// Physical cores when the kernel says, else the logical ones.
fn default_threads() -> usize {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let (mut phys, mut core) = (None, None);
    for line in cpuinfo.lines() {
        let value = || line.split(':').nth(1).map(|v| v.trim().to_owned());
        if line.starts_with("physical id") {
            phys = value();
        } else if line.starts_with("core id") {
            core = value();
        } else if line.trim().is_empty() {
            if let (Some(p), Some(c)) = (phys.take(), core.take()) {
                cores.insert((p, c));
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

/// Sampling flags, named and defaulted as llama.cpp's.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy [default: the model's recommendation (its generation_config),
    /// else 0.8].
    #[arg(long = "temp", value_parser = real(|v| v >= 0.0, "0 or more"))]
    pub temp: Option<f32>,
    /// Keep the k most likely tokens (0 = off) [default: the model's, else 40].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold (1 = off) [default: the model's, else 0.95].
    #[arg(long, value_parser = real(|v| v > 0.0 && v <= 1.0, "in (0, 1]"))]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the top probability (0 = off) [default: the model's,
    /// else 0.05].
    #[arg(long, value_parser = real(|v| (0.0..=1.0).contains(&v), "in [0, 1]"))]
    pub min_p: Option<f32>,
    /// Penalize recently generated tokens (1 = off).
    #[arg(long, default_value_t = SamplerConfig::default().repeat_penalty,
          value_parser = real(|v| v > 0.0, "more than 0"))]
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties consider.
    #[arg(long, default_value_t = SamplerConfig::default().repeat_last_n,
          value_parser = count(0, MAX_PENALTY_WINDOW))]
    pub repeat_last_n: usize,
    /// Lower a recent token's logit by this × how often it occurs (0 = off).
    #[arg(long, default_value_t = 0.0, value_parser = real(|v| (-2.0..=2.0).contains(&v), "in [-2, 2]"))]
    pub frequency_penalty: f32,
    /// Lower the logit of every recent token by this (0 = off).
    #[arg(long, default_value_t = 0.0, value_parser = real(|v| (-2.0..=2.0).contains(&v), "in [-2, 2]"))]
    pub presence_penalty: f32,
    /// Random seed: sampling is reproducible for a seed (run and chat: a fixed one by default;
    /// serve: a random one per request unless the request or this flag gives one).
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Stop when this text is generated (repeatable; the text is cut before it).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The sampler: each flag given, else the model's recommendation, else llama.cpp's default
    /// (as llama.cpp reads `general.sampling.*`).
    pub fn config(&self, model: &SamplingDefaults) -> SamplerConfig {
        let base = SamplerConfig::for_model(model);
        SamplerConfig {
            temperature: self.temp.unwrap_or(base.temperature),
            top_k: self.top_k.unwrap_or(base.top_k),
            top_p: self.top_p.unwrap_or(base.top_p),
            min_p: self.min_p.unwrap_or(base.min_p),
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed.unwrap_or(SamplerConfig::DEFAULT_SEED),
        }
    }
}

/// Constrained output: what every generated token must keep possible.
#[derive(Args, Clone, Default)]
pub struct ConstraintArgs {
    /// A JSON Schema the output must validate against: inline (`'{"type": "object", …}'`) or a
    /// file. The output is compact JSON.
    #[arg(
        short = 'j',
        long,
        value_name = "SCHEMA|FILE",
        conflicts_with = "grammar"
    )]
    pub json_schema: Option<String>,
    /// A grammar the output must match, in llguidance's Lark dialect (a `.lark` file).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

impl ConstraintArgs {
    /// The constraint the flags name, if any.
    pub fn constraint(&self) -> anyhow::Result<Option<Constraint>> {
        if let Some(schema) = &self.json_schema {
            let text = if schema.trim_start().starts_with('{') {
                schema.clone()
            } else {
                std::fs::read_to_string(schema)
                    .with_context(|| format!("--json-schema: reading {schema}"))?
            };
            let value = serde_json::from_str(&text)
                .with_context(|| format!("--json-schema {schema}: not JSON"))?;
            return Ok(Some(Constraint::JsonSchema(value)));
        }
        if let Some(path) = &self.grammar {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--grammar: reading {}", path.display()))?;
            return Ok(Some(Constraint::Lark(text)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sampling: SamplingArgs,
    }

    /// A flag beats the model's recommendation, which beats llama.cpp's default.
    #[test]
    fn flags_then_the_models_sampling_then_the_defaults() {
        let model = SamplingDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            ..SamplingDefaults::default()
        };
        let none = Cli::parse_from(["kiln"]).sampling;
        let c = none.config(&model);
        let d = SamplerConfig::default();
        assert_eq!(
            (c.temperature, c.top_p, c.top_k, c.min_p),
            (0.6, 0.9, d.top_k, d.min_p)
        );
        let flags = Cli::parse_from(["kiln", "--temp", "0", "--top-k", "5"]).sampling;
        let c = flags.config(&model);
        assert_eq!((c.temperature, c.top_p, c.top_k), (0.0, 0.9, 5));
        let c = none.config(&SamplingDefaults::default());
        assert_eq!((c.temperature, c.top_p), (d.temperature, d.top_p));
    }
}
