//! `kilnc quantize`: a model's weights stored in another format, written as a `.kiln`
//! artifact for this machine or as an ONNX decoder whose projections are onnxruntime's
//! `com.microsoft::MatMulNBits`. The quantization step ([`plan`], [`convert`]) is the one
//! `kilnc compile` uses; the `.kiln` output is `compile --target host` itself.

use std::path::Path;

use crate::graph::Checkpoint;
use crate::onnx::{export_quantized, ExportOptions};
use crate::quant::{Mixture, QuantPlan};
use anyhow::{bail, Context};
use kiln_runtime::quant::Format;

use crate::pipeline::{compile, source};

/// Quantize a model's weights (q8_0, q4_0, q4_1, f16, llama.cpp's q4_k_m/q5_k_m/q6_k mixtures;
/// per-tensor overrides) and write them as
/// a `.kiln` artifact for this machine or as an ONNX decoder for onnxruntime.
#[derive(Debug, clap::Args)]
#[command(after_help = "What gets written depends on the extension of -o:
  .kiln  a kiln artifact for this machine, exactly what `kilnc compile --target host`
         writes (the peak memory it needs is printed first). Run it with `kiln run FILE`.
  .onnx  a standard ONNX decoder whose q8_0/q4_0/q4_1 projections are onnxruntime's
         com.microsoft::MatMulNBits over the same blocks, as `kilnc export --quantized`
         writes; it runs in onnxruntime (`kiln run --backend ort`, Python), not in tract.

Examples:
  kilnc quantize --model smollm2-135m-instruct --quant q4_0 -o smollm2-q4_0.kiln
  kiln run smollm2-q4_0.kiln -p \"The capital of France is\"
  kilnc quantize --model smollm2-135m-instruct --quant q8_0 -o smollm2-q8_0.onnx
  kilnc quantize --model model.gguf --quant q4_1 --override 'blk.*.ffn_down=q8_0' -o m.kiln
  kilnc quantize --model model.f16.gguf --quant q4_k_m -o m-q4_k_m.kiln

Weights already stored in the requested format keep their bytes (bit for bit); the others are
dequantized and re-quantized with ggml's reference arithmetic, so kiln's q4_1 of a GGUF's Q4_1
tensor is that tensor. q4_k_m, q5_k_m and q6_k pick each tensor's format as llama-quantize's
Q4_K_M, Q5_K_M and Q6_K do (no importance matrix) and write the same bytes. To compile for a device other than this machine, use
`kilnc compile --target` (`kilnc targets` lists them).")]
pub struct Args {
    /// The model: a card name (fetched on demand; `kilnc models` lists them), a GGUF file,
    /// a Hugging Face checkpoint directory (`config.json` + `*.safetensors`) or a float ONNX
    /// decoder (lowered back through tract).
    #[arg(long)]
    pub model: String,
    /// Storage of the weight matrices: q8_0 (8-bit), q4_0 or q4_1 (4-bit; the embedding and the
    /// output head stay q8_0), f16 or f32; or llama.cpp's mixture q4_k_m, q5_k_m or q6_k.
    /// Norm weights stay f32.
    #[arg(long)]
    pub quant: String,
    /// Per-tensor storage, `PATTERN=FORMAT` (repeatable; the last match wins): a glob over names
    /// such as `blk.0.ffn_down`, `token_embd`, `output` or the checkpoint's own, e.g.
    /// `'blk.*.ffn_down=q8_0'`; FORMAT is any of f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k,
    /// q5_k, q6_k. A pattern that matches no weight matrix is an error.
    #[arg(long = "override", value_name = "PATTERN=FORMAT")]
    pub overrides: Vec<String>,
    /// Where to write: `NAME.kiln` (artifact for this machine) or `NAME.onnx` (MatMulNBits
    /// decoder; weights go to `NAME.onnx.data` above protobuf's 2 GB limit).
    #[arg(short = 'o', long = "out")]
    pub out: std::path::PathBuf,
    /// Print a JSON report on stdout instead of text (`.kiln`: the report of
    /// `kilnc compile --json`).
    #[arg(long)]
    pub json: bool,
}

/// What `-o` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Kiln,
    Onnx,
}

/// The output kind `out`'s extension names; any other is an error that says which exist.
fn output_kind(out: &Path) -> anyhow::Result<Output> {
    match out.extension().and_then(|e| e.to_str()) {
        Some("kiln") => Ok(Output::Kiln),
        Some("onnx") => Ok(Output::Onnx),
        _ => bail!(
            "-o {}: the extension says what to write: `.kiln` (an artifact for this machine) or `.onnx` (a MatMulNBits decoder for onnxruntime)",
            out.display()
        ),
    }
}

/// The storage plan for `--quant quant` and `--override` specs `overrides`.
pub fn plan(quant: &str, overrides: &[String]) -> anyhow::Result<QuantPlan> {
    let base = if quant == "copy" {
        QuantPlan::copy()
    } else if let Some(m) = Mixture::from_name(quant) {
        QuantPlan::mixture(m)
    } else {
        QuantPlan::new(
            Format::from_name(quant)
                .filter(|f| f.quantizable())
                .with_context(|| {
                    let names: Vec<&str> = Format::QUANTIZABLE
                        .iter()
                        .map(|f| f.name())
                        .chain(Mixture::ALL.iter().map(|m| m.name()))
                        .collect();
                    format!(
                        "unknown --quant {quant:?} (one of {}, or copy to keep each tensor as the checkpoint stores it)",
                        names.join(", ")
                    )
                })?,
        )
    };
    Ok(overrides
        .iter()
        .try_fold(base, |p, spec| p.with_override(spec))?)
}

