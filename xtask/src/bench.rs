//! `cargo xtask bench`: kiln beside llama.cpp on one machine — same model, quantization,
//! threads, prompt and token counts — run alternately (kiln, llama.cpp, kiln, llama.cpp, … per
//! configuration) so that the machine's noise hits both, with each figure's median, its spread
//! and the ratio kiln/llama.cpp, and decode speed against the memory-bandwidth bound.
//!
//! kiln runs as `kiln bench --reps 1 --json` (native over a `.kiln` artifact at each `--kernels`
//! level, or `--backend ort` over the MatMulNBits ONNX); llama.cpp as native `llama-bench` built
//! for the matching instruction set (`llama_bench.rs`), or through llama-cpp-python's low-level
//! API (`bench_llama_cpp.py`, embedded). Inputs are made once and cached under
//! `$KILN_HOME/artifacts`: the artifact per quantization (as `cargo xtask compile`), the ONNX
//! (as `cargo xtask export --quantized --quant`) and, for a quantization the model's GGUF is not
//! stored in, a GGUF written by llama.cpp's own quantizer.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use kiln_compiler::import::gguf::GgufFile;
use kiln_compiler::onnx::{export_quantized, ExportOptions};
use kiln_compiler::quant::Storage;
use kiln_engine::stats::Stats;
use kiln_runtime::artifact::{Artifact, Metadata, Op};
use kiln_runtime::kernels::Level;
use kiln_runtime::quant::Format;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::llama_bench::{self, Build, LlamaCpp};
use kiln_compiler::pipeline::{cache, compile, pypi, source};

/// llama.cpp's side, run as `python -c SCRIPT MODE ARGS…`.
const LLAMA_CPP_SCRIPT: &str = include_str!("bench_llama_cpp.py");
/// The binding the comparison was written against.
const LLAMA_CPP_PYTHON: &str = "llama-cpp-python==0.3.36";
/// Bytes the bandwidth triad's three arrays take: larger than the caches of the machines kiln
/// targets.
const BANDWIDTH_BYTES: usize = 3 << 28;
/// Passes of the triad; the fastest counts.
const BANDWIDTH_PASSES: usize = 5;

/// Who kiln is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// Native `llama-bench`, built from the llama.cpp in llama-cpp-python 0.3.36's sdist for
    /// each compared instruction set, with its defaults (repacked weights on).
    LlamaBench,
    /// llama.cpp through llama-cpp-python 0.3.36's low-level API (repacked weights off).
    LlamaCppPython,
    /// kiln alone.
    None,
}

/// Which kiln engine runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// kiln's own executor over a `.kiln` artifact.
    Native,
    /// onnxruntime over the MatMulNBits ONNX (`cargo xtask export --quantized`).
    Ort,
}

/// Benchmark kiln against llama.cpp: prompt and decode tokens/s, time to first token and peak
/// RSS (median ± spread over repetitions), their ratios, and decode speed against the
/// memory-bandwidth bound.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Every combination of --quant, --threads and --depth is one configuration; \
within it each repetition runs every kiln engine (each --backend, and each --kernels level of \
the native one) and then llama.cpp, each in a fresh process, so that the machine's noise hits \
all of them. Each process loads the model, fills the cache to the depth and makes one untimed \
warm-up pass before it measures.

--peer llama-bench (the default) builds native llama.cpp once per instruction set from the \
llama.cpp vendored in PyPI's llama-cpp-python 0.3.36 sdist (cmake, about 10 minutes on 2 \
cores, cached under $KILN_HOME/llama.cpp) and runs `llama-bench` with its defaults; each kiln \
level is compared with the llama.cpp build for the same instruction set (avx2 with an AVX2-only \
build, avxvnni with AVX2 + AVX-VNNI, avx512 and avx512vnni with -DGGML_NATIVE). llama.cpp runs \
the model's GGUF, or one its own llama-quantize writes for another --quant (token embedding and \
output head kept at q8_0, as kiln keeps them). --peer llama-cpp-python uses the Python binding \
(`pip install llama-cpp-python==0.3.36`) instead; --peer none (or --no-llama-cpp) leaves \
llama.cpp out.

The bound is decode speed if the bytes a step reads streamed at the machine's memory bandwidth, \
measured with a STREAM triad (a = b + s·c).

Examples:
  cargo xtask bench --quant q4_0,q4_1,q8_0 --threads 1,2 --kernels avx2,avx512vnni
  cargo xtask bench --model llama1b.f16.gguf --quant q4_0 --threads 1,2   (cargo xtask gen-shaped)
  cargo xtask bench --quant q4_1 --depth 0,512,1536 --backend native,ort --json"
)]
pub struct Args {
    /// The model: a card name (fetched on demand) or a GGUF file (llama.cpp needs a GGUF; a
    /// Hugging Face directory works with --no-llama-cpp).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Weight storage, comma-separated (q4_0, q4_1, q8_0, f16, f32).
    #[arg(long, value_delimiter = ',', default_value = "q4_1")]
    pub quant: Vec<String>,
    /// Worker threads, comma-separated (default: the logical CPUs).
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Prompt tokens (one pass).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    pub n_prompt: usize,
    /// Generated tokens (one step each).
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    pub n_gen: usize,
    /// Repetitions of each configuration and engine.
    #[arg(short = 'r', long, default_value_t = 3)]
    pub reps: usize,
    /// Tokens already cached when the prompt and decode run, comma-separated (speed at depth).
    #[arg(short = 'd', long, value_delimiter = ',', default_value = "0")]
    pub depth: Vec<usize>,
    /// kiln engines, comma-separated: native (`.kiln` artifact), ort (onnxruntime over ONNX).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "native")]
    pub backend: Vec<Backend>,
    /// kiln's kernel levels for the native engine, comma-separated (`KILN_KERNELS` names:
    /// generic, avx2, avxvnni, avx512, avx512vnni, neon, dotprod, i8mm); default: this CPU's best.
    /// With --arch aarch64: the levels to count (default: all three).
    #[arg(long, value_delimiter = ',')]
    pub kernels: Vec<String>,
    /// Who kiln is compared with: llama-bench (native llama.cpp), llama-cpp-python, none.
    #[arg(long, value_enum, default_value = "llama-bench")]
    pub peer: Peer,
    /// Leave llama.cpp out (kiln only); the same as --peer none.
    #[arg(long)]
    pub no_llama_cpp: bool,
    /// The `kiln` binary to measure (default: `cargo build --release --bin kiln`).
    #[arg(long, value_name = "PATH")]
    pub kiln: Option<PathBuf>,
    /// The libonnxruntime for `--backend ort` (default: the kiln cache's, fetched when missing).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Compile the artifacts, export the ONNX and write llama.cpp's GGUFs again even when cached.
    #[arg(long)]
    pub rebuild: bool,
    /// `aarch64`: instead of timing this machine, count the guest instructions per prompt and
    /// decoded token of kiln and llama.cpp cross-built for each aarch64 level under qemu-user
    /// (a deterministic proxy, not a speed; see `bench_arm.rs`), for the first --quant.
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// What to measure, checked.
#[derive(Debug, PartialEq)]
struct Plan {
    quants: Vec<Format>,
    threads: Vec<usize>,
    depths: Vec<usize>,
    backends: Vec<Backend>,
    levels: Vec<Level>,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
    peer: Peer,
}

/// `items` without repeats, in first-seen order.
fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for &item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
    ensure!(args.n_prompt >= 1, "-p must be at least 1 token");
    ensure!(args.n_gen >= 1, "-n must be at least 1 token");
    ensure!(args.reps >= 1, "--reps must be at least 1");
    ensure!(!args.quant.is_empty(), "--quant names no format");
    ensure!(!args.backend.is_empty(), "--backend names no engine");
    ensure!(!args.depth.is_empty(), "--depth names no depth");
    let quants = args
        .quant
        .iter()
        .map(
            |name| match kiln_compiler::pipeline::quantize::plan(name.trim(), &[])?.storage {
                Storage::Each(format) => Ok(format),
                _ => bail!(
                    "--quant {name}: bench compares one format at a time, not a mixture or copy"
                ),
            },
        )
        .collect::<anyhow::Result<Vec<Format>>>()?;
    let threads = if args.threads.is_empty() {
        vec![std::thread::available_parallelism().map_or(1, |n| n.get())]
    } else {
        ensure!(
            args.threads.iter().all(|&t| t >= 1),
            "--threads must be at least 1"
        );
        dedup(&args.threads)
    };
    let levels = if args.kernels.is_empty() {
        vec![Level::best()]
    } else {
        args.kernels
            .iter()
            .map(|name| {
                let level = Level::from_name(name.trim())?;
                level.check()?;
                Ok(level)
            })
            .collect::<Result<Vec<Level>, kiln_runtime::kernels::LevelError>>()?
    };
    Ok(Plan {
        quants: dedup(&quants),
        threads,
        depths: dedup(&args.depth),
        backends: dedup(&args.backend),
        levels: dedup(&levels),
        n_prompt: args.n_prompt,
        n_gen: args.n_gen,
        reps: args.reps,
        peer: if args.no_llama_cpp {
            Peer::None
        } else {
            args.peer
        },
    })
}

