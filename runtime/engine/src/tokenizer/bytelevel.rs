//! GPT-2's byte-to-unicode alphabet, in which GGUF and `tokenizer.json` spell byte-level
//! tokens: printable Latin-1 bytes stand for themselves, the other 68 bytes become U+0100
//! onwards in byte order (so a space is `Ġ`, a newline `Ċ`).

/// Bytes that are their own character.
const fn is_printable(byte: u8) -> bool {
    matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

const NON_PRINTABLE: usize = 68;

/// Byte → character.
const CHARS: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    let mut byte = 0usize;
    while byte < 256 {
        table[byte] = if is_printable(byte as u8) {
            byte as u8 as char
        } else {
            let c = match char::from_u32(256 + shifted) {
                Some(c) => c,
                None => '\0',
            };
            shifted += 1;
            c
        };
        byte += 1;
    }
    table
};

/// The bytes that are shifted to U+0100 + index.
const SHIFTED: [u8; NON_PRINTABLE] = {
    let mut table = [0u8; NON_PRINTABLE];
    let mut next = 0usize;
    let mut byte = 0usize;
    while byte < 256 {
        if !is_printable(byte as u8) {
            table[next] = byte as u8;
            next += 1;
        }
        byte += 1;
    }
    table
};

/// Appends the byte-level spelling of `bytes` to `out`.
pub(super) fn encode_into(bytes: &[u8], out: &mut String) {
    out.extend(bytes.iter().map(|&b| CHARS[usize::from(b)]));
}

/// The bytes a byte-level token string stands for, or `None` if it has a character outside
/// the alphabet.
pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
    text.chars()
        .map(|c| {
            let code = u32::from(c);
            match u8::try_from(code) {
                Ok(byte) if is_printable(byte) => Some(byte),
                _ => code
                    .checked_sub(256)
                    .and_then(|i| SHIFTED.get(usize::try_from(i).ok()?).copied()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let mut text = String::new();
        encode_into(&all, &mut text);
        assert_eq!(text.chars().count(), 256);
        assert_eq!(decode(&text), Some(all));
    }

    #[test]
    fn known_spellings() {
        let mut text = String::new();
        encode_into(b" \n\t!\xad", &mut text);
        assert_eq!(text, "\u{120}\u{10a}\u{109}!\u{143}");
        assert_eq!(decode("ĠParis"), Some(b" Paris".to_vec()));
        assert_eq!(decode("\u{144}"), None);
        assert_eq!(decode("日"), None);
    }
}
