//! A Hugging Face `tokenizer.json` from arbitrary bytes: refused or built into a tokenizer that
//! encodes and decodes text without panicking.
#![no_main]

use kiln_engine::tokenizer::{Tokenizer, TokenizerData};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(data) = TokenizerData::from_tokenizer_json(bytes) else {
        return;
    };
    let Ok(tok) = Tokenizer::new(&data) else {
        return;
    };
    let text = String::from_utf8_lossy(bytes);
    let ids = tok.encode(&text, true);
    let _ = tok.decode(&ids);
    let _ = tok.unencodable(&text);
});
