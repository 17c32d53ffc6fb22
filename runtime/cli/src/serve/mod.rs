//! `kiln serve`: an HTTP server for a device, compatible with llama.cpp's server and OpenAI's
//! completion API (`GET /health`, `GET /metrics`, `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, Server-Sent Events with `"stream": true`).
//!
//! The model is loaded once; `--parallel` slots, each a thread with its own KV cache planned
//! at start-up, generate while hyper serves HTTP on a small tokio runtime, so `/health` and
//! `/metrics` answer during a generation and a slow or idle client holds only its own
//! connection. A client that goes away cancels its generation; SIGTERM stops taking requests,
//! gives running ones `--shutdown-grace` seconds, cancels the rest and exits 0.

mod api;
mod http;
mod metrics;
mod slots;
mod turns;

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::common::{ModelArgs, SamplingArgs};

/// Most slots `--parallel` may ask for.
const MAX_PARALLEL: usize = 64;

#[derive(clap::Args)]
#[command(
    after_help = "Endpoints: GET /health; GET /metrics (Prometheus); GET /v1/models; \
POST /v1/completions with {\"prompt\", \"max_tokens\", \"temperature\", \"top_p\", \"top_k\", \
\"min_p\", \"seed\", \"stop\", \"stream\", \"stream_options\", \"logprobs\", \"presence_penalty\", \
\"frequency_penalty\", \"repeat_penalty\", \"repeat_last_n\"}; POST /v1/chat/completions with \
{\"messages\": [{\"role\", \"content\"}], ...the same fields, \"logprobs\"/\"top_logprobs\", \
\"tools\", \"tool_choice\" (auto, none, required or a function), \"response_format\" (json_object, \
json_schema)}: tool calls come back as OpenAI's \"tool_calls\" (finish_reason \"tool_calls\"), \
role \"tool\" messages with \"tool_call_id\" give their results back; a required or named call and \
a json_schema reply are constrained to their schema. A field kiln does not honour is refused \
with 400 naming it. Without \"max_tokens\" a reply may fill the context; without \"seed\" each \
request draws a random one. \"stream\": true answers with Server-Sent Events (`data: {...}` \
lines, then `data: [DONE]`). The sampling flags below are the defaults of fields a request \
leaves out.\n\nWhen every slot is busy and --max-queue requests wait, a request gets 503 with \
Retry-After. One line per request goes to stderr.\n\nExample:\n  \
kiln serve model.kiln --port 8080 --parallel 2 &\n  curl -s localhost:8080/v1/completions -d \
'{\"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}'"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences generated at once, each with its own KV cache allocated at start-up (memory
    /// grows by one cache and its buffers per slot); they take turns on the cores.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Requests that may wait for a slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    max_queue: usize,
    /// Tokens to generate at most when a request gives no `max_tokens` (-1: until the context
    /// is full or the model stops).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    n_predict: i64,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Allow browsers on this origin (e.g. https://app.example; * for any) to call the server;
    /// repeatable. None by default.
    #[arg(long, value_name = "ORIGIN")]
    cors_origin: Vec<String>,
    /// Seconds running and queued requests get to finish after SIGTERM or Ctrl-C before they
    /// are cancelled.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    shutdown_grace: f64,
    /// Keep the KV cache of each conversation start (system turns, tools) a chat request
    /// brings in DIR, one snapshot per start: loaded instead of computed when a request opens
    /// the same way after a restart or another conversation.
    #[arg(long, value_name = "DIR")]
    prompt_cache: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// One line on stderr, `kiln serve: …`; a closed stderr is ignored (a server must not stop
/// because its log went away).
pub fn log(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "kiln serve: {line}");
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.parallel == 0 || args.parallel > MAX_PARALLEL {
        anyhow::bail!(
            "--parallel {} must be between 1 and {MAX_PARALLEL}",
            args.parallel
        );
    }
    if !(args.shutdown_grace.is_finite() && (0.0..=3600.0).contains(&args.shutdown_grace)) {
        anyhow::bail!(
            "--shutdown-grace {} must be between 0 and 3600 seconds",
            args.shutdown_grace
        );
    }
    let n_predict = match args.n_predict {
        -1 => None,
        n if n >= 0 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        n => anyhow::bail!("--n-predict {n} must be -1 or more"),
    };
    let model = Arc::new(args.model.load()?);
    // A model without a template still serves /v1/completions.
    let template = model.chat_template().ok();
    let metrics = Arc::new(metrics::Metrics::default());
    let slots = slots::Slots::start(
        Arc::clone(&model),
        slots::SlotConfig {
            parallel: args.parallel,
            queue_limit: args.max_queue,
            session: args.model.session_options(),
            prompt_cache: args.prompt_cache.clone(),
        },
        Arc::clone(&metrics),
    )?;
    let listener = std::net::TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    log(format_args!(
        "{} ({} slot{} of {} tokens) listening on http://{addr}",
        model.facts().name,
        args.parallel,
        if args.parallel == 1 { "" } else { "s" },
        slots.context
    ));
    let sampling = args.sampling.config(&model.facts().sampling);
    let app = Arc::new(http::App {
        api: api::Context {
            context: slots.context,
            model,
            template,
            sampling,
            seed: args.sampling.seed,
            stop: args.sampling.stop.clone(),
            n_predict,
            prompt_cache: args.prompt_cache.is_some(),
        },
        slots,
        metrics,
        api_key: args.api_key.clone(),
        cors_origins: args.cors_origin.clone(),
        served: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(http::serve(
        listener,
        Arc::clone(&app),
        Duration::from_secs_f64(args.shutdown_grace),
    ))?;
    drop(runtime);
    log("stopped");
    Ok(())
}
