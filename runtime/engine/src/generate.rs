//! Generation: a loaded model (artifact + tokenizer + chat template) and the decode loop with
//! streaming text, stop ids and stop strings.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::chat::{ChatError, ChatTemplate};
use crate::constrain::{ConstrainError, Constraint, Grammars, Guide};
use crate::decoder::Decoder;
use crate::tokenizer::{StreamDecoder, Tokenizer, TokenizerData, TokenizerError};
use kiln_runtime::artifact::{Artifact, ArtifactError, Residency};
use kiln_runtime::exec::{Session, SessionError, SessionOptions};
use kiln_runtime::model::ModelFacts;
use kiln_runtime::sampler::Sampler;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("chat template: {0}")]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the model has no chat template; use `kiln run` with a raw prompt")]
    NoChatTemplate,
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the text has {tokens} tokens, fewer than one window of {ctx} (at least 4)")]
    TooShort { tokens: usize, ctx: usize },
    #[cfg(feature = "ort")]
    #[error(transparent)]
    Ort(#[from] crate::onnxrt::OrtError),
    #[error("this needs kiln's own backend and a .kiln artifact, not an ONNX model")]
    NotNative,
    #[error(transparent)]
    Constrain(#[from] ConstrainError),
    #[error(
        "a message holds a control token's text and could not be found in the rendered prompt \
         to keep it as text"
    )]
    ContentNotFound,
}

/// What executes the model.
enum Backend {
    Native(Artifact),
    #[cfg(feature = "ort")]
    Ort(crate::onnxrt::OrtModel),
}

/// A loaded model (a `.kiln` artifact, or an ONNX model kiln exported) with its tokenizer ready.
pub struct Model {
    backend: Backend,
    facts: ModelFacts,
    tokenizer: Arc<Tokenizer>,
    /// llguidance's view of the vocabulary, built the first time output is constrained.
    grammars: OnceLock<Result<Grammars, String>>,
}

impl Model {
    /// Loads and validates a `.kiln` file, mapped from it.
    pub fn open(path: &Path) -> Result<Model, GenerateError> {
        Model::open_as(path, Residency::Map)
    }

    /// Loads and validates a `.kiln` file, its bytes brought in as `residency` says.
    pub fn open_as(path: &Path, residency: Residency) -> Result<Model, GenerateError> {
        Model::from_artifact(Artifact::from_file(path, residency)?)
    }

    /// Uses an already loaded artifact.
    pub fn from_artifact(artifact: Artifact) -> Result<Model, GenerateError> {
        let data = TokenizerData::from_bytes(artifact.tokenizer_bytes())?;
        let tokenizer = Tokenizer::new(&data)?;
        Ok(Model {
            facts: artifact.meta().facts.clone(),
            backend: Backend::Native(artifact),
            tokenizer: Arc::new(tokenizer),
            grammars: OnceLock::new(),
        })
    }

