//! `cargo xtask`: kiln's host pipeline. One module per subcommand; `main` only parses the
//! command line and dispatches.

mod bench;
mod bench_arm;
mod build;
mod bundle;
mod cache;
mod compile;
mod export;
mod fetch;
mod flash;
mod gen_shaped;
mod gen_tiny;
mod hf;
mod llama_bench;
mod onnxruntime;
mod pypi;
mod quantize;
mod run;
mod source;
mod targets;
mod test;

use clap::{Parser, Subcommand};

/// kiln's host pipeline: get a Llama 3-family checkpoint, compile it for a device, run it.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    propagate_version = true
)]
#[command(after_help = "Run `cargo xtask <COMMAND> --help` for the details of a command.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download a model card's checkpoint into the kiln cache (~/.cache/kiln, or $KILN_HOME).
    Fetch(fetch::Args),
    /// List the model cards kiln ships (same as `fetch --list`).
    Models(fetch::ListArgs),
    /// Write a model as a standard ONNX decoder with KV cache.
    Export(export::Args),
    /// Compile a model into a `.kiln` artifact for a target.
    Compile(compile::Args),
    /// Quantize a model (q8_0, q4_0, q4_1, per-tensor overrides) into a `.kiln` artifact for
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
    /// Write a tiny random Llama 3.2-shaped checkpoint (Hugging Face layout) for tests.
    GenTiny(gen_tiny::Args),
    /// Write an f16 GGUF with the exact shape of Llama 3.2 1B/3B or 3.1 8B and random weights.
    GenShaped(gen_shaped::Args),
    /// Fetch, compile and run the default model (or another card) on a prompt.
    Run(run::Args),
    /// Fetch the test assets and Python peers, then run the whole test suite.
    Test(test::Args),
    /// Benchmark kiln against llama.cpp (prompt, decode, time to first token, peak RSS).
    Bench(bench::Args),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Fetch(args) => fetch::run(args),
        Command::Models(args) => fetch::list(args),
        Command::Export(args) => export::run(args),
        Command::Compile(args) => compile::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Build(args) => build::run(args),
        Command::Bundle(args) => bundle::run(args),
        Command::Flash(args) => flash::run(args),
        Command::Targets(args) => targets::run(args),
        Command::GenTiny(args) => gen_tiny::run(args),
        Command::GenShaped(args) => gen_shaped::run(args),
        Command::Run(args) => run::run(args),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kiln_engine::report::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
