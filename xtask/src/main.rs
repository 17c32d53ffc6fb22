//! `cargo xtask`: kiln's host pipeline. One module per subcommand; `main` only parses the
//! command line and dispatches.

mod cache;
mod fetch;
mod hf;
mod pypi;

use clap::{Parser, Subcommand};

/// kiln's host pipeline: get a Llama 3-family checkpoint, compile it for a device, run it.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, propagate_version = true)]
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Fetch(args) => fetch::run(args),
        Command::Models(args) => fetch::list(args),
    }
}
