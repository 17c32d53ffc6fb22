//! The one interface generation, chat, perplexity and bench drive: a decoder over its own KV
//! cache. kiln's executor ([`Session`]) and the onnxruntime backend both implement it.

use kiln_runtime::exec::{KvType, Session, SessionError};

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
    /// Most tokens one pass runs: [`Decoder::forward`] gives the same logits whether its
    /// input comes whole or in pieces of this many (unbounded when the backend takes any).
    fn batch(&self) -> usize {
        usize::MAX
    }
    /// Forgets every cached token from `pos` on.
    fn rewind(&mut self, pos: usize);
    /// What executes the model, for reports (e.g. `kiln avx2` or `onnxruntime 1.32.0 [CPU]`).
    fn backend_name(&self) -> String;
    /// The KV cache, for snapshots: kiln's executor has one in its arena; other backends
    /// (onnxruntime) answer `None`.
    fn kv_cache(&mut self) -> Option<KvCache<'_>> {
        None
    }
}

/// A decoder's KV cache as bytes: keys and values, each `[layer][kv head][position][head dim]`
/// of `kv_type` over `context` positions, of which `position` hold tokens.
pub struct KvCache<'a> {
    pub keys: &'a mut [u8],
    pub values: &'a mut [u8],
    pub kv_type: KvType,
    pub context: usize,
    /// Set it after writing a prefix of positions (a snapshot restored).
    pub position: &'a mut usize,
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

    fn batch(&self) -> usize {
        Session::batch(self)
    }

    fn rewind(&mut self, pos: usize) {
        Session::rewind(self, pos);
    }

    fn backend_name(&self) -> String {
        format!("kiln {}", self.kernels_name())
    }

    fn kv_cache(&mut self) -> Option<KvCache<'_>> {
        let (kv_type, context) = (self.kv_type(), self.context());
        let (cache, position) = self.kv_cache_and_position();
        let [keys, values] = cache;
        Some(KvCache {
            keys,
            values,
            kv_type,
            context,
            position,
        })
    }
}
