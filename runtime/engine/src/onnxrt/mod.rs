//! The onnxruntime backend: an ONNX decoder that kiln exported, run through `ort` with the
//! execution providers the user or the target names, behind the same [`Decoder`] interface as
//! kiln's own executor.
//!
//! `libonnxruntime` is loaded at run time (never linked): from `--ort-lib`, `ORT_DYLIB_PATH`,
//! the kiln cache (`cargo xtask fetch onnxruntime`), or the system's library path.
//!
//! [`Decoder`]: crate::decoder::Decoder

mod ep;
mod library;
mod session;

use std::path::{Path, PathBuf};

use base64::prelude::{Engine, BASE64_STANDARD};

pub use ep::Ep;
pub use session::OrtSession;

use kiln_runtime::exec::SessionOptions;
use kiln_runtime::model::{ModelFacts, ONNX_FACTS_KEY, ONNX_TOKENIZER_KEY};

/// Why the onnxruntime backend could not load or run a model; each names the file or library.
#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    #[error("{0}")]
    Library(String),
    #[error("execution provider {ep}: {why}")]
    Provider { ep: &'static str, why: String },
    #[error("{path}: {why}")]
    Model { path: PathBuf, why: String },
    #[error("onnxruntime: {0}")]
    Run(String),
}

/// How to load the library and which providers to ask for.
#[derive(Clone, Debug, Default)]
pub struct OrtOptions {
    /// `libonnxruntime` to load; `None` searches (see the module docs).
    pub library: Option<PathBuf>,
    /// Providers in order of preference; CPU is always the last resort inside onnxruntime.
    pub eps: Vec<Ep>,
    /// Use CPU instead of failing when a provider is missing from the library.
    pub fallback_to_cpu: bool,
    /// onnxruntime's intra-op threads (0 = its default).
    pub threads: usize,
}

/// An ONNX decoder loaded into onnxruntime, with the facts and tokenizer from its metadata.
pub struct OrtModel {
    session: ::ort::session::Session,
    facts: ModelFacts,
    tokenizer: Vec<u8>,
    version: String,
    eps: Vec<Ep>,
    path: PathBuf,
    // Dropped last: the session needs the environment.
    _env: ::ort::environment::Environment,
}

impl OrtModel {
    /// Loads `libonnxruntime`, registers the providers and loads `path` (an ONNX model written by
    /// `cargo xtask export`, float or with `MatMulNBits`).
    pub fn load(path: &Path, opts: &OrtOptions) -> Result<OrtModel, OrtError> {
        if !path.is_file() {
            return Err(OrtError::Model {
                path: path.to_path_buf(),
                why: "no such file".into(),
            });
        }
        let library::Loaded { version, env, .. } = library::load(opts.library.as_deref())?;
        let available = library::available_providers()?;
        let eps = ep::choose(&opts.eps, &available, opts.fallback_to_cpu)?;
        let model_err = |why: String| OrtError::Model {
            path: path.to_path_buf(),
            why,
        };
        let mut builder =
            ::ort::session::Session::builder(&env).map_err(|e| model_err(e.to_string()))?;
        // One at a time, so a provider that fails to start is the one named.
        for &e in &eps {
            builder = builder
                .with_execution_providers([e.dispatch()])
                .map_err(|why| OrtError::Provider {
                    ep: e.name(),
                    why: why.to_string(),
                })?;
        }
        if opts.threads > 0 {
            builder = builder
                .with_intra_threads(opts.threads)
                .map_err(|e| model_err(e.to_string()))?;
        }
        let session = builder
            .commit_from_file(path)
            .map_err(|e| model_err(format!("onnxruntime could not load it: {e}")))?;
        let meta = session
            .metadata()
            .map_err(|e| model_err(format!("reading the metadata: {e}")))?;
        let not_kiln = |key: &str| {
            model_err(format!(
                "no `{key}` in the model's metadata; the ort backend runs ONNX files written by \
                 `cargo xtask export` (they carry the tokenizer and model facts)"
            ))
        };
        let facts_json = meta
            .custom(ONNX_FACTS_KEY)
            .ok_or_else(|| not_kiln(ONNX_FACTS_KEY))?;
        let facts: ModelFacts = serde_json::from_str(&facts_json)
            .map_err(|e| model_err(format!("`{ONNX_FACTS_KEY}` is not valid: {e}")))?;
        let tokenizer = meta
            .custom(ONNX_TOKENIZER_KEY)
            .ok_or_else(|| not_kiln(ONNX_TOKENIZER_KEY))
            .and_then(|b64| {
                BASE64_STANDARD
                    .decode(b64.trim())
                    .map_err(|e| model_err(format!("`{ONNX_TOKENIZER_KEY}` is not base64: {e}")))
            })?;
        drop(meta);
        session::check_interface(&session, &facts).map_err(model_err)?;
        Ok(OrtModel {
            session,
            facts,
            tokenizer,
            version,
            eps,
            path: path.to_path_buf(),
            _env: env,
        })
    }

    pub fn facts(&self) -> &ModelFacts {
        &self.facts
    }

    /// The tokenizer in kiln's binary codec.
    pub fn tokenizer_bytes(&self) -> &[u8] {
        &self.tokenizer
    }

    /// e.g. `onnxruntime 1.32.0 [CUDA, CPU]`.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self
            .eps
            .iter()
            .map(|e| e.name())
            .chain((!self.eps.contains(&Ep::Cpu)).then_some("CPU"))
            .collect();
        format!("onnxruntime {} [{}]", self.version, names.join(", "))
    }

    /// A decoder with its KV cache and bindings allocated now.
    pub fn session(&self, opts: &SessionOptions) -> Result<OrtSession<'_>, OrtError> {
        OrtSession::new(self, opts)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}
