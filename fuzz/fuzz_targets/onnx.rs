//! An ONNX model from arbitrary bytes, lowered as `kiln compile model.onnx` does (tract reads
//! and types it, kiln's matcher walks the decoder), beside the fixed `tokenizer.json` of the
//! seed model: refused with an error naming the node, or a checkpoint. Never a panic.
#![no_main]

#[path = "common/scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;

const TOKENIZER: &[u8] = include_bytes!("../../testdata/onnx/hf-tiny-llama/tokenizer.json");

fuzz_target!(|bytes: &[u8]| {
    let tokenizer = scratch::dir().join("tokenizer.json");
    if !tokenizer.exists() {
        std::fs::write(&tokenizer, TOKENIZER).expect("tokenizer.json");
    }
    let path = scratch::file("model.onnx", bytes);
    let _ = kiln_compiler::lower::import_onnx(&path);
});
