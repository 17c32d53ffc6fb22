//! The file-based targets' scratch directory: one per process (in `/dev/shm` where
//! there is one, so each input is a write to memory), removed when the fuzzer exits.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_scratch() {
    if let Some(dir) = DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// This process's scratch directory.
pub fn dir() -> &'static Path {
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = parent.join(format!("kiln-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        // SAFETY: `remove_scratch` is a plain `extern "C"` function that only reads a static;
        // libc runs it once when libFuzzer exits.
        let registered = unsafe { libc::atexit(remove_scratch) };
        assert_eq!(registered, 0, "atexit");
        dir
    })
}

/// Writes `bytes` as `name` in the scratch directory and returns its path.
pub fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir().join(name);
    std::fs::write(&path, bytes).expect("scratch file");
    path
}
