//! A constraint from arbitrary bytes (first byte: 0 a JSON Schema, 1 a Lark grammar, 2 a
//! regular expression; the rest its text) compiled against the default model's vocabulary and
//! followed for a few tokens, as a `response_format` or a required tool call is: refused with
//! an error, or a guide whose every step allows a token or ends. Never a panic.
#![no_main]

#[path = "common/model.rs"]
mod model;

use std::sync::OnceLock;

use kiln_engine::constrain::Constraint;
use kiln_engine::generate::Model;
use libfuzzer_sys::fuzz_target;

/// Tokens followed per input: enough to enter nested structures, few enough to stay fast.
const STEPS: usize = 24;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::open(&model::default_model()).expect("the default model"))
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&kind, text)) = bytes.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let constraint = match kind % 3 {
        0 => match serde_json::from_str(text) {
            Ok(schema) => Constraint::JsonSchema(schema),
            Err(_) => return,
        },
        1 => Constraint::Lark(text.to_owned()),
        _ => Constraint::Regex(text.to_owned()),
    };
    let model = model();
    let Ok(mut guide) = model.guide(&constraint) else {
        return;
    };
    let vocab = model.facts().vocab_size as u32;
    for step in 0..STEPS {
        if guide.is_done() || guide.compute().is_err() {
            return;
        }
        // A different allowed token each step, so outputs vary across inputs and steps.
        let start = (bytes.len() * 7919 + step * 104_729) as u32 % vocab;
        let Some(id) = (0..vocab)
            .map(|i| (start + i) % vocab)
            .find(|&id| guide.allows(id))
        else {
            panic!("step {step}: the mask allows no token, not even the end");
        };
        if guide.accept(id).is_err() {
            return;
        }
    }
});
