//! `kilnc`'s command line: one subcommand per pipeline step ([`crate::pipeline`]). kiln's own
//! `cargo xtask` embeds the same [`Command`] beside its repository tasks; so can a user's.

use clap::Subcommand;

use crate::pipeline::{build, bundle, compile, export, fetch, flash, quantize, targets};

/// The pipeline's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download a model card's checkpoint into the kiln cache (~/.cache/kiln, or $KILN_HOME).
    Fetch(fetch::Args),
    /// List the model cards kiln ships (same as `fetch --list`).
    Models(fetch::ListArgs),
    /// Write a model as a standard ONNX decoder with KV cache.
    Export(export::Args),
    /// Compile a model into a `.kiln` artifact for a target.
    Compile(compile::Args),
    /// Quantize a model (q8_0, q4_0, q4_1, q4_k_m, q5_k_m, q6_k, per-tensor overrides) into a `.kiln` artifact for
    /// this machine or a MatMulNBits ONNX decoder for onnxruntime.
    Quantize(quantize::Args),
    /// Cross-compile the `kiln` runtime and compile a model for a device, into `dist/<target>/`.
    Build(build::Args),
    /// Package `kiln`, a model and a systemd unit for a device into one archive.
    Bundle(bundle::Args),
    /// Install a bundle on a device over ssh, or into a mounted root file system.
    Flash(flash::Args),
    /// List the devices kiln compiles for (`targets/descriptors/*.toml`).
    Targets(targets::Args),
}

/// Runs one subcommand; what it prints goes to stdout (results) and stderr (progress).
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Fetch(args) => fetch::run(args),
        Command::Models(args) => fetch::list(args),
        Command::Export(args) => export::run(args),
        Command::Compile(args) => compile::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Build(args) => build::run(args),
        Command::Bundle(args) => bundle::run(args),
        Command::Flash(args) => flash::run(args),
        Command::Targets(args) => targets::run(args),
    }
}
