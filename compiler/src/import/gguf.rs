//! GGUF (v2/v3) reader: metadata and tensor table of a llama.cpp model file, bounds-checked.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use kiln_runtime::quant::Format;
use memmap2::Mmap;

use super::ImportError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// Where one tensor's bytes are in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// ggml order: `dims[0]` is the fastest-varying (the row length).
    pub dims: Vec<u64>,
    pub format: Format,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
}

impl GgufFile {
    /// Maps and parses `path`; every length and offset is checked against the file size.
    pub fn open(path: &Path) -> Result<GgufFile, ImportError> {
        let io = |e| ImportError::io(path, e);
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; kiln never writes model files, and a file changed
        // underneath us by another process can only produce wrong numbers, which the
        // bounds checks below keep from becoming out-of-range reads.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut r = Reader {
            bytes: &map,
            pos: 0,
            path,
        };
        if r.take(4)? != MAGIC {
            return Err(r.bad("not a GGUF file (wrong magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(&format!("GGUF version {version} is not supported (2 or 3)")));
        }
        let tensor_count = r.u64()?;
        let kv_count = r.u64()?;
        // A tensor info takes at least 32 bytes and a key-value pair at least 13: counts the rest
        // of the file cannot hold are corrupt, and must not drive reads of the tensor data.
        let rest = (map.len() - r.pos) as u128;
        if u128::from(tensor_count) * 32 + u128::from(kv_count) * 13 > rest {
            return Err(r.bad(&format!(
                "{tensor_count} tensors and {kv_count} metadata entries cannot fit in the rest of the file (truncated or corrupt)"
            )));
        }
        let mut metadata = HashMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| r.bad("general.alignment is not a power of two"))?,
        };
        let mut infos = Vec::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.bad(&format!(
                    "tensor {name:?}: {n_dims} dimensions (1 to 4 supported)"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, ggml_type, offset));
        }
        let data_start = r.pos.div_ceil(alignment as usize) * alignment as usize;
        let mut tensors = HashMap::new();
        for (name, dims, ggml_type, offset) in infos {
            let format = ggml_format(ggml_type).ok_or_else(|| {
                r.bad(&format!(
                    "tensor {name}: ggml type {ggml_type} ({}) is not supported (kiln reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
                    unsupported_type_name(ggml_type)
                ))
            })?;
            let len = tensor_bytes(&dims, format).ok_or_else(|| {
                r.bad(&format!(
                    "tensor {name}: shape {dims:?} does not fit {}",
                    format.name()
                ))
            })?;
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .filter(|s| s.checked_add(len).is_some_and(|end| end <= map.len()))
                .ok_or_else(|| ImportError::Corrupt {
                    path: path.to_path_buf(),
                    what: format!("tensor {name} lies past the end of the file (truncated?)"),
                })?;
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    format,
                    start,
                    len,
                },
            );
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.start + info.len]
    }

    /// A metadata value, or an error naming the missing key.
    pub fn require(&self, key: &str) -> Result<&Value, ImportError> {
        self.metadata.get(key).ok_or_else(|| ImportError::Corrupt {
            path: self.path.clone(),
            what: format!("metadata key {key} is missing"),
        })
    }

    /// A metadata string, if present and a string.
    pub fn string(&self, key: &str) -> Option<&str> {
        match self.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// A required non-negative integer.
    pub fn require_u64(&self, key: &str) -> Result<u64, ImportError> {
        self.require(key)?
            .as_u64()
            .ok_or_else(|| ImportError::Corrupt {
                path: self.path.clone(),
                what: format!("metadata key {key} is not a non-negative integer"),
            })
    }

    /// A required number.
    pub fn require_f64(&self, key: &str) -> Result<f64, ImportError> {
        self.require(key)?
            .as_f64()
            .ok_or_else(|| ImportError::Corrupt {
                path: self.path.clone(),
                what: format!("metadata key {key} is not a number"),
            })
    }

    /// A string array (missing → `None`; wrong type → error).
    pub fn string_array(&self, key: &str) -> Result<Option<Vec<String>>, ImportError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.wrong_type(key, "an array of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.wrong_type(key, "an array of strings")),
        }
    }

    /// An integer array (missing → `None`; wrong type → error).
    pub fn i32_array(&self, key: &str) -> Result<Option<Vec<i32>>, ImportError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match *v {
                    Value::I32(x) => Ok(x),
                    Value::U32(x) => {
                        i32::try_from(x).map_err(|_| self.wrong_type(key, "an array of i32"))
                    }
                    _ => Err(self.wrong_type(key, "an array of i32")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.wrong_type(key, "an array of i32")),
        }
    }

    fn wrong_type(&self, key: &str, want: &str) -> ImportError {
        ImportError::Corrupt {
            path: self.path.clone(),
            what: format!("metadata key {key} is not {want}"),
        }
    }
}

/// ggml's type ids of the formats kiln reads (`enum ggml_type`).
pub const GGML_TYPES: [(u32, Format); 11] = [
    (0, Format::F32),
    (1, Format::F16),
    (2, Format::Q4_0),
    (3, Format::Q4_1),
    (6, Format::Q5_0),
    (7, Format::Q5_1),
    (8, Format::Q8_0),
    (12, Format::Q4K),
    (13, Format::Q5K),
    (14, Format::Q6K),
    (30, Format::Bf16),
];

fn ggml_format(ggml_type: u32) -> Option<Format> {
    GGML_TYPES
        .iter()
        .find(|(id, _)| *id == ggml_type)
        .map(|&(_, f)| f)
}

/// ggml's name of a type id kiln does not read, for the error that refuses it.
fn unsupported_type_name(ggml_type: u32) -> &'static str {
    match ggml_type {
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        // Retired ids (Q4_2, Q4_3, Q5_2, the Q4_0 repacks) and ids newer than kiln knows.
        _ => "an unknown type",
    }
}

fn tensor_bytes(dims: &[u64], format: Format) -> Option<usize> {
    let row = usize::try_from(*dims.first()?).ok()?;
    let rows = dims[1..]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))?;
    // No format takes more than 4 bytes a value: bounding the f32 size first keeps
    // `row_bytes` from overflowing (and wrapping to a small length) on absurd dimensions.
    row.checked_mul(rows)?.checked_mul(4)?;
    format.row_bytes(row)?.checked_mul(rows)
}

/// Cursor over the mapped header with errors that name the file and offset.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

/// Nesting limit for arrays of arrays: real files use one level.
const MAX_DEPTH: usize = 4;

impl Reader<'_> {
    fn bad(&self, what: &str) -> ImportError {
        ImportError::Corrupt {
            path: self.path.to_path_buf(),
            what: format!("{what} (at byte {})", self.pos),
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], ImportError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.bad(&format!(
                    "file ends inside the header while reading {n} bytes (truncated?)"
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ImportError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, ImportError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ImportError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<usize, ImportError> {
        let n = self.u64()?;
        // Every element takes at least one byte, so a count beyond the rest of the file is corrupt;
        // checking here keeps a bad count from turning into a huge allocation.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.pos)
            .ok_or_else(|| {
                self.bad(&format!(
                    "length {n} runs past the end of the file (truncated or corrupt)"
                ))
            })
    }

    fn string(&mut self) -> Result<String, ImportError> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, ImportError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let item_ty = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(self.bad(&format!("unknown metadata value type {ty}"))),
        })
    }
}
