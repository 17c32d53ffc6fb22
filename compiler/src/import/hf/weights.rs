//! Hugging Face safetensors weights, one file or sharded through `model.safetensors.index.json`,
//! memory-mapped and widened to f32.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use half::{bf16, f16};
use kiln_runtime::model::ModelFacts;
use kiln_runtime::quant::Format;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensorError};
use safetensors::SafeTensors;

use super::config::JsonFile;
use crate::graph::{LayerWeights, LlamaWeights, Tensor};
use crate::import::ImportError;

pub(super) const SINGLE_FILE: &str = "model.safetensors";
pub(super) const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped safetensors file with its validated header.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Length of the JSON header; tensor data starts after it and the 8-byte length prefix.
    header_len: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard, ImportError> {
        let io = |e| ImportError::io(path, e);
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and kiln never writes checkpoint files; a file changed
        // underneath us by another process can only produce wrong numbers, because every slice
        // below is bounds-checked against the header that `read_metadata` validated against the
        // map's length.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&map).map_err(|e| corrupt_file(path, map.len(), e))?;
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            header_len,
            metadata,
        })
    }

    /// The tensor's dtype, shape and bytes, when the file holds it.
    fn get(&self, name: &str) -> Option<(Dtype, &[usize], &[u8])> {
        let info = self.metadata.info(name)?;
        let (start, end) = info.data_offsets;
        let base = 8 + self.header_len;
        let data = self.map.get(base + start..base + end)?;
        Some((info.dtype, &info.shape, data))
    }
}

fn corrupt_file(path: &Path, len: usize, e: SafeTensorError) -> ImportError {
    let what = match e {
        SafeTensorError::HeaderTooSmall
        | SafeTensorError::InvalidHeaderLength
        | SafeTensorError::MetadataIncompleteBuffer => {
            format!(
                "truncated or damaged safetensors file ({len} bytes do not match its header: {e})"
            )
        }
        e => format!("not a valid safetensors file: {e}"),
    };
    ImportError::Corrupt {
        path: path.to_path_buf(),
        what,
    }
}

