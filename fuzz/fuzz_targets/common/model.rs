//! The default model's artifact, for the targets that need a vocabulary or a server.

use std::path::PathBuf;

/// The default model's artifact the targets that need a vocabulary or a server load:
/// `$KILN_FUZZ_MODEL`, else where `cargo xtask run` compiles it.
pub fn default_model() -> PathBuf {
    let path = std::env::var_os("KILN_FUZZ_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("KILN_HOME").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln")
            });
            home.join("artifacts/smollm2-135m-instruct.q4_1.kiln")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask run` once (or set KILN_FUZZ_MODEL)",
        path.display()
    );
    path
}
