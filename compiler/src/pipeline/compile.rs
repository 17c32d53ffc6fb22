//! `kilnc compile`: checkpoint → `.kiln` artifact that the `kiln` runtime executes (or, with
//! `--emit rust`, a Rust module that bakes it into a binary).

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_runtime::artifact::embed::{rust_module, EmbedOptions};
use kiln_runtime::exec::SessionOptions;
use kiln_targets::Target;

use crate::emit::Packing;
use crate::pipeline::source;

/// Compile a model into a `.kiln` artifact (op list, weights, tokenizer, chat template) for a
/// target device; the peak memory the runtime will need is printed before anything is written.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "The artifact requires the CPU features the target's descriptor assumes \
(`kilnc targets`), and its matrices are packed in the target's layout for its kernels \
(`--target host`: the best layout for this CPU, 4x16 on x86-64), which requires those kernels' \
features too; the runtime refuses it on a CPU without them. Targets whose backend is \
`ort` (jetson-orin-nano, jetson-agx-orin, qcs6490) still take a `.kiln` artifact: it runs on the \
device's CPU, the fallback when onnxruntime's execution providers are not used."
)]
pub struct Args {
    /// A model card name (fetched on demand), a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: String,
    /// The device to compile for (`kilnc targets` lists them); `host` is this machine.
    /// Its descriptor gives the required CPU features, the memory budget and the defaults of
    /// `--quant` and `--ctx`.
    #[arg(long, default_value = "host")]
    pub target: String,
    /// Weight storage (`f32`, `f16`, `q8_0`, `q4_0`, `q4_1`; default: the target's): tensors
    /// already stored so keep their bytes, others are re-quantized; with a 4-bit format the
    /// embedding and output head get `q8_0`. `q4_k_m`, `q5_k_m`, `q6_k`: llama.cpp's mixtures,
    /// each tensor as llama-quantize stores it. `copy` keeps every tensor as the checkpoint stores
    /// it, e.g. a `Q4_K_M` GGUF's mix of `q4_k`, `q6_k`, `q5_0`, `q8_0` (llama-quantize's COPY).
    #[arg(long)]
    pub quant: Option<String>,
    /// Per-tensor storage, `PATTERN=FORMAT` (repeatable; the last match wins): a glob over names
    /// such as `blk.0.ffn_down`, `token_embd`, `output` or the checkpoint's own, e.g. `'blk.*.ffn_down=q8_0'`.
    #[arg(long = "override", value_name = "PATTERN=FORMAT")]
    pub overrides: Vec<String>,
    /// Where to write the artifact.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Context length the memory prediction assumes (default: the target's, at most the model's).
    #[arg(long = "ctx")]
    pub ctx: Option<usize>,
    /// Refuse a model whose predicted peak memory exceeds this (e.g. `512M`, `2G`, bytes;
    /// default: the target's memory budget).
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
    /// What `--out` is: `kiln`, the artifact; `rust`, a Rust module (`-o model.rs`) that bakes
    /// the artifact, written beside it (`model.kiln`), into a binary with `include_bytes!`,
    /// with the memory plan of a one-thread session at `--ctx` as constants: for firmware that
    /// opens no file (examples/firmware).
    #[arg(long, value_enum, default_value_t = Emit::Kiln)]
    pub emit: Emit,
}

/// What `compile` writes at `--out`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// The `.kiln` artifact.
    #[default]
    Kiln,
    /// A Rust module embedding the artifact (written beside it) and its memory plan.
    Rust,
}

/// `512M`, `2G`, `1.5GiB`, `300000` → bytes (decimal units; `Ki`/`Mi`/`Gi` binary).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().trim_end_matches(['b', 'B']);
    let (number, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let scale: f64 = match unit {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" | "m" => 1e6,
        "G" | "g" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "unknown size unit {unit:?} in {text:?} (use K, M, G, Ki, Mi, Gi)"
            ))
        }
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {text:?}"))?;
    Ok((value * scale) as u64)
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// Where the memory limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// `--max-memory`.
    Flag(u64),
    /// The target descriptor's `memory.budget`.
    Budget(u64),
}