/// The llama.cpp build a kiln level is compared with: the same instruction set.
fn build_for(level: Level) -> Build {
    match level {
        Level::Avx2 => Build::Avx2,
        Level::AvxVnni => Build::AvxVnni,
        _ => Build::Native,
    }
}

/// Who ran a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// kiln native at a kernel level.
    Kiln(Level),
    KilnOrt,
    LlamaBench(Build),
    LlamaCppPython,
}

impl Engine {
    fn name(self) -> String {
        match self {
            Engine::Kiln(level) => format!("kiln {level}"),
            Engine::KilnOrt => "kiln-ort".to_owned(),
            Engine::LlamaBench(build) => format!("llama-bench {}", build.name()),
            Engine::LlamaCppPython => "llama-cpp-python".to_owned(),
        }
    }

    fn is_llama_cpp(self) -> bool {
        matches!(self, Engine::LlamaBench(_) | Engine::LlamaCppPython)
    }

    /// The llama.cpp engine a kiln engine is compared with under `peer`.
    fn peer(self, peer: Peer) -> Option<Engine> {
        match (peer, self) {
            (Peer::None, _) | (_, Engine::LlamaBench(_) | Engine::LlamaCppPython) => None,
            (Peer::LlamaCppPython, _) => Some(Engine::LlamaCppPython),
            (Peer::LlamaBench, Engine::Kiln(level)) => Some(Engine::LlamaBench(build_for(level))),
            (Peer::LlamaBench, Engine::KilnOrt) => Some(Engine::LlamaBench(Build::Native)),
        }
    }
}

impl Serialize for Engine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// One process's figures.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    prompt_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
    peak_rss_mb: f64,
    /// What the engine says it is (`kiln avx2`, `onnxruntime 1.32.0 [CPU]`, …).
    backend: String,
}

impl Sample {
    /// Reads the figures of `kiln bench --json` or of `bench_llama_cpp.py bench`.
    fn from_json(v: &serde_json::Value) -> anyhow::Result<Sample> {
        let number = |key: &str| {
            v[key]
                .as_f64()
                .with_context(|| format!("no number {key:?} in {v}"))
        };
        Ok(Sample {
            prompt_tokens_per_s: number("prompt_tokens_per_s")?,
            decode_tokens_per_s: number("decode_tokens_per_s")?,
            ttft_ms: number("ttft_ms")?,
            peak_rss_mb: number("peak_rss_mb")?,
            backend: v["backend"].as_str().unwrap_or("?").to_owned(),
        })
    }
}

/// One engine in one configuration, over the repetitions.
#[derive(Clone, Debug, Serialize)]
struct Row {
    quant: &'static str,
    threads: usize,
    depth: usize,
    engine: Engine,
    /// The llama.cpp engine a kiln row is compared with.
    compared_with: Option<Engine>,
    backend: String,
    prompt_tokens_per_s: Stats,
    decode_tokens_per_s: Stats,
    ttft_ms: Stats,
    peak_rss_mb: Stats,
    /// Bytes a decode step reads: weights, plus the KV cache at the mean decode position.
    bytes_per_token: u64,
    /// Decode tokens/s if those bytes streamed at the measured bandwidth.
    bound_tokens_per_s: f64,
    /// Median decode speed in percent of the bound.
    decode_of_bound_pct: f64,
}

impl Row {
    fn new(
        key: (Format, usize, usize, Engine, Peer),
        samples: &[Sample],
        bytes_per_token: u64,
        bandwidth_gb_per_s: f64,
    ) -> Row {
        let (quant, threads, depth, engine, peer) = key;
        let stat = |f: fn(&Sample) -> f64| Stats::of(samples.iter().map(f).collect());
        let decode = stat(|s| s.decode_tokens_per_s);
        let bound = bandwidth_gb_per_s * 1e9 / bytes_per_token.max(1) as f64;
        Row {
            quant: quant.name(),
            threads,
            depth,
            engine,
            compared_with: engine.peer(peer),
            backend: samples
                .first()
                .map_or_else(String::new, |s| s.backend.clone()),
            prompt_tokens_per_s: stat(|s| s.prompt_tokens_per_s),
            decode_of_bound_pct: decode.median / bound * 100.0,
            decode_tokens_per_s: decode,
            ttft_ms: stat(|s| s.ttft_ms),
            peak_rss_mb: stat(|s| s.peak_rss_mb),
            bytes_per_token,
            bound_tokens_per_s: bound,
        }
    }

