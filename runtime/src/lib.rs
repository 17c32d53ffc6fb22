//! kiln runtime: loads a compiled `.kiln` artifact and generates text from it.
//!
//! The core (artifact parsing, executor, kernels) needs only `alloc`; the `std` feature adds
//! memory-mapped loading, the tokenizer's regex pre-tokenization, chat templates and the CLI.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod artifact;
#[cfg(feature = "std")]
pub mod chat;
#[cfg(feature = "std")]
pub mod cpu;
#[cfg(feature = "std")]
pub mod decoder;
pub mod exec;
#[cfg(feature = "std")]
pub mod generate;
pub mod kernels;
pub mod layout;
#[cfg(feature = "std")]
pub mod logits;
pub mod model;
#[cfg(feature = "ort")]
pub mod onnxrt;
#[cfg(feature = "std")]
pub mod perplexity;
pub mod quant;
#[cfg(feature = "std")]
pub mod report;
pub mod sampler;
#[cfg(feature = "std")]
pub mod stats;
#[cfg(feature = "std")]
pub mod tokenizer;
