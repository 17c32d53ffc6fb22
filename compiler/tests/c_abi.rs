//! libkiln from C: `examples/c/chat.c` compiled with the system's C compiler against
//! `runtime/ffi/include/kiln.h` and libkiln, as a shared and as a static library, runs on the
//! default model: a required tool call whose arguments fit the tool's schema, its result given
//! back and answered, a reply that must fit a JSON Schema (checked with Python `jsonschema`),
//! a reply its streaming callback stops, and an error returned as a status and a message.
//!
//! `KILN_TEST_QEMU_LIBKILN` (set by `.ci/arm-lane`) names an aarch64 libkiln.so: the example is
//! then also built with `aarch64-linux-gnu-gcc` and run under `qemu-aarch64-static -cpu
//! cortex-a76` on `KILN_TEST_QEMU_ARTIFACT`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_runtime::quant::Format;
use serde_json::{json, Value};

fn workspace() -> PathBuf {
    common::testdata().join("..")
}

/// The directory of the host's libkiln (`libkiln.so`, `libkiln.a`), beside the `kiln` binary.
fn libkiln_dir() -> PathBuf {
    let dir = common::kiln_binary()
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    for lib in ["libkiln.so", "libkiln.a"] {
        assert!(
            dir.join(lib).is_file(),
            "{} is missing: build it with `cargo build --release -p kiln-ffi` (`cargo xtask test` does)",
            dir.join(lib).display()
        );
    }
    dir
}

/// Compiles the example with `cc`, linked as `link` says.
fn compile(cc: &str, link: &[String], out: &Path) {
    let example = workspace().join("examples/c/chat.c");
    let include = workspace().join("runtime/ffi/include");
    let status = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(&example)
        .arg("-I")
        .arg(&include)
        .args(link)
        .status()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(status.success(), "{cc} {}: {status}", example.display());
}

/// The example's tagged lines, as `(tag, rest)`.
fn run(program: &mut Command) -> Vec<(String, String)> {
    let out = program.output().expect("running the example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(t, r)| (t.to_owned(), r.to_owned()))
        .collect()
}

/// Checks what the example printed.
fn check(lines: &[(String, String)]) {
    let get = |tag: &str| -> &str {
        &lines
            .iter()
            .find(|(t, _)| t == tag)
            .unwrap_or_else(|| panic!("no {tag} line in {lines:?}"))
            .1
    };
    let json_of = |tag: &str| -> Value {
        serde_json::from_str(get(tag)).unwrap_or_else(|e| panic!("{tag}: {e}"))
    };
    let calls = json_of("TOOL_CALLS");
    assert_eq!(calls["finish_reason"], "tool_calls", "{calls}");
    let call = &calls["tool_calls"][0];
    let answer = json_of("ANSWER");
    assert!(
        answer["content"].as_str().is_some_and(|c| !c.is_empty()),
        "{answer}"
    );
    let form = json_of("JSON");
    assert_eq!(form["finish_reason"], "stop", "{form}");
    let stopped = json_of("STOPPED");
    assert_eq!(stopped["finish_reason"], "cancelled", "{stopped}");
    assert!(get("REFUSED").contains("needs `tools`"), "{lines:?}");

    let (name, schema) = match call["function"]["name"].as_str() {
        Some("get_weather") => (
            "get_weather",
            json!({"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 40}},
            "required": ["city"], "additionalProperties": false}),
        ),
        Some("set_timer") => (
            "set_timer",
            json!({"type": "object", "properties": {
            "minutes": {"type": "integer", "minimum": 1, "maximum": 120}},
            "required": ["minutes"], "additionalProperties": false}),
        ),
        other => panic!("calls {other:?}: {calls}"),
    };
    let timer = json!({"type": "object", "properties": {
        "minutes": {"type": "integer", "minimum": 1, "maximum": 120},
        "label": {"type": "string", "minLength": 1, "maxLength": 20}},
        "required": ["minutes", "label"], "additionalProperties": false});
    let cases = [
        json!({"name": name, "schema": schema, "text": call["function"]["arguments"]}),
        json!({"name": "timer form", "schema": timer, "text": form["content"]}),
    ];
    assert_eq!(common::schema_failures(&cases), Vec::<Value>::new());
}

#[test]
fn the_c_example_runs_against_the_shared_and_the_static_library() {
    let lib = libkiln_dir();
    let model = common::smollm2_artifact(Format::Q4_1);
    let dir = tempfile::tempdir().expect("temp dir");

    let shared = dir.path().join("chat-shared");
    let rpath = format!("-Wl,-rpath,{}", lib.display());
    compile(
        "cc",
        &[format!("-L{}", lib.display()), "-lkiln".into(), rpath],
        &shared,
    );
    check(&run(Command::new(&shared).arg(&model)));

    let static_ = dir.path().join("chat-static");
    let mut link = vec![lib.join("libkiln.a").display().to_string()];
    link.extend(
        [
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ]
        .map(String::from),
    );
    compile("cc", &link, &static_);
    check(&run(Command::new(&static_).arg(&model)));
}

#[test]
fn the_c_example_runs_on_aarch64_under_qemu() {
    let Some(lib) = std::env::var_os("KILN_TEST_QEMU_LIBKILN").map(PathBuf::from) else {
        println!("skipped: set KILN_TEST_QEMU_LIBKILN to an aarch64 libkiln.so (see .ci/arm-lane)");
        return;
    };
    let artifact = std::env::var("KILN_TEST_QEMU_ARTIFACT").expect("KILN_TEST_QEMU_ARTIFACT");
    let dir = lib.parent().expect("libkiln's directory");
    let out = tempfile::tempdir().expect("temp dir");
    let program = out.path().join("chat-aarch64");
    compile(
        "aarch64-linux-gnu-gcc",
        &[
            format!("-L{}", dir.display()),
            "-lkiln".into(),
            format!("-Wl,-rpath,{}", dir.display()),
        ],
        &program,
    );
    let qemu = std::env::var("KILN_TEST_QEMU").unwrap_or_else(|_| "qemu-aarch64-static".into());
    check(&run(Command::new(qemu)
        .args(["-cpu", "cortex-a76"])
        .arg(&program)
        .arg(&artifact)));
}
