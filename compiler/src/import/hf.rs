//! Hugging Face checkpoint directory (`config.json`, tokenizer files, safetensors) → canonical
//! [`Checkpoint`]. Hugging Face's layout is already kiln's, so weights are only widened to f32.

mod config;
mod weights;

use std::path::{Path, PathBuf};

use kiln_engine::tokenizer::{Tokenizer, TokenizerData};
use kiln_runtime::model::{ModelFacts, SamplingDefaults};
use serde::Deserialize;
use serde_json::Value;

pub use config::config_facts;
use config::JsonFile;

use super::ImportError;
use crate::graph::Checkpoint;

/// Vocabulary tokens that end generation in Llama 3 chats, whatever the configs list.
const EOG_TOKENS: [&str; 3] = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"];

/// Reads a Hugging Face Llama checkpoint directory.
pub fn import(dir: &Path) -> Result<Checkpoint, ImportError> {
    let config_path = dir.join("config.json");
    let mut facts = config_facts(&config_path)?;
    check_ids(&facts.eog_ids, &facts, &config_path, "eos_token_id")?;
    if let Some(bos) = facts.bos_id {
        check_ids(&[bos], &facts, &config_path, "bos_token_id")?;
    }

    let generation_path = dir.join("generation_config.json");
    if let Some(generation) = JsonFile::read_optional(&generation_path)? {
        let eos = generation.fields().token_ids("eos_token_id")?;
        check_ids(&eos, &facts, &generation_path, "eos_token_id")?;
        facts.eog_ids.extend(eos);
        facts.sampling = config::sampling_defaults(&generation.fields())?;
    }

    let source = TokenizerSource::read(dir)?;
    let tokenizer_config = TokenizerConfig::read(dir)?;
    let tokenizer = source.tokenizer(&facts)?;
    facts.bos_id = tokenizer.bos_id();
    facts.add_bos = match source.kind {
        // Hugging Face's Llama 3 tokenizers add BOS in the post-processor, not via a flag.
        SourceKind::TokenizerJson { template_prefix } => {
            (template_prefix.is_some() && template_prefix == facts.bos_id)
                || tokenizer_config.add_bos_token == Some(true)
        }
        // Meta's reference code encodes every prompt with `bos=True`.
        SourceKind::Tiktoken => tokenizer_config.add_bos_token.unwrap_or(true),
    };
    facts.chat_template = tokenizer_config.chat_template;

    let indexed = Tokenizer::new(&tokenizer).map_err(|e| source.error(e))?;
    facts
        .eog_ids
        .extend(EOG_TOKENS.iter().filter_map(|t| indexed.token_id(t)));
    facts.eog_ids.sort_unstable();
    facts.eog_ids.dedup();

    let weights = weights::llama_weights(&weights::Weights::open(dir)?, &facts)?;
    Ok(Checkpoint {
        facts,
        tokenizer,
        weights,
    })
}

/// The sampling a `generation_config.json` recommends (nothing when there is no such file).
pub fn generation_sampling(path: &Path) -> Result<SamplingDefaults, ImportError> {
    match JsonFile::read_optional(path)? {
        Some(generation) => config::sampling_defaults(&generation.fields()),
        None => Ok(SamplingDefaults::default()),
    }
}

/// Token ids in a config must index the embedding.
fn check_ids(ids: &[u32], facts: &ModelFacts, path: &Path, field: &str) -> Result<(), ImportError> {
    match ids.iter().find(|&&id| id as usize >= facts.vocab_size) {
        Some(id) => Err(ImportError::Corrupt {
            path: path.to_path_buf(),
            what: format!(
                "field `{field}`: token id {id} is outside the vocabulary of {}",
                facts.vocab_size
            ),
        }),
        None => Ok(()),
    }
}

enum SourceKind {
    /// `template_prefix`: the special token the post-processor puts before every sequence.
    TokenizerJson {
        template_prefix: Option<u32>,
    },
    Tiktoken,
}

/// The tokenizer file a checkpoint ships, read but not yet converted.
struct TokenizerSource {
    path: PathBuf,
    bytes: Vec<u8>,
    kind: SourceKind,
}

impl TokenizerSource {
    /// `tokenizer.json` when present, else Meta's tiktoken `tokenizer.model` (which Meta's
    /// downloads keep under `original/`).
    fn read(dir: &Path) -> Result<TokenizerSource, ImportError> {
        let json = dir.join("tokenizer.json");
        if let Some(bytes) = read_optional(&json)? {
            let template_prefix = template_prefix(&json, &bytes)?;
            let kind = SourceKind::TokenizerJson { template_prefix };
            return Ok(TokenizerSource {
                path: json,
                bytes,
                kind,
            });
        }
        for path in [
            dir.join("original/tokenizer.model"),
            dir.join("tokenizer.model"),
        ] {
            if let Some(bytes) = read_optional(&path)? {
                return Ok(TokenizerSource {
                    path,
                    bytes,
                    kind: SourceKind::Tiktoken,
                });
            }
        }
        Err(ImportError::Corrupt {
            path: dir.to_path_buf(),
            what:
                "no tokenizer: expected tokenizer.json, original/tokenizer.model or tokenizer.model"
                    .into(),
        })
    }