/// `--max-memory` when given, else the target's budget, else none.
fn memory_limit(max_memory: Option<u64>, target: &Target) -> Option<Limit> {
    max_memory
        .map(Limit::Flag)
        .or(target.memory.budget.map(Limit::Budget))
}

/// Refuses, with the numbers, a predicted `peak` (bytes at a `context`-token context) over the
/// limit for `target`.
fn check_fits(
    peak: u64,
    context: usize,
    limit: Option<Limit>,
    target: &Target,
) -> anyhow::Result<()> {
    let (bytes, what) = match limit {
        Some(Limit::Flag(bytes)) => (bytes, "the --max-memory budget".to_owned()),
        Some(Limit::Budget(bytes)) => (bytes, format!("the {} memory budget", target.name)),
        None => return Ok(()),
    };
    anyhow::ensure!(
        peak <= bytes,
        "the model needs {:.1} MB at a {context}-token context, over {what} of {:.1} MB; nothing was written (try a smaller --quant or --ctx)",
        peak as f64 / 1e6,
        bytes as f64 / 1e6
    );
    Ok(())
}

/// The shipped descriptor called `name`; an unknown name is an error listing the known ones.
pub fn resolve_target(name: &str) -> anyhow::Result<Target> {
    kiln_targets::find(name)?.with_context(|| {
        format!(
            "unknown target {name:?} (one of {}; `kilnc targets` describes them)",
            kiln_targets::names().join(", ")
        )
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let compiled = compile(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&compiled.report)?);
    } else {
        println!("{}", compiled.summary);
    }
    Ok(())
}

/// What [`compile`] wrote: the report `--json` prints, and the line printed otherwise.
pub struct Compiled {
    pub report: serde_json::Value,
    pub summary: String,
}

/// Compiles as `kilnc compile` does, printing only the peak-memory line and the spinner
/// (stderr); the caller prints the result.
pub fn compile(args: &Args) -> anyhow::Result<Compiled> {
    let artifact_path = artifact_path(args)?;
    let target = resolve_target(&args.target)?;
    let quant_plan = crate::pipeline::quantize::plan(
        args.quant.as_deref().unwrap_or(&target.defaults.quant),
        &args.overrides,
    )?;
    let checkpoint = source::import(&args.model)?;
    let converted = crate::pipeline::quantize::convert(&checkpoint, &quant_plan)?;
    drop(checkpoint);
    let options = SessionOptions {
        context: args
            .ctx
            .unwrap_or(target.defaults.context.min(converted.facts.context_length)),
        ..SessionOptions::default()
    };
    let plan = crate::emit::memory_plan(&converted, &options)?
        .with_tokenizer(converted.tokenizer.to_bytes().len());
    let limit = memory_limit(args.max_memory, &target);
    let fits = check_fits(plan.total() as u64, plan.context, limit, &target);
    if !args.json || fits.is_err() {
        eprintln!(
            "peak memory at a {}-token context: {:.1} MB = weights {:.1} MB (mapped) + KV cache {:.1} MB + buffers {:.1} MB (packed by lifetime; {:.1} MB unpacked) + scratch {:.1} MB + logits {:.1} MB + process {:.1} MB (binary, libraries, tokenizer tables)",
            plan.context,
            mb(plan.total()),
            mb(plan.weights),
            mb(plan.kv_cache),
            mb(plan.buffers),
            mb(plan.buffers_sum),
            mb(plan.scratch),
            mb(plan.logits),
            mb(plan.overhead)
        );
    }
    fits?;
    let spinner = source::spinner(&format!("writing {}", artifact_path.display()));
    let packing = Packing::for_target(&target);
    let report = crate::emit::write_artifact_for(&converted, &artifact_path, &packing);
    spinner.finish_and_clear();
    let report = report?;
    if args.emit == Emit::Rust {
        write_rust_module(&artifact_path, &args.out, plan.context)?;
    }
    let weights: Vec<String> = report
        .weight_bytes
        .iter()
        .map(|(f, b)| format!("{} MB {f}", b / 1_000_000))
        .collect();
    let requires = if packing.required_features.is_empty() {
        String::new()
    } else {
        format!(", requires {}", packing.required_features.join(", "))
    };
    let rust = match args.emit {
        Emit::Rust => format!(" and {}", args.out.display()),
        Emit::Kiln => String::new(),
    };
    let summary = format!(
        "wrote {}{rust} ({:.1} MB) for {}{requires}: {} ({} layers), {} ops, {} tensors ({})",
        report.path.display(),
        report.bytes as f64 / 1e6,
        target.name,
        converted.facts.name,
        converted.facts.layers,
        report.ops,
        report.tensors,
        weights.join(", ")
    );
    let report = serde_json::json!({
        "artifact": report,
        "rust_module": (args.emit == Emit::Rust).then_some(&args.out),
        "memory": plan,
        "peak_bytes": plan.total(),
        "target": target.name,
        "required_cpu_features": packing.required_features,
        "layout": packing.layout.name(),
    });
    Ok(Compiled { report, summary })
}

