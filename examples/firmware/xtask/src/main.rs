//! `cargo xtask model [--target T] [--ctx N]`: fetches kiln's default model and compiles it for
//! the device into `model/model.kiln`, which the firmware's build script bakes into the binary.
//! This is the part of a user's own build pipeline that calls kiln's compiler as a library.

use std::path::Path;

use anyhow::Context;
use kiln_compiler::pipeline::{compile, fetch};

/// The card the firmware carries.
const MODEL: &str = "smollm2-135m-instruct";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    anyhow::ensure!(
        args.next().as_deref() == Some("model"),
        "usage: cargo xtask model [--target rpi5] [--ctx 256]"
    );
    let (mut target, mut ctx) = ("rpi5".to_owned(), 256);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--target" => target = value,
            "--ctx" => ctx = value.parse().with_context(|| format!("--ctx {value}"))?,
            _ => anyhow::bail!("unknown option {flag} (--target, --ctx)"),
        }
    }
    let checkpoint = fetch::ensure_model(MODEL)?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the xtask crate sits in the firmware workspace")?;
    let out = workspace.join("model/model.kiln");
    std::fs::create_dir_all(workspace.join("model"))?;
    let compiled = compile::compile(&compile::Args {
        model: checkpoint.primary.display().to_string(),
        target,
        quant: None,
        overrides: Vec::new(),
        out,
        ctx: Some(ctx),
        max_memory: None,
        json: false,
        emit: compile::Emit::Kiln,
    })?;
    println!("{}", compiled.summary);
    Ok(())
}
