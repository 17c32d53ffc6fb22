//! GGUF v3 writer: metadata and tensors in the layout llama.cpp (and [`crate::import::gguf`])
//! reads, written through a temporary file that is renamed into place.

use std::io::{BufWriter, Write};
use std::path::Path;

use kiln_runtime::quant::Format;

use crate::import::gguf::{Value, GGML_TYPES};

/// Alignment of the tensor data (GGUF's default, `general.alignment` unset).
const ALIGN: u64 = 32;

/// Appends a tensor's bytes to the writer it is given.
pub type TensorBytes<'a> = Box<dyn Fn(&mut dyn Write) -> std::io::Result<()> + 'a>;

/// One tensor to write: its name, its dimensions outermost first (rows, then columns, as kiln
/// and PyTorch write them), and its bytes in `format`, produced on demand so that a model
/// larger than memory streams to disk.
pub struct GgufTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub format: Format,
    pub bytes: TensorBytes<'a>,
}

fn ggml_type(format: Format) -> u32 {
    GGML_TYPES
        .iter()
        .find(|&&(_, f)| f == format)
        .map_or(0, |&(id, _)| id)
}

fn type_of(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            let item = items.first().map_or(4, type_of);
            out.extend_from_slice(&item.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Bytes of `t` in its format.
fn tensor_len(t: &GgufTensor<'_>) -> u64 {
    let cols = t.shape.last().copied().unwrap_or(1);
    let rows: usize = t.shape[..t.shape.len().saturating_sub(1)].iter().product();
    (t.format.row_bytes(cols).unwrap_or(0) * rows) as u64
}

/// Writes `metadata` and `tensors` to `path` (GGUF v3), atomically; `on_tensor(i)` reports
/// progress after each tensor.
pub fn write(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &[GgufTensor<'_>],
    mut on_tensor: impl FnMut(usize),
) -> std::io::Result<u64> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut head, key);
        head.extend_from_slice(&type_of(value).to_le_bytes());
        put_value(&mut head, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ggml_type(t.format).to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + tensor_len(t)).div_ceil(ALIGN) * ALIGN;
    }
    head.resize(
        (head.len() as u64).div_ceil(ALIGN) as usize * ALIGN as usize,
        0,
    );

    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-gguf-")
        .tempfile_in(dir)?;
    let mut out = BufWriter::with_capacity(1 << 20, tmp);
    out.write_all(&head)?;
    let mut written = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        (t.bytes)(&mut out)?;
        let len = tensor_len(t);
        let pad = len.div_ceil(ALIGN) * ALIGN - len;
        out.write_all(&vec![0u8; pad as usize])?;
        written += len + pad;
        on_tensor(i);
    }
    let tmp = out.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(head.len() as u64 + written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_has_its_own_ggml_type() {
        let mut ids: Vec<u32> = Format::ALL.iter().map(|&f| ggml_type(f)).collect();
        assert!(Format::ALL
            .iter()
            .all(|f| GGML_TYPES.iter().any(|(_, g)| g == f)));
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), Format::ALL.len());
    }
}