    fn same_config(&self, other: &Row) -> bool {
        (self.quant, self.threads, self.depth) == (other.quant, other.threads, other.depth)
    }

    /// The llama.cpp row this kiln row is compared with, in `rows`.
    fn peer_in<'r>(&self, rows: &'r [Row]) -> Option<&'r Row> {
        let peer = self.compared_with?;
        rows.iter()
            .find(|l| l.engine == peer && l.same_config(self))
    }
}

/// kiln's medians over llama.cpp's in one configuration (above 1: kiln is faster for the
/// speeds, slower or larger for time to first token and RSS).
#[derive(Clone, Debug, PartialEq, Serialize)]
struct Ratio {
    quant: &'static str,
    threads: usize,
    depth: usize,
    engine: Engine,
    prompt_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
    peak_rss_mb: f64,
}

/// A ratio for every kiln row that has a llama.cpp row in its configuration.
fn ratios(rows: &[Row]) -> Vec<Ratio> {
    rows.iter()
        .filter(|r| !r.engine.is_llama_cpp())
        .filter_map(|k| {
            let l = k.peer_in(rows)?;
            let div = |a: &Stats, b: &Stats| a.median / b.median;
            Some(Ratio {
                quant: k.quant,
                threads: k.threads,
                depth: k.depth,
                engine: k.engine,
                prompt_tokens_per_s: div(&k.prompt_tokens_per_s, &l.prompt_tokens_per_s),
                decode_tokens_per_s: div(&k.decode_tokens_per_s, &l.decode_tokens_per_s),
                ttft_ms: div(&k.ttft_ms, &l.ttft_ms),
                peak_rss_mb: div(&k.peak_rss_mb, &l.peak_rss_mb),
            })
        })
        .collect()
}

/// The comparison as an aligned text table: a line per kiln engine and configuration, with
/// llama.cpp's figures and the ratios beside it (`—` without llama.cpp).
fn table(rows: &[Row]) -> String {
    const HEADER: [&str; 12] = [
        "config",
        "engine",
        "peer",
        "pp t/s",
        "llama.cpp pp",
        "pp ratio",
        "tg t/s",
        "llama.cpp tg",
        "tg ratio",
        "TTFT ms kiln / llama.cpp",
        "peak RSS MB kiln / llama.cpp",
        "tg % of bound kiln / llama.cpp",
    ];
    let dash = || "—".to_owned();
    let mut lines: Vec<Vec<String>> = vec![HEADER.iter().map(|h| (*h).to_owned()).collect()];
    for k in rows.iter().filter(|r| !r.engine.is_llama_cpp()) {
        let l = k.peer_in(rows);
        let other = |f: &dyn Fn(&Row) -> String| l.map_or_else(dash, f);
        let ratio = |f: fn(&Row) -> f64| other(&|l| format!("{:.2}×", f(k) / f(l)));
        let pair = |f: fn(&Row) -> &Stats, d: usize| {
            format!("{} / {}", f(k).cell(d), other(&|l| f(l).cell(d)))
        };
        lines.push(vec![
            format!("{} t={} d={}", k.quant, k.threads, k.depth),
            k.engine.name(),
            l.map_or_else(dash, |l| l.engine.name()),
            k.prompt_tokens_per_s.cell(1),
            other(&|l| l.prompt_tokens_per_s.cell(1)),
            ratio(|r| r.prompt_tokens_per_s.median),
            k.decode_tokens_per_s.cell(1),
            other(&|l| l.decode_tokens_per_s.cell(1)),
            ratio(|r| r.decode_tokens_per_s.median),
            pair(|r| &r.ttft_ms, 1),
            pair(|r| &r.peak_rss_mb, 0),
            format!(
                "{:.0}% / {}",
                k.decode_of_bound_pct,
                other(&|l| format!("{:.0}%", l.decode_of_bound_pct))
            ),
        ]);
    }
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            out.push_str(&format!("| {} |\n", rule.join(" | ")));
        }
    }
    out
}

/// A tensor as far as a decode step reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct TensorRead {
    bytes: u64,
    rows: u64,
    /// Read whole each step (a projection, a norm); else only one row (an embedding table).
    whole: bool,
}

/// Bytes of weights one decode step reads.
fn bytes_read(tensors: &[TensorRead]) -> u64 {
    tensors
        .iter()
        .map(|t| {
            if t.whole {
                t.bytes
            } else {
                t.bytes / t.rows.max(1)
            }
        })
        .sum()
}

/// The tensors of a `.kiln` artifact: the embedding table is read a row at a time unless the
/// output head (tied embeddings) reads it whole; tensors no op names are not read.
fn artifact_reads(meta: &Metadata) -> Vec<TensorRead> {
    let n = meta.tensors.len();
    let (mut whole, mut row) = (vec![false; n], vec![false; n]);
    let mark = |v: &mut Vec<bool>, id: usize| {
        if let Some(slot) = v.get_mut(id) {
            *slot = true;
        }
    };
    for op in &meta.graph.ops {
        match *op {
            Op::Embed { table, .. } => mark(&mut row, table),
            Op::RmsNorm { weight, .. } | Op::MatMul { weight, .. } | Op::Logits { weight, .. } => {
                mark(&mut whole, weight)
            }
            Op::Rope { inv_freq, .. } => mark(&mut whole, inv_freq),
            Op::Attention { .. } | Op::SwiGlu { .. } | Op::Add { .. } => {}
        }
    }
    meta.tensors
        .iter()
        .enumerate()
        .filter(|&(i, _)| whole[i] || row[i])
        .map(|(i, t)| TensorRead {
            bytes: t.len,
            rows: t.rows() as u64,
            whole: whole[i],
        })
        .collect()
}

/// The tensors of a llama.cpp GGUF: every one read whole but `token_embd` when the model has
/// its own `output` head.
fn gguf_reads(gguf: &GgufFile) -> Vec<TensorRead> {
    let tied = !gguf.tensors.contains_key("output.weight");
    gguf.tensors
        .iter()
        .map(|(name, t)| TensorRead {
            bytes: t.len as u64,
            rows: t.dims.iter().skip(1).product::<u64>(),
            whole: tied || name != "token_embd.weight",
        })
        .collect()
}

/// Tensors per storage format, most common first: `[("q4_1", 210), ("f32", 61), ("q8_0", 1)]`.
fn gguf_types(gguf: &GgufFile) -> Vec<(&'static str, usize)> {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for t in gguf.tensors.values() {
        *counts.entry(t.format.name()).or_default() += 1;
    }
    let mut v: Vec<(&'static str, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v
}

