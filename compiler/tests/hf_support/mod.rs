//! Shared by the `hf_*` tests: Meta's `llama_models` package, tiny checkpoints, and raw
//! safetensors rewriting.
// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// The `llama_models` package of PyPI `llama-models==0.3.0` (Meta's tokenizer and reference
/// code): `$KILN_TEST_LLAMA_MODELS`, else `$KILN_HOME/pypi/llama_models`, KILN_HOME defaulting to
/// `~/.cache/kiln`.
pub fn llama_models() -> PathBuf {
    let dir = match std::env::var_os("KILN_TEST_LLAMA_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("KILN_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME").expect("HOME or KILN_HOME must be set");
                    PathBuf::from(home).join(".cache/kiln")
                });
            home.join("pypi/llama_models")
        }
    };
    assert!(
        dir.join("llama3/tokenizer.model").is_file(),
        "{} is not the llama_models package of llama-models==0.3.0; \
         set KILN_TEST_LLAMA_MODELS to its directory",
        dir.display()
    );
    dir
}

/// A fresh tiny checkpoint in its own temporary directory.
pub fn tiny_checkpoint(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = llama_models().join("llama3/tokenizer.model");
    kiln_compiler::tiny::write_checkpoint(dir.path(), seed, &tokenizer).unwrap();
    dir
}

/// One tensor of a safetensors file, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a safetensors file, sorted by name.
pub fn read_raw(path: &Path) -> Vec<Raw> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<Raw> = file
        .iter()
        .map(|(name, t)| Raw {
            name: name.to_owned(),
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// Writes `tensors` as a safetensors file.
pub fn write_raw(path: &Path, tensors: &[Raw]) {
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
        )
    });
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}
