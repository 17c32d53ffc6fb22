//! Puts the git commit kiln was built from into `kiln --version` (`KILN_GIT_COMMIT`:
//! 12 hex digits, or `unknown` outside a git checkout, e.g. from a source archive).

use std::path::Path;
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KILN_GIT_COMMIT={commit}");
    // Built again when HEAD moves: HEAD itself, the branch it names, and the packed refs (only
    // those that exist: cargo would rerun for a missing one every time).
    let git = Path::new("../../.git");
    let mut watched = vec![git.join("HEAD"), git.join("packed-refs")];
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            watched.push(git.join(branch));
        }
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // Without any of them (not a checkout), the build script's own source is what matters.
    println!("cargo:rerun-if-changed=build.rs");
}
