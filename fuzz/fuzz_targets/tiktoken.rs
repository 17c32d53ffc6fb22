//! A tiktoken `tokenizer.model` (Meta's Llama 3 format) and kiln's own tokenizer section from
//! arbitrary bytes: refused, or a tokenizer that round-trips through its own encoding.
#![no_main]

use kiln_engine::tokenizer::{Tokenizer, TokenizerData};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(data) = TokenizerData::from_tiktoken(bytes) {
        if let Ok(tok) = Tokenizer::new(&data) {
            let _ = tok.encode("Hello, world! 123", true);
        }
        let again = TokenizerData::from_bytes(&data.to_bytes()).expect("its own encoding");
        assert_eq!(again.to_bytes(), data.to_bytes());
    }
    let _ = TokenizerData::from_bytes(bytes);
});