    fn error(&self, source: kiln_engine::tokenizer::TokenizerError) -> ImportError {
        ImportError::Tokenizer {
            path: self.path.clone(),
            source,
        }
    }

    /// The vocabulary, with BOS / EOS from `config.json` (which `tokenizer.json` does not
    /// carry), else the ones the tokenizer names itself.
    fn tokenizer(&self, facts: &ModelFacts) -> Result<TokenizerData, ImportError> {
        let data = match self.kind {
            SourceKind::TokenizerJson { .. } => TokenizerData::from_tokenizer_json(&self.bytes),
            SourceKind::Tiktoken => TokenizerData::from_tiktoken(&self.bytes),
        }
        .map_err(|e| self.error(e))?;
        if data.vocab_size() > facts.vocab_size {
            return Err(ImportError::Corrupt {
                path: self.path.clone(),
                what: format!(
                    "{} tokens do not fit the model's vocab_size of {}",
                    data.vocab_size(),
                    facts.vocab_size
                ),
            });
        }
        let template_prefix = match self.kind {
            SourceKind::TokenizerJson { template_prefix } => template_prefix,
            SourceKind::Tiktoken => None,
        };
        let bos = facts.bos_id.or(template_prefix).or(data.bos_id());
        let eos = facts.eog_ids.first().copied().or(data.eos_id());
        data.with_bos_eos(bos, eos).map_err(|e| self.error(e))
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, ImportError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ImportError::io(path, e)),
    }
}

/// The id of the special token that `tokenizer.json`'s post-processor puts first in every
/// single sequence: a `TemplateProcessing`, alone or inside a `Sequence`, as in Llama 3.
fn template_prefix(path: &Path, bytes: &[u8]) -> Result<Option<u32>, ImportError> {
    #[derive(Deserialize)]
    struct Json {
        post_processor: Option<Value>,
    }
    let json: Json = serde_json::from_slice(bytes).map_err(|e| ImportError::Corrupt {
        path: path.to_path_buf(),
        what: format!("malformed JSON: {e}"),
    })?;
    Ok(json.post_processor.as_ref().and_then(leading_special))
}

fn leading_special(processor: &Value) -> Option<u32> {
    match processor.get("type")?.as_str()? {
        "Sequence" => processor
            .get("processors")?
            .as_array()?
            .iter()
            .find_map(leading_special),
        "TemplateProcessing" => {
            let token = processor.pointer("/single/0/SpecialToken/id")?.as_str()?;
            match processor
                .get("special_tokens")?
                .get(token)?
                .get("ids")?
                .as_array()?
                .as_slice()
            {
                [id] => id.as_u64().and_then(|id| u32::try_from(id).ok()),
                _ => None,
            }
        }
        _ => None,
    }
}

/// What `tokenizer_config.json` (and `chat_template.jinja`, where newer transformers save the
/// template) say about prompting.
struct TokenizerConfig {
    add_bos_token: Option<bool>,
    chat_template: Option<String>,
}

impl TokenizerConfig {
    fn read(dir: &Path) -> Result<TokenizerConfig, ImportError> {
        let (add_bos_token, mut chat_template) =
            match JsonFile::read_optional(&dir.join("tokenizer_config.json"))? {
                Some(file) => {
                    let f = file.fields();
                    (f.get("add_bos_token")?, chat_template(&file)?)
                }
                None => (None, None),
            };
        if chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            chat_template = read_optional(&jinja)?
                .map(|bytes| {
                    String::from_utf8(bytes).map_err(|_| ImportError::Corrupt {
                        path: jinja.clone(),
                        what: "not UTF-8 text".into(),
                    })
                })
                .transpose()?;
        }
        Ok(TokenizerConfig {
            add_bos_token,
            chat_template,
        })
    }
}

/// `chat_template`: one template, or a list of named ones of which kiln uses `default`.
fn chat_template(file: &JsonFile) -> Result<Option<String>, ImportError> {
    #[derive(Deserialize)]
    struct Named {
        name: String,
        template: String,
    }
    let f = file.fields();
    match f.raw("chat_template") {
        None => Ok(None),
        Some(Value::Array(_)) => {
            let named: Vec<Named> = f.require("chat_template")?;
            match named.into_iter().find(|t| t.name == "default") {
                Some(t) => Ok(Some(t.template)),
                None => Err(f.corrupt("field `chat_template`: no template is named \"default\"")),
            }
        }
        Some(_) => f.get("chat_template"),
    }
}
