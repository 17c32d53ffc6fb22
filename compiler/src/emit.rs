//! Writes a [`Checkpoint`] as a `.kiln` artifact: tensors in the chosen storage, the decoder as an op list.

use std::path::{Path, PathBuf};

use kiln_runtime::artifact::write::{self, Contents, TensorData};
use kiln_runtime::artifact::{BufferDecl, Graph, Metadata, Op, TensorEntry};
use kiln_runtime::exec::{MemoryPlan, SessionError, SessionOptions};
use kiln_runtime::kernels::Level;
use kiln_runtime::layout::{Geometry, Layout};
use kiln_runtime::quant::Format;

use crate::graph::{Checkpoint, Tensor};
use crate::quant::{QuantError, QuantPlan};

/// Why an artifact could not be written.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Quant(#[from] QuantError),
}

/// What was written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EmitReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    pub ops: usize,
    /// Bytes of weights by storage format name.
    pub weight_bytes: Vec<(&'static str, u64)>,
}

/// Brings every tensor to the storage `quant` asks for, as [`QuantPlan::new`] describes: a
/// tensor already stored in its target format keeps its bytes (bit for bit), any other is
/// dequantized and re-quantized.
pub fn convert(checkpoint: &Checkpoint, quant: Format) -> Result<Checkpoint, EmitError> {
    convert_with(checkpoint, &QuantPlan::new(quant))
}

/// [`convert`] with per-tensor overrides.
pub fn convert_with(checkpoint: &Checkpoint, plan: &QuantPlan) -> Result<Checkpoint, EmitError> {
    Ok(plan.apply(checkpoint)?)
}

/// Appends `t` to the tensor table and returns its index.
fn push<'t>(tensors: &mut Vec<&'t Tensor>, t: &'t Tensor) -> usize {
    tensors.push(t);
    tensors.len() - 1
}

/// The RoPE inverse frequencies as the tensor the `Rope` ops read.
fn inv_freq(checkpoint: &Checkpoint) -> Tensor {
    let f = &checkpoint.facts;
    Tensor::from_f32("rope.inv_freq", vec![f.head_dim / 2], &f.rope_inv_freq())
}

/// The decoder as an op list over named buffers, and the tensors its ops index.
fn layout<'c>(checkpoint: &'c Checkpoint, inv_freq: &'c Tensor) -> (Graph, Vec<&'c Tensor>) {
    let f = &checkpoint.facts;
    let w = &checkpoint.weights;
    let mut tensors: Vec<&Tensor> = Vec::new();
    let mut id = |t| push(&mut tensors, t);

    let mut buffers = Vec::new();
    let mut buf = |name: &str, width: usize| -> usize {
        buffers.push(BufferDecl {
            name: name.to_owned(),
            width,
        });
        buffers.len() - 1
    };
    let (d, qw, kw, ffn) = (
        f.hidden_size,
        f.heads * f.head_dim,
        f.kv_heads * f.head_dim,
        f.intermediate_size,
    );
    let x = buf("hidden", d);
    let xn = buf("normed", d);
    let q = buf("q", qw);
    let k = buf("k", kw);
    let v = buf("v", kw);
    let att = buf("attention", qw);
    let proj = buf("projected", d);
    let gate = buf("gate", ffn);
    let up = buf("up", ffn);
    let act = buf("activated", ffn);

    let embed = id(&w.embed);
    let mut ops = vec![Op::Embed {
        table: embed,
        out: x,
    }];
    let rope = id(inv_freq);
    for (layer, l) in w.layers.iter().enumerate() {
        ops.extend([
            Op::RmsNorm {
                input: x,
                weight: id(&l.attn_norm),
                out: xn,
            },
            Op::MatMul {
                input: xn,
                weight: id(&l.wq),
                out: q,
            },
            Op::MatMul {
                input: xn,
                weight: id(&l.wk),
                out: k,
            },
            Op::MatMul {
                input: xn,
                weight: id(&l.wv),
                out: v,
            },
            Op::Rope {
                buf: q,
                heads: f.heads,
                inv_freq: rope,
            },
            Op::Rope {
                buf: k,
                heads: f.kv_heads,
                inv_freq: rope,
            },
            Op::Attention {
                layer,
                q,
                k,
                v,
                out: att,
            },
            Op::MatMul {
                input: att,
                weight: id(&l.wo),
                out: proj,
            },
            Op::Add {
                acc: x,
                input: proj,
            },
            Op::RmsNorm {
                input: x,
                weight: id(&l.ffn_norm),
                out: xn,
            },
            Op::MatMul {
                input: xn,
                weight: id(&l.w_gate),
                out: gate,
            },
            Op::MatMul {
                input: xn,
                weight: id(&l.w_up),
                out: up,
            },
            Op::SwiGlu { gate, up, out: act },
            Op::MatMul {
                input: act,
                weight: id(&l.w_down),
                out: proj,
            },
            Op::Add {
                acc: x,
                input: proj,
            },
        ]);
    }
    ops.push(Op::RmsNorm {
        input: x,
        weight: id(&w.final_norm),
        out: xn,
    });
    let output = match &w.lm_head {
        Some(head) => id(head),
        None => embed,
    };
    ops.push(Op::Logits {
        input: xn,
        weight: output,
    });

    (Graph { buffers, ops }, tensors)
}

