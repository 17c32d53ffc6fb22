//! Writes a built decoder as one ONNX protobuf, streamed to disk a tensor at a time, with the
//! weights inline or in `<out>.data` at 64-byte aligned offsets. Both files are written under
//! temporary names in the target directory and renamed into place only once complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::builder::Weight;
use super::decoder::{Decoder, OPSET};
use super::proto::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, EXTERNAL,
    FLOAT,
};
use super::{ExportOptions, ExportReport, OnnxError};
use kiln_runtime::model::ModelFacts;

/// ONNX IR version matching opset 17 (ONNX 1.12).
const IR_VERSION: i64 = 8;
/// Protobuf refuses messages of 2 GiB or more.
const PROTOBUF_LIMIT: u64 = i32::MAX as u64;
/// Alignment of each tensor in the external data file, enough for any SIMD load or mmap use.
const ALIGN: u64 = 64;

/// Field numbers of the length-delimited fields streamed by hand.
const MODEL_GRAPH: u64 = 7;
const GRAPH_INITIALIZER: u64 = 5;
const TENSOR_RAW_DATA: u64 = 9;

/// One initializer as written: its message without `raw_data`, and where its bytes go.
struct Planned<'w, 'a> {
    header: TensorProto,
    weight: &'w Weight<'a>,
    /// Offset in the external data file, `None` when the bytes are inline.
    offset: Option<u64>,
}

impl Planned<'_, '_> {
    /// Length of the whole `TensorProto` message.
    fn message_len(&self) -> u64 {
        let header = self.header.encoded_len() as u64;
        match self.offset {
            Some(_) => header,
            None => header + field_len(self.weight.byte_len()),
        }
    }
}

pub fn write(
    decoder: &Decoder,
    facts: &ModelFacts,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport, OnnxError> {
    let file_name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| OnnxError::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
    let data_name = format!("{file_name}.data");
    let data_path = out.with_file_name(&data_name);

    let model = model_header(facts);
    let graph = GraphProto {
        node: decoder.graph.nodes.clone(),
        name: Some(facts.name.clone()),
        initializer: Vec::new(),
        input: decoder.inputs.clone(),
        output: decoder.outputs.clone(),
    };
    let inline_len = |plan: &[Planned]| -> u64 {
        let graph_len = graph_len(&graph, &decoder.graph.constants, plan);
        model.encoded_len() as u64 + field_len(graph_len)
    };
    let mut plan = plan(&decoder.graph.weights, None);
    let external = opts.external_data || inline_len(&plan) > PROTOBUF_LIMIT;
    if external {
        plan = self::plan(&decoder.graph.weights, Some(&data_name));
    }
    let graph_len = graph_len(&graph, &decoder.graph.constants, &plan);

    let mut data = if external {
        Some(Staged::create(&data_path)?)
    } else {
        None
    };
    let mut file = Staged::create(out)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OnnxError::Io { path, source }
    };
    let mut head = model.encode_to_vec();
    put_field_header(MODEL_GRAPH, graph_len, &mut head);
    head.extend(graph.encode_to_vec());
    for c in &decoder.graph.constants {
        put_field_header(GRAPH_INITIALIZER, c.encoded_len() as u64, &mut head);
        head.extend(c.encode_to_vec());
    }
    file.writer.write_all(&head).map_err(io(out))?;
    let mut data_pos = 0u64;
    for p in &plan {
        let mut buf = Vec::new();
        put_field_header(GRAPH_INITIALIZER, p.message_len(), &mut buf);
        buf.extend(p.header.encode_to_vec());
        let bytes = p.weight.le_bytes();
        match (p.offset, &mut data) {
            (Some(offset), Some(data)) => {
                let pad = vec![0u8; (offset - data_pos) as usize];
                data.writer.write_all(&pad).map_err(io(&data_path))?;
                data.writer.write_all(&bytes).map_err(io(&data_path))?;
                data_pos = offset + bytes.len() as u64;
            }
            _ => {
                put_field_header(TENSOR_RAW_DATA, bytes.len() as u64, &mut buf);
                buf.extend_from_slice(&bytes);
            }
        }
        file.writer.write_all(&buf).map_err(io(out))?;
    }

    let mut bytes = file.finish().map_err(io(out))?;
    if let Some(mut data) = data {
        bytes += data.finish().map_err(io(&data_path))?;
        // The data first: once the model appears under its name, what it refers to is there.
        data.commit().map_err(io(&data_path))?;
    }
    file.commit().map_err(io(out))?;
    Ok(ExportReport {
        nodes: decoder.graph.nodes.len(),
        initializers: decoder.graph.constants.len() + decoder.graph.weights.len(),
        bytes,
        external,
    })
}