/// The checkpoint's safetensors files and which one holds each tensor.
pub(super) struct Weights {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`; `None` for a single unindexed file.
    index: Option<(PathBuf, HashMap<String, usize>)>,
}

impl Weights {
    /// Opens `model.safetensors.index.json` and its shards when present, else `model.safetensors`.
    pub(super) fn open(dir: &Path) -> Result<Weights, ImportError> {
        let index_path = dir.join(INDEX_FILE);
        let Some(index) = JsonFile::read_optional(&index_path)? else {
            let shard = Shard::open(&dir.join(SINGLE_FILE))?;
            return Ok(Weights {
                shards: vec![shard],
                index: None,
            });
        };
        let fields = index.fields();
        let weight_map: HashMap<String, String> = fields.require("weight_map")?;
        let mut shard_of_file: HashMap<String, usize> = HashMap::new();
        let mut shards = Vec::new();
        let mut tensors = HashMap::with_capacity(weight_map.len());
        // Sorted so that errors are reported in a stable order.
        let mut entries: Vec<_> = weight_map.into_iter().collect();
        entries.sort();
        for (tensor, file) in entries {
            // Shards live next to the index; anything else would read outside the checkpoint.
            let mut parts = Path::new(&file).components();
            if !matches!(
                (parts.next(), parts.next()),
                (Some(Component::Normal(_)), None)
            ) {
                return Err(fields.corrupt(format!(
                    "weight_map: tensor {tensor} points at {file:?}, not a file beside the index"
                )));
            }
            let slot = match shard_of_file.get(&file) {
                Some(&slot) => slot,
                None => {
                    shards.push(Shard::open(&dir.join(&file))?);
                    shard_of_file.insert(file, shards.len() - 1);
                    shards.len() - 1
                }
            };
            tensors.insert(tensor, slot);
        }
        Ok(Weights {
            shards,
            index: Some((index_path, tensors)),
        })
    }

    /// Loads `name` as an f32 tensor after checking its shape against `expected`.
    pub(super) fn load(&self, name: &str, expected: &[usize]) -> Result<Tensor, ImportError> {
        let shard = match &self.index {
            Some((index_path, tensors)) => {
                let slot = tensors
                    .get(name)
                    .ok_or_else(|| ImportError::MissingTensor {
                        path: index_path.clone(),
                        name: name.to_owned(),
                    })?;
                &self.shards[*slot]
            }
            None => &self.shards[0],
        };
        let path = || shard.path.clone();
        let (dtype, shape, data) = shard.get(name).ok_or_else(|| ImportError::MissingTensor {
            path: path(),
            name: name.to_owned(),
        })?;
        if shape != expected {
            return Err(ImportError::Shape {
                path: path(),
                name: name.to_owned(),
                found: shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        let data = to_f32_bytes(dtype, data).ok_or_else(|| ImportError::Corrupt {
            path: path(),
            what: format!(
                "tensor {name} has dtype {dtype:?}, which kiln does not read (F32, F16, BF16)"
            ),
        })?;
        Ok(Tensor {
            name: name.to_owned(),
            shape: shape.to_vec(),
            format: Format::F32,
            data,
        })
    }
}

/// Little-endian f32 bytes of `data`; both half formats widen to f32 exactly.
fn to_f32_bytes(dtype: Dtype, data: &[u8]) -> Option<Vec<u8>> {
    let widen = |to_f32: fn([u8; 2]) -> f32| {
        data.chunks_exact(2)
            .flat_map(|b| to_f32([b[0], b[1]]).to_le_bytes())
            .collect()
    };
    match dtype {
        Dtype::F32 => Some(data.to_vec()),
        Dtype::F16 => Some(widen(|b| f16::from_le_bytes(b).to_f32())),
        Dtype::BF16 => Some(widen(|b| bf16::from_le_bytes(b).to_f32())),
        _ => None,
    }
}

/// Every decoder tensor under its Hugging Face name, shapes checked against `facts`.
pub(super) fn llama_weights(w: &Weights, facts: &ModelFacts) -> Result<LlamaWeights, ImportError> {
    let (d, hd, ff) = (facts.hidden_size, facts.head_dim, facts.intermediate_size);
    let (q_rows, kv_rows) = (facts.heads * hd, facts.kv_heads * hd);
    let embed = w.load("model.embed_tokens.weight", &[facts.vocab_size, d])?;
    let mut layers = Vec::with_capacity(facts.layers);
    for i in 0..facts.layers {
        let t = |s: &str, shape: &[usize]| w.load(&format!("model.layers.{i}.{s}.weight"), shape);
        layers.push(LayerWeights {
            attn_norm: t("input_layernorm", &[d])?,
            wq: t("self_attn.q_proj", &[q_rows, d])?,
            wk: t("self_attn.k_proj", &[kv_rows, d])?,
            wv: t("self_attn.v_proj", &[kv_rows, d])?,
            wo: t("self_attn.o_proj", &[d, q_rows])?,
            ffn_norm: t("post_attention_layernorm", &[d])?,
            w_gate: t("mlp.gate_proj", &[ff, d])?,
            w_up: t("mlp.up_proj", &[ff, d])?,
            w_down: t("mlp.down_proj", &[d, ff])?,
        });
    }
    // Tied checkpoints may still carry a copy of the embedding as `lm_head.weight`; it is
    // the same matrix, so it is not loaded twice.
    let lm_head = match facts.tie_word_embeddings {
        true => None,
        false => Some(w.load("lm_head.weight", &[facts.vocab_size, d])?),
    };
    Ok(LlamaWeights {
        embed,
        layers,
        final_norm: w.load("model.norm.weight", &[d])?,
        lm_head,
    })
}
