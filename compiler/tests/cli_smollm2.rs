//! The `kiln` binary as a user runs it, on the default model compiled to `q4_1`: streamed and
//! JSON output, tokenize, bench, chat, and clear errors for a context overflow or a bad file.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use kiln_runtime::quant::Format;
use serde_json::Value;

/// The `kiln` binary cargo built for this test run (next to the test executable's `deps/`).
fn kiln() -> Command {
    Command::new(common::kiln_binary())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running kiln")
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "kiln failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn golden_p1() -> Value {
    common::golden()["greedy"]["cases"][0].clone()
}

#[test]
fn run_json_gives_llama_cpp_greedy_ids() {
    let case = golden_p1();
    let out = run(kiln()
        .arg("run")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args([
            "-p",
            case["prompt"].as_str().expect("prompt"),
            "-n",
            "8",
            "--temp",
            "0",
            "--json",
        ]));
    let v = stdout_json(&out);
    assert_eq!(v["prompt_ids"], case["prompt_ids"]);
    let want: Vec<Value> = case["Q4_1"]["generated_ids"].as_array().expect("ids")[..8].to_vec();
    assert_eq!(v["ids"].as_array().expect("ids"), &want);
    assert_eq!(v["stop"], "max_tokens");
    assert!(
        v["text"].as_str().expect("text").starts_with(" Paris"),
        "{v}"
    );
}

#[test]
fn run_streams_text_and_stops_at_a_stop_string() {
    let out = run(kiln()
        .arg("run")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args([
            "-p",
            "The capital of France is",
            "-n",
            "40",
            "--temp",
            "0",
            "--stop",
            "\n",
        ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        " Paris.\n",
        "text is cut before the stop string"
    );
}

#[test]
fn tokenize_json_matches_llama_cpp_prompt_ids() {
    let case = golden_p1();
    let out = run(kiln()
        .arg("tokenize")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args(["--text", case["prompt"].as_str().expect("prompt"), "--json"]));
    assert_eq!(stdout_json(&out)["ids"], case["prompt_ids"]);
}

#[test]
fn bench_json_reports_every_field() {
    let out = run(kiln()
        .arg("bench")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args(["-p", "16", "-n", "4", "-r", "1", "-t", "1", "--json"]));
    let v = stdout_json(&out);
    for key in [
        "prompt_tokens_per_s",
        "decode_tokens_per_s",
        "ttft_ms",
        "peak_rss_mb",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
}

/// `kiln chat` on the default model with `args`, `input` as its turns; its stdout.
fn chat(args: &[&str], input: &[u8]) -> String {
    let mut child = kiln()
        .arg("chat")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kiln chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write turns");
    let out = child.wait_with_output().expect("kiln chat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn chat_answers_every_turn() {
    let text = chat(
        &["-n", "24", "--temp", "0"],
        b"What is the capital of France?\nAnd of Italy?\n",
    );
    let replies: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        replies.len(),
        2,
        "one reply per turn expected, got {text:?}"
    );
}

/// `kiln chat --tools`: a named tool is called with arguments that fit its schema, the call is
/// shown, its result (the next input line) goes back to the model, which then answers in text.
#[test]
fn chat_calls_a_tool_and_answers_with_its_result() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tools = dir.path().join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"], "additionalProperties": false}}}]"#,
    )
    .expect("write tools");
    let tools = tools.to_str().expect("a UTF-8 path");
    let text = chat(
        &[
            "--tools",
            tools,
            "--tool-choice",
            "get_weather",
            "-n",
            "40",
            "--temp",
            "0",
        ],
        b"What is the weather in Lyon?\n{\"temperature\": 11, \"sky\": \"rain\"}\n",
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let call = lines.first().expect("a call line");
    let args = call
        .strip_prefix("[call get_weather(")
        .and_then(|a| a.strip_suffix(")]"))
        .unwrap_or_else(|| panic!("{text:?}"));
    let args: Value = serde_json::from_str(args).expect("JSON arguments");
    assert!(
        args["city"].as_str().is_some_and(|c| !c.is_empty()),
        "{args}"
    );
    assert_eq!(lines.len(), 2, "a call, then an answer in text: {text:?}");
    assert!(!lines[1].starts_with("[call"), "{text:?}");
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let out = run(kiln()
        .arg("run")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args([
            "-p",
            "one two three four five six seven eight nine ten",
            "-c",
            "4",
        ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("context full") && err.contains("4-token context"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_or_corrupt_artifact_is_a_clear_error() {
    let out = run(kiln().args(["run", "/nonexistent/model.kiln", "-p", "hi"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model.kiln"), "{err}");

    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.kiln");
    std::fs::write(
        &bad,
        b"GGUF this is not an artifact at all, but long enough for a header......",
    )
    .expect("write");
    let out = run(kiln().arg("run").arg(&bad).args(["-p", "hi"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.kiln") && err.contains("not a kiln artifact"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
