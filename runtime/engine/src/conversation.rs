//! A decoder that remembers what its KV cache holds, so that each turn of a conversation (or
//! each request to a server) runs only the tokens the cache does not already have: the longest
//! prefix the new prompt shares with the cached ids is kept, the rest is forgotten and run.

use kiln_runtime::sampler::Sampler;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::constrain::Guide;
use crate::decoder::Decoder;
use crate::generate::{generate_guided, GenerateError, GenerateOptions, Generated, Model};
use crate::snapshot::{self, Binding, SnapshotError};

/// A session and the token ids in its KV cache, in order.
pub struct Conversation<'m> {
    model: &'m Model,
    decoder: Box<dyn Decoder + 'm>,
    cached: Vec<u32>,
    /// Set by a [`StopHandle`] to end the reply being generated.
    stop: Arc<AtomicBool>,
    /// Prompt tokens the last [`Conversation::generate`] found cached.
    reused: usize,
}

impl<'m> Conversation<'m> {
    /// A conversation over `decoder`, whose cache must be empty.
    pub fn new(model: &'m Model, mut decoder: Box<dyn Decoder + 'm>) -> Conversation<'m> {
        decoder.rewind(0);
        Conversation {
            model,
            decoder,
            cached: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            reused: 0,
        }
    }

    /// Generates after `prompt` (the whole conversation so far, as ids), running only what
    /// follows the prefix already cached; `on_text` receives the reply as it streams. The
    /// sampler sees the whole prompt, as if it had all run now (for the repeat penalty). On an
    /// error the cache keeps only the reused prefix, which is still valid.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generated, GenerateError> {
        self.generate_guided(prompt, sampler, opts, None, on_text)
    }

    /// [`Conversation::generate`], each token chosen among those `guide` allows.
    pub fn generate_guided(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        opts: &GenerateOptions,
        guide: Option<&mut Guide>,
        on_text: impl FnMut(&str),
    ) -> Result<Generated, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        self.stop.store(false, Ordering::Relaxed);
        // The caller's own flag when it brings one, else the one stop handles set.
        let opts = GenerateOptions {
            cancel: Some(opts.cancel.clone().unwrap_or_else(|| self.stop.clone())),
            ..opts.clone()
        };
        let keep = self.reuse(prompt);
        self.reused = keep;
        for &id in &prompt[..keep] {
            sampler.accept(id);
        }
        let result = generate_guided(
            self.model,
            self.decoder.as_mut(),
            sampler,
            &prompt[keep..],
            &opts,
            guide,
            on_text,
        );
        match &result {
            Ok(out) => {
                self.cached.extend_from_slice(&prompt[keep..]);
                self.cached.extend_from_slice(&out.ids);
                // The last id was sampled but not run through the model.
                self.cached.truncate(self.decoder.position());
            }
            Err(_) => self.decoder.rewind(keep),
        }
        result
    }

    /// Keeps the longest cached prefix of `prompt`, short of its last token (whose logits the
    /// reply needs), and forgets the rest; returns its length.
    fn reuse(&mut self, prompt: &[u32]) -> usize {
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(prompt.len() - 1);
        self.decoder.rewind(keep);
        self.cached.truncate(keep);
        keep
    }

    /// Saves the cached ids and their keys and values to `path` (see [`crate::snapshot`]).
    pub fn save_snapshot(&mut self, path: &Path) -> Result<(), SnapshotError> {
        let binding = self.binding()?;
        let cache = self.decoder.kv_cache().ok_or(SnapshotError::NotNative)?;
        snapshot::save(path, &binding, &cache, &self.cached)
    }

    /// Replaces what is cached with the snapshot at `path`, which must have been saved for
    /// this model; returns how many tokens it holds. On an error nothing is cached.
    pub fn load_snapshot(&mut self, path: &Path) -> Result<usize, SnapshotError> {
        let binding = self.binding()?;
        self.clear();
        let cache = self.decoder.kv_cache().ok_or(SnapshotError::NotNative)?;
        let tokens = snapshot::load(path, &binding, cache)?;
        self.cached = tokens;
        Ok(self.cached.len())
    }

    /// Runs `prefix` into the cache (what a snapshot will hold), reusing what is cached.
    pub fn prefill(&mut self, prefix: &[u32]) -> Result<(), GenerateError> {
        let keep = self
            .cached
            .iter()
            .zip(prefix)
            .take_while(|(a, b)| a == b)
            .count();
        self.decoder.rewind(keep);
        self.cached.truncate(keep);
        if keep < prefix.len() {
            self.decoder.forward(&prefix[keep..])?;
            self.cached.extend_from_slice(&prefix[keep..]);
        }
        Ok(())
    }

    fn binding(&self) -> Result<Binding<'m>, SnapshotError> {
        Ok(Binding {
            artifact: self
                .model
                .artifact_identity()
                .ok_or(SnapshotError::NotNative)?,
            facts: self.model.facts(),
        })
    }

    /// Forgets everything cached (a new conversation).
    pub fn clear(&mut self) {
        self.decoder.rewind(0);
        self.cached.clear();
    }

    /// A handle that ends the reply being generated before its next token, from any thread
    /// (the reply ends with [`crate::generate::StopReason::Cancelled`]); a generation given
    /// its own [`GenerateOptions::cancel`] flag listens to that one instead.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// How many tokens of the last prompt came from the cache instead of running.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Token ids in the KV cache.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// Tokens the cache can hold.
    pub fn context(&self) -> usize {
        self.decoder.context()
    }

    /// What executes the model, for reports.
    pub fn backend_name(&self) -> String {
        self.decoder.backend_name()
    }
}

/// Ends a [`Conversation`]'s reply in progress; cloned and sent to any thread.
#[derive(Clone, Debug)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the reply being generated to end before its next token.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