/// Everything in the `ModelProto` except the graph.
fn model_header(facts: &ModelFacts) -> ModelProto {
    let entry = |key: &str, value: String| StringStringEntryProto {
        key: Some(key.to_owned()),
        value: Some(value),
    };
    let eos: Vec<String> = facts.eog_ids.iter().map(u32::to_string).collect();
    ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("kiln".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        domain: None,
        model_version: None,
        graph: None,
        metadata_props: vec![
            entry("kiln.version", env!("CARGO_PKG_VERSION").into()),
            entry("model.name", facts.name.clone()),
            entry("model.context_length", facts.context_length.to_string()),
            // Every end-of-generation id, not only EOS (llama.cpp stops at all of them).
            entry("model.eos_token_ids", eos.join(",")),
        ],
    }
}

/// Headers for every weight and, with external data, their aligned offsets in `location`.
fn plan<'w, 'a>(weights: &'w [Weight<'a>], location: Option<&str>) -> Vec<Planned<'w, 'a>> {
    let mut next = 0u64;
    weights
        .iter()
        .map(|weight| {
            let mut header = TensorProto {
                dims: weight.dims(),
                data_type: Some(FLOAT),
                name: Some(weight.name.clone()),
                raw_data: None,
                external_data: Vec::new(),
                data_location: None,
            };
            let offset = location.map(|location| {
                let offset = next.div_ceil(ALIGN) * ALIGN;
                next = offset + weight.byte_len();
                let entry = |key: &str, value: String| StringStringEntryProto {
                    key: Some(key.into()),
                    value: Some(value),
                };
                header.external_data = vec![
                    entry("location", location.to_owned()),
                    entry("offset", offset.to_string()),
                    entry("length", weight.byte_len().to_string()),
                ];
                header.data_location = Some(EXTERNAL);
                offset
            });
            Planned {
                header,
                weight,
                offset,
            }
        })
        .collect()
}

/// Length of the whole `GraphProto`: its small fields, then every initializer.
fn graph_len(graph: &GraphProto, constants: &[TensorProto], plan: &[Planned]) -> u64 {
    let constants: u64 = constants
        .iter()
        .map(|c| field_len(c.encoded_len() as u64))
        .sum();
    let weights: u64 = plan.iter().map(|p| field_len(p.message_len())).sum();
    graph.encoded_len() as u64 + constants + weights
}

/// Bytes of a length-delimited field holding `len` bytes; the field numbers streamed here are
/// below 16, so the key takes one byte.
fn field_len(len: u64) -> u64 {
    1 + varint_len(len) + len
}

/// The key (wire type 2, length-delimited) and length of a field whose value follows.
fn put_field_header(field: u64, len: u64, out: &mut Vec<u8>) {
    debug_assert!(field < 16, "field_len assumes one-byte keys");
    put_varint(field << 3 | 2, out);
    put_varint(len, out);
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> u64 {
    u64::from((64 - (v | 1).leading_zeros()).div_ceil(7))
}

/// A file being written under a temporary name beside its target; removed unless committed.
struct Staged {
    temp: PathBuf,
    target: PathBuf,
    writer: BufWriter<File>,
    committed: bool,
}

impl Staged {
    fn create(target: &Path) -> Result<Staged, OnnxError> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let temp = target.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let file = File::create(&temp).map_err(|source| OnnxError::Io {
            path: target.to_path_buf(),
            source,
        })?;
        Ok(Staged {
            temp,
            target: target.to_path_buf(),
            writer: BufWriter::new(file),
            committed: false,
        })
    }

    /// Flushes and syncs; returns the file's size.
    fn finish(&mut self) -> std::io::Result<u64> {
        self.writer.flush()?;
        let file = self.writer.get_ref();
        file.sync_all()?;
        Ok(file.metadata()?.len())
    }

    fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.temp, &self.target)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: a leftover temporary file is the only trace of a failed export.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}
