//! `kiln serve`: an HTTP server for a device, compatible with llama.cpp's server and OpenAI's
//! completion API (`GET /health`, `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions`, Server-Sent Events with `"stream": true`).
//!
//! A device holds one model and little memory, so the model is loaded once and requests are
//! served one at a time on the main thread with `std::net` only. Between requests the KV cache
//! keeps the previous prompt and reply: a request sharing a prefix with them (the next turn of a
//! chat) only runs its new tokens, as `kiln chat` does. A bad request gets a 4xx answer with a
//! JSON error; nothing a client sends stops the server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kiln_engine::chat::ChatTemplate;
use kiln_engine::constrain::Guide;
use kiln_engine::conversation::Conversation;
use kiln_engine::generate::{GenerateOptions, Generated, Model, StopReason};
use kiln_engine::openai::{prepare_chat, request_prefix, tool_calls_json, ChatRequest, Expect};
use kiln_engine::tools::{may_become_call, parse_reply, Reply};
use kiln_runtime::sampler::Sampler;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::common::{ModelArgs, SamplingArgs};

/// Largest request body accepted (a prompt of a few hundred thousand characters).
const MAX_BODY: usize = 8 << 20;
/// Largest request line plus headers.
const MAX_HEAD: usize = 64 << 10;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may leave an answer unread before it is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
#[command(
    after_help = "Endpoints: GET /health; GET /v1/models; POST /v1/completions with \
{\"prompt\", \"max_tokens\", \"temperature\", \"top_p\", \"top_k\", \"seed\", \"stop\", \"stream\"}; \
POST /v1/chat/completions with {\"messages\": [{\"role\", \"content\"}], ...the same fields, \
\"tools\", \"tool_choice\" (auto, none, required or a function), \"response_format\" (json_object, \
json_schema)}: tool calls come back as OpenAI's \"tool_calls\" (finish_reason \"tool_calls\"), \
role \"tool\" messages with \"tool_call_id\" give their results back; a required or named call and \
a json_schema reply are constrained to their schema. \
\"stream\": true answers with Server-Sent Events (`data: {...}` lines, then `data: [DONE]`). \
The sampling flags below are the defaults of fields a request leaves out.\n\nExample:\n  \
kiln serve model.kiln --port 8080 &\n  curl -s localhost:8080/v1/completions -d \
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
    /// Tokens to generate at most when a request gives no `max_tokens`.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Keep the KV cache of each conversation start (system turns, tools) a chat request
    /// brings in DIR, one snapshot per start: loaded instead of computed when a request opens
    /// the same way after a restart or another conversation.
    #[arg(long, value_name = "DIR")]
    prompt_cache: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// A `prompt` or `stop` field: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, or token ids as llama.cpp's server also takes.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// The fields of a request body both endpoints understand.
#[derive(Deserialize)]
struct Request {
    prompt: Option<Prompt>,
    messages: Option<Vec<serde_json::Value>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
}

/// An answer that is not a success: status and message (sent as `{"error": {...}}`).
struct HttpError {
    status: u16,
    message: String,
}

fn bad_request(message: impl Into<String>) -> HttpError {
    HttpError {
        status: 400,
        message: message.into(),
    }
}

/// One parsed HTTP request.
struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// The model, its session and what the KV cache holds, kept between requests.
struct Server<'m> {
    model: &'m Model,
    template: Option<ChatTemplate>,
    /// The session, which reuses the cached prefix each request shares with the one before.
    conversation: Conversation<'m>,
    defaults: &'m Args,
    /// Requests answered, for response ids.
    served: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = args.model.load()?;
    // A model without a template still serves /v1/completions.
    let template = model.chat_template().ok();
    let conversation = Conversation::new(&model, model.decoder(args.model.session_options())?);
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "kiln serve: {} ({} tokens of context) listening on http://{addr}",
        model.facts().name,
        conversation.context()
    );
    let mut server = Server {
        model: &model,
        template,
        conversation,
        defaults: &args,
        served: 0,
    };
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kiln serve: accepting a connection: {e}");
                continue;
            }
        };
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| server.handle_connection(stream)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("kiln serve: connection: {e}"),
            Err(_) => {
                // The cache may be half-written: start the next request from scratch.
                eprintln!("kiln serve: a request failed unexpectedly; the KV cache was reset");
                server.conversation.clear();
            }
        }
    }
    Ok(())
}

