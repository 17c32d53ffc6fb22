//! `--model` resolution shared by the subcommands: a path to a checkpoint (GGUF, Hugging Face
//! directory, or an ONNX decoder lowered back through tract), or a model card (fetched into
//! the cache on demand).

use std::path::{Path, PathBuf};

use crate::graph::Checkpoint;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

/// The checkpoint file or directory `model` names: an existing path as is, else a card's files.
pub fn checkpoint_path(model: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(model);
    if path.exists() && !model.ends_with(".toml") {
        return Ok(path);
    }
    if model.contains(std::path::MAIN_SEPARATOR) || model.ends_with(".gguf") || is_onnx(&path) {
        anyhow::bail!("{model}: no such file or directory");
    }
    Ok(crate::pipeline::fetch::ensure_model(model)?.primary)
}

/// Imports `model` with a spinner, since reading and unpacking weights takes a few seconds.
pub fn import(model: &str) -> anyhow::Result<Checkpoint> {
    let path = checkpoint_path(model)?;
    let spinner = spinner(&format!("importing {}", path.display()));
    let checkpoint = if is_onnx(&path) {
        import_onnx(&path)
    } else {
        crate::import::import(&path).map_err(anyhow::Error::from)
    }
    .with_context(|| format!("importing {}", path.display()));
    spinner.finish_and_clear();
    checkpoint
}

/// An ONNX decoder lowered back through tract (feature `onnx-input`).
#[cfg(feature = "onnx-input")]
fn import_onnx(path: &Path) -> anyhow::Result<Checkpoint> {
    Ok(crate::lower::import_onnx(path)?)
}

/// Without tract in the build, an ONNX input is refused with the way to add it.
#[cfg(not(feature = "onnx-input"))]
fn import_onnx(path: &Path) -> anyhow::Result<Checkpoint> {
    anyhow::bail!(
        "{}: ONNX input is read through tract, which this build leaves out to build faster; \
         build with the `onnx-input` feature (`cargo install kiln-compiler --features \
         onnx-input`; in kiln's repository `cargo run --release -p xtask --features onnx-input \
         -- <command> ...`), or give the GGUF or Hugging Face checkpoint",
        path.display()
    )
}

/// An ONNX decoder (`.onnx`), which is lowered rather than imported.
fn is_onnx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// A spinner on stderr for a step of unknown length.
pub fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