/// What an artifact is packed for: the CPU features it requires, and the layout its
/// block-quantized matrices are stored in (see `kiln_runtime::layout`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packing {
    pub required_features: Vec<String>,
    pub layout: Layout,
}

impl Packing {
    /// How `target`'s artifacts are packed: the descriptor's layout, or for `host` the layout
    /// this CPU's best kernels run fastest (ggml's rows where it names none).
    pub fn for_target(target: &kiln_targets::Target) -> Packing {
        let layout = match target.layout() {
            Some(layout) => layout,
            None if target.name == "host" => Level::best().preferred_layout(),
            None => Layout::Rows,
        };
        Packing::new(&target.cpu.assume, layout)
    }

    /// `assume` (a target's features) with `layout`, requiring the features the layout's
    /// kernels need as well.
    pub fn new(assume: &[String], layout: Layout) -> Packing {
        let mut required_features = assume.to_vec();
        for f in layout.features() {
            if !required_features.iter().any(|r| r == f) {
                required_features.push((*f).to_owned());
            }
        }
        Packing {
            required_features,
            layout,
        }
    }
}

/// The layout `t` is stored in under `layout`: matrices of a block format take it, the rest
/// keep their rows.
fn layout_of(t: &Tensor, layout: Layout) -> Layout {
    if t.shape.len() == 2 {
        layout.for_format(t.format)
    } else {
        Layout::Rows
    }
}

/// `t`'s bytes in `layout`.
fn packed(t: &Tensor, layout: Layout) -> std::borrow::Cow<'_, [u8]> {
    match layout_of(t, layout) {
        Layout::Rows => std::borrow::Cow::Borrowed(&t.data),
        l => std::borrow::Cow::Owned(
            Geometry {
                format: t.format,
                layout: l,
                rows: t.shape[0],
                blocks: t.shape[1] / t.format.block_len(),
            }
            .pack(&t.data),
        ),
    }
}

/// The artifact's metadata for `graph` and `tensors` (offsets are assigned when writing).
fn metadata(
    checkpoint: &Checkpoint,
    graph: Graph,
    tensors: &[&Tensor],
    packing: &Packing,
) -> Metadata {
    Metadata {
        producer: format!("kiln-compiler {}", env!("CARGO_PKG_VERSION")),
        facts: checkpoint.facts.clone(),
        required_cpu_features: packing.required_features.clone(),
        tensors: tensors
            .iter()
            .map(|t| TensorEntry {
                name: t.name.clone(),
                format: t.format,
                layout: layout_of(t, packing.layout),
                shape: t.shape.clone(),
                offset: 0,
                len: t.data.len() as u64,
            })
            .collect(),
        graph,
    }
}

/// The memory the runtime will need for `checkpoint` (in its final storage) with `opts`,
/// known before anything is written or run.
pub fn memory_plan(
    checkpoint: &Checkpoint,
    opts: &SessionOptions,
) -> Result<MemoryPlan, SessionError> {
    let inv_freq = inv_freq(checkpoint);
    let (graph, tensors) = layout(checkpoint, &inv_freq);
    MemoryPlan::new(
        &metadata(checkpoint, graph, &tensors, &Packing::default()),
        opts,
    )
}

/// Writes `checkpoint` (already in its final storage, see [`convert`]) to `path` atomically,
/// in ggml's rows, requiring no CPU feature (see [`write_artifact_for`]).
pub fn write_artifact(checkpoint: &Checkpoint, path: &Path) -> Result<EmitReport, EmitError> {
    write_artifact_for(checkpoint, path, &Packing::default())
}

/// Writes `checkpoint` (already in its final storage, see [`convert`]) to `path` atomically,
/// its matrices packed in `packing.layout` and recording `packing.required_features` (names as
/// `kiln_runtime::cpu::has_feature` takes them): the runtime refuses the artifact on a CPU
/// that lacks one.
pub fn write_artifact_for(
    checkpoint: &Checkpoint,
    path: &Path,
    packing: &Packing,
) -> Result<EmitReport, EmitError> {
    let inv_freq = inv_freq(checkpoint);
    let (graph, tensors) = layout(checkpoint, &inv_freq);
    let bytes: Vec<_> = tensors.iter().map(|t| packed(t, packing.layout)).collect();
    let data: Vec<TensorData> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, bytes)| TensorData {
            name: &t.name,
            format: t.format,
            layout: layout_of(t, packing.layout),
            shape: &t.shape,
            bytes,
        })
        .collect();
    let mut weight_bytes: Vec<(&'static str, u64)> = Vec::new();
    for t in &tensors {
        match weight_bytes.iter_mut().find(|(n, _)| *n == t.format.name()) {
            Some((_, b)) => *b += t.data.len() as u64,
            None => weight_bytes.push((t.format.name(), t.data.len() as u64)),
        }
    }
    let tokenizer = checkpoint.tokenizer.to_bytes();
    let meta = metadata(checkpoint, graph, &tensors, packing);
    let (n_tensors, n_ops) = (data.len(), meta.graph.ops.len());
    let bytes = write::write(
        path,
        Contents {
            meta,
            tokenizer: &tokenizer,
            tensors: &data,
        },
    )
    .map_err(|source| EmitError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(EmitReport {
        path: path.to_path_buf(),
        bytes,
        tensors: n_tensors,
        ops: n_ops,
        weight_bytes,
    })
}
