//! `cargo xtask export`: checkpoint → standard ONNX decoder with KV cache (float32 weights).

use std::path::PathBuf;

use kiln_compiler::onnx::{export, ExportOptions};

use crate::source;

/// Export a model as an ONNX decoder (`input_ids`, `attention_mask`, `position_ids`,
/// `past_key_values.*` → `logits`, `present.*`) that onnxruntime, onnxruntime-genai and tract run.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model card name (fetched on demand), a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long)]
    pub model: String,
    /// Where to write the ONNX file.
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Store the weights in `<out>.data` even under 2 GB (always done above it).
    #[arg(long)]
    pub external_data: bool,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let checkpoint = source::import(&args.model)?;
    let spinner = source::spinner(&format!("writing {}", args.out.display()));
    let report = export(
        &checkpoint,
        &args.out,
        &ExportOptions {
            external_data: args.external_data,
        },
    );
    spinner.finish_and_clear();
    let report = report?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "path": args.out,
                "bytes": report.bytes,
                "nodes": report.nodes,
                "initializers": report.initializers,
                "external_data": report.external,
            })
        );
    } else {
        println!(
            "wrote {} ({:.1} MB{}): {} nodes, {} initializers",
            args.out.display(),
            report.bytes as f64 / 1e6,
            if report.external {
                ", weights in .data"
            } else {
                ""
            },
            report.nodes,
            report.initializers
        );
    }
    Ok(())
}
