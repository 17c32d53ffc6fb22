//! `cargo xtask gen-shaped`: an f16 GGUF with the exact shape of Llama 3.2 1B / 3B or 3.1 8B
//! and seeded random weights, which llama.cpp and kiln both read (benchmarks at the sizes
//! users run, without the gated downloads).

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_compiler::shaped::{Shape, SHAPES};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Shapes (from each model's config.json): llama3.2-1b (16 layers, 2048 \
wide, 32/8 heads, tied embeddings), llama3.2-3b (28 layers, 3072 wide, 24/8 heads, tied), \
llama3.1-8b (32 layers, 4096 wide, 32/8 heads, untied). All: vocabulary 128256, llama3 RoPE \
scaling (as llama.cpp's rope_freqs.weight), Meta's tokenizer and the Llama 3.2 chat template. \
The f16 files take 2.5, 6.4 and 16.1 GB."
)]
pub struct Args {
    /// Which model's shape: llama3.2-1b, llama3.2-3b or llama3.1-8b.
    #[arg(long)]
    pub shape: String,
    /// The GGUF to write (atomically).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Seed of the weights; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Meta's Llama 3 `tokenizer.model` (default: the `llama3-tokenizer` card, fetched if missing).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let shape = Shape::find(&args.shape).with_context(|| {
        let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        format!(
            "unknown shape {:?} (one of {})",
            args.shape,
            names.join(", ")
        )
    })?;
    let tokenizer = match args.tokenizer {
        Some(path) => path,
        None => kiln_compiler::pipeline::fetch::ensure_model("llama3-tokenizer")?.primary,
    };
    let tensors = shape.tensors().len();
    let bar = ProgressBar::new(tensors as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("writing {}", args.out.display()));
    let bytes =
        kiln_compiler::shaped::write_gguf(&shape, args.seed, &tokenizer, &args.out, |_| {
            bar.inc(1)
        })?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({:.2} GB, {} shape, {:.2} B parameters, seed {})",
        args.out.display(),
        bytes as f64 / 1e9,
        shape.name,
        shape.parameters() as f64 / 1e9,
        args.seed
    );
    Ok(())
}
