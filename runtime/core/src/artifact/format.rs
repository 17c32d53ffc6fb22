//! The `.kiln` container layout: header, section table and the typed metadata it carries.
//!
//! ```text
//! 0   magic "KILNART\0"        8   format version u32   12  endianness mark u32
//! 16  section count u32        20  flags u32 (0)        24  file length u64
//! 32  crc32 of the section table u32                    36..64 zero
//! 64  section table: per section kind u32, 0 u32, offset u64, length u64, crc32 u32, 0 u32
//! ... sections, each starting on a 64-byte boundary
//! ```
//! All integers are little-endian; offsets are 64-bit so artifacts may exceed 4 GiB.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::model::ModelFacts;
use crate::quant::Format;

fn is_rows(layout: &Layout) -> bool {
    *layout == Layout::Rows
}

pub const MAGIC: [u8; 8] = *b"KILNART\0";
/// Bumped on any change a reader of the previous version would misread (2: tensors carry a
/// [`Layout`]; 3: `q4_0` in the aarch64 layouts is stored XOR `0x88`,
/// [`Layout::flips_nibbles`]).
pub const FORMAT_VERSION: u32 = 3;
/// The first version whose aarch64-layout `q4_0` nibbles are flipped.
pub const FLIPPED_NIBBLES_SINCE: u32 = 3;
/// The oldest version this runtime still reads (version 1 artifacts hold ggml rows only).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Written as a little-endian u32; a reader that sees other bytes was handed a foreign file.
pub const ENDIAN_MARK: u32 = 0x0102_0304;
pub const HEADER_LEN: usize = 64;
pub const SECTION_ENTRY_LEN: usize = 32;
/// Alignment of every section, and of every tensor inside the weights section.
pub const ALIGN: usize = 64;

/// What a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SectionKind {
    /// JSON [`Metadata`].
    Meta = 1,
    /// The tokenizer, in its own versioned binary encoding.
    Tokenizer = 2,
    /// Tensor bytes, each tensor 64-byte aligned.
    Weights = 3,
}

impl SectionKind {
    pub const ALL: [SectionKind; 3] = [
        SectionKind::Meta,
        SectionKind::Tokenizer,
        SectionKind::Weights,
    ];

    pub fn from_u32(v: u32) -> Option<SectionKind> {
        SectionKind::ALL.into_iter().find(|k| *k as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Meta => "meta",
            SectionKind::Tokenizer => "tokenizer",
            SectionKind::Weights => "weights",
        }
    }
}

/// Where one tensor lies inside the weights section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub format: Format,
    /// How a block format's rows are arranged (absent: ggml's rows).
    #[serde(default, skip_serializing_if = "is_rows")]
    pub layout: Layout,
    /// Row-major; the last dimension is the row length.
    pub shape: Vec<usize>,
    /// Byte offset from the start of the weights section (a multiple of [`ALIGN`]).
    pub offset: u64,
    pub len: u64,
}

impl TensorEntry {
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)]
            .iter()
            .product()
    }
}

/// A working buffer of the executor: `width` floats per token of a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferDecl {
    pub name: String,
    pub width: usize,
}

/// Index of a buffer in [`Graph::buffers`].
pub type BufId = usize;
/// Index of a tensor in [`Metadata::tensors`].
pub type TensorId = usize;

/// One step of the decoder, applied to every token of a batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `out[t] = table[token[t]]`.
    Embed { table: TensorId, out: BufId },
    /// `out = x / rms(x) * weight`, epsilon from the model facts.
    RmsNorm {
        input: BufId,
        weight: TensorId,
        out: BufId,
    },
    /// `out = input · weightᵀ` (weight is `[out, in]`).
    MatMul {
        input: BufId,
        weight: TensorId,
        out: BufId,
    },
    /// Rotate-half RoPE in place on `heads` heads of `head_dim`, at each token's position.
    Rope {
        buf: BufId,
        heads: usize,
        inv_freq: TensorId,
    },
    /// Appends `k`, `v` to layer `layer`'s cache and attends with `q` (causal, grouped-query).
    Attention {
        layer: usize,
        q: BufId,
        k: BufId,
        v: BufId,
        out: BufId,
    },
    /// `out = silu(gate) * up`.
    SwiGlu { gate: BufId, up: BufId, out: BufId },
    /// `acc += input`.
    Add { acc: BufId, input: BufId },
    /// The output projection, computed only for the tokens whose logits are wanted.
    Logits { input: BufId, weight: TensorId },
}

/// The decoder as a flat list of ops over named buffers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub buffers: Vec<BufferDecl>,
    pub ops: Vec<Op>,
}

/// Everything in the meta section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Tool and version that wrote the artifact.
    pub producer: String,
    pub facts: ModelFacts,
    /// CPU features the kernels were compiled to assume (e.g. `"avx2"`, `"dotprod"`).
    pub required_cpu_features: Vec<String>,
    pub tensors: Vec<TensorEntry>,
    pub graph: Graph,
}
