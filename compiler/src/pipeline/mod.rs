//! The host pipeline a user runs, as a library: get a checkpoint ([`fetch`]), compile it for a
//! device ([`compile`], [`quantize`], [`export`]), build what the device runs ([`build`]),
//! package it ([`bundle`]) and install it ([`flash`]). Each module's `Args` is both its
//! command line (`kilnc <command>`, [`crate::cli`]) and its options when called from code,
//! such as a user's own `cargo xtask`:
//!
//! ```no_run
//! use kiln_compiler::pipeline::{compile, fetch};
//!
//! # fn main() -> anyhow::Result<()> {
//! let model = fetch::ensure_model("smollm2-135m-instruct")?;
//! let compiled = compile::compile(&compile::Args {
//!     model: model.primary.display().to_string(),
//!     target: "rpi5".into(),
//!     quant: None,
//!     overrides: Vec::new(),
//!     out: "smollm2.kiln".into(),
//!     ctx: None,
//!     max_memory: None,
//!     json: false,
//!     emit: compile::Emit::Kiln,
//! })?;
//! println!("{}", compiled.summary);
//! # Ok(())
//! # }
//! ```
//!
//! Errors are `anyhow` chains whose lines say what failed and where: these steps run tools,
//! networks and files on a user's behalf, and report to a person, not to code that matches on
//! variants (the compiler's own stages, [`crate::import`] to [`crate::emit`], have typed errors).

pub mod build;
pub mod bundle;
pub mod cache;
pub mod compile;
pub mod export;
pub mod fetch;
pub mod flash;
mod hf;
pub mod onnxruntime;
pub mod pypi;
pub mod quantize;
pub mod source;
pub mod targets;
