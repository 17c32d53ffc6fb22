//! The OpenAI / llama.cpp request and answer formats, independent of HTTP: a request body
//! checked field by field (every field kiln does not honour is refused by name) and turned
//! into a [`Job`]; a finished generation, or its stream of text, turned into the answer's JSON.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_engine::chat::ChatTemplate;
use kiln_engine::generate::{GenerateOptions, Generated, Model, StopReason, TokenLogprob};
use kiln_engine::openai::{prepare_chat, request_prefix, tool_calls_json, ChatRequest, Expect};
use kiln_engine::tools::{may_become_call, parse_reply, Reply};
use kiln_runtime::sampler::{Sampler, SamplerConfig};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::slots::{Event, Finished, Job};

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: u64 = 20;
/// Most stop strings, and the longest.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// A client error: status and message (sent as `{"error": {...}}`).
#[derive(Debug)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

pub fn bad_request(message: impl Into<String>) -> HttpError {
    HttpError {
        status: 400,
        message: message.into(),
    }
}

pub fn error_body(e: &HttpError) -> Value {
    let kind = match e.status {
        401 => "authentication_error",
        503 => "unavailable_error",
        s if s < 500 => "invalid_request_error",
        _ => "server_error",
    };
    json!({ "error": { "message": e.message, "type": kind, "code": e.status } })
}

/// What requests are checked against: the model and the server's defaults.
pub struct Context {
    pub model: Arc<Model>,
    pub template: Option<ChatTemplate>,
    pub sampling: SamplerConfig,
    /// The seed of requests that bring none (`--seed`); `None`: a random one each.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Tokens to generate when a request says nothing (`None`: the rest of the context).
    pub n_predict: Option<usize>,
    /// Tokens each slot's cache holds.
    pub context: usize,
    /// Whether chat starts are kept as snapshots (`--prompt-cache`).
    pub prompt_cache: bool,
}

/// A `stop` field: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, one text in a list, or token ids as llama.cpp's server takes.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints read; everything else stays in `other` and is checked by name.
struct Fields {
    prompt: Option<Prompt>,
    messages: Option<Value>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    /// llama.cpp's name; -1: the rest of the context.
    n_predict: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u64>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u64>,
    /// Chat: `true` with `top_logprobs`; completions: how many alternatives.
    logprobs: Option<Value>,
    top_logprobs: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repeat_penalty: Option<f32>,
    /// llama.cpp's name; -1: the whole context.
    repeat_last_n: Option<i64>,
    other: Map<String, Value>,
}

impl Fields {
    /// Reads a JSON object's fields, each error naming its field.
    fn read(body: &[u8]) -> Result<Fields, HttpError> {
        let mut other: Map<String, Value> = serde_json::from_slice(body)
            .map_err(|e| bad_request(format!("the body is not a valid request: {e}")))?;
        fn take<T: serde::de::DeserializeOwned>(
            other: &mut Map<String, Value>,
            name: &str,
        ) -> Result<Option<T>, HttpError> {
            match other.remove(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v)
                    .map(Some)
                    .map_err(|e| bad_request(format!("`{name}`: {e}"))),
            }
        }
        let o = &mut other;
        Ok(Fields {
            prompt: take(o, "prompt")?,
            messages: take(o, "messages")?,
            max_tokens: take(o, "max_tokens")?,
            max_completion_tokens: take(o, "max_completion_tokens")?,
            n_predict: take(o, "n_predict")?,
            temperature: take(o, "temperature")?,
            top_p: take(o, "top_p")?,
            top_k: take(o, "top_k")?,
            min_p: take(o, "min_p")?,
            seed: take(o, "seed")?,
            stop: take(o, "stop")?,
            stream: take(o, "stream")?,
            stream_options: take(o, "stream_options")?,
            n: take(o, "n")?,
            logprobs: take(o, "logprobs")?,
            top_logprobs: take(o, "top_logprobs")?,
            presence_penalty: take(o, "presence_penalty")?,
            frequency_penalty: take(o, "frequency_penalty")?,
            repeat_penalty: take(o, "repeat_penalty")?,
            repeat_last_n: take(o, "repeat_last_n")?,
            other,
        })
    }
}

/// How the answer is shaped.
pub struct Shape {
    pub chat: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub expect: Expect,
    /// Report log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    pub prompt_ids: Vec<u32>,
}

