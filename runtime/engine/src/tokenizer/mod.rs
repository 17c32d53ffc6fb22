//! Byte-level BPE tokenizer for Llama 3-family models, read from GGUF metadata, a Hugging Face
//! `tokenizer.json` or Meta's tiktoken `tokenizer.model`.
//!
//! All three sources become one [`TokenizerData`] (token bytes, token kinds, merge ranks,
//! pre-tokenizer), which is what a `.kiln` artifact stores; [`Tokenizer`] is the indexed form
//! used to encode and decode. Encoding splits out special tokens, pre-tokenizes each plain
//! segment with the family's regex and runs byte-pair merging on every piece.

mod bpe;
mod bytelevel;
mod codec;
mod gguf;
mod hf_json;
mod pretokenize;
mod special;
mod stream;
mod tiktoken;

use std::collections::HashMap;
use std::fmt;

pub use stream::StreamDecoder;

use bpe::Scratch;
use pretokenize::{PreTokenizer, Splitter};
use special::{Segment, SpecialMatcher};

/// Why a tokenizer could not be read, converted or built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the vocabulary is empty")]
    Empty,
    #[error("unsupported tokenizer model `{0}`: kiln reads byte-level BPE (GGUF `gpt2`, tokenizer.json `BPE`, tiktoken)")]
    UnsupportedModel(String),
    #[error(
        "unknown pre-tokenizer `{0}` (known: `gpt-2`, `llama-bpe`, `llama3`, `llama-v3`, `smollm`)"
    )]
    UnknownPreTokenizer(String),
    #[error("unsupported tokenizer.json feature: {0}")]
    Unsupported(String),
    #[error("tokenizer.json: {0}")]
    Json(String),
    #[error("GGUF vocabulary has {tokens} tokens but {types} token types")]
    TokenTypeCount { tokens: usize, types: usize },
    #[error("token {id} has type {ty}, which a byte-level BPE vocabulary cannot hold")]
    BadTokenType { id: u32, ty: i32 },
    #[error("token {id} ({text:?}) has a character outside the GPT-2 byte-level alphabet")]
    NotByteLevel { id: u32, text: String },
    #[error("token {id} is not valid UTF-8 (special and added tokens are text)")]
    NotUtf8 { id: u32 },
    #[error("merge {index} ({merge:?}): {reason}")]
    BadMerge {
        index: usize,
        merge: String,
        reason: &'static str,
    },
    #[error("{what} id {id} is out of range for a vocabulary of {vocab} tokens")]
    IdOutOfRange {
        what: &'static str,
        id: u32,
        vocab: usize,
    },
    #[error("no token id {0}: token ids must cover 0..vocab size without gaps")]
    MissingId(u32),
    #[error("tiktoken model line {line}: {reason}")]
    Tiktoken { line: usize, reason: String },
    #[error("pre-tokenizer regex: {0}")]
    Regex(String),
    #[error("tokenizer bytes: {0}")]
    Bytes(String),
}

/// What a token is, which decides how text is matched against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenKind {
    /// Reached only through byte-pair merging.
    Normal,
    /// Matched in text only when the caller asks for special tokens (`parse_special`).
    Control,
    /// Matched in text always, as llama.cpp and Hugging Face do for non-special added tokens.
    UserDefined,
}

/// How adjacent pairs are ranked during merging.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Merges {
    /// tiktoken: a pair merges when its concatenation is a token; the rank is that token's id.
    Ranks,
    /// Hugging Face / GGUF: an explicit list of `(left, right)` ids; the rank is the position.
    List(Vec<(u32, u32)>),
}

