//! kiln compiler: imports Llama 3–family checkpoints, exports ONNX, quantizes weights and writes `.kiln` artifacts.
//!
//! Feature `onnx-input` adds [`lower`]: an ONNX decoder read back through tract (the only
//! part that needs tract; GGUF and Hugging Face checkpoints compile without it).

pub mod emit;
mod freqs;
pub mod gguf_write;
pub mod graph;
pub mod import;
#[cfg(feature = "onnx-input")]
pub mod lower;
pub mod onnx;
pub mod quant;
pub mod shaped;
pub mod tiny;