/// A checked request: the job for a slot (less its channel and flag) and how to answer.
pub struct Parsed {
    pub shape: Shape,
    pub ids: Vec<u32>,
    pub prefix: Option<Vec<u32>>,
    pub sampler: Sampler,
    pub opts: GenerateOptions,
    pub guide: Option<kiln_engine::constrain::Guide>,
}

impl Parsed {
    /// The job, sending to `events` and stopped by `cancel`.
    pub fn job(
        self,
        id: String,
        events: UnboundedSender<Event>,
        cancel: Arc<AtomicBool>,
    ) -> (Job, Shape) {
        let job = Job {
            id,
            ids: self.ids,
            prefix: self.prefix,
            sampler: self.sampler,
            opts: GenerateOptions {
                cancel: Some(cancel),
                ..self.opts
            },
            guide: self.guide,
            events,
        };
        (job, self.shape)
    }
}

/// Fields a client may send that change nothing here.
const IGNORED: &[&str] = &[
    "model",
    "user",
    "cache_prompt",
    "metadata",
    "store",
    "id_slot",
];
/// Fields only a chat request may carry (read by [`ChatRequest`]).
const CHAT_ONLY: &[&str] = &[
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
];

/// Refuses every field kiln would otherwise ignore while the client expects it to act.
fn check_other(other: &Map<String, Value>, chat: bool) -> Result<(), HttpError> {
    for (key, value) in other {
        let harmless = match key.as_str() {
            k if IGNORED.contains(&k) => true,
            k if CHAT_ONLY.contains(&k) => chat,
            "echo" => matches!(value, Value::Null | Value::Bool(false)),
            "best_of" => matches!(value.as_u64(), Some(1)) || value.is_null(),
            "logit_bias" => value.is_null() || value.as_object().is_some_and(Map::is_empty),
            "suffix" => value.is_null(),
            _ => false,
        };
        if !harmless {
            return Err(bad_request(format!(
                "`{key}` is not supported by kiln serve{}",
                if CHAT_ONLY.contains(&key.as_str()) {
                    " on /v1/completions (use /v1/chat/completions)"
                } else {
                    ""
                }
            )));
        }
    }
    Ok(())
}

/// A seed nobody chose: the standard library's per-process random keys, mixed per call.
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Refuses text the model's vocabulary would drop part of.
fn encodable(model: &Model, text: &str, what: &str) -> Result<(), HttpError> {
    match model.tokenizer().unencodable(text) {
        None => Ok(()),
        Some(c) => Err(bad_request(format!(
            "{what} holds {c:?} (U+{:04X}), which this model's vocabulary cannot encode",
            u32::from(c)
        ))),
    }
}