/// Everything needed to rebuild a [`Tokenizer`]; stored inside `.kiln` artifacts.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenizerData {
    /// Raw bytes of every token, indexed by id (byte-level mapping already undone).
    tokens: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    merges: Merges,
    pre: PreTokenizer,
    /// A pre-token that is itself a token is emitted whole, without merging (tiktoken,
    /// llama.cpp's Llama 3 pre-tokenizer, Hugging Face's `ignore_merges`).
    ignore_merges: bool,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl fmt::Debug for TokenizerData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let merges = match &self.merges {
            Merges::Ranks => "ranks".to_string(),
            Merges::List(list) => format!("{} merges", list.len()),
        };
        f.debug_struct("TokenizerData")
            .field("tokens", &self.tokens.len())
            .field("merges", &merges)
            .field("pre", &self.pre)
            .field("ignore_merges", &self.ignore_merges)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl TokenizerData {
    /// From GGUF metadata (`tokenizer.ggml.*`): `model` must be `gpt2` (byte-level BPE); `pre`
    /// names the pre-tokenizer; `token_types` may be empty (every token normal).
    pub fn from_gguf(
        model: &str,
        pre: &str,
        tokens: &[String],
        token_types: &[i32],
        merges: &[String],
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        gguf::from_gguf(model, pre, tokens, token_types, merges, bos, eos)
    }

    /// From a Hugging Face `tokenizer.json` holding a byte-level BPE model.
    pub fn from_tokenizer_json(bytes: &[u8]) -> Result<Self, TokenizerError> {
        hf_json::from_tokenizer_json(bytes)
    }

    /// From Meta's Llama 3 `tokenizer.model` (tiktoken ranks), with Meta's 256 special tokens.
    pub fn from_tiktoken(model_bytes: &[u8]) -> Result<Self, TokenizerError> {
        tiktoken::from_tiktoken(model_bytes)
    }

    /// A Hugging Face `tokenizer.json` that encodes exactly as this tokenizer does.
    pub fn to_tokenizer_json(&self) -> Result<String, TokenizerError> {
        hf_json::to_tokenizer_json(self)
    }

    /// Compact, versioned little-endian encoding, read back by [`TokenizerData::from_bytes`].
    pub fn to_bytes(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Reads [`TokenizerData::to_bytes`] output; truncated or corrupted input is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        codec::decode(bytes)
    }

    /// Replaces the BOS / EOS ids, e.g. with ones read from a model's `config.json`, which
    /// `tokenizer.json` does not carry.
    pub fn with_bos_eos(
        mut self,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        self.bos = bos;
        self.eos = eos;
        self.validate()?;
        Ok(self)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Structural checks shared by every constructor; merge semantics are checked by
    /// [`Tokenizer::new`], which indexes the vocabulary anyway.
    fn validate(&self) -> Result<(), TokenizerError> {
        let vocab = self.tokens.len();
        if self.kinds.len() != vocab {
            return Err(TokenizerError::TokenTypeCount {
                tokens: vocab,
                types: self.kinds.len(),
            });
        }
        // Special texts must be UTF-8 so that matching them in text splits at characters.
        for (id, (bytes, kind)) in (0u32..).zip(self.tokens.iter().zip(&self.kinds)) {
            if *kind != TokenKind::Normal && std::str::from_utf8(bytes).is_err() {
                return Err(TokenizerError::NotUtf8 { id });
            }
        }
        let check = |what, id: u32| {
            if (id as usize) < vocab {
                Ok(())
            } else {
                Err(TokenizerError::IdOutOfRange { what, id, vocab })
            }
        };
        if let Some(id) = self.bos {
            check("BOS", id)?;
        }
        if let Some(id) = self.eos {
            check("EOS", id)?;
        }
        if let Merges::List(list) = &self.merges {
            for &(left, right) in list {
                check("merge", left)?;
                check("merge", right)?;
            }
        }
        if vocab == 0 {
            return Err(TokenizerError::Empty);
        }
        Ok(())
    }
}

/// Rank and result of merging one pair.
#[derive(Clone, Copy)]
struct PairMerge {
    rank: u32,
    merged: u32,
}

/// An indexed tokenizer, ready to encode and decode.
pub struct Tokenizer {
    tokens: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    /// Bytes of normal tokens to their id (the first id when bytes repeat).
    normal_ids: HashMap<Vec<u8>, u32>,
    /// Text of control and user-defined tokens to their id.
    special_ids: HashMap<Vec<u8>, u32>,
    byte_ids: [u32; 256],
    /// `None` for tiktoken ranks, where pairs are ranked through `normal_ids`.
    pairs: Option<HashMap<(u32, u32), PairMerge>>,
    ignore_merges: bool,
    specials: SpecialMatcher,
    splitter: Splitter,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("special_tokens", &self.special_ids.len())
            .field("splitter", &self.splitter)
            .finish()
    }
}

