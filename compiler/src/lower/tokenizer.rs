//! The tokenizer of a lowered model and its token policy (BOS, end-of-generation ids, chat
//! template): given explicitly (a `tokenizer.json` or a GGUF), carried in kiln's metadata, or
//! a `tokenizer.json` beside the model.

use std::path::{Path, PathBuf};

use kiln_engine::tokenizer::{Tokenizer, TokenizerData};
use kiln_runtime::model::ModelFacts;
use serde_json::Value as Json;

use super::metadata::Metadata;
use super::LowerError;

/// Llama 3's end-of-turn and end-of-text tokens, which end generation whatever the configs say.
const EOG_TOKENS: [&str; 3] = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"];

/// A tokenizer with the facts about tokens that come with it.
pub struct TokenSource {
    pub data: TokenizerData,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    pub eog_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

/// The tokenizer for the model at `model`: `explicit`, else kiln's metadata, else
/// `tokenizer.json` beside the model.
pub fn resolve(
    model: &Path,
    meta: &Metadata,
    explicit: Option<&Path>,
) -> Result<TokenSource, LowerError> {
    if let Some(path) = explicit {
        return from_path(path);
    }
    if let Some(bytes) = &meta.tokenizer {
        let data = TokenizerData::from_bytes(bytes).map_err(|source| LowerError::Tokenizer {
            path: model.to_path_buf(),
            source,
        })?;
        return Ok(match &meta.facts {
            Some(f) => policy_of(data, f),
            None => TokenSource::bare(data, meta.eos_token_ids.clone().unwrap_or_default()),
        });
    }
    let beside = model.with_file_name("tokenizer.json");
    if beside.is_file() {
        return from_path(&beside);
    }
    Err(LowerError::Invalid {
        path: model.to_path_buf(),
        what: "no tokenizer: the model carries none (kiln.tokenizer), there is no tokenizer.json \
               beside it, and none was given (a tokenizer.json or a GGUF)"
            .into(),
    })
}

/// A GGUF (its vocabulary and token policy) or a Hugging Face `tokenizer.json`.
fn from_path(path: &Path) -> Result<TokenSource, LowerError> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let checkpoint = crate::import::import(path)?;
        return Ok(policy_of(checkpoint.tokenizer, &checkpoint.facts));
    }
    let io = |source| LowerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let tokenizer_error = |source| LowerError::Tokenizer {
        path: path.to_path_buf(),
        source,
    };
    let data = TokenizerData::from_tokenizer_json(&bytes).map_err(tokenizer_error)?;
    let indexed = Tokenizer::new(&data).map_err(tokenizer_error)?;
    let mut eog: Vec<u32> = data.eos_id().into_iter().collect();
    eog.extend(EOG_TOKENS.iter().filter_map(|t| indexed.token_id(t)));
    let mut source = TokenSource::bare(data, eog);
    let config = TokenizerConfig::read(&path.with_file_name("tokenizer_config.json"))?;
    source.chat_template = config.chat_template;
    if let Some(add_bos) = config.add_bos_token {
        source.add_bos = add_bos && source.bos_id.is_some();
    }
    Ok(source)
}

/// `data` with the policy of a checkpoint's facts.
fn policy_of(data: TokenizerData, facts: &ModelFacts) -> TokenSource {
    TokenSource {
        data,
        bos_id: facts.bos_id,
        add_bos: facts.add_bos,
        eog_ids: facts.eog_ids.clone(),
        chat_template: facts.chat_template.clone(),
    }
}

impl TokenSource {
    /// What the tokenizer says alone: its BOS, added when it has one.
    fn bare(data: TokenizerData, mut eog_ids: Vec<u32>) -> TokenSource {
        eog_ids.sort_unstable();
        eog_ids.dedup();
        TokenSource {
            bos_id: data.bos_id(),
            add_bos: data.bos_id().is_some(),
            data,
            eog_ids,
            chat_template: None,
        }
    }
}

/// What a `tokenizer_config.json` beside a `tokenizer.json` says about prompting.
#[derive(Default)]
struct TokenizerConfig {
    add_bos_token: Option<bool>,
    chat_template: Option<String>,
}

impl TokenizerConfig {
    fn read(path: &PathBuf) -> Result<TokenizerConfig, LowerError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(LowerError::Io {
                    path: path.clone(),
                    source,
                })
            }
        };
        let json: Json = serde_json::from_slice(&bytes).map_err(|e| LowerError::Invalid {
            path: path.clone(),
            what: format!("malformed JSON: {e}"),
        })?;
        Ok(TokenizerConfig {
            add_bos_token: json.get("add_bos_token").and_then(Json::as_bool),
            chat_template: json
                .get("chat_template")
                .and_then(Json::as_str)
                .map(str::to_owned),
        })
    }
}