/// Checks a request body and prepares what a slot runs.
pub fn parse(cx: &Context, body: &[u8], chat: bool) -> Result<Parsed, HttpError> {
    let mut f = Fields::read(body)?;
    check_other(&f.other, chat)?;
    let model = &cx.model;
    let vocab = model.facts().vocab_size;
    let mut constraint = None;
    let mut expect = Expect::Text;
    let mut prefix = None;
    let ids = if chat {
        if f.messages.is_none() {
            return Err(bad_request("missing field `messages`"));
        }
        if f.prompt.is_some() {
            return Err(bad_request(
                "`prompt` is for /v1/completions; send `messages`",
            ));
        }
        let request: ChatRequest = serde_json::from_slice(body)
            .map_err(|e| bad_request(format!("the body is not a valid chat request: {e}")))?;
        let template = cx
            .template
            .as_ref()
            .ok_or_else(|| bad_request("the model has no chat template; use /v1/completions"))?;
        let source = model.facts().chat_template.as_deref().unwrap_or_default();
        let prepared = prepare_chat(template, source, &request, Vec::new())
            .map_err(|e| bad_request(e.to_string()))?;
        constraint = prepared.constraint;
        expect = prepared.expect;
        if cx.prompt_cache {
            prefix = Some(
                request_prefix(template, source, &request, |t| model.encode_chat(t))
                    .map_err(|e| bad_request(e.to_string()))?,
            );
        }
        let contents: Vec<&str> = request
            .messages
            .iter()
            .filter_map(|m| m.content.as_deref())
            .collect();
        for content in &contents {
            encodable(model, content, "a message")?;
        }
        model
            .encode_chat_guarded(&prepared.prompt, &contents)
            .map_err(|e| bad_request(e.to_string()))?
    } else {
        if f.messages.is_some() {
            return Err(bad_request(
                "`messages` is for /v1/chat/completions; send `prompt`",
            ));
        }
        match f
            .prompt
            .take()
            .ok_or_else(|| bad_request("missing field `prompt`"))?
        {
            Prompt::Text(text) => {
                encodable(model, &text, "the prompt")?;
                model.encode_prompt(&text, true)
            }
            Prompt::Texts(texts) => match <[String; 1]>::try_from(texts) {
                Ok([text]) => {
                    encodable(model, &text, "the prompt")?;
                    model.encode_prompt(&text, true)
                }
                Err(texts) => {
                    return Err(bad_request(format!(
                        "`prompt` holds {} texts; kiln serve answers one per request",
                        texts.len()
                    )))
                }
            },
            Prompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(bad_request(format!(
                        "token id {bad} is not in the {vocab}-token vocabulary"
                    )));
                }
                ids
            }
        }
    };
    if ids.is_empty() {
        return Err(bad_request("the prompt is empty"));
    }
    if ids.len() >= cx.context {
        return Err(bad_request(format!(
            "the prompt has {} tokens; the context holds {}, which must leave room for at least \
             one generated token",
            ids.len(),
            cx.context
        )));
    }
    if f.n.is_some_and(|n| n != 1) {
        return Err(bad_request(
            "`n` must be 1: kiln serve generates one choice per request",
        ));
    }
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(bad_request("`stream_options` needs `\"stream\": true`"));
    }
    let logprobs = logprobs(f.logprobs.as_ref(), f.top_logprobs, chat)?;
    if logprobs.is_some() && stream {
        return Err(bad_request("`logprobs` is answered without `stream` only"));
    }
    let config = sampling(cx, &f)?;
    let max_tokens = match (f.max_completion_tokens, f.max_tokens, f.n_predict) {
        (Some(n), _, _) | (None, Some(n), _) => usize::try_from(n).unwrap_or(usize::MAX),
        (None, None, Some(n)) if n >= 0 => usize::try_from(n).unwrap_or(usize::MAX),
        (None, None, Some(-1)) => usize::MAX,
        (None, None, Some(n)) => {
            return Err(bad_request(format!("`n_predict` {n} must be -1 or more")))
        }
        (None, None, None) => cx.n_predict.unwrap_or(usize::MAX),
    };
    let stop: Vec<String> = match f.stop {
        None => cx.stop.clone(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad_request(format!(
            "`stop` takes at most {MAX_STOPS} strings of at most {MAX_STOP_BYTES} bytes"
        )));
    }
    let guide = constraint
        .map(|c| model.guide(&c))
        .transpose()
        .map_err(|e| bad_request(e.to_string()))?;
    Ok(Parsed {
        shape: Shape {
            chat,
            stream,
            include_usage: f.stream_options.is_some_and(|o| o.include_usage),
            expect,
            logprobs,
            prompt_ids: ids.clone(),
        },
        ids,
        prefix,
        sampler: Sampler::new(config, vocab),
        opts: GenerateOptions {
            max_tokens,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            cancel: None,
            top_logprobs: logprobs,
        },
        guide,
    })
}

/// `logprobs` / `top_logprobs`: how many alternatives to report, if any.
fn logprobs(
    logprobs: Option<&Value>,
    top: Option<u64>,
    chat: bool,
) -> Result<Option<usize>, HttpError> {
    let check = |n: u64, name: &str| {
        if n > MAX_TOP_LOGPROBS {
            Err(bad_request(format!(
                "`{name}` {n} is more than {MAX_TOP_LOGPROBS}"
            )))
        } else {
            Ok(n as usize)
        }
    };
    match (logprobs, chat) {
        (None | Some(Value::Null) | Some(Value::Bool(false)), _) => match top {
            None => Ok(None),
            Some(_) => Err(bad_request("`top_logprobs` needs `\"logprobs\": true`")),
        },
        (Some(Value::Bool(true)), true) => Ok(Some(check(top.unwrap_or(0), "top_logprobs")?)),
        (Some(v), false) if v.is_u64() => Ok(Some(check(v.as_u64().unwrap_or(0), "logprobs")?)),
        (Some(v), true) => Err(bad_request(format!(
            "`logprobs` must be true or false on /v1/chat/completions, not {v}"
        ))),
        (Some(v), false) => Err(bad_request(format!(
            "`logprobs` must be a count of alternatives on /v1/completions, not {v}"
        ))),
    }
}

