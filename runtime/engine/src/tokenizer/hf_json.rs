//! Hugging Face `tokenizer.json`: reading byte-level BPE models and writing one that
//! `tokenizers` loads and that encodes exactly as kiln does.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::{json, Value};

use super::pretokenize::LLAMA3_PATTERN;
use super::{bytelevel, gguf, Merges, PreTokenizer, TokenKind, TokenizerData, TokenizerError};

#[derive(Deserialize)]
struct TokenizerJson {
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    post_processor: Option<Value>,
    model: Model,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<MergeEntry>,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
}

/// `"a b"` (tokenizers < 0.20) or `["a", "b"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry {
    Joined(String),
    Pair(String, String),
}

pub(super) fn from_tokenizer_json(bytes: &[u8]) -> Result<TokenizerData, TokenizerError> {
    let json: TokenizerJson =
        serde_json::from_slice(bytes).map_err(|e| TokenizerError::Json(e.to_string()))?;
    let model = json.model;
    if let Some(kind) = model.kind.as_deref().filter(|&k| k != "BPE") {
        return Err(TokenizerError::UnsupportedModel(kind.to_string()));
    }
    if model.byte_fallback {
        return Err(TokenizerError::Unsupported("model.byte_fallback".into()));
    }
    if model.dropout.is_some_and(|p| p > 0.0) {
        return Err(TokenizerError::Unsupported("model.dropout".into()));
    }
    if model
        .continuing_subword_prefix
        .is_some_and(|s| !s.is_empty())
        || model.end_of_word_suffix.is_some_and(|s| !s.is_empty())
    {
        return Err(TokenizerError::Unsupported(
            "model.continuing_subword_prefix / end_of_word_suffix".into(),
        ));
    }
    if let Some(normalizer) = json.normalizer.filter(|v| !v.is_null()) {
        return Err(TokenizerError::Unsupported(format!(
            "normalizer {normalizer}"
        )));
    }
    let pre = detect_pre(json.pre_tokenizer.as_ref())?;

    // Byte-level spelling of every id: the vocabulary's, replaced by an added token's
    // content (plain text) where one exists.
    let size = model
        .vocab
        .values()
        .chain(json.added_tokens.iter().map(|t| &t.id))
        .max()
        .map_or(0, |&max| max as usize + 1);
    // Ids must be dense, which also bounds the tables below by the input's size.
    if size > model.vocab.len() + json.added_tokens.len() {
        return Err(TokenizerError::Json(format!(
            "token ids reach {} but there are only {} vocab and {} added tokens",
            size - 1,
            model.vocab.len(),
            json.added_tokens.len()
        )));
    }
    let mut spelled: Vec<Option<&str>> = vec![None; size];
    for (text, &id) in &model.vocab {
        let slot = spelled
            .get_mut(id as usize)
            .ok_or(TokenizerError::MissingId(id))?;
        if slot.replace(text).is_some() {
            return Err(TokenizerError::Json(format!(
                "model.vocab has id {id} twice"
            )));
        }
    }
    let mut added: Vec<Option<&AddedToken>> = vec![None; size];
    for token in &json.added_tokens {
        if let Some(slot) = added.get_mut(token.id as usize) {
            *slot = Some(token);
        }
    }
    let mut tokens = Vec::with_capacity(size);
    let mut kinds = Vec::with_capacity(size);
    for ((id, text), added) in (0u32..).zip(&spelled).zip(&added) {
        let (raw, kind) = match (added, text) {
            (Some(t), _) => (
                t.content.clone().into_bytes(),
                if t.special {
                    TokenKind::Control
                } else {
                    TokenKind::UserDefined
                },
            ),
            (None, Some(text)) => (
                bytelevel::decode(text).ok_or_else(|| TokenizerError::NotByteLevel {
                    id,
                    text: text.to_string(),
                })?,
                TokenKind::Normal,
            ),
            (None, None) => return Err(TokenizerError::MissingId(id)),
        };
        tokens.push(raw);
        kinds.push(kind);
    }

    // Merges are looked up by spelling among vocabulary entries (not added tokens).
    let by_id: Vec<&str> = spelled.iter().map(|s| s.unwrap_or("")).collect();
    let merge_strings: Vec<String> = model
        .merges
        .into_iter()
        .map(|m| match m {
            MergeEntry::Joined(s) => s,
            MergeEntry::Pair(a, b) => format!("{a} {b}"),
        })
        .collect();
    let merges = gguf::merge_ids(&by_id, &merge_strings)?;

    let bos = json
        .post_processor
        .as_ref()
        .and_then(template_bos)
        .filter(|&id| (id as usize) < tokens.len());
    let data = TokenizerData {
        tokens,
        kinds,
        merges: Merges::List(merges),
        pre,
        ignore_merges: model.ignore_merges,
        bos,
        eos: None,
    };
    data.validate()?;
    Ok(data)
}

