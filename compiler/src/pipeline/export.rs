//! `kilnc export`: checkpoint → standard ONNX decoder with KV cache (float32 weights, or
//! with `--quantized` onnxruntime's `MatMulNBits` over the checkpoint's q8_0/q4_0/q4_1 blocks).

use std::path::PathBuf;

use crate::onnx::{export, export_quantized, ExportOptions};
use anyhow::Context;
use kiln_runtime::quant::Format;

use crate::pipeline::source;

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
    /// Write projections stored in q8_0, q4_0 or q4_1 as onnxruntime's com.microsoft::MatMulNBits
    /// over the same blocks (runs in onnxruntime only); float weights stay MatMul.
    #[arg(long)]
    pub quantized: bool,
    /// Convert the weights to this format first (f32, f16, q8_0, q4_0, q4_1; 4-bit formats keep
    /// the embedding and output head at q8_0), as `kilnc compile --quant` does.
    #[arg(long)]
    pub quant: Option<String>,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut checkpoint = source::import(&args.model)?;
    if let Some(name) = &args.quant {
        let quant = Format::from_name(name)
            .filter(|f| f.quantizable())
            .with_context(|| {
                let names: Vec<&str> = Format::QUANTIZABLE.iter().map(|f| f.name()).collect();
                format!("unknown --quant {name:?} (one of {})", names.join(", "))
            })?;
        checkpoint = crate::emit::convert(&checkpoint, quant)?;
    }
    let spinner = source::spinner(&format!("writing {}", args.out.display()));
    let opts = ExportOptions {
        external_data: args.external_data,
    };
    let report = if args.quantized {
        export_quantized(&checkpoint, &args.out, &opts)
    } else {
        export(&checkpoint, &args.out, &opts)
    };
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
                "quantized": args.quantized,
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