/// Reads one request: the request line, the headers and a `Content-Length` body.
fn read_request(stream: &mut TcpStream) -> Result<HttpRequest, HttpError> {
    let mut reader = BufReader::new(stream);
    let mut head = 0usize;
    let mut line = String::new();
    let mut read_line = |reader: &mut BufReader<&mut TcpStream>, line: &mut String| {
        line.clear();
        let n = reader
            .by_ref()
            .take((MAX_HEAD - head) as u64 + 1)
            .read_line(line)
            .map_err(|e| bad_request(format!("reading the request: {e}")))?;
        head += n;
        if head > MAX_HEAD {
            return Err(HttpError {
                status: 431,
                message: format!("the request line and headers exceed {MAX_HEAD} bytes"),
            });
        }
        Ok(n)
    };
    read_line(&mut reader, &mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(bad_request("not an HTTP request"));
    };
    let method = method.to_owned();
    let path = target.split('?').next().unwrap_or(target).to_owned();
    let mut length = 0usize;
    let mut expect_continue = false;
    loop {
        if read_line(&mut reader, &mut line)? == 0 {
            return Err(bad_request("the connection closed inside the headers"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(bad_request(format!("malformed header {header:?}")));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = value
                    .parse()
                    .map_err(|_| bad_request(format!("bad Content-Length {value:?}")))?;
            }
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err(HttpError {
                    status: 411,
                    message: "send the body with a Content-Length, not chunked".into(),
                });
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    if length > MAX_BODY {
        return Err(HttpError {
            status: 413,
            message: format!("the body has {length} bytes, more than the {MAX_BODY} accepted"),
        });
    }
    if expect_continue && length > 0 {
        let _ = reader.get_mut().write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| bad_request(format!("reading the {length}-byte body: {e}")))?;
    Ok(HttpRequest { method, path, body })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

/// Writes a whole JSON response and closes the exchange.
fn respond(stream: &mut TcpStream, status: u16, value: &Value) -> std::io::Result<()> {
    let body = value.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )?;
    stream.flush()
}

fn error_body(e: &HttpError) -> Value {
    let kind = if e.status < 500 {
        "invalid_request_error"
    } else {
        "server_error"
    };
    json!({ "error": { "message": e.message, "type": kind, "code": e.status } })
}

/// What a request generates from: the prompt ids and the sampling settings.
struct Job {
    ids: Vec<u32>,
    sampler: Sampler,
    opts: GenerateOptions,
    stream: bool,
    chat: bool,
    /// What the reply must match (`response_format`, a required tool call).
    guide: Option<Guide>,
    /// Whether the reply may be, or must be, tool calls.
    expect: Expect,
    /// The ids every conversation with this start shares (chat requests with --prompt-cache).
    prefix: Option<Vec<u32>>,
}

/// `"stop"` or `"length"`, as OpenAI's `finish_reason`.
fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::EndOfGeneration | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Server<'_> {
    fn handle_connection(&mut self, mut stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let request = match read_request(&mut stream) {
            Ok(r) => r,
            Err(e) => return respond(&mut stream, e.status, &error_body(&e)),
        };
        let chat = match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/health") => return respond(&mut stream, 200, &json!({ "status": "ok" })),
            ("GET", "/v1/models") => {
                let name = &self.model.facts().name;
                let list = json!({ "object": "list", "data": [
                    { "id": name, "object": "model", "owned_by": "kiln" }
                ]});
                return respond(&mut stream, 200, &list);
            }
            ("POST", "/v1/completions" | "/completion" | "/completions") => false,
            ("POST", "/v1/chat/completions" | "/chat/completions") => true,
            (_, "/health" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
                let e = HttpError {
                    status: 405,
                    message: format!("{} is not allowed on {}", request.method, request.path),
                };
                return respond(&mut stream, e.status, &error_body(&e));
            }
            _ => {
                let e = HttpError {
                    status: 404,
                    message: format!(
                        "no endpoint {} (GET /health, GET /v1/models, POST /v1/completions, \
                         POST /v1/chat/completions)",
                        request.path
                    ),
                };
                return respond(&mut stream, e.status, &error_body(&e));
            }
        };
        match self.job(&request.body, chat) {
            Ok(job) => self.complete(&mut stream, job),
            Err(e) => respond(&mut stream, e.status, &error_body(&e)),
        }
    }

    /// Checks a request body and turns it into prompt ids and sampling settings.
    fn job(&self, body: &[u8], chat: bool) -> Result<Job, HttpError> {
        let request: Request = serde_json::from_slice(body)
            .map_err(|e| bad_request(format!("the body is not a valid request: {e}")))?;
        let model = self.model;
        let mut constraint = None;
        let mut expect = Expect::Text;
        let mut prefix = None;
        let ids = if chat {
            if request.messages.is_none() {
                return Err(bad_request("missing field `messages`"));
            }
            let chat: ChatRequest = serde_json::from_slice(body)
                .map_err(|e| bad_request(format!("the body is not a valid chat request: {e}")))?;
            let template = self.template.as_ref().ok_or_else(|| {
                bad_request("the model has no chat template; use /v1/completions")
            })?;
            let source = model.facts().chat_template.as_deref().unwrap_or_default();
            let prepared = prepare_chat(template, source, &chat, Vec::new())
                .map_err(|e| bad_request(e.to_string()))?;
            constraint = prepared.constraint;
            expect = prepared.expect;
            if self.defaults.prompt_cache.is_some() {
                prefix = Some(
                    request_prefix(template, source, &chat, |t| model.encode_chat(t))
                        .map_err(|e| bad_request(e.to_string()))?,
                );
            }
            model.encode_chat(&prepared.prompt)
        } else {
            match request
                .prompt
                .ok_or_else(|| bad_request("missing field `prompt`"))?
            {
                Prompt::Text(text) => model.encode_prompt(&text, true),
                Prompt::Ids(ids) => {
                    let vocab = model.facts().vocab_size;
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
        let context = self.conversation.context();
        if ids.len() >= context {
            return Err(bad_request(format!(
                "the prompt has {} tokens; the context holds {context}, which must leave room for \
                 at least one generated token",
                ids.len()
            )));
        }
        let mut config = self.defaults.sampling.config();
        if let Some(t) = request.temperature {
            if !(t >= 0.0 && t.is_finite()) {
                return Err(bad_request(format!("`temperature` {t} must be 0 or more")));
            }
            config.temperature = t;
        }
        if let Some(p) = request.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad_request(format!("`top_p` {p} must be in (0, 1]")));
            }
            config.top_p = p;
        }
        if let Some(p) = request.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad_request(format!("`min_p` {p} must be in [0, 1]")));
            }
            config.min_p = p;
        }
        if let Some(k) = request.top_k {
            config.top_k = k;
        }
        if let Some(seed) = request.seed {
            config.seed = seed;
        }
        let stop = match request.stop {
            None => self.defaults.sampling.stop.clone(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        };
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok(Job {
            ids,
            sampler: Sampler::new(config, model.facts().vocab_size),
            opts: GenerateOptions {
                max_tokens: request.max_tokens.unwrap_or(self.defaults.n_predict),
                stop,
                cancel: None,
            },
            stream: request.stream,
            chat,
            guide: constraint
                .map(|c| model.guide(&c))
                .transpose()
                .map_err(|e| bad_request(e.to_string()))?,
            expect,
            prefix,
        })
    }

    /// Generates for `job` after the longest prefix of it the KV cache already holds, and
    /// answers with one JSON object or a stream of events.
    fn complete(&mut self, stream: &mut TcpStream, mut job: Job) -> std::io::Result<()> {
        self.served += 1;
        let id = format!(
            "{}-{}",
            if job.chat { "chatcmpl" } else { "cmpl" },
            self.served
        );
        let created = unix_time();
        let model_name = self.model.facts().name.clone();
        let object = if job.chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        let chunk_object = if job.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let ids = &job.ids;

        let chunk = |piece: &str, finish: Option<&str>| -> Value {
            let choice = if job.chat {
                let delta = if piece.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({ "role": "assistant", "content": piece })
                };
                json!({ "index": 0, "delta": delta, "finish_reason": finish })
            } else {
                json!({ "index": 0, "text": piece, "finish_reason": finish, "logprobs": null })
            };
            json!({
                "id": id,
                "object": chunk_object,
                "created": created,
                "model": model_name,
                "choices": [choice],
            })
        };
        // A client that went away cannot stop generation; its writes are skipped.
        let mut gone: Option<std::io::Error> = None;
        if job.stream {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Cache-Control: no-cache\r\nAccess-Control-Allow-Origin: *\r\n\
                        Connection: close\r\n\r\n";
            if let Err(e) = stream.write_all(head.as_bytes()) {
                gone = Some(e);
            }
        }
        let mut send = |stream: &mut TcpStream, value: &Value| {
            if gone.is_none() {
                let event = format!("data: {value}\n\n");
                if let Err(e) = stream
                    .write_all(event.as_bytes())
                    .and_then(|()| stream.flush())
                {
                    gone = Some(e);
                }
            }
        };
        if let (Some(dir), Some(prefix)) = (&self.defaults.prompt_cache, &job.prefix) {
            self.resume(dir, prefix);
        }
        // Text that may yet be a tool call is held back until it cannot be.
        let mut held = String::new();
        let mut holding = job.expect != Expect::Text;
        let result = self.conversation.generate_guided(
            ids,
            &mut job.sampler,
            &job.opts,
            job.guide.as_mut(),
            |piece| {
                if !job.stream || piece.is_empty() {
                    return;
                }
                if holding {
                    held.push_str(piece);
                    if job.expect == Expect::Calls || may_become_call(&held) {
                        return;
                    }
                    holding = false;
                    send(stream, &chunk(&std::mem::take(&mut held), None));
                    return;
                }
                send(stream, &chunk(piece, None));
            },
        );
        let out: Generated = match result {
            Ok(out) => out,
            Err(e) => {
                let e = bad_request(e.to_string());
                if job.stream {
                    send(stream, &error_body(&e));
                    send_done(stream, &mut gone);
                    return gone.map_or(Ok(()), Err);
                }
                return respond(stream, e.status, &error_body(&e));
            }
        };

        let calls = match (job.expect, parse_reply(&out.text)) {
            (Expect::Text, _) | (_, Reply::Text(_)) => None,
            (_, Reply::Calls(calls)) => Some(tool_calls_json(&calls, self.served)),
        };
        let finish = match (&calls, out.stop) {
            (Some(_), StopReason::EndOfGeneration) => "tool_calls",
            _ => finish_reason(out.stop),
        };
        let usage = json!({
            "prompt_tokens": ids.len(),
            "completion_tokens": out.ids.len(),
            "total_tokens": ids.len() + out.ids.len(),
        });
        let kiln = json!({ "prompt_ids": ids, "ids": out.ids, "stop": out.stop, "cached_tokens": self.conversation.reused() });
        if job.stream {
            match &calls {
                Some(calls) => {
                    let mut delta = chunk("", None);
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
                    delta["choices"][0]["delta"] =
                        json!({ "role": "assistant", "content": null, "tool_calls": indexed });
                    send(stream, &delta);
                }
                None if !held.is_empty() => send(stream, &chunk(&held, None)),
                None => {}
            }
            let mut last = chunk("", Some(finish));
            last["usage"] = usage;
            last["kiln"] = kiln;
            send(stream, &last);
            send_done(stream, &mut gone);
            return gone.map_or(Ok(()), Err);
        }
        let choice = if job.chat {
            let message = match calls {
                Some(calls) => json!({ "role": "assistant", "content": null, "tool_calls": calls }),
                None => json!({ "role": "assistant", "content": out.text }),
            };
            json!({ "index": 0, "message": message, "finish_reason": finish })
        } else {
            json!({ "index": 0, "text": out.text, "finish_reason": finish, "logprobs": null })
        };
        let value = json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model_name,
            "choices": [choice],
            "usage": usage,
            "kiln": kiln,
        });
        respond(stream, 200, &value)
    }
}

