//! A Hugging Face checkpoint directory from arbitrary bytes: `config.json` (the input's first
//! bytes, as long as its 4-byte little-endian prefix says) and `model.safetensors` (the rest),
//! beside a fixed byte-level BPE `tokenizer.json`. Imported as `kiln compile` does: refused
//! with an error, or a checkpoint that converts, writes and opens as an artifact.
#![no_main]

#[path = "common/compiled.rs"]
mod compiled;
#[path = "common/scratch.rs"]
mod scratch;

use libfuzzer_sys::fuzz_target;

const TOKENIZER: &[u8] = include_bytes!("../../testdata/onnx/hf-tiny-llama/tokenizer.json");

fuzz_target!(|bytes: &[u8]| {
    let Some((prefix, rest)) = bytes.split_first_chunk::<4>() else {
        return;
    };
    let split = (u32::from_le_bytes(*prefix) as usize).min(rest.len());
    let (config, weights) = rest.split_at(split);
    scratch::file("tokenizer.json", TOKENIZER);
    scratch::file("config.json", config);
    scratch::file("model.safetensors", weights);
    compiled::import_compiles_and_opens(scratch::dir(), &scratch::dir().join("hf.kiln"));
});