/// The format most matrices (tensors of two or more dimensions) of a GGUF are stored in.
fn gguf_format(gguf: &GgufFile) -> Option<Format> {
    let mut counts: Vec<(Format, usize)> = Vec::new();
    for t in gguf.tensors.values().filter(|t| t.dims.len() >= 2) {
        match counts.iter_mut().find(|(f, _)| *f == t.format) {
            Some((_, n)) => *n += 1,
            None => counts.push((t.format, 1)),
        }
    }
    counts.into_iter().max_by_key(|&(_, n)| n).map(|(f, _)| f)
}

/// A file name for `model` in the cache: a card's name, or a path's stem and a hash of the path.
fn cache_stem(model: &str) -> String {
    let path = Path::new(model);
    if !path.exists() {
        return model.to_owned();
    }
    let full = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let hash = Sha256::digest(full.to_string_lossy().as_bytes());
    let stem: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{stem}-{:02x}{:02x}{:02x}{:02x}",
        hash[0], hash[1], hash[2], hash[3]
    )
}

/// The GGUF llama.cpp runs at one quantization.
#[derive(Debug, Serialize)]
struct LlamaInput {
    path: PathBuf,
    /// Written by llama.cpp's quantizer from the card's GGUF (else the card's file as is).
    requantized_from: Option<PathBuf>,
    tensor_types: Vec<(&'static str, usize)>,
    weight_bytes_per_token: u64,
}

/// What each engine runs at one quantization.
#[derive(Debug, Serialize)]
struct Inputs {
    quant: &'static str,
    artifact: PathBuf,
    /// Weights a native decode step reads (the ort backend reads the same blocks).
    weight_bytes_per_token: u64,
    /// KV cache bytes per cached position at f16 (kiln's native cache and llama.cpp's; the
    /// ort backend's ONNX cache is f32, twice this).
    kv_bytes_per_position: u64,
    onnx: Option<PathBuf>,
    llama_cpp: Option<LlamaInput>,
}

/// Everything the run needs besides the inputs: binaries and libraries.
struct Tools {
    kiln: PathBuf,
    ort_lib: Option<PathBuf>,
    python: OsString,
    /// The llama.cpp builds `--peer llama-bench` compares with.
    llama_bench: Vec<LlamaCpp>,
}

/// The `.kiln` artifact of `model` at `quant`, compiled unless a valid one is cached.
fn ensure_artifact(
    model: &str,
    quant: Format,
    out: &Path,
    rebuild: bool,
) -> anyhow::Result<Metadata> {
    if !rebuild {
        // A cached artifact counts only if packed as `--target host` packs now.
        let host = kiln_targets::find("host")?.context("the host target")?;
        let packing = kiln_compiler::emit::Packing::for_target(&host);
        if let Ok(artifact) = Artifact::open(out) {
            let meta = artifact.meta();
            let current = meta.required_cpu_features == packing.required_features
                && meta
                    .tensors
                    .iter()
                    .filter(|t| t.shape.len() == 2)
                    .all(|t| t.layout == packing.layout.for_format(t.format));
            if current {
                return Ok(meta.clone());
            }
        }
    }
    let compiled = compile::compile(&compile::Args {
        model: model.to_owned(),
        target: "host".to_owned(),
        quant: Some(quant.name().to_owned()),
        overrides: Vec::new(),
        out: out.to_owned(),
        ctx: None,
        max_memory: None,
        json: true,
        emit: compile::Emit::Kiln,
    })?;
    eprintln!("{}", compiled.summary);
    Ok(Artifact::open(out)?.meta().clone())
}

/// Moves `tmp` (and its external-data file, first) to `out`.
fn publish_onnx(tmp: &Path, out: &Path) -> anyhow::Result<()> {
    let data = |p: &Path| PathBuf::from(format!("{}.data", p.display()));
    if data(tmp).is_file() {
        std::fs::rename(data(tmp), data(out))
            .with_context(|| format!("writing {}", data(out).display()))?;
    }
    std::fs::rename(tmp, out).with_context(|| format!("writing {}", out.display()))
}

/// The MatMulNBits ONNX of `model` at `quant`, exported unless cached.
fn ensure_onnx(model: &str, quant: Format, out: &Path, rebuild: bool) -> anyhow::Result<()> {
    if out.is_file() && !rebuild {
        return Ok(());
    }
    let plan = kiln_compiler::pipeline::quantize::plan(quant.name(), &[])?;
    let checkpoint = source::import(model)?;
    let converted = kiln_compiler::pipeline::quantize::convert(&checkpoint, &plan)?;
    drop(checkpoint);
    let dir = out.parent().context("the ONNX path has a parent")?;
    let scratch = tempfile::Builder::new()
        .prefix(".bench-export-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a scratch directory in {}", dir.display()))?;
    let tmp = scratch
        .path()
        .join(out.file_name().context("the ONNX path names a file")?);
    let spinner = source::spinner(&format!("writing {}", out.display()));
    let report = export_quantized(&converted, &tmp, &ExportOptions::default());
    spinner.finish_and_clear();
    let report = report?;
    publish_onnx(&tmp, out)?;
    eprintln!(
        "wrote {} for onnxruntime ({:.1} MB)",
        out.display(),
        report.bytes as f64 / 1e6
    );
    Ok(())
}

/// The GGUF llama.cpp runs at `quant`: the model's own when its matrices are stored so, else
/// one written by llama.cpp's quantizer from it (cached as `out`).
fn ensure_gguf(
    model: &str,
    quant: Format,
    out: &Path,
    tools: &Tools,
    rebuild: bool,
) -> anyhow::Result<LlamaInput> {
    let source = source::checkpoint_path(model)?;
    if !source
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        bail!(
            "llama.cpp runs GGUF files and {} is not one; benchmark kiln alone with --no-llama-cpp",
            source.display()
        );
    }
    let original = GgufFile::open(&source)?;
    let (path, requantized_from) = if gguf_format(&original) == Some(quant) {
        (source, None)
    } else {
        let cached = !rebuild
            && out.is_file()
            && GgufFile::open(out).is_ok_and(|g| gguf_format(&g) == Some(quant));
        if !cached {
            match tools.llama_bench.first() {
                Some(llama) => {
                    let spinner = source::spinner(&format!(
                        "llama-quantize: {} to {}",
                        source.display(),
                        quant.name()
                    ));
                    let done = llama_bench::quantize(llama, &source, out, quant.name());
                    spinner.finish_and_clear();
                    done?;
                }
                None => requantize(&source, out, quant, tools)?,
            }
        }
        (out.to_owned(), Some(source))
    };
    let gguf = GgufFile::open(&path)?;
    Ok(LlamaInput {
        weight_bytes_per_token: bytes_read(&gguf_reads(&gguf)),
        tensor_types: gguf_types(&gguf),
        path,
        requantized_from,
    })
}