/// Recognizes the pre-tokenizer sections that Llama 3, SmolLM and GPT-2 ship.
fn detect_pre(section: Option<&Value>) -> Result<PreTokenizer, TokenizerError> {
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).map(str::to_owned);
    // `add_prefix_space` defaults to true in `tokenizers`, so it must be written as false.
    let byte_level = |v: &Value, use_regex: bool| {
        kind(v).as_deref() == Some("ByteLevel")
            && v.get("add_prefix_space").and_then(Value::as_bool) == Some(false)
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == use_regex
    };
    let digits = |v: &Value| {
        kind(v).as_deref() == Some("Digits")
            && v.get("individual_digits").and_then(Value::as_bool) == Some(true)
    };
    let llama3_split = |v: &Value| {
        kind(v).as_deref() == Some("Split")
            && v.pointer("/pattern/Regex").and_then(Value::as_str) == Some(LLAMA3_PATTERN)
            && v.get("behavior").and_then(Value::as_str) == Some("Isolated")
            && v.get("invert").and_then(Value::as_bool) == Some(false)
    };
    let found = section.and_then(|v| {
        if byte_level(v, true) {
            return Some(PreTokenizer::Gpt2);
        }
        match v.get("pretokenizers")?.as_array()?.as_slice() {
            [first, second] if digits(first) && byte_level(second, true) => {
                Some(PreTokenizer::SmolLm)
            }
            [first, second] if llama3_split(first) && byte_level(second, false) => {
                Some(PreTokenizer::Llama3)
            }
            _ => None,
        }
    });
    found.ok_or_else(|| {
        let shown = section.map_or_else(|| "null".to_string(), Value::to_string);
        TokenizerError::Unsupported(format!(
            "pre_tokenizer {shown} (known: GPT-2 ByteLevel, SmolLM Digits+ByteLevel, Llama 3 Split+ByteLevel)"
        ))
    })
}

/// BOS from a `TemplateProcessing` post-processor (as `transformers` writes for Llama 3) whose single-sequence template starts with
/// a special token.
fn template_bos(post: &Value) -> Option<u32> {
    let template = match post.get("type")?.as_str()? {
        "TemplateProcessing" => post,
        "Sequence" => post
            .get("processors")?
            .as_array()?
            .iter()
            .find(|p| p.get("type").and_then(Value::as_str) == Some("TemplateProcessing"))?,
        _ => return None,
    };
    let name = template.pointer("/single/0/SpecialToken/id")?.as_str()?;
    let id = template
        .get("special_tokens")?
        .get(name)?
        .pointer("/ids/0")?
        .as_u64()?;
    u32::try_from(id).ok()
}

