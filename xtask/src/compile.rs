//! `cargo xtask compile`: checkpoint → `.kiln` artifact that the `kiln` runtime executes.

use std::path::PathBuf;

use anyhow::Context;
use kiln_compiler::quant::QuantPlan;
use kiln_runtime::exec::SessionOptions;
use kiln_runtime::quant::Format;

use crate::source;

/// Compile a model into a `.kiln` artifact (op list, weights, tokenizer, chat template); the
/// peak memory the runtime will need is printed before anything is written.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model card name (fetched on demand), a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: String,
    /// The device to compile for; `host` is this machine.
    #[arg(long, default_value = "host")]
    pub target: String,
    /// Weight storage (`f32`, `f16`, `q8_0`, `q4_0`, `q4_1`): tensors already stored so keep their
    /// bytes, others are re-quantized; with a 4-bit format the embedding and output head get `q8_0`.
    #[arg(long, default_value = "f32")]
    pub quant: String,
    /// Per-tensor storage, `PATTERN=FORMAT` (repeatable; the last match wins): a glob over names
    /// such as `blk.0.ffn_down`, `token_embd`, `output` or the checkpoint's own, e.g. `'blk.*.ffn_down=q8_0'`.
    #[arg(long = "override", value_name = "PATTERN=FORMAT")]
    pub overrides: Vec<String>,
    /// Where to write the artifact.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Context length the memory prediction assumes (default: the model's, at most 4096).
    #[arg(long = "ctx")]
    pub ctx: Option<usize>,
    /// Refuse a model whose predicted peak memory exceeds this (e.g. `512M`, `2G`, bytes).
    #[arg(long, value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
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

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.target == "host",
        "unknown target {:?}: this kiln compiles for `host` (the machine it runs on)",
        args.target
    );
    let quant = Format::from_name(&args.quant).with_context(|| {
        let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
        format!(
            "unknown --quant {:?} (one of {})",
            args.quant,
            names.join(", ")
        )
    })?;
    let quant_plan = args
        .overrides
        .iter()
        .try_fold(QuantPlan::new(quant), |p, spec| p.with_override(spec))?;
    let checkpoint = source::import(&args.model)?;
    let converted = kiln_compiler::emit::convert_with(&checkpoint, &quant_plan)?;
    drop(checkpoint);
    let options = SessionOptions {
        context: args.ctx.unwrap_or(0),
        ..SessionOptions::default()
    };
    let plan = kiln_compiler::emit::memory_plan(&converted, &options)?;
    let fits = args
        .max_memory
        .is_none_or(|limit| plan.total() as u64 <= limit);
    if !args.json || !fits {
        eprintln!(
            "peak memory at a {}-token context: {:.1} MB = weights {:.1} MB (mapped) + KV cache {:.1} MB + buffers {:.1} MB + scratch {:.1} MB + logits {:.1} MB",
            plan.context,
            mb(plan.total()),
            mb(plan.weights),
            mb(plan.kv_cache),
            mb(plan.buffers),
            mb(plan.scratch),
            mb(plan.logits)
        );
    }
    if let Some(limit) = args.max_memory.filter(|_| !fits) {
        anyhow::bail!(
            "the model needs {:.1} MB at a {}-token context, over the --max-memory budget of {:.1} MB; nothing was written (try a smaller --quant or --ctx)",
            mb(plan.total()),
            plan.context,
            limit as f64 / 1e6
        );
    }
    let spinner = source::spinner(&format!("writing {}", args.out.display()));
    let report = kiln_compiler::emit::write_artifact(&converted, &args.out);
    spinner.finish_and_clear();
    let report = report?;
    if args.json {
        let value =
            serde_json::json!({ "artifact": report, "memory": plan, "peak_bytes": plan.total() });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let weights: Vec<String> = report
            .weight_bytes
            .iter()
            .map(|(f, b)| format!("{} MB {f}", b / 1_000_000))
            .collect();
        println!(
            "wrote {} ({:.1} MB): {} ({} layers), {} ops, {} tensors ({})",
            report.path.display(),
            report.bytes as f64 / 1e6,
            converted.facts.name,
            converted.facts.layers,
            report.ops,
            report.tensors,
            weights.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

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
