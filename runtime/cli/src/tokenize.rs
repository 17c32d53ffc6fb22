//! `kiln tokenize`: the ids of a text under a model's tokenizer or a tokenizer file.

use std::path::PathBuf;

use anyhow::Context;
use kiln_engine::generate::Model;
use kiln_engine::tokenizer::{Tokenizer, TokenizerData};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "tokenizer"])))]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "text_file"])))]
pub struct Args {
    /// A compiled model whose tokenizer to use.
    model: Option<PathBuf>,
    /// A tokenizer file instead: Hugging Face `tokenizer.json` or Meta's tiktoken `tokenizer.model`.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The text.
    #[arg(long)]
    text: Option<String>,
    /// Read the text from a file.
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// Treat special-token text as plain text.
    #[arg(long)]
    no_special: bool,
    /// Print {"ids": […]}.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = match (&args.text, &args.text_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => anyhow::bail!("give --text or --text-file"),
    };
    let ids = match (&args.model, &args.tokenizer) {
        (Some(m), _) => {
            let model = Model::open(m).with_context(|| format!("loading {}", m.display()))?;
            model.encode_prompt(&text, !args.no_special)
        }
        (None, Some(path)) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let data = if bytes.first() == Some(&b'{') {
                TokenizerData::from_tokenizer_json(&bytes)
            } else {
                TokenizerData::from_tiktoken(&bytes)
            }
            .with_context(|| format!("{}", path.display()))?;
            Tokenizer::new(&data)?.encode(&text, !args.no_special)
        }
        (None, None) => anyhow::bail!("give a model or --tokenizer FILE"),
    };
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}