pub(super) fn to_tokenizer_json(data: &TokenizerData) -> Result<String, TokenizerError> {
    data.validate()?;
    let string =
        |s: &str| serde_json::to_string(s).map_err(|e| TokenizerError::Json(e.to_string()));

    // Every token is in `model.vocab`, special ones under their text: `tokenizers` gives an
    // added token the id its content has in the model vocabulary, and a fresh id otherwise.
    let mut added = Vec::new();
    let mut vocab = String::new();
    let mut keys: HashMap<String, u32> = HashMap::with_capacity(data.tokens.len());
    let mut seen: HashMap<&[u8], u32> = HashMap::with_capacity(data.tokens.len());
    for (id, (bytes, kind)) in (0u32..).zip(data.tokens.iter().zip(&data.kinds)) {
        let key = if *kind == TokenKind::Normal {
            seen.entry(bytes).or_insert(id);
            let mut spelled = String::with_capacity(bytes.len() * 2);
            bytelevel::encode_into(bytes, &mut spelled);
            spelled
        } else {
            let content = std::str::from_utf8(bytes).map_err(|_| TokenizerError::NotUtf8 { id })?;
            added.push(json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *kind == TokenKind::Control,
            }));
            content.to_string()
        };
        if !vocab.is_empty() {
            vocab.push(',');
        }
        let _ = write!(vocab, "\n      {}: {id}", string(&key)?);
        if let Some(first) = keys.insert(key, id) {
            return Err(TokenizerError::Json(format!(
                "tokens {first} and {id} have the same text; tokenizer.json vocab keys must be unique"
            )));
        }
    }

    let mut merges = String::new();
    let mut left_spelled = String::new();
    for (left, right) in merge_pairs(data, &seen) {
        let (Some(l), Some(r)) = (
            data.tokens.get(left as usize),
            data.tokens.get(right as usize),
        ) else {
            continue;
        };
        left_spelled.clear();
        bytelevel::encode_into(l, &mut left_spelled);
        left_spelled.push(' ');
        bytelevel::encode_into(r, &mut left_spelled);
        if !merges.is_empty() {
            merges.push(',');
        }
        let _ = write!(merges, "\n      {}", string(&left_spelled)?);
    }

    let pre = match data.pre {
        PreTokenizer::Gpt2 => byte_level_pre(true),
        PreTokenizer::SmolLm => json!({
            "type": "Sequence",
            "pretokenizers": [
                { "type": "Digits", "individual_digits": true },
                byte_level_pre(true),
            ],
        }),
        PreTokenizer::Llama3 => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": LLAMA3_PATTERN },
                    "behavior": "Isolated",
                    "invert": false,
                },
                byte_level_pre(false),
            ],
        }),
    };
    // As Hugging Face's `TikTokenConverter` writes it: no BOS template, so `tokenizers` adds
    // nothing even with `add_special_tokens`, like kiln's `encode`.
    let post = json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true });
    let decoder = json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true });
    let added = Value::Array(added);
    Ok(format!(
        r#"{{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": {added},
  "normalizer": null,
  "pre_tokenizer": {pre},
  "post_processor": {post},
  "decoder": {decoder},
  "model": {{
    "type": "BPE",
    "dropout": null,
    "unk_token": null,
    "continuing_subword_prefix": null,
    "end_of_word_suffix": null,
    "fuse_unk": false,
    "byte_fallback": false,
    "ignore_merges": {ignore_merges},
    "vocab": {{{vocab}
    }},
    "merges": [{merges}
    ]
  }}
}}
"#,
        ignore_merges = data.ignore_merges,
    ))
}

fn byte_level_pre(use_regex: bool) -> Value {
    json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex })
}