/// `checkpoint` with every tensor stored as `plan` says, under a spinner: re-quantizing a
/// large checkpoint takes minutes.
pub fn convert(checkpoint: &Checkpoint, plan: &QuantPlan) -> anyhow::Result<Checkpoint> {
    let overrides = match plan.overrides.len() {
        0 => String::new(),
        1 => " and 1 override".to_owned(),
        n => format!(" and {n} overrides"),
    };
    let spinner = source::spinner(&format!("quantizing to {}{overrides}", plan.name()));
    let converted = crate::emit::convert_with(checkpoint, plan);
    spinner.finish_and_clear();
    Ok(converted?)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match output_kind(&args.out)? {
        Output::Kiln => compile::run(compile::Args {
            model: args.model,
            target: "host".to_owned(),
            quant: Some(args.quant),
            overrides: args.overrides,
            out: args.out,
            ctx: None,
            max_memory: None,
            json: args.json,
            emit: compile::Emit::Kiln,
        }),
        Output::Onnx => onnx(&args),
    }
}

/// Bytes of weights by storage format, in the order formats first appear.
fn weight_bytes(checkpoint: &Checkpoint) -> Vec<(&'static str, u64)> {
    let mut by_format: Vec<(&'static str, u64)> = Vec::new();
    for t in checkpoint.weights.tensors() {
        let (name, len) = (t.format.name(), t.data.len() as u64);
        match by_format.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += len,
            None => by_format.push((name, len)),
        }
    }
    by_format
}

/// The `.onnx` output: quantize, then export with `MatMulNBits`.
fn onnx(args: &Args) -> anyhow::Result<()> {
    let plan = plan(&args.quant, &args.overrides)?;
    let checkpoint = source::import(&args.model)?;
    let converted = convert(&checkpoint, &plan)?;
    drop(checkpoint);
    let spinner = source::spinner(&format!("writing {}", args.out.display()));
    let report = export_quantized(&converted, &args.out, &ExportOptions::default());
    spinner.finish_and_clear();
    let report = report?;
    let weights = weight_bytes(&converted);
    if args.json {
        let value = serde_json::json!({
            "onnx": {
                "path": args.out,
                "bytes": report.bytes,
                "nodes": report.nodes,
                "initializers": report.initializers,
                "external_data": report.external,
                "weight_bytes": weights,
            },
            "quant": plan.name(),
            "overrides": args.overrides,
            "model": converted.facts.name,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let weights: Vec<String> = weights
            .iter()
            .map(|(f, b)| format!("{:.1} MB {f}", *b as f64 / 1e6))
            .collect();
        println!(
            "wrote {} for onnxruntime: {} ({} layers) in {:.1} MB ({}), {} nodes, {} initializers",
            args.out.display(),
            converted.facts.name,
            converted.facts.layers,
            report.bytes as f64 / 1e6,
            weights.join(", "),
            report.nodes,
            report.initializers
        );
        if report.external {
            println!("the weights are in {}.data, next to it", args.out.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Storage;

    #[test]
    fn the_extension_of_out_picks_the_output() {
        assert_eq!(output_kind(Path::new("a/m.kiln")).ok(), Some(Output::Kiln));
        assert_eq!(output_kind(Path::new("m.onnx")).ok(), Some(Output::Onnx));
        for bad in ["m.gguf", "m", "m.KILN.txt"] {
            let e = output_kind(Path::new(bad)).expect_err(bad).to_string();
            assert!(
                e.contains(bad) && e.contains(".kiln") && e.contains(".onnx"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_plan_takes_the_format_and_every_override() {
        let p = plan("q4_0", &["blk.*.ffn_down=q8_0".to_owned()]).expect("plan");
        assert_eq!(p.storage, Storage::Each(Format::Q4_0));
        assert_eq!(
            p.overrides,
            vec![("blk.*.ffn_down".to_owned(), Format::Q8_0)]
        );
        let e = plan("q3_k", &[]).expect_err("unknown format").to_string();
        assert!(e.contains("\"q3_k\"") && e.contains("q4_1"), "{e}");
        let e = plan("q4_0", &["ffn_down".to_owned()]).expect_err("no =");
        assert!(e.to_string().contains("PATTERN=FORMAT"), "{e}");
    }

    #[test]
    fn copy_and_the_k_quant_mixtures_are_plans_and_k_quants_are_overrides() {
        let p = plan("copy", &[]).expect("copy");
        assert_eq!((p.storage, p.name()), (Storage::Copy, "copy"));
        for m in Mixture::ALL {
            let p = plan(m.name(), &[]).ok().map(|p| (p.storage, p.name()));
            assert_eq!(p, Some((Storage::Mixture(m), m.name())));
        }
        // q4_k alone is no plan (llama.cpp has none: its rows often hold no whole super-block),
        // but any format kiln writes may be an override.
        let e = plan("q4_k", &[]).expect_err("q4_k").to_string();
        assert!(
            e.contains("\"q4_k\"") && e.contains("q4_k_m") && e.contains("copy"),
            "{e}"
        );
        let p = plan("copy", &["blk.*.ffn_down=q6_k".to_owned()]).expect("q6_k override");
        assert_eq!(
            p.overrides,
            vec![("blk.*.ffn_down".to_owned(), Format::Q6K)]
        );
        let e = plan("copy", &["blk.*.ffn_down=bf16".to_owned()]).expect_err("bf16");
        assert!(e.to_string().contains("unknown format \"bf16\""), "{e}");
    }
}
