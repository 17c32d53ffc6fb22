//! Bakes the model into the firmware: reads the artifact `cargo xtask model` wrote (or the one
//! `KILN_FIRMWARE_ARTIFACT` names), checks the CPU features it requires against the ones this
//! build targets, plans the session's memory, tokenizes the prompt with the artifact's own
//! tokenizer, and writes `$OUT_DIR/model.rs` (the artifact through `include_bytes!` and the
//! plan as constants) and `$OUT_DIR/prompt.rs`. The plan is reported with build-print.

use std::path::{Path, PathBuf};

use build_print::info;
use kiln_engine::tokenizer::{Tokenizer, TokenizerData};
use kiln_runtime::artifact::embed::{rust_module, EmbedOptions};

/// The prompt the firmware answers, and how many tokens it generates.
const PROMPT: &str = "The capital of France is";
const GENERATE: usize = 8;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=KILN_FIRMWARE_ARTIFACT");
    let artifact = match std::env::var_os("KILN_FIRMWARE_ARTIFACT") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/model.kiln"),
    };
    println!("cargo:rerun-if-changed={}", artifact.display());
    let bytes = std::fs::read(&artifact).map_err(|e| {
        format!(
            "{}: {e} (run `cargo xtask model` in examples/firmware first)",
            artifact.display()
        )
    })?;
    let parsed = kiln_runtime::artifact::parse(&bytes)
        .map_err(|e| format!("{}: {e}", artifact.display()))?;
    check_target_features(&parsed.meta.required_cpu_features)?;

    let path = artifact
        .canonicalize()
        .map_err(|e| format!("{}: {e}", artifact.display()))?;
    let path = path.to_str().ok_or("the artifact's path is not UTF-8")?;
    let module = rust_module(
        &bytes,
        path,
        &EmbedOptions {
            context: 256,
            ..EmbedOptions::default()
        },
    )
    .map_err(|e| format!("{}: {e}", artifact.display()))?;
    let plan = &module.plan;
    let mb = |b: usize| b as f64 / 1e6;
    info!(
        "kiln: {} baked in: weights {:.1} MB, static arena {:.1} MB (KV cache {:.1} MB for {} tokens, buffers {:.1} MB, scratch {:.1} MB, logits {:.1} MB); kernels for {:?}",
        parsed.meta.facts.name,
        mb(plan.weights),
        mb(plan.session_bytes()),
        mb(plan.kv_cache),
        plan.context,
        mb(plan.buffers),
        mb(plan.scratch),
        mb(plan.logits),
        parsed.meta.required_cpu_features,
    );

    let tokenizer = TokenizerData::from_bytes(&bytes[parsed.tokenizer.clone()])
        .and_then(|data| Tokenizer::new(&data))
        .map_err(|e| format!("{}: tokenizer: {e}", artifact.display()))?;
    let facts = &parsed.meta.facts;
    let bos = facts.bos_id.filter(|_| facts.add_bos);
    let ids: Vec<u32> = bos
        .into_iter()
        .chain(tokenizer.encode(PROMPT, false))
        .collect();
    let prompt = format!(
        "/// {PROMPT:?}, tokenized at build time.\npub const PROMPT_IDS: &[u32] = &{ids:?};\n/// Tokens generated after it.\npub const GENERATE: usize = {GENERATE};\n"
    );

    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    std::fs::write(out.join("model.rs"), module.source).map_err(|e| e.to_string())?;
    std::fs::write(out.join("prompt.rs"), prompt).map_err(|e| e.to_string())?;
    Ok(())
}

/// Every feature the artifact requires must be one this build targets: firmware cannot ask
/// the CPU at run time, so a missing one would only be found on the device.
fn check_target_features(required: &[String]) -> Result<(), String> {
    let target = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let have: Vec<&str> = target.split(',').collect();
    let missing: Vec<&String> = required
        .iter()
        .filter(|f| !have.contains(&f.as_str()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the artifact requires the CPU features {missing:?}, which this build does not target; build for the device's CPU (e.g. -C target-cpu=cortex-a76 for a Raspberry Pi 5, as .cargo/config.toml does) or compile the model for another target"
    ))
}