/// Where the artifact goes: `--out`, or with `--emit rust` beside the module (`model.rs` →
/// `model.kiln`).
fn artifact_path(args: &Args) -> anyhow::Result<PathBuf> {
    match args.emit {
        Emit::Kiln => Ok(args.out.clone()),
        Emit::Rust => {
            anyhow::ensure!(
                args.out.extension().is_some_and(|e| e == "rs"),
                "--emit rust writes a Rust module: give -o a `.rs` path (the artifact goes beside it), not {}",
                args.out.display()
            );
            Ok(args.out.with_extension("kiln"))
        }
    }
}

/// The module at `out` that embeds `artifact` (its sibling) with the plan of a one-thread
/// session at `context` tokens, written atomically.
fn write_rust_module(artifact: &Path, out: &Path, context: usize) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(artifact).with_context(|| format!("reading {}", artifact.display()))?;
    let file_name = artifact
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| {
            format!(
                "{}: the artifact needs a UTF-8 file name",
                artifact.display()
            )
        })?;
    let options = EmbedOptions {
        context,
        ..EmbedOptions::default()
    };
    let module = rust_module(&bytes, file_name, &options)
        .with_context(|| format!("embedding {}", artifact.display()))?;
    crate::pipeline::cache::write_atomic(out, module.source.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> Target {
        resolve_target(name).expect("shipped target")
    }

    #[test]
    fn the_target_budget_is_the_limit_unless_max_memory_is_given() {
        let qcs = target("qcs6490");
        assert_eq!(memory_limit(None, &qcs), Some(Limit::Budget(2 << 30)));
        assert_eq!(memory_limit(Some(5), &qcs), Some(Limit::Flag(5)));
        assert_eq!(memory_limit(None, &target("host")), None);
    }

    #[test]
    fn a_model_over_the_target_budget_is_refused_with_the_numbers() {
        let qcs = target("qcs6490");
        let limit = memory_limit(None, &qcs);
        // SmolLM2-135M in f32 at a 131072-token context: a 6.0 GB KV cache alone
        // (2 × 30 layers × 3 kv heads × 64 × 131072 × 4 bytes).
        let kv = 2 * 30 * 3 * 64 * 131_072 * 4;
        let e = check_fits(kv, 131_072, limit, &qcs).expect_err("over 2 GiB");
        let message = e.to_string();
        assert!(message.contains("6039.8 MB"), "{message}");
        assert!(message.contains("131072-token"), "{message}");
        assert!(
            message.contains("the qcs6490 memory budget of 2147.5 MB"),
            "{message}"
        );
        assert!(message.contains("nothing was written"), "{message}");
        assert!(check_fits(2 << 30, 2048, limit, &qcs).is_ok());
        assert!(check_fits(kv, 131_072, None, &target("host")).is_ok());
        let e = check_fits(kv, 8, Some(Limit::Flag(1_000)), &qcs).expect_err("over the flag");
        assert!(
            e.to_string().contains("--max-memory budget of 0.0 MB"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_target_lists_the_known_ones() {
        let e = resolve_target("pdp-11").expect_err("unknown").to_string();
        assert!(e.contains("unknown target \"pdp-11\""), "{e}");
        for name in kiln_targets::names() {
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_size("300000"), Ok(300_000));
        assert_eq!(parse_size("512M"), Ok(512_000_000));
        assert_eq!(parse_size("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 * 1024 * 1024 * 1024));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("M").is_err());
    }
}
