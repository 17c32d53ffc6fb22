//! Streaming detokenization: text is released only once its UTF-8 is complete, so a
//! character split across tokens (common for CJK and emoji) is never shown half-decoded.

use super::{Tokenizer, REPLACEMENT};

/// Turns a stream of token ids into text, holding back incomplete UTF-8 sequences.
///
/// The concatenation of every [`StreamDecoder::push`] and the final
/// [`StreamDecoder::finish`] equals [`Tokenizer::decode`] of all the ids.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending
            .extend_from_slice(tok.token_bytes(id).unwrap_or(REPLACEMENT));
        let mut out = String::new();
        let mut start = 0;
        while let Some(rest) = self.pending.get(start..) {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let (valid, _) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // Invalid, not merely unfinished: replaced, as lossy decoding does.
                        Some(len) => {
                            out.push('\u{FFFD}');
                            start += e.valid_up_to() + len;
                        }
                        None => {
                            start += e.valid_up_to();
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start.min(self.pending.len()));
        out
    }

    /// Whatever is still held back, with an unfinished sequence replaced by U+FFFD.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::pretokenize::PreTokenizer;
    use crate::tokenizer::tests::toy_data;

    #[test]
    fn holds_back_split_characters() {
        let tok = Tokenizer::new(&toy_data(PreTokenizer::Gpt2)).unwrap();
        let text = "a日本🦀b";
        let ids = tok.encode(text, false);
        let mut stream = StreamDecoder::new();
        let parts: Vec<String> = ids.iter().map(|&id| stream.push(&tok, id)).collect();
        assert!(parts
            .iter()
            .all(|p| std::str::from_utf8(p.as_bytes()).is_ok()));
        assert_eq!(parts.concat() + &stream.finish(), text);
        assert_eq!(parts.iter().filter(|p| p.is_empty()).count(), ids.len() - 5);
    }

    #[test]
    fn matches_lossy_decode() {
        let tok = Tokenizer::new(&toy_data(PreTokenizer::Gpt2)).unwrap();
        let ids = [0xe6, 0x97, b'x'.into(), 0xff, 0xf0, 0x9f, 999_999, 0xe6];
        let mut stream = StreamDecoder::new();
        let mut text: String = ids.iter().map(|&id| stream.push(&tok, id)).collect();
        text += &stream.finish();
        assert_eq!(text, tok.decode(&ids));
    }
}
