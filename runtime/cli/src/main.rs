//! The `kiln` binary: the command line of [`kiln_cli`].

fn main() -> std::process::ExitCode {
    kiln_cli::main(std::env::args_os())
}
