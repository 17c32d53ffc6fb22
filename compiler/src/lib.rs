//! kiln compiler: imports Llama 3–family checkpoints, exports ONNX, quantizes weights and
//! writes `.kiln` artifacts.
//!
//! The stages, each a function over one typed [`graph::Checkpoint`]:
//!
//! | stage | call | |
//! | --- | --- | --- |
//! | import | [`import::import`] | a GGUF file or a Hugging Face directory |
//! | lower | `lower::import_onnx` | an ONNX decoder, read back through tract (feature `onnx-input`) |
//! | quantize | [`emit::convert_with`] over a [`quant::QuantPlan`] | storage format per tensor |
//! | plan | [`emit::memory_plan`] | the peak memory the runtime will need, before anything is written |
//! | emit | [`emit::write_artifact_for`] | the `.kiln` artifact, packed for a target's kernels |
//! | export | [`onnx::export`], [`onnx::export_quantized`] | a standard ONNX decoder |
//!
//! Feature `pipeline` (default) adds what a user runs around them — [`pipeline`]'s fetch,
//! compile, build, bundle and flash — and the `kilnc` binary ([`cli`]); feature `onnx-input`
//! adds `lower` (the only part that needs tract; GGUF and Hugging Face checkpoints compile
//! without it).

#[cfg(feature = "pipeline")]
pub mod cli;
pub mod emit;
mod freqs;
pub mod gguf_write;
pub mod graph;
pub mod import;
#[cfg(feature = "onnx-input")]
pub mod lower;
pub mod onnx;
#[cfg(feature = "pipeline")]
pub mod pipeline;
pub mod quant;
pub mod shaped;
pub mod tiny;
