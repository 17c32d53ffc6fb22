//! `kilnc`: kiln's compiler on the command line — fetch a Llama 3-family checkpoint, compile
//! it for a device, build, bundle and flash what the device runs.

use clap::Parser;

/// kiln's compiler: get a Llama 3-family checkpoint, compile it for a device, install it.
#[derive(Debug, Parser)]
#[command(name = "kilnc", version, propagate_version = true)]
#[command(after_help = "Run `kilnc <COMMAND> --help` for the details of a command.")]
struct Cli {
    #[command(subcommand)]
    command: kiln_compiler::cli::Command,
}

fn main() -> std::process::ExitCode {
    match kiln_compiler::cli::run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kiln_engine::report::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
