//! `kiln chat`: a multi-turn conversation formatted by the model's own chat template; the KV
//! cache keeps every earlier turn, so each turn only runs its new tokens. With `--tools`, the
//! model may call them: each call is shown, its result is read from the user (the next input
//! line) and goes back to the model, which then answers.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use kiln_engine::chat::{ChatMessage, ToolCall};
use kiln_engine::conversation::Conversation;
use kiln_engine::generate::{GenerateError, GenerateOptions};
use kiln_engine::openai::{prepare, shared_prefix, Expect, ToolChoice};
use kiln_engine::tools::{parse_reply, Reply};
use kiln_runtime::sampler::Sampler;
use serde_json::Value;

use crate::common::{ModelArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A system prompt for the conversation (llama.cpp's -sys; -s is the seed).
    #[arg(long = "system-prompt", visible_alias = "system", value_name = "TEXT")]
    system: Option<String>,
    /// Tokens to generate at most per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n_predict: usize,
    /// Tools the model may call: a JSON file with OpenAI-style tool definitions
    /// (`[{"type": "function", "function": {"name", "description", "parameters"}}]`).
    #[arg(long, value_name = "FILE")]
    tools: Option<PathBuf>,
    /// With --tools: `auto` (the model decides), `required` (every reply is a call) or a
    /// tool's name (every reply calls it).
    #[arg(long, default_value = "auto", requires = "tools")]
    tool_choice: String,
    /// Keep the KV cache of the conversation's start (system prompt, tools) in FILE: loaded
    /// instead of computed when FILE was saved for this model and start, else computed and
    /// saved there (as llama.cpp's --prompt-cache).
    #[arg(long, value_name = "FILE")]
    prompt_cache: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// Loads the snapshot at `path` when it holds `prefix`, else computes `prefix` and saves it
/// there; says which on stderr.
fn resume(conversation: &mut Conversation<'_>, path: &Path, prefix: &[u32]) -> anyhow::Result<()> {
    if path.exists() {
        match conversation.load_snapshot(path) {
            Ok(n) if conversation.cached() == prefix => {
                eprintln!("kiln: prompt cache {}: {n} tokens loaded", path.display());
                return Ok(());
            }
            Ok(_) => eprintln!(
                "kiln: prompt cache {} holds another conversation start; saving this one",
                path.display()
            ),
            Err(e) => eprintln!("kiln: prompt cache: {e}; saving it again"),
        }
    }
    conversation.prefill(prefix)?;
    conversation.save_snapshot(path)?;
    eprintln!(
        "kiln: prompt cache {}: {} tokens saved",
        path.display(),
        prefix.len()
    );
    Ok(())
}

/// Replies in a row that may call tools before one must answer in text.
const MAX_CALL_ROUNDS: usize = 4;

/// The tools of `--tools FILE`.
fn read_tools(path: &PathBuf) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--tools: reading {}", path.display()))?;
    match serde_json::from_str(&text)
        .with_context(|| format!("--tools {}: not JSON", path.display()))?
    {
        Value::Array(tools) => Ok(tools),
        _ => anyhow::bail!("--tools {}: expected a JSON array of tools", path.display()),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tools = args
        .tools
        .as_ref()
        .map(read_tools)
        .transpose()?
        .unwrap_or_default();
    let choice = match args.tool_choice.as_str() {
        "auto" => ToolChoice::Auto,
        "required" => ToolChoice::Required,
        "none" => ToolChoice::None,
        name => ToolChoice::Named(name.to_owned()),
    };
    let model = args.model.load()?;
    let template = model.chat_template()?;
    let source = model.facts().chat_template.clone().unwrap_or_default();
    let mut conversation = Conversation::new(&model, model.decoder(args.model.session_options())?);
    let mut sampler = Sampler::new(
        args.sampling.config(&model.facts().sampling),
        model.facts().vocab_size,
    );
    let opts = GenerateOptions {
        max_tokens: args.n_predict,
        stop: args.sampling.stop.clone(),
        cancel: None,
        top_logprobs: None,
    };
    let system: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let mut messages = system.clone();
    if let Some(path) = &args.prompt_cache {
        let prefix = shared_prefix(&template, &source, &system, &tools, &choice, |text| {
            model.encode_chat(text)
        })?;
        resume(&mut conversation, path, &prefix)?;
    }
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!(
            "kiln chat — {} ({} tokens of context). /clear starts over, /exit or Ctrl-D quits.",
            model.facts().name,
            conversation.context()
        );
    }
    // Ctrl-C ends the reply being written (as llama.cpp's chat does); between replies it quits.
    let answering = Arc::new(AtomicBool::new(false));
    let (stop, during) = (conversation.stop_handle(), Arc::clone(&answering));
    ctrlc::set_handler(move || {
        if during.load(Ordering::Relaxed) {
            stop.stop();
        } else {
            std::process::exit(130);
        }
    })
    .context("handling Ctrl-C")?;
    let mut stdout = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next().transpose()? else {
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                messages = system.clone();
                conversation.clear();
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", line));
        // A reply that calls tools gets their results back, then replies again: as it chooses
        // (a required or named call is the first reply's), and in text after a few rounds.
        for round in 0.. {
            let choice = match round {
                0 => choice.clone(),
                r if r < MAX_CALL_ROUNDS => ToolChoice::Auto,
                _ => ToolChoice::None,
            };
            let prepared = prepare(
                &template,
                &source,
                messages.clone(),
                &tools,
                &choice,
                None,
                Vec::new(),
            )?;
            let mut guide = prepared.constraint.map(|c| model.guide(&c)).transpose()?;
            let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            let ids = model.encode_chat_guarded(&prepared.prompt, &contents)?;
            let quiet = prepared.expect != Expect::Text;
            let mut shown = String::new();
            answering.store(true, Ordering::Relaxed);
            let reply =
                conversation.generate_guided(&ids, &mut sampler, &opts, guide.as_mut(), |piece| {
                    // A reply that may be a call is shown once it is known not to be one.
                    shown.push_str(piece);
                    if !quiet || !kiln_engine::tools::may_become_call(&shown) {
                        let _ = stdout
                            .write_all(std::mem::take(&mut shown).as_bytes())
                            .and_then(|()| stdout.flush());
                    }
                });
            answering.store(false, Ordering::Relaxed);
            let reply = match reply {
                Ok(reply) => reply,
                Err(GenerateError::Session(
                    e @ kiln_runtime::exec::SessionError::ContextFull { .. },
                )) => {
                    eprintln!("error: {e}; this turn was dropped — /clear to start over");
                    messages.pop();
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            let calls = match (quiet, parse_reply(&reply.text)) {
                (true, Reply::Calls(calls)) => calls,
                _ => {
                    stdout.write_all(shown.as_bytes())?;
                    writeln!(stdout)?;
                    messages.push(ChatMessage::new("assistant", reply.text));
                    break;
                }
            };
            let mut turn = ChatMessage::new("assistant", "");
            for (i, call) in calls.iter().enumerate() {
                let arguments = Value::Object(call.arguments.clone());
                writeln!(stdout, "[call {}({arguments})]", call.name)?;
                turn.tool_calls.push(ToolCall::function(
                    Some(format!("call_{i}")),
                    call.name.clone(),
                    arguments,
                ));
            }
            messages.push(turn);
            for (i, call) in calls.iter().enumerate() {
                if interactive {
                    eprint!("{} result> ", call.name);
                }
                let Some(result) = lines.next().transpose()? else {
                    // No result will come: the input has ended.
                    return Ok(());
                };
                messages.push(ChatMessage {
                    tool_call_id: Some(format!("call_{i}")),
                    ..ChatMessage::new("tool", result.trim())
                });
            }
        }
    }
    Ok(())
}
