//! Writes a built decoder as one ONNX protobuf, streamed to disk a tensor at a time, with the
//! weights inline or in `<out>.data` at 64-byte aligned offsets. Both files are written under
//! temporary names in the target directory and renamed into place only once complete.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::prelude::{Engine, BASE64_STANDARD};
use prost::Message;

use super::builder::Weight;
use super::decoder::{Decoder, OPSET};
use super::nbits;
use super::proto::{
    GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, EXTERNAL,
};
use super::{ExportOptions, ExportReport, OnnxError};
use kiln_runtime::model::{
    ModelFacts, ONNX_FACTS_KEY as FACTS_KEY, ONNX_TOKENIZER_KEY as TOKENIZER_KEY,
};

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

/// One weight's `TensorProto` without its bytes; with external data it already names them.
struct Planned<'w, 'a> {
    header: TensorProto,
    weight: &'w Weight<'a>,
}

impl Planned<'_, '_> {
    /// Length of the whole `TensorProto` message, inline bytes included.
    fn message_len(&self) -> u64 {
        let header = self.header.encoded_len() as u64;
        if self.header.data_location == Some(EXTERNAL) {
            header
        } else {
            header + field_len(self.weight.byte_len())
        }
    }
}

/// The external data file while it is written.
struct DataFile {
    file: Staged,
    path: PathBuf,
    /// Bytes written so far.
    len: u64,
}

pub fn write(
    decoder: &Decoder,
    facts: &ModelFacts,
    tokenizer: &[u8],
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportReport, OnnxError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OnnxError::Io { path, source }
    };
    // The data file's name goes into the model, which holds UTF-8 strings only.
    let file_name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        io(out)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the output must be a file name in UTF-8",
        ))
    })?;
    let data_name = format!("{file_name}.data");

    let model = model_header(facts, tokenizer, decoder.graph.uses_domain(nbits::DOMAIN));
    let graph = GraphProto {
        node: decoder.graph.nodes.clone(),
        name: Some(facts.name.clone()),
        initializer: Vec::new(),
        input: decoder.inputs.clone(),
        output: decoder.outputs.clone(),
    };
    let constants = &decoder.graph.constants;
    let weights = &decoder.graph.weights;
    let mut plan = plan(weights, None);
    let external = opts.external_data || !fits_one_message(&model, &graph, constants, &plan);
    let mut data = None;
    if external {
        plan = self::plan(weights, Some(&data_name));
        let path = out.with_file_name(&data_name);
        data = Some(DataFile {
            file: Staged::create(&path)?,
            path,
            len: 0,
        });
    }
    let mut file = Staged::create(out)?;

    let mut head = model.encode_to_vec();
    put_field_header(MODEL_GRAPH, graph_len(&graph, constants, &plan), &mut head);
    head.extend(graph.encode_to_vec());
    for c in constants {
        put_field_header(GRAPH_INITIALIZER, c.encoded_len() as u64, &mut head);
        head.extend(c.encode_to_vec());
    }
    file.writer.write_all(&head).map_err(io(out))?;
    for p in &plan {
        let mut buf = Vec::new();
        put_field_header(GRAPH_INITIALIZER, p.message_len(), &mut buf);
        buf.extend(p.header.encode_to_vec());
        let bytes = p.weight.le_bytes();
        match &mut data {
            // The same alignment rule as `plan`, over the same order, so offsets agree.
            Some(d) => {
                let offset = align(d.len);
                let pad = vec![0u8; (offset - d.len) as usize];
                d.file.writer.write_all(&pad).map_err(io(&d.path))?;
                d.file.writer.write_all(&bytes).map_err(io(&d.path))?;
                d.len = offset + bytes.len() as u64;
            }
            None => {
                put_field_header(TENSOR_RAW_DATA, bytes.len() as u64, &mut buf);
                buf.extend_from_slice(&bytes);
            }
        }
        file.writer.write_all(&buf).map_err(io(out))?;
    }

    let mut bytes = file.finish().map_err(io(out))?;
    if let Some(mut d) = data {
        bytes += d.file.finish().map_err(io(&d.path))?;
        // The data first: once the model appears under its name, what it refers to is there.
        d.file.commit().map_err(io(&d.path))?;
    }
    file.commit().map_err(io(out))?;
    Ok(ExportReport {
        nodes: decoder.graph.nodes.len(),
        initializers: constants.len() + weights.len(),
        bytes,
        external,
    })
}

/// Whether the whole model, weights inline, stays under protobuf's limit.
fn fits_one_message(
    model: &ModelProto,
    graph: &GraphProto,
    constants: &[TensorProto],
    inline: &[Planned],
) -> bool {
    let len = model.encoded_len() as u64 + field_len(graph_len(graph, constants, inline));
    len <= PROTOBUF_LIMIT
}

