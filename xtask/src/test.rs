//! `cargo xtask test`: everything the test suite needs (the default model, Meta's tokenizer,
//! the onnxruntime library, the Python peers it compares against), then the workspace's
//! binaries and libraries (`kiln`, `xtask`, libkiln: the integration tests run them) and
//! `cargo test --release --workspace`.

use std::ffi::OsString;
use std::process::Command;

use anyhow::{bail, Context};

use kiln_compiler::pipeline::pypi::python_from_env;

/// The peers kiln is checked against, pinned; installed with pip when missing.
const PYTHON_PEERS: &[(&str, &str)] = &[
    ("import numpy", "numpy==2.4.6"),
    ("import onnxruntime", "onnxruntime==1.32.0"),
    ("import tiktoken", "tiktoken==0.14.0"),
    ("import tokenizers", "tokenizers==0.23.3"),
    ("import jinja2", "jinja2==3.1.6"),
    // llama.cpp's own GGUF reader: the reference dequantization of every block format.
    ("import gguf", "gguf==0.19.0"),
    // The renderer behind `apply_chat_template` (tool conversations; no torch needed).
    (
        "from transformers.utils.chat_template_utils import render_jinja_template",
        "transformers==5.25.0",
    ),
    // The validator of structured output, with the checkers of `date-time`, `uri`, … .
    (
        "import jsonschema, rfc3339_validator, rfc3986_validator, fqdn, isoduration",
        "jsonschema[format-nongpl]==4.26.0",
    ),
];

/// Every optional part of the workspace the tests cover (ONNX input through tract).
const TEST_FEATURES: &str = "kiln-compiler/onnx-input,xtask/onnx-input";

/// Fetch the test assets, install the Python peers, run the whole test suite.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let python = python_from_env();
    install_peers(&python)?;
    let gguf = kiln_compiler::pipeline::fetch::ensure_model("smollm2-135m-instruct")?.primary;
    let tokenizer = kiln_compiler::pipeline::fetch::ensure_model("llama3-tokenizer")?.primary;
    let onnxruntime = kiln_compiler::pipeline::onnxruntime::ensure(std::env::consts::ARCH)?;
    let llama_models = python_output(
        &python,
        "import llama_models, os; print(os.path.dirname(llama_models.__file__))",
    )?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    // `cargo test` builds a package's binaries only for that package's own tests; the
    // compiler's tests run `kiln` (kiln-cli) and link libkiln (kiln-ffi), so build them all,
    // with the same features, first. With the tests in the same build, the dependencies get
    // the features the dev-dependencies add (e.g. proptest's `bit-set` defaults under tract),
    // so `cargo test` reuses every crate instead of building tract and the compiler again.
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--workspace",
            "--lib",
            "--bins",
            "--tests",
            "--features",
            TEST_FEATURES,
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let status = Command::new(cargo)
        .args(["test", "--release", "--workspace", "--no-fail-fast"])
        .args(["--features", TEST_FEATURES])
        .args(&args.cargo_args)
        .env("KILN_TEST_GGUF", gguf)
        .env("KILN_TEST_LLAMA3_TOKENIZER", tokenizer)
        .env("KILN_TEST_LLAMA_MODELS", llama_models.trim())
        .env("KILN_PYTHON", &python)
        .env("KILN_TEST_ORT_DYLIB", onnxruntime)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// Installs (user-wide, pinned) each peer whose probe fails; Meta's reference code
/// (llama-models) is installed without its dependencies, since tests only read its source.
fn install_peers(python: &OsString) -> anyhow::Result<()> {
    let missing: Vec<&str> = PYTHON_PEERS
        .iter()
        .filter(|(probe, _)| python_output(python, probe).is_err())
        .map(|(_, spec)| *spec)
        .collect();
    if !missing.is_empty() {
        eprintln!("installing Python peers: {}", missing.join(" "));
        pip(python, &missing, false)?;
    }
    if python_output(python, "import llama_models").is_err() {
        pip(python, &["llama-models==0.3.0"], true)?;
    }
    Ok(())
}

fn pip(python: &OsString, specs: &[&str], no_deps: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    if no_deps {
        cmd.arg("--no-deps");
    }
    let status = cmd.args(specs).status().context("running pip")?;
    if !status.success() {
        bail!("pip install {} failed ({status})", specs.join(" "));
    }
    Ok(())
}

fn python_output(python: &OsString, code: &str) -> anyhow::Result<String> {
    let out = Command::new(python)
        .args(["-c", code])
        .output()
        .context("running python")?;
    if !out.status.success() {
        bail!(
            "python -c {code:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
