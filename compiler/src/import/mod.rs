//! Importers: read a checkpoint (GGUF file or Hugging Face directory) into a [`Checkpoint`].

pub mod gguf;
mod gguf_llama;
pub mod hf;

use std::path::{Path, PathBuf};

use crate::graph::Checkpoint;

/// Why a checkpoint could not be imported; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: architecture {architecture:?} is not supported (kiln imports Llama-family decoders)")]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        source: kiln_engine::tokenizer::TokenizerError,
    },
    #[error("{path}: not a GGUF file or a Hugging Face checkpoint directory (config.json + *.safetensors)")]
    UnknownKind { path: PathBuf },
}

impl ImportError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ImportError {
        ImportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Imports a GGUF file or a Hugging Face checkpoint directory; facts the runtime would refuse
/// (no layers, a head count that does not divide, …) are refused here, naming the file.
pub fn import(path: &Path) -> Result<Checkpoint, ImportError> {
    let checkpoint = import_unchecked(path)?;
    checkpoint
        .facts
        .check()
        .map_err(|what| ImportError::Corrupt {
            path: path.to_path_buf(),
            what: format!("model facts: {what}"),
        })?;
    Ok(checkpoint)
}

fn import_unchecked(path: &Path) -> Result<Checkpoint, ImportError> {
    if path.is_file() {
        let mut magic = [0u8; 4];
        use std::io::Read;
        match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ImportError::Corrupt {
                    path: path.to_path_buf(),
                    what: "file is too short to be a GGUF file (empty or truncated?)".into(),
                })
            }
            Err(e) => return Err(ImportError::io(path, e)),
        }
        if &magic == b"GGUF" {
            return gguf_llama::import(path);
        }
        return Err(ImportError::Corrupt {
            path: path.to_path_buf(),
            what: "not a GGUF file (wrong magic)".into(),
        });
    }
    if path.join("config.json").is_file() {
        return hf::import(path);
    }
    if !path.exists() {
        // The OS's own error reads "No such file or directory", clearer than "entity not found".
        let source = std::fs::metadata(path)
            .err()
            .unwrap_or_else(|| std::io::ErrorKind::NotFound.into());
        return Err(ImportError::io(path, source));
    }
    Err(ImportError::UnknownKind {
        path: path.to_path_buf(),
    })
}
