//! What `GET /metrics` reports, in Prometheus' text format (names as llama.cpp's server's,
//! under `kiln_`): requests, tokens, prompt and decode speed, slots in use, queue depth.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::slots::Load;

/// Counters since the server started.
#[derive(Default)]
pub struct Metrics {
    /// Completion requests answered, by outcome.
    answered: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    /// Prompt tokens run, and those found in a slot's cache instead.
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    prompt_micros: AtomicU64,
    decode_micros: AtomicU64,
}

/// How a completion request ended, for the counters.
pub enum Outcome {
    Answered,
    Failed,
    /// Refused with 503: every slot busy and the queue full, or shutting down.
    Rejected,
}

impl Metrics {
    pub fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Answered => &self.answered,
            Outcome::Failed => &self.failed,
            Outcome::Rejected => &self.rejected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one generation's tokens and times.
    pub fn finished(
        &self,
        ran: usize,
        cached: usize,
        generated: usize,
        prompt: Duration,
        decode: Duration,
    ) {
        let add = |c: &AtomicU64, v: u64| c.fetch_add(v, Ordering::Relaxed);
        add(&self.prompt_tokens, ran as u64);
        add(&self.cached_tokens, cached as u64);
        add(&self.generated_tokens, generated as u64);
        add(&self.prompt_micros, prompt.as_micros() as u64);
        add(&self.decode_micros, decode.as_micros() as u64);
    }

    /// The exposition text.
    pub fn render(&self, load: &Load) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let seconds = |c: &AtomicU64| get(c) as f64 / 1e6;
        let rate = |tokens: &AtomicU64, micros: &AtomicU64| {
            let s = seconds(micros);
            if s > 0.0 {
                get(tokens) as f64 / s
            } else {
                0.0
            }
        };
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(
                out,
                "# HELP kiln_{name} {help}\n# TYPE kiln_{name} {kind}\nkiln_{name} {value}\n"
            );
        };
        let requests = [
            ("answered", get(&self.answered)),
            ("failed", get(&self.failed)),
            ("rejected", get(&self.rejected)),
        ];
        for (outcome, n) in requests {
            metric(
                &format!("requests_{outcome}_total"),
                "counter",
                &format!("Completion requests {outcome} (rejected: 503, busy or stopping)."),
                n.to_string(),
            );
        }
        let counters = [
            (
                "prompt_tokens_total",
                "Prompt tokens run.",
                get(&self.prompt_tokens).to_string(),
            ),
            (
                "prompt_tokens_cached_total",
                "Prompt tokens found in a slot's KV cache.",
                get(&self.cached_tokens).to_string(),
            ),
            (
                "tokens_predicted_total",
                "Tokens generated.",
                get(&self.generated_tokens).to_string(),
            ),
            (
                "prompt_seconds_total",
                "Time spent running prompts.",
                seconds(&self.prompt_micros).to_string(),
            ),
            (
                "tokens_predicted_seconds_total",
                "Time spent generating.",
                seconds(&self.decode_micros).to_string(),
            ),
        ];
        for (name, help, value) in counters {
            metric(name, "counter", help, value);
        }
        let gauges = [
            (
                "prompt_tokens_seconds",
                "Prompt tokens per second, on average.",
                rate(&self.prompt_tokens, &self.prompt_micros).to_string(),
            ),
            (
                "predicted_tokens_seconds",
                "Generated tokens per second, on average.",
                rate(&self.generated_tokens, &self.decode_micros).to_string(),
            ),
            (
                "slots",
                "Sequences that can generate at once (--parallel).",
                load.slots.to_string(),
            ),
            (
                "requests_processing",
                "Slots generating now.",
                load.busy.to_string(),
            ),
            (
                "requests_deferred",
                "Requests waiting for a slot.",
                load.queued.to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            metric(name, "gauge", help, value);
        }
        out
    }
}
