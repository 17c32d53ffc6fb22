//! `kiln`: run, chat with, score, tokenize with, benchmark and serve compiled models. The
//! command line is a library so that the fuzz targets (`fuzz/`) drive the real server.

mod bench;
mod chat;
mod common;
mod perplexity;
mod run;
mod serve;
mod tokenize;

use clap::{Parser, Subcommand};

/// kiln runs Llama 3–family models compiled ahead of time into `.kiln` artifacts
/// (`cargo xtask compile` makes them).
#[derive(Parser)]
#[command(
    name = "kiln",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("KILN_GIT_COMMIT"), ")"),
    about,
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed as it is produced.
    Run(run::Args),
    /// Multi-turn chat using the model's own chat template.
    Chat(chat::Args),
    /// Perplexity of a text file, computed as llama.cpp's `llama-perplexity` does.
    Perplexity(perplexity::Args),
    /// Print the token ids of a text.
    Tokenize(tokenize::Args),
    /// Measure prompt and decode speed.
    Bench(bench::Args),
    /// Serve the model over HTTP (llama.cpp / OpenAI completion and chat endpoints).
    Serve(serve::Args),
}

/// Runs the `kiln` command line `args` (the program name first, as `std::env::args_os`).
pub fn main<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kiln_engine::report::error_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
