//! Artifact writer: lays out sections and tensors 64-byte aligned, checksums them, writes atomically.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::format::*;

/// One tensor to store.
pub struct TensorData<'a> {
    pub name: &'a str,
    pub format: crate::quant::Format,
    /// How `bytes` arrange the rows (already packed so).
    pub layout: crate::layout::Layout,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

/// What goes into an artifact besides the tensors; `tensors` of `meta` is filled in by [`write`].
pub struct Contents<'a> {
    pub meta: Metadata,
    pub tokenizer: &'a [u8],
    pub tensors: &'a [TensorData<'a>],
}

fn pad_to_align(n: u64) -> u64 {
    n.div_ceil(ALIGN as u64) * ALIGN as u64
}

/// Writes the artifact to `path` through a temporary file in the same directory, then renames
/// it into place, so a failure never leaves a half-written file under the final name.
/// Returns the file size.
pub fn write(path: &Path, mut contents: Contents<'_>) -> std::io::Result<u64> {
    let mut offset = 0u64;
    contents.meta.tensors = contents
        .tensors
        .iter()
        .map(|t| {
            let entry = TensorEntry {
                name: t.name.to_owned(),
                format: t.format,
                layout: t.layout,
                shape: t.shape.to_vec(),
                offset,
                len: t.bytes.len() as u64,
            };
            offset = pad_to_align(offset + t.bytes.len() as u64);
            entry
        })
        .collect();
    let weights_len = offset;
    let meta = serde_json::to_vec(&contents.meta).map_err(std::io::Error::other)?;

    let mut weights_crc = crc32fast::Hasher::new();
    let zeros = [0u8; ALIGN];
    for t in contents.tensors {
        weights_crc.update(t.bytes);
        weights_crc
            .update(&zeros[..(pad_to_align(t.bytes.len() as u64) - t.bytes.len() as u64) as usize]);
    }
    let sections = [
        (SectionKind::Meta, meta.len() as u64, crc32fast::hash(&meta)),
        (
            SectionKind::Tokenizer,
            contents.tokenizer.len() as u64,
            crc32fast::hash(contents.tokenizer),
        ),
        (SectionKind::Weights, weights_len, weights_crc.finalize()),
    ];
    let mut table = Vec::with_capacity(sections.len() * SECTION_ENTRY_LEN);
    let mut at = pad_to_align((HEADER_LEN + sections.len() * SECTION_ENTRY_LEN) as u64);
    let mut starts = Vec::new();
    for (kind, len, crc) in sections {
        starts.push(at);
        table.extend_from_slice(&(kind as u32).to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        table.extend_from_slice(&at.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&crc.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
        at = pad_to_align(at + len);
    }
    let file_len = starts[2] + weights_len;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&ENDIAN_MARK.to_le_bytes());
    header[16..20].copy_from_slice(&(sections.len() as u32).to_le_bytes());
    header[24..32].copy_from_slice(&file_len.to_le_bytes());
    header[32..36].copy_from_slice(&crc32fast::hash(&table).to_le_bytes());

    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut out = Counting {
        inner: BufWriter::with_capacity(1 << 20, tmp.as_file()),
        written: 0,
    };
    out.put(&header)?;
    out.put(&table)?;
    let bodies: [&[u8]; 2] = [&meta, contents.tokenizer];
    for (&start, body) in starts.iter().zip(bodies) {
        out.zeros_to(start)?;
        out.put(body)?;
    }
    out.zeros_to(starts[2])?;
    for t in contents.tensors {
        out.put(t.bytes)?;
        out.zeros_to(pad_to_align(out.written))?;
    }
    out.inner.flush()?;
    drop(out);
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(file_len)
}

/// A writer that knows how far it got, for padding to section offsets.
struct Counting<W: Write> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn zeros_to(&mut self, offset: u64) -> std::io::Result<()> {
        let zeros = [0u8; ALIGN];
        while self.written < offset {
            let n = (offset - self.written).min(ALIGN as u64) as usize;
            self.put(&zeros[..n])?;
        }
        Ok(())
    }
}