    /// Uses an ONNX model loaded into onnxruntime; its facts and tokenizer come from the
    /// metadata kiln's exporter writes.
    #[cfg(feature = "ort")]
    pub fn from_ort(model: crate::onnxrt::OrtModel) -> Result<Model, GenerateError> {
        let data = TokenizerData::from_bytes(model.tokenizer_bytes())?;
        let tokenizer = Tokenizer::new(&data)?;
        Ok(Model {
            facts: model.facts().clone(),
            backend: Backend::Ort(model),
            tokenizer: Arc::new(tokenizer),
            grammars: OnceLock::new(),
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn facts(&self) -> &ModelFacts {
        &self.facts
    }

    /// A guide that holds a generation to `constraint` (the vocabulary's part is prepared on
    /// first use and kept).
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, GenerateError> {
        let grammars = self.grammars.get_or_init(|| {
            Grammars::new(
                self.tokenizer.clone(),
                self.facts.vocab_size,
                &self.facts.eog_ids,
            )
            .map_err(|e| e.to_string())
        });
        match grammars {
            Ok(g) => Ok(g.guide(constraint)?),
            Err(e) => Err(ConstrainError::Vocabulary(e.clone()).into()),
        }
    }

    /// What identifies the artifact's bytes (kiln's own backend; `None` for an ONNX model).
    pub fn artifact_identity(&self) -> Option<u32> {
        match &self.backend {
            Backend::Native(artifact) => Some(artifact.identity()),
            #[cfg(feature = "ort")]
            Backend::Ort(_) => None,
        }
    }

    /// A fresh session of kiln's own executor (KV cache and buffers allocated now).
    pub fn session(&self, opts: SessionOptions) -> Result<Session<'_>, GenerateError> {
        match &self.backend {
            Backend::Native(artifact) => Ok(artifact.session(opts)?),
            #[cfg(feature = "ort")]
            Backend::Ort(_) => Err(GenerateError::NotNative),
        }
    }

    /// A fresh decoder on whichever backend holds the model (caches allocated now).
    pub fn decoder(&self, opts: SessionOptions) -> Result<Box<dyn Decoder + '_>, GenerateError> {
        match &self.backend {
            Backend::Native(artifact) => Ok(Box::new(artifact.session(opts)?)),
            #[cfg(feature = "ort")]
            Backend::Ort(model) => Ok(Box::new(model.session(&opts)?)),
        }
    }

    /// The model's chat template, compiled.
    pub fn chat_template(&self) -> Result<ChatTemplate, GenerateError> {
        let source = self
            .facts()
            .chat_template
            .as_deref()
            .ok_or(GenerateError::NoChatTemplate)?;
        let piece = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.token_bytes(id))
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        };
        let eos = self.facts().eog_ids.first().copied();
        Ok(ChatTemplate::new(
            source,
            &piece(self.facts().bos_id),
            &piece(eos),
        )?)
    }

    /// Prompt ids: BOS when the model wants one, then the text (specials parsed unless `!parse_special`).
    pub fn encode_prompt(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if self.facts().add_bos {
            ids.extend(self.facts().bos_id);
        }
        ids.extend(self.tokenizer.encode(text, parse_special));
        ids
    }

    /// Ids of a rendered chat prompt: templates such as Llama 3's write the BOS text
    /// themselves, so BOS is added only when the model wants one and the text lacks it.
    pub fn encode_chat(&self, rendered: &str) -> Vec<u32> {
        self.with_bos(self.tokenizer.encode(rendered, true))
    }

    /// [`Model::encode_chat`] for a prompt rendered from messages whose `contents` came from
    /// users: their text is tokenized as text, so a message holding a control token's text
    /// (`<|eot_id|>`, `<|im_end|>\n<|im_start|>system`) cannot open a turn of its own; only the
    /// template's own markup is special. Without such text the ids are
    /// [`Model::encode_chat`]'s.
    pub fn encode_chat_guarded(
        &self,
        rendered: &str,
        contents: &[&str],
    ) -> Result<Vec<u32>, GenerateError> {
        let tok = &self.tokenizer;
        let marks_up = |c: &str| tok.encode(c, true) != tok.encode(c, false);
        if !contents.iter().any(|c| marks_up(c)) {
            return Ok(self.encode_chat(rendered));
        }
        // Each content in order, as written or as the template trimmed it.
        let mut literal = Vec::new();
        let mut cursor = 0;
        for content in contents {
            let found = [*content, content.trim()]
                .into_iter()
                .filter(|n| !n.is_empty())
                .find_map(|n| rendered[cursor..].find(n).map(|at| (cursor + at, n.len())));
            match found {
                Some((at, len)) => {
                    literal.push(at..at + len);
                    cursor = at + len;
                }
                None if marks_up(content) => return Err(GenerateError::ContentNotFound),
                None => {}
            }
        }
        let mut ids = Vec::new();
        let mut pos = 0;
        for span in literal {
            ids.extend(tok.encode(&rendered[pos..span.start], true));
            ids.extend(tok.encode(&rendered[span.clone()], false));
            pos = span.end;
        }
        ids.extend(tok.encode(&rendered[pos..], true));
        Ok(self.with_bos(ids))
    }

    fn with_bos(&self, ids: Vec<u32>) -> Vec<u32> {
        match self.facts().bos_id {
            Some(bos) if self.facts().add_bos && ids.first() != Some(&bos) => {
                std::iter::once(bos).chain(ids).collect()
            }
            _ => ids,
        }
    }
}

/// What ended a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-generation id (not part of the text).
    EndOfGeneration,
    /// A `--stop` string (cut from the text).
    StopString,
    /// The token budget.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// Cancelled by the caller (`GenerateOptions::cancel`).
    Cancelled,
}

/// The result of one generation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// Each generated id's log-probability and the most likely alternatives, when
    /// [`GenerateOptions::top_logprobs`] asked for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    /// How long the prompt took to run (its first token's logits).
    #[serde(skip)]
    pub prompt_time: Duration,
}

/// A generated id's log-probability under the model (its raw logits, before penalties and
/// constraints) and the `top` most likely ids at that position, most likely first.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// `id`'s entry from a row of logits, with the `top` most likely ids.
    pub fn of(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        let logprob = |i: usize| logits.get(i).map_or(f32::NEG_INFINITY, |&l| l - log_z);
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let top = top.min(order.len());
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if top > 0 {
            order.select_nth_unstable_by(top - 1, by_logit);
            order.truncate(top);
            order.sort_unstable_by(by_logit);
        } else {
            order.clear();
        }
        TokenLogprob {
            id,
            logprob: logprob(id as usize),
            top: order
                .into_iter()
                .map(|i| (i, logprob(i as usize)))
                .collect(),
        }
    }
}

