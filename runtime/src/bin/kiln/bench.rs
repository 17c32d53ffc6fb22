//! `kiln bench`: prompt and decode speed through the same session path as `kiln run`.

use std::time::Instant;

use kiln_runtime::exec::SessionOptions;

use crate::common::ModelArgs;

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
    /// Repetitions; the median is reported.
    #[arg(short = 'r', long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

struct Run {
    prompt_s: f64,
    decode_s: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let vocab = model.facts().vocab_size as u32;
    // A fixed pseudo-random prompt, as llama-bench uses random tokens.
    let prompt: Vec<u32> = (0..args.n_prompt as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
        .collect();
    let opts = SessionOptions {
        context: args.model.ctx.unwrap_or(args.n_prompt + args.n_gen + 1),
        batch: args.n_prompt.max(1),
        ..args.model.session_options()
    };
    let mut session = model.decoder(opts)?;
    let mut runs = Vec::new();
    for _ in 0..args.reps.max(1) {
        session.rewind(0);
        let t0 = Instant::now();
        let mut next = argmax(session.forward(&prompt)?);
        let prompt_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..args.n_gen {
            next = argmax(session.forward(&[next])?);
        }
        runs.push(Run {
            prompt_s,
            decode_s: t1.elapsed().as_secs_f64(),
        });
    }
    let median = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let prompt_s = median(&|r| r.prompt_s);
    let decode_s = median(&|r| r.decode_s);
    let pp = args.n_prompt as f64 / prompt_s;
    let tg = args.n_gen as f64 / decode_s;
    let rss = peak_rss_mb();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_tokens_per_s": pp,
                "decode_tokens_per_s": tg,
                "ttft_ms": prompt_s * 1e3,
                "peak_rss_mb": rss,
                "threads": args.model.threads(),
                "n_prompt": args.n_prompt,
                "n_gen": args.n_gen,
                "reps": runs.len(),
                "backend": session.backend_name(),
            })
        );
    } else {
        println!(
            "prompt: {pp:.1} tokens/s ({} tokens, time to first token {:.1} ms)",
            args.n_prompt,
            prompt_s * 1e3
        );
        println!("decode: {tg:.1} tokens/s ({} tokens)", args.n_gen);
        println!(
            "peak RSS: {rss:.1} MB; threads {}; {}",
            args.model.threads(),
            session.backend_name()
        );
    }
    Ok(())
}

fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

/// Peak resident set size (VmHWM) in MB, 0 when the kernel does not say.
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
