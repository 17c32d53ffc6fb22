//! The canonical Llama 3 decoder description every importer produces and every backend reads.
//!
//! Layout is Hugging Face's: matrices are `[out_features, in_features]`, row-major, and the
//! query/key rows are in rotate-half RoPE order (GGUF's interleaved order is undone on import).

use kiln_engine::tokenizer::TokenizerData;
use kiln_runtime::model::ModelFacts;
use kiln_runtime::quant::Format;
use ndarray::Array2;

/// One weight tensor in a storage format, rows contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    /// Row-major shape; the last dimension is the row length. Vectors have one dimension.
    pub shape: Vec<usize>,
    pub format: Format,
    /// Little-endian bytes in `format`.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A float tensor from values in row-major order.
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor {
            name: name.to_owned(),
            shape,
            format: Format::F32,
            data,
        }
    }

    /// Row length (the last dimension).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows (the product of all but the last dimension).
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)]
            .iter()
            .product()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows().max(1)
    }

    /// The values as f32, `[rows, cols]`.
    pub fn to_f32(&self) -> Array2<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = Array2::<f32>::zeros((rows, cols));
        let row_bytes = self.row_bytes();
        for (r, mut dst) in out.rows_mut().into_iter().enumerate() {
            let src = &self.data[r * row_bytes..(r + 1) * row_bytes];
            let dst = dst
                .as_slice_mut()
                .expect("rows of a fresh standard-layout array are contiguous");
            self.format.dequantize_row(src, dst);
        }
        out
    }

    /// A vector tensor's values.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.to_f32().into_raw_vec_and_offset().0
    }

    /// The same values stored as f32.
    pub fn dequantized(&self) -> Tensor {
        if self.format == Format::F32 {
            return self.clone();
        }
        let values = self.to_f32();
        Tensor::from_f32(
            &self.name,
            self.shape.clone(),
            values.as_slice().expect("standard layout"),
        )
    }

    /// A copy whose row `r` is this tensor's row `source(r)`; exact for every format, since
    /// quantization blocks never straddle rows.
    pub fn with_rows_from(&self, source: impl Fn(usize) -> usize) -> Tensor {
        let row_bytes = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for r in 0..self.rows() {
            let s = source(r);
            data.extend_from_slice(&self.data[s * row_bytes..(s + 1) * row_bytes]);
        }
        Tensor {
            data,
            ..self.clone()
        }
    }
}

/// The weights of one decoder layer.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub wo: Tensor,
    pub ffn_norm: Tensor,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

impl LayerWeights {
    /// The layer's tensors, for iteration.
    pub fn tensors(&self) -> [&Tensor; 9] {
        [
            &self.attn_norm,
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.ffn_norm,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }

    fn tensors_mut(&mut self) -> [&mut Tensor; 9] {
        [
            &mut self.attn_norm,
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.ffn_norm,
            &mut self.w_gate,
            &mut self.w_up,
            &mut self.w_down,
        ]
    }
}

/// All weights of a Llama decoder.
#[derive(Clone, Debug)]
pub struct LlamaWeights {
    /// `[vocab, hidden]`.
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    /// `[vocab, hidden]`; `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
}

impl LlamaWeights {
    /// Every tensor, in a stable order.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.embed];
        for l in &self.layers {
            all.extend(l.tensors());
        }
        all.push(&self.final_norm);
        all.extend(self.lm_head.as_ref());
        all
    }

    /// Applies `f` to every tensor.
    pub fn map_tensors(&mut self, mut f: impl FnMut(&mut Tensor)) {
        f(&mut self.embed);
        for l in &mut self.layers {
            for t in l.tensors_mut() {
                f(t);
            }
        }
        f(&mut self.final_norm);
        if let Some(t) = &mut self.lm_head {
            f(t);
        }
    }
}

/// A whole imported checkpoint: facts, tokenizer and weights in the canonical layout.
#[derive(Clone)]
pub struct Checkpoint {
    pub facts: ModelFacts,
    pub tokenizer: TokenizerData,
    pub weights: LlamaWeights,
}
