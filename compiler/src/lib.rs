//! kiln compiler: imports Llama 3–family checkpoints, exports ONNX, quantizes weights and writes `.kiln` artifacts.

pub mod emit;
pub mod gguf_write;
pub mod graph;
pub mod import;
pub mod lower;
pub mod onnx;
pub mod quant;
pub mod shaped;
pub mod tiny;
