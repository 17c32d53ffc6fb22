//! kiln runtime core: reads a compiled `.kiln` artifact and runs its decoder, allocating
//! nothing per token.
//!
//! Artifact parsing, the executor, its memory plan, the kernels and the sampler need only
//! `alloc`, with SIMD kernels chosen by the build's target features; the `std` feature adds
//! memory-mapped loading, worker threads and run-time CPU detection. Text (tokenizers, chat templates, generation) lives in `kiln-engine`.
#![cfg_attr(not(any(feature = "std", test)), no_std)]

extern crate alloc;

pub mod artifact;
pub mod cpu;
pub mod exec;
pub mod kernels;
pub mod layout;
pub mod model;
pub mod quant;
pub mod sampler;
