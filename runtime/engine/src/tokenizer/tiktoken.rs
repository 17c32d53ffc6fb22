//! Meta's Llama 3 `tokenizer.model`: tiktoken ranks (`base64token rank` lines) plus the 256
//! special tokens `llama_models/llama3/tokenizer.py` appends after them.

use super::{Merges, PreTokenizer, TokenKind, TokenizerData, TokenizerError};

/// Named special tokens in id order, starting right after the last rank; reserved tokens
/// `<|reserved_special_token_{2 + i}|>` fill the rest up to [`SPECIAL_COUNT`].
const NAMED_SPECIALS: [&str; 12] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
];

const SPECIAL_COUNT: usize = 256;

pub(super) fn from_tiktoken(model_bytes: &[u8]) -> Result<TokenizerData, TokenizerError> {
    let text = std::str::from_utf8(model_bytes).map_err(|e| TokenizerError::Tiktoken {
        line: 1 + model_bytes
            .iter()
            .take(e.valid_up_to())
            .filter(|&&b| b == b'\n')
            .count(),
        reason: "not UTF-8".into(),
    })?;
    let mut ranked: Vec<(usize, u32, Vec<u8>)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let bad = |reason: String| TokenizerError::Tiktoken {
            line: line_no,
            reason,
        };
        let mut fields = line.split_whitespace();
        let (Some(token), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            if line.trim().is_empty() {
                continue;
            }
            return Err(bad("expected `base64token rank`".into()));
        };
        let rank: u32 = rank
            .parse()
            .map_err(|_| bad(format!("rank {rank:?} is not a number")))?;
        let bytes = decode_base64(token).ok_or_else(|| bad(format!("{token:?} is not base64")))?;
        ranked.push((line_no, rank, bytes));
    }
    // Ranks are token ids, so they must be exactly 0..n.
    let n = ranked.len();
    let mut tokens: Vec<Option<Vec<u8>>> = vec![None; n];
    for (line, rank, bytes) in ranked {
        let slot = tokens
            .get_mut(rank as usize)
            .ok_or_else(|| TokenizerError::Tiktoken {
                line,
                reason: format!("rank {rank} is not below the {n} ranks in the file"),
            })?;
        if slot.replace(bytes).is_some() {
            return Err(TokenizerError::Tiktoken {
                line,
                reason: format!("rank {rank} appears twice"),
            });
        }
    }
    let mut tokens: Vec<Vec<u8>> = tokens.into_iter().flatten().collect();
    let mut kinds = vec![TokenKind::Normal; n];
    let reserved = (2..).map(|i| format!("<|reserved_special_token_{i}|>"));
    let specials = NAMED_SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(reserved)
        .take(SPECIAL_COUNT);
    for special in specials {
        tokens.push(special.into_bytes());
        kinds.push(TokenKind::Control);
    }
    let id = |offset: usize| u32::try_from(n + offset).ok();
    let data = TokenizerData {
        tokens,
        kinds,
        merges: Merges::Ranks,
        pre: PreTokenizer::Llama3,
        ignore_merges: true,
        bos: id(0),
        eos: id(1),
    };
    data.validate()?;
    Ok(data)
}

/// Standard base64 with `=` padding, as `base64.b64decode` accepts it in these files.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let digits = text.trim_end_matches('=');
    if !text.len().is_multiple_of(4) || text.len() - digits.len() > 2 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        // A chunk of k digits carries 6k bits, of which the first 8(k-1) are data.
        let [_, b0, b1, b2] = (acc << (6 * (4 - chunk.len()))).to_be_bytes();
        let data = [b0, b1, b2];
        out.extend_from_slice(data.get(..chunk.len().checked_sub(1)?)?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    #[test]
    fn base64() {
        assert_eq!(decode_base64("IQ=="), Some(b"!".to_vec()));
        assert_eq!(decode_base64("IGFi"), Some(b" ab".to_vec()));
        assert_eq!(decode_base64("IGE="), Some(b" a".to_vec()));
        assert_eq!(decode_base64("IGE"), None);
        assert_eq!(decode_base64("I==="), None);
        assert_eq!(decode_base64("I*E="), None);
        assert_eq!(decode_base64(""), Some(Vec::new()));
    }

    fn model_file(extra: &[&[u8]]) -> String {
        let mut lines = String::new();
        let all: Vec<Vec<u8>> = (0u8..=255)
            .map(|b| vec![b])
            .chain(extra.iter().map(|e| e.to_vec()))
            .collect();
        for (rank, bytes) in all.iter().enumerate() {
            lines.push_str(&encode_base64(bytes));
            lines.push_str(&format!(" {rank}\n"));
        }
        lines
    }

    fn encode_base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut buf = [0u8; 3];
            buf[..chunk.len()].copy_from_slice(chunk);
            let acc = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(acc >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn reads_ranks_and_meta_specials() {
        let data = TokenizerData::from_tiktoken(model_file(&[b"ab", b" ab"]).as_bytes()).unwrap();
        let tok = Tokenizer::new(&data).unwrap();
        assert_eq!(tok.vocab_size(), 258 + 256);
        assert_eq!(data.bos_id(), tok.token_id("<|begin_of_text|>"));
        assert_eq!(data.eos_id(), Some(259));
        assert_eq!(tok.token_id("<|eot_id|>"), Some(258 + 9));
        assert_eq!(tok.token_id("<|image|>"), Some(258 + 11));
        assert_eq!(tok.token_id("<|reserved_special_token_2|>"), Some(258 + 12));
        assert_eq!(
            tok.token_id("<|reserved_special_token_245|>"),
            Some(258 + 255)
        );
        assert_eq!(tok.encode(" ab<|eot_id|>", true), [257, 267]);
    }

    #[test]
    fn rejects_bad_files() {
        let err = |text: &str| {
            TokenizerData::from_tiktoken(text.as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert!(err("IQ== 0\nIg== x\n").contains("line 2"));
        assert!(err("IQ== 0\nIg==\n").contains("line 2"));
        assert!(err("IQ== 0\n!!!! 1\n").contains("not base64"));
        assert!(err("IQ== 0\nIg== 0\n").contains("twice"));
        assert!(err("IQ== 0\nIg== 5\n").contains("rank 5"));
        assert!(TokenizerData::from_tiktoken(b"\xff 0").is_err());
    }
}
