//! `cargo xtask compile`: checkpoint → `.kiln` artifact that the `kiln` runtime executes.

use std::path::PathBuf;

use anyhow::Context;
use kiln_runtime::quant::Format;

use crate::source;

/// Compile a model into a `.kiln` artifact (op list, weights, tokenizer, chat template).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model card name (fetched on demand), a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: String,
    /// The device to compile for; `host` is this machine.
    #[arg(long, default_value = "host")]
    pub target: String,
    /// Weight storage: `f32` dequantizes everything; a block format (`q4_1`, `q8_0`, `q4_0`) keeps
    /// the checkpoint's own blocks bit for bit (embeddings may stay `q8_0`).
    #[arg(long, default_value = "f32")]
    pub quant: String,
    /// Where to write the artifact.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
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
    let checkpoint = source::import(&args.model)?;
    let converted = kiln_compiler::emit::convert(&checkpoint, quant)?;
    drop(checkpoint);
    let spinner = source::spinner(&format!("writing {}", args.out.display()));
    let report = kiln_compiler::emit::write_artifact(&converted, &args.out);
    spinner.finish_and_clear();
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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
