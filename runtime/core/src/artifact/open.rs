//! An artifact held in memory: loaded from a file into anonymous (huge-page) memory, mapped
//! from it, borrowed from `'static` bytes, or read.

use std::path::Path;

use memmap2::Mmap;

use super::read::{check_cpu_features, parse, ArtifactError, Parsed};
use super::{Metadata, TensorEntry};

/// How a file's bytes come into memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residency {
    /// Read into anonymous memory, advised for transparent huge pages on Linux: decode streams
    /// every weight once per token, and 2 MiB pages spare it a TLB miss (in a VM, a nested page
    /// walk) every 4 KiB, as the page cache's pages of a mapped file would cost it. Resident
    /// memory is the file's size either way, as the memory plan counts it.
    #[default]
    Load,
    /// Mapped from the file: nothing copied, pages shared with the page cache and with other
    /// processes mapping it, and only touched pages resident.
    Map,
}

/// `len` bytes of `file` in fresh anonymous memory, read-only once filled.
fn read_anonymous(file: &mut std::fs::File, len: u64) -> std::io::Result<Mmap> {
    use std::io::Read;
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("larger than memory"))?;
    let mut anon = memmap2::MmapMut::map_anon(len)?;
    // Advice only: a kernel without transparent huge pages keeps 4 KiB ones.
    #[cfg(target_os = "linux")]
    let _ = anon.advise(memmap2::Advice::HugePage);
    file.read_exact(&mut anon[..len])?;
    let mut rest = [0u8; 1];
    if file.read(&mut rest)? != 0 {
        return Err(std::io::Error::other("the file grew while it was read"));
    }
    anon.make_read_only()
}

enum Bytes {
    Mapped(Mmap),
    Static(&'static [u8]),
    /// Backed by u64 words so f32 tensors are aligned.
    Owned(Vec<u64>, usize),
}

/// A validated artifact; weights are used where they lie, never repacked.
pub struct Artifact {
    bytes: Bytes,
    parsed: Parsed,
}

impl Artifact {
    /// Maps `path` and validates it: nothing is copied, and the pages are the page cache's.
    pub fn open(path: &Path) -> Result<Artifact, ArtifactError> {
        Artifact::from_file(path, Residency::Map)
    }

    /// Reads `path` into anonymous memory and validates it (see [`Residency::Load`]).
    pub fn load(path: &Path) -> Result<Artifact, ArtifactError> {
        Artifact::from_file(path, Residency::Load)
    }

    /// Opens `path` with its bytes brought in as `residency` says.
    pub fn from_file(path: &Path, residency: Residency) -> Result<Artifact, ArtifactError> {
        let io = |source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        // Mapping a directory fails with a baffling "No such device".
        if meta.is_dir() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "is a directory, not a .kiln artifact",
            )));
        }
        let bytes = match residency {
            // SAFETY: the mapping is read-only and the file is not written by kiln while
            // mapped; every offset read from it is bounds-checked by `parse` before use.
            Residency::Map => Bytes::Mapped(unsafe { Mmap::map(&file) }.map_err(io)?),
            // An empty mapping is refused; `parse` names the real problem (too short) instead.
            Residency::Load if meta.len() == 0 => Bytes::Owned(Vec::new(), 0),
            Residency::Load => Bytes::Mapped(read_anonymous(&mut file, meta.len()).map_err(io)?),
        };
        Artifact::new(bytes).map_err(|e| ArtifactError::File {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Uses bytes that live for the whole program (e.g. `include_bytes!` in firmware).
    pub fn from_static(bytes: &'static [u8]) -> Result<Artifact, ArtifactError> {
        Artifact::new(Bytes::Static(bytes))
    }

    /// Reads the whole artifact from a reader (for sources that cannot be mapped).
    pub fn from_reader(mut reader: impl std::io::Read) -> Result<Artifact, ArtifactError> {
        let mut raw = Vec::new();
        reader
            .read_to_end(&mut raw)
            .map_err(|source| ArtifactError::Io {
                path: "<reader>".into(),
                source,
            })?;
        let mut words = vec![0u64; raw.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..raw.len()].copy_from_slice(&raw);
        Artifact::new(Bytes::Owned(words, raw.len()))
    }

    fn new(bytes: Bytes) -> Result<Artifact, ArtifactError> {
        let parsed = parse(bytes_of(&bytes))?;
        check_cpu_features(&parsed.meta)?;
        Ok(Artifact { bytes, parsed })
    }

    pub fn meta(&self) -> &Metadata {
        &self.parsed.meta
    }

    /// What identifies this artifact's bytes (see [`Parsed::identity`]).
    pub fn identity(&self) -> u32 {
        self.parsed.identity
    }

    /// The tokenizer section.
    pub fn tokenizer_bytes(&self) -> &[u8] {
        &bytes_of(&self.bytes)[self.parsed.tokenizer.clone()]
    }

    /// The raw bytes of tensor `entry` (an entry of [`Artifact::meta`]).
    pub fn tensor(&self, entry: &TensorEntry) -> &[u8] {
        super::tensor_bytes(&bytes_of(&self.bytes)[self.parsed.weights.clone()], entry)
    }

    /// A session over this artifact's weights.
    pub fn session(
        &self,
        opts: crate::exec::SessionOptions,
    ) -> Result<crate::exec::Session<'_>, crate::exec::SessionError> {
        let weights = &bytes_of(&self.bytes)[self.parsed.weights.clone()];
        crate::exec::Session::new(&self.parsed.meta, weights, opts)
    }

    /// A session over this artifact whose buffers live in `arena`, sized by the caller with
    /// [`crate::exec::MemoryPlan::session_bytes`].
    pub fn session_in<'s>(
        &'s self,
        opts: crate::exec::SessionOptions,
        arena: &'s mut [f32],
    ) -> Result<crate::exec::Session<'s>, crate::exec::SessionError> {
        let weights = &bytes_of(&self.bytes)[self.parsed.weights.clone()];
        crate::exec::Session::with_arena(&self.parsed.meta, weights, opts, arena)
    }

    /// Total size of the artifact in bytes.
    pub fn len(&self) -> usize {
        bytes_of(&self.bytes).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn bytes_of(bytes: &Bytes) -> &[u8] {
    match bytes {
        Bytes::Mapped(m) => m,
        Bytes::Static(s) => s,
        Bytes::Owned(words, len) => &bytemuck::cast_slice(words)[..*len],
    }
}
