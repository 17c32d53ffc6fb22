//! Loading without a file system: an artifact streamed through an `embedded_io::Read` into a
//! buffer the caller owns (firmware reading flash or a serial link), then validated in place.

use super::format::HEADER_LEN;
use super::read::{parse, ArtifactError, Parsed};

/// Reads a whole artifact from `reader` into `buf` (u64 words, so f32 weights are aligned) and
/// validates it. Returns the artifact's bytes inside `buf` and what [`parse`] found in them.
pub fn read_into<'b, R: embedded_io::Read>(
    reader: &mut R,
    buf: &'b mut [u64],
) -> Result<(&'b [u8], Parsed), ArtifactError> {
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf);
    if bytes.len() < HEADER_LEN {
        return Err(ArtifactError::BufferTooSmall {
            needed: HEADER_LEN as u64,
            given: bytes.len() as u64,
        });
    }
    read_exact(reader, &mut bytes[..HEADER_LEN])?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[24..32]);
    let file_len = u64::from_le_bytes(len);
    if file_len < HEADER_LEN as u64 || file_len > bytes.len() as u64 {
        return Err(ArtifactError::BufferTooSmall {
            needed: file_len,
            given: bytes.len() as u64,
        });
    }
    let file_len = file_len as usize;
    read_exact(reader, &mut bytes[HEADER_LEN..file_len])?;
    let bytes = &bytes[..file_len];
    let parsed = parse(bytes)?;
    Ok((bytes, parsed))
}

fn read_exact<R: embedded_io::Read>(
    reader: &mut R,
    mut buf: &mut [u8],
) -> Result<(), ArtifactError> {
    while !buf.is_empty() {
        match reader.read(buf) {
            Ok(0) => {
                return Err(ArtifactError::Truncated {
                    what: "the stream".into(),
                    need: buf.len() as u64,
                    have: 0,
                })
            }
            Ok(n) => buf = &mut buf[n..],
            Err(e) => {
                return Err(ArtifactError::Read(alloc::format!(
                    "{:?}",
                    embedded_io::Error::kind(&e)
                )))
            }
        }
    }
    Ok(())
}