impl Tokenizer {
    pub fn new(data: &TokenizerData) -> Result<Self, TokenizerError> {
        data.validate()?;
        let mut normal_ids = HashMap::with_capacity(data.tokens.len());
        let mut special_ids = HashMap::new();
        for (id, (bytes, kind)) in (0u32..).zip(data.tokens.iter().zip(&data.kinds)) {
            let map = match kind {
                TokenKind::Normal => &mut normal_ids,
                TokenKind::Control | TokenKind::UserDefined => &mut special_ids,
            };
            map.entry(bytes.clone()).or_insert(id);
        }
        // Some vocabularies lack bytes that are rare or invalid in UTF-8 (SmolLM2 has no
        // 0x04 or 0xC0); such a byte never merges and is dropped, as llama.cpp drops it.
        let mut byte_ids = [bpe::NO_TOKEN; 256];
        for (byte, slot) in (0u8..=255).zip(byte_ids.iter_mut()) {
            if let Some(&id) = normal_ids.get([byte].as_slice()) {
                *slot = id;
            }
        }
        let pairs = match &data.merges {
            Merges::Ranks => None,
            Merges::List(list) => Some(index_merges(data, list, &normal_ids)?),
        };
        let specials =
            SpecialMatcher::new(data.tokens.iter().zip(&data.kinds).zip(0u32..).filter_map(
                |((bytes, kind), id)| match kind {
                    TokenKind::Normal => None,
                    TokenKind::Control => Some((bytes.as_slice(), id, true)),
                    TokenKind::UserDefined => Some((bytes.as_slice(), id, false)),
                },
            ));
        Ok(Self {
            tokens: data.tokens.clone(),
            kinds: data.kinds.clone(),
            normal_ids,
            special_ids,
            byte_ids,
            pairs,
            ignore_merges: data.ignore_merges,
            specials,
            splitter: Splitter::new(data.pre)?,
        })
    }

    /// Token ids for `text`, without BOS. With `parse_special`, control-token strings written
    /// in the text (e.g. `<|eot_id|>`) become their ids; otherwise they are encoded as text.
    /// User-defined tokens are always matched.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut segments = Vec::new();
        let mut pieces = Vec::new();
        let mut scratch = Scratch::default();
        self.specials.split(text, parse_special, &mut segments);
        for segment in &segments {
            match *segment {
                Segment::Special(id) => ids.push(id),
                Segment::Text(part) => {
                    pieces.clear();
                    self.splitter.split(part, &mut pieces);
                    for piece in &pieces {
                        self.encode_piece(piece.as_bytes(), &mut scratch, &mut ids);
                    }
                }
            }
        }
        ids
    }

    fn encode_piece(&self, piece: &[u8], scratch: &mut Scratch, ids: &mut Vec<u32>) {
        if self.ignore_merges || piece.len() == 1 {
            if let Some(&id) = self.normal_ids.get(piece) {
                ids.push(id);
                return;
            }
        }
        match &self.pairs {
            Some(pairs) => bpe::merge(piece, &self.byte_ids, scratch, ids, |left, right, _| {
                pairs.get(&(left, right)).copied()
            }),
            None => bpe::merge(piece, &self.byte_ids, scratch, ids, |_, _, joined| {
                self.normal_ids.get(joined).map(|&id| PairMerge {
                    rank: id,
                    merged: id,
                })
            }),
        }
    }

    /// The first character of `text` this vocabulary cannot encode (one of whose bytes has no
    /// token and is not part of a token that matches), which [`Tokenizer::encode`] would drop as
    /// llama.cpp does; `None` when every byte is kept.
    pub fn unencodable(&self, text: &str) -> Option<char> {
        let missing = |c: char| {
            let mut buf = [0u8; 4];
            c.encode_utf8(&mut buf)
                .bytes()
                .any(|b| self.byte_ids[usize::from(b)] == bpe::NO_TOKEN)
        };
        let suspect = text.chars().find(|&c| missing(c))?;
        // A rare byte may still sit inside a longer token: only a lossy round trip is proof.
        if self.decode(&self.encode(text, false)) == text {
            return None;
        }
        Some(suspect)
    }

    /// Text of `ids`; unknown ids and invalid UTF-8 become U+FFFD. Special tokens are rendered
    /// as their text.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id).unwrap_or(REPLACEMENT));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Raw bytes of one token (a piece of UTF-8 that may end mid-character).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.tokens.get(id as usize).map(Vec::as_slice)
    }

    /// Exact lookup of a token by its text: a special token (`<|eot_id|>`) or a normal token's
    /// decoded text (`" Paris"`, not the byte-level `"ĠParis"`).
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        let key = piece.as_bytes();
        self.special_ids
            .get(key)
            .or_else(|| self.normal_ids.get(key))
            .copied()
    }

    /// Whether `id` is a control token (BOS, EOS, chat markers, reserved tokens).
    pub fn is_special(&self, id: u32) -> bool {
        self.kinds.get(id as usize) == Some(&TokenKind::Control)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
}

