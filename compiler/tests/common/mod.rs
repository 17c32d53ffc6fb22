//! Shared by the compiler's integration tests: where the test assets are, and building artifacts.
#![allow(dead_code)]

pub mod forced;
pub mod serve;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use kiln_engine::generate::Model;
use kiln_engine::perplexity::{perplexity, Windows};
use kiln_runtime::quant::Format;

/// A binary cargo built next to this test's `deps/` (`target/<profile>/NAME`); a missing one
/// fails the test saying how to build it.
pub fn binary(name: &str, build: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it with `{build}` (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// The `kiln` binary of this build.
pub fn kiln_binary() -> PathBuf {
    binary("kiln", "cargo build --release --bin kiln")
}

/// The kiln cache (`$KILN_HOME`, default `~/.cache/kiln`).
pub fn kiln_home() -> PathBuf {
    std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln")
        })
}

/// The default model's GGUF: `$KILN_TEST_GGUF`, else where `cargo xtask fetch` puts it.
pub fn smollm2_gguf() -> PathBuf {
    let path = std::env::var_os("KILN_TEST_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            kiln_home().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask fetch smollm2-135m-instruct` (or `cargo xtask test`), or set KILN_TEST_GGUF",
        path.display()
    );
    path
}

/// The repository's `testdata/`.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// llama.cpp's reference outputs.
pub fn golden() -> serde_json::Value {
    let path = testdata().join("golden/smollm2-135m-instruct.json");
    serde_json::from_slice(&std::fs::read(&path).expect("golden data")).expect("golden JSON")
}

/// Imports the default model and writes it as an artifact in `quant` under `dir`.
pub fn compile_smollm2(dir: &Path, quant: Format) -> PathBuf {
    let checkpoint = kiln_compiler::import::import(&smollm2_gguf()).expect("import");
    let converted = kiln_compiler::emit::convert(&checkpoint, quant).expect("convert");
    let out = dir.join(format!("smollm2-{}.kiln", quant.name()));
    kiln_compiler::emit::write_artifact(&converted, &out).expect("write artifact");
    out
}

/// The default model compiled to `quant` with its matrices packed in `layout`, once per test
/// binary and layout.
pub fn smollm2_packed(quant: Format, layout: kiln_runtime::layout::Layout) -> PathBuf {
    if layout == kiln_runtime::layout::Layout::Rows {
        return smollm2_artifact(quant);
    }
    static BUILT: OnceLock<Mutex<HashMap<(Format, kiln_runtime::layout::Layout), PathBuf>>> =
        OnceLock::new();
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    built
        .entry((quant, layout))
        .or_insert_with(|| {
            let checkpoint = kiln_compiler::import::import(&smollm2_gguf()).expect("import");
            let converted = kiln_compiler::emit::convert(&checkpoint, quant).expect("convert");
            let out = shared_dir().join(format!("smollm2-{}-{}.kiln", quant.name(), layout.name()));
            let packing = kiln_compiler::emit::Packing::new(&[], layout);
            kiln_compiler::emit::write_artifact_for(&converted, &out, &packing)
                .expect("write artifact");
            out
        })
        .clone()
}

/// A directory for what this test binary's tests share (compiled models), removed when the
/// process exits: a static `TempDir` is never dropped, and each run would leave its models
/// (hundreds of MB) behind.
pub fn shared_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove_shared_dir() {
        if let Some(dir) = DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("kiln-tests-")
            .tempdir()
            .expect("temp dir")
            .keep();
        // SAFETY: `remove_shared_dir` is a plain `extern "C"` function that only reads a
        // static; libc runs it once at exit, after the test harness returns or exits.
        let registered = unsafe { libc::atexit(remove_shared_dir) };
        assert_eq!(registered, 0, "atexit");
        dir
    })
}

/// SplitMix64: a few lines, deterministic, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// The bytes of an f16 uniform in `[-scale, scale)`.
    pub fn half(&mut self, scale: f32) -> [u8; 2] {
        half::f16::from_f32(self.uniform() * scale).to_le_bytes()
    }
}

/// Python for the peer checks: `$KILN_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The default model compiled to `quant`, once per test binary.
pub fn smollm2_artifact(quant: Format) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<Format, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    built
        .entry(quant)
        .or_insert_with(|| compile_smollm2(shared_dir(), quant))
        .clone()
}

/// Session options with two threads (CI's cores) and the rest default.
pub fn two_threads() -> kiln_runtime::exec::SessionOptions {
    kiln_runtime::exec::SessionOptions {
        threads: 2,
        ..Default::default()
    }
}

/// Asserts kiln's perplexity of the golden text (llama.cpp's window and chunk count) on the
/// `quant` artifact is within 1 % of llama.cpp's figure under `key`.
pub fn check_perplexity(quant: Format, key: &str) {
    let golden = golden();
    let model = Model::open(&smollm2_artifact(quant)).expect("open");
    let text = std::fs::read_to_string(testdata().join("golden/apache-2.0.txt")).expect("text");
    let tokens = model.encode_prompt(&text, true);
    let ctx = golden["perplexity"]["ctx"].as_u64().expect("ctx") as usize;
    let score = perplexity(&model, &tokens, &Windows::of(ctx), &two_threads()).expect("perplexity");
    let want = golden["perplexity"]["ppl"][key].as_f64().expect("ppl");
    assert_eq!(
        score.chunks as u64,
        golden["perplexity"]["chunks"].as_u64().expect("chunks")
    );
    let rel = (score.ppl - want).abs() / want;
    println!(
        "{key}: kiln perplexity {:.4}, llama.cpp {want} ({:+.2}%)",
        score.ppl,
        (score.ppl - want) / want * 100.0
    );
    assert!(
        rel <= 0.01,
        "{key}: kiln {:.4} vs llama.cpp {want} ({:.2}% off)",
        score.ppl,
        rel * 100.0
    );
}

/// Token ids from a golden JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The golden greedy case named `name` (`p1`, `p2`, `chat`).
pub fn golden_case(name: &str) -> serde_json::Value {
    golden()["greedy"]["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("golden case {name}"))
}

/// Asserts an error `message` names `path` and says each of `phrases`; returns it.
pub fn assert_names_file(message: String, path: &Path, phrases: &[&str]) -> String {
    println!("{message}");
    assert!(
        message.contains(&path.display().to_string()),
        "message does not name the file {}: {message}",
        path.display()
    );
    for phrase in phrases {
        assert!(
            message.contains(phrase),
            "message lacks {phrase:?}: {message}"
        );
    }
    message
}

/// Each case (`{"name", "schema", "text"}`) that Python `jsonschema` finds invalid
/// (`testdata/structured/validate.py`), with why.
pub fn schema_failures(cases: &[serde_json::Value]) -> Vec<serde_json::Value> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(python())
        .arg(testdata().join("structured/validate.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(
            serde_json::Value::Array(cases.to_vec())
                .to_string()
                .as_bytes(),
        )
        .expect("writing the cases");
    let out = child.wait_with_output().expect("validate.py");
    assert!(
        out.status.success(),
        "validate.py (needs jsonschema[format-nongpl]; `cargo xtask test` installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("validate.py's answer")
}

/// Asserts that Python `jsonschema` finds every case valid (see [`schema_failures`]).
pub fn assert_schemas_hold(cases: &[serde_json::Value]) {
    let failed = schema_failures(cases);
    assert!(
        failed.is_empty(),
        "{} of {} invalid: {failed:#?}",
        failed.len(),
        cases.len()
    );
}
