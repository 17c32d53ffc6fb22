//! Binary form of [`TokenizerData`] for `.kiln` artifacts.
//!
//! Layout (little-endian): magic `KTOK`, format version `u32`, body length `u64`, CRC-32 of
//! the body `u32`, body. The body holds the pre-tokenizer code, flags, BOS/EOS, the tokens
//! (kind byte, LEB128 length, bytes) and, for explicit merge lists, LEB128 id pairs.

use super::{Merges, PreTokenizer, TokenKind, TokenizerData, TokenizerError};

const MAGIC: &[u8; 4] = b"KTOK";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 4 + 4 + 8 + 4;

const FLAG_IGNORE_MERGES: u8 = 1;
const FLAG_RANKS: u8 = 2;
const FLAG_BOS: u8 = 4;
const FLAG_EOS: u8 = 8;

pub(super) fn encode(data: &TokenizerData) -> Vec<u8> {
    let mut body = Vec::with_capacity(data.tokens.iter().map(|t| t.len() + 2).sum::<usize>() + 64);
    body.push(data.pre.code());
    let mut flags = 0;
    for (set, flag) in [
        (data.ignore_merges, FLAG_IGNORE_MERGES),
        (data.merges == Merges::Ranks, FLAG_RANKS),
        (data.bos.is_some(), FLAG_BOS),
        (data.eos.is_some(), FLAG_EOS),
    ] {
        if set {
            flags |= flag;
        }
    }
    body.push(flags);
    for id in [data.bos, data.eos].into_iter().flatten() {
        put_varint(&mut body, u64::from(id));
    }
    put_varint(&mut body, data.tokens.len() as u64);
    for (bytes, kind) in data.tokens.iter().zip(&data.kinds) {
        body.push(match kind {
            TokenKind::Normal => 0,
            TokenKind::Control => 1,
            TokenKind::UserDefined => 2,
        });
        put_varint(&mut body, bytes.len() as u64);
        body.extend_from_slice(bytes);
    }
    if let Merges::List(list) = &data.merges {
        put_varint(&mut body, list.len() as u64);
        for &(left, right) in list {
            put_varint(&mut body, u64::from(left));
            put_varint(&mut body, u64::from(right));
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn error(detail: String) -> TokenizerError {
    TokenizerError::Bytes(detail)
}

pub(super) fn decode(bytes: &[u8]) -> Result<TokenizerData, TokenizerError> {
    let header = bytes.get(..HEADER_LEN).ok_or_else(|| {
        error(format!(
            "truncated: {} bytes, the header alone is {HEADER_LEN}",
            bytes.len()
        ))
    })?;
    let (magic, rest) = header.split_at(4);
    if magic != MAGIC {
        return Err(error(format!(
            "bad magic {magic:02x?}, expected {MAGIC:02x?} (`KTOK`)"
        )));
    }
    let mut reader = Reader {
        bytes: rest,
        pos: 4,
    };
    let version = reader.u32()?;
    if version != VERSION {
        return Err(error(format!(
            "format version {version}, this build reads version {VERSION}"
        )));
    }
    let body_len = reader.u64()?;
    let crc = reader.u32()?;
    let body = bytes.get(HEADER_LEN..).unwrap_or_default();
    if body.len() as u64 != body_len {
        let what = if (body.len() as u64) < body_len {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(error(format!(
            "{what}: the header says {body_len} body bytes, {} are present",
            body.len()
        )));
    }
    let found = crc32fast::hash(body);
    if found != crc {
        return Err(error(format!(
            "checksum mismatch (stored {crc:08x}, computed {found:08x}): the data is corrupted"
        )));
    }

    let mut reader = Reader {
        bytes: body,
        pos: HEADER_LEN,
    };
    let code = reader.u8()?;
    let pre = PreTokenizer::from_code(code)
        .ok_or_else(|| error(format!("unknown pre-tokenizer code {code}")))?;
    let flags = reader.u8()?;
    let bos = (flags & FLAG_BOS != 0).then(|| reader.id()).transpose()?;
    let eos = (flags & FLAG_EOS != 0).then(|| reader.id()).transpose()?;
    let count = reader.len()?;
    let mut tokens = Vec::with_capacity(count);
    let mut kinds = Vec::with_capacity(count);
    for _ in 0..count {
        let at = reader.offset();
        kinds.push(match reader.u8()? {
            0 => TokenKind::Normal,
            1 => TokenKind::Control,
            2 => TokenKind::UserDefined,
            other => return Err(error(format!("unknown token kind {other} at offset {at}"))),
        });
        let len = reader.len()?;
        tokens.push(reader.take(len)?.to_vec());
    }
    let merges = if flags & FLAG_RANKS != 0 {
        Merges::Ranks
    } else {
        let count = reader.len()?;
        let mut list = Vec::with_capacity(count);
        for _ in 0..count {
            list.push((reader.id()?, reader.id()?));
        }
        Merges::List(list)
    };
    if !reader.bytes.is_empty() {
        return Err(error(format!(
            "{} unread bytes at offset {}",
            reader.bytes.len(),
            reader.offset()
        )));
    }
    let data = TokenizerData {
        tokens,
        kinds,
        merges,
        pre,
        ignore_merges: flags & FLAG_IGNORE_MERGES != 0,
        bos,
        eos,
    };
    data.validate()?;
    Ok(data)
}

/// Bounds-checked cursor; `pos` is the absolute offset, for error messages.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn offset(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenizerError> {
        if n > self.bytes.len() {
            return Err(error(format!(
                "truncated at offset {}: need {n} bytes, {} left",
                self.pos,
                self.bytes.len()
            )));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        self.pos += n;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TokenizerError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, TokenizerError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, TokenizerError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, TokenizerError> {
        self.array().map(u64::from_le_bytes)
    }

    fn varint(&mut self) -> Result<u64, TokenizerError> {
        let at = self.pos;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(error(format!("varint longer than 64 bits at offset {at}")))
    }

    fn id(&mut self) -> Result<u32, TokenizerError> {
        let at = self.pos;
        let value = self.varint()?;
        u32::try_from(value).map_err(|_| error(format!("id {value} at offset {at} exceeds u32")))
    }

    /// A count or length; it can never exceed the bytes left, which also caps allocations.
    fn len(&mut self) -> Result<usize, TokenizerError> {
        let at = self.pos;
        let value = self.varint()?;
        usize::try_from(value)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| {
                error(format!(
                    "length {value} at offset {at} exceeds the {} bytes left",
                    self.bytes.len()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::toy_data;

    #[test]
    fn round_trips() {
        for pre in [
            PreTokenizer::Gpt2,
            PreTokenizer::Llama3,
            PreTokenizer::SmolLm,
        ] {
            let mut data = toy_data(pre);
            assert_eq!(TokenizerData::from_bytes(&data.to_bytes()).unwrap(), data);
            data.merges = Merges::Ranks;
            data.ignore_merges = true;
            data.bos = None;
            assert_eq!(TokenizerData::from_bytes(&data.to_bytes()).unwrap(), data);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = toy_data(PreTokenizer::Gpt2).to_bytes();
        for len in 0..bytes.len() {
            let err = TokenizerData::from_bytes(&bytes[..len]).unwrap_err();
            assert!(err.to_string().contains("truncated"), "{len}: {err}");
        }
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let bytes = toy_data(PreTokenizer::Llama3).to_bytes();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x41;
            assert!(TokenizerData::from_bytes(&bad).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn malformed_body_with_valid_checksum_is_an_error() {
        let wrap = |body: &[u8]| {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&VERSION.to_le_bytes());
            out.extend_from_slice(&(body.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
            out.extend_from_slice(body);
            TokenizerData::from_bytes(&out).unwrap_err().to_string()
        };
        assert!(wrap(&[9, 0]).contains("pre-tokenizer code 9"));
        assert!(wrap(&[0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]).contains("exceeds"));
        assert!(wrap(&[0, FLAG_BOS, 5, 0, 0]).contains("BOS id 5"));
        assert!(wrap(&[0, 0, 1, 7, 0, 0]).contains("token kind 7"));
        assert!(wrap(&[0, 0, 0, 0, 1]).contains("unread"));
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(VERSION + 1).to_le_bytes());
        out.extend_from_slice(&[0; 12]);
        let err = TokenizerData::from_bytes(&out).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
    }
}
