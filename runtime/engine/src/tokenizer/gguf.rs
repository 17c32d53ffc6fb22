//! Vocabulary from GGUF metadata (`tokenizer.ggml.*`), as llama.cpp reads it.

use std::collections::HashMap;

use super::{bytelevel, Merges, PreTokenizer, TokenKind, TokenizerData, TokenizerError};

/// llama.cpp's `llama_token_type` values.
fn kind_of(id: u32, ty: i32) -> Result<TokenKind, TokenizerError> {
    match ty {
        // 0 undefined (treated as normal by llama.cpp), 1 normal.
        0 | 1 => Ok(TokenKind::Normal),
        // 2 unknown, 3 control, 5 unused: never produced by merging, matched as specials.
        2 | 3 | 5 => Ok(TokenKind::Control),
        4 => Ok(TokenKind::UserDefined),
        // 6 (byte tokens `<0x41>`) belongs to SentencePiece vocabularies.
        _ => Err(TokenizerError::BadTokenType { id, ty }),
    }
}

pub(super) fn from_gguf(
    model: &str,
    pre: &str,
    tokens: &[String],
    token_types: &[i32],
    merges: &[String],
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<TokenizerData, TokenizerError> {
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel(model.to_string()));
    }
    let pre = PreTokenizer::from_gguf_name(pre)?;
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(TokenizerError::TokenTypeCount {
            tokens: tokens.len(),
            types: token_types.len(),
        });
    }
    let mut bytes = Vec::with_capacity(tokens.len());
    let mut kinds = Vec::with_capacity(tokens.len());
    for (id, text) in (0u32..).zip(tokens) {
        let ty = token_types.get(id as usize).copied().unwrap_or(1);
        let kind = kind_of(id, ty)?;
        // Normal tokens are spelled in the byte-level alphabet; the others are plain text.
        let raw = match kind {
            TokenKind::Normal => {
                bytelevel::decode(text).ok_or_else(|| TokenizerError::NotByteLevel {
                    id,
                    text: text.clone(),
                })?
            }
            TokenKind::Control | TokenKind::UserDefined => text.clone().into_bytes(),
        };
        bytes.push(raw);
        kinds.push(kind);
    }
    let data = TokenizerData {
        tokens: bytes,
        kinds,
        merges: Merges::List(merge_ids(tokens, merges)?),
        pre,
        ignore_merges: pre == PreTokenizer::Llama3,
        bos,
        eos,
    };
    data.validate()?;
    Ok(data)
}

/// `"a b"` merge strings to id pairs, looked up in the byte-level spelling (first id wins).
pub(super) fn merge_ids<S: AsRef<str>>(
    tokens: &[S],
    merges: &[String],
) -> Result<Vec<(u32, u32)>, TokenizerError> {
    let mut ids: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (id, text) in (0u32..).zip(tokens) {
        ids.entry(text.as_ref()).or_insert(id);
    }
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| {
            let bad = |reason| TokenizerError::BadMerge {
                index,
                merge: merge.clone(),
                reason,
            };
            let (left, right) = merge
                .split_once(' ')
                .filter(|(_, right)| !right.contains(' '))
                .ok_or_else(|| bad("expected two tokens separated by one space"))?;
            let left = ids
                .get(left)
                .ok_or_else(|| bad("left token not in the vocabulary"))?;
            let right = ids
                .get(right)
                .ok_or_else(|| bad("right token not in the vocabulary"))?;
            Ok((*left, *right))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    fn byte_tokens() -> Vec<String> {
        (0u8..=255)
            .map(|b| {
                let mut s = String::new();
                bytelevel::encode_into(&[b], &mut s);
                s
            })
            .collect()
    }

    #[test]
    fn reads_byte_level_vocabulary() {
        let mut tokens = byte_tokens();
        tokens.extend([
            "Ġt".to_string(),
            "Ġth".to_string(),
            "<|im_end|>".to_string(),
        ]);
        let mut types = vec![1; 258];
        types.push(3);
        let merges = ["Ġ t".to_string(), "Ġt h".to_string()];
        let data =
            TokenizerData::from_gguf("gpt2", "smollm", &tokens, &types, &merges, None, Some(258))
                .unwrap();
        let tok = Tokenizer::new(&data).unwrap();
        assert_eq!(tok.encode(" th<|im_end|>", true), [257, 258]);
        assert_eq!(tok.token_id(" t"), Some(256));
        assert!(tok.is_special(258));
        assert_eq!(data.eos_id(), Some(258));
    }

    #[test]
    fn rejects_bad_metadata() {
        let tokens = byte_tokens();
        let err = |model, pre, types: &[i32], merges: &[String]| {
            TokenizerData::from_gguf(model, pre, &tokens, types, merges, None, None)
                .unwrap_err()
                .to_string()
        };
        assert!(err("llama", "default", &[], &[]).contains("`llama`"));
        assert!(err("gpt2", "mystery", &[], &[]).contains("`mystery`"));
        assert!(err("gpt2", "gpt-2", &[1, 1], &[]).contains("token types"));
        assert!(err("gpt2", "gpt-2", &[], &["Ġ".to_string()]).contains("merge 0"));
        assert!(err("gpt2", "gpt-2", &[], &["Ġ zz".to_string()]).contains("right token"));
        let mut types = vec![1; 256];
        types[3] = 6;
        assert!(err("gpt2", "gpt-2", &types, &[]).contains("token 3 has type 6"));
        let mut bad = tokens.clone();
        bad[0] = "日".to_string();
        let e = TokenizerData::from_gguf("gpt2", "gpt-2", &bad, &[], &[], None, None).unwrap_err();
        assert!(
            matches!(e, TokenizerError::NotByteLevel { id: 0, .. }),
            "{e}"
        );
    }
}
