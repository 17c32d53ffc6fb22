//! The CLI's habits and limits: llama.cpp's `-m`, `-s` (seed), `-c/--ctx-size`; flags out of
//! range refused by name before anything loads (`-t 100000`, `--temp nan`, `--repeat-penalty
//! 0`, `--repeat-last-n` past any context); `-n` past any context ending at the context; a
//! model path that is a FIFO refused instead of blocking; Ctrl-C in `kiln chat` ending the
//! reply, not the program; `kiln --version` naming the commit it was built from.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_runtime::quant::Format;
use serde_json::Value;

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(common::kiln_binary())
        .args(args)
        .output()
        .expect("kiln")
}

#[test]
fn flags_out_of_range_are_refused_by_name() {
    let model = common::smollm2_artifact(Format::Q4_1);
    let model = model.to_str().expect("a UTF-8 path");
    for (flag, value) in [
        ("-t", "100000"),
        ("--temp", "nan"),
        ("--temp", "-1"),
        ("--repeat-penalty", "0"),
        ("--repeat-last-n", "1000000000000"),
        ("--top-p", "0"),
        ("-c", "0"),
        ("--presence-penalty", "inf"),
    ] {
        let given = if flag.starts_with("--") {
            format!("{flag}={value}")
        } else {
            format!("{flag}{value}")
        };
        let out = kiln(&["run", model, "-p", "hi", &given]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag.trim_start_matches('-')),
            "{flag}: {stderr}"
        );
    }
}

#[test]
fn llama_cpp_flags_and_sizes_past_the_context() {
    let model = common::smollm2_artifact(Format::Q4_1);
    let model = model.to_str().expect("a UTF-8 path");
    let out = kiln(&[
        "run",
        "-m",
        model,
        "-p",
        "Hello",
        "-s",
        "3",
        "--ctx-size",
        "32",
        "-n",
        "1000000000000",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert!(
        matches!(
            v["stop"].as_str(),
            Some("context_full" | "end_of_generation")
        ),
        "{v}"
    );
    let both = kiln(&["run", model, "-m", model, "-p", "hi"]);
    assert_eq!(both.status.code(), Some(2));
}

#[test]
fn a_fifo_as_the_model_is_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("model.kiln");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let started = Instant::now();
    let mut child = Command::new(common::kiln_binary())
        .arg("run")
        .arg(&fifo)
        .args(["-p", "hi"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("kiln run blocked on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn ctrl_c_in_chat_ends_the_reply_not_the_program() {
    let mut child = Command::new(common::kiln_binary())
        .arg("chat")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args(["-n", "4000", "--temp", "1.0", "-s", "5", "-t", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kiln chat");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "Write a very long story about a dragon.").expect("a turn");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    // Some of the reply, then Ctrl-C.
    let mut first = String::new();
    stdout.read_line(&mut first).expect("reply text");
    // The shell's own `kill`: no procps needed.
    let sent = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {}", child.id()))
        .status()
        .expect("kill");
    assert!(sent.success());
    // The program goes on: the next turn is answered, and end of input ends it with 0.
    writeln!(stdin, "Say hi.").expect("a second turn");
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("the rest");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}: {first}{rest}");
}

#[test]
fn version_names_the_commit() {
    let out = kiln(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(common::testdata())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        text,
        format!("kiln {} ({commit})", env!("CARGO_PKG_VERSION")),
        "built from another commit? rebuild kiln"
    );
}
