//! `kiln perplexity`: llama.cpp's `llama-perplexity` method, so the two numbers compare —
//! non-overlapping windows of `--ctx` tokens (default 512 here), each scored on its second half.
//! With `--kl-divergence-base` it saves the scored logits, and with `--kl-divergence` as well it
//! compares this run against saved ones instead (another model, kernel level or machine).

use std::path::PathBuf;

use anyhow::{bail, Context};
use kiln_engine::logits::{self, Divergence, LogitsReader, LogitsWriter};
use kiln_engine::perplexity::{perplexity_with, Chunk, Windows};
use serde::Serialize;

use crate::common::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Score at most this many windows (default: all the text holds).
    #[arg(long)]
    chunks: Option<usize>,
    /// Tokens per forward pass (default: the whole window; 1 runs it token by token, as
    /// decoding does).
    #[arg(short = 'b', long = "batch-size")]
    batch_size: Option<usize>,
    /// Save the logits of every scored token to this file; with --kl-divergence, read them
    /// from it and compare this run against them.
    #[arg(long, value_name = "FILE")]
    kl_divergence_base: Option<PathBuf>,
    /// Compare against the logits in --kl-divergence-base: KL divergence, how often the most
    /// likely token is the same, the largest logit difference.
    #[arg(long, requires = "kl_divergence_base")]
    kl_divergence: bool,
    /// Print {"ppl": …, "chunks": …} (and "kl_divergence": {…}) as JSON.
    #[arg(long)]
    json: bool,
}

/// What `--json` prints.
#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    score: kiln_engine::perplexity::Perplexity,
    #[serde(skip_serializing_if = "Option::is_none")]
    kl_divergence: Option<Divergence>,
}

/// What happens to each scored window's logits.
enum Logits {
    Ignored,
    Saved(LogitsWriter),
    Compared {
        base: LogitsReader,
        window: Vec<u32>,
        rows: Vec<f32>,
        divergence: Divergence,
    },
}

impl Logits {
    fn chunk(&mut self, chunk: &Chunk<'_>, vocab: usize) -> anyhow::Result<()> {
        match self {
            Logits::Ignored => {}
            Logits::Saved(writer) => writer.chunk(chunk.window, chunk.logits)?,
            Logits::Compared {
                base,
                window,
                rows,
                divergence,
            } => {
                base.chunk(window, rows)?;
                if window != chunk.window {
                    let at = window.iter().zip(chunk.window).position(|(a, b)| a != b);
                    bail!(
                        "{}: window {} was scored over other tokens (they part at position {}); \
                         compare runs over the same text, --ctx and tokenizer",
                        base.path().display(),
                        chunk.index,
                        at.unwrap_or(0)
                    );
                }
                let first = base.header().first_scored();
                for (j, (b, o)) in rows
                    .chunks_exact(vocab)
                    .zip(chunk.logits.chunks_exact(vocab))
                    .enumerate()
                {
                    let target = window[first + j + 1] as usize;
                    divergence.add(&logits::compare(b, o), logits::log_prob(b, target));
                }
            }
        }
        Ok(())
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let model = args.model.load()?;
    let windows = Windows {
        ctx: args.model.ctx.unwrap_or(512),
        batch: args.batch_size.unwrap_or(0),
        chunks: args.chunks.unwrap_or(0),
    };
    let tokens = model.encode_prompt(&text, true);
    let header = windows.header(&model, &tokens);
    let mut logits = match (&args.kl_divergence_base, args.kl_divergence) {
        (None, _) => Logits::Ignored,
        (Some(path), false) => Logits::Saved(LogitsWriter::create(path, header)?),
        (Some(path), true) => {
            let base = LogitsReader::open(path)?;
            let h = base.header();
            if h.vocab != header.vocab || h.ctx != header.ctx || h.chunks < header.chunks {
                bail!(
                    "{}: saved for {} windows of {} tokens over a vocabulary of {}; this run \
                     scores {} windows of {} over {}",
                    path.display(),
                    h.chunks,
                    h.ctx,
                    h.vocab,
                    header.chunks,
                    header.ctx,
                    header.vocab
                );
            }
            Logits::Compared {
                window: vec![0; h.ctx],
                rows: vec![0.0; h.rows() * h.vocab],
                base,
                divergence: Divergence::default(),
            }
        }
    };
    let json = args.json;
    let score = perplexity_with(
        &model,
        &tokens,
        &windows,
        &args.model.session_options(),
        |chunk| {
            if !json {
                eprint!("[{}]{:.4} ", chunk.index + 1, chunk.ppl);
            }
            logits.chunk(&chunk, header.vocab)
        },
    )
    .with_context(|| format!("scoring {}", args.file.display()))?;
    let kl_divergence = match logits {
        Logits::Ignored => None,
        Logits::Saved(writer) => {
            writer.finish()?;
            None
        }
        Logits::Compared { divergence, .. } => Some(divergence),
    };
    if json {
        let report = Report {
            score,
            kl_divergence,
        };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    eprintln!();
    println!(
        "perplexity: {:.4} over {} chunks of {} tokens",
        score.ppl, score.chunks, score.ctx
    );
    if let Some(d) = kl_divergence {
        println!(
            "against {} ({} tokens, base perplexity {:.4}): KL divergence mean {:.6}, max {:.6}; \
             same top token {:.2} %; largest logit difference {:.4}",
            args.kl_divergence_base.unwrap_or_default().display(),
            d.rows,
            d.base_ppl,
            d.kld_mean,
            d.kld_max,
            d.same_top_p,
            d.max_abs_logit_diff
        );
    }
    Ok(())
}
