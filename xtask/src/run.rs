//! `cargo xtask run`: the whole path in one command — fetch the card's checkpoint, compile it
//! (cached under `$KILN_HOME/artifacts`), then stream text with `kiln run`.

use std::ffi::OsString;
use std::process::Command;

use anyhow::{bail, Context};

use crate::compile;

/// Fetch, compile and run a model card (default: the default model) on a prompt.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The model card.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Weight storage (see `cargo xtask compile --help`).
    #[arg(long, default_value = "q4_1")]
    pub quant: String,
    /// The prompt.
    #[arg(short = 'p', long, default_value = "The capital of France is")]
    pub prompt: String,
    /// More `kiln run` options after `--`, e.g. `-- -n 64 --temp 0`.
    #[arg(last = true)]
    pub kiln_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let out = crate::cache::kiln_home()?
        .join("artifacts")
        .join(format!("{}.{}.kiln", args.model, args.quant));
    if !out.is_file() {
        std::fs::create_dir_all(out.parent().context("artifact path has a parent")?)?;
        compile::run(compile::Args {
            model: args.model.clone(),
            target: "host".into(),
            quant: Some(args.quant.clone()),
            overrides: Vec::new(),
            out: out.clone(),
            ctx: None,
            max_memory: None,
            json: false,
        })?;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let status = Command::new(cargo)
        .args(["run", "--quiet", "--release", "--bin", "kiln", "--", "run"])
        .arg(&out)
        .args(["-p", &args.prompt])
        .args(&args.kiln_args)
        .status()
        .context("running kiln")?;
    if !status.success() {
        bail!("kiln run failed ({status})");
    }
    Ok(())
}
