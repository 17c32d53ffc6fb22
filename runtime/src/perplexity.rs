//! Perplexity exactly as llama.cpp's `llama-perplexity` computes it: non-overlapping windows of
//! `n_ctx` tokens (BOS written over the first when the model adds one), each scored on its second half.

use serde::Serialize;

use crate::exec::SessionOptions;
use crate::generate::{GenerateError, Model};

/// The score of a text.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub chunks: usize,
    pub ctx: usize,
    pub scored_tokens: usize,
}

/// Scores `tokens` in windows of `n_ctx`; `on_chunk(i, running_ppl)` reports progress. Threads
/// and the KV cache type come from `base`; context, batch and logits are set here.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    base: &SessionOptions,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<Perplexity, GenerateError> {
    let chunks = tokens.len() / n_ctx.max(1);
    if chunks == 0 || n_ctx < 4 {
        return Err(GenerateError::TooShort {
            tokens: tokens.len(),
            ctx: n_ctx,
        });
    }
    let opts = SessionOptions {
        context: n_ctx,
        batch: n_ctx,
        logits_all: true,
        ..base.clone()
    };
    let mut session = model.decoder(opts)?;
    let vocab = model.facts().vocab_size;
    let first = n_ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    let mut window = vec![0u32; n_ctx];
    for c in 0..chunks {
        window.copy_from_slice(&tokens[c * n_ctx..(c + 1) * n_ctx]);
        if let (true, Some(bos)) = (model.facts().add_bos, model.facts().bos_id) {
            window[0] = bos;
        }
        session.rewind(0);
        let logits = session.forward_all(&window)?;
        for j in first..n_ctx - 1 {
            nll -= log_softmax_at(&logits[j * vocab..(j + 1) * vocab], window[j + 1] as usize);
            count += 1;
        }
        on_chunk(c, (nll / count as f64).exp());
    }
    Ok(Perplexity {
        ppl: (nll / count as f64).exp(),
        chunks,
        ctx: n_ctx,
        scored_tokens: count,
    })
}

/// `log softmax(row)[target]`, accumulated in f64 as llama.cpp does.
fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    f64::from(row[target] - max) - sum.ln()
}