/// UTF-8 of U+FFFD, what an unknown id decodes to.
const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

/// Pair → (rank, merged id) for an explicit merge list; the first occurrence of a pair wins.
fn index_merges(
    data: &TokenizerData,
    list: &[(u32, u32)],
    normal_ids: &HashMap<Vec<u8>, u32>,
) -> Result<HashMap<(u32, u32), PairMerge>, TokenizerError> {
    let mut pairs = HashMap::with_capacity(list.len());
    let mut joined = Vec::new();
    for (index, &(left, right)) in list.iter().enumerate() {
        let bad = |reason| TokenizerError::BadMerge {
            index,
            merge: format!("{left} {right}"),
            reason,
        };
        let (Some(l), Some(r)) = (
            data.tokens.get(left as usize),
            data.tokens.get(right as usize),
        ) else {
            return Err(bad("token id out of range"));
        };
        if data.kinds.get(left as usize) != Some(&TokenKind::Normal)
            || data.kinds.get(right as usize) != Some(&TokenKind::Normal)
        {
            return Err(bad("merges a special token"));
        }
        joined.clear();
        joined.extend_from_slice(l);
        joined.extend_from_slice(r);
        let &merged = normal_ids
            .get(&joined)
            .ok_or_else(|| bad("the merged token is not in the vocabulary"))?;
        let rank = u32::try_from(index).map_err(|_| bad("too many merges"))?;
        pairs
            .entry((left, right))
            .or_insert(PairMerge { rank, merged });
    }
    Ok(pairs)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A small byte-level vocabulary: all 256 bytes, a few merges, a token no merge reaches,
    /// two control tokens and one user-defined token.
    pub(super) fn toy_data(pre: PreTokenizer) -> TokenizerData {
        let mut tokens: Vec<Vec<u8>> = (0u8..=255).map(|b| vec![b]).collect();
        let mut merges = Vec::new();
        let pairs = [
            ("a", "b"),
            ("ab", "c"),
            (" ", "a"),
            (" a", "b"),
            ("l", "o"),
            ("lo", "w"),
            ("e", "r"),
            (" ", "low"),
            ("low", "er"),
        ];
        for (left, right) in pairs {
            let id = |s: &str| tokens.iter().position(|t| t == s.as_bytes()).unwrap() as u32;
            merges.push((id(left), id(right)));
            tokens.push([left, right].concat().into_bytes());
        }
        tokens.push(b"xyz".to_vec());
        let mut kinds = vec![TokenKind::Normal; tokens.len()];
        for (text, kind) in [
            ("<|bos|>", TokenKind::Control),
            ("<|eos|>", TokenKind::Control),
            ("<user>", TokenKind::UserDefined),
        ] {
            tokens.push(text.as_bytes().to_vec());
            kinds.push(kind);
        }
        let bos = Some(tokens.len() as u32 - 3);
        let eos = Some(tokens.len() as u32 - 2);
        TokenizerData {
            tokens,
            kinds,
            merges: Merges::List(merges),
            pre,
            ignore_merges: false,
            bos,
            eos,
        }
    }

    fn piece(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| String::from_utf8_lossy(tok.token_bytes(id).unwrap()).into_owned())
            .collect()
    }

    #[test]
    fn merges_lowest_rank_first() {
        let tok = Tokenizer::new(&toy_data(PreTokenizer::Gpt2)).unwrap();
        let ids = tok.encode("abc lower low", false);
        assert_eq!(piece(&tok, &ids), ["abc", " low", "er", " low"]);
        assert_eq!(tok.decode(&ids), "abc lower low");
    }

    #[test]
    fn an_empty_vocabulary_is_refused() {
        let empty = TokenizerData {
            tokens: Vec::new(),
            kinds: Vec::new(),
            merges: Merges::List(Vec::new()),
            pre: PreTokenizer::Gpt2,
            ignore_merges: false,
            bos: None,
            eos: None,
        };
        assert!(matches!(Tokenizer::new(&empty), Err(TokenizerError::Empty)));
    }

    #[test]
    fn text_with_a_byte_the_vocabulary_lacks_is_found() {
        let mut data = toy_data(PreTokenizer::Gpt2);
        data.tokens[4] = b"\x04\x04".to_vec();
        let tok = Tokenizer::new(&data).unwrap();
        assert_eq!(tok.unencodable("ab\u{4}c"), Some('\u{4}'));
        assert_eq!(tok.unencodable("abc low"), None);
    }

    #[test]
    fn specials_follow_parse_special() {
        let tok = Tokenizer::new(&toy_data(PreTokenizer::Gpt2)).unwrap();
        let bos = tok.token_id("<|bos|>").unwrap();
        let user = tok.token_id("<user>").unwrap();
        assert!(tok.is_special(bos));
        assert!(!tok.is_special(user));
        let with = tok.encode("<|bos|>ab<user>", true);
        assert_eq!(with.first(), Some(&bos));
        assert_eq!(with.last(), Some(&user));
        let without = tok.encode("<|bos|>ab<user>", false);
        assert!(!without.contains(&bos));
        assert_eq!(without.last(), Some(&user));
        assert_eq!(tok.decode(&without), "<|bos|>ab<user>");
    }

    #[test]
    fn ranks_mode_merges_by_token_id() {
        let mut data = toy_data(PreTokenizer::Llama3);
        let tok = Tokenizer::new(&data).unwrap();
        assert_eq!(piece(&tok, &tok.encode("xyz", false)), ["x", "y", "z"]);
        data.merges = Merges::Ranks;
        data.ignore_merges = true;
        let tok = Tokenizer::new(&data).unwrap();
        let ids = tok.encode("abcab lower\nxyz", false);
        assert_eq!(piece(&tok, &ids), ["abc", "ab", " low", "er", "\n", "xyz"]);
    }

    #[test]
    fn unknown_ids_decode_as_replacement() {
        let tok = Tokenizer::new(&toy_data(PreTokenizer::Gpt2)).unwrap();
        assert_eq!(tok.decode(&[u32::from(b'a'), 99_999]), "a\u{FFFD}");
        assert_eq!(tok.token_bytes(99_999), None);
    }

    #[test]
    fn missing_bytes_are_dropped() {
        let mut data = toy_data(PreTokenizer::Gpt2);
        data.tokens[usize::from(b'z')] = b"\x00z".to_vec();
        let tok = Tokenizer::new(&data).unwrap();
        // The pair around the missing byte does not become adjacent.
        let ids = tok.encode("azb abc", false);
        assert_eq!(piece(&tok, &ids), ["a", "b", " ", "abc"]);
    }

    #[test]
    fn bad_bos_is_an_error() {
        let err = toy_data(PreTokenizer::Gpt2)
            .with_bos_eos(Some(1_000_000), None)
            .unwrap_err();
        assert!(
            matches!(err, TokenizerError::IdOutOfRange { what: "BOS", .. }),
            "{err}"
        );
    }
}
