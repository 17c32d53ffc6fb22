//! Pre-tokenization: the regex split of plain text into pieces that BPE merges separately.
//!
//! The patterns are the ones tiktoken, Hugging Face and llama.cpp use, run with fancy-regex
//! (tiktoken's engine). Text between matches is kept as its own piece (Hugging Face's
//! `Isolated` split), so no byte is ever dropped.

use fancy_regex::Regex;

use super::TokenizerError;

/// GPT-2's split (Hugging Face `ByteLevel` with `use_regex`).
pub(super) const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's split (Meta's `tokenizer.py`, llama.cpp `llama-bpe`).
pub(super) const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Every digit alone (Hugging Face `Digits { individual_digits: true }`).
const DIGIT_PATTERN: &str = r"\p{N}";

/// Which split a vocabulary was trained with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreTokenizer {
    /// GPT-2's regex.
    Gpt2,
    /// Llama 3's regex.
    Llama3,
    /// Each digit alone, then GPT-2's regex (SmolLM, llama.cpp `smollm`).
    SmolLm,
}

impl PreTokenizer {
    /// From GGUF `tokenizer.ggml.pre`.
    pub(super) fn from_gguf_name(name: &str) -> Result<Self, TokenizerError> {
        match name {
            "gpt-2" => Ok(Self::Gpt2),
            "llama-bpe" | "llama3" | "llama-v3" => Ok(Self::Llama3),
            "smollm" => Ok(Self::SmolLm),
            other => Err(TokenizerError::UnknownPreTokenizer(other.to_string())),
        }
    }

    pub(super) fn code(self) -> u8 {
        match self {
            Self::Gpt2 => 0,
            Self::Llama3 => 1,
            Self::SmolLm => 2,
        }
    }

    pub(super) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Gpt2),
            1 => Some(Self::Llama3),
            2 => Some(Self::SmolLm),
            _ => None,
        }
    }
}

/// A compiled [`PreTokenizer`].
#[derive(Debug)]
pub(super) struct Splitter {
    digits: Option<Regex>,
    main: Regex,
}

impl Splitter {
    pub(super) fn new(pre: PreTokenizer) -> Result<Self, TokenizerError> {
        let compile = |pattern: &str| {
            Regex::new(pattern).map_err(|e| TokenizerError::Regex(format!("{pattern}: {e}")))
        };
        Ok(match pre {
            PreTokenizer::Gpt2 => Self {
                digits: None,
                main: compile(GPT2_PATTERN)?,
            },
            PreTokenizer::Llama3 => Self {
                digits: None,
                main: compile(LLAMA3_PATTERN)?,
            },
            PreTokenizer::SmolLm => Self {
                digits: Some(compile(DIGIT_PATTERN)?),
                main: compile(GPT2_PATTERN)?,
            },
        })
    }

    /// Appends the pieces of `text` to `out`; together they are exactly `text`.
    pub(super) fn split<'t>(&self, text: &'t str, out: &mut Vec<&'t str>) {
        match &self.digits {
            None => split_isolated(&self.main, text, out),
            Some(digits) => {
                let mut fragments = Vec::new();
                split_isolated(digits, text, &mut fragments);
                for fragment in fragments {
                    split_isolated(&self.main, fragment, out);
                }
            }
        }
    }
}

/// Matches and the text between them, in order. If the regex gives up (fancy-regex's
/// backtracking limit, reachable only with pathological runs), the rest becomes one piece.
fn split_isolated<'t>(re: &Regex, text: &'t str, out: &mut Vec<&'t str>) {
    let mut last = 0;
    for found in re.find_iter(text) {
        let Ok(m) = found else { break };
        if let Some(gap) = text.get(last..m.start()).filter(|gap| !gap.is_empty()) {
            out.push(gap);
        }
        if !m.as_str().is_empty() {
            out.push(m.as_str());
        }
        last = m.end();
    }
    if let Some(rest) = text.get(last..).filter(|rest| !rest.is_empty()) {
        out.push(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(pre: PreTokenizer, text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        Splitter::new(pre).unwrap().split(text, &mut out);
        out
    }

    #[test]
    fn llama3_split() {
        assert_eq!(
            pieces(PreTokenizer::Llama3, "I'M 12345 apples!!\n\n  ok"),
            ["I", "'M", " ", "123", "45", " apples", "!!\n\n", " ", " ok"]
        );
    }

    #[test]
    fn smollm_splits_digits_first() {
        assert_eq!(
            pieces(PreTokenizer::SmolLm, "x 42 it's"),
            ["x", " ", "4", "2", " it", "'s"]
        );
        assert_eq!(
            pieces(PreTokenizer::Gpt2, "x 42 it's"),
            ["x", " 42", " it", "'s"]
        );
    }

    #[test]
    fn unknown_gguf_pre_is_an_error() {
        let err = PreTokenizer::from_gguf_name("qwen2").unwrap_err();
        assert!(err.to_string().contains("qwen2"), "{err}");
    }
}
