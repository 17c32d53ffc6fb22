//! `kiln run`: one prompt in, streamed text out.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use kiln_engine::generate::{generate_guided, GenerateOptions};
use kiln_runtime::sampler::Sampler;

use crate::common::{ConstraintArgs, ModelArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt text (special tokens such as <|im_start|> are parsed unless --no-special).
    #[arg(short = 'p', long, conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Treat special-token text in the prompt as plain text.
    #[arg(long)]
    no_special: bool,
    /// Print one JSON object (prompt_ids, ids, text, stop) instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    constraint: ConstraintArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => anyhow::bail!("give a prompt with -p TEXT or -f FILE"),
    };
    let constraint = args.constraint.constraint()?;
    let model = args.model.load()?;
    let mut guide = constraint.map(|c| model.guide(&c)).transpose()?;
    if let Some(c) = model.tokenizer().unencodable(&prompt) {
        anyhow::bail!(
            "the prompt holds {c:?} (U+{:04X}), which this model's vocabulary cannot encode",
            u32::from(c)
        );
    }
    let prompt_ids = model.encode_prompt(&prompt, !args.no_special);
    let mut session = model.decoder(args.model.session_options())?;
    let mut sampler = Sampler::new(
        args.sampling.config(&model.facts().sampling),
        model.facts().vocab_size,
    );
    let opts = GenerateOptions {
        max_tokens: args.n_predict,
        stop: args.sampling.stop.clone(),
        cancel: None,
        top_logprobs: None,
    };
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let out = generate_guided(
        &model,
        session.as_mut(),
        &mut sampler,
        &prompt_ids,
        &opts,
        guide.as_mut(),
        |piece| {
            if !json {
                // A closed pipe (e.g. `| head`) is not an error worth stopping generation for here.
                let _ = stdout
                    .write_all(piece.as_bytes())
                    .and_then(|()| stdout.flush());
            }
        },
    )?;
    if json {
        let value = serde_json::json!({
            "prompt_ids": prompt_ids,
            "ids": out.ids,
            "text": out.text,
            "stop": out.stop,
        });
        writeln!(stdout, "{value}")?;
    } else {
        writeln!(stdout)?;
        if out.stop == kiln_engine::generate::StopReason::ContextFull {
            eprintln!("[stopped: the {}-token context is full]", session.context());
        }
    }
    Ok(())
}
