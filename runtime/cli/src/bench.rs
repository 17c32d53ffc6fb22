//! `kiln bench`: prompt and decode speed, time to first token and peak memory through the same
//! session path as `kiln run`, as a median with its spread over repetitions.
//!
//! Each repetition, as llama-bench does with `-d`: the cache holds `--depth` tokens (filled
//! once, untimed), then `-p` random prompt tokens are run in one pass (prompt speed; time to
//! first token includes picking that token), the cache is cut back to `--depth` and `-n` tokens
//! are decoded one at a time (decode speed at positions `depth..depth + n`). One untimed
//! warm-up pass comes first, so page faults of the mapped weights are not measured (unless
//! `--no-warmup`, as llama-bench's, for counting exactly the work of `-p` and `-n`).

use std::time::Instant;

use anyhow::ensure;
use kiln_engine::constrain::{Constraint, Guide};
use kiln_engine::decoder::Decoder;
use kiln_engine::generate::Model;
use kiln_engine::stats::Stats;
use kiln_runtime::exec::SessionOptions;
use kiln_runtime::sampler::{Sampler, SamplerConfig};

use crate::common::{ConstraintArgs, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
    n_prompt: usize,
    /// Generated tokens.
    #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
    n_gen: usize,
    /// Tokens already in the cache when the prompt and the decode steps run (speed at depth).
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// Repetitions; the median and the spread (min, max, standard deviation) are reported.
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// Skip the untimed warm-up pass (as llama-bench's `--no-warmup`).
    #[arg(long)]
    no_warmup: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Decode under a constraint (`--json-schema`, `--grammar`): each token is the most likely
    /// one the constraint allows, a finished output starts a new one, and the time spent on
    /// masks is reported beside the decode speed.
    #[command(flatten)]
    constraint: ConstraintArgs,
}

/// One repetition's figures.
struct Rep {
    prompt_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
    peak_rss_mb: f64,
    /// Mask computation per decoded token, under a constraint.
    mask_us_per_token: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.n_prompt >= 1, "-p must be at least 1 token");
    ensure!(args.n_gen >= 1, "-n must be at least 1 token");
    ensure!(args.reps >= 1, "--reps must be at least 1");
    let constraint = args.constraint.constraint()?;
    let model = args.model.load()?;
    if let Some(c) = &constraint {
        // Compile once before timing: a constraint that does not compile is an error now.
        model.guide(c)?;
    }
    let vocab = model.facts().vocab_size as u32;
    // Fixed pseudo-random tokens, as llama-bench uses random tokens.
    let tokens = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(salt).wrapping_mul(2_654_435_761) >> 7) % vocab)
            .collect()
    };
    let prompt = tokens(args.n_prompt, 0);
    let opts = SessionOptions {
        context: args
            .model
            .ctx
            .unwrap_or(args.depth + args.n_prompt.max(args.n_gen) + 1),
        batch: args.n_prompt,
        ..args.model.session_options()
    };
    let mut session = model.decoder(opts)?;
    if args.depth > 0 {
        session.forward(&tokens(args.depth, 1 << 20))?;
    }
    if !args.no_warmup {
        // Warm-up: the prompt pass and one decode step, untimed.
        let next = argmax(session.forward(&prompt)?);
        session.rewind(args.depth);
        session.forward(&[next])?;
    }
    let mut reps = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        reps.push(rep(
            &model,
            session.as_mut(),
            &args,
            &prompt,
            constraint.as_ref(),
        )?);
    }
    let stat = |f: fn(&Rep) -> f64| Stats::of(reps.iter().map(f).collect());
    let pp = stat(|r| r.prompt_tokens_per_s);
    let tg = stat(|r| r.decode_tokens_per_s);
    let ttft = stat(|r| r.ttft_ms);
    let rss = stat(|r| r.peak_rss_mb);
    let mask = stat(|r| r.mask_us_per_token);
    // The mask's share of a decode step.
    let mask_share = mask.median * 1e-6 * tg.median;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_tokens_per_s": pp.median,
                "decode_tokens_per_s": tg.median,
                "ttft_ms": ttft.median,
                "peak_rss_mb": rss.median,
                "spread": {
                    "prompt_tokens_per_s": pp,
                    "decode_tokens_per_s": tg,
                    "ttft_ms": ttft,
                    "peak_rss_mb": rss,
                },
                "threads": args.model.threads(),
                "n_prompt": args.n_prompt,
                "n_gen": args.n_gen,
                "depth": args.depth,
                "reps": args.reps,
                "backend": session.backend_name(),
                "constrained": constraint.is_some(),
                "mask_us_per_token": constraint.as_ref().map(|_| mask.median),
                "mask_share_of_decode": constraint.as_ref().map(|_| mask_share),
            })
        );
    } else {
        let after = match args.depth {
            0 => String::new(),
            d => format!(" after {d} cached"),
        };
        println!(
            "median of {} repetition{}; {}, {} threads",
            args.reps,
            if args.reps == 1 { "" } else { "s" },
            session.backend_name(),
            args.model.threads()
        );
        println!(
            "prompt: {}, {} tokens{after}",
            pp.describe("tokens/s"),
            args.n_prompt
        );
        println!("time to first token: {}", ttft.describe("ms"));
        println!(
            "decode: {}, {} tokens{after}",
            tg.describe("tokens/s"),
            args.n_gen
        );
        if constraint.is_some() {
            println!(
                "constraint masks: {} per decoded token, {:.1} % of a decode step",
                mask.describe("µs"),
                mask_share * 100.0
            );
        }
        println!("peak RSS: {}", rss.describe("MB"));
    }
    Ok(())
}

/// One timed repetition over a cache holding `args.depth` tokens (and maybe more, cut off).
fn rep(
    model: &Model,
    session: &mut dyn Decoder,
    args: &Args,
    prompt: &[u32],
    constraint: Option<&Constraint>,
) -> anyhow::Result<Rep> {
    session.rewind(args.depth);
    let t0 = Instant::now();
    let mut next = argmax(session.forward(prompt)?);
    let prompt_s = t0.elapsed().as_secs_f64();
    session.rewind(args.depth);
    let mut guided = constraint
        .map(|c| -> anyhow::Result<(Guide, Sampler)> {
            let greedy = Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
            Ok((model.guide(c)?, greedy))
        })
        .transpose()?;
    let mut mask_s = 0.0;
    let t1 = Instant::now();
    for _ in 0..args.n_gen {
        let logits = session.forward(&[next])?;
        next = match guided.as_mut() {
            None => argmax(logits),
            Some((guide, greedy)) => {
                let t = Instant::now();
                guide.compute()?;
                let id = greedy.sample_where(logits, |id| guide.allows(id));
                guide.accept(id)?;
                if guide.is_done() {
                    *guide = model.guide(constraint.expect("guided"))?;
                }
                mask_s += t.elapsed().as_secs_f64();
                id
            }
        };
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok(Rep {
        prompt_tokens_per_s: args.n_prompt as f64 / prompt_s,
        decode_tokens_per_s: args.n_gen as f64 / decode_s,
        ttft_ms: prompt_s * 1e3,
        peak_rss_mb: peak_rss_mb(),
        mask_us_per_token: mask_s * 1e6 / args.n_gen as f64,
    })
}

fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// Peak resident set size so far (VmHWM) in MB, 0 when the kernel does not say.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