/// Writes `out` from the GGUF `source` with llama.cpp's `llama_model_quantize`.
fn requantize(source: &Path, out: &Path, quant: Format, tools: &Tools) -> anyhow::Result<()> {
    let dir = out.parent().context("the GGUF path has a parent")?;
    let tmp = tempfile::Builder::new()
        .prefix(".bench-quantize-")
        .suffix(".gguf")
        .tempfile_in(dir)
        .with_context(|| format!("creating a scratch file in {}", dir.display()))?
        .into_temp_path();
    let spinner = source::spinner(&format!(
        "llama.cpp: requantizing {} to {}",
        source.display(),
        quant.name()
    ));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let result = json_output(
        "llama.cpp's quantizer",
        Command::new(&tools.python)
            .arg("-c")
            .arg(LLAMA_CPP_SCRIPT)
            .arg("quantize")
            .arg(source)
            .arg(&tmp)
            .arg(quant.name())
            .arg(threads.to_string()),
    );
    spinner.finish_and_clear();
    result?;
    tmp.persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("llama.cpp wrote {} ({})", out.display(), quant.name());
    Ok(())
}

/// Runs `cmd`, which prints one JSON object; a failure shows the end of its stderr.
fn json_output(what: &str, cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    if !out.status.success() {
        if tail.is_empty() {
            bail!("{what} failed ({})", out.status);
        }
        bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "{what} printed no JSON object: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The `kiln` binary: `given`, else the one `cargo build --release --bin kiln` makes now.
fn kiln_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        ensure!(path.is_file(), "--kiln {}: no such file", path.display());
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    eprintln!("building kiln (cargo build --release --bin kiln)");
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "kiln",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    ensure!(
        out.status.success(),
        "cargo build --release --bin kiln failed ({})",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "kiln")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo build --release --bin kiln named no executable")
}

/// llama-cpp-python's version, or how to install it.
fn llama_cpp_version(python: &OsString) -> anyhow::Result<String> {
    let v = json_output(
        "llama-cpp-python",
        Command::new(python)
            .arg("-c")
            .arg(LLAMA_CPP_SCRIPT)
            .arg("version"),
    )
    .with_context(|| {
        format!(
            "llama.cpp is not usable from {py}: install it with `{py} -m pip install {LLAMA_CPP_PYTHON}` \
             (it builds llama.cpp from source, about 10 minutes), or pass --no-llama-cpp",
            py = python.to_string_lossy()
        )
    })?;
    Ok(v["llama_cpp_python"].as_str().unwrap_or("?").to_owned())
}

/// Memory bandwidth in GB/s by a STREAM triad, `a = b + s·c`, each of `threads` threads over
/// its share of the three arrays; 24 bytes an element (two read, one written), the fastest of
/// [`BANDWIDTH_PASSES`] passes.
fn triad_gb_per_s(a: &mut [f64], b: &[f64], c: &[f64], threads: usize) -> f64 {
    let chunk = a.len().div_ceil(threads.max(1)).max(1);
    let mut best: f64 = 0.0;
    for pass in 0..BANDWIDTH_PASSES {
        let s = 1.0 + pass as f64;
        let t = Instant::now();
        std::thread::scope(|scope| {
            for ((a, b), c) in a
                .chunks_mut(chunk)
                .zip(b.chunks(chunk))
                .zip(c.chunks(chunk))
            {
                scope.spawn(move || {
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + s * c;
                    }
                });
            }
        });
        std::hint::black_box(&*a);
        best = best.max(24.0 * a.len() as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// One measurement of `engine` in a fresh process.
fn measure(
    engine: Engine,
    inputs: &Inputs,
    tools: &Tools,
    plan: &Plan,
    threads: usize,
    depth: usize,
) -> anyhow::Result<Sample> {
    let counts = [threads, plan.n_prompt, plan.n_gen, depth].map(|n| n.to_string());
    let v = match engine {
        Engine::Kiln(_) | Engine::KilnOrt => {
            let mut cmd = Command::new(&tools.kiln);
            cmd.arg("bench");
            match engine {
                Engine::Kiln(level) => {
                    cmd.arg(&inputs.artifact)
                        .args(["--backend", "native"])
                        .env("KILN_KERNELS", level.name());
                }
                _ => {
                    cmd.arg(inputs.onnx.as_ref().context("no ONNX was prepared")?)
                        .args(["--backend", "ort"]);
                    if let Some(lib) = &tools.ort_lib {
                        cmd.arg("--ort-lib").arg(lib);
                    }
                }
            }
            for (flag, n) in ["-t", "-p", "-n", "-d"].iter().zip(&counts) {
                cmd.args([flag, n.as_str()]);
            }
            json_output(&engine.name(), cmd.args(["-r", "1", "--json"]))?
        }
        Engine::LlamaBench(build) => {
            let gguf = inputs.llama_cpp.as_ref().context("no GGUF was prepared")?;
            let llama = tools
                .llama_bench
                .iter()
                .find(|l| l.build == build)
                .context("that llama.cpp build was not made")?;
            let m = llama_bench::bench(
                llama,
                &gguf.path,
                [threads, plan.n_prompt, plan.n_gen, depth],
            )?;
            return Ok(Sample {
                prompt_tokens_per_s: m.prompt_tokens_per_s,
                decode_tokens_per_s: m.decode_tokens_per_s,
                // The prompt pass, as kiln bench times its first token.
                ttft_ms: 1e3 * plan.n_prompt as f64 / m.prompt_tokens_per_s,
                peak_rss_mb: m.peak_rss_mb,
                backend: format!(
                    "llama-bench {} {}",
                    llama_bench::LLAMA_CPP_COMMIT,
                    build.name()
                ),
            });
        }
        Engine::LlamaCppPython => {
            let gguf = inputs.llama_cpp.as_ref().context("no GGUF was prepared")?;
            json_output(
                "llama.cpp",
                Command::new(&tools.python)
                    .arg("-c")
                    .arg(LLAMA_CPP_SCRIPT)
                    .arg("bench")
                    .arg(&gguf.path)
                    .args(&counts),
            )?
        }
    };
    Sample::from_json(&v)
}

/// The machine, for the report.
#[derive(Debug, Serialize)]
struct Host {
    cpu: String,
    logical_cpus: usize,
    last_level_cache: Option<String>,
    /// 1-minute load average when the run started and when it ended: well above 0 at the
    /// start means something else was running.
    load_average: [Option<f64>; 2],
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

fn last_level_cache() -> Option<String> {
    (0..8)
        .rev()
        .find_map(|i| {
            std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size"))
                .ok()
        })
        .map(|s| s.trim().to_owned())
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Measured bandwidth at one thread count.
#[derive(Debug, Serialize)]
struct Bandwidth {
    threads: usize,
    gb_per_s: f64,
}

/// Everything `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    model: String,
    n_prompt: usize,
    n_gen: usize,
    reps: usize,
    host: Host,
    kiln: PathBuf,
    llama_cpp_python: Option<String>,
    bandwidth_buffer_bytes: usize,
    bandwidth: Vec<Bandwidth>,
    inputs: Vec<Inputs>,
    results: Vec<Row>,
    ratios: Vec<Ratio>,
    notes: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.arch.as_deref() == Some("aarch64") {
        return run_aarch64(&args);
    }
    let plan = plan(&args)?;
    match args.arch.as_deref() {
        None | Some("x86_64") => {}
        Some(other) => bail!("--arch {other}: kiln counts aarch64 (or times this x86_64 machine)"),
    }
    let load_start = load_average();
    let python = pypi::python_from_env();
    let llama_cpp_python = if plan.peer == Peer::LlamaCppPython {
        Some(llama_cpp_version(&python)?)
    } else {
        None
    };
    let mut builds: Vec<Build> = Vec::new();
    if plan.peer == Peer::LlamaBench {
        // The native build first: it also quantizes the GGUFs.
        builds.push(Build::Native);
        builds.extend(plan.levels.iter().map(|&l| build_for(l)));
    }
    let tools = Tools {
        llama_bench: dedup(&builds)
            .into_iter()
            .map(llama_bench::ensure)
            .collect::<anyhow::Result<Vec<_>>>()?,
        kiln: kiln_binary(args.kiln.clone())?,
        ort_lib: match (&args.ort_lib, plan.backends.contains(&Backend::Ort)) {
            (Some(lib), _) => Some(lib.clone()),
            (None, true) => Some(kiln_compiler::pipeline::onnxruntime::ensure(
                std::env::consts::ARCH,
            )?),
            (None, false) => None,
        },
        python,
    };
    let inputs = prepare(&args, &plan, &tools)?;
    let bandwidth = measure_bandwidth(&plan.threads);
    let rows = measure_all(&plan, &inputs, &bandwidth, &tools)?;
    let report = Report {
        model: args.model.clone(),
        n_prompt: plan.n_prompt,
        n_gen: plan.n_gen,
        reps: plan.reps,
        host: Host {
            cpu: cpu_name(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            last_level_cache: last_level_cache(),
            load_average: [load_start, load_average()],
        },
        kiln: tools.kiln.clone(),
        notes: notes(
            &plan,
            &inputs,
            &bandwidth,
            &tools,
            llama_cpp_python.as_deref(),
        ),
        llama_cpp_python,
        bandwidth_buffer_bytes: BANDWIDTH_BYTES,
        bandwidth,
        inputs,
        ratios: ratios(&rows),
        results: rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} on {} ({} logical CPUs, last-level cache {}); -p {} -n {}, {}; load average {} at the start, {} at the end",
            report.model,
            report.host.cpu,
            report.host.logical_cpus,
            report.host.last_level_cache.as_deref().unwrap_or("unknown"),
            report.n_prompt,
            report.n_gen,
            plural(report.reps, "repetition"),
            fmt_load(report.host.load_average[0]),
            fmt_load(report.host.load_average[1]),
        );
        print!("{}", table(&report.results));
        for note in &report.notes {
            println!("- {note}");
        }
    }
    Ok(())
}

/// `--arch aarch64`: instruction counts per token under qemu, kiln against llama.cpp.
/// `--quant copy` counts a GGUF as stored (a K-quant mix such as `Q4_K_M`): kiln compiles it
/// keeping each tensor's format and llama.cpp runs the file itself.
fn run_aarch64(args: &Args) -> anyhow::Result<()> {
    let (quant, gguf) = if args.quant.first().map(|q| q.trim()) == Some("copy") {
        let model = Path::new(&args.model);
        ensure!(
            model.is_file()
                && model
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("gguf")),
            "--quant copy counts a GGUF as stored: --model must be a GGUF file"
        );
        ("copy", model.to_path_buf())
    } else {
        let quant = plan(args)?.quants[0];
        let tools = Tools {
            kiln: PathBuf::new(),
            ort_lib: None,
            python: pypi::python_from_env(),
            llama_bench: vec![llama_bench::ensure(Build::Native)?],
        };
        let dir = cache::kiln_home()?.join("artifacts");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let gguf_path = dir.join(format!(
            "{}.{}.llama-cpp.gguf",
            cache_stem(&args.model),
            quant.name()
        ));
        let gguf = ensure_gguf(&args.model, quant, &gguf_path, &tools, args.rebuild)?;
        (quant.name(), gguf.path)
    };
    // --kernels picks aarch64 levels here (their llama.cpp builds take a while each).
    let levels = args
        .kernels
        .iter()
        .map(|name| Level::from_name(name.trim()))
        .collect::<Result<Vec<Level>, _>>()?;
    let rows = crate::bench_arm::run(&args.model, quant, &gguf, &levels)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": args.model,
                "quant": quant,
                "llama_cpp_gguf": gguf,
                "what": "guest instructions per token under qemu-user, 1 thread: a deterministic proxy for speed, not a speed",
                "rows": rows,
            }))?
        );
    } else {
        println!(
            "{} {}: guest instructions per token under qemu-user (1 thread), a proxy for speed: instructions are not time",
            args.model, quant
        );
        print!("{}", crate::bench_arm::table(&rows));
    }
    Ok(())
}

