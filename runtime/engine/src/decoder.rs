//! The one interface generation, chat, perplexity and bench drive: a decoder over its own KV
//! cache. kiln's executor ([`Session`]) and the onnxruntime backend both implement it.

use kiln_runtime::exec::{Session, SessionError};

/// A model run token by token over a KV cache of `context()` tokens.
pub trait Decoder {
    /// Runs `tokens` after the cached ones and returns the last token's logits.
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError>;
    /// Runs at most one batch of `tokens` and returns every token's logits (`tokens.len() × vocab`);
    /// the decoder must have been created with `logits_all`.
    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError>;
    /// Tokens in the cache.
    fn position(&self) -> usize;
    /// Tokens the cache can hold.
    fn context(&self) -> usize;
    /// Forgets every cached token from `pos` on.
    fn rewind(&mut self, pos: usize);
    /// What executes the model, for reports (e.g. `kiln avx2` or `onnxruntime 1.32.0 [CPU]`).
    fn backend_name(&self) -> String;
}

impl Decoder for Session<'_> {
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        Session::forward(self, tokens)
    }

    fn forward_all(&mut self, tokens: &[u32]) -> Result<&[f32], SessionError> {
        Session::forward_all(self, tokens)
    }

    fn position(&self) -> usize {
        Session::position(self)
    }

    fn context(&self) -> usize {
        Session::context(self)
    }

    fn rewind(&mut self, pos: usize) {
        Session::rewind(self, pos);
    }

    fn backend_name(&self) -> String {
        format!("kiln {}", self.kernels_name())
    }
}
