//! Shared by the tokenizer integration tests: locating model files outside the repository
//! and running the Python reference script `testdata/tokenizer/tiktoken_ids.py`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `$KILN_HOME`, else `~/.cache/kiln`.
fn kiln_home() -> PathBuf {
    if let Some(home) = std::env::var_os("KILN_HOME") {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&user_home).join(".cache/kiln")
}

/// The file named by `env`, else `$KILN_HOME/<default>`; a clear failure if neither exists.
pub fn locate(env: &str, default: &str) -> PathBuf {
    let path = match std::env::var_os(env) {
        Some(path) => PathBuf::from(path),
        None => kiln_home().join(default),
    };
    assert!(
        path.is_file(),
        "{} not found: set {env} to the file, or place it at $KILN_HOME/{default} (KILN_HOME defaults to ~/.cache/kiln)",
        path.display()
    );
    path
}

pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tokenizer")
        .join(name)
}

/// The shared test strings.
pub fn strings() -> Vec<String> {
    let text = std::fs::read(testdata("strings.json")).expect("reading strings.json");
    serde_json::from_slice(&text).expect("parsing strings.json")
}

/// Runs the reference script (interpreter from `$KILN_PYTHON`, else `python3`): tiktoken ids
/// for Meta's `model` when given, `tokenizers` ids for `tokenizer_json` when given.
pub fn reference_ids(model: Option<&Path>, tokenizer_json: Option<&Path>) -> Value {
    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.arg(testdata("tiktoken_ids.py"))
        .arg(model.map_or_else(|| "-".into(), |m| m.as_os_str().to_owned()))
        .arg(testdata("strings.json"));
    if let Some(json) = tokenizer_json {
        cmd.arg(json);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {python} (set KILN_PYTHON): {e}"));
    assert!(
        out.status.success(),
        "tiktoken_ids.py failed (needs `pip install tiktoken tokenizers`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parsing tiktoken_ids.py output")
}

/// Ids under `path` (e.g. `/hf/plain`) of the reference output, one list per string.
pub fn id_lists(reference: &Value, path: &str) -> Vec<Vec<u32>> {
    serde_json::from_value(reference.pointer(path).cloned().unwrap_or_default())
        .unwrap_or_else(|e| panic!("reference output {path}: {e}"))
}

/// Compares `ours` with `theirs` string by string; reports every mismatch at once.
pub fn assert_same_ids(what: &str, strings: &[String], ours: &[Vec<u32>], theirs: &[Vec<u32>]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: list lengths");
    let bad: Vec<String> = strings
        .iter()
        .zip(ours.iter().zip(theirs))
        .filter(|(_, (a, b))| a != b)
        .map(|(s, (a, b))| format!("  {s:?}\n    kiln:      {a:?}\n    reference: {b:?}"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} strings differ:\n{}",
        bad.len(),
        strings.len(),
        bad.join("\n")
    );
}
