//! A GGUF file from arbitrary bytes, imported as `kiln compile` imports it (header, metadata,
//! tensor table, the Llama mapping, the tokenizer): refused with an error, or a checkpoint that
//! converts, writes and opens as an artifact. Never a panic.
#![no_main]

#[path = "common/compiled.rs"]
mod compiled;
#[path = "common/scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let path = scratch::file("model.gguf", bytes);
    compiled::import_compiles_and_opens(&path, &scratch::dir().join("model.kiln"));
});