/// The request's sampling settings over the server's defaults, each checked.
fn sampling(cx: &Context, f: &Fields) -> Result<SamplerConfig, HttpError> {
    let mut c = cx.sampling;
    let check = |name: &str, v: f32, ok: bool, range: &str| {
        if v.is_finite() && ok {
            Ok(v)
        } else {
            Err(bad_request(format!("`{name}` {v} must be {range}")))
        }
    };
    if let Some(t) = f.temperature {
        c.temperature = check("temperature", t, t >= 0.0, "0 or more")?;
    }
    if let Some(p) = f.top_p {
        c.top_p = check("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
    }
    if let Some(p) = f.min_p {
        c.min_p = check("min_p", p, (0.0..=1.0).contains(&p), "in [0, 1]")?;
    }
    if let Some(k) = f.top_k {
        c.top_k = usize::try_from(k)
            .unwrap_or(usize::MAX)
            .min(cx.model.facts().vocab_size);
    }
    if let Some(p) = f.repeat_penalty {
        c.repeat_penalty = check("repeat_penalty", p, p > 0.0, "more than 0")?;
    }
    if let Some(p) = f.presence_penalty {
        c.presence_penalty = check(
            "presence_penalty",
            p,
            (-2.0..=2.0).contains(&p),
            "in [-2, 2]",
        )?;
    }
    if let Some(p) = f.frequency_penalty {
        c.frequency_penalty = check(
            "frequency_penalty",
            p,
            (-2.0..=2.0).contains(&p),
            "in [-2, 2]",
        )?;
    }
    match f.repeat_last_n {
        None => {}
        Some(-1) => c.repeat_last_n = cx.context,
        Some(n) if n >= 0 => {
            c.repeat_last_n = usize::try_from(n).unwrap_or(usize::MAX).min(cx.context)
        }
        Some(n) => {
            return Err(bad_request(format!(
                "`repeat_last_n` {n} must be -1 or more"
            )))
        }
    }
    c.seed = f.seed.or(cx.seed).unwrap_or_else(random_seed);
    Ok(c)
}

/// `"stop"`, `"length"` or `"tool_calls"`, as OpenAI's `finish_reason`.
fn finish_reason(stop: StopReason, calls: bool) -> &'static str {
    match stop {
        StopReason::EndOfGeneration if calls => "tool_calls",
        StopReason::EndOfGeneration | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

/// What every answer and chunk of one request shares.
pub struct Answer {
    pub shape: Shape,
    pub model: Arc<Model>,
    pub id: String,
    pub serial: u64,
    pub created: u64,
}

impl Answer {
    fn envelope(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model.facts().name,
            "choices": choices,
        })
    }

    fn usage(&self, out: &Generated) -> Value {
        let prompt = self.shape.prompt_ids.len();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": out.ids.len(),
            "total_tokens": prompt + out.ids.len(),
        })
    }

    fn kiln(&self, done: &Finished) -> Value {
        json!({
            "prompt_ids": self.shape.prompt_ids,
            "ids": done.out.ids,
            "stop": done.out.stop,
            "cached_tokens": done.cached,
        })
    }

    fn calls(&self, out: &Generated) -> Option<Value> {
        match (self.shape.expect, parse_reply(&out.text)) {
            (Expect::Text, _) | (_, Reply::Text(_)) => None,
            (_, Reply::Calls(calls)) => Some(tool_calls_json(&calls, self.serial)),
        }
    }

    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self
            .model
            .tokenizer()
            .token_bytes(id)
            .unwrap_or_default()
            .to_vec();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// `logprobs` as OpenAI's chat (`content`) or completions (`tokens`, …) answers carry it.
    fn logprobs(&self, out: &Generated) -> Value {
        if self.shape.logprobs.is_none() {
            return Value::Null;
        }
        if self.shape.chat {
            let entry = |id: u32, logprob: f32| {
                let (token, bytes) = self.token_text(id);
                json!({ "token": token, "logprob": logprob, "bytes": bytes })
            };
            let content: Vec<Value> = out
                .logprobs
                .iter()
                .map(|t: &TokenLogprob| {
                    let mut e = entry(t.id, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                    e
                })
                .collect();
            return json!({ "content": content });
        }
        let mut offset = 0;
        let (mut tokens, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for t in &out.logprobs {
            let (token, _) = self.token_text(t.id);
            offsets.push(offset);
            offset += token.len();
            tokens.push(token);
            logprobs.push(t.logprob);
            let top: Map<String, Value> = t
                .top
                .iter()
                .map(|&(id, lp)| (self.token_text(id).0, json!(lp)))
                .collect();
            tops.push(top);
        }
        json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets })
    }

    /// The whole answer of a request without `stream`.
    pub fn complete(&self, done: &Finished) -> Value {
        let out = &done.out;
        let calls = self.calls(out);
        let finish = finish_reason(out.stop, calls.is_some());
        let choice = if self.shape.chat {
            let message = match calls {
                Some(calls) => json!({ "role": "assistant", "content": null, "tool_calls": calls }),
                None => json!({ "role": "assistant", "content": out.text }),
            };
            json!({ "index": 0, "message": message, "logprobs": self.logprobs(out), "finish_reason": finish })
        } else {
            json!({ "index": 0, "text": out.text, "logprobs": self.logprobs(out), "finish_reason": finish })
        };
        let object = if self.shape.chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        let mut value = self.envelope(object, json!([choice]));
        value["usage"] = self.usage(out);
        value["kiln"] = self.kiln(done);
        value
    }

    fn chunk(&self, piece: &str, finish: Option<&str>) -> Value {
        let choice = if self.shape.chat {
            let delta = if piece.is_empty() && finish.is_some() {
                json!({})
            } else {
                json!({ "role": "assistant", "content": piece })
            };
            json!({ "index": 0, "delta": delta, "finish_reason": finish })
        } else {
            json!({ "index": 0, "text": piece, "finish_reason": finish, "logprobs": null })
        };
        let object = if self.shape.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        self.envelope(object, json!([choice]))
    }
}

