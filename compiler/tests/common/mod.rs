//! Shared by the compiler's integration tests: where the test assets are, and building artifacts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The kiln cache (`$KILN_HOME`, default `~/.cache/kiln`).
pub fn kiln_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln")
        })
}

/// The default model's GGUF: `$KILN_TEST_GGUF`, else where `cargo xtask fetch` puts it.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("KILN_TEST_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            kiln_home().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask fetch smollm2-135m-instruct` (or `cargo xtask test`), or set KILN_TEST_GGUF",
        path.display()
    );
    path
}

/// The repository's `testdata/`.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// llama.cpp's reference outputs.
pub fn golden() -> serde_json::Value {
    let path = testdata().join("golden/smollm2-135m-instruct.json");
    serde_json::from_slice(&std::fs::read(&path).expect("golden data")).expect("golden JSON")
}

/// Imports the default model and writes it as an artifact in `quant` under `dir`.
pub fn compile_smollm2(dir: &Path, quant: kiln_runtime::quant::Format) -> PathBuf {
    let checkpoint = kiln_compiler::import::import(&smollm2_gguf()).expect("import");
    let converted = kiln_compiler::emit::convert(&checkpoint, quant).expect("convert");
    let out = dir.join(format!("smollm2-{}.kiln", quant.name()));
    kiln_compiler::emit::write_artifact(&converted, &out).expect("write artifact");
    out
}

/// Python for the peer checks: `$KILN_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into())
}
