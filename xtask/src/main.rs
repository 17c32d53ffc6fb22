//! `cargo xtask`: this repository's automation — test, bench, run, gen-tiny, gen-shaped — beside
//! the compiler's own pipeline (`kilnc`'s commands, from `kiln_compiler::cli`). One module per
//! subcommand; `main` only parses the command line and dispatches.

mod bench;
mod bench_arm;
mod fuzz;
mod fuzz_seeds;
mod gen_shaped;
mod gen_tiny;
mod llama_bench;
mod run;
mod test;
#[cfg(test)]
mod tidy;

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
    #[command(flatten)]
    Pipeline(kiln_compiler::cli::Command),
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
    /// Fuzz kiln's parsers of outside input with cargo-fuzz (nightly).
    Fuzz(fuzz::Args),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Pipeline(command) => kiln_compiler::cli::run(command),
        Command::GenTiny(args) => gen_tiny::run(args),
        Command::GenShaped(args) => gen_shaped::run(args),
        Command::Run(args) => run::run(args),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kiln_engine::report::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
