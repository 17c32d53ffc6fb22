//! `kiln_engine::conversation::Conversation`, which `kiln chat` and `kiln serve` share: a turn
//! runs only what its cache lacks, and answers as a fresh session given the whole prompt does.
//! The reference kernels compute each token alike whether it runs alone or in a batch, so the
//! two must agree exactly.

mod common;

use kiln_engine::chat::ChatMessage;
use kiln_engine::conversation::Conversation;
use kiln_engine::generate::{GenerateOptions, Model, StopReason};
use kiln_runtime::exec::SessionOptions;
use kiln_runtime::kernels::{Kernels, Level};
use kiln_runtime::quant::Format;
use kiln_runtime::sampler::{Sampler, SamplerConfig};

fn options() -> SessionOptions {
    SessionOptions {
        context: 512,
        kernels: Some(Kernels::for_level(Level::Generic).expect("the reference kernels")),
        ..SessionOptions::default()
    }
}

#[test]
fn a_second_turn_reuses_the_first_and_answers_as_a_fresh_session() {
    let model = Model::open(&common::smollm2_artifact(Format::Q8_0)).expect("open");
    let template = model.chat_template().expect("template");
    let opts = GenerateOptions {
        max_tokens: 12,
        stop: Vec::new(),
        cancel: None,
        top_logprobs: None,
    };
    let greedy = || Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
    let mut conversation = Conversation::new(&model, model.decoder(options()).expect("decoder"));

    let mut messages = vec![ChatMessage::new("user", "Name a colour.")];
    let first_ids = model.encode_chat(&template.render(&messages, true).expect("render"));
    let first = conversation
        .generate(&first_ids, &mut greedy(), &opts, |_| {})
        .expect("first turn");
    assert_eq!(conversation.reused(), 0);
    assert!(conversation.cached().starts_with(&first_ids));

    messages.push(ChatMessage::new("assistant", first.text.clone()));
    messages.push(ChatMessage::new("user", "And another one?"));
    let second_ids = model.encode_chat(&template.render(&messages, true).expect("render"));
    let second = conversation
        .generate(&second_ids, &mut greedy(), &opts, |_| {})
        .expect("second turn");
    assert!(
        conversation.reused() >= first_ids.len(),
        "reused {} of the first turn's {} prompt tokens",
        conversation.reused(),
        first_ids.len()
    );
    assert!(conversation.cached().starts_with(&second_ids));

    let mut fresh = Conversation::new(&model, model.decoder(options()).expect("decoder"));
    let again = fresh
        .generate(&second_ids, &mut greedy(), &opts, |_| {})
        .expect("fresh session");
    assert_eq!(fresh.reused(), 0);
    assert_eq!(
        second.ids, again.ids,
        "{:?} vs {:?}",
        second.text, again.text
    );

    conversation.clear();
    assert!(conversation.cached().is_empty());
}

/// A reply can be stopped from another thread: it ends before its next token, as cancelled,
/// and the conversation goes on.
#[test]
fn a_stop_from_another_thread_ends_the_reply() {
    let model = Model::open(&common::smollm2_artifact(Format::Q8_0)).expect("open");
    let mut conversation = Conversation::new(&model, model.decoder(options()).expect("decoder"));
    let ids = model.encode_prompt("Once upon a time", false);
    let opts = GenerateOptions {
        max_tokens: 200,
        stop: Vec::new(),
        cancel: None,
        top_logprobs: None,
    };
    let handle = conversation.stop_handle();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let stopper = std::thread::spawn(move || {
        rx.recv().expect("the third piece");
        handle.stop();
    });
    let mut pieces = 0;
    let mut greedy = Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
    let reply = conversation
        .generate(&ids, &mut greedy, &opts, |_| {
            pieces += 1;
            if pieces == 3 {
                tx.send(()).expect("the stopper waits");
                // Give the other thread time to set the flag before the next check.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
        .expect("generate");
    stopper.join().expect("stopper");
    assert_eq!(reply.stop, StopReason::Cancelled, "{reply:?}");
    assert!(
        reply.ids.len() <= 4,
        "{} tokens after the stop",
        reply.ids.len()
    );

    let mut greedy = Sampler::new(SamplerConfig::greedy(), model.facts().vocab_size);
    let again = conversation
        .generate(&ids, &mut greedy, &opts_with(8), |_| {})
        .expect("the next reply runs");
    assert_eq!(again.stop, StopReason::MaxTokens);
}

fn opts_with(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        stop: Vec::new(),
        cancel: None,
        top_logprobs: None,
    }
}
