//! An OpenAI chat request body from arbitrary bytes, rendered with Llama 3.1's tool template as
//! `kiln serve` does: refused with an error, or a prompt; never a panic.
#![no_main]

use kiln_engine::chat::ChatTemplate;
use kiln_engine::openai::{prepare_chat, ChatRequest};
use libfuzzer_sys::fuzz_target;

const TEMPLATE: &str = include_str!("../../testdata/chat/llama-3.1-instruct.jinja");

fuzz_target!(|bytes: &[u8]| {
    let Ok(request) = serde_json::from_slice::<ChatRequest>(bytes) else {
        return;
    };
    let template =
        ChatTemplate::new(TEMPLATE, "<|begin_of_text|>", "<|eot_id|>").expect("the template");
    let _ = prepare_chat(&template, TEMPLATE, &request, Vec::new());
});
