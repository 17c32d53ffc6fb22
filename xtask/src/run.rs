//! `cargo xtask run`: the whole path in one command — fetch the card's checkpoint, compile it
//! (cached under `$KILN_HOME/artifacts`), then stream text with `kiln run`; with the ort
//! backend, export the ONNX instead and run it on the target's execution providers.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

use kiln_compiler::pipeline::{compile, export};

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
    /// The device whose backend and execution providers to use (`cargo xtask targets`).
    #[arg(long, default_value = "host")]
    pub target: String,
    /// `native` (a `.kiln` artifact) or `ort` (the exported ONNX on onnxruntime);
    /// default: the target's.
    #[arg(long)]
    pub backend: Option<String>,
    /// More `kiln run` options after `--`, e.g. `-- -n 64 --temp 0`.
    #[arg(last = true)]
    pub kiln_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let target = compile::resolve_target(&args.target)?;
    let backend = args.backend.as_deref().unwrap_or(target.backend.name());
    let (model, backend_args) = match backend {
        "native" => (compiled(&args.model, &args.quant)?, Vec::new()),
        "ort" => {
            let library = kiln_compiler::pipeline::onnxruntime::ensure(std::env::consts::ARCH)?;
            let eps: Vec<&str> = target.execution_providers.iter().map(|e| e.key()).collect();
            let mut flags = vec!["--ort-lib".into(), library.into_os_string()];
            if !eps.is_empty() {
                flags.extend(["--ep".into(), eps.join(",").into()]);
            }
            (onnx(&args)?, flags)
        }
        other => bail!("unknown --backend {other:?} (native or ort)"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let status = Command::new(cargo)
        .args(["run", "--quiet", "--release", "--bin", "kiln", "--", "run"])
        .arg(&model)
        .args(backend_args)
        .args(["-p", &args.prompt])
        .args(&args.kiln_args)
        .status()
        .context("running kiln")?;
    if !status.success() {
        bail!("kiln run failed ({status})");
    }
    Ok(())
}

/// The card `model` compiled to `quant` for this machine, cached under `$KILN_HOME/artifacts`.
pub fn compiled(model: &str, quant: &str) -> anyhow::Result<PathBuf> {
    let out = kiln_compiler::pipeline::cache::kiln_home()?
        .join("artifacts")
        .join(format!("{model}.{quant}.kiln"));
    if !out.is_file() {
        std::fs::create_dir_all(out.parent().context("artifact path has a parent")?)?;
        compile::run(compile::Args {
            model: model.to_owned(),
            target: "host".into(),
            quant: Some(quant.to_owned()),
            overrides: Vec::new(),
            out: out.clone(),
            ctx: None,
            max_memory: None,
            json: false,
            emit: compile::Emit::Kiln,
        })?;
    }
    Ok(out)
}

/// The card exported as ONNX (`MatMulNBits` for block formats), cached under `$KILN_HOME/artifacts`.
fn onnx(args: &Args) -> anyhow::Result<PathBuf> {
    let out = kiln_compiler::pipeline::cache::kiln_home()?
        .join("artifacts")
        .join(format!("{}.{}.onnx", args.model, args.quant));
    if !out.is_file() {
        std::fs::create_dir_all(out.parent().context("ONNX path has a parent")?)?;
        let quantized = !matches!(args.quant.as_str(), "f32" | "f16");
        export::run(export::Args {
            model: args.model.clone(),
            out: out.clone(),
            external_data: false,
            quantized,
            quant: Some(args.quant.clone()),
            json: false,
        })?;
    }
    Ok(out)
}
