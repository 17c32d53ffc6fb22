//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (kiln's parsers of outside
//! input) for a while each, with nightly Rust and libFuzzer, and says how many inputs each ran.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

/// The targets in `fuzz/fuzz_targets/`, in the order they run.
const TARGETS: &[&str] = &[
    "artifact",
    "gguf",
    "hf_checkpoint",
    "onnx",
    "tokenizer_json",
    "tiktoken",
    "chat_request",
    "json_schema",
    "http",
];

/// Fuzz kiln's parsers (needs `rustup toolchain install nightly` and `cargo install cargo-fuzz`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let fuzz_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let repo = fuzz_dir.join("..");
    // The vocabulary of `json_schema` and the model `http` serves.
    let model = crate::run::compiled("smollm2-135m-instruct", "q4_1")?;
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        if std::fs::read_dir(&corpus)?.next().is_none() {
            let n = crate::fuzz_seeds::write(target, &corpus, &repo)?;
            eprintln!("fuzz: {n} seed input(s) for {target}");
        }
        eprintln!("fuzz: {target} for {} s", args.seconds);
        let mut fuzz = Command::new("cargo");
        fuzz.args(["+nightly", "fuzz", "run", "-O", target, "--"])
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-print_final_stats=1")
            .env("KILN_FUZZ_MODEL", &model);
        if target == "http" {
            // The server logs each request; libFuzzer keeps its own report on a copy of stderr.
            fuzz.arg("-close_fd_mask=2");
        }
        let status = fuzz
            .current_dir(&fuzz_dir)
            .status()
            .context(
                "running cargo +nightly fuzz (rustup toolchain install nightly; cargo install cargo-fuzz)",
            )?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}): the crashing input is under fuzz/artifacts/{target}/"
            );
        }
    }
    Ok(())
}