/// The events of a streamed answer, built as the reply's text arrives. Text that may yet be a
/// tool call is held back until it cannot be.
pub struct Stream {
    answer: Answer,
    held: String,
    holding: bool,
}

impl Stream {
    pub fn new(answer: Answer) -> Stream {
        let holding = answer.shape.expect != Expect::Text;
        Stream {
            answer,
            held: String::new(),
            holding,
        }
    }

    /// The chunks a piece of text makes (none while it is held back).
    pub fn text(&mut self, piece: &str) -> Option<Value> {
        if !self.holding {
            return Some(self.answer.chunk(piece, None));
        }
        self.held.push_str(piece);
        if self.answer.shape.expect == Expect::Calls || may_become_call(&self.held) {
            return None;
        }
        self.holding = false;
        Some(self.answer.chunk(&std::mem::take(&mut self.held), None))
    }

    /// The last chunks: held text or the tool calls, the finish reason with the usage, and
    /// the usage alone when `stream_options.include_usage` asked for it.
    pub fn done(&mut self, done: &Finished) -> Vec<Value> {
        let answer = &self.answer;
        let mut chunks = Vec::new();
        let calls = answer.calls(&done.out);
        match &calls {
            Some(calls) => {
                let indexed: Vec<Value> = calls
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .map(|(i, c)| {
                        let mut c = c.clone();
                        c["index"] = json!(i);
                        c
                    })
                    .collect();
                let mut delta = answer.chunk("", None);
                delta["choices"][0]["delta"] =
                    json!({ "role": "assistant", "content": null, "tool_calls": indexed });
                chunks.push(delta);
            }
            None if !self.held.is_empty() => {
                chunks.push(answer.chunk(&std::mem::take(&mut self.held), None))
            }
            None => {}
        }
        let mut last = answer.chunk("", Some(finish_reason(done.out.stop, calls.is_some())));
        last["usage"] = answer.usage(&done.out);
        last["kiln"] = answer.kiln(done);
        chunks.push(last);
        if answer.shape.include_usage {
            let object = if answer.shape.chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let mut usage = answer.envelope(object, json!([]));
            usage["usage"] = answer.usage(&done.out);
            chunks.push(usage);
        }
        chunks
    }
}