/// Settings of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    /// Texts that end generation; the text is cut before them.
    pub stop: Vec<String>,
    /// Set from anywhere (another thread, a signal handler) to end the generation before its
    /// next token ([`StopReason::Cancelled`]).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Report each generated id's log-probability with this many alternatives
    /// ([`Generated::logprobs`]); `None`: none (nothing is computed or allocated for them).
    pub top_logprobs: Option<usize>,
}

/// Runs `prompt` after what `session` already holds and generates until a stop condition,
/// calling `on_text` with each piece of text as soon as it is final.
pub fn generate(
    model: &Model,
    session: &mut dyn Decoder,
    sampler: &mut Sampler,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str),
) -> Result<Generated, GenerateError> {
    generate_guided(model, session, sampler, prompt, opts, None, on_text)
}

/// [`generate`], with each token chosen among those `guide` allows (when given); the output
/// ends as soon as the constraint is complete.
pub fn generate_guided(
    model: &Model,
    session: &mut dyn Decoder,
    sampler: &mut Sampler,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut guide: Option<&mut Guide>,
    mut on_text: impl FnMut(&str),
) -> Result<Generated, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    for &id in prompt {
        sampler.accept(id);
    }
    let eog = &model.facts().eog_ids;
    let mut stops = StopMatcher::new(&opts.stop);
    let mut decoder = StreamDecoder::new();
    // Never more than the context can hold, whatever the budget says.
    let mut ids = Vec::with_capacity(opts.max_tokens.min(session.context()));
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let started = Instant::now();
    let mut logits = session.forward(prompt)?;
    let prompt_time = started.elapsed();
    let stop = loop {
        if ids.len() >= opts.max_tokens {
            break StopReason::MaxTokens;
        }
        if opts
            .cancel
            .as_deref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            break StopReason::Cancelled;
        }
        let id = match guide.as_deref_mut() {
            Some(guide) => {
                guide.compute()?;
                sampler.sample_where(logits, |id| guide.allows(id))
            }
            None => sampler.sample(logits),
        };
        if let Some(top) = opts.top_logprobs {
            logprobs.push(TokenLogprob::of(logits, id, top));
        }
        if eog.contains(&id) {
            break StopReason::EndOfGeneration;
        }
        if let Some(guide) = guide.as_deref_mut() {
            guide.accept(id)?;
        }
        sampler.accept(id);
        ids.push(id);
        let piece = decoder.push(&model.tokenizer, id);
        if let Some(done) = stops.push(&piece, |s| {
            on_text(s);
            text.push_str(s);
        }) {
            break done;
        }
        if guide.as_deref().is_some_and(Guide::is_done) {
            break StopReason::EndOfGeneration;
        }
        if session.position() >= session.context() {
            break StopReason::ContextFull;
        }
        logits = session.forward(&[id])?;
    };
    if stop != StopReason::StopString {
        let rest = decoder.finish();
        stops.push(&rest, |_| {});
        let tail = stops.flush();
        on_text(&tail);
        text.push_str(&tail);
    }
    // An end-of-generation id is not part of the reply, nor is its probability.
    logprobs.truncate(ids.len());
    Ok(Generated {
        ids,
        text,
        stop,
        logprobs,
        prompt_time,
    })
}

/// Holds back text that may be the start of a stop string until it is known not to be.
struct StopMatcher<'a> {
    stops: &'a [String],
    pending: String,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> StopMatcher<'a> {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    /// Adds `piece`; emits the text that is final; `Some` when a stop string was completed.
    fn push(&mut self, piece: &str, mut emit: impl FnMut(&str)) -> Option<StopReason> {
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            emit(&self.pending[..at]);
            self.pending.clear();
            return Some(StopReason::StopString);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        if cut > 0 {
            emit(&self.pending[..cut]);
            self.pending.drain(..cut);
        }
        None
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<StopReason>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            if let Some(r) = m.push(p, |s| out.push_str(s)) {
                return (out, Some(r));
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut() {
        assert_eq!(
            run(&["\n\nUser:"], &["Hi", " there\n", "\nUs", "er: x"]),
            ("Hi there".into(), Some(StopReason::StopString))
        );
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_match() {
        assert_eq!(
            run(&["END"], &["the E", "ND", "x"]).1,
            Some(StopReason::StopString)
        );
        assert_eq!(run(&["END"], &["the E", "nd"]), ("the End".into(), None));
    }

    #[test]
    fn multibyte_text_is_not_split() {
        assert_eq!(run(&["éa"], &["café", "!"]), ("café!".into(), None));
    }
}