/// The artifact, ONNX and GGUF of every quantization, made or found in `$KILN_HOME/artifacts`.
fn prepare(args: &Args, plan: &Plan, tools: &Tools) -> anyhow::Result<Vec<Inputs>> {
    let dir = cache::kiln_home()?.join("artifacts");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = cache_stem(&args.model);
    let mut inputs = Vec::new();
    for &quant in &plan.quants {
        let file = |ext: &str| dir.join(format!("{stem}.{}.{ext}", quant.name()));
        let artifact = file("kiln");
        let meta = ensure_artifact(&args.model, quant, &artifact, args.rebuild)?;
        let f = &meta.facts;
        let onnx = if plan.backends.contains(&Backend::Ort) {
            ensure_onnx(&args.model, quant, &file("onnx"), args.rebuild)?;
            Some(file("onnx"))
        } else {
            None
        };
        let llama_cpp = if plan.peer != Peer::None {
            let gguf = file("llama-cpp.gguf");
            Some(ensure_gguf(&args.model, quant, &gguf, tools, args.rebuild)?)
        } else {
            None
        };
        inputs.push(Inputs {
            quant: quant.name(),
            weight_bytes_per_token: bytes_read(&artifact_reads(&meta)),
            kv_bytes_per_position: (2 * f.layers * f.kv_heads * f.head_dim * 2) as u64,
            artifact,
            onnx,
            llama_cpp,
        });
    }
    Ok(inputs)
}

