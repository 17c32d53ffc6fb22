//! Validating reader: header, version, section checksums, metadata and tensor bounds.

use alloc::format;
use alloc::string::{String, ToString};
use core::ops::Range;

use super::format::*;
use crate::model::{ModelFacts, MAX_WIDTH};
use crate::quant::Format;

/// Why an artifact was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[cfg(feature = "std")]
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[cfg(feature = "std")]
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: alloc::boxed::Box<ArtifactError>,
    },
    #[error("not a kiln artifact (wrong magic)")]
    BadMagic,
    #[error("artifact format version {found} is not supported by this runtime (it reads versions {oldest} to {supported}); recompile the model with a matching kiln")]
    Version {
        found: u32,
        oldest: u32,
        supported: u32,
    },
    #[error("artifact was written with a different byte order")]
    Endianness,
    #[error("truncated: {what} needs bytes up to {need}, the file has {have}")]
    Truncated { what: String, need: u64, have: u64 },
    #[error("section table is corrupt (checksum mismatch)")]
    TableChecksum,
    #[error("{section} section is corrupt (checksum mismatch)")]
    SectionChecksum { section: &'static str },
    #[error("{what}")]
    Malformed { what: String },
    #[error("the {0} section is missing")]
    MissingSection(&'static str),
    #[error("metadata: {0}")]
    Meta(String),
    #[error("tensor {name}: {what}")]
    Tensor { name: String, what: String },
    #[error("the buffer holds {given} bytes, the artifact needs {needed}")]
    BufferTooSmall { needed: u64, given: u64 },
    #[error("reading the artifact failed: {0}")]
    Read(String),
    #[error("this CPU lacks the feature {feature}, which the artifact was compiled for; compile for this target instead")]
    MissingCpuFeature { feature: String },
}

/// What [`parse`] found: the metadata and where the other sections lie in the bytes.
pub struct Parsed {
    pub meta: Metadata,
    /// CRC-32 of the header and the section table, which hold the file's length and every
    /// section's own CRC: what a KV-cache snapshot is bound to.
    pub identity: u32,
    pub tokenizer: Range<usize>,
    pub weights: Range<usize>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn need(bytes: &[u8], end: u64, what: &str) -> Result<(), ArtifactError> {
    if end > bytes.len() as u64 {
        return Err(ArtifactError::Truncated {
            what: what.to_string(),
            need: end,
            have: bytes.len() as u64,
        });
    }
    Ok(())
}

/// Parses and checks everything except CPU features (see [`check_cpu_features`]).
pub fn parse(bytes: &[u8]) -> Result<Parsed, ArtifactError> {
    need(bytes, HEADER_LEN as u64, "the header")?;
    if bytes[..8] != MAGIC {
        return Err(ArtifactError::BadMagic);
    }
    if le_u32(bytes, 12) != ENDIAN_MARK {
        return Err(ArtifactError::Endianness);
    }
    let version = le_u32(bytes, 8);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(ArtifactError::Version {
            found: version,
            oldest: OLDEST_FORMAT_VERSION,
            supported: FORMAT_VERSION,
        });
    }
    let count = le_u32(bytes, 16) as usize;
    let file_len = le_u64(bytes, 24);
    need(bytes, file_len, "the length recorded in the header")?;
    if file_len != bytes.len() as u64 {
        return Err(ArtifactError::Malformed {
            what: format!(
                "header says {file_len} bytes, the file has {} (trailing data?)",
                bytes.len()
            ),
        });
    }
    if count > 64 {
        return Err(ArtifactError::Malformed {
            what: format!("{count} sections is implausible"),
        });
    }
    let table_end = HEADER_LEN + count * SECTION_ENTRY_LEN;
    need(bytes, table_end as u64, "the section table")?;
    if crc32fast::hash(&bytes[HEADER_LEN..table_end]) != le_u32(bytes, 32) {
        return Err(ArtifactError::TableChecksum);
    }
    let (mut meta, mut tokenizer, mut weights) = (None, None, None);
    for i in 0..count {
        let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
        let kind = le_u32(bytes, at);
        let Some(kind) = SectionKind::from_u32(kind) else {
            return Err(ArtifactError::Malformed {
                what: format!("unknown section kind {kind}"),
            });
        };
        let (offset, len) = (le_u64(bytes, at + 8), le_u64(bytes, at + 16));
        let end = offset
            .checked_add(len)
            .ok_or_else(|| ArtifactError::Malformed {
                what: format!("{} section bounds overflow", kind.name()),
            })?;
        need(bytes, end, &format!("the {} section", kind.name()))?;
        if offset % ALIGN as u64 != 0 {
            return Err(ArtifactError::Malformed {
                what: format!("{} section is not 64-byte aligned", kind.name()),
            });
        }
        let range = offset as usize..end as usize;
        if crc32fast::hash(&bytes[range.clone()]) != le_u32(bytes, at + 24) {
            return Err(ArtifactError::SectionChecksum {
                section: kind.name(),
            });
        }
        let slot = match kind {
            SectionKind::Meta => &mut meta,
            SectionKind::Tokenizer => &mut tokenizer,
            SectionKind::Weights => &mut weights,
        };
        if slot.replace(range).is_some() {
            return Err(ArtifactError::Malformed {
                what: format!("two {} sections", kind.name()),
            });
        }
    }
    let meta = meta.ok_or(ArtifactError::MissingSection("meta"))?;
    let tokenizer = tokenizer.ok_or(ArtifactError::MissingSection("tokenizer"))?;
    let weights = weights.ok_or(ArtifactError::MissingSection("weights"))?;
    let meta: Metadata =
        serde_json::from_slice(&bytes[meta]).map_err(|e| ArtifactError::Meta(e.to_string()))?;
    check_facts(&meta.facts)?;
    check_tensors(&meta, &bytes[weights.clone()], version)?;
    check_graph(&meta)?;
    Ok(Parsed {
        meta,
        identity: crc32fast::hash(&bytes[..table_end]),
        tokenizer,
        weights,
    })
}

fn check_tensors(meta: &Metadata, weights: &[u8], version: u32) -> Result<(), ArtifactError> {
    for t in &meta.tensors {
        let bad = |what: String| ArtifactError::Tensor {
            name: t.name.clone(),
            what,
        };
        // No format takes more than 4 bytes a value: bounding the f32 size first keeps the
        // products below from overflowing (and wrapping to a small length) on absurd shapes.
        let expected = t
            .shape
            .iter()
            .try_fold(4usize, |acc, &d| acc.checked_mul(d))
            .and_then(|_| t.format.row_bytes(t.cols()))
            .and_then(|r| r.checked_mul(t.rows()));
        if expected.map(|e| e as u64) != Some(t.len) {
            return Err(bad(format!(
                "{} bytes do not hold shape {:?} as {}",
                t.len,
                t.shape,
                t.format.name()
            )));
        }
        if t.offset % ALIGN as u64 != 0 {
            return Err(bad("not 64-byte aligned".into()));
        }
        if t.layout.for_format(t.format) != t.layout {
            return Err(bad(format!(
                "layout {} is for block formats, not {}",
                t.layout.name(),
                t.format.name()
            )));
        }
        if version < FLIPPED_NIBBLES_SINCE && t.layout.flips_nibbles(t.format) {
            return Err(bad(format!(
                "{} in layout {} from artifact format {version} stores its nibbles as this \
                 runtime (format {FORMAT_VERSION}) no longer reads them: compile the model again",
                t.format.name(),
                t.layout.name()
            )));
        }
        if t.offset
            .checked_add(t.len)
            .is_none_or(|end| end > weights.len() as u64)
        {
            return Err(bad("lies past the end of the weights section".into()));
        }
    }
    Ok(())
}

/// The model's facts, each within its bounds and consistent with the others.
fn check_facts(f: &ModelFacts) -> Result<(), ArtifactError> {
    f.check()
        .map_err(|what| ArtifactError::Meta(format!("model facts: {what}")))
}

/// Every buffer and tensor an op names must exist, with widths that fit the model.
fn check_graph(meta: &Metadata) -> Result<(), ArtifactError> {
    let (g, f) = (&meta.graph, &meta.facts);
    let bad = |what: String| ArtifactError::Meta(what);
    let buf = |b: usize| {
        g.buffers
            .get(b)
            .map(|d| d.width)
            .ok_or_else(|| bad(format!("op names buffer {b}, which does not exist")))
    };
    let tensor = |t: usize| {
        meta.tensors
            .get(t)
            .ok_or_else(|| bad(format!("op names tensor {t}, which does not exist")))
    };
    let matrix = |t: usize, rows: usize, cols: usize| -> Result<(), ArtifactError> {
        let e = tensor(t)?;
        if e.shape.len() != 2 || e.rows() != rows || e.cols() != cols {
            return Err(bad(format!(
                "tensor {} has shape {:?}, the graph needs [{rows}, {cols}]",
                e.name, e.shape
            )));
        }
        Ok(())
    };
    let vector = |t: usize, len: usize| -> Result<(), ArtifactError> {
        let e = tensor(t)?;
        if e.shape != [len] || e.format != Format::F32 {
            return Err(bad(format!(
                "tensor {} must be f32 [{len}], is {} {:?}",
                e.name,
                e.format.name(),
                e.shape
            )));
        }
        Ok(())
    };
    let same = |a: usize, b: usize| -> Result<(), ArtifactError> {
        if a != b {
            return Err(bad(format!(
                "buffer widths {a} and {b} differ where the op needs them equal"
            )));
        }
        Ok(())
    };
    // The shape every forward pass needs: embed first, logits last and once, one attention
    // per layer.
    if !matches!(g.ops.first(), Some(Op::Embed { .. })) {
        return Err(bad("the graph does not start with an embedding".into()));
    }
    let logits = g
        .ops
        .iter()
        .filter(|op| matches!(op, Op::Logits { .. }))
        .count();
    if logits != 1 || !matches!(g.ops.last(), Some(Op::Logits { .. })) {
        return Err(bad(format!(
            "the graph must end with its one logits op (it has {logits})"
        )));
    }
    let mut attended = alloc::vec![false; f.layers];
    for op in &g.ops {
        if let Op::Attention { layer, .. } = *op {
            match attended.get_mut(layer) {
                Some(seen @ false) => *seen = true,
                Some(true) => {
                    return Err(bad(format!("layer {layer} has two attention ops")));
                }
                None => {
                    return Err(bad(format!(
                        "attention names layer {layer} of {}",
                        f.layers
                    )));
                }
            }
        }
    }
    if let Some(layer) = attended.iter().position(|seen| !seen) {
        return Err(bad(format!(
            "layer {layer} of {} has no attention op",
            f.layers
        )));
    }
    if let Some(b) = g
        .buffers
        .iter()
        .find(|b| b.width == 0 || b.width > MAX_WIDTH)
    {
        return Err(bad(format!(
            "a buffer of width {} is outside 1..={MAX_WIDTH}",
            b.width
        )));
    }
    let distinct = |ids: &[usize]| -> Result<(), ArtifactError> {
        for (i, a) in ids.iter().enumerate() {
            if ids[i + 1..].contains(a) {
                return Err(bad(format!("an op reads and writes buffer {a} at once")));
            }
        }
        Ok(())
    };
    for op in &g.ops {
        match *op {
            Op::RmsNorm { input, out, .. } | Op::MatMul { input, out, .. } => {
                distinct(&[input, out])?
            }
            Op::Attention { q, k, v, out, .. } => distinct(&[q, k, v, out])?,
            Op::SwiGlu { gate, up, out } => distinct(&[gate, up, out])?,
            Op::Add { acc, input } => distinct(&[acc, input])?,
            Op::Embed { .. } | Op::Rope { .. } | Op::Logits { .. } => {}
        }
        match *op {
            Op::Embed { table, out } => matrix(table, f.vocab_size, buf(out)?)?,
            Op::RmsNorm { input, weight, out } => {
                same(buf(input)?, buf(out)?)?;
                vector(weight, buf(input)?)?;
            }
            Op::MatMul { input, weight, out } => matrix(weight, buf(out)?, buf(input)?)?,
            Op::Rope {
                buf: b,
                heads,
                inv_freq,
            } => {
                same(buf(b)?, heads * f.head_dim)?;
                vector(inv_freq, f.head_dim / 2)?;
            }
            Op::Attention { q, k, v, out, .. } => {
                same(buf(q)?, f.heads * f.head_dim)?;
                same(buf(out)?, f.heads * f.head_dim)?;
                same(buf(k)?, f.kv_heads * f.head_dim)?;
                same(buf(v)?, f.kv_heads * f.head_dim)?;
            }
            Op::SwiGlu { gate, up, out } => {
                same(buf(gate)?, buf(up)?)?;
                same(buf(gate)?, buf(out)?)?;
            }
            Op::Add { acc, input } => same(buf(acc)?, buf(input)?)?,
            Op::Logits { input, weight } => matrix(weight, f.vocab_size, buf(input)?)?,
        }
    }
    Ok(())
}

/// Refuses an artifact whose required CPU features this machine lacks.
pub fn check_cpu_features(meta: &Metadata) -> Result<(), ArtifactError> {
    for feature in &meta.required_cpu_features {
        if !crate::cpu::has_feature(feature) {
            return Err(ArtifactError::MissingCpuFeature {
                feature: feature.clone(),
            });
        }
    }
    Ok(())
}

/// A tensor's bytes, as validated by [`parse`].
pub fn tensor_bytes<'a>(weights: &'a [u8], entry: &TensorEntry) -> &'a [u8] {
    &weights[entry.offset as usize..(entry.offset + entry.len) as usize]
}
