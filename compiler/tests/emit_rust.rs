//! `kilnc compile --emit rust` (through `cargo xtask compile`): the artifact beside a Rust
//! module that bakes it in with `include_bytes!` and states the session's memory plan, which
//! must be the plan the runtime makes for those options. The same generator writes the module
//! `examples/firmware` compiles and runs (`firmware.rs`).

mod common;

use std::process::Command;

use kiln_runtime::artifact::embed::EmbedOptions;
use kiln_runtime::artifact::parse;
use kiln_runtime::exec::MemoryPlan;

fn xtask() -> Command {
    Command::new(common::binary("xtask", "cargo build --release -p xtask"))
}

/// The integer constant `name` in `source`.
fn constant(source: &str, name: &str) -> usize {
    let line = source
        .lines()
        .find(|l| l.starts_with(&format!("pub const {name}: usize = ")))
        .unwrap_or_else(|| panic!("no {name} in\n{source}"));
    line.rsplit(' ')
        .next()
        .and_then(|v| v.trim_end_matches(';').parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_module_embeds_the_artifact_beside_it_with_the_runtimes_plan() {
    let dir = tempfile::tempdir().expect("temp dir");
    let module = dir.path().join("model.rs");
    let out = xtask()
        .args(["compile", "--model"])
        .arg(common::smollm2_gguf())
        .args(["--target", "rpi5", "--ctx", "256", "--emit", "rust", "-o"])
        .arg(&module)
        .output()
        .expect("running xtask");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = std::fs::read_to_string(&module).expect("the module");
    let artifact = std::fs::read(dir.path().join("model.kiln")).expect("the artifact beside it");
    assert!(
        source.contains(r#"include_bytes!("model.kiln")"#),
        "{source}"
    );
    assert!(source.contains("#[repr(C, align(64))]"), "{source}");
    assert!(
        source.contains(r#"REQUIRED_CPU_FEATURES: &[&str] = &["neon", "dotprod", "fp16", ]"#),
        "{source}"
    );

    let parsed = parse(&artifact).expect("a valid artifact");
    let options = EmbedOptions {
        context: 256,
        ..EmbedOptions::default()
    };
    let plan = MemoryPlan::new(&parsed.meta, &options.session()).expect("plan");
    assert_eq!(constant(&source, "CONTEXT"), 256);
    assert_eq!(constant(&source, "ARENA_FLOATS") * 4, plan.session_bytes());
    assert_eq!(constant(&source, "KV_CACHE_BYTES"), plan.kv_cache);
    assert_eq!(constant(&source, "WEIGHT_BYTES"), plan.weights);
}

#[test]
fn rust_output_needs_an_rs_path_and_writes_nothing_otherwise() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = xtask()
        .args(["compile", "--model"])
        .arg(common::smollm2_gguf())
        .args(["--emit", "rust", "-o"])
        .arg(dir.path().join("model.kiln"))
        .output()
        .expect("running xtask");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("give -o a `.rs` path"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}