/// Triad bandwidth at each thread count, over three arrays of [`BANDWIDTH_BYTES`] in all.
fn measure_bandwidth(threads: &[usize]) -> Vec<Bandwidth> {
    eprintln!(
        "measuring memory bandwidth (STREAM triad over {} MiB)",
        BANDWIDTH_BYTES >> 20
    );
    let n = BANDWIDTH_BYTES / 24;
    let (mut a, b, c) = (vec![0f64; n], vec![1f64; n], vec![2f64; n]);
    threads
        .iter()
        .map(|&threads| Bandwidth {
            threads,
            gb_per_s: triad_gb_per_s(&mut a, &b, &c, threads),
        })
        .collect()
}

/// Every configuration, each repetition running every engine once in turn.
fn measure_all(
    plan: &Plan,
    inputs: &[Inputs],
    bandwidth: &[Bandwidth],
    tools: &Tools,
) -> anyhow::Result<Vec<Row>> {
    let mut engines: Vec<Engine> = Vec::new();
    for backend in &plan.backends {
        match backend {
            Backend::Native => engines.extend(plan.levels.iter().map(|&l| Engine::Kiln(l))),
            Backend::Ort => engines.push(Engine::KilnOrt),
        }
    }
    let peers: Vec<Engine> = engines.iter().filter_map(|e| e.peer(plan.peer)).collect();
    engines.extend(dedup(&peers));
    let configs = plan.quants.len() * plan.threads.len() * plan.depths.len();
    let mut rows = Vec::new();
    for (input, &quant) in inputs.iter().zip(&plan.quants) {
        for (bw, &threads) in bandwidth.iter().zip(&plan.threads) {
            for &depth in &plan.depths {
                let started = Instant::now();
                eprint!(
                    "[{}/{configs}] {} t={threads} d={depth}:",
                    rows.len() / engines.len() + 1,
                    quant.name()
                );
                let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); engines.len()];
                for _ in 0..plan.reps {
                    for (engine, samples) in engines.iter().zip(&mut samples) {
                        eprint!(" [{}]", engine.name());
                        samples.push(measure(*engine, input, tools, plan, threads, depth)?);
                    }
                }
                eprintln!(" ({:.0} s)", started.elapsed().as_secs_f64());
                // Decode reads the KV cache from `depth` to `depth + n_gen`: count the mean.
                let positions = (depth + plan.n_gen / 2) as u64;
                for (&engine, samples) in engines.iter().zip(&samples) {
                    let kv = positions * input.kv_bytes_per_position;
                    let bytes = match (engine, &input.llama_cpp) {
                        (Engine::LlamaBench(_) | Engine::LlamaCppPython, Some(g)) => {
                            g.weight_bytes_per_token + kv
                        }
                        (Engine::KilnOrt, _) => input.weight_bytes_per_token + 2 * kv,
                        _ => input.weight_bytes_per_token + kv,
                    };
                    rows.push(Row::new(
                        (quant, threads, depth, engine, plan.peer),
                        samples,
                        bytes,
                        bw.gb_per_s,
                    ));
                }
            }
        }
    }
    Ok(rows)
}

/// `1 repetition`, `3 repetitions`.
fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn fmt_load(load: Option<f64>) -> String {
    load.map_or_else(|| "unknown".to_owned(), |l| format!("{l:.2}"))
}