/// The merge list in rank order. tiktoken ranks become merges the way Hugging Face's
/// `TikTokenConverter` makes them: every split of a token into two tokens, ordered by the
/// merged token's rank, then by the ranks of the two halves.
fn merge_pairs(data: &TokenizerData, normal_ids: &HashMap<&[u8], u32>) -> Vec<(u32, u32)> {
    match &data.merges {
        Merges::List(list) => list.clone(),
        Merges::Ranks => {
            let mut pairs = Vec::new();
            let mut local = Vec::new();
            for (bytes, kind) in data.tokens.iter().zip(&data.kinds) {
                if *kind != TokenKind::Normal {
                    continue;
                }
                local.clear();
                for cut in 1..bytes.len() {
                    let (head, tail) = bytes.split_at(cut);
                    if let (Some(&l), Some(&r)) = (normal_ids.get(head), normal_ids.get(tail)) {
                        local.push((l, r));
                    }
                }
                local.sort_unstable();
                pairs.extend_from_slice(&local);
            }
            pairs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::toy_data;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn round_trips_through_json() {
        for pre in [
            PreTokenizer::Gpt2,
            PreTokenizer::Llama3,
            PreTokenizer::SmolLm,
        ] {
            let data = toy_data(pre);
            let json = data.to_tokenizer_json().unwrap();
            let back = TokenizerData::from_tokenizer_json(json.as_bytes()).unwrap();
            assert_eq!(
                back.with_bos_eos(data.bos_id(), data.eos_id()).unwrap(),
                data
            );
        }
    }

    #[test]
    fn ranks_become_merges() {
        let mut data = toy_data(PreTokenizer::Llama3);
        data.merges = Merges::Ranks;
        data.ignore_merges = true;
        let json = data.to_tokenizer_json().unwrap();
        let back = TokenizerData::from_tokenizer_json(json.as_bytes()).unwrap();
        assert_eq!(back.bos_id(), None);
        let (a, b) = (
            Tokenizer::new(&data).unwrap(),
            Tokenizer::new(&back).unwrap(),
        );
        for text in ["abcab lower\nxyz", " low lower ab", "<|bos|>x<user>"] {
            assert_eq!(a.encode(text, true), b.encode(text, true), "{text:?}");
        }
    }

    #[test]
    fn reads_pair_merges_and_template_bos() {
        let data = toy_data(PreTokenizer::Llama3);
        let mut json: Value = serde_json::from_str(&data.to_tokenizer_json().unwrap()).unwrap();
        let merges = json.pointer_mut("/model/merges").unwrap();
        let pairs: Vec<Value> = merges
            .as_array()
            .unwrap()
            .iter()
            .map(|m| json!(m.as_str().unwrap().split(' ').collect::<Vec<_>>()))
            .collect();
        *merges = Value::Array(pairs);
        // The post-processor `transformers` writes for Llama 3.
        json["post_processor"] = json!({
            "type": "Sequence",
            "processors": [
                { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true },
                {
                    "type": "TemplateProcessing",
                    "single": [
                        { "SpecialToken": { "id": "<|bos|>", "type_id": 0 } },
                        { "Sequence": { "id": "A", "type_id": 0 } }
                    ],
                    "special_tokens": { "<|bos|>": { "id": "<|bos|>", "ids": [data.bos_id()], "tokens": ["<|bos|>"] } }
                }
            ]
        });
        let back = TokenizerData::from_tokenizer_json(json.to_string().as_bytes()).unwrap();
        assert_eq!(back.bos_id(), data.bos_id());
        assert_eq!(
            back.with_bos_eos(data.bos_id(), data.eos_id()).unwrap(),
            data
        );
    }

    #[test]
    fn unsupported_sections_are_errors() {
        let json = toy_data(PreTokenizer::Gpt2).to_tokenizer_json().unwrap();
        let with = |from: &str, to: &str| {
            assert!(json.contains(from), "{from}");
            TokenizerData::from_tokenizer_json(json.replacen(from, to, 1).as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(with(
            "\"normalizer\": null",
            "\"normalizer\": {\"type\": \"NFC\"}"
        )
        .contains("normalizer"));
        assert!(
            with("\"add_prefix_space\":false", "\"add_prefix_space\":true")
                .contains("pre_tokenizer")
        );
        assert!(with("\"type\": \"BPE\"", "\"type\": \"WordPiece\"").contains("WordPiece"));
        assert!(
            with("\"byte_fallback\": false", "\"byte_fallback\": true").contains("byte_fallback")
        );
        assert!(TokenizerData::from_tokenizer_json(b"{").is_err());
    }
}
