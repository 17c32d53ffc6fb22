//! kiln engine: everything between a compiled model and text — tokenizers, chat templates,
//! sampling loops, perplexity, and the onnxruntime backend (feature `ort`) beside kiln's own
//! executor, both behind one [`decoder::Decoder`] interface.

pub mod chat;
pub mod constrain;
pub mod conversation;
pub mod decoder;
pub mod generate;
pub mod logits;
#[cfg(feature = "ort")]
pub mod onnxrt;
pub mod openai;
pub mod perplexity;
pub mod report;
pub mod snapshot;
pub mod stats;
pub mod tokenizer;
pub mod tools;
