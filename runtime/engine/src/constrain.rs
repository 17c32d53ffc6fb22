//! Constrained output: a JSON Schema, a Lark grammar or a regular expression turned into a
//! token mask at every step by llguidance, the structured-output engine onnxruntime-genai and
//! others use. [`Grammars`] holds llguidance's view of the model's vocabulary (built once per
//! model); a [`Guide`] follows one generation, says which tokens may come next and takes each
//! token chosen. kiln's own part of a step allocates nothing (the sampler reads the mask in
//! place); llguidance builds each step's mask itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

/// What a generation must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON Schema (draft 2020-12 as llguidance reads it: objects, arrays with bounds,
    /// enums, numeric ranges, `pattern`, common `format`s, `$ref`, `anyOf`, …).
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
    /// A regular expression the whole output must match.
    Regex(String),
}

/// Why a constraint could not be set up or followed.
#[derive(Debug, thiserror::Error)]
pub enum ConstrainError {
    #[error("preparing the vocabulary for constrained output: {0}")]
    Vocabulary(String),
    #[error("the constraint does not compile: {0}")]
    Compile(String),
    #[error("constrained output: {0}")]
    Step(String),
}

/// A longer run of digits than this is cut short where the constraint allows something else:
/// more than an f64 holds carries no meaning, and a small model left to itself can repeat a
/// digit until the token budget ends the output mid-number.
const MAX_DIGIT_RUN: usize = 17;

/// The model's vocabulary as llguidance sees it, built once per model.
pub struct Grammars {
    factory: ParserFactory,
    eos: u32,
    eog: Vec<u32>,
    /// Per token id: its text starts with an ASCII digit.
    starts_with_digit: Arc<Vec<bool>>,
    /// Per token id: how its bytes continue a run of digits (see [`digit_effect`]).
    digits: Arc<Vec<DigitEffect>>,
}

/// What a token does to the current run of digits.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DigitEffect {
    /// All digits (or `.` between them): the run grows by this many.
    Extend(u8),
    /// Something else: the run restarts at this many trailing digits.
    Restart(u8),
}

/// The digit run after a token of `bytes`.
fn digit_effect(bytes: &[u8]) -> DigitEffect {
    let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
    if bytes.iter().all(|b| b.is_ascii_digit() || *b == b'.') && digits > 0 {
        return DigitEffect::Extend(digits.min(255) as u8);
    }
    let trailing = bytes
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    DigitEffect::Restart(trailing.min(255) as u8)
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

/// kiln's tokenizer behind llguidance's interface: control tokens are marked (`\xff` +
/// their text) so that no grammar produces them as text.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

impl Grammars {
    /// llguidance's view of `tokenizer` for a model of `vocab_size` logits, whose generation
    /// ends at any of `eog` (the first standing for all of them in masks).
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        vocab_size: usize,
        eog: &[u32],
    ) -> Result<Grammars, ConstrainError> {
        let eos = *eog.first().ok_or_else(|| {
            ConstrainError::Vocabulary("the model names no end-of-generation token".into())
        })?;
        let text = |id: u32| match tokenizer.token_bytes(id) {
            Some(bytes) if !tokenizer.is_special(id) => bytes,
            _ => &[][..],
        };
        let starts_with_digit = (0..vocab_size as u32)
            .map(|id| text(id).first().is_some_and(u8::is_ascii_digit))
            .collect();
        let digits = (0..vocab_size as u32)
            .map(|id| digit_effect(text(id)))
            .collect();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                Some(bytes) if !tokenizer.is_special(id) && !eog.contains(&id) => bytes.to_vec(),
                Some(bytes) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], bytes].concat(),
                // Logits past the tokenizer's vocabulary (padding): never text.
                None => format!("\u{ff}<[{id}]>").into_bytes(),
            })
            .collect();
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstrainError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            eos,
            eog: eog.to_vec(),
            starts_with_digit: Arc::new(starts_with_digit),
            digits: Arc::new(digits),
        })
    }

    /// A guide for one generation under `constraint`. JSON comes out compact (`,` and `:`
    /// without spaces) unless the schema says otherwise in llguidance's `x-guidance`.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, ConstrainError> {
        let compact = serde_json::json!({"whitespace_flexible": false});
        let grammar = match constraint {
            Constraint::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(map) = &mut schema {
                    map.entry("x-guidance").or_insert(compact);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(
                serde_json::json!({"type": "object", "x-guidance": compact}),
            ),
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstrainError::Compile(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstrainError::Compile(e));
        }
        Ok(Guide {
            matcher,
            mask: SimpleVob::new(),
            eos: self.eos,
            eog: self.eog.clone(),
            starts_with_digit: self.starts_with_digit.clone(),
            digits: self.digits.clone(),
            digit_run: 0,
            cut_digits: false,
            mask_time: Duration::ZERO,
            steps: 0,
        })
    }
}

/// One generation under a constraint.
pub struct Guide {
    matcher: Matcher,
    mask: SimpleVob,
    eos: u32,
    eog: Vec<u32>,
    starts_with_digit: Arc<Vec<bool>>,
    digits: Arc<Vec<DigitEffect>>,
    /// Digits in a row at the end of the output so far.
    digit_run: usize,
    /// Whether this step refuses tokens that start with a digit (see [`MAX_DIGIT_RUN`]).
    cut_digits: bool,
    mask_time: Duration,
    steps: u32,
}

impl Guide {
    /// Works out which tokens may come next; call before each [`Guide::allows`].
    pub fn compute(&mut self) -> Result<(), ConstrainError> {
        let start = Instant::now();
        self.mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstrainError::Step(e.to_string()))?;
        self.cut_digits = self.digit_run >= MAX_DIGIT_RUN && self.other_than_digits();
        self.mask_time += start.elapsed();
        self.steps += 1;
        Ok(())
    }

    /// Whether the mask allows a token that does not start with a digit.
    fn other_than_digits(&self) -> bool {
        let mut found = false;
        self.mask.iter_set_entries(|id| {
            found |= !self.starts_with_digit.get(id).copied().unwrap_or(false);
        });
        found
    }

    /// Whether `id` may come next: an end-of-generation id when the constraint may end here.
    pub fn allows(&self, id: u32) -> bool {
        if self.cut_digits
            && self
                .starts_with_digit
                .get(id as usize)
                .copied()
                .unwrap_or(false)
        {
            return false;
        }
        let id = if self.eog.contains(&id) { self.eos } else { id };
        self.mask.is_allowed(id)
    }

    /// Takes the token chosen (allowed by the last mask).
    pub fn accept(&mut self, id: u32) -> Result<(), ConstrainError> {
        self.digit_run = match self.digits.get(id as usize) {
            Some(DigitEffect::Extend(n)) => self.digit_run + usize::from(*n),
            Some(DigitEffect::Restart(n)) => usize::from(*n),
            None => 0,
        };
        let id = if self.eog.contains(&id) { self.eos } else { id };
        self.matcher
            .consume_token(id)
            .map_err(|e| ConstrainError::Step(e.to_string()))
    }

    /// Whether the output is complete: nothing may follow but the end of generation.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Time spent computing masks, and how many.
    pub fn mask_time(&self) -> (Duration, u32) {
        (self.mask_time, self.steps)
    }
}
