//! Splitting special-token strings out of text before pre-tokenization.
//!
//! At each position the longest special token that starts there wins; scanning goes left
//! to right. Candidates are bucketed by first byte, so text without `<` (the first byte of
//! nearly every special token) costs one table lookup per byte.

/// A stretch of input: a special token, or plain text to pre-tokenize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Segment<'t> {
    Special(u32),
    Text(&'t str),
}

struct Candidate {
    text: Vec<u8>,
    id: u32,
    /// Matched only when the caller parses special tokens.
    control: bool,
}

pub(super) struct SpecialMatcher {
    /// Candidates by first byte, longest first.
    buckets: Vec<Vec<Candidate>>,
}

impl SpecialMatcher {
    /// From `(text, id, control)` triples; empty texts never match.
    pub(super) fn new<'a>(tokens: impl Iterator<Item = (&'a [u8], u32, bool)>) -> Self {
        let mut buckets: Vec<Vec<Candidate>> = (0..256).map(|_| Vec::new()).collect();
        for (text, id, control) in tokens {
            if let Some(bucket) = text.first().and_then(|&b| buckets.get_mut(usize::from(b))) {
                bucket.push(Candidate {
                    text: text.to_vec(),
                    id,
                    control,
                });
            }
        }
        for bucket in &mut buckets {
            // Stable: among equal texts the lowest id stays first.
            bucket.sort_by_key(|c| std::cmp::Reverse(c.text.len()));
        }
        Self { buckets }
    }

    /// Appends the segments of `text` to `out`.
    pub(super) fn split<'t>(&self, text: &'t str, parse_special: bool, out: &mut Vec<Segment<'t>>) {
        let bytes = text.as_bytes();
        let mut plain_start = 0;
        let mut at = 0;
        while let Some(&first) = bytes.get(at) {
            let hit = self.buckets.get(usize::from(first)).and_then(|bucket| {
                bucket.iter().find(|c| {
                    (parse_special || !c.control)
                        && bytes
                            .get(at..)
                            .is_some_and(|rest| rest.starts_with(&c.text))
                })
            });
            match hit {
                Some(c) => {
                    // Special texts are UTF-8 that starts on a lead byte, so `at` and
                    // `at + len` are character boundaries of `text`.
                    if let Some(plain) = text.get(plain_start..at).filter(|s| !s.is_empty()) {
                        out.push(Segment::Text(plain));
                    }
                    out.push(Segment::Special(c.id));
                    at += c.text.len();
                    plain_start = at;
                }
                None => at += 1,
            }
        }
        if let Some(plain) = text.get(plain_start..).filter(|s| !s.is_empty()) {
            out.push(Segment::Text(plain));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_match_and_control_flag() {
        let tokens: [(&[u8], u32, bool); 3] = [
            (b"<|a|>", 1, true),
            (b"<|a|>x", 2, true),
            (b"<u>", 3, false),
        ];
        let matcher = SpecialMatcher::new(tokens.into_iter());
        let mut out = Vec::new();
        matcher.split("hi<|a|>x<|a|><u>", true, &mut out);
        assert_eq!(
            out,
            [
                Segment::Text("hi"),
                Segment::Special(2),
                Segment::Special(1),
                Segment::Special(3)
            ]
        );
        out.clear();
        matcher.split("<|a|><u>é", false, &mut out);
        assert_eq!(
            out,
            [
                Segment::Text("<|a|>"),
                Segment::Special(3),
                Segment::Text("é")
            ]
        );
    }
}
