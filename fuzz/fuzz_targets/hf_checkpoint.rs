//! A Hugging Face checkpoint directory from arbitrary bytes: `config.json` (the input's first
//! bytes, as long as its 4-byte little-endian prefix says) and `model.safetensors` (the rest),
//! beside a fixed byte-level BPE `tokenizer.json`. Imported as `kiln compile` does: refused
//! with an error, or a checkpoint that converts, writes and opens as an artifact.
#![no_main]

#[path = "common/scratch.rs"]
mod scratch;

use kiln_runtime::quant::Format;
use libfuzzer_sys::fuzz_target;

const TOKENIZER: &[u8] = include_bytes!("../../testdata/onnx/hf-tiny-llama/tokenizer.json");

fuzz_target!(|bytes: &[u8]| {
    let Some((prefix, rest)) = bytes.split_first_chunk::<4>() else {
        return;
    };
    let split = (u32::from_le_bytes(*prefix) as usize).min(rest.len());
    let (config, weights) = rest.split_at(split);
    let dir = scratch::dir().join("hf");
    std::fs::create_dir_all(&dir).expect("checkpoint directory");
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER).expect("tokenizer.json");
    std::fs::write(dir.join("config.json"), config).expect("config.json");
    std::fs::write(dir.join("model.safetensors"), weights).expect("model.safetensors");
    let Ok(checkpoint) = kiln_compiler::import::import(&dir) else {
        return;
    };
    // Conversion may refuse (with an error); what it hands on must write and open.
    let Ok(converted) = kiln_compiler::emit::convert(&checkpoint, Format::F16) else {
        return;
    };
    let out = scratch::dir().join("hf.kiln");
    kiln_compiler::emit::write_artifact(&converted, &out).expect("write the artifact");
    kiln_runtime::artifact::Artifact::open(&out).expect("an artifact the compiler wrote opens");
});
