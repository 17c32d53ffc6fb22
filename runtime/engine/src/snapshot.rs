//! Prompt snapshots: the KV cache of a conversation's prefix (a system prompt, the tools)
//! saved to a file and loaded into a fresh session without running it again, so an assistant
//! answers at once after the device wakes.
//!
//! The file (version 1, little-endian): the magic `KILNSNAP`, the format version (u32), the
//! length of a JSON header (u32), the header — the artifact's identity, the model's name, the
//! cache's type and shape, the token ids — then for keys and then values, for each layer and
//! KV head, the rows of the cached positions; last a CRC-32 of everything before it. A snapshot
//! is refused for another artifact, another cache type or shape, a context too short for it, a
//! wrong version, or bytes that fail the checksum; it is written to a temporary file that is
//! renamed over the old one, so a crash leaves the old file or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_runtime::exec::KvType;
use kiln_runtime::model::ModelFacts;
use serde::{Deserialize, Serialize};

use crate::decoder::KvCache;

const MAGIC: &[u8; 8] = b"KILNSNAP";
const VERSION: u32 = 1;
/// Magic, version and header length.
const PREAMBLE: usize = 16;

/// Why a snapshot could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a kiln prompt snapshot")]
    BadMagic { path: PathBuf },
    #[error(
        "{path}: snapshot format version {found}, this kiln reads version {VERSION}; save it again"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: the snapshot is corrupt or truncated ({what})")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: the snapshot was made {what}; save it again for this one")]
    Mismatch { path: PathBuf, what: String },
    #[error("this backend keeps its KV cache out of reach (snapshots need kiln's own executor and a .kiln artifact)")]
    NotNative,
}

/// What a snapshot says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    /// [`kiln_runtime::artifact::Parsed::identity`] of the artifact it was made with.
    artifact: u32,
    model: String,
    kv_type: String,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The token ids whose keys and values follow, in order.
    tokens: Vec<u32>,
}

/// The model a snapshot belongs to: its artifact and the facts that shape its cache.
pub struct Binding<'a> {
    pub artifact: u32,
    pub facts: &'a ModelFacts,
}

/// Bytes of one cached row (a position of one head) in a cache of `kv_type`.
fn row_bytes(kv_type: KvType, facts: &ModelFacts) -> usize {
    facts.head_dim * kv_type.bytes()
}

/// The byte ranges of positions `0..n` in a cache of `context` positions: one per (layer, KV
/// head), in the order the file stores them.
fn prefix_ranges(
    facts: &ModelFacts,
    kv_type: KvType,
    context: usize,
    n: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let row = row_bytes(kv_type, facts);
    let heads = facts.layers * facts.kv_heads;
    (0..heads).map(move |h| {
        let start = h * context * row;
        start..start + n * row
    })
}

/// Writes the first `tokens.len()` positions of `cache` (which holds them) to `path`.
pub fn save(
    path: &Path,
    binding: &Binding<'_>,
    cache: &KvCache<'_>,
    tokens: &[u32],
) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let facts = binding.facts;
    let header = Header {
        artifact: binding.artifact,
        model: facts.name.clone(),
        kv_type: cache.kv_type.name().to_owned(),
        layers: facts.layers,
        kv_heads: facts.kv_heads,
        head_dim: facts.head_dim,
        tokens: tokens.to_vec(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| io(std::io::Error::other(e)))?;
    let mut bytes = Vec::with_capacity(PREAMBLE + json.len() + 2 * cache.keys.len() + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&json);
    for part in [&*cache.keys, &*cache.values] {
        for range in prefix_ranges(facts, cache.kv_type, cache.context, tokens.len()) {
            bytes.extend_from_slice(&part[range]);
        }
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(&bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Reads `path` into `cache` (whose session must be fresh, or may be overwritten) and returns
/// the token ids it holds.
pub fn load(
    path: &Path,
    binding: &Binding<'_>,
    cache: KvCache<'_>,
) -> Result<Vec<u32>, SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |what: &str| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        what: what.to_owned(),
    };
    if bytes.len() < PREAMBLE + 4 || &bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = u32_at(8);
    if version != VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) {
        return Err(corrupt("checksum mismatch"));
    }
    let json_len = u32_at(12) as usize;
    let json = body
        .get(PREAMBLE..PREAMBLE.saturating_add(json_len))
        .ok_or_else(|| corrupt("the header runs past the end"))?;
    let header: Header =
        serde_json::from_slice(json).map_err(|e| corrupt(&format!("header: {e}")))?;
    let facts = binding.facts;
    let mismatch = |what: String| SnapshotError::Mismatch {
        path: path.to_path_buf(),
        what,
    };
    if header.artifact != binding.artifact {
        return Err(mismatch(format!(
            "with another artifact (of {})",
            header.model
        )));
    }
    if header.kv_type != cache.kv_type.name() {
        return Err(mismatch(format!(
            "with a {} KV cache, this session's is {}",
            header.kv_type,
            cache.kv_type.name()
        )));
    }
    if (header.layers, header.kv_heads, header.head_dim)
        != (facts.layers, facts.kv_heads, facts.head_dim)
    {
        return Err(mismatch("for another cache shape".into()));
    }
    let n = header.tokens.len();
    if n > cache.context {
        return Err(mismatch(format!(
            "of {n} tokens, more than this session's {}-token context",
            cache.context
        )));
    }
    let mut data = &body[PREAMBLE + json_len..];
    let expected = 2 * facts.layers * facts.kv_heads * n * row_bytes(cache.kv_type, facts);
    if data.len() != expected {
        return Err(corrupt(&format!(
            "{} bytes of cache for {n} tokens, expected {expected}",
            data.len()
        )));
    }
    for part in [cache.keys, cache.values] {
        for range in prefix_ranges(facts, cache.kv_type, cache.context, n) {
            let (rows, rest) = data.split_at(range.len());
            part[range].copy_from_slice(rows);
            data = rest;
        }
    }
    *cache.position = n;
    Ok(header.tokens)
}