/// Everything in the `ModelProto` except the graph; `microsoft` imports onnxruntime's
/// `com.microsoft` opset 1 too. The facts (JSON) and tokenizer (kiln's binary codec, base64)
/// ride along in `metadata_props`, so `kiln --backend ort` needs the `.onnx` file alone.
fn model_header(facts: &ModelFacts, tokenizer: &[u8], microsoft: bool) -> ModelProto {
    let entry = |key: &str, value: String| StringStringEntryProto {
        key: Some(key.to_owned()),
        value: Some(value),
    };
    let eos: Vec<String> = facts.eog_ids.iter().map(u32::to_string).collect();
    ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: std::iter::once((String::new(), OPSET))
            .chain(microsoft.then(|| (nbits::DOMAIN.to_owned(), 1)))
            .map(|(domain, version)| OperatorSetIdProto {
                domain: Some(domain),
                version: Some(version),
            })
            .collect(),
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
            entry(FACTS_KEY, serde_json::to_string(facts).unwrap_or_default()),
            entry(TOKENIZER_KEY, BASE64_STANDARD.encode(tokenizer)),
        ],
    }
}

/// Headers for every weight; with a `location`, they name the bytes' aligned offsets there.
fn plan<'w, 'a>(weights: &'w [Weight<'a>], location: Option<&str>) -> Vec<Planned<'w, 'a>> {
    let mut next = 0u64;
    weights
        .iter()
        .map(|weight| {
            let mut header = TensorProto {
                dims: weight.dims(),
                data_type: Some(weight.data_type()),
                name: Some(weight.name.clone()),
                raw_data: None,
                external_data: Vec::new(),
                data_location: None,
            };
            if let Some(location) = location {
                let offset = align(next);
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
            }
            Planned { header, weight }
        })
        .collect()
}

fn align(offset: u64) -> u64 {
    offset.div_ceil(ALIGN) * ALIGN
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
        // Unique per process and call, so concurrent exports never share a temporary file.
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let temp = target.with_file_name(format!(".{name}.{}-{seq}.tmp", std::process::id()));
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
            // Best effort: if removal fails, a hidden temporary file remains, never a partial model.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Tensor;
    use crate::onnx::builder::{value_info, Dim, GraphBuilder, Layout};
    use crate::onnx::proto::FLOAT;
    use kiln_runtime::quant::Format;

    fn facts() -> ModelFacts {
        ModelFacts {
            name: "t".into(),
            vocab_size: 4,
            hidden_size: 2,
            intermediate_size: 2,
            layers: 0,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            context_length: 8,
            tie_word_embeddings: true,
            bos_id: None,
            add_bos: false,
            eog_ids: vec![2],
            chat_template: None,
            sampling: Default::default(),
        }
    }

    #[test]
    fn varint_len_matches_encoding() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(v, &mut buf);
            assert_eq!(buf.len() as u64, varint_len(v), "{v}");
        }
    }

    #[test]
    fn weights_over_two_gib_go_external() {
        // Only shapes matter for planning; the bytes are never produced.
        let huge = Tensor {
            name: "w".into(),
            shape: vec![1 << 15, 1 << 14],
            format: Format::F32,
            data: Vec::new(),
        };
        let small = Tensor {
            shape: vec![4, 4],
            ..huge.clone()
        };
        let graph = GraphProto::default();
        let model = model_header(&facts(), b"", false);
        for (t, fits) in [(&huge, false), (&small, true)] {
            let weights = [Weight {
                name: "w".into(),
                source: t,
                layout: Layout::F32,
            }];
            assert_eq!(
                fits_one_message(&model, &graph, &[], &plan(&weights, None)),
                fits
            );
        }
    }

    #[test]
    fn streamed_file_decodes_to_the_whole_message() {
        let dir = tempfile::tempdir().expect("temp dir");
        let w = Tensor::from_f32("w", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut g = GraphBuilder::default();
        g.set_scope("s");
        let weight = g.weight("w", &w, true);
        let shape = g.ints(&[3, 2]);
        g.op_to("Reshape", &[&weight, &shape], Vec::new(), "y");
        let decoder = Decoder {
            graph: g,
            inputs: Vec::new(),
            outputs: vec![value_info("y", FLOAT, &[Dim::Fixed(3), Dim::Fixed(2)])],
        };
        let out = dir.path().join("m.onnx");
        let report =
            write(&decoder, &facts(), b"", &out, &ExportOptions::default()).expect("write");
        let bytes = std::fs::read(&out).expect("read back");
        assert_eq!(report.bytes, bytes.len() as u64);
        let decoded = ModelProto::decode(bytes.as_slice()).expect("decode");

        let mut initializer = decoder.graph.constants.clone();
        let transposed: Vec<u8> = [1f32, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        initializer.push(TensorProto {
            dims: vec![3, 2],
            data_type: Some(FLOAT),
            name: Some("w".into()),
            raw_data: Some(transposed),
            external_data: Vec::new(),
            data_location: None,
        });
        let graph = GraphProto {
            node: decoder.graph.nodes.clone(),
            name: Some("t".into()),
            initializer,
            input: Vec::new(),
            output: decoder.outputs.clone(),
        };
        assert_eq!(
            decoded,
            ModelProto {
                graph: Some(graph),
                ..model_header(&facts(), b"", false)
            }
        );
    }
}
