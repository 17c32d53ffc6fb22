//! `cargo xtask gen-tiny`: writes a tiny random Llama 3.2-shaped checkpoint (Hugging Face
//! layout) for tests and demos.

use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write the checkpoint into (created if missing).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Seed of the weights; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Meta's Llama 3 `tokenizer.model` [default: $KILN_HOME/models/llama3-tokenizer/tokenizer.model,
    /// KILN_HOME defaulting to ~/.cache/kiln].
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tokenizer = match args.tokenizer {
        Some(path) => path,
        None => {
            let path = kiln_home()?.join("models/llama3-tokenizer/tokenizer.model");
            anyhow::ensure!(
                path.is_file(),
                "Meta's Llama 3 tokenizer.model is not at {}; pass --tokenizer PATH (PyPI \
                 llama-models==0.3.0 ships it as llama_models/llama3/tokenizer.model)",
                path.display()
            );
            path
        }
    };
    kiln_compiler::tiny::write_checkpoint(&args.out, args.seed, &tokenizer)
        .with_context(|| format!("writing the tiny checkpoint to {}", args.out.display()))?;
    println!("wrote {} (seed {})", args.out.display(), args.seed);
    Ok(())
}

fn kiln_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("KILN_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither KILN_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/kiln"))
}
