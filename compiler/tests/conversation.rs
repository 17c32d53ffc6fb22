//! `kiln_engine::conversation::Conversation`, which `kiln chat` and `kiln serve` share: a turn
//! runs only what its cache lacks, and answers as a fresh session given the whole prompt does.
//! The reference kernels compute each token alike whether it runs alone or in a batch, so the
//! two must agree exactly.

mod common;

use kiln_engine::chat::ChatMessage;
use kiln_engine::conversation::Conversation;
use kiln_engine::generate::{GenerateOptions, Model};
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