/// What the table's figures mean and where its inputs came from.
fn notes(
    plan: &Plan,
    inputs: &[Inputs],
    bandwidth: &[Bandwidth],
    tools: &Tools,
    llama_cpp_python: Option<&str>,
) -> Vec<String> {
    let mut notes = vec![
        format!(
            "figures are medians over {}, each a fresh process; ± is half the min-max range in % of the median; ratios are kiln/llama.cpp of the medians",
            plural(plan.reps, "repetition")
        ),
        format!(
            "pp: {} random tokens in one pass; TTFT: that pass and picking the first token; tg: {} tokens one at a time; both after d tokens already cached (as llama-bench -d), following one untimed warm-up pass",
            plan.n_prompt, plan.n_gen
        ),
    ];
    let bw: Vec<String> = bandwidth
        .iter()
        .map(|b| format!("{:.1} GB/s at {}", b.gb_per_s, plural(b.threads, "thread")))
        .collect();
    notes.push(format!(
        "bound: tokens/s if the bytes one decode step reads (weights; plus the KV cache at the mean decode position: f16 for kiln and llama.cpp, f32 for kiln on onnxruntime) streamed at the bandwidth a STREAM triad over {} MiB measured: {}; weights that stay in a cache larger than the model can beat it",
        BANDWIDTH_BYTES >> 20,
        bw.join(", ")
    ));
    for input in inputs {
        let mut line = format!(
            "{}: kiln {} ({:.1} MB of weights per token)",
            input.quant,
            input.artifact.display(),
            input.weight_bytes_per_token as f64 / 1e6
        );
        if let Some(onnx) = &input.onnx {
            line.push_str(&format!("; kiln-ort {}", onnx.display()));
        }
        if let Some(g) = &input.llama_cpp {
            let types: Vec<String> = g
                .tensor_types
                .iter()
                .map(|(f, n)| format!("{f} ×{n}"))
                .collect();
            line.push_str(&format!(
                "; llama.cpp {} ({}; {:.1} MB per token)",
                g.path.display(),
                types.join(", "),
                g.weight_bytes_per_token as f64 / 1e6
            ));
            if let Some(from) = &g.requantized_from {
                line.push_str(&format!(
                    ". llama.cpp's {q} was requantized by llama.cpp's own quantizer (llama_model_quantize, allow_requantize) from {}, as llama-cpp-python exposes no float GGUF to start from; kiln's {q} comes from kiln's quantizer over the same file's dequantized weights: the same input data either way",
                    from.display(),
                    q = input.quant
                ));
            }
        }
        notes.push(line);
    }
    for llama in &tools.llama_bench {
        notes.push(format!(
            "llama-bench {}: llama.cpp {} from llama-cpp-python 0.3.36's sdist, built with cmake for {} ({}), run with its defaults (repacked weights on, f16 KV cache); its TTFT is the prompt pass, -p / pp t/s",
            llama.build.name(),
            llama_bench::LLAMA_CPP_COMMIT,
            llama.build.name(),
            llama.bench.display()
        ));
    }
    if let Some(version) = llama_cpp_python {
        notes.push(format!(
            "llama.cpp: llama-cpp-python {version}, CPU only, extra buffer types (repacked weights, AMX) off (this build crashes with SIGSEGV on its first pass when they are on), flash attention off, f16 KV cache, n_batch = n_ubatch = -p; its RSS leaves out the Python interpreter and numpy (measured before llama.cpp loads)"
        ));
    }
    if let Some(lib) = &tools.ort_lib {
        notes.push(format!(
            "kiln-ort: kiln's onnxruntime backend ({}) over the MatMulNBits ONNX of `cargo xtask export --quantized --quant`; its bound uses the artifact's weight bytes",
            lib.display()
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .expect("arguments parse")
            .args
    }

    fn sample(pp: f64, tg: f64, ttft: f64, rss: f64) -> Sample {
        Sample {
            prompt_tokens_per_s: pp,
            decode_tokens_per_s: tg,
            ttft_ms: ttft,
            peak_rss_mb: rss,
            backend: "test".to_owned(),
        }
    }

    #[test]
    fn lists_parse_comma_separated_and_repeats_are_dropped() {
        let args = parse(&[
            "--quant",
            "q4_0,q4_1,q4_0",
            "--threads",
            "1,2",
            "-p",
            "8",
            "-n",
            "4",
            "--reps",
            "1",
            "--depth",
            "0,512,1536",
            "--backend",
            "native,ort",
            "--no-llama-cpp",
        ]);
        let p = plan(&args).expect("valid");
        assert_eq!(p.quants, vec![Format::Q4_0, Format::Q4_1]);
        assert_eq!(p.threads, vec![1, 2]);
        assert_eq!(p.depths, vec![0, 512, 1536]);
        assert_eq!(p.backends, vec![Backend::Native, Backend::Ort]);
        assert_eq!((p.n_prompt, p.n_gen, p.reps, p.peer), (8, 4, 1, Peer::None));
        assert_eq!(p.levels, vec![Level::best()]);
    }

    #[test]
    fn kernel_levels_pair_with_the_llama_cpp_build_of_their_instruction_set() {
        let p = plan(&parse(&["--kernels", "generic,generic"])).expect("valid");
        assert_eq!(p.levels, vec![Level::Generic]);
        let other = if cfg!(target_arch = "x86_64") {
            "neon"
        } else {
            "avx2"
        };
        let e = plan(&parse(&["--kernels", other])).expect_err("another architecture");
        assert!(e.to_string().contains("this is a"), "{e}");
        assert_eq!(
            Engine::Kiln(Level::Avx2).peer(Peer::LlamaBench),
            Some(Engine::LlamaBench(Build::Avx2))
        );
        assert_eq!(
            Engine::Kiln(Level::Avx512Vnni).peer(Peer::LlamaBench),
            Some(Engine::LlamaBench(Build::Native))
        );
        assert_eq!(
            Engine::KilnOrt.peer(Peer::LlamaCppPython),
            Some(Engine::LlamaCppPython)
        );
        assert_eq!(Engine::Kiln(Level::Avx2).peer(Peer::None), None);
    }

    #[test]
    fn defaults_measure_q4_1_natively_against_llama_bench() {
        let p = plan(&parse(&[])).expect("valid");
        assert_eq!(p.quants, vec![Format::Q4_1]);
        assert_eq!(p.depths, vec![0]);
        assert_eq!(p.backends, vec![Backend::Native]);
        assert_eq!(
            (p.n_prompt, p.n_gen, p.reps, p.peer),
            (128, 64, 3, Peer::LlamaBench)
        );
        assert_eq!(p.threads.len(), 1);
        assert!(p.threads[0] >= 1);
    }

    #[test]
    fn bad_arguments_are_clear_errors() {
        let e = plan(&parse(&["--quant", "q3_k"])).expect_err("unknown quant");
        assert!(e.to_string().contains("unknown --quant \"q3_k\""), "{e}");
        for (argv, want) in [
            (&["-n", "0"][..], "-n must be at least 1"),
            (&["-p", "0"][..], "-p must be at least 1"),
            (&["--reps", "0"][..], "--reps must be at least 1"),
            (&["--threads", "0"][..], "--threads must be at least 1"),
        ] {
            let e = plan(&parse(argv)).expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(Cli::try_parse_from(["bench", "--backend", "tract"]).is_err());
    }

    fn rows() -> Vec<Row> {
        let key = |engine| (Format::Q4_1, 2, 512, engine, Peer::LlamaBench);
        vec![
            Row::new(
                key(Engine::Kiln(Level::Avx2)),
                &[
                    sample(300.0, 60.0, 400.0, 120.0),
                    sample(310.0, 62.0, 410.0, 120.0),
                ],
                100_000_000,
                10.0,
            ),
            Row::new(
                key(Engine::LlamaBench(Build::Avx2)),
                &[sample(200.0, 40.0, 600.0, 150.0)],
                100_000_000,
                10.0,
            ),
        ]
    }

    #[test]
    fn ratios_are_kiln_over_llama_cpp_medians() {
        let rows = rows();
        assert_eq!(rows[0].bound_tokens_per_s, 100.0);
        assert!((rows[0].decode_of_bound_pct - 61.0).abs() < 1e-9);
        let r = ratios(&rows);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].engine, Engine::Kiln(Level::Avx2));
        assert!((r[0].prompt_tokens_per_s - 1.525).abs() < 1e-12);
        assert!((r[0].decode_tokens_per_s - 1.525).abs() < 1e-12);
        assert!((r[0].ttft_ms - 405.0 / 600.0).abs() < 1e-12);
        assert!((r[0].peak_rss_mb - 0.8).abs() < 1e-12);
        assert!(ratios(&rows[..1]).is_empty(), "no llama.cpp row, no ratio");
    }

    #[test]
    fn the_table_has_a_line_per_kiln_engine_with_llama_cpp_beside_it() {
        let text = table(&rows());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("| config"), "{text}");
        let row = lines[2];
        for want in [
            "q4_1 t=2 d=512",
            "| kiln avx2 ",
            "| llama-bench avx2 ",
            "305.0 ±1.6%",
            "200.0 ±0.0%",
            "1.52×",
            "61.0 ±1.6%",
            "405.0 ±1.2% / 600.0 ±0.0%",
            "120 ±0.0% / 150 ±0.0%",
            "61% / 40%",
        ] {
            assert!(row.contains(want), "{want:?} in {row}");
        }
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|&w| w == widths[0]), "aligned: {text}");
        let alone = table(&rows()[..1]);
        assert!(
            alone.lines().nth(2).expect("row").contains("| — "),
            "{alone}"
        );
    }

    #[test]
    fn a_decode_step_reads_one_row_of_an_untied_embedding() {
        let t = |bytes, rows, whole| TensorRead { bytes, rows, whole };
        assert_eq!(bytes_read(&[t(1000, 10, false), t(500, 5, true)]), 600);
        assert_eq!(bytes_read(&[t(64, 0, false)]), 64);
    }

    #[test]
    fn cache_names_are_card_names_or_hashed_paths() {
        assert_eq!(cache_stem("smollm2-135m-instruct"), "smollm2-135m-instruct");
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("My Model.Q4_1.gguf");
        std::fs::write(&file, b"x").expect("write");
        let stem = cache_stem(&file.to_string_lossy());
        assert!(stem.starts_with("My-Model-Q4_1-"), "{stem}");
        assert_eq!(stem.len(), "My-Model-Q4_1-".len() + 8, "{stem}");
        assert!(stem[14..].chars().all(|c| c.is_ascii_hexdigit()), "{stem}");
    }
}
