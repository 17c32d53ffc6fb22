//! The repository's conventions, checked by code (run with the other tests): every Rust file
//! says what it is for, every `unsafe` says why it is sound, no to-do note without an issue,
//! no `unwrap()` in library code, and the runtime core's dependency tree holds no front-end
//! crate. The patterns below are spelt in pieces so that this file does not match them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (this crate's parent).
fn root() -> &'static Path {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask)
}

/// Every Rust file git tracks or would track (ignored build outputs left out), with its text.
fn rust_files() -> Vec<(PathBuf, String)> {
    let out = Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "*.rs",
        ])
        .current_dir(root())
        .output()
        .expect("running git ls-files");
    assert!(out.status.success(), "git ls-files: {}", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|f| root().join(f))
        .filter(|p| p.exists())
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Code before any `//` comment on a line (good enough: `//` inside string literals is rare
/// and only makes the checks below stricter).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    let missing: Vec<String> = rust_files()
        .into_iter()
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(p, _)| relative(&p))
        .collect();
    assert!(missing.is_empty(), "no `//!` line at the top: {missing:#?}");
}

/// Where an `unsafe` block or impl at `lines[i]` is justified: a `SAFETY` comment on its line
/// or in the comments and attributes right above it, or a `SAFETY (every … below)` comment
/// earlier in the same item (a table of closures, each calling one kernel).
fn justified(lines: &[&str], i: usize) -> bool {
    if lines[i].contains("SAFETY") {
        return true;
    }
    let above = lines[..i]
        .iter()
        .rev()
        .map(|l| l.trim())
        .take_while(|l| l.starts_with("//") || l.starts_with("#["));
    if above.into_iter().any(|l| l.contains("SAFETY")) {
        return true;
    }
    lines[..i]
        .iter()
        .rev()
        .take_while(|l| !l.starts_with('}'))
        .any(|l| l.contains("SAFETY (every"))
}

#[test]
fn every_unsafe_says_why_it_is_sound() {
    let mut bare = Vec::new();
    for (path, text) in rust_files() {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let c = code(line);
            let opens =
                c.contains(concat!("unsafe", " {")) || c.contains(concat!("unsafe", " impl"));
            if opens && !justified(&lines, i) {
                bare.push(format!("{}:{}: {}", relative(&path), i + 1, line.trim()));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "`unsafe` without a `// SAFETY:` line: {bare:#?}"
    );
}

#[test]
fn todos_name_an_issue() {
    let mut loose = Vec::new();
    for (path, text) in rust_files() {
        for (i, line) in text.lines().enumerate() {
            for word in [
                concat!("TO", "DO"),
                concat!("FIX", "ME"),
                concat!("X", "XX"),
            ] {
                if let Some(at) = line.find(word) {
                    if !line[at..].contains("(#") {
                        loose.push(format!("{}:{}: {}", relative(&path), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        loose.is_empty(),
        "name the issue, as in {}(#12): {loose:#?}",
        concat!("TO", "DO")
    );
}

/// Library code: outside tests, benches, examples and this crate (which may use `anyhow` and
/// panic on a broken repository).
fn is_library(path: &str) -> bool {
    !(path.contains("/tests/")
        || path.ends_with("/tests.rs")
        || path.contains("/benches/")
        || path.starts_with("xtask/")
        || path.starts_with("examples/"))
}

#[test]
fn library_code_does_not_unwrap() {
    let mut found = Vec::new();
    for (path, text) in rust_files() {
        let name = relative(&path);
        if !is_library(&name) {
            continue;
        }
        let body = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in body.lines().enumerate() {
            if code(line).contains(".unwrap()") {
                found.push(format!("{name}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "`unwrap()` in library code (return an error, or `expect` an invariant): {found:#?}"
    );
}

#[test]
fn the_runtime_core_pulls_no_front_end_crate() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--locked", "-p", "kiln-runtime", "-e", "normal"])
        .args(["--prefix", "none", "--format", "{lib}"])
        .current_dir(root())
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree.lines().map(str::trim).collect();
    assert!(crates.contains(&"kiln_runtime"), "{tree}");
    let front_end = [
        "clap",
        "anyhow",
        "indicatif",
        "minijinja",
        "fancy_regex",
        "regex",
        "ndarray",
        "ort",
        "tract_core",
        "tract_onnx",
        "ureq",
        "kiln_engine",
    ];
    let pulled: Vec<&&str> = front_end.iter().filter(|c| crates.contains(c)).collect();
    assert!(
        pulled.is_empty(),
        "kiln-runtime (default features) depends on {pulled:?}"
    );
}
