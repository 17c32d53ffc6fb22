//! Perplexity exactly as llama.cpp's `llama-perplexity` computes it: non-overlapping windows of
//! `ctx` tokens (BOS written over the first when the model adds one), each scored on its second
//! half, in forward passes of at most `batch` tokens.

use serde::Serialize;

use crate::generate::{GenerateError, Model};
use crate::logits::{log_prob, Header};
use kiln_runtime::exec::SessionOptions;

/// How a text is cut into scored windows, as llama.cpp's `-c`, `-b` and `--chunks`.
#[derive(Clone, Copy, Debug)]
pub struct Windows {
    /// Tokens per window.
    pub ctx: usize,
    /// Tokens per forward pass; 0 = the whole window in one (1 = token by token, as decoding).
    pub batch: usize,
    /// At most this many windows; 0 = as many as the text holds.
    pub chunks: usize,
}

impl Windows {
    /// Whole windows of `ctx` tokens, one pass each, over the whole text.
    pub fn of(ctx: usize) -> Windows {
        Windows {
            ctx,
            batch: 0,
            chunks: 0,
        }
    }

    /// The windows scored in `tokens` of `model`.
    pub fn header(&self, model: &Model, tokens: &[u32]) -> Header {
        let fit = tokens.len() / self.ctx.max(1);
        Header {
            vocab: model.facts().vocab_size,
            ctx: self.ctx,
            chunks: if self.chunks == 0 {
                fit
            } else {
                fit.min(self.chunks)
            },
        }
    }
}

/// The score of a text.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub chunks: usize,
    pub ctx: usize,
    pub scored_tokens: usize,
}

/// One scored window, as [`perplexity_with`] hands it to its caller.
pub struct Chunk<'a> {
    pub index: usize,
    /// Perplexity over the windows so far.
    pub ppl: f64,
    /// The window's tokens (BOS written over the first when the model adds one).
    pub window: &'a [u32],
    /// The logits of its scored positions, `header.rows() × vocab`.
    pub logits: &'a [f32],
}

/// Scores `tokens` in `windows`. Threads, the KV cache type and kernels come from `base`;
/// context, batch and logits are set here.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    windows: &Windows,
    base: &SessionOptions,
) -> Result<Perplexity, GenerateError> {
    perplexity_with(
        model,
        tokens,
        windows,
        base,
        |_| Ok::<(), GenerateError>(()),
    )
}

/// [`perplexity`], where `on_chunk` sees each window as it is scored (and may stop the run with
/// an error).
pub fn perplexity_with<E: From<GenerateError>>(
    model: &Model,
    tokens: &[u32],
    windows: &Windows,
    base: &SessionOptions,
    mut on_chunk: impl FnMut(Chunk<'_>) -> Result<(), E>,
) -> Result<Perplexity, E> {
    let header = windows.header(model, tokens);
    let n_ctx = header.ctx;
    if header.chunks == 0 || n_ctx < 4 {
        return Err(GenerateError::TooShort {
            tokens: tokens.len(),
            ctx: n_ctx,
        }
        .into());
    }
    let batch = match windows.batch {
        0 => n_ctx,
        b => b.min(n_ctx),
    };
    let opts = SessionOptions {
        context: n_ctx,
        batch,
        logits_all: true,
        ..base.clone()
    };
    let mut session = model.decoder(opts)?;
    let vocab = header.vocab;
    let first = header.first_scored();
    let (mut nll, mut count) = (0f64, 0usize);
    let mut window = vec![0u32; n_ctx];
    // A window run in several passes is gathered here; one pass is read where the session left it.
    let mut gathered = Vec::new();
    for c in 0..header.chunks {
        window.copy_from_slice(&tokens[c * n_ctx..(c + 1) * n_ctx]);
        if let (true, Some(bos)) = (model.facts().add_bos, model.facts().bos_id) {
            window[0] = bos;
        }
        session.rewind(0);
        let logits: &[f32] = if batch == n_ctx {
            session.forward_all(&window).map_err(GenerateError::from)?
        } else {
            gathered.resize(n_ctx * vocab, 0.0);
            for (i, pass) in window.chunks(batch).enumerate() {
                let out = session.forward_all(pass).map_err(GenerateError::from)?;
                let at = i * batch * vocab;
                gathered[at..at + out.len()].copy_from_slice(out);
            }
            &gathered
        };
        for j in first..n_ctx - 1 {
            nll -= log_prob(&logits[j * vocab..(j + 1) * vocab], window[j + 1] as usize);
            count += 1;
        }
        on_chunk(Chunk {
            index: c,
            ppl: (nll / count as f64).exp(),
            window: &window,
            logits: &logits[first * vocab..(n_ctx - 1) * vocab],
        })?;
    }
    Ok(Perplexity {
        ppl: (nll / count as f64).exp(),
        chunks: header.chunks,
        ctx: n_ctx,
        scored_tokens: count,
    })
}
