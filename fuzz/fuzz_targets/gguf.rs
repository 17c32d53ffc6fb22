//! A GGUF file from arbitrary bytes, imported as `kiln compile` imports it (header, metadata,
//! tensor table, the Llama mapping, the tokenizer): refused with an error, or a checkpoint that
//! converts, writes and opens as an artifact. Never a panic.
#![no_main]

#[path = "common/scratch.rs"]
mod scratch;

use kiln_runtime::quant::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let path = scratch::file("model.gguf", bytes);
    let Ok(checkpoint) = kiln_compiler::import::import(&path) else {
        return;
    };
    // Conversion may refuse (with an error); what it hands on must write and open.
    let Ok(converted) = kiln_compiler::emit::convert(&checkpoint, Format::F16) else {
        return;
    };
    let out = scratch::dir().join("model.kiln");
    kiln_compiler::emit::write_artifact(&converted, &out).expect("write the artifact");
    kiln_runtime::artifact::Artifact::open(&out).expect("an artifact the compiler wrote opens");
});
