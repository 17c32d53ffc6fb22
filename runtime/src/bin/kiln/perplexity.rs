//! `kiln perplexity`: llama.cpp's `llama-perplexity` method, so the two numbers compare —
//! non-overlapping windows of `--ctx` tokens (default 512 here), each scored on its second half.

use std::path::PathBuf;

use anyhow::Context;
use kiln_runtime::perplexity::perplexity;

use crate::common::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Print {"ppl": …, "chunks": …} as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let model = args.model.load()?;
    let tokens = model.encode_prompt(&text, true);
    let json = args.json;
    let score = perplexity(
        &model,
        &tokens,
        args.model.ctx.unwrap_or(512),
        &args.model.session_options(),
        |i, ppl| {
            if !json {
                eprint!("[{}]{ppl:.4} ", i + 1);
            }
        },
    )
    .with_context(|| format!("scoring {}", args.file.display()))?;
    if json {
        println!("{}", serde_json::to_string(&score)?);
    } else {
        eprintln!();
        println!(
            "perplexity: {:.4} over {} chunks of {} tokens",
            score.ppl, score.chunks, score.ctx
        );
    }
    Ok(())
}
