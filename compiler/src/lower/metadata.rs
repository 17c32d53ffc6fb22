//! What an ONNX model says about itself in `metadata_props`: kiln's exporter writes the
//! context length, the end-of-generation ids, and (newer exports) the whole facts and the
//! tokenizer; other exporters usually write none of it.

use std::collections::HashMap;
use std::sync::Arc;

use base64::prelude::{Engine, BASE64_STANDARD};
use kiln_runtime::model::{ModelFacts, ONNX_FACTS_KEY, ONNX_TOKENIZER_KEY};
use tract_onnx::prelude::Tensor as TractTensor;

/// The `metadata_props` kiln reads.
#[derive(Default)]
pub struct Metadata {
    pub facts: Option<ModelFacts>,
    /// kiln's tokenizer encoding ([`kiln_engine::tokenizer::TokenizerData::to_bytes`]).
    pub tokenizer: Option<Vec<u8>>,
    pub name: Option<String>,
    pub context_length: Option<usize>,
    pub eos_token_ids: Option<Vec<u32>>,
}

/// A malformed entry: its key and what is wrong.
pub struct BadEntry {
    pub key: String,
    pub what: String,
}

impl Metadata {
    /// Reads the entries from tract's model properties (`onnx.metadata_props.<key>`).
    pub fn read(properties: &HashMap<String, Arc<TractTensor>>) -> Result<Metadata, BadEntry> {
        let get = |key: &str| -> Option<String> {
            let t = properties.get(&format!("onnx.metadata_props.{key}"))?;
            let view = t.try_as_plain_ram().ok()?;
            view.to_scalar::<String>().ok().cloned()
        };
        let bad = |key: &str, what: String| BadEntry {
            key: key.to_owned(),
            what,
        };
        let facts = get(ONNX_FACTS_KEY)
            .map(|json| serde_json::from_str::<ModelFacts>(&json))
            .transpose()
            .map_err(|e| bad(ONNX_FACTS_KEY, format!("malformed JSON: {e}")))?;
        let tokenizer = get(ONNX_TOKENIZER_KEY)
            .map(|b64| BASE64_STANDARD.decode(b64.as_bytes()))
            .transpose()
            .map_err(|e| bad(ONNX_TOKENIZER_KEY, format!("malformed base64: {e}")))?;
        let context_length = get("model.context_length")
            .map(|v| v.trim().parse::<usize>())
            .transpose()
            .map_err(|e| bad("model.context_length", format!("{e}")))?;
        let eos_token_ids = get("model.eos_token_ids")
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(|e| bad("model.eos_token_ids", format!("{e}")))?;
        Ok(Metadata {
            facts,
            tokenizer,
            name: get("model.name"),
            context_length,
            eos_token_ids,
        })
    }
}