impl Server<'_> {
    /// Makes the cache start with `prefix`: already there, loaded from its snapshot in `dir`,
    /// or computed and saved there. A snapshot that cannot be used or saved is reported on
    /// stderr and the request goes on without it.
    fn resume(&mut self, dir: &Path, prefix: &[u32]) {
        if prefix.is_empty() || self.conversation.cached().starts_with(prefix) {
            return;
        }
        let ids: Vec<u8> = prefix.iter().flat_map(|id| id.to_le_bytes()).collect();
        let path = dir.join(format!(
            "{:08x}-{}.kilnsnap",
            crc32fast::hash(&ids),
            prefix.len()
        ));
        if path.exists() {
            match self.conversation.load_snapshot(&path) {
                Ok(_) if self.conversation.cached() == prefix => return,
                Ok(_) => eprintln!(
                    "kiln serve: {} holds another start; saving it again",
                    path.display()
                ),
                Err(e) => eprintln!("kiln serve: prompt cache: {e}"),
            }
        }
        let saved = std::fs::create_dir_all(dir)
            .map_err(|e| e.to_string())
            .and_then(|()| self.conversation.prefill(prefix).map_err(|e| e.to_string()))
            .and_then(|()| {
                self.conversation
                    .save_snapshot(&path)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = saved {
            eprintln!("kiln serve: prompt cache {}: {e}", path.display());
        }
    }
}

/// Ends an event stream with `data: [DONE]`.
fn send_done(stream: &mut TcpStream, gone: &mut Option<std::io::Error>) {
    if gone.is_none() {
        if let Err(e) = stream
            .write_all(b"data: [DONE]\n\n")
            .and_then(|()| stream.flush())
        {
            *gone = Some(e);
        }
    }
}
