//! `kiln chat`: a multi-turn conversation formatted by the model's own chat template; the KV
//! cache keeps every earlier turn, so each turn only runs its new tokens.

use std::io::{BufRead, Write};

use kiln_engine::chat::ChatMessage;
use kiln_engine::conversation::Conversation;
use kiln_engine::generate::{GenerateError, GenerateOptions};
use kiln_runtime::sampler::Sampler;

use crate::common::{ModelArgs, SamplingArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A system prompt for the conversation.
    #[arg(short = 's', long)]
    system: Option<String>,
    /// Tokens to generate at most per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let template = model.chat_template()?;
    let mut conversation = Conversation::new(&model, model.decoder(args.model.session_options())?);
    let mut sampler = Sampler::new(args.sampling.config(), model.facts().vocab_size);
    let opts = GenerateOptions {
        max_tokens: args.n_predict,
        stop: args.sampling.stop.clone(),
    };
    let system: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let mut messages = system.clone();
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!(
            "kiln chat — {} ({} tokens of context). /clear starts over, /exit or Ctrl-D quits.",
            model.facts().name,
            conversation.context()
        );
    }
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
        let text = template.render(&messages, true)?;
        let ids = model.encode_chat(&text);
        let reply = conversation.generate(&ids, &mut sampler, &opts, |piece| {
            let _ = stdout
                .write_all(piece.as_bytes())
                .and_then(|()| stdout.flush());
        });
        match reply {
            Ok(reply) => {
                writeln!(stdout)?;
                messages.push(ChatMessage::new("assistant", reply.text));
            }
            Err(GenerateError::Session(
                e @ kiln_runtime::exec::SessionError::ContextFull { .. },
            )) => {
                eprintln!("error: {e}; this turn was dropped — /clear to start over");
                messages.pop();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
